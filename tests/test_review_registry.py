"""The champion gate's decision rule (non-inferiority on the paired-bootstrap interval) and the
serving label of a model's first vetted export (canary, routed; promote makes it stable)."""

from __future__ import annotations

import base64
import http.client
import json
import shutil

import pytest

from mmclinic.serve.registry import gate_decision


def test_gate_fails_when_the_interval_reaches_past_the_margin_though_the_point_is_within():
    # AUROC (higher is better) down 0.02 at the point, but plausibly down 0.15: fails a 0.05 margin
    g = gate_decision(-0.02, [-0.15, 0.10], 0.05, higher_is_better=True)
    assert g == {"passed": False, "worse": pytest.approx(0.02), "worse_bound": pytest.approx(0.15), "basis": "ci95"}
    # ECE (lower is better) up 0.01 at the point, up to 0.08 plausibly
    g = gate_decision(0.01, [-0.02, 0.08], 0.05, higher_is_better=False)
    assert not g["passed"] and g["worse_bound"] == pytest.approx(0.08)


def test_gate_passes_when_the_whole_interval_is_within_the_margin():
    g = gate_decision(-0.02, [-0.04, 0.01], 0.05, higher_is_better=True)
    assert g["passed"] and g["worse_bound"] == pytest.approx(0.04) and g["basis"] == "ci95"
    # better than the champion, even at the interval's worst end
    assert gate_decision(0.03, [0.01, 0.06], 0.0, higher_is_better=True)["passed"]
    assert gate_decision(-0.01, [-0.03, 0.02], 0.05, higher_is_better=False)["passed"]
    # the bound sits exactly on the margin: passes (at most the margin)
    assert gate_decision(-0.01, [-0.05, 0.0], 0.05, higher_is_better=True)["passed"]


def test_gate_without_an_interval_says_what_decided():
    point = gate_decision(-0.02, None, 0.05, higher_is_better=True)
    assert point["passed"] and point["basis"] == "point" and point["worse_bound"] == pytest.approx(0.02)
    assert not gate_decision(-0.08, None, 0.05, higher_is_better=True)["passed"]
    assert gate_decision(None, None, 0.05, higher_is_better=True) == {
        "passed": True, "worse": None, "worse_bound": None, "basis": "undefined"}


def _call(httpd, method, path, body=None):
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"} if body is not None else {})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()


@pytest.mark.slow
def test_first_export_is_the_canary_and_promote_makes_it_stable(trained_run, exported_model, dataset, tmp_path):
    """A model's first vetted version gets the label canary (no stable version exists to be beside);
    `serve` routes /labels/canary to it while /labels/stable is 404; promote moves stable to it and
    drops the canary label."""
    from mlflow import MlflowClient

    from mmclinic.artifacts import RunDir
    from mmclinic.serve import registry
    from mmclinic.serve.server import make_http_server
    from mmclinic.tracking import tracking_uri

    base = tmp_path / "models"
    shutil.copytree(exported_model.path, base / "tiny" / "1")
    folder = base / "tiny"
    run = RunDir(trained_run)
    config = run.config()
    name = config.export.name
    client = MlflowClient(tracking_uri())
    png = sorted((dataset / "images").glob("*.png"))[0].read_bytes()
    body = {"instances": [{"image_bytes": {"b64": base64.b64encode(png).decode()}, "report_text": "No effusion."}]}
    try:
        version = registry.mark_challenger(run, config, "tiny", folder / "1", 1)
        assert version is not None and str(client.get_model_version_by_alias(name, "challenger").version) == version
        assert json.loads((folder / "version_labels.json").read_text()) == {"canary": 1}
        httpd = make_http_server(base, "127.0.0.1", 0, poll_seconds=0)
        with httpd:
            code, out = _call(httpd, "POST", "/v1/models/tiny/labels/canary:predict", body)
            assert code == 200 and len(out["predictions"]) == 1, out
            code, out = _call(httpd, "GET", "/v1/models/tiny/labels/stable")
            assert code == 404 and "stable" in out["error"]

        registry.promote(name)
        assert json.loads((folder / "version_labels.json").read_text()) == {"stable": 1}
        assert str(client.get_model_version_by_alias(name, "champion").version) == version
        httpd = make_http_server(base, "127.0.0.1", 0, poll_seconds=0)
        with httpd:
            assert _call(httpd, "POST", "/v1/models/tiny/labels/stable:predict", body)[0] == 200
            assert _call(httpd, "GET", "/v1/models/tiny/labels/canary")[0] == 404
        assert [m["action"] for m in registry.history(name)][-2:] == ["challenger", "promote"]
    finally:
        for alias in ("champion", "previous", "challenger"):
            try:
                client.delete_registered_model_alias(name, alias)
            except Exception:  # noqa: BLE001 - already absent
                pass
