"""Evaluation: scorers (the inference engines a notebook uses), metrics, calibration, zero-shot,
the evaluation report and its HTML, run comparison."""
