"""The artifact classes on the real folders the shared fixtures make: the dataset, the trained
run and the exported model; and the one error policy (a UsageError naming the file)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from mmclinic.artifacts import DatasetDir, ExportedModel, ModelFolder, RunDir, find_models, model_versions
from mmclinic.config import load_config
from mmclinic.errors import UsageError

# --------------------------------------------------------------------------- dataset


def test_dataset_dir_reads_what_ingest_wrote(dataset):
    ds = DatasetDir.open(dataset)
    manifest = ds.manifest()
    assert len(manifest) > 0 and {"image_id", "report_id", "split", "path"} <= set(manifest.columns)
    assert set(ds.reports(columns=["report_id", "text"]).columns) == {"report_id", "text"}
    info = json.loads((dataset / "dataset.json").read_text())
    assert ds.version == info["version"] and ds.name == info["name"]
    assert ds.data_card_path.is_file() and ds.quarantine_path.is_file()
    for split in ("train", "val", "test"):
        files = ds.shard_files(split)
        assert files and all(f.endswith(".tfrecord") and f"/{split}-" in f for f in files)

    val = ds.load_split("val")
    rows = manifest[manifest["split"] == "val"].sort_values("image_id")
    assert val.meta["image_id"].tolist() == rows["image_id"].tolist()
    reports = ds.reports()
    text = dict(zip(reports["report_id"], reports["text"]))
    assert val.texts == [text[r] for r in val.meta["report_id"]]
    assert val.png[0] == (dataset / val.meta["path"].iloc[0]).read_bytes()
    assert len(ds.load_split("nope").png) == 0


def test_dataset_dir_names_the_missing_or_broken_file(dataset, tmp_path):
    with pytest.raises(UsageError, match="--data not found"):
        DatasetDir.open(tmp_path / "absent")
    with pytest.raises(UsageError, match="manifest.parquet"):
        DatasetDir.open(tmp_path, "--data")
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("images", "shards", "dicom"))
    (copy / "reports.parquet").unlink()
    ds = DatasetDir.open(copy, "the run's dataset")
    with pytest.raises(UsageError, match="the run's dataset .*no reports.parquet"):
        ds.load_split("val")
    (copy / "dataset.json").unlink()
    assert ds.version == "unknown" and ds.name == "ds"
    (copy / "dataset.json").write_text("{not json")
    with pytest.raises(UsageError, match="dataset.json: not readable JSON"):
        ds.version  # noqa: B018


# --------------------------------------------------------------------------- training run


def test_run_dir_reads_what_training_wrote(trained_run):
    import tensorflow as tf

    run = RunDir.open(trained_run)
    assert run.config() == load_config(trained_run / "config.yaml")
    info = run.info()
    assert info["step"] == run.step == run.config().train.steps
    assert run.dataset_path.is_dir() and DatasetDir.open(run.dataset_path).version == info["dataset_version"]
    assert run.latest_checkpoint() == tf.train.latest_checkpoint(str(trained_run / "checkpoints"))
    assert run.latest_checkpoint().endswith("ckpt-200")
    assert run.vocab_path.is_file() and run.tensorboard_dir.is_dir()
    assert run.mlflow_run_id() == (trained_run / "mlflow_run_id").read_text().strip()


def test_run_dir_updates_run_json_and_records_evaluations(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("eval", "tensorboard"))
    run = RunDir.open(copy)
    before = run.info()
    assert run.update_info(step=7)["step"] == 7 and run.step == 7
    assert {k: v for k, v in run.info().items() if k != "step"} == {k: v for k, v in before.items() if k != "step"}

    report, note = run.latest_evaluation()
    assert report is None and "not evaluated yet" in note
    out = tmp_path / "elsewhere" / "REPORT.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"counts": {"images": 3}}))
    copied = run.record_evaluation(out, "test", run.dataset_path)
    assert copied == copy / "eval" / "test" / "REPORT.json"
    assert json.loads((copy / "eval" / "latest.json").read_text())["report"] == "test/REPORT.json"
    assert run.latest_evaluation() == ({"counts": {"images": 3}}, None)

    run.set_mlflow_run_id("0" * 32)
    assert run.mlflow_run_id() == "0" * 32


def test_run_dir_error_cases(trained_run, tmp_path):
    with pytest.raises(UsageError, match="RUN .*not a training run .*config.yaml"):
        RunDir.open(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(trained_run / "config.yaml", bare / "config.yaml")
    run = RunDir.open(bare)
    assert run.latest_checkpoint() is None and run.mlflow_run_id() is None and run.step == 0
    with pytest.raises(UsageError, match="no checkpoint"):
        run.require_checkpoint()
    with pytest.raises(UsageError, match="run.json: missing"):
        run.info()
    (bare / "run.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="run.json: expected a JSON object"):
        run.info()
    # The checkpoint index names a checkpoint whose files are gone.
    (bare / "checkpoints").mkdir()
    (bare / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-9"\n')
    assert run.latest_checkpoint() is None


# --------------------------------------------------------------------------- exported model


@pytest.fixture()
def model_base(exported_model, tmp_path):
    """A copy of the exported fixture's MODEL_BASE (tiny/1)."""
    base = tmp_path / "models"
    shutil.copytree(exported_model.path.parent, base / "tiny")
    return base


def test_the_three_model_paths_give_the_same_model(exported_model):
    version_dir = exported_model.path
    forms = [version_dir.parent.parent, version_dir.parent, version_dir]
    opened = [ExportedModel.open(p) for p in forms]
    assert all(m.path == version_dir for m in opened)
    info = json.loads((version_dir / "assets.extra" / "mmclinic.json").read_text())
    for m in opened:
        assert m.name == "tiny" and m.version == exported_model.version == 1
        assert m.mismatch_threshold == info["mismatch_threshold"] and m.config().name == info["config"]["name"]
        assert m.model_card_path.is_file()
    assert [f.name for f in find_models(version_dir.parent.parent)] == ["tiny"]


def test_a_half_written_version_is_not_the_latest(model_base):
    (model_base / "tiny" / "2" / "assets.extra").mkdir(parents=True)  # export still copying: no saved_model.pb
    (model_base / "tiny" / ".incoming-3").mkdir()
    assert model_versions(model_base / "tiny") == [1]
    for path in (model_base, model_base / "tiny"):
        assert ExportedModel.open(path).path == model_base / "tiny" / "1"
    folder = ModelFolder(model_base / "tiny")
    assert folder.next_version() == 3  # never reuses the number being written
    shutil.copytree(model_base / "tiny" / "1", model_base / "tiny" / "3")
    assert ExportedModel.open(model_base / "tiny").path.name == "3" and folder.versions == [1, 3]


def test_broken_or_missing_metadata_is_a_usage_error_naming_the_file(model_base, dataset, tmp_path):
    from mmclinic.cli import main
    from mmclinic.eval.evaluate import evaluate
    from mmclinic.serve.scoring import score
    from mmclinic.serve.server import ModelServer

    meta = model_base / "tiny" / "1" / "assets.extra" / "mmclinic.json"
    good = meta.read_text()
    for content, needle in ((None, "mmclinic.json: missing"), ("{broken", "mmclinic.json: not readable JSON"),
                            (json.dumps({"config": {}}), "mmclinic.json: 'mismatch_threshold' must be a number")):
        if content is None:
            meta.unlink()
        else:
            meta.write_text(content)
        with pytest.raises(UsageError, match=needle):
            ExportedModel.open(model_base).metadata  # noqa: B018
        # evaluate, score and serve fail the same way, before any scoring.
        with pytest.raises(UsageError, match=needle):
            evaluate(model_base / "tiny", dataset, "test", tmp_path / "r.json")
        with pytest.raises(UsageError, match=needle):
            score(model_base / "tiny", data=dataset, db=f"sqlite:///{tmp_path / 's.db'}")
        with pytest.raises(UsageError, match=needle):
            ModelServer(model_base)
        assert main(["score", str(model_base), "--data", str(dataset), "--db",
                     f"sqlite:///{tmp_path / 's.db'}"]) == 2
    meta.write_text(good)
    assert not (tmp_path / "r.json").exists()


def test_model_paths_that_name_no_model_or_several(model_base, tmp_path):
    from mmclinic.eval.evaluate import open_target

    with pytest.raises(UsageError, match="MODEL_DIR .*not found"):
        ExportedModel.open(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    for opener in (lambda p: ExportedModel.open(p), lambda p: find_models(p, "MODEL_BASE"), open_target):
        with pytest.raises(UsageError, match="no exported models"):
            opener(tmp_path / "empty")
    shutil.copytree(model_base / "tiny", model_base / "other")
    assert [f.name for f in find_models(model_base)] == ["other", "tiny"]
    with pytest.raises(UsageError, match="holds 2 models \\(other, tiny\\); give one as"):
        ExportedModel.open(model_base)
    assert ExportedModel.open(model_base / "other").path == model_base / "other" / "1"


def test_version_labels(model_base):
    shutil.copytree(model_base / "tiny" / "1", model_base / "tiny" / "2")
    labels = model_base / "tiny" / "version_labels.json"
    labels.write_text(json.dumps({"stable": 1, "canary": 2}))
    assert ModelFolder(model_base / "tiny").labels() == {"stable": 1, "canary": 2}
    (pinned,) = find_models(model_base / "tiny" / "1")
    assert pinned.versions == [1] and pinned.labels() == {"stable": 1} and pinned.latest().path.name == "1"
    labels.write_text(json.dumps({"stable": 5}))
    with pytest.raises(UsageError, match="version_labels.json: label 'stable' must name an exported version"):
        ModelFolder(model_base / "tiny").labels()


def test_layouts_are_read_only_through_the_artifact_classes():
    """The commands' modules name no layout file themselves (artifacts.py does)."""
    from conftest import REPO

    names = [f'"{n}"' for n in ("manifest.parquet", "reports.parquet", "dataset.json", "data_card.md", "run.json",
                                 "config.yaml", "vocab.txt", "mlflow_run_id", "checkpoints", "mmclinic.json",
                                 "assets.extra", "saved_model.pb", "version_labels.json")]
    files = [*(REPO / "mmclinic" / "eval").glob("*.py"), *(REPO / "mmclinic" / "serve").glob("*.py"),
             REPO / "mmclinic" / "tracking.py", REPO / "mmclinic" / "data" / "negatives.py",
             REPO / "mmclinic" / "demo.py"]
    bad = []
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if any(n in line for n in names):
                bad.append(f"{path.name}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_split_loading_matches_pandas_by_hand(dataset):
    """load_split is the manifest rows of the split, by image_id, joined to the report text."""
    from mmclinic.eval.embedding import load_split

    got = load_split(dataset, "test")
    manifest = pd.read_parquet(dataset / "manifest.parquet")
    reports = pd.read_parquet(dataset / "reports.parquet")
    want = manifest[manifest["split"] == "test"].sort_values("image_id").reset_index(drop=True)
    want = want.merge(reports[["report_id", "text"]], on="report_id", how="left")
    pd.testing.assert_frame_equal(got.meta, want)
