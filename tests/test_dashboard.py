"""The Grafana dashboard (deploy/grafana) queries only metrics that exist: mmclinic's against a live
server's /metrics, TensorFlow Serving's against the documented names in mmclinic.serve.tfserving."""

from __future__ import annotations

import base64
import json
import re
import shutil
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "mmclinic-serving.json"
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])(mmclinic_serve_[A-Za-z0-9_]+|:tensorflow:[A-Za-z0-9_:]+)")


def _exprs():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return dash, exprs


def _queried():
    _, exprs = _exprs()
    names = {m for e in exprs for m in _METRIC.findall(e)}
    return sorted(n for n in names if n.startswith("mmclinic_")), sorted(n for n in names if n.startswith(":"))


def test_dashboard_shape_and_provisioning():
    dash, exprs = _exprs()
    assert dash["uid"] == "mmclinic-serving" and exprs
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for needle in ("request rate", "latency", "error rate", "batch"):
        assert needle in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    prov = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/mmclinic.yaml").read_text())
    assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file"
    sources = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"


def test_tf_serving_metrics_are_documented_names():
    from mmclinic.serve.tfserving import TFSERVING_METRICS

    _, tfs = _queried()
    assert tfs and set(tfs) <= set(TFSERVING_METRICS), set(tfs) - set(TFSERVING_METRICS)


@pytest.mark.slow
def test_every_mmclinic_metric_the_dashboard_queries_is_served(exported_model, dataset, tmp_path):
    from mmclinic.serve.server import METRIC_NAMES, make_http_server

    base = tmp_path / "models"
    shutil.copytree(exported_model.path.parent, base / "tiny")
    png = sorted((dataset / "images").glob("*.png"))[0].read_bytes()
    body = json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(png).decode()},
                                      "report_text": "Clear lungs."}]}).encode()
    with make_http_server(base, "127.0.0.1", 0, poll_seconds=0) as httpd:
        url = "http://{}:{}".format(*httpd.server_address[:2])
        req = urllib.request.Request(url + "/v1/models/tiny:predict", data=body,
                                     headers={"Content-Type": "application/json"})
        assert urllib.request.urlopen(req, timeout=60).status == 200
        text = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
    served = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    mine, _ = _queried()
    assert mine and not set(mine) - served, set(mine) - served
    assert set(METRIC_NAMES) <= served
