"""Shared fixtures: one small synthetic archive, its dataset and one tiny trained run per session."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """MLflow store and working directory in a temporary folder: tests never write into the
    repository (ingest copies data cards into ./data_cards when run from the repository root)."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    from mmclinic.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, patients=60, seed=7, size=64)
    return out


@pytest.fixture(scope="session")
def dataset(synth_source, tmp_path_factory) -> Path:
    from mmclinic.data.ingest import IngestOptions, ingest

    base = tmp_path_factory.mktemp("datasets")
    # A fixed key: the same pseudonyms and splits in every session, so trained results repeat.
    (base / "key.hex").write_text("6d6d636c696e69632d746573742d6b6579" * 2 + "\n")
    ingest(synth_source, base / "ds", "dicom", base / "key.hex", IngestOptions(max_side=64, workers=2,
                                                                               write_dicom=True))
    return base / "ds"


@pytest.fixture(scope="session")
def trained_run(dataset, tmp_path_factory) -> Path:
    """The tiny experiment trained long enough to learn something (about a minute here)."""
    from mmclinic.config import load_config
    from mmclinic.training.loop import train

    cfg = load_config(REPO / "experiments" / "tiny.yaml", ["train.steps=200", "train.checkpoint_every=50",
                                                            "train.eval_every=200", "train.log_every=50",
                                                            "export.min_recall5_over_chance=1.0",
                                                            "data.deterministic=true"])
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(cfg, dataset, run, quiet=True)
    return run


@pytest.fixture(scope="session")
def exported_model(trained_run, tmp_path_factory):
    """``trained_run`` vetted and exported once (MODEL_BASE/tiny/1), for the export, scoring and serving tests."""
    from mmclinic.serve.export import export

    return export(trained_run, tmp_path_factory.mktemp("models"), "tiny")


@dataclass
class DemoRun:
    """One `mmclinic demo` of the tiny experiment: its workdir and the command's output."""

    workdir: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """`mmclinic demo` run once per session with the tiny experiment (the end-to-end test checks
    it; the notebooks run against it)."""
    base = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, "-m", "mmclinic.cli", "demo", "--workdir", str(base / "demo"), "--patients", "40",
         "--experiment", str(REPO / "experiments" / "tiny.yaml"), "--set", "train.steps=120",
         "--set", "data.deterministic=true",
         # The command's plumbing, not learning (asserted elsewhere): 120 tiny steps on 40 patients
         # sit too close to chance for the quality gates.
         "--set", "export.min_recall5_over_chance=0.0", "--set", "export.min_mismatch_auroc=0.0"],
        capture_output=True, text=True, timeout=900, cwd=base,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})  # its own mlflow.db, as `make demo`
    return DemoRun(base / "demo", proc.returncode, proc.stdout, proc.stderr)
