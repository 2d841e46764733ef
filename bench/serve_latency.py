"""``mmclinic serve`` against the SavedModel called directly, on 127.0.0.1, in one run.

    python bench/serve_latency.py [--model-base /tmp/serve_demo/models] [--out serve_latency.json]

1. batch-1 latency p50/p99: the SavedModel's ``serving_default`` called in this process vs one
   predict request at a time over one keep-alive connection, alternately (target overhead <= 1.5x);
2. throughput at 16 concurrent clients, dynamic batching on vs off (``--no-batching``)
   (target >= 2.5x);
3. a bounded load run: 5,000 requests from 32 clients, 20 % malformed or oversized (in turn: bad
   JSON, wrong input names, bytes that are no image, a truncated PNG, a body over
   ``--max-body-mb``): 5xx count, dropped connections of well-formed requests, the server's
   resident memory after the first and the last thousand requests (target <= 1.1x), p50/p99;
4. with ``--tflite-run RUN``: the TFLite int8 and float16 image towers vs float32 (size, latency).

The server runs as ``mmclinic serve`` in a subprocess (its own interpreter, as in production);
clients are threads here. Every loop is bounded in count and time. The model: one exported by
``mmclinic demo --workdir /tmp/serve_demo`` (or any MODEL_BASE with one model).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

DEADLINE_S = 600  # no phase may run longer


def _run_clients(client, clients: int) -> float:
    """Run ``client`` in ``clients`` threads at once; the seconds until all are done."""
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Server:
    def __init__(self, model_base: str, *extra: str) -> None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        self.proc = subprocess.Popen([sys.executable, "-m", "mmclinic.cli", "serve", model_base, "--port", "0",
                                      "--poll-seconds", "0", *extra], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.monotonic() + 300
        self.port = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            match = re.search(r"http://127\.0\.0\.1:(\d+)/v1/models/(\S+)", line)
            if match:
                self.port, self.model = int(match[1]), match[2]
            if line.startswith("metrics at"):
                break
        if self.port is None:
            self.stop()
            raise RuntimeError("mmclinic serve did not start")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict | None = None) -> int:
    conn.request("POST", path, body=body, headers=headers or {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.array(xs) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "n": len(xs)}


def batch1_latency(version_dir: Path, png: bytes, text: str, port: int, path: str, body: bytes, n: int
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """(direct, serve) latency of one pair, measured alternately so that whatever else loads the
    machine weighs on both alike."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    img, txt = tf.constant([png]), tf.constant([text])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(20):
        fn(image_bytes=img, report_text=txt)
        assert _post(conn, path, body) == 200
    direct, served = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(image_bytes=img, report_text=txt)["match_score"].numpy()
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert _post(conn, path, body) == 200
        served.append(time.perf_counter() - t0)
    conn.close()
    return _pct(direct), _pct(served)


def throughput(port: int, path: str, body: bytes, clients: int, per_client: int) -> dict[str, float]:
    done, errors = [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + DEADLINE_S

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(per_client):
            if time.monotonic() > deadline:
                break
            try:
                ok = _post(conn, path, body) == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
            with lock:
                done[0] += ok
                errors[0] += not ok
        conn.close()

    warm = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(10):
        _post(warm, path, body)
    warm.close()
    dt = _run_clients(client, clients)
    return {"requests_per_s": round(done[0] / dt, 1), "ok": done[0], "errors": errors[0], "seconds": round(dt, 2)}


def load_run(server: Server, path: str, good: bytes, bad: list[tuple[str, bytes, dict]], total: int, clients: int,
             malformed_share: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    plan = ["bad" if rng.random() < malformed_share else "good" for _ in range(total)]
    lock = threading.Lock()
    next_i = [0]
    codes: dict[str, dict[str, int]] = {"good": {}, "bad": {}}
    dropped = {"good": 0, "bad": 0}
    latencies: list[float] = []
    rss: dict[int, int] = {}
    deadline = time.monotonic() + DEADLINE_S

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                i = next_i[0]
                if i >= total:
                    break
                next_i[0] += 1
            kind = plan[i]
            if kind == "good":
                body, headers = good, {"Content-Type": "application/json"}
            else:
                _, body, headers = bad[i % len(bad)]
            t0 = time.perf_counter()
            try:
                code = _post(conn, path, body, headers)
            except (OSError, http.client.HTTPException):
                code = None
                conn.close()  # http.client reconnects on the next request
            dt = time.perf_counter() - t0
            with lock:
                if code is None:
                    dropped[kind] += 1
                else:
                    codes[kind][str(code)] = codes[kind].get(str(code), 0) + 1
                if kind == "good" and code == 200:
                    latencies.append(dt)
                finished = sum(sum(c.values()) for c in codes.values()) + sum(dropped.values())
                if finished % 1000 == 0:
                    rss[finished] = _rss_kb(server.proc.pid)
        conn.close()

    dt = _run_clients(client, clients)
    five = sum(n for c in codes.values() for k, n in c.items() if k.startswith("5"))
    marks = sorted(rss)
    first, last = (rss[marks[0]], rss[marks[-1]]) if marks else (0, 0)
    return {"requests": total, "clients": clients, "seconds": round(dt, 1), "codes": codes, "dropped": dropped,
            "5xx": five, "rss_kb_by_requests": rss, "rss_last_over_first": round(last / first, 3) if first else None,
            "well_formed_latency": _pct(latencies) if latencies else {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-base", default="/tmp/serve_demo/models")
    ap.add_argument("--image", help="a PNG to send (default: the first image of the demo's dataset)")
    ap.add_argument("--latency-n", type=int, default=300)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=60)
    ap.add_argument("--load-total", type=int, default=5000)
    ap.add_argument("--load-clients", type=int, default=32)
    ap.add_argument("--tflite-run", metavar="RUN", help="also convert the image tower to TFLite float16/int8 from "
                    "this training run (on a copy of the version) and report size and latency")
    ap.add_argument("--out", default="serve_latency.json")
    args = ap.parse_args()

    from mmclinic.artifacts import find_models

    folder = find_models(args.model_base)[0]
    version_dir = folder.latest().path
    image = Path(args.image) if args.image else sorted(Path(args.model_base).parent.glob("dataset/images/*.png"))[0]
    png = image.read_bytes()
    text = "Small left pleural effusion. No pneumothorax."
    path = f"/v1/models/{folder.name}:predict"
    good = json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(png).decode()},
                                      "report_text": text}]}).encode()
    bad = [
        ("bad_json", b'{"instances": [', {"Content-Type": "application/json"}),
        ("wrong_input", json.dumps({"instances": [{"image": {"b64": base64.b64encode(png).decode()},
                                                   "report": text}]}).encode(), {"Content-Type": "application/json"}),
        ("undecodable_image", json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(b"x" * 64).decode()},
                                                         "report_text": text}]}).encode(),
         {"Content-Type": "application/json"}),
        ("truncated_png", json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(png[:64]).decode()},
                                                     "report_text": text}]}).encode(),
         {"Content-Type": "application/json"}),
        ("oversized", b"{" + b" " * (2 << 20) + b"}", {"Content-Type": "application/json"}),
    ]
    results: dict = {"model": f"{folder.name}/{version_dir.name}", "cpus": os.cpu_count()}

    server = Server(args.model_base, "--max-body-mb", "1")
    try:
        results["direct_batch1"], results["serve_batch1"] = batch1_latency(version_dir, png, text, server.port, path,
                                                                           good, args.latency_n)
        results["throughput_batching_on"] = throughput(server.port, path, good, args.clients, args.per_client)
        results["load"] = load_run(server, path, good, bad, args.load_total, args.load_clients, 0.2)
    finally:
        server.stop()
    server = Server(args.model_base, "--no-batching")
    try:
        results["throughput_batching_off"] = throughput(server.port, path, good, args.clients, args.per_client)
    finally:
        server.stop()
    results["overhead_p50"] = round(results["serve_batch1"]["p50_ms"] / results["direct_batch1"]["p50_ms"], 2)
    results["batching_speedup"] = round(results["throughput_batching_on"]["requests_per_s"]
                                        / results["throughput_batching_off"]["requests_per_s"], 2)
    if args.tflite_run:
        import shutil
        import tempfile

        from mmclinic.serve.tflite import quantize

        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / version_dir.name
            shutil.copytree(version_dir, copy)
            q = quantize(copy, args.tflite_run, max_drop=1.0)
        towers = q["image_tower"]
        results["tflite_image_tower"] = {
            mode: {k: towers[mode][k] for k in ("bytes", "seconds_per_image", "image_to_text_R@5", "mismatch_auroc",
                                                "drop") if k in towers[mode]} for mode in towers}
        results["tflite_float_savedmodel"] = q["float_savedmodel"]
        results["tflite_int8_over_float32_size"] = round(towers["int8"]["bytes"] / towers["float32"]["bytes"], 3)
        results["tflite_int8_over_float32_latency"] = round(towers["int8"]["seconds_per_image"]
                                                            / towers["float32"]["seconds_per_image"], 3)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
