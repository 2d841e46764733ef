"""``mmclinic compare``: tables of differing config keys and metrics, plots, and a paired
bootstrap on the same evaluation set. Reuses the shared trained-run fixture; the second run is a
copy of it rolled back to an earlier checkpoint (no extra training)."""

import json
import shutil

import pandas as pd
import pytest

from mmclinic.cli import main
from mmclinic.errors import UsageError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def earlier_run(trained_run, tmp_path_factory):
    """The trained run at an earlier checkpoint, with a different config name, not tied to MLflow."""
    run = tmp_path_factory.mktemp("compare") / "tiny-early"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "tensorboard"))
    (run / "mlflow_run_id").unlink()
    index = run / "checkpoints" / "checkpoint"
    steps = sorted(int(p.name.split("-")[1].split(".")[0]) for p in (run / "checkpoints").glob("ckpt-*.index"))
    index.write_text(index.read_text().replace(f"ckpt-{steps[-1]}", f"ckpt-{steps[0]}"))
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("name: tiny", "name: tiny-early", 1))
    return run


def test_compare_workdirs_and_mlflow_run_with_paired_bootstrap(trained_run, earlier_run, dataset, tmp_path):
    from mmclinic.eval.compare import compare, summary_text
    from mmclinic.eval.evaluate import evaluate

    if not (trained_run / "eval" / "latest.json").is_file():
        evaluate(trained_run, dataset, "test", tmp_path / "REPORT.json")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(trained_run / "config.yaml", bare / "config.yaml")
    mlflow_id = (trained_run / "mlflow_run_id").read_text().strip()
    out = tmp_path / "cmp"
    result = compare([str(trained_run), str(earlier_run), mlflow_id, str(bare)], out, dataset, "test", boot=200)

    labels = [r.label for r in result.runs]
    assert labels[:2] == ["tiny", "tiny-early"] and len(set(labels)) == 4
    assert list(result.configs.index)[0] == "name"
    assert result.configs.loc["name", "tiny-early"] == "tiny-early"
    assert "train.steps" not in result.configs.index  # identical everywhere: not shown
    assert result.metrics.loc["image_to_text.R@5", "tiny"].count("[") == 1  # value with its interval
    assert result.metrics.loc["image_to_text.R@5", labels[2]] != ""  # MLflow eval metric, no interval
    assert result.metrics.loc["image_to_text.R@5", "tiny-early"] == ""  # never evaluated
    assert any("not evaluated" in (r.note or "") for r in result.runs)

    paired = {p["metric"]: p for p in result.paired}
    assert set(paired) == {"image_to_text.R@5", "mismatch.auroc"}
    for p in paired.values():
        assert p["reference"] == "tiny" and p["run"] == "tiny-early"
        assert p["difference"] == pytest.approx(p["run_value"] - p["reference_value"])
        lo, hi = p["ci95"]
        assert lo <= p["difference"] <= hi and 0 <= p["p"] <= 1 and p["verdict"]
    assert "no checkpoint" in result.paired_note and "MLflow run" in result.paired_note

    for name in ("configs.csv", "configs.md", "metrics.csv", "metrics.md", "paired.csv", "paired.md",
                 "metrics.png", "paired.png", "compare.html"):
        assert (out / name).is_file(), name
    assert pd.read_csv(out / "paired.csv")["metric"].tolist() == ["image_to_text.R@5", "mismatch.auroc"]
    assert "data:image/png;base64," in (out / "compare.html").read_text()
    assert "Paired bootstrap" in summary_text(result)


def test_compare_same_model_twice_shows_no_difference(trained_run, dataset, tmp_path):
    from mmclinic.eval.compare import compare

    twin = tmp_path / "twin"
    shutil.copytree(trained_run, twin, ignore=shutil.ignore_patterns("eval", "tensorboard", "mlflow_run_id"))
    result = compare([str(trained_run), str(twin)], None, dataset, boot=100)
    for p in result.paired:
        assert p["difference"] == 0 and p["ci95"] == [0.0, 0.0] and "not distinguishable" in p["verdict"]


def test_compare_bad_arguments_exit_2(trained_run, tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing-run")]) == 2
    assert "RUN_OR_MLFLOW_RUN_ID" in capsys.readouterr().err
    assert main(["compare", "0123456789abcdef0123456789abcdef"]) == 2
    assert "no such MLflow run" in capsys.readouterr().err
    (tmp_path / "notarun").mkdir()
    assert main(["compare", str(tmp_path / "notarun")]) == 2
    assert main(["compare", str(trained_run), "--data", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    from mmclinic.eval.compare import compare

    with pytest.raises(UsageError, match="--split"):
        compare([str(trained_run)], split="dev")


def test_compare_cli_writes_tables(trained_run, tmp_path, capsys):
    assert main(["compare", str(trained_run), "--out", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    assert "## Metrics" in printed and "no --data given" in printed
    assert (tmp_path / "c" / "metrics.md").read_text().startswith("| metric |")
    assert json.loads(json.dumps(pd.read_csv(tmp_path / "c" / "configs.csv").to_dict()))
