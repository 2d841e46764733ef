"""TensorFlow Serving's production files (mmclinic.serve.tfserving), parsed back as TF Serving reads them.

ModelServerConfig and PredictionLog are parsed with tensorflow_serving's own proto classes
(tensorflow-serving-api, in the lock), and the text protos also go through a small text-proto
parser that checks their structure and the warm-up records through a plain protobuf wire decoder,
with the tensors parsed by TensorFlow's TensorProto.
BatchingParameters and MonitoringConfig have no Python classes in any package: they are always
checked with the small parser.
"""

from __future__ import annotations

import json
import shutil

import pytest

from mmclinic.serve import tfserving


def _fake_base(tmp_path, versions=(1, 2, 3), labels=None):
    base = tmp_path / "models"
    for v in versions:
        d = base / "tiny" / str(v)
        (d / "assets.extra").mkdir(parents=True)
        (d / "saved_model.pb").write_bytes(b"")
        (d / "assets.extra" / "mmclinic.json").write_text(json.dumps({"mismatch_threshold": 0.5, "config": {},
                                                                      "image_size": 16}))
    (base / "tiny" / ".incoming-4").mkdir()
    if labels:
        (base / "tiny" / "version_labels.json").write_text(json.dumps(labels))
    return base


def _wire(data):
    """A protobuf message's fields as {number: [value, ...]} (varints and length-delimited bytes)."""
    fields, pos = {}, 0

    def varint():
        nonlocal pos
        shift = value = 0
        while True:
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields.setdefault(number, []).append(varint())
        elif wire == 2:
            n = varint()
            fields.setdefault(number, []).append(data[pos:pos + n])
            pos += n
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return fields


def _serving_protos():
    """tensorflow_serving's own proto classes (tensorflow-serving-api, in the lock)."""
    from tensorflow_serving.apis import prediction_log_pb2
    from tensorflow_serving.config import model_server_config_pb2

    return prediction_log_pb2, model_server_config_pb2


def test_config_files_parse_as_tf_serving_text_protos(tmp_path):
    base = _fake_base(tmp_path, labels={"stable": 1, "canary": 3})
    written = tfserving.write_tfserving_files(base, "tiny", batching=tfserving.BatchingOptions(num_batch_threads=4))
    assert set(written) == {"models.config", "batching_parameters", "monitoring.config", "warmup"}

    cfg = tfserving.parse_text_proto((base / "models.config").read_text())
    (config,) = cfg["model_config_list"][0]["config"]
    assert config["name"] == ["tiny"] and config["base_path"] == ["/models/tiny"]
    assert config["model_platform"] == ["tensorflow"]
    # The latest version plus the labelled ones; version 2 (neither) and the hidden .incoming-4 are not served.
    assert config["model_version_policy"][0]["specific"][0]["versions"] == [3, 1]
    assert {(e["key"][0], e["value"][0]) for e in config["version_labels"]} == {("stable", 1), ("canary", 3)}

    batching = tfserving.parse_text_proto((base / "batching_parameters.txt").read_text())
    assert {k: v[0]["value"][0] for k, v in batching.items() if isinstance(v[0], dict)} == {
        "max_batch_size": 32, "batch_timeout_micros": 1000, "num_batch_threads": 4, "max_enqueued_batches": 4}
    assert batching["pad_variable_length_inputs"] == [False]
    monitoring = tfserving.parse_text_proto((base / "monitoring.config").read_text())
    assert monitoring == {"prometheus_config": [{"enable": [True], "path": ["/monitoring/prometheus/metrics"]}]}

    from google.protobuf import text_format  # TensorFlow Serving's own ModelServerConfig reads the file

    msc = text_format.Parse((base / "models.config").read_text(), _serving_protos()[1].ModelServerConfig())
    c = msc.model_config_list.config[0]
    assert list(c.model_version_policy.specific.versions) == [3, 1] and dict(c.version_labels) == {
        "stable": 1, "canary": 3}
    assert c.name == "tiny" and c.base_path == "/models/tiny" and c.model_platform == "tensorflow"


def test_models_config_lists_every_model_and_no_labels_when_there_are_none(tmp_path):
    base = _fake_base(tmp_path)
    shutil.copytree(base / "tiny", base / "other")
    text = tfserving.models_config(base, "/srv/models/")
    configs = tfserving.parse_text_proto(text)["model_config_list"][0]["config"]
    assert [(c["name"][0], c["base_path"][0]) for c in configs] == [("other", "/srv/models/other"),
                                                                    ("tiny", "/srv/models/tiny")]
    assert all("version_labels" not in c and c["model_version_policy"][0]["specific"][0]["versions"] == [3]
               for c in configs)


def test_text_proto_parser_rejects_broken_text():
    for text in ("a { b: 1", "a: 1 }", "{ a: 1 }", "a:"):
        with pytest.raises(ValueError):
            tfserving.parse_text_proto(text)


def test_crc32c_and_tfrecord_framing_read_back_with_tensorflow(tmp_path):
    import tensorflow as tf

    assert tfserving.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    path = tmp_path / "r.tfrecord"
    records = [b"", b"x", bytes(range(256)) * 40]
    path.write_bytes(tfserving.tfrecord(records))
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records
    png = tfserving.gray_png(16)
    img = tf.io.decode_png(png).numpy()
    assert img.shape == (16, 16, 1) and img[0, 0, 0] == 0 and img[15, 15, 0] == 255


def _requests(path):
    """(model, signature, {input: values}) of each PredictionLog in a warm-up file, read with
    TensorFlow Serving's own PredictionLog class; a plain wire decoding of the same bytes must find
    only those fields, with the same values."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    out = []
    protos = _serving_protos()
    for raw in tf.data.TFRecordDataset(str(path)):
        raw = raw.numpy()
        log = protos[0].PredictionLog.FromString(raw)
        assert log.WhichOneof("log_type") == "predict_log"
        req = log.predict_log.request
        real = (req.model_spec.name, req.model_spec.signature_name,
                {k: tf.make_ndarray(v) for k, v in req.inputs.items()})
        wire = _wire(raw)
        assert set(wire) == {6}  # predict_log
        wreq = _wire(_wire(wire[6][0])[1][0])
        spec = _wire(wreq[1][0])
        inputs = {}
        for entry in map(_wire, wreq[2]):
            inputs[entry[1][0].decode()] = tf.make_ndarray(tensor_pb2.TensorProto.FromString(entry[2][0]))
        assert (spec[1][0].decode(), spec[3][0].decode()) == real[:2] and sorted(inputs) == sorted(real[2])
        assert all(np.array_equal(inputs[k], real[2][k]) for k in inputs)
        out.append(real)
    return out


def test_warmup_requests_parse_back(tmp_path):
    base = _fake_base(tmp_path)
    tfserving.write_tfserving_files(base, "tiny")
    reqs = _requests(base / "tiny" / "3" / tfserving.WARMUP_FILE)
    assert [(m, s, sorted(i), len(next(iter(i.values())))) for m, s, i in reqs] == [
        ("tiny", "serving_default", ["image_bytes", "report_text"], 1), ("tiny", "embed_image", ["image_bytes"], 1),
        ("tiny", "embed_text", ["report_text"], 1), ("tiny", "serving_default", ["image_bytes", "report_text"], 8),
        ("tiny", "embed_image", ["image_bytes"], 8), ("tiny", "embed_text", ["report_text"], 8)]
    assert reqs[0][2]["report_text"][0] == tfserving.WARMUP_TEXT.encode()
    assert reqs[0][2]["image_bytes"][0] == tfserving.gray_png(16)
    assert not (base / "tiny" / "2" / tfserving.WARMUP_FILE).exists()


@pytest.mark.slow
def test_warmup_requests_run_on_the_exported_model(exported_model, tmp_path):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    base = tmp_path / "models"
    shutil.copytree(exported_model.path.parent, base / "tiny")
    tfserving.write_tfserving_files(base, "tiny")
    module = tf.saved_model.load(str(base / "tiny" / "1"))
    for _, signature, inputs in _requests(base / "tiny" / "1" / tfserving.WARMUP_FILE):
        out = module.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
        assert all(v.shape[0] == len(next(iter(inputs.values()))) for v in out.values())


@pytest.mark.slow
def test_tflite_image_towers_are_measured_written_or_refused(exported_model, trained_run, tmp_path):
    from mmclinic.serve.tflite import quantize

    version = tmp_path / "tiny" / "1"
    shutil.copytree(exported_model.path, version)
    r = quantize(version, trained_run, max_drop=1.0)
    for mode in ("float16", "int8"):
        m = r["image_tower"][mode]
        assert m["accepted"] and (version / "assets.extra" / "tflite" / f"image_tower_{mode}.tflite").is_file()
        assert set(m["drop"]) == {"image_to_text_R@5", "mismatch_auroc"} and m["bytes"] > 0
    assert r["image_tower"]["int8"]["bytes"] < r["image_tower"]["float32"]["bytes"]
    assert r["image_tower"]["float16"]["max_embedding_cosine_distance"] < 0.01
    card = (version / "assets.extra" / "model_card.md").read_text()
    assert "## TFLite (test split" in card and "TFLite int8 image tower" in card
    # A negative allowance refuses every quantised tower; the card says so and is not duplicated.
    shutil.rmtree(version / "assets.extra" / "tflite")
    r = quantize(version, trained_run, max_drop=-1.0)
    assert not any(m["accepted"] for k, m in r["image_tower"].items() if k != "float32")
    assert not list((version / "assets.extra" / "tflite").glob("*.tflite"))
    card = (version / "assets.extra" / "model_card.md").read_text()
    assert card.count("## TFLite (") == 1 and "REFUSED" in card


@pytest.mark.slow
def test_export_stages_warmup_and_tflite_before_the_version_is_installed(trained_run, tmp_path, monkeypatch):
    from mmclinic.artifacts import ModelFolder
    from mmclinic.serve.export import export

    seen = {}
    install = ModelFolder.install

    def spy(self, staged, version):  # what a server polling MODEL_BASE could see at the rename
        seen["files"] = {str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()}
        return install(self, staged, version)

    monkeypatch.setattr(ModelFolder, "install", spy)
    r = export(trained_run, tmp_path / "models", "tiny", tflite=("float16", "int8"))
    assert tfserving.WARMUP_FILE in seen["files"] and "assets.extra/tflite/quantization.json" in seen["files"]
    q = json.loads((r.path / "assets.extra" / "tflite" / "quantization.json").read_text())
    assert q == r.tflite and set(q["image_tower"]) == {"float32", "float16", "int8"}
    for mode in ("float16", "int8"):
        m = q["image_tower"][mode]
        assert m["accepted"] == (max(m["drop"].values()) <= q["max_quantization_drop"])
        assert (f"assets.extra/tflite/image_tower_{mode}.tflite" in seen["files"]) == m["accepted"]
    assert "## TFLite (test split" in (r.path / "assets.extra" / "model_card.md").read_text()
    assert _requests(r.path / tfserving.WARMUP_FILE)[0][1] == "serving_default"
    assert (tmp_path / "models" / tfserving.MODELS_CONFIG).is_file()


def test_export_refuses_unknown_tflite_modes(tmp_path):
    from mmclinic.config import ConfigError, ExportConfig
    from mmclinic.errors import UsageError
    from mmclinic.serve.export import export

    with pytest.raises(UsageError, match="--tflite.*int4"):
        export(tmp_path / "no-run", tmp_path / "models", "tiny", tflite=("int4",))
    with pytest.raises(ConfigError, match="export.tflite"):
        ExportConfig(tflite=("float16", "float16"))
