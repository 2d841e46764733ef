"""TensorFlow Serving's production files for a ``MODEL_BASE`` that ``mmclinic export`` wrote.

:func:`write_tfserving_files` writes, after an export:

- ``MODEL_BASE/models.config`` (``--model_config_file``): a ``ModelServerConfig`` text proto with
  every model under ``MODEL_BASE``, its base path as the container sees it (``/models/NAME``),
  the version policy ``specific`` naming the latest version plus the labelled ones, and the
  version labels of ``NAME/version_labels.json`` (``stable``, ``canary``);
- ``MODEL_BASE/batching_parameters.txt`` (``--enable_batching --batching_parameters_file``):
  a ``BatchingParameters`` text proto tuned for CPU;
- ``MODEL_BASE/monitoring.config`` (``--monitoring_config_file``): a ``MonitoringConfig`` that
  turns on the Prometheus endpoint;
- ``MODEL_BASE/NAME/VERSION/assets.extra/tf_serving_warmup_requests`` (:func:`write_warmup`, into
  the staged version before export installs it): a TFRecord file of ``PredictionLog`` protos that
  TensorFlow Serving replays when it loads the version, so that the first real request does not
  pay for graph tracing.

The few ``PredictionLog`` fields needed are written here in the protobuf wire format by hand
(field numbers from ``tensorflow_serving/apis/*.proto``), with the tensors as TensorFlow's own
``TensorProto`` layout, so that writing them imports neither TensorFlow nor
``tensorflow_serving``'s protos (which import TensorFlow's); the tests parse every file back with
``tensorflow-serving-api``'s own classes (in the lock). Nothing here imports TensorFlow.

The container runs, e.g.::

    tensorflow_model_server --rest_api_port=8501 --model_config_file=/models/models.config \\
        --enable_batching --batching_parameters_file=/models/batching_parameters.txt \\
        --monitoring_config_file=/models/monitoring.config --model_config_file_poll_wait_seconds=60 \\
        --allow_version_labels_for_unavailable_models=true

The last flag matters: ``models.config`` labels versions (``stable``, ``canary``), and without it
TensorFlow Serving refuses a label on a version it has not finished loading, at start-up and on a
config reload after an export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from mmclinic.data.shards import varint
from mmclinic.artifacts import ExportedModel, find_models

MODELS_CONFIG = "models.config"
BATCHING_PARAMETERS = "batching_parameters.txt"
MONITORING_CONFIG = "monitoring.config"
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"

# TensorFlow Serving's metric names for the dashboard (deploy/grafana/mmclinic-serving.json), as
# its Prometheus endpoint exports them (``:`` for ``/``; documented names, not checked here: no
# TensorFlow Serving binary runs on these machines).
TFSERVING_METRICS = (
    ":tensorflow:serving:request_count",  # counter {model_name, status}
    ":tensorflow:serving:request_latency_bucket",  # histogram {model_name, API, entrypoint, le}, microseconds
    ":tensorflow:serving:runtime_latency_bucket",  # histogram {model_name, API, runtime, le}, microseconds
    ":tensorflow:serving:batching_session:queuing_latency_bucket",  # histogram {thread_pool_name, le}, us
    ":tensorflow:serving:batching_session:wrapped_run_count",  # counter: model calls after batching
)


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """``BatchingParameters`` for CPU serving.

    TensorFlow Serving's batching guide ("Performance Tuning", "CPU-only: One Approach",
    https://github.com/tensorflow/serving/blob/master/tensorflow_serving/batching/README.md):
    ``num_batch_threads`` equal to the number of CPU cores, ``max_batch_size`` very large,
    ``batch_timeout_micros`` 0, then experiment with 1-10 ms while keeping in mind that 0 may be
    optimal; for online serving, ``max_enqueued_batches`` equal to ``num_batch_threads`` keeps
    queueing delay low while keeping the server busy. ``max_batch_size`` is bounded here (the
    images are decoded and resized in the graph, so a batch's memory grows with it) and matches
    ``mmclinic serve``'s default; one millisecond of timeout is the low end of the guide's range.
    """

    max_batch_size: int = 32
    batch_timeout_micros: int = 1000
    num_batch_threads: int = 0
    """0: the number of CPU cores of the machine that writes the file (set it to the serving host's)."""
    max_enqueued_batches: int = 0
    """0: ``num_batch_threads``."""
    pad_variable_length_inputs: bool = False

    def resolved(self) -> BatchingOptions:
        threads = self.num_batch_threads or os.cpu_count() or 1
        return dataclasses.replace(self, num_batch_threads=threads,
                                   max_enqueued_batches=self.max_enqueued_batches or threads)


def _quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid text-proto string for these (ASCII) names


def models_config(model_base: str | Path, base_path_prefix: str = "/models") -> str:
    """``ModelServerConfig`` text for every model under ``MODEL_BASE``."""
    blocks = []
    for folder in find_models(model_base, "MODEL_BASE"):
        labels = folder.labels()
        versions = sorted({folder.versions[-1], *labels.values()}, reverse=True)
        lines = ["  config {",
                 f"    name: {_quote(folder.name)}",
                 f"    base_path: {_quote(base_path_prefix.rstrip('/') + '/' + folder.name)}",
                 '    model_platform: "tensorflow"',
                 "    model_version_policy {",
                 "      specific {",
                 *[f"        versions: {v}" for v in versions],
                 "      }",
                 "    }"]
        for label, v in sorted(labels.items()):
            lines += ["    version_labels {", f"      key: {_quote(label)}", f"      value: {v}", "    }"]
        blocks.append("\n".join(lines + ["  }"]))
    return "model_config_list {\n" + "\n".join(blocks) + "\n}\n"


def batching_parameters(options: BatchingOptions = BatchingOptions()) -> str:
    o = options.resolved()
    return ("# TensorFlow Serving --batching_parameters_file, tuned for CPU as its batching guide's\n"
            "# 'CPU-only: One Approach' says (tensorflow_serving/batching/README.md)\n"
            f"max_batch_size {{ value: {o.max_batch_size} }}\n"
            f"batch_timeout_micros {{ value: {o.batch_timeout_micros} }}\n"
            f"num_batch_threads {{ value: {o.num_batch_threads} }}\n"
            f"max_enqueued_batches {{ value: {o.max_enqueued_batches} }}\n"
            f"pad_variable_length_inputs: {'true' if o.pad_variable_length_inputs else 'false'}\n")


def monitoring_config(path: str = PROMETHEUS_PATH) -> str:
    return f"prometheus_config {{\n  enable: true\n  path: {_quote(path)}\n}}\n"


# --------------------------------------------------------------------------- protobuf wire format


def _key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + varint(len(data)) + data


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + varint(value)


DT_STRING = 7  # tensorflow/core/framework/types.proto


def string_tensor(values: list[bytes]) -> bytes:
    """A 1-D ``DT_STRING`` ``TensorProto``: dtype 1, tensor_shape 2 (dim 2 {size 1}), string_val 8."""
    shape = _bytes_field(2, _int_field(1, len(values)))
    return _int_field(1, DT_STRING) + _bytes_field(2, shape) + b"".join(_bytes_field(8, v) for v in values)


def predict_request(model: str, signature: str, inputs: dict[str, bytes]) -> bytes:
    """``PredictRequest``: model_spec 1 {name 1, signature_name 3}, inputs 2 (map entries key 1,
    value 2 = ``TensorProto`` bytes)."""
    spec = _bytes_field(1, model.encode()) + _bytes_field(3, signature.encode())
    entries = b"".join(_bytes_field(2, _bytes_field(1, k.encode()) + _bytes_field(2, v))
                       for k, v in sorted(inputs.items()))
    return _bytes_field(1, spec) + entries


def prediction_log(request: bytes) -> bytes:
    """``PredictionLog`` with ``predict_log`` (6) holding ``PredictLog`` {request 1}."""
    return _bytes_field(6, _bytes_field(1, request))


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(records: list[bytes]) -> bytes:
    """TFRecord framing: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
    out = bytearray()
    for r in records:
        length = struct.pack("<Q", len(r))
        out += length + struct.pack("<I", _masked_crc(length)) + r + struct.pack("<I", _masked_crc(r))
    return bytes(out)


def gray_png(size: int) -> bytes:
    """A ``size`` x ``size`` 8-bit grayscale gradient as PNG bytes (warm-up input; no imaging library)."""
    rows = b"".join(b"\x00" + bytes((x + y) * 255 // max(1, 2 * size - 2) for x in range(size))
                    for y in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


WARMUP_TEXT = "No acute cardiopulmonary process. Heart size is normal."


def warmup_records(name: str, image_size: int, batch_sizes: tuple[int, ...] = (1, 8),
                   samples: list[tuple[bytes, str]] | None = None) -> list[bytes]:
    """``PredictionLog`` records for ``serving_default``, ``embed_image`` and ``embed_text`` at each
    batch size (TensorFlow Serving reads at most 1000 records)."""
    samples = samples or [(gray_png(image_size), WARMUP_TEXT)]
    records = []
    for n in batch_sizes:
        rows = [samples[i % len(samples)] for i in range(n)]
        images, texts = [r[0] for r in rows], [r[1].encode() for r in rows]
        for signature, inputs in (("serving_default", {"image_bytes": images, "report_text": texts}),
                                  ("embed_image", {"image_bytes": images}),
                                  ("embed_text", {"report_text": texts})):
            tensors = {k: string_tensor(v) for k, v in inputs.items()}
            records.append(prediction_log(predict_request(name, signature, tensors)))
    return records


def write_file(path: Path, data: bytes | str) -> Path:
    """Replace ``path`` in one step (TensorFlow Serving polls its config files)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_warmup(version_dir: str | Path, name: str, samples: list[tuple[bytes, str]] | None = None) -> Path:
    """Write the warm-up requests into one version folder (``assets.extra/tf_serving_warmup_requests``).

    ``mmclinic export`` calls it on the staged version, before the version is installed, so that
    TensorFlow Serving never sees the version without its warm-up file (it reads the file once, when
    it loads the version). ``samples``: (PNG bytes, report text) pairs (default: a synthetic gradient
    image at the model's input size and a normal report)."""
    version = ExportedModel(version_dir)
    image_size = int(version.metadata.get("image_size", 64))
    path = version.path / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, tfrecord(warmup_records(name, image_size, samples=samples)))


def write_tfserving_files(model_base: str | Path, name: str, *, base_path_prefix: str = "/models",
                          batching: BatchingOptions = BatchingOptions(),
                          samples: list[tuple[bytes, str]] | None = None, warmup: bool = True) -> dict[str, Path]:
    """Write ``models.config``, ``batching_parameters.txt`` and ``monitoring.config`` into
    ``MODEL_BASE``; the paths written.

    ``warmup``: also write the warm-up requests into ``NAME``'s latest version when it has none
    (:func:`write_warmup`; for a version installed by hand). ``mmclinic export`` writes them into
    the staged version before installing it and passes ``warmup=False``.
    """
    model_base = Path(model_base)
    folder = next((f for f in find_models(model_base, "MODEL_BASE") if f.name == name), None)
    if folder is None:
        raise FileNotFoundError(f"{model_base}: no exported model {name!r}")
    written = {
        "models.config": write_file(model_base / MODELS_CONFIG, models_config(model_base, base_path_prefix)),
        "batching_parameters": write_file(model_base / BATCHING_PARAMETERS, batching_parameters(batching)),
        "monitoring.config": write_file(model_base / MONITORING_CONFIG, monitoring_config()),
    }
    latest: ExportedModel = folder.latest()
    if warmup:
        existing = latest.path / WARMUP_FILE
        written["warmup"] = existing if existing.is_file() and samples is None else \
            write_warmup(latest.path, name, samples)
    return written


def parse_text_proto(text: str) -> dict[str, list[Any]]:
    """A small parser for the text-proto subset these files use (``field: scalar``, ``field { ... }``,
    comments): every field as a list of values, messages as nested dicts. For checks and tests."""
    import re

    tokens = re.findall(r'#[^\n]*|"(?:[^"\\]|\\.)*"|[{}:,;]|[^\s{}:,;"#]+', text)
    tokens = [t for t in tokens if not t.startswith("#")]
    pos = 0

    def message(closing: bool) -> dict[str, list[Any]]:
        nonlocal pos
        out: dict[str, list[Any]] = {}
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == "}":
                if not closing:
                    raise ValueError("unbalanced '}'")
                pos += 1
                return out
            if tok in (",", ";"):
                pos += 1
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tok):
                raise ValueError(f"expected a field name, got {tok!r}")
            pos += 1
            if pos < len(tokens) and tokens[pos] == ":":
                pos += 1
            if pos >= len(tokens):
                raise ValueError(f"field {tok} has no value")
            if tokens[pos] == "{":
                pos += 1
                value: Any = message(True)
            else:
                raw = tokens[pos]
                pos += 1
                if raw.startswith('"'):
                    value = json.loads(raw)
                elif raw in ("true", "false"):
                    value = raw == "true"
                elif re.fullmatch(r"-?[0-9]+", raw):
                    value = int(raw)
                else:
                    value = float(raw) if re.fullmatch(r"-?[0-9.eE+-]+", raw) else raw
            out.setdefault(tok, []).append(value)
        if closing:
            raise ValueError("missing '}'")
        return out

    return message(False)
