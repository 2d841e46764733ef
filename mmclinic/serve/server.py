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

HTTP is uvicorn's (parsing, keep-alive, timeouts, a listen backlog of 2048, graceful shutdown)
under a Starlette app; the SavedModel calls run in worker threads, never on the event loop.

Dynamic batching, as TensorFlow Serving's ``--enable_batching`` does: concurrent predict
requests for one model, version and signature are merged into one model call of at most
``max_batch_size`` instances, and the outputs are split back per request. A batch starts as
soon as the worker is free; it waits up to ``batch_timeout_ms`` only for requests that have
already arrived and are still being decoded (never for requests that may not come). A batch
that fails is re-run request by request, so one undecodable image fails only its own request.
``max_batch_size=1`` turns batching off (each request is one model call in a thread pool).

Hot loading: every ``poll_seconds`` the model folders are scanned again; a new complete
version (``saved_model.pb`` present; export installs a version by one rename from a hidden
``.incoming-N`` folder) or a changed ``version_labels.json`` is loaded first and then swapped
in; versions no longer latest or labelled are dropped, and requests already running on them
finish. A version that fails to load is logged (by folder name) and not retried until its
``saved_model.pb`` changes; what was served before stays served.

Malformed requests get a 4xx and ``{"error": "..."}``. Request bodies hold images and report
text: nothing from a body is ever logged or echoed back in an error, only names, counts and
types. Each model serves its latest complete version, plus any version that a label in
``MODEL_BASE/NAME/version_labels.json`` (``{"stable": 1}``) points to. ``MODEL_BASE`` may also
be one model's folder ``MODEL_BASE/NAME`` or one version ``MODEL_BASE/NAME/VERSION``, as
``mmclinic evaluate`` and ``mmclinic score`` accept; every served version needs the
``assets.extra/mmclinic.json`` that export writes (:class:`mmclinic.artifacts.ExportedModel`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import dataclasses
import json
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.artifacts import SAVED_MODEL, ExportedModel, find_models
from mmclinic.errors import UsageError

DEFAULT_PORT = 8501  # TensorFlow Serving's REST port
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_TIMEOUT_MS = 2.0
DEFAULT_POLL_SECONDS = 2.0
_ROUTE = re.compile(r"^/v1/models/(?P<name>[A-Za-z0-9_.-]+)"
                    r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[A-Za-z0-9_-]+))?"
                    r"(?P<rest>/metadata|:[A-Za-z]+)?$")
_DTYPES = {"string": "DT_STRING", "float32": "DT_FLOAT", "float64": "DT_DOUBLE", "int32": "DT_INT32",
           "int64": "DT_INT64", "bool": "DT_BOOL"}
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF87a", b"GIF89a")  # what decode_image reads
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


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


@dataclasses.dataclass(eq=False)
class LoadedVersion:
    name: str
    version: int
    path: Path
    module: Any
    info: dict[str, Any]
    """``assets.extra/mmclinic.json`` written by export (see :class:`~mmclinic.artifacts.ExportedModel`)."""
    stamp: tuple[float, int] = (0.0, 0)
    """``saved_model.pb``'s (mtime, size) when loaded: a re-exported folder is loaded again."""

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


def _stamp(version_dir: Path) -> tuple[float, int]:
    st = (version_dir / SAVED_MODEL).stat()
    return st.st_mtime, st.st_size


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


# The metric names the Grafana dashboard (deploy/grafana/mmclinic-serving.json) queries; a test
# checks each against a live server's /metrics.
METRIC_NAMES = ("mmclinic_serve_requests_total", "mmclinic_serve_request_seconds_bucket",
                "mmclinic_serve_instances_total", "mmclinic_serve_model_version_loaded",
                "mmclinic_serve_batch_size_bucket", "mmclinic_serve_batch_requests_bucket",
                "mmclinic_serve_batch_queue_seconds_bucket", "mmclinic_serve_model_loads_total")


class Metrics:
    """Prometheus counters and histograms in a registry of this server's own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mmclinic_serve_requests", "HTTP requests by model, endpoint and status code",
                                ["model", "endpoint", "code"], registry=self.registry)
        self.latency = Histogram("mmclinic_serve_request_seconds", "Request handling time", ["model", "endpoint"],
                                 registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.instances = Counter("mmclinic_serve_instances", "Instances predicted, by model, version and signature",
                                 ["model", "version", "signature"], registry=self.registry)
        self.loaded = Gauge("mmclinic_serve_model_version_loaded", "1 for each model version being served",
                            ["model", "version"], registry=self.registry)
        self.batch_size = Histogram("mmclinic_serve_batch_size", "Instances per model call (after dynamic batching)",
                                    ["model", "signature"], registry=self.registry, buckets=_BATCH_BUCKETS)
        self.batch_requests = Histogram("mmclinic_serve_batch_requests", "Requests merged into one model call",
                                        ["model", "signature"], registry=self.registry, buckets=_BATCH_BUCKETS)
        self.queue_wait = Histogram("mmclinic_serve_batch_queue_seconds", "Time a request waited for its batch",
                                    ["model"], registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.loads = Counter("mmclinic_serve_model_loads", "Model version loads by outcome (ok, failed, unloaded)",
                             ["model", "outcome"], registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------- model calls


def _run_signature(tf: Any, fn: Any, inputs: dict[str, Any], sig_name: str = "") -> dict[str, np.ndarray]:
    """One SavedModel call on decoded inputs (lists of bytes or numpy arrays); numpy outputs.
    Errors that the inputs cause become a 400 that names no input value."""
    tensors = {k: tf.constant(v, dtype=tf.string) if isinstance(v, list) else tf.constant(v)
               for k, v in inputs.items()}
    try:
        out = fn(**tensors)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
        # TensorFlow's message can quote input values: give its type only.
        raise HttpError(400, f"signature {sig_name} cannot run on these inputs ({type(exc).__name__}; check that "
                             "image inputs are PNG, JPEG or BMP bytes sent as {\"b64\": ...})") from None
    return {k: v.numpy() for k, v in out.items()}


@dataclasses.dataclass(eq=False)
class _Task:
    inputs: dict[str, Any]
    n: int
    future: concurrent.futures.Future
    queued_at: float


class _Queue:
    """The pending tasks of one (model version, signature) and the thread that batches them."""

    def __init__(self) -> None:
        self.tasks: collections.deque[_Task] = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None


class Batcher:
    """Dynamic batching: tasks for one model version and signature, merged into model calls of at
    most ``max_batch_size`` instances by one worker thread per queue (TensorFlow Serving's
    ``BasicBatchScheduler`` with one batch thread per servable).

    ``max_enqueued`` bounds the instances waiting per queue (``max_enqueued_batches`` ×
    ``max_batch_size``); beyond it a request gets 503, as TensorFlow Serving answers UNAVAILABLE.
    """

    IDLE_EXIT_S = 30.0

    def __init__(self, tf: Any, metrics: Metrics, max_batch_size: int, batch_timeout_ms: float,
                 max_enqueued_batches: int = 64) -> None:
        self.tf, self.metrics = tf, metrics
        self.max_batch_size, self.timeout = max_batch_size, batch_timeout_ms / 1000
        self.max_enqueued = max_enqueued_batches * max_batch_size
        self._queues: dict[tuple[int, str], _Queue] = {}
        self._lock = threading.Lock()
        self.arriving: collections.Counter[int] = collections.Counter()
        """Predict requests per model version (id of its LoadedVersion) received but not yet queued."""

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    async def run(self, m: LoadedVersion, sig_name: str, fn: Any, inputs: dict[str, Any], n: int
                  ) -> dict[str, np.ndarray]:
        if not self.enabled or n >= self.max_batch_size:
            # Off, or a request as large as a whole batch: one call of its own in a worker thread.
            self.metrics.batch_size.labels(m.name, sig_name).observe(n)
            self.metrics.batch_requests.labels(m.name, sig_name).observe(1)
            return await asyncio.to_thread(_run_signature, self.tf, fn, inputs, sig_name)
        task = _Task(inputs, n, concurrent.futures.Future(), time.perf_counter())
        self._submit((id(m), sig_name), m, sig_name, fn, task)
        return await asyncio.wrap_future(task.future)

    def _submit(self, key: tuple[int, str], m: LoadedVersion, sig_name: str, fn: Any, task: _Task) -> None:
        with self._lock:
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = _Queue()
        with q.cond:
            if sum(t.n for t in q.tasks) + task.n > self.max_enqueued:
                raise HttpError(503, "the batch queue is full; retry later")
            q.tasks.append(task)
            if q.thread is None:
                q.thread = threading.Thread(target=self._work, args=(key, q, m, sig_name, fn),
                                            name=f"batch-{m.name}-{m.version}-{sig_name}", daemon=True)
                q.thread.start()
            q.cond.notify()

    def _take(self, q: _Queue, m: LoadedVersion) -> list[_Task]:
        """The next batch: every queued task that fits, plus, for up to the timeout, tasks of requests
        that have arrived and are still being decoded. Called with ``q.cond`` held."""
        batch, size = [q.tasks.popleft()], 0
        size = batch[0].n
        deadline = time.perf_counter() + self.timeout
        while size < self.max_batch_size:
            if q.tasks:
                if size + q.tasks[0].n > self.max_batch_size:
                    break
                task = q.tasks.popleft()
                batch.append(task)
                size += task.n
                continue
            left = deadline - time.perf_counter()
            if left <= 0 or self.arriving[id(m)] <= 0:
                break
            q.cond.wait(left)
        return batch

    def _work(self, key: tuple[int, str], q: _Queue, m: LoadedVersion, sig_name: str, fn: Any) -> None:
        while True:
            with q.cond:
                while not q.tasks:
                    if not q.cond.wait(self.IDLE_EXIT_S) and not q.tasks:
                        q.thread = None
                        with self._lock:
                            if self._queues.get(key) is q:
                                del self._queues[key]
                        return
                batch = self._take(q, m)
            self._run_batch(m, sig_name, fn, batch)

    def _run_batch(self, m: LoadedVersion, sig_name: str, fn: Any, batch: list[_Task]) -> None:
        now = time.perf_counter()
        live = [t for t in batch if t.future.set_running_or_notify_cancel()]
        for t in live:
            self.metrics.queue_wait.labels(m.name).observe(now - t.queued_at)
        if not live:
            return
        merged = self._merge(live)
        if merged is not None:
            try:
                out = _run_signature(self.tf, fn, merged, sig_name)
                self.metrics.batch_size.labels(m.name, sig_name).observe(sum(t.n for t in live))
                self.metrics.batch_requests.labels(m.name, sig_name).observe(len(live))
                start = 0
                for t in live:
                    t.future.set_result({k: v[start:start + t.n] for k, v in out.items()})
                    start += t.n
                return
            except HttpError as exc:
                if len(live) == 1:
                    live[0].future.set_exception(exc)
                    return
            except Exception as exc:  # noqa: BLE001 - a fault is the requests' answer, not the thread's end
                if len(live) == 1:
                    live[0].future.set_exception(exc)
                    return
                # any other fault of a merged call (e.g. one request's huge image): re-run one by one
        for t in live:  # one bad request must not fail the others: run each on its own
            try:
                self.metrics.batch_size.labels(m.name, sig_name).observe(t.n)
                self.metrics.batch_requests.labels(m.name, sig_name).observe(1)
                t.future.set_result(_run_signature(self.tf, fn, t.inputs, sig_name))
            except Exception as exc:  # noqa: BLE001
                t.future.set_exception(exc)

    @staticmethod
    def _merge(tasks: list[_Task]) -> dict[str, Any] | None:
        """The tasks' inputs as one batch, or None when their shapes do not line up."""
        if len(tasks) == 1:
            return tasks[0].inputs
        merged: dict[str, Any] = {}
        for k, first in tasks[0].inputs.items():
            if isinstance(first, list):
                merged[k] = [x for t in tasks for x in t.inputs[k]]
            else:
                parts = [t.inputs[k] for t in tasks]
                if any(p.shape[1:] != first.shape[1:] for p in parts):
                    return None
                merged[k] = np.concatenate(parts)
        return merged


# --------------------------------------------------------------------------- the models


@dataclasses.dataclass(frozen=True)
class _State:
    models: dict[str, dict[int, LoadedVersion]]
    labels: dict[str, dict[str, int]]


class ModelServer:
    """The loaded models and the request logic, independent of the HTTP plumbing."""

    def __init__(self, model_base: str | Path, *, max_batch: int = 1024, max_body_bytes: int = 64 << 20,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS,
                 log: Any = None) -> None:
        self.model_base = Path(model_base)
        self.log = log
        # Before importing TensorFlow: a wrong path or a broken mmclinic.json fails at once.
        found = discover(model_base)
        for _name, (folder, versions, labels) in found.items():
            for v in {versions[-1], *labels.values()}:
                ExportedModel(folder / str(v)).metadata  # noqa: B018 - read and checked now
        import tensorflow as tf
        import tensorflow_text  # noqa: F401 - the tokenizer's ops

        self._tf = tf
        self.max_batch, self.max_body_bytes = max_batch, max_body_bytes
        self.metrics = Metrics()
        self.batcher = Batcher(tf, self.metrics, max_batch_size, batch_timeout_ms)
        self._state = _State({}, {})
        self._failed: dict[Path, tuple[float, int]] = {}
        self._refresh_lock = threading.Lock()
        self._apply(found, strict=True)

    @property
    def models(self) -> dict[str, dict[int, LoadedVersion]]:
        return self._state.models

    @property
    def labels(self) -> dict[str, dict[str, int]]:
        return self._state.labels

    def _note(self, text: str) -> None:
        if self.log is not None:
            print(text, file=self.log, flush=True)

    # ----- loading and hot swapping

    def _load(self, name: str, folder: Path, v: int) -> LoadedVersion:
        exported = ExportedModel(folder / str(v))
        stamp = _stamp(exported.path)
        info = exported.metadata
        try:
            module = self._tf.saved_model.load(str(exported.path))
        except Exception as exc:  # noqa: BLE001 - name the folder, not a stack of TF internals
            raise UsageError(f"{exported.path}: cannot be loaded as a SavedModel ({type(exc).__name__})") from None
        return LoadedVersion(name, v, exported.path, module, info, stamp)

    def _apply(self, found: dict[str, tuple[Path, list[int], dict[str, int]]], strict: bool) -> list[str]:
        """Load what ``found`` wants and is not loaded yet, then swap the new set in at once."""
        old, changes = self._state, []
        models: dict[str, dict[int, LoadedVersion]] = {}
        labels: dict[str, dict[str, int]] = {}
        for name, (folder, versions, want_labels) in found.items():
            current = old.models.get(name, {})
            loaded: dict[int, LoadedVersion] = {}
            failed = False
            for v in sorted({versions[-1], *want_labels.values()}):
                path = folder / str(v)
                try:
                    stamp = _stamp(path)
                except OSError:
                    failed = True
                    continue
                have = current.get(v)
                if have is not None and have.path == path and have.stamp == stamp:
                    loaded[v] = have
                    continue
                if not strict and self._failed.get(path) == stamp:
                    failed = True
                    continue
                try:
                    loaded[v] = self._load(name, folder, v)
                    self._failed.pop(path, None)
                    self.metrics.loads.labels(name, "ok").inc()
                    changes.append(f"loaded {name} version {v}")
                except UsageError as exc:
                    if strict:
                        raise
                    self._failed[path] = stamp
                    self.metrics.loads.labels(name, "failed").inc()
                    changes.append(f"not loaded: {exc}")
                    failed = True
            if failed:  # keep serving what was served until the new version loads
                loaded = {**current, **loaded}
            if not loaded:
                continue
            models[name] = loaded
            labels[name] = {k: v for k, v in want_labels.items() if v in loaded}
        self._state = _State(models, labels)
        for name, versions in old.models.items():
            for v in versions:
                if v not in models.get(name, {}):
                    self.metrics.loaded.remove(name, str(v))
                    self.metrics.loads.labels(name, "unloaded").inc()
                    changes.append(f"unloaded {name} version {v}")
        for name, versions in models.items():
            for v in versions:
                self.metrics.loaded.labels(name, str(v)).set(1)
        return changes

    def refresh(self) -> list[str]:
        """Scan the model folders again and swap in new complete versions and labels; what changed."""
        with self._refresh_lock:
            try:
                found = discover(self.model_base)
            except UsageError as exc:  # e.g. a labels file being edited: keep what is served
                self._note(f"model folders not rescanned: {exc}")
                return []
            for text in (changes := self._apply(found, strict=False)):
                self._note(text)
            return changes

    # ----- lookup

    def resolve(self, name: str, version: str | None, label: str | None) -> list[LoadedVersion]:
        """The versions a path names: one for a version or label, all served ones for a bare model name."""
        state = self._state
        if name not in state.models:
            # The name is not echoed: a URL can carry anything (a path mistyped with a patient's name).
            raise HttpError(404, f"this model is not served here (served: {', '.join(sorted(state.models))})")
        served = state.models[name]
        if label is not None:
            if label not in state.labels[name]:
                raise HttpError(404, f"model {name} has no version label {label!r}")
            return [served[state.labels[name][label]]]
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
        extra["labels"] = sorted(k for k, v in self.labels.get(m.name, {}).items() if v == m.version)
        if "vetting" in info:
            extra["validation"] = info["vetting"].get("validation", {})
        return {"model_spec": {"name": m.name, "signature_name": "", "version": str(m.version)},
                "metadata": {"signature_def": {"signature_def": signature_defs(m.module)}},
                "mmclinic": extra}

    def decode(self, m: LoadedVersion, body: dict[str, Any]) -> tuple[str, Any, dict[str, Any], int, bool]:
        """(signature name, signature, inputs, instances, columnar) of a predict body."""
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
        inputs = {k: self._values(k, v, specs[k]) for k, v in columns.items()}
        return sig_name, fn, inputs, n, has_cols

    def respond(self, m: LoadedVersion, sig_name: str, out: dict[str, np.ndarray], n: int,
                columnar: bool) -> dict[str, Any]:
        self.metrics.instances.labels(m.name, str(m.version), sig_name).inc(n)
        outputs = {k: v.tolist() for k, v in sorted(out.items())}
        if columnar:
            return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values()))}
        return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(n)]}

    async def predict_async(self, m: LoadedVersion, body: dict[str, Any]) -> dict[str, Any]:
        sig_name, fn, inputs, n, columnar = self.decode(m, body)
        out = await self.batcher.run(m, sig_name, fn, inputs, n)
        return self.respond(m, sig_name, out, n, columnar)

    def predict(self, m: LoadedVersion, body: dict[str, Any]) -> dict[str, Any]:
        """One predict call without batching (for scripts and benchmarks)."""
        sig_name, fn, inputs, n, columnar = self.decode(m, body)
        return self.respond(m, sig_name, _run_signature(self._tf, fn, inputs, sig_name), n, columnar)

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

    def _values(self, name: str, values: list[Any], spec: Any) -> Any:
        """A column as the model call takes it: a list of bytes for strings, else a numpy array."""
        if spec.dtype == self._tf.string:
            out = []
            images = name == "image_bytes"
            for i, v in enumerate(values):
                if isinstance(v, dict) and set(v) == {"b64"} and isinstance(v["b64"], str):
                    try:
                        out.append(base64.b64decode(v["b64"], validate=True))
                    except (binascii.Error, ValueError):
                        raise HttpError(400, f"{name}[{i}]: field b64 is not valid base64") from None
                    if images and not out[-1].startswith(_IMAGE_MAGIC):
                        # Refused here, not in the model call: a batch holding it would be re-run.
                        raise HttpError(400, f"{name}[{i}]: not PNG, JPEG, BMP or GIF bytes")
                elif isinstance(v, str):
                    if name == "report_text" and not v.strip():
                        raise HttpError(400, f"{name}[{i}] is empty: a report needs text to be matched")
                    out.append(v.encode("utf-8"))
                else:
                    raise HttpError(400, f"{name}[{i}]: expected a string or {{\"b64\": ...}}, got "
                                         f"{type(v).__name__}")
            return out
        try:
            arr = np.asarray(values, dtype=spec.dtype.as_numpy_dtype)
        except (TypeError, ValueError):
            raise HttpError(400, f"{name}: values are not {spec.dtype.name} numbers of one shape") from None
        want = spec.shape.as_list()
        if arr.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, arr.shape)):
            raise HttpError(400, f"{name}: shape {list(arr.shape)} does not match "
                                 f"{[-1 if w is None else w for w in want]}")
        return arr


# --------------------------------------------------------------------------- HTTP


_JSON = "application/json"
_ENDPOINTS = {"": "status", "/metadata": "metadata", ":predict": "predict"}
_OFFLOAD_JSON_BYTES = 256 << 10  # larger bodies are parsed in a worker thread


def _json_response(status: int, payload: Any, close: bool = False) -> Any:
    from starlette.responses import Response

    return Response((json.dumps(payload) + "\n").encode(), status_code=status, media_type=_JSON,
                    headers={"Connection": "close"} if close else None)


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 from its Content-Length (before reading) or as soon as a
    chunked body passes ``limit``."""
    length = request.headers.get("content-length")
    if length is not None:
        if not re.fullmatch(r"[0-9]{1,15}", length.strip()):
            raise HttpError(400, "the Content-Length header is not a number of bytes")
        if int(length) > limit:
            raise HttpError(413, f"request body of {int(length)} bytes; at most {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise HttpError(413, f"request body over {limit} bytes; at most {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, f"the request body is not JSON ({type(exc).__name__} at byte "
                             f"{getattr(exc, 'pos', getattr(exc, 'start', '?'))})") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return body


def make_app(server: ModelServer, log: Any = None) -> Any:
    """The Starlette app: TensorFlow Serving's REST routes, ``/metrics`` and ``/healthz``."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response
    from starlette.routing import Route

    async def handle(request: Any) -> Any:
        t0 = time.perf_counter()
        method, path = request.method, request.url.path
        logged = path if path in ("/healthz", "/metrics") else "(unmatched path)"  # URLs can carry anything
        model, endpoint, status = "-", "other", 500
        has_body = bool(request.headers.get("transfer-encoding")) or \
            request.headers.get("content-length", "0").strip() not in ("", "0")
        consumed = False
        arriving = None
        try:
            if path == "/healthz" and method == "GET":
                endpoint, status = "healthz", 200
                return _json_response(200, {"status": "ok", "models": {k: sorted(v) for k, v in
                                                                       server.models.items()}}, has_body)
            if path == "/metrics" and method == "GET":
                endpoint, status = "metrics", 200
                body, ctype = server.metrics.exposition()
                return Response(body, headers={"Content-Type": ctype})
            match = _ROUTE.match(path)
            if not match:
                raise HttpError(404, "no such endpoint; see /v1/models/NAME[/versions/V|/labels/L]"
                                     "[/metadata|:predict], /metrics and /healthz")
            name, rest = match["name"], match["rest"] or ""
            model = name if name in server.models else "unknown"
            logged = "/v1/models/(not served)" + rest  # an unknown name or label is not logged: URLs carry anything
            endpoint = _ENDPOINTS.get(rest, "other")
            versions = server.resolve(name, match["version"], match["label"])
            logged = path
            if rest == "" and method == "GET":
                payload = server.status(versions)
            elif rest == "/metadata" and method == "GET":
                payload = server.metadata(versions[0])
            elif rest == ":predict" and method == "POST":
                m = versions[0]
                arriving = id(m)
                server.batcher.arriving[arriving] += 1
                raw = await _read_body(request, server.max_body_bytes)
                consumed = True
                body = _parse_json(raw) if len(raw) < _OFFLOAD_JSON_BYTES else \
                    await asyncio.to_thread(_parse_json, raw)
                sig_name, fn, inputs, n, columnar = server.decode(m, body)
                server.batcher.arriving[arriving] -= 1
                arriving = None
                out = await server.batcher.run(m, sig_name, fn, inputs, n)
                payload = server.respond(m, sig_name, out, n, columnar)
            elif rest.startswith(":") and rest != ":predict":
                raise HttpError(501, f"{rest[1:]} is not served: mmclinic models have predict signatures only")
            else:
                raise HttpError(405, f"{method} is not allowed on this path")
            status = 200
            return _json_response(200, payload, has_body and not consumed)
        except HttpError as exc:
            status = exc.status
            return _json_response(exc.status, {"error": str(exc)}, has_body and not consumed)
        except ClientDisconnect:
            status = 499  # nginx's code for a client that went away; nothing is sent
            return Response(status_code=400, headers={"Connection": "close"})
        except Exception as exc:  # noqa: BLE001 - a bug must not drop the connection or print inputs
            status = 500
            return _json_response(500, {"error": f"internal error ({type(exc).__name__})"}, has_body and not consumed)
        finally:
            if arriving is not None:
                server.batcher.arriving[arriving] -= 1
            dt = time.perf_counter() - t0
            server.metrics.requests.labels(model, endpoint, str(status)).inc()
            server.metrics.latency.labels(model, endpoint).observe(dt)
            if log is not None:  # method, path and status only: never a body
                print(f"{method} {logged} {status} {dt * 1000:.1f} ms", file=log, flush=True)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", handle, methods=methods)])


class HttpServer:
    """uvicorn serving :func:`make_app` on a socket bound at construction (``port=0``: any free
    port, see ``server_address``), plus the thread that polls for new model versions.

    ``serve_forever()`` blocks (Ctrl-C or SIGTERM stop it gracefully in the main thread);
    ``start()`` runs it in a thread and ``shutdown()`` stops it: in-flight requests finish.
    """

    def __init__(self, model_server: ModelServer, sock: socket.socket, log: Any, poll_seconds: float,
                 timeout_keep_alive: int = 120, graceful_s: int = 30) -> None:
        import uvicorn

        self.model_server, self.socket, self.poll_seconds = model_server, sock, poll_seconds
        self.server_address = sock.getsockname()[:2]
        config = uvicorn.Config(make_app(model_server, log), http="h11", loop="asyncio", lifespan="off",
                                log_config=None, log_level="warning", access_log=False, server_header=False,
                                timeout_keep_alive=timeout_keep_alive, timeout_graceful_shutdown=graceful_s,
                                backlog=2048)
        self._uvicorn = uvicorn.Server(config)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poller: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.model_server.refresh()
            except Exception as exc:  # noqa: BLE001 - the poller must outlive one bad scan
                self.model_server._note(f"model folders not rescanned ({type(exc).__name__})")

    def serve_forever(self, poll_interval: float | None = None) -> None:  # noqa: ARG002 - http.server's signature
        if self.poll_seconds > 0 and self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="model-poll", daemon=True)
            self._poller.start()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stop.set()

    def start(self, timeout: float = 30) -> HttpServer:
        self._thread = threading.Thread(target=self.serve_forever, name="mmclinic-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        if not self._uvicorn.started:
            raise RuntimeError("the server did not start")
        return self

    def shutdown(self, timeout: float = 60) -> None:
        self._stop.set()
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def server_close(self) -> None:
        self.socket.close()

    def __enter__(self) -> HttpServer:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.shutdown()
        self.server_close()


def make_http_server(model_base: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                     max_batch: int = 1024, max_body_mb: float = 64, log: Any = None,
                     max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS,
                     poll_seconds: float = DEFAULT_POLL_SECONDS) -> HttpServer:
    """Load the models and bind; ``serve_forever()`` or ``start()`` the result (``port=0``: any free port)."""
    if max_batch < 1 or max_body_mb <= 0:
        raise UsageError("--max-batch and --max-body-mb must be positive")
    if max_batch_size < 1 or batch_timeout_ms < 0 or poll_seconds < 0:
        raise UsageError("--max-batch-size must be at least 1, --batch-timeout-ms and --poll-seconds not negative")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP
        # (without it, a response's header and body writes wait 40 ms for the client's delayed ACK).
        sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)  # connections wait in the backlog from now on, until uvicorn accepts them
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen ({exc.strerror or type(exc).__name__})") \
            from None
    try:
        models = ModelServer(model_base, max_batch=max_batch, max_body_bytes=int(max_body_mb * (1 << 20)),
                             max_batch_size=max_batch_size, batch_timeout_ms=batch_timeout_ms, log=log)
    except BaseException:
        sock.close()
        raise
    return HttpServer(models, sock, log, poll_seconds)


def serve(model_base: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **kwargs: Any) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM: in-flight requests finish first)."""
    httpd = make_http_server(model_base, host, port, log=sys.stderr, **kwargs)
    bound_host, bound_port = httpd.server_address[:2]
    for name, versions in httpd.model_server.models.items():
        print(f"serving {name} versions {sorted(versions)} at http://{bound_host}:{bound_port}/v1/models/{name}",
              flush=True)
    batcher = httpd.model_server.batcher
    print(f"metrics at http://{bound_host}:{bound_port}/metrics; dynamic batching "
          + (f"up to {batcher.max_batch_size} instances, {batcher.timeout * 1000:g} ms" if batcher.enabled else "off")
          + (f"; new versions picked up every {httpd.poll_seconds:g} s" if httpd.poll_seconds else "")
          + "; Ctrl-C stops", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
