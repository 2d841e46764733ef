"""The reproducible environment: one lock file, used by the Makefile, the Dockerfile and conda."""

import re

import yaml

from conftest import REPO


def test_lock_pins_every_package_with_hashes():
    text = (REPO / "requirements.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", text, flags=re.M)
    assert len(pins) > 100
    blocks = re.split(r"\n(?=[A-Za-z0-9_.\-]+==)", text.split("\n\n", 1)[1])
    assert all("--hash=sha256:" in b for b in blocks if b.strip() and not b.startswith("#"))
    names = {n.lower() for n, _ in pins}
    assert {"tensorflow", "keras", "keras-hub", "tensorflow-text", "mlflow", "pydicom"} <= names
    assert not re.search(r"^--(extra-)?index-url|^--find-links", text, flags=re.M), "lock must not name a host"


def test_makefile_dockerfile_and_conda_use_the_same_lock():
    make = (REPO / "Makefile").read_text()
    assert "LOCK := requirements.lock" in make and "--require-hashes --no-deps -r $(LOCK)" in make
    docker = (REPO / "Dockerfile").read_text()
    assert "COPY requirements.lock" in docker
    assert "pip install --require-hashes --no-deps -r requirements.lock" in docker
    assert "AS train" in docker and "AS serve" in docker and "FROM tensorflow/serving" in docker
    # models.config labels versions: TensorFlow Serving needs this flag to accept a label on a version it is loading.
    assert '"--allow_version_labels_for_unavailable_models=true"' in docker
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    assert "-r requirements.lock" in pip_section and "--require-hashes" in pip_section


def test_pip_conf_has_timeouts_retries_and_no_named_host():
    conf = (REPO / "pip.conf").read_text()
    assert re.search(r"^timeout\s*=", conf, re.M) and re.search(r"^retries\s*=", conf, re.M)
    active = [line for line in conf.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert not any("index-url" in line or "trusted-host" in line for line in active)
    assert "# index-url" in conf
