"""One path through train -> evaluate -> export -> load elsewhere -> score, on the tiny config."""

import json
import sqlite3
import subprocess
import sys

import pytest

from mmclinic.config import load_config
from mmclinic.errors import UsageError

from conftest import REPO

pytestmark = pytest.mark.slow


def test_training_learns_better_than_untrained(trained_run, dataset):
    """Held-out (val + test splits) retrieval and mismatch detection beat the same model at initialisation."""
    import keras

    import pandas as pd

    from mmclinic.eval.embedding import SplitData, load_split
    from mmclinic.eval.evaluate import compute_report
    from mmclinic.eval.scorers import RunScorer, load_run_model
    from mmclinic.models.dual_encoder import from_model_config

    model, tok, cfg = load_run_model(trained_run)
    val, tst = load_split(dataset, "val"), load_split(dataset, "test")
    test = SplitData(png=val.png + tst.png, texts=val.texts + tst.texts,
                     meta=pd.concat([val.meta, tst.meta], ignore_index=True))  # all held-out patients
    trained = compute_report(RunScorer(trained_run, model, tok, cfg), test, boot=0)
    keras.utils.set_random_seed(cfg.train.seed)
    fresh = from_model_config(cfg.model, cfg.data.image_size, cfg.data.max_length, len(tok.vocab))
    fresh.build_all()
    untrained = compute_report(RunScorer(trained_run, fresh, tok, cfg), test, boot=0)

    def mean_rank(r):
        return r["retrieval"]["image_to_text"]["mean_rank"]["value"]

    pool = trained["retrieval"]["image_to_text"]["pool_size"]
    assert mean_rank(trained) < mean_rank(untrained) - 1.0
    assert mean_rank(trained) < 0.4 * (pool + 1)  # chance is (pool + 1) / 2
    assert trained["mismatch"]["auroc"]["value"] > max(0.55, untrained["mismatch"]["auroc"]["value"] + 0.03)


def test_run_folder_and_tracking(trained_run):
    import mlflow

    for name in ("config.yaml", "vocab.txt", "run.json", "mlflow_run_id"):
        assert (trained_run / name).is_file()
    assert list((trained_run / "checkpoints").glob("ckpt-200*"))
    tb = trained_run / "tensorboard"
    assert list(tb.glob("events.out.tfevents.*")) and (tb / "projector_config.pbtxt").is_file()
    assert (tb / "sprite.png").is_file() and (tb / "metadata_image.tsv").read_text().startswith("kind\t")
    run = mlflow.MlflowClient().get_run((trained_run / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    assert run.data.params["train.loss"] == "clip" and "data.dataset_version" in run.data.params
    assert "train.loss" in run.data.metrics and run.data.tags["mmclinic.config_hash"]


def test_same_workdir_resumes_and_changed_config_refuses(trained_run, dataset):
    from mmclinic.training.loop import train

    cfg = load_config(trained_run / "config.yaml")
    again = train(cfg, dataset, trained_run, quiet=True)
    assert again.step == cfg.train.steps
    changed = load_config(trained_run / "config.yaml", ["train.learning_rate=0.5"])
    with pytest.raises(UsageError, match="train.learning_rate"):
        train(changed, dataset, trained_run, quiet=True)


def test_interrupted_run_resumes_at_its_step(dataset, tmp_path):
    """A run stopped after its step-5 checkpoint continues from step 5 in the same MLflow run."""
    from mmclinic.training.loop import train

    cfg = load_config(REPO / "experiments" / "tiny.yaml", ["train.steps=10", "train.checkpoint_every=5",
                                                            "train.eval_every=100"])
    run = tmp_path / "r"
    first = train(cfg, dataset, run, quiet=True)
    # Remove what the last five steps wrote: the state a stop right after step 5 leaves behind.
    for f in (run / "checkpoints").glob("ckpt-10*"):
        f.unlink()
    ckpt_index = (run / "checkpoints" / "checkpoint")
    ckpt_index.write_text(ckpt_index.read_text().replace("ckpt-10", "ckpt-5"))
    info = json.loads((run / "run.json").read_text())
    info["step"] = 5
    (run / "run.json").write_text(json.dumps(info))
    resumed = train(cfg, dataset, run, quiet=True)
    assert resumed.step == 10 and resumed.mlflow_run_id == first.mlflow_run_id
    assert list((run / "checkpoints").glob("ckpt-10*"))


def test_evaluate_export_load_elsewhere_and_score(trained_run, dataset, synth_source, exported_model, tmp_path):
    from mmclinic.eval.evaluate import evaluate
    from mmclinic.serve.scoring import score

    report = evaluate(trained_run, dataset, "test", tmp_path / "REPORT.json")
    saved = json.loads((tmp_path / "REPORT.json").read_text())
    for direction in ("image_to_text", "text_to_image"):
        for k in ("R@1", "R@5", "R@10", "median_rank"):
            fig = saved["retrieval"][direction][k]
            assert set(fig) >= {"value", "ci95"}
    assert {"auroc", "auprc", "fpr_at_95tpr", "by_corruption"} <= set(saved["mismatch"])
    assert "slices" in saved and report["counts"]["images"] > 0

    result = exported_model
    assert result.path.parent.name == "tiny" and result.path.name == "1" and result.version == 1
    assert (result.path / "saved_model.pb").is_file() and (result.path / "assets.extra" / "model_card.md").is_file()
    assert all(c["passed"] for c in result.checks.values())

    png = sorted((dataset / "images").glob("*.png"))[0]
    code = f"""
import tensorflow as tf, tensorflow_text
m = tf.saved_model.load({str(result.path)!r})
f = m.signatures["serving_default"]
out = f(image_bytes=tf.constant([open({str(png)!r}, "rb").read()] * 2),
        report_text=tf.constant(["Left pleural effusion.", "No acute cardiopulmonary process."]))
s = out["match_score"].numpy()
assert s.shape == (2,) and ((s >= 0) & (s <= 1)).all(), s
print("OK", s.tolist())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]

    # MODEL_BASE/NAME (its latest version), as score and serve accept it.
    via_export = evaluate(result.path.parent, dataset, "test", tmp_path / "REPORT_export.json")
    assert via_export["evaluated"]["kind"] == "saved_model" and via_export["evaluated"]["target"] == "1"
    a = report["retrieval"]["image_to_text"]["R@5"]["value"]
    assert via_export["retrieval"]["image_to_text"]["R@5"]["value"] == pytest.approx(a, abs=1e-6)

    db = tmp_path / "scores.db"
    s = score(result.path, data=dataset, db=f"sqlite:///{db}", split="test")
    with sqlite3.connect(db) as conn:
        n, = conn.execute("select count(*) from pair_scores where scoring_run_id = ?", (s.scoring_run_id,)).fetchone()
        vals = [r[0] for r in conn.execute("select match_score from pair_scores")]
    assert n == s.pairs > 0 and all(0 <= v <= 1 for v in vals)

    # The same model scores a CSV of raw files: a DICOM from the archive and an unreadable file.
    dcm = sorted((synth_source / "dicom").rglob("*.dcm"))[0]
    rows = ["image_path,report_text,pair_id", f"{png},Left pleural effusion.,p1", "missing.png,Normal.,p2",
            f"{dcm},No acute cardiopulmonary process.,p3"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    c = score(result.path, input_csv=tmp_path / "pairs.csv", db=f"sqlite:///{db}")
    with sqlite3.connect(db) as conn:
        got = dict(conn.execute("select pair_id, error from pair_scores where scoring_run_id = ?",
                                (c.scoring_run_id,)).fetchall())
    assert got["p1"] is None and got["p3"] is None and got["p2"] == "missing_image" and c.failed == 1

    # Evaluation figures reached the run's MLflow record.
    import mlflow

    metrics = mlflow.MlflowClient().get_run((trained_run / "mlflow_run_id").read_text().strip()).data.metrics
    assert "eval.test.image_to_text.R_at_5" in metrics


def test_export_refuses_an_unvetted_run(dataset, tmp_path):
    from mmclinic.errors import VettingFailed
    from mmclinic.serve.export import export
    from mmclinic.training.loop import train

    cfg = load_config(REPO / "experiments" / "tiny.yaml", ["train.steps=2", "train.eval_every=100",
                                                            "export.min_mismatch_auroc=0.99"])
    run = tmp_path / "weak"
    train(cfg, dataset, run, quiet=True)
    with pytest.raises(VettingFailed, match="mismatch_auroc"):
        export(run, tmp_path / "models")
    assert not (tmp_path / "models" / "mmclinic").exists()
    assert json.loads((run / "vetting.json").read_text())["checks"]["mismatch_auroc"]["passed"] is False


def test_demo_cli_end_to_end(demo_run):
    """`mmclinic demo` with the tiny experiment: every stage runs and writes its output (the notebooks
    run against the same outputs in tests/test_notebooks.py)."""
    assert demo_run.returncode == 0, demo_run.stdout[-3000:] + demo_run.stderr[-3000:]
    demo = demo_run.workdir
    outputs = json.loads((demo / "demo_outputs.json").read_text())
    assert (demo / "REPORT.json").is_file() and "mlflow ui" in demo_run.stdout
    assert list((demo / "models" / "mmclinic-demo").glob("1/saved_model.pb"))
    assert outputs["scores_db"].startswith("sqlite:///")
