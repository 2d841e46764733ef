"""``kill -9`` then the same command again: a subset of reliability/kill_trials.py (``make reliability``
runs the whole set over every command). Each trial starts the real ``mmclinic`` command, kills it
with SIGKILL, runs it again and checks the result against an uninterrupted run."""

from __future__ import annotations

import random
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from reliability import kill_trials as kt  # noqa: E402

pytestmark = pytest.mark.skipif(not kt.MMCLINIC.is_file(), reason=f"{kt.MMCLINIC} not installed (make venv)")


@pytest.fixture
def bench(tmp_path):
    return kt.Bench(tmp_path / "bench", seed=5, log=lambda s: None)


def test_killed_ingest_reruns_to_the_uninterrupted_dataset(bench):
    from mmclinic.data.synth import synthesize

    src = bench.root / "synthetic"
    synthesize(src, patients=12, seed=5, size=64)
    from mmclinic.data.ingest import IngestOptions, ingest

    reference = bench.root / "dataset"  # the uninterrupted run, through the function the command calls
    ingest(src, reference, "dicom", bench.key, IngestOptions(max_side=64, workers=2))
    # Over a previous dataset, killed while it decodes: once its scratch folder holds a decoded image
    # (an event, not a clock: a fast machine would finish a clock's interval first).
    at = random.Random(5).uniform(0.0, 0.3)
    outcome = kt.trial_ingest(bench, src, reference, at, "ingest-killed", prior=True,
                              when=lambda out: lambda: any(out.with_name(out.name + ".partial").glob("decoded/*")))
    assert outcome.ok, outcome.detail
    assert outcome.killed and outcome.orphans == 0


def test_dataset_checks_find_a_lost_or_repeated_input(bench, dataset, tmp_path):
    """The ingest trial's checks can fail: a dataset with a repeated row, or one missing an input."""
    import shutil

    import pandas as pd

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    inputs = len(pd.read_parquet(copy / "manifest.parquet")) + int(
        (pd.read_csv(copy / "quarantine.csv", keep_default_na=False)["kind"] == "image").sum())
    kt.check_dataset(copy, inputs, None)
    with pytest.raises(kt.CheckFailed, match="accepted .* != .* inputs"):
        kt.check_dataset(copy, inputs + 1, None)
    m = pd.read_parquet(copy / "manifest.parquet")
    pd.concat([m, m.iloc[:1]]).to_parquet(copy / "manifest.parquet", index=False)
    with pytest.raises(kt.CheckFailed):
        kt.check_dataset(copy, inputs + 1, None)


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_weights(bench, dataset):
    """Killed once a checkpoint exists, the same command resumes and ends bit-identical (deterministic
    mode) to a run that was never killed, with one finished MLflow run and its registered model."""
    reference = bench.root / "run-uninterrupted"
    log = bench.root / "run-uninterrupted.log"
    # Beside the killed run (two cores), with its own MLflow store: two processes creating one SQLite
    # store at once race on its schema.
    straight = bench.start(kt.train_args(dataset, reference), output=log,
                           env={"MLFLOW_TRACKING_URI": f"sqlite:///{bench.root / 'mlflow-reference.db'}"})

    def reference_done() -> None:
        if straight.wait(timeout=600) != 0:
            pytest.fail(f"the uninterrupted run failed:\n{log.read_text()[-3000:]}")

    run = bench.root / "run-killed"
    started = kt.trial_train(bench, dataset, reference, random.Random(5).uniform(0.0, 0.3), run.name, steps=16,
                             when=lambda r: lambda: (r / "checkpoints" / "checkpoint").exists(),
                             before_checks=reference_done)
    assert started.ok, started.detail
    assert started.killed


@pytest.mark.slow
def test_killed_rescore_keeps_rows_and_decisions(bench, exported_model, dataset):
    """Decisions made on the queue survive a killed re-score and its re-run; no row is lost or repeated."""
    from mmclinic.serve.scoring import score

    reference_db = bench.root / "scores-uninterrupted.db"
    score(exported_model.path, data=dataset, split="all", db=f"sqlite:///{reference_db}")
    state = kt.db_state(reference_db)
    assert state["queue"], "the tiny model flagged nothing: no decisions to keep"
    at = random.Random(5).uniform(4, 10)  # loading the model, scoring, writing (the command takes ~12 s here)
    outcome = kt.trial_score(bench, exported_model.path, dataset, reference_db, at, "scores-killed", rescore=True)
    assert outcome.ok, outcome.detail
    assert outcome.orphans == 0


def test_ingest_stopped_while_swapping_keeps_the_previous_dataset_whole(tmp_path, monkeypatch):
    """The moment a clock rarely hits: the new dataset is complete and the previous one is moved aside.
    Stopped there, the previous dataset is whole (as DATASET.mmclinic-previous) and the next run puts things right."""
    from pathlib import Path

    from mmclinic.data.ingest import IngestOptions, ingest
    from mmclinic.data.synth import synthesize

    src, key = tmp_path / "src", tmp_path / "key.hex"
    synthesize(src, patients=6, seed=3, size=64)
    key.write_text(kt.KEY_HEX + "\n")
    out = tmp_path / "ds"
    ingest(src, out, "dicom", key, IngestOptions(max_side=64, workers=1))
    before = kt.read_dataset(out)
    real_rename = Path.rename

    def stop_at_the_swap(self, target):
        if self.name == "ds.partial":
            raise KeyboardInterrupt  # stands in for the kill: nothing after this line runs
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", stop_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, out, "dicom", key, IngestOptions(max_side=64, workers=1))
    monkeypatch.undo()
    assert not out.exists()
    kt.check_dataset(out.with_name("ds.mmclinic-previous"), kt.image_inputs(src), before, final=False)
    ingest(src, out, "dicom", key, IngestOptions(max_side=64, workers=1))
    kt.check_dataset(out, kt.image_inputs(src), before)
    assert not out.with_name("ds.mmclinic-previous").exists()
