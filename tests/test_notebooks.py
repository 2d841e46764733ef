"""Every notebook in notebooks/ runs against one demo run (the session's `demo_run` fixture) with
papermill, its parameters pointing at that run; a cell that raises fails the test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow
NOTEBOOKS = REPO / "notebooks"


def _execute(name: str, out: Path, **parameters) -> dict:
    import papermill

    papermill.execute_notebook(str(NOTEBOOKS / name), str(out / name), parameters=parameters, cwd=str(NOTEBOOKS),
                               kernel_name="python3", progress_bar=False, execution_timeout=600)
    return json.loads((out / name).read_text())


def _text(nb: dict) -> str:
    return "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                     for c in nb["cells"] for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def demo(demo_run) -> Path:
    assert demo_run.returncode == 0, demo_run.stdout[-3000:] + demo_run.stderr[-3000:]
    return demo_run.workdir


def test_every_notebook_is_tested():
    tested = {"01_quickstart.ipynb", "02_failure_cases.ipynb", "03_compare_runs.ipynb", "04_embeddings.ipynb",
              "05_data.ipynb", "06_scoring.ipynb", "07_real_data.ipynb"}
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == tested


def test_quickstart_notebook(tmp_path):
    nb = _execute("01_quickstart.ipynb", tmp_path, WORKDIR=str(tmp_path / "qs"), PATIENTS=24, STEPS=30)
    assert (tmp_path / "qs" / "REPORT.json").is_file()
    assert sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", [])) >= 4


def test_failure_cases_notebook_and_tags_slice(demo, tmp_path):
    from mmclinic.cli import main

    first = pd.read_parquet(demo / "failure_cases.parquet")["image_id"].iloc[0]
    tags = tmp_path / "tags.csv"
    nb = _execute("02_failure_cases.ipynb", tmp_path, DEMO_DIR=str(demo), TAGS_CSV=str(tags), N_CASES=1,
                  IG_STEPS=8, HEADLESS_TAGS={first: "model_error"})
    assert "sim " in _text(nb) or any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    assert tags.read_text() == f"image_id,tag\n{first},model_error\n"
    # The tags join the next evaluation as a slice.
    out = tmp_path / "REPORT.json"
    assert main(["evaluate", str(demo / "models" / "mmclinic-demo" / "1"), "--data", str(demo / "dataset"),
                 "--out", str(out), "--tags", str(tags)]) == 0
    report = json.loads(out.read_text())
    assert "tag=model_error" in report["slices"] and report["evaluated"]["tags"]["joined_images"] == 1


def test_compare_runs_notebook(demo, tmp_path):
    nb = _execute("03_compare_runs.ipynb", tmp_path, DEMO_DIR=str(demo), VARIANT_DIR=str(tmp_path / "variant"),
                  VARIANT_STEPS=20, BOOT=50)
    assert "image_to_text.R@5" in _text(nb)


def test_embeddings_notebook(demo, tmp_path):
    nb = _execute("04_embeddings.ipynb", tmp_path, DEMO_DIR=str(demo))
    assert "centroid_distance" in _text(nb)


def test_data_notebook(demo, tmp_path):
    nb = _execute("05_data.ipynb", tmp_path, DATASET=str(demo / "dataset"))
    assert "findings" in _text(nb)


def test_scoring_notebook(demo, tmp_path):
    nb = _execute("06_scoring.ipynb", tmp_path, MODEL_BASE=str(demo / "models"), DATASET=str(demo / "dataset"),
                  SCORES_DB=str(demo / "scores.db"))
    assert "AVAILABLE" in _text(nb) and "pair_scores" in _text(nb)


def test_real_data_notebook_skips_cleanly_without_data(tmp_path):
    nb = _execute("07_real_data.ipynb", tmp_path, DATA=str(tmp_path / "absent"), WORKDIR=str(tmp_path / "w"))
    assert "is not at" in _text(nb) and not (tmp_path / "w").exists()


@pytest.mark.skipif(not (SHARED_DATA / "medpix2" / "splitted_dataset").is_dir(), reason="MedPix 2.0 not present")
@pytest.mark.skipif(os.environ.get("MMCLINIC_NOTEBOOK_REAL_DATA") != "1",
                    reason="about 2 minutes (ingests all of MedPix 2.0): set MMCLINIC_NOTEBOOK_REAL_DATA=1")
def test_real_data_notebook_on_medpix2(tmp_path):
    nb = _execute("07_real_data.ipynb", tmp_path, DATA=str(SHARED_DATA / "medpix2"), WORKDIR=str(tmp_path / "w"),
                  STEPS=10, MAX_SIDE=64, IMAGE_SIZE=32)
    assert (tmp_path / "w" / "REPORT.json").is_file() and "chance" in _text(nb)
