"""``mmclinic serve``: exported models over TensorFlow Serving's REST API.

The same ``MODEL_BASE`` folder that ``mmclinic export`` writes can be handed to TensorFlow
Serving for production; this server speaks the same API so that clients, notebooks and
integration tests work against either:

- ``GET  /v1/models/NAME[/versions/V|/labels/L]``            model version status
- ``GET  /v1/models/NAME[/versions/V|/labels/L]/metadata``   signature definitions (+ ``mmclinic``:
  the vetted mismatch threshold and the model card's key facts)
- ``POST /v1/models/NAME[/versions/V|/labels/L]:predict``    row (``instances``) or columnar
  (``inputs``) format; binary inputs as ``{"b64": "..."}``
- ``GET  /metrics`` (Prometheus text format) and ``GET /healthz``

Malformed requests get a 4xx and ``{"error": "..."}``. Request bodies hold images and report
text: nothing from a body is ever logged or echoed back in an error, only names, counts and
types. Each model serves its latest complete version, plus any version that a label in
``MODEL_BASE/NAME/version_labels.json`` (``{"stable": 1}``) points to. ``MODEL_BASE`` may also
be one model's folder ``MODEL_BASE/NAME`` or one version ``MODEL_BASE/NAME/VERSION``, as
``mmclinic evaluate`` and ``mmclinic score`` accept; every served version needs the
``assets.extra/mmclinic.json`` that export writes (:class:`mmclinic.artifacts.ExportedModel`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.artifacts import ExportedModel, find_models
from mmclinic.errors import UsageError

DEFAULT_PORT = 8501  # TensorFlow Serving's REST port
_ROUTE = re.compile(r"^/v1/models/(?P<name>[A-Za-z0-9_.-]+)"
                    r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[A-Za-z0-9_-]+))?"
                    r"(?P<rest>/metadata|:[A-Za-z]+)?$")
_DTYPES = {"string": "DT_STRING", "float32": "DT_FLOAT", "float64": "DT_DOUBLE", "int32": "DT_INT32",
           "int64": "DT_INT64", "bool": "DT_BOOL"}


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _names(keys: Any) -> str:
    """Request-supplied keys for an error message: names only, never free text."""
    keys = sorted(map(str, keys))
    shown = [k for k in keys if _SAFE_NAME.match(k)]
    hidden = len(keys) - len(shown)
    return ", ".join(shown + ([f"{hidden} key(s) not shown (not plain names)"] if hidden else []))


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class LoadedVersion:
    name: str
    version: int
    path: Path
    module: Any
    info: dict[str, Any]
    """``assets.extra/mmclinic.json`` written by export (see :class:`~mmclinic.artifacts.ExportedModel`)."""

    def signature(self, name: str) -> Any:
        try:
            return self.module.signatures[name]
        except KeyError:
            shown = repr(name) if _SAFE_NAME.match(name) else "of that name"
            raise HttpError(400, f"model {self.name} version {self.version} has no signature {shown}; it has "
                                 f"{', '.join(sorted(self.module.signatures))}") from None


def discover(model_base: str | Path) -> dict[str, tuple[Path, list[int], dict[str, int]]]:
    """``{name: (folder, versions, labels)}`` of the models ``MODEL_BASE`` names: every model under
    it, or the one model ``MODEL_BASE/NAME`` is, or the one version ``MODEL_BASE/NAME/VERSION`` is
    (see :func:`mmclinic.artifacts.find_models`)."""
    return {folder.name: (folder.path, folder.versions, folder.labels())
            for folder in find_models(model_base, "MODEL_BASE")}


def _spec_json(spec: Any, tensor_name: str) -> dict[str, Any]:
    dims = [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape.as_list()]
    return {"dtype": _DTYPES.get(spec.dtype.name, spec.dtype.name), "tensor_shape": {"dim": dims,
                                                                                     "unknown_rank": False},
            "name": tensor_name}


def signature_defs(module: Any) -> dict[str, Any]:
    """The SavedModel's signatures in the JSON shape TensorFlow Serving's metadata call returns."""
    defs = {}
    for name, fn in module.signatures.items():
        _, kwargs = fn.structured_input_signature
        inputs = {k: _spec_json(s, f"{name}_{k}:0") for k, s in sorted(kwargs.items())}
        outputs = {k: _spec_json(s, f"StatefulPartitionedCall:{i}")
                   for i, (k, s) in enumerate(sorted(fn.structured_outputs.items()))}
        defs[name] = {"inputs": inputs, "outputs": outputs, "method_name": "tensorflow/serving/predict"}
    return defs


class Metrics:
    """Prometheus counters and latencies in a registry of this server's own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mmclinic_serve_requests", "HTTP requests by model, endpoint and status code",
                                ["model", "endpoint", "code"], registry=self.registry)
        self.latency = Histogram("mmclinic_serve_request_seconds", "Request handling time", ["model", "endpoint"],
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.instances = Counter("mmclinic_serve_instances", "Instances predicted, by model, version and signature",
                                 ["model", "version", "signature"], registry=self.registry)
        self.loaded = Gauge("mmclinic_serve_model_version_loaded", "1 for each model version being served",
                            ["model", "version"], registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ModelServer:
    """The loaded models and the request logic, independent of the HTTP plumbing."""

    def __init__(self, model_base: str | Path, *, max_batch: int = 1024, max_body_bytes: int = 64 << 20) -> None:
        # Before importing TensorFlow: a wrong path or a broken mmclinic.json fails at once.
        found = discover(model_base)
        served = {name: {v: ExportedModel(folder / str(v)) for v in sorted({versions[-1], *labels.values()})}
                  for name, (folder, versions, labels) in found.items()}
        for versions in served.values():
            for exported in versions.values():
                exported.metadata  # noqa: B018 - read and checked now
        import tensorflow as tf
        import tensorflow_text  # noqa: F401 - the tokenizer's ops

        self.max_batch, self.max_body_bytes = max_batch, max_body_bytes
        self.metrics = Metrics()
        self.models: dict[str, dict[int, LoadedVersion]] = {}
        self.labels: dict[str, dict[str, int]] = {name: labels for name, (_, _, labels) in found.items()}
        for name, versions in served.items():
            self.models[name] = {}
            for v, exported in versions.items():
                try:
                    module = tf.saved_model.load(str(exported.path))
                except Exception as exc:  # noqa: BLE001 - name the folder, not a stack of TF internals
                    raise UsageError(f"{exported.path}: cannot be loaded as a SavedModel "
                                     f"({type(exc).__name__})") from None
                self.models[name][v] = LoadedVersion(name, v, exported.path, module, exported.metadata)
                self.metrics.loaded.labels(name, str(v)).set(1)
        self._tf = tf

    # ----- lookup

    def resolve(self, name: str, version: str | None, label: str | None) -> list[LoadedVersion]:
        """The versions a path names: one for a version or label, all served ones for a bare model name."""
        if name not in self.models:
            raise HttpError(404, f"model {name!r} is not served here (served: {', '.join(sorted(self.models))})")
        served = self.models[name]
        if label is not None:
            if label not in self.labels[name]:
                raise HttpError(404, f"model {name} has no version label {label!r}")
            return [served[self.labels[name][label]]]
        if version is not None:
            if int(version) not in served:
                raise HttpError(404, f"model {name} version {int(version)} is not served (served: "
                                     f"{', '.join(map(str, sorted(served)))})")
            return [served[int(version)]]
        return [served[v] for v in sorted(served, reverse=True)]

    # ----- the three calls

    def status(self, versions: list[LoadedVersion]) -> dict[str, Any]:
        return {"model_version_status": [{"version": str(m.version), "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}} for m in versions]}

    def metadata(self, m: LoadedVersion) -> dict[str, Any]:
        info = m.info
        extra = {k: info[k] for k in ("dataset_version", "config_hash", "mismatch_threshold", "mismatch_score",
                                      "image_size", "max_length") if k in info}
        extra["labels"] = sorted(k for k, v in self.labels[m.name].items() if v == m.version)
        if "vetting" in info:
            extra["validation"] = info["vetting"].get("validation", {})
        return {"model_spec": {"name": m.name, "signature_name": "", "version": str(m.version)},
                "metadata": {"signature_def": {"signature_def": signature_defs(m.module)}},
                "mmclinic": extra}

    def predict(self, m: LoadedVersion, body: dict[str, Any]) -> dict[str, Any]:
        sig_name = body.get("signature_name", "serving_default")
        if not isinstance(sig_name, str):
            raise HttpError(400, "field signature_name must be a string")
        fn = m.signature(sig_name)
        _, specs = fn.structured_input_signature
        has_rows, has_cols = "instances" in body, "inputs" in body
        if has_rows == has_cols:
            raise HttpError(400, "the request needs exactly one of fields instances (row format) or inputs "
                                 "(columnar format)")
        columns = self._rows_to_columns(body["instances"], specs) if has_rows else \
            self._columns(body["inputs"], specs)
        sizes = {k: len(v) for k, v in columns.items()}
        if len(set(sizes.values())) != 1:
            raise HttpError(400, f"inputs differ in batch size: {sizes}")
        n = next(iter(sizes.values()))
        if n == 0:
            raise HttpError(400, "no instances to predict")
        if n > self.max_batch:
            raise HttpError(413, f"{n} instances in one request; at most {self.max_batch}")
        tensors = {k: self._tensor(k, v, specs[k]) for k, v in columns.items()}
        try:
            out = fn(**tensors)
        except (self._tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            # TensorFlow's message can quote input values: give its type only.
            raise HttpError(400, f"signature {sig_name} cannot run on these inputs ({type(exc).__name__}; check "
                                 "that image inputs are PNG, JPEG or BMP bytes sent as {\"b64\": ...})") from None
        self.metrics.instances.labels(m.name, str(m.version), sig_name).inc(n)
        outputs = {k: v.numpy().tolist() for k, v in sorted(out.items())}
        if has_cols:
            return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values()))}
        return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(n)]}

    # ----- request decoding

    @staticmethod
    def _named(where: str, value: Any, names: list[str]) -> dict[str, Any]:
        """``value`` as {input name: value}; a bare value stands for a signature's only input."""
        if len(names) == 1 and not (isinstance(value, dict) and set(value) == set(names)):
            value = {names[0]: value}
        if not isinstance(value, dict):
            raise HttpError(400, f"{where} must be an object with inputs {', '.join(names)}")
        missing, extra = set(names) - set(value), set(value) - set(names)
        if missing or extra:
            raise HttpError(400, f"{where}: " + "; ".join(
                ([f"missing input(s) {', '.join(sorted(missing))}"] if missing else [])
                + ([f"unknown input(s) {_names(extra)}"] if extra else [])))
        return value

    @classmethod
    def _rows_to_columns(cls, instances: Any, specs: dict[str, Any]) -> dict[str, list[Any]]:
        if not isinstance(instances, list):
            raise HttpError(400, "field instances must be a list")
        names = sorted(specs)
        rows = [cls._named(f"instances[{i}]", row, names) for i, row in enumerate(instances)]
        return {k: [row[k] for row in rows] for k in names}

    @classmethod
    def _columns(cls, inputs: Any, specs: dict[str, Any]) -> dict[str, list[Any]]:
        names = sorted(specs)
        inputs = cls._named("inputs", inputs, names)
        for k in names:
            if not isinstance(inputs[k], list):
                raise HttpError(400, f"inputs.{k} must be a list (one value per instance)")
        return {k: inputs[k] for k in names}

    def _tensor(self, name: str, values: list[Any], spec: Any) -> Any:
        tf = self._tf
        if spec.dtype == tf.string:
            out = []
            for i, v in enumerate(values):
                if isinstance(v, dict) and set(v) == {"b64"} and isinstance(v["b64"], str):
                    try:
                        out.append(base64.b64decode(v["b64"], validate=True))
                    except (binascii.Error, ValueError):
                        raise HttpError(400, f"{name}[{i}]: field b64 is not valid base64") from None
                elif isinstance(v, str):
                    out.append(v.encode("utf-8"))
                else:
                    raise HttpError(400, f"{name}[{i}]: expected a string or {{\"b64\": ...}}, got "
                                         f"{type(v).__name__}")
            return tf.constant(out, dtype=tf.string)
        try:
            arr = np.asarray(values, dtype=spec.dtype.as_numpy_dtype)
        except (TypeError, ValueError):
            raise HttpError(400, f"{name}: values are not {spec.dtype.name} numbers of one shape") from None
        want = spec.shape.as_list()
        if arr.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, arr.shape)):
            raise HttpError(400, f"{name}: shape {list(arr.shape)} does not match "
                                 f"{[-1 if w is None else w for w in want]}")
        return tf.constant(arr)


def _handler(server: ModelServer, log: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "mmclinic-serve"
        timeout = 120  # seconds a connection may sit idle or stall mid-request

        def log_message(self, fmt: str, *args: Any) -> None:  # the default would go to stderr unformatted
            pass

        def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
            body = payload if isinstance(payload, bytes) else (json.dumps(payload) + "\n").encode()
            if not getattr(self, "_consumed", False) and (self.headers.get("Transfer-Encoding") or
                                                          self.headers.get("Content-Length", "0").strip() != "0"):
                self.close_connection = True  # an unread body would be taken for the next request
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _handle(self, method: str) -> None:
            t0 = time.perf_counter()
            self._consumed = False
            path = self.path.split("?", 1)[0]
            logged = path if path in ("/healthz", "/metrics") else "(unmatched path)"  # URLs can carry anything
            model, endpoint, status = "-", "other", 500
            try:
                if path == "/healthz" and method == "GET":
                    endpoint, status = "healthz", 200
                    self._send(200, {"status": "ok", "models": {k: sorted(v) for k, v in server.models.items()}})
                    return
                if path == "/metrics" and method == "GET":
                    endpoint, status = "metrics", 200
                    body, ctype = server.metrics.exposition()
                    self._send(200, body, ctype)
                    return
                match = _ROUTE.match(path)
                if match:
                    logged = path
                if not match:
                    raise HttpError(404, "no such endpoint; see /v1/models/NAME[/versions/V|/labels/L]"
                                         "[/metadata|:predict], /metrics and /healthz")
                name, rest = match["name"], match["rest"] or ""
                model = name if name in server.models else "unknown"
                endpoint = {"": "status", "/metadata": "metadata", ":predict": "predict"}.get(rest, "other")
                versions = server.resolve(name, match["version"], match["label"])
                if rest == "" and method == "GET":
                    payload = server.status(versions)
                elif rest == "/metadata" and method == "GET":
                    payload = server.metadata(versions[0])
                elif rest == ":predict" and method == "POST":
                    payload = server.predict(versions[0], self._body())
                elif rest.startswith(":") and rest != ":predict":
                    raise HttpError(501, f"{rest[1:]} is not served: mmclinic models have predict signatures only")
                else:
                    raise HttpError(405, f"{method} is not allowed on this path")
                status = 200
                self._send(200, payload)
            except HttpError as exc:
                status = exc.status
                self._send(exc.status, {"error": str(exc)})
            except Exception as exc:  # noqa: BLE001 - a bug must not drop the connection or print inputs
                status = 500
                self._send(500, {"error": f"internal error ({type(exc).__name__})"})
            finally:
                dt = time.perf_counter() - t0
                server.metrics.requests.labels(model, endpoint, str(status)).inc()
                server.metrics.latency.labels(model, endpoint).observe(dt)
                if log is not None:  # method, path and status only: never a body
                    print(f"{method} {logged} {status} {dt * 1000:.1f} ms", file=log, flush=True)

        def _body(self) -> dict[str, Any]:
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding"):
                raise HttpError(411, "send the body with a Content-Length header (no Transfer-Encoding)")
            if length is None or not re.fullmatch(r"[0-9]{1,15}", length.strip()):
                raise HttpError(411, "a Content-Length header with the body's size in bytes is required")
            length = length.strip()
            if int(length) > server.max_body_bytes:
                raise HttpError(413, f"request body of {int(length)} bytes; at most {server.max_body_bytes}")
            raw = self.rfile.read(int(length))
            self._consumed = True
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise HttpError(400, f"the request body is not JSON ({type(exc).__name__} at byte "
                                     f"{getattr(exc, 'pos', getattr(exc, 'start', '?'))})") from None
            if not isinstance(body, dict):
                raise HttpError(400, "the request body must be a JSON object")
            return body

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._handle("PUT")

        def do_DELETE(self) -> None:  # noqa: N802
            self._handle("DELETE")

    return Handler


def make_http_server(model_base: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                     max_batch: int = 1024, max_body_mb: float = 64, log: Any = None) -> ThreadingHTTPServer:
    """Load the models and bind; call ``serve_forever()`` on the result (``port=0``: any free port)."""
    if max_batch < 1 or max_body_mb <= 0:
        raise UsageError("--max-batch and --max-body-mb must be positive")
    models = ModelServer(model_base, max_batch=max_batch, max_body_bytes=int(max_body_mb * (1 << 20)))
    try:
        httpd = ThreadingHTTPServer((host, port), _handler(models, log))
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen ({exc.strerror or type(exc).__name__})") \
            from None
    httpd.daemon_threads = True
    httpd.model_server = models  # type: ignore[attr-defined]
    return httpd


def serve(model_base: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **kwargs: Any) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import signal

    httpd = make_http_server(model_base, host, port, log=sys.stderr, **kwargs)
    bound_host, bound_port = httpd.server_address[:2]
    for name, versions in httpd.model_server.models.items():  # type: ignore[attr-defined]
        print(f"serving {name} versions {sorted(versions)} at http://{bound_host}:{bound_port}/v1/models/{name}",
              flush=True)
    print(f"metrics at http://{bound_host}:{bound_port}/metrics; Ctrl-C stops", flush=True)
    def _term(*_: Any) -> None:
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _term)
    try:
        httpd.serve_forever(poll_interval=0.5)
    finally:
        httpd.server_close()
