"""Tiny checkpoint folders written offline from random weights, for the tests: keras-hub presets
(ViT, DINOv2, ResNet, EfficientNet, DenseNet, SigLIP, BERT), Hugging Face folders (BERT, ViT,
DINOv2) and timm folders. Hugging Face and timm tensor names are produced by running keras-hub's
own converters backwards (:class:`ProbeWriter`), so they are the names real checkpoints carry.

Shared by ``tests/test_checkpoints.py``, ``tests/test_model.py`` and
``tests/test_checkpoint_training.py``."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import keras
import keras_hub
import numpy as np
import sentencepiece as spm
from safetensors import numpy as safetensors_numpy

REPORTS = [
    "Left lower lobe consolidation, no effusion.",
    "No acute cardiopulmonary process!",
    "Mild cardiomegaly (stable); small LEFT effusion - Ménière?",
    "",
    "normal chest radiograph normal chest radiograph normal chest radiograph normal chest radiograph",
]
# A small WordPiece vocabulary, uncased, with word pieces and an accent-stripped word.


UNCASED_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", "(", ")", ";", "-",
                 "left", "lower", "lobe", "con", "##solid", "##ation", "no", "effusion", "acute", "cardio",
                 "##pulmonary", "process", "mild", "##megaly", "stable", "small", "men", "##iere",
                 "normal", "chest", "radio", "##graph", "the", "of", "right", "upper"]


CASED_VOCAB = UNCASED_VOCAB + ["Left", "No", "Mild", "LEFT", "Men", "##ière", "L", "##EF", "##T"]


# ----------------------------------------------------------------------------------------------
# Helpers


def _perturb(model, seed: int, skip: tuple[str, ...] = ()) -> None:
    """Random, non-constant values for every float weight (layer norms, biases, batch-norm
    statistics too), so that a weight ported to the wrong place shows."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "float" not in str(v.dtype) or any(s in v.path for s in skip):
            continue
        value = keras.ops.convert_to_numpy(v)
        noise = rng.normal(0.0, 0.05, value.shape).astype(value.dtype)
        v.assign(value + np.abs(noise) + 0.5 if "moving_variance" in v.path else value + noise)


def _np(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _candidates(shape: tuple[int, ...], key: str) -> list[tuple[int, ...]]:
    """Source shapes to try when running a converter's hook backwards (PyTorch layouts first)."""
    s = tuple(shape)
    if len(s) == 1:
        return [s]
    if len(s) == 2:
        return [(s[0] * s[1],)] if key.endswith("bias") else [(s[1], s[0]), (1,) + s, s]
    if len(s) == 3:
        return [(s[1] * s[2], s[0]), (s[2], s[0] * s[1]), s]
    if len(s) == 4:
        return [(s[3], s[2], s[0], s[1]), (s[2], s[3], s[0], s[1]), s]
    return [s]


class ProbeWriter:
    """Runs a keras-hub converter backwards: every ``port_weight(variable, name, hook)`` it makes
    records the tensor ``name`` that the hook maps onto the variable's current value. The names
    are therefore exactly those keras-hub reads from real Hugging Face / timm checkpoints."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}

    def get_tensor(self, key: str) -> np.ndarray:
        raise KeyError(key)  # BERT's converter probes for the old gamma/beta names

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None) -> None:
        value = _np(keras_variable)
        shape = tuple(value.shape)
        if hook_fn is None:
            self.tensors[hf_weight_key] = value.copy()
            return
        for cand in _candidates(shape, hf_weight_key):
            n = int(np.prod(cand))
            if n != value.size:
                continue
            try:
                moved = np.asarray(hook_fn(np.arange(n).reshape(cand), list(shape)))
            except Exception:  # noqa: BLE001 - a hook that does not fit this candidate
                continue
            if moved.shape != shape:
                continue
            out = np.empty(n, value.dtype)
            out[moved.reshape(-1)] = value.reshape(-1)
            self.tensors[hf_weight_key] = out.reshape(cand)
            return
        raise AssertionError(f"cannot run the converter hook backwards for {hf_weight_key} {shape}")


def _probe(converter, backbone, config: dict) -> dict[str, np.ndarray]:
    writer = ProbeWriter()
    converter.convert_weights(backbone, writer, config)
    return writer.tensors


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _imagenet_converter(cls, size: int):
    return cls(image_size=(size, size), scale=[1 / (255 * s) for s in IMAGENET_STD],
               offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], interpolation="bicubic")


def _keras_image_case(name: str):
    """(backbone, image converter, pooling) of a tiny keras-hub image model."""
    if name == "vit":
        bb = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2,
                                          hidden_dim=16, mlp_dim=32)
        conv = keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
        return bb, conv, lambda y: y[:, 0]
    if name == "dinov2":
        bb = keras_hub.models.DINOV2Backbone(patch_size=8, num_layers=1, hidden_dim=16, num_heads=2,
                                             intermediate_dim=32, image_shape=(32, 32, 3),
                                             position_embedding_shape=(32, 32))
        return bb, _imagenet_converter(keras_hub.layers.DINOV2ImageConverter, 32), lambda y: y[:, 0]
    if name == "resnet":
        bb = keras_hub.models.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[3],
                                             stackwise_num_filters=[64, 32], stackwise_num_blocks=[1, 1],
                                             stackwise_num_strides=[1, 2], block_type="basic_block",
                                             use_pre_activation=False)
        return bb, _imagenet_converter(keras_hub.layers.ResNetImageConverter, 32), lambda y: y.mean(axis=(1, 2))
    if name == "efficientnet":
        bb = keras_hub.models.EfficientNetBackbone(
            stackwise_width_coefficients=[1.0, 1.0], stackwise_depth_coefficients=[1.0, 1.0],
            stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1], stackwise_input_filters=[8, 8],
            stackwise_output_filters=[8, 16], stackwise_expansion_ratios=[1, 2],
            stackwise_squeeze_and_excite_ratios=[0.25, 0.25], stackwise_strides=[1, 2],
            stackwise_block_types=["v1", "v1"], dropout=0.0)
        return bb, _imagenet_converter(keras_hub.layers.EfficientNetImageConverter, 32), \
            lambda y: y.mean(axis=(1, 2))
    if name == "densenet":
        bb = keras_hub.models.DenseNetBackbone(stackwise_num_repeats=[1, 1], growth_rate=8)
        return bb, _imagenet_converter(keras_hub.layers.DenseNetImageConverter, 32), lambda y: y.mean(axis=(1, 2))
    raise AssertionError(name)


def _train_sentencepiece() -> bytes:
    buf = io.BytesIO()
    corpus = [r.lower() for r in REPORTS if r] * 30 + ["right upper lobe opacity", "the heart size is normal"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=64,
                                   hard_vocab_limit=False, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
                                   minloglevel=2)
    return buf.getvalue()


def _bert(vocab: list[str], seed: int):
    bb = keras_hub.models.BertBackbone(vocabulary_size=len(vocab), num_layers=1, num_heads=2, hidden_dim=16,
                                       intermediate_dim=32, max_sequence_length=32)
    _perturb(bb, seed)
    return bb


def _hf_bert_folder(folder: Path, vocab: list[str], seed: int, *, prefix: str = "", pooler: bool = True,
                    tokenizer_config: dict | None = None):
    from keras_hub.src.utils.transformers import convert_bert

    bb = _bert(vocab, seed)
    config = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": len(vocab), "hidden_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 32, "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    tensors = _probe(convert_bert, bb, config)
    if not pooler:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
    folder.mkdir()
    safetensors_numpy.save_file({prefix + k: v for k, v in tensors.items()}, str(folder / "model.safetensors"))
    _write_json(folder / "config.json", config)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if tokenizer_config is not None:
        _write_json(folder / "tokenizer_config.json", tokenizer_config)
    return bb, tensors


def _siglip_backbone(proto: bytes, image_size: int, sequence_length: int, width: int):
    n_pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    vision = keras_hub.models.SigLIPVisionEncoder(patch_size=8, hidden_dim=width, num_layers=1, num_heads=2,
                                                  intermediate_dim=2 * width, image_shape=(image_size, image_size, 3))
    text = keras_hub.models.SigLIPTextEncoder(vocabulary_size=n_pieces, embedding_dim=width, hidden_dim=width,
                                              num_layers=1, num_heads=2, intermediate_dim=2 * width,
                                              max_sequence_length=sequence_length, projection_dim=width)
    bb = keras_hub.models.SigLIPBackbone(vision, text)
    bb({"images": np.zeros((1, image_size, image_size, 3), "float32"),
        "token_ids": np.zeros((1, sequence_length), "int32")})
    return bb


def write_siglip_preset(folder: Path, *, image_size: int = 32, sequence_length: int = 16, width: int = 16,
                        seed: int = 4, logit_scale: float = math.log(10.0), logit_bias: float = -5.0,
                        proto: bytes | None = None):
    """A whole SigLIP model as a keras-hub preset (backbone, SentencePiece tokenizer, image
    converter with mean/std 0.5): ``(folder, backbone, proto)``."""
    proto = proto if proto is not None else _train_sentencepiece()
    bb = _siglip_backbone(proto, image_size, sequence_length, width)
    _perturb(bb, seed)
    bb.siglip_head.logit_scale.assign(logit_scale)
    bb.siglip_head.logit_bias.assign(logit_bias)
    conv = keras_hub.layers.SigLIPImageConverter(image_size=(image_size, image_size), scale=1 / 127.5, offset=-1.0,
                                                 interpolation="bicubic")
    pre = keras_hub.models.SigLIPPreprocessor(keras_hub.models.SigLIPTokenizer(proto=proto), conv,
                                              sequence_length=sequence_length)
    bb.save_to_preset(str(folder))
    pre.save_to_preset(str(folder))
    return folder, bb, proto


def write_keras_image_preset(folder: Path, name: str = "vit", seed: int = 2):
    """A tiny keras-hub image preset (``vit``, ``dinov2``, ``resnet``, ``efficientnet``, ``densenet``)
    with its image converter, 32 px: ``(folder, backbone, converter, pooling)``."""
    bb, conv, pool = _keras_image_case(name)
    _perturb(bb, seed, skip=("position_embeddings",) if name == "dinov2" else ())
    bb.save_to_preset(str(folder))
    conv.save_to_preset(str(folder))
    return folder, bb, conv, pool


def write_hf_bert(folder: Path, vocab: list[str] | None = None, seed: int = 7):
    """A tiny Hugging Face BERT folder (uncased vocabulary, max 32 positions): ``(folder, backbone)``."""
    bb, _ = _hf_bert_folder(folder, list(vocab or UNCASED_VOCAB), seed, tokenizer_config={
        "do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 32})
    return folder, bb


def write_timm(folder: Path, architecture: str = "resnet18", seed: int = 14):
    """A tiny-input timm folder of ``architecture`` (its real depth; 32 px): ``(folder, backbone)``."""
    from keras_hub.src.utils.timm import convert_densenet, convert_efficientnet, convert_resnet

    converter = {"resnet": convert_resnet, "efficientnet": convert_efficientnet,
                 "densenet": convert_densenet}[architecture.split("_")[0].rstrip("0123456789")]
    config = {"architecture": architecture, "num_classes": 0, "global_pool": "avg",
              "pretrained_cfg": {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.875,
                                 "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    bb = converter.backbone_cls(**converter.convert_backbone_config(config))
    _perturb(bb, seed)
    tensors = _probe(converter, bb, config)
    from safetensors.numpy import save_file

    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    _write_json(folder / "config.json", config)
    return folder, bb, tensors
