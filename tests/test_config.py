import subprocess
import sys

import pytest

from mmclinic.config import ExperimentConfig, config_from_dict, diff_configs, load_config
from mmclinic.errors import ConfigError, UsageError

from conftest import REPO


def test_load_experiments_shipped():
    for name in ("tiny", "demo"):
        cfg = load_config(REPO / "experiments" / f"{name}.yaml")
        assert cfg.name == name


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="model.image_widht"):
        config_from_dict({"model": {"image_widht": [1]}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.steps"):
        config_from_dict({"train": {"steps": "many"}})


def test_override_types_checked_and_applied():
    cfg = config_from_dict({}, ["train.steps=7", "train.learning_rate=1", "model.image_widths=[4, 8]"])
    assert cfg.train.steps == 7 and cfg.train.learning_rate == 1.0 and cfg.model.image_widths == (4, 8)
    with pytest.raises(ConfigError, match="train.loss"):
        config_from_dict({}, ["train.loss=hinge"])
    with pytest.raises(ConfigError, match="train.nope"):
        config_from_dict({}, ["train.nope=1"])


def test_hash_stable_and_sensitive():
    a, b = ExperimentConfig(), config_from_dict({})
    assert a.hash() == b.hash()
    c = config_from_dict({}, ["train.seed=1"])
    assert c.hash() != a.hash()
    assert diff_configs(a, c) == ["train.seed"]


def test_yaml_round_trip(tmp_path):
    cfg = config_from_dict({}, ["data.image_size=48"])
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_missing_file():
    with pytest.raises(UsageError, match="not found"):
        load_config("/nonexistent/x.yaml")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mmclinic.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_user_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    r = _cli("train", str(bad), "--data", str(tmp_path))
    assert r.returncode == 2 and "train.stepz" in r.stderr and "Traceback" not in r.stderr
    r = _cli("train", str(REPO / "experiments/tiny.yaml"), "--data", str(tmp_path / "missing"))
    assert r.returncode == 2 and "missing" in r.stderr
    r = _cli("train", str(tmp_path / "nope.yaml"), "--data", str(tmp_path))
    assert r.returncode == 2 and "nope.yaml" in r.stderr
    r = _cli("train", str(REPO / "experiments/tiny.yaml"), "--data", str(tmp_path), "--set", "train.steps=x")
    assert r.returncode == 2 and "train.steps" in r.stderr
