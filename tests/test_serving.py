"""`mmclinic serve`: a real HTTP server on 127.0.0.1 over the exported tiny model."""

from __future__ import annotations

import base64
import collections
import http.client
import io
import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PLANTED = "Zebediah Quartermaine MRN 99887766"
BROKEN_PNG = b"\x89PNG\r\n\x1a\n" + PLANTED.encode()  # a PNG signature, then no image


@pytest.fixture(scope="module")
def model_base(exported_model, tmp_path_factory):
    """MODEL_BASE with versions 1 and 2 of `tiny` and the label stable -> 1."""
    base = tmp_path_factory.mktemp("serve") / "models"
    shutil.copytree(exported_model.path.parent, base / "tiny")
    shutil.copytree(base / "tiny" / "1", base / "tiny" / "2")
    (base / "tiny" / "version_labels.json").write_text(json.dumps({"stable": 1}))
    return base


@pytest.fixture(scope="module")
def server(model_base):
    from mmclinic.serve.server import make_http_server

    log = io.StringIO()
    httpd = make_http_server(model_base, "127.0.0.1", 0, max_batch=4, max_body_mb=0.5, log=log,
                             max_batch_size=3, batch_timeout_ms=5, poll_seconds=0)
    with httpd:  # started in a thread; stopped (in-flight requests finished) and closed on exit
        yield httpd, log


def _call(httpd, method, path, body=None, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection(*httpd.server_address[:2], timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    resp = conn.getresponse()
    raw = resp.read()
    if own:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(raw) if ctype.startswith("application/json") else raw.decode())


def _png(dataset, i=0):
    return sorted((dataset / "images").glob("*.png"))[i].read_bytes()


def test_status_metadata_and_labels(server, exported_model):
    httpd, _ = server
    assert _call(httpd, "GET", "/healthz") == (200, {"status": "ok", "models": {"tiny": [1, 2]}})
    code, st = _call(httpd, "GET", "/v1/models/tiny")
    assert code == 200 and [s["version"] for s in st["model_version_status"]] == ["2", "1"]
    assert all(s["state"] == "AVAILABLE" and s["status"]["error_code"] == "OK" for s in st["model_version_status"])
    code, st = _call(httpd, "GET", "/v1/models/tiny/labels/stable")
    assert code == 200 and [s["version"] for s in st["model_version_status"]] == ["1"]

    code, meta = _call(httpd, "GET", "/v1/models/tiny/versions/1/metadata")
    assert code == 200 and meta["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    assert set(sigs["serving_default"]["inputs"]) == {"image_bytes", "report_text"}
    assert sigs["serving_default"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert set(sigs["serving_default"]["outputs"]) == {"match_score", "match_logit", "similarity"}
    assert {"embed_image", "embed_text", "match_embeddings", "score_tokens"} <= set(sigs)
    info = json.loads((exported_model.path / "assets.extra" / "mmclinic.json").read_text())
    assert meta["mmclinic"]["mismatch_threshold"] == info["mismatch_threshold"]
    assert meta["mmclinic"]["labels"] == ["stable"]


def test_predict_matches_the_savedmodel_in_both_formats(server, exported_model, dataset):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    httpd, _ = server
    pngs = [_png(dataset, 0), _png(dataset, 1)]
    texts = ["Left pleural effusion.", "No acute cardiopulmonary process."]
    want = tf.saved_model.load(str(exported_model.path)).signatures["serving_default"](
        image_bytes=tf.constant(pngs), report_text=tf.constant(texts))
    rows = {"instances": [{"image_bytes": {"b64": base64.b64encode(p).decode()}, "report_text": t}
                          for p, t in zip(pngs, texts)]}
    code, out = _call(httpd, "POST", "/v1/models/tiny:predict", rows)
    assert code == 200 and len(out["predictions"]) == 2
    got = np.array([p["match_score"] for p in out["predictions"]])
    np.testing.assert_allclose(got, want["match_score"].numpy(), rtol=1e-5, atol=1e-6)

    cols = {"signature_name": "embed_text", "inputs": {"report_text": texts}}
    code, out = _call(httpd, "POST", "/v1/models/tiny/labels/stable:predict", cols)
    emb = np.array(out["outputs"])
    assert code == 200 and emb.shape[0] == 2 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    code, out = _call(httpd, "POST", "/v1/models/tiny/versions/2:predict",
                      {"signature_name": "embed_text", "instances": texts})  # one input: bare values
    assert code == 200 and np.allclose(np.array(out["predictions"]), emb, atol=1e-5)

    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=60)  # keep-alive: one connection
    for _ in range(2):
        assert _call(httpd, "POST", "/v1/models/tiny:predict", rows, conn)[0] == 200
    conn.close()


def test_malformed_requests_get_4xx_json_errors_that_never_echo_inputs(server, dataset):
    httpd, log = server
    img = {"b64": base64.b64encode(_png(dataset)).decode()}
    cases = [
        ("POST", "/v1/models/tiny:predict", b"{not json", 400, "not JSON"),
        ("POST", "/v1/models/tiny:predict", [1, 2], 400, "JSON object"),
        ("POST", "/v1/models/tiny:predict", {"instances": [], "inputs": {}}, 400, "exactly one of"),
        ("POST", "/v1/models/tiny:predict", {"instances": [{"image_bytes": img}]}, 400, "missing input(s) report_text"),
        ("POST", "/v1/models/tiny:predict", {"instances": [{"image_bytes": {"b64": "***"}, "report_text": PLANTED}]},
         400, "not valid base64"),
        ("POST", "/v1/models/tiny:predict",
         {"instances": [{"image_bytes": {"b64": base64.b64encode(PLANTED.encode()).decode()},
                         "report_text": PLANTED}]}, 400, "not PNG, JPEG, BMP or GIF bytes"),
        ("POST", "/v1/models/tiny:predict",
         {"instances": [{"image_bytes": {"b64": base64.b64encode(BROKEN_PNG).decode()}, "report_text": PLANTED}]},
         400, "cannot run on these inputs"),
        ("POST", "/v1/models/tiny:predict", {"signature_name": "nope", "instances": []}, 400, "no signature 'nope'"),
        ("POST", "/v1/models/tiny:predict", {"instances": [{"image_bytes": img, "report_text": "x"}] * 5}, 413,
         "at most 4"),
        ("POST", "/v1/models/nope:predict", {"instances": []}, 404, "not served here"),
        ("GET", "/v1/models/tiny/versions/7", None, 404, "version 7 is not served"),
        ("GET", "/v1/models/tiny/labels/canary", None, 404, "no version label 'canary'"),
        ("POST", "/v1/models/tiny:classify", {"examples": []}, 501, "classify is not served"),
        ("GET", "/v1/models/tiny:predict", None, 405, "not allowed"),
        ("GET", "/v2/whatever", None, 404, "no such endpoint"),
        ("GET", f"/v1/{PLANTED.replace(' ', '%20')}", None, 404, "no such endpoint"),
        ("POST", "/v1/models/tiny:predict", {"instances": [{"image_bytes": img, "report_text": "x", PLANTED: 1}]},
         400, "unknown input(s) 1 key(s) not shown"),
        ("POST", "/v1/models/tiny:predict", {"signature_name": PLANTED, "instances": []}, 400,
         "has no signature of that name"),
    ]
    for method, path, body, status, needle in cases:
        code, out = _call(httpd, method, path, body)
        assert code == status and needle in out["error"], (path, body if isinstance(body, dict) else "", code, out)
        assert "Zebediah" not in json.dumps(out) and "99887766" not in json.dumps(out)
    # An unread body (here on a GET) closes the connection: it is never taken for the next request.
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=60)
    conn.request("GET", "/v1/models/tiny", body=PLANTED.encode())
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Connection") == "close"
    resp.read()
    conn.request("GET", "/healthz")  # http.client reconnects
    resp = conn.getresponse()
    assert resp.status == 200 and PLANTED not in resp.read().decode()
    conn.close()
    # A body over the limit is refused from its Content-Length, before it is read.
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=60)
    conn.putrequest("POST", "/v1/models/tiny:predict")
    conn.putheader("Content-Length", str(600 << 10))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "at most 524288" in json.loads(resp.read())["error"]
    conn.close()
    assert "Zebediah" not in log.getvalue() and "99887766" not in log.getvalue()
    assert "POST /v1/models/tiny:predict 400" in log.getvalue() and "GET (unmatched path) 404" in log.getvalue()


def test_metrics_count_requests_and_instances(server, dataset):
    httpd, _ = server
    img = {"b64": base64.b64encode(_png(dataset)).decode()}
    assert _call(httpd, "POST", "/v1/models/tiny:predict",
                 {"instances": [{"image_bytes": img, "report_text": "Clear lungs."}] * 3})[0] == 200
    code, text = _call(httpd, "GET", "/metrics")
    assert code == 200
    assert 'mmclinic_serve_requests_total{code="200",endpoint="predict",model="tiny"}' in text
    line = next(x for x in text.splitlines()
                if x.startswith('mmclinic_serve_instances_total{model="tiny",signature="serving_default",version="2"}'))
    assert float(line.split()[-1]) >= 3
    assert 'mmclinic_serve_model_version_loaded{model="tiny",version="1"} 1.0' in text
    assert "mmclinic_serve_request_seconds_bucket" in text


def test_serve_cli_refuses_a_folder_without_models(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmclinic.cli", "serve", str(tmp_path), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no exported models" in proc.stderr
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "m" / "version_labels.json").write_text('{"stable": 3}')
    proc = subprocess.run([sys.executable, "-m", "mmclinic.cli", "serve", str(tmp_path), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "label 'stable' must name an exported version" in proc.stderr


def _rows(pngs, texts):
    return {"instances": [{"image_bytes": {"b64": base64.b64encode(p).decode()}, "report_text": t}
                          for p, t in zip(pngs, texts)]}


def _metric(text, prefix):
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(prefix))


def test_dynamic_batching_merges_concurrent_requests_and_isolates_bad_ones(server, exported_model, dataset):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    httpd, log = server
    pngs = [_png(dataset, i) for i in range(6)]
    texts = [f"Finding number {i}: small left pleural effusion." for i in range(6)]
    want = tf.saved_model.load(str(exported_model.path)).signatures["serving_default"](
        image_bytes=tf.constant(pngs), report_text=tf.constant(texts))["match_score"].numpy()
    bad = {"instances": [{"image_bytes": {"b64": base64.b64encode(BROKEN_PNG).decode()},
                          "report_text": PLANTED}]}
    results: dict[int, tuple[int, object]] = {}

    def client(i):
        body = bad if i >= 6 else _rows([pngs[i]], [texts[i]])
        results[i] = _call(httpd, "POST", "/v1/models/tiny:predict", body)

    _, before = _call(httpd, "GET", "/metrics")
    for _ in range(3):  # concurrent rounds: some requests share a model call
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i in range(6):
            code, out = results[i]
            assert code == 200, out
            np.testing.assert_allclose(out["predictions"][0]["match_score"], want[i], rtol=1e-4, atol=1e-5)
        for i in (6, 7):  # the undecodable image fails its own request only
            code, out = results[i]
            assert code == 400 and "cannot run on these inputs" in out["error"] and "Zebediah" not in json.dumps(out)
    _, after = _call(httpd, "GET", "/metrics")
    merged = 'mmclinic_serve_batch_requests_sum{model="tiny",signature="serving_default"}'
    calls = 'mmclinic_serve_batch_requests_count{model="tiny",signature="serving_default"}'
    assert _metric(after, merged) - _metric(before, merged) >= 18  # every good request went through a model call
    assert _metric(after, calls) - _metric(before, calls) < _metric(after, merged) - _metric(before, merged)
    assert 'mmclinic_serve_batch_size_bucket{le="4.0",model="tiny",signature="serving_default"}' in after
    # A request larger than a batch (4 > max_batch_size 3, within --max-batch 4) runs as a call of its own.
    code, out = _call(httpd, "POST", "/v1/models/tiny:predict", _rows(pngs[:4], texts[:4]))
    assert code == 200 and np.allclose([p["match_score"] for p in out["predictions"]], want[:4], atol=1e-5)
    assert "Zebediah" not in log.getvalue()


def test_more_bad_input_keeps_the_server_up(server, dataset):
    import socket

    httpd, log = server
    img = {"b64": base64.b64encode(_png(dataset)).decode()}
    code, out = _call(httpd, "POST", "/v1/models/tiny:predict", {"instances": [{"image_bytes": img,
                                                                                "report_text": "  "}]})
    assert code == 400 and "report_text[0] is empty" in out["error"]
    code, out = _call(httpd, "POST", "/v1/models/tiny:predict",
                      {"instances": [{"image_bytes": img, "report_txt": PLANTED}]})
    assert code == 400 and "missing input(s) report_text; unknown input(s) report_txt" in out["error"]
    assert "Zebediah" not in json.dumps(out)
    # A chunked body (no Content-Length) is refused as soon as it passes the limit.
    # The server may answer 413 and close while the client is still sending: the client then sees
    # the connection reset, which is the "closed connection" outcome and equally fine.
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=60)
    try:
        conn.request("POST", "/v1/models/tiny:predict", body=iter([PLANTED.encode() * 4096] * 8),
                     encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert resp.status == 413 and "Zebediah" not in resp.read().decode()
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        conn.close()
    assert _call(httpd, "GET", "/v1/models/tiny")[0] == 200  # and the server is still up
    # Clients that go away mid-request, or send garbage, cost nothing but their own connection.
    host, port = httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
                  + PLANTED.encode())
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01 not http at all " + PLANTED.encode() + b"\r\n\r\n")
        s.recv(1024)  # the server answers 400 or closes; either way it stays up
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n")
    assert _call(httpd, "GET", "/healthz")[0] == 200
    assert "Zebediah" not in log.getvalue() and "99887766" not in log.getvalue()


@pytest.fixture()
def hot_base(exported_model, tmp_path):
    """The exported model without its labels (export labels a model's first version ``canary``,
    which would keep it served beside every later version)."""
    base = tmp_path / "models"
    shutil.copytree(exported_model.path.parent, base / "tiny")
    (base / "tiny" / "version_labels.json").unlink(missing_ok=True)
    return base


def test_new_versions_are_hot_loaded_without_failing_requests(hot_base, dataset):
    from mmclinic.serve.server import make_http_server

    log = io.StringIO()
    folder = hot_base / "tiny"
    body = _rows([_png(dataset)], ["Clear lungs."])
    with make_http_server(hot_base, "127.0.0.1", 0, log=log, poll_seconds=0.2) as httpd:
        codes: list[int] = []
        stop = threading.Event()

        def load():  # requests keep arriving while versions come and go (bounded: 300 s)
            conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=60)
            deadline = time.monotonic() + 300
            while not stop.is_set() and time.monotonic() < deadline:
                codes.append(_call(httpd, "POST", "/v1/models/tiny:predict", body, conn)[0])
            conn.close()

        clients = [threading.Thread(target=load) for _ in range(2)]
        for t in clients:
            t.start()

        def wait_for(versions, seconds=180):  # loading competes with the clients for the CPU
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if _call(httpd, "GET", "/healthz")[1]["models"]["tiny"] == versions:
                    return True
                time.sleep(0.1)
            return False

        # Half-written versions are never served: export's hidden .incoming-N, a folder without saved_model.pb.
        shutil.copytree(folder / "1", folder / ".incoming-2")
        (folder / "3").mkdir()
        (folder / "3" / "variables").mkdir()
        time.sleep(1.0)
        assert _call(httpd, "GET", "/healthz")[1]["models"]["tiny"] == [1]
        # Export's rename makes version 2 complete: it is loaded, then swapped in; version 1 goes.
        (folder / ".incoming-2").rename(folder / "2")
        assert wait_for([2]), log.getvalue()
        # A label keeps version 1 served beside the latest.
        (folder / "version_labels.json").write_text(json.dumps({"stable": 1, "canary": 2}))
        assert wait_for([1, 2]), log.getvalue()
        code, st = _call(httpd, "GET", "/v1/models/tiny/labels/canary")
        assert code == 200 and [s["version"] for s in st["model_version_status"]] == ["2"]
        # A version that cannot be loaded is logged and skipped; what was served stays served.
        shutil.copytree(folder / "2", folder / "4")
        (folder / "4" / "saved_model.pb").write_bytes(b"not a SavedModel")
        time.sleep(1.0)
        assert _call(httpd, "GET", "/healthz")[1]["models"]["tiny"] == [1, 2]
        stop.set()
        for t in clients:
            t.join(120)
        _, metrics = _call(httpd, "GET", "/metrics")
    assert codes and set(codes) == {200}, dict(collections.Counter(codes))
    assert "loaded tiny version 2" in log.getvalue() and "unloaded tiny version 1" in log.getvalue()
    assert "not loaded:" in log.getvalue() and "/4: cannot be loaded as a SavedModel" in log.getvalue()
    assert 'mmclinic_serve_model_loads_total{model="tiny",outcome="failed"} 1.0' in metrics
