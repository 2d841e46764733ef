"""Pretrained encoders from local checkpoint folders: keras-hub presets, Hugging Face and timm.

A researcher downloads a checkpoint once, by hand, and points mmclinic at the folder; nothing
here downloads. The format is read from the files present (see ``docs/CHECKPOINTS.md``):

- **keras-hub preset** (what ``save_to_preset`` writes, or a Kaggle preset): ``config.json`` with a
  ``registered_name``, ``model.weights.h5``, ``image_converter.json`` / ``preprocessor.json`` /
  ``tokenizer.json`` and ``assets/``. ViT, DINOv2, ResNet, EfficientNet, DenseNet, SigLIP vision
  and text encoders, a whole SigLIP / SigLIP 2 model (``SigLIPBackbone``, e.g. MedSigLIP) and BERT.
- **Hugging Face folder**: ``config.json`` with a ``model_type`` (``vit``, ``dinov2``,
  ``dinov2_with_registers``, ``bert``), ``model.safetensors`` and the preprocessing files
  (``preprocessor_config.json``; ``vocab.txt`` and ``tokenizer_config.json``). keras-hub's own
  converters map the weights.
- **timm folder**: ``config.json`` with an ``architecture`` (``resnet*``, ``efficientnet*``,
  ``densenet*``) and a ``pretrained_cfg``, and ``model.safetensors``.

A checkpoint carries its preprocessing, and it is read from its files, never guessed
(:class:`ImagePreprocessing`, :class:`TextPreprocessing`). A folder that is missing, of an
unsupported architecture or inconsistent is a :class:`~mmclinic.errors.UsageError` naming the
folder; with ``load_weights=True`` a missing weights file is an error, never a random start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mmclinic.errors import UsageError
from mmclinic.text.tokenizer import vocabulary_is_cased

KERAS_HUB, HUGGING_FACE, TIMM = "keras_hub", "huggingface", "timm"
IMAGE, TEXT, DUAL = "image", "text", "dual"

# keras-hub class (its registered name without "keras_hub>") -> (family, roles it can fill)
KERAS_HUB_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ViTBackbone": ("vit", (IMAGE,)),
    "DINOV2Backbone": ("dinov2", (IMAGE,)),
    "ResNetBackbone": ("resnet", (IMAGE,)),
    "EfficientNetBackbone": ("efficientnet", (IMAGE,)),
    "DenseNetBackbone": ("densenet", (IMAGE,)),
    "SigLIPVisionEncoder": ("siglip", (IMAGE,)),
    "SigLIPTextEncoder": ("siglip", (TEXT,)),
    "SigLIPBackbone": ("siglip", (IMAGE, TEXT, DUAL)),
    "BertBackbone": ("bert", (TEXT,)),
}
# Hugging Face config.json model_type -> (family, roles)
HF_MODEL_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "vit": ("vit", (IMAGE,)),
    "dinov2": ("dinov2", (IMAGE,)),
    "dinov2_with_registers": ("dinov2", (IMAGE,)),
    "bert": ("bert", (TEXT,)),
}
# timm config.json architecture prefix -> family
TIMM_FAMILIES = {"resnet": "resnet", "efficientnet": "efficientnet", "densenet": "densenet"}
# Why some common checkpoints are refused, by Hugging Face model_type.
_HF_HINTS = {
    "siglip": "use the keras-hub preset of the model instead (e.g. Kaggle keras/medsiglip "
              "medsiglip_900m_448 or keras/siglip); keras-hub has no converter for Hugging Face SigLIP folders",
    "siglip_vision_model": "use the keras-hub SigLIP preset instead",
    "clip": "keras-hub has no converter for Hugging Face CLIP folders",
}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# SentencePiece tokenizers keras-hub uses for SigLIP (v1) and SigLIP 2 / MedSigLIP (Gemma vocabulary):
# class -> (end piece, pad piece)
_SENTENCEPIECE_SPECIALS = {"SigLIPTokenizer": ("</s>", "</s>"), "GemmaTokenizer": ("<eos>", "<pad>")}
_WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
# Tensors a Hugging Face BERT checkpoint may lack (BertForMaskedLM has no pooler); mmclinic pools
# sequence_output, so they are left at their initial values, with a warning.
_OPTIONAL_HF_TENSORS = {"bert": ("pooler.dense.weight", "pooler.dense.bias")}


# ----------------------------------------------------------------------------------------------
# What a checkpoint says about its inputs


@dataclass(frozen=True)
class ImagePreprocessing:
    """How the checkpoint's own pipeline turns an image into its input, read from its files.

    For a pixel ``p`` in [0, 1] (mmclinic's display-ready grayscale, repeated to R, G and B), the
    backbone sees ``(p * scale - mean[c]) / std[c]`` for channel ``c``, on an ``image_size`` x
    ``image_size`` image. ``scale`` is the pixel range ``mean`` and ``std`` are written in: 1.0
    when they are for [0, 1] pixels (Hugging Face's ``image_mean`` with ``rescale_factor`` 1/255,
    timm, and keras-hub converters, whose 0-255 ``scale``/``offset`` are converted here), 255.0
    when they are for 0-255 pixels (a Hugging Face processor with ``do_rescale`` false, a
    keras-hub converter without a ``scale``).

    ``interpolation`` and ``resize_shortest_edge`` describe the checkpoint's resizing, for the
    data pipeline: resize so the short side is ``resize_shortest_edge`` and center-crop
    ``image_size`` (``None``: resize straight to ``image_size``). The encoder built by
    :func:`load_image_encoder` does not resize.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1.0
    interpolation: str = "bilinear"
    resize_shortest_edge: int | None = None
    source: str = ""

    def affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel ``(a, b)`` with ``input = p * a + b`` for [0, 1] pixels ``p``."""
        a = tuple(self.scale / s for s in self.std)
        b = tuple(-m / s for m, s in zip(self.mean, self.std))
        return a, b

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """Normalise ``(..., 3)`` RGB pixels in [0, 1] as the checkpoint expects (numpy)."""
        a, b = self.affine()
        return np.asarray(rgb, np.float32) * np.asarray(a, np.float32) + np.asarray(b, np.float32)


@dataclass(frozen=True)
class TextPreprocessing:
    """How the checkpoint turns text into token ids, read from its files.

    ``kind`` ``"wordpiece"`` (BERT family): ``vocabulary``, ``lowercase`` and ``strip_accents``
    (Hugging Face semantics: accents are stripped when lower-casing unless the tokenizer config
    says otherwise), ids ``[CLS] ... [SEP] [PAD] ...``.
    ``kind`` ``"sentencepiece"`` (SigLIP): the model ``proto``; ``canonicalize`` is SigLIP's text
    canonicalisation (ASCII lower-case, punctuation removed, whitespace collapsed, as keras-hub's
    ``SigLIPPreprocessor``); ids ``... </s> <pad> ...``; ``lowercase`` is None (see
    ``canonicalize``).

    ``max_length`` is the number of ids per text, special tokens included. ``model_max_length``
    is the longest the checkpoint allows; SigLIP's text tower takes exactly that many.
    ``start_id`` / ``end_id`` are added around the text when not None; ``pad_id`` fills the rest.
    ``vocabulary_size`` is the number of entries in the vocabulary or SentencePiece model.
    """

    kind: str
    max_length: int
    lowercase: bool | None
    vocabulary: tuple[str, ...] | None = field(default=None, repr=False)
    proto: bytes | None = field(default=None, repr=False)
    strip_accents: bool = False
    canonicalize: bool = False
    add_bos: bool = False
    add_eos: bool = False
    start_id: int | None = None
    end_id: int | None = None
    pad_id: int = 0
    vocabulary_size: int = 0
    model_max_length: int = 0
    source: str = ""

    def with_max_length(self, max_length: int) -> "TextPreprocessing":
        return dataclasses.replace(self, max_length=int(max_length))


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect_checkpoint` reads from a folder, without building a model.

    ``architecture`` is the name the files give (a keras-hub class such as ``DINOV2Backbone``, a
    Hugging Face ``model_type`` such as ``dinov2``, a timm architecture such as ``resnet50``);
    ``family`` is mmclinic's: ``vit``, ``dinov2``, ``resnet``, ``efficientnet``, ``densenet``,
    ``siglip`` or ``bert``. ``roles`` are the towers it can be: ``image``, ``text`` and, for a
    whole SigLIP model, ``dual``. ``text.max_length`` is the checkpoint's maximum.
    """

    folder: Path
    format: str
    architecture: str
    family: str
    roles: tuple[str, ...]
    image: ImagePreprocessing | None
    text: TextPreprocessing | None
    weights: str | None
    notes: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class DualPreset:
    """A whole SigLIP / SigLIP 2 model: both towers, their preprocessing, and the pretrained
    ``logit_scale`` (a log, as SigLIP stores it and as mmclinic's ``DualEncoder.logit_scale``)
    and ``logit_bias``. Zero-shot logits are ``exp(logit_scale) * cos(image, text) + logit_bias``
    (:meth:`logits`), SigLIP's definition.

    ``image_encoder``: ``(B, S, S, 1)`` pixels in [0, 1] -> ``(B, D)`` (the vision tower's pooled
    output). ``text_encoder``: keras-hub's ``SigLIPTextEncoder``, ``{"token_ids": (B, L)}`` ->
    ``(B, D)`` (its head on the last position); or use :func:`run_text_encoder`.
    """

    image_encoder: Any
    text_encoder: Any
    image: ImagePreprocessing
    text: TextPreprocessing
    tokenizer: "CheckpointTokenizer"
    logit_scale: float
    logit_bias: float
    backbone: Any
    info: CheckpointInfo

    @property
    def scale(self) -> float:
        return math.exp(self.logit_scale)

    def logits(self, image_features: Any, text_features: Any) -> Any:
        """``(B_img, D)``, ``(B_txt, D)`` -> ``(B_img, B_txt)`` SigLIP logits."""
        ops = keras.ops
        img = image_features / ops.sqrt(ops.sum(ops.square(image_features), axis=-1, keepdims=True))
        txt = text_features / ops.sqrt(ops.sum(ops.square(text_features), axis=-1, keepdims=True))
        return self.scale * ops.matmul(img, ops.transpose(txt)) + self.logit_bias


# ----------------------------------------------------------------------------------------------
# Reading a folder


def _fail(folder: Path, what: str) -> UsageError:
    return UsageError(f"checkpoint folder {folder}: {what}")


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(folder, f"{name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(folder, f"{name} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise _fail(folder, f"{name} does not hold a JSON object")
    return data


def _folder(folder: str | Path) -> Path:
    path = Path(folder).expanduser()
    if not path.exists():
        raise UsageError(f"checkpoint folder not found: {path}")
    if not path.is_dir():
        raise UsageError(f"checkpoint folder {path}: not a folder")
    return path.resolve()


def detect_format(folder: str | Path) -> str:
    """``keras_hub``, ``huggingface`` or ``timm``, from ``config.json`` (as keras-hub decides)."""
    path = _folder(folder)
    if not (path / "config.json").is_file():
        present = sorted(p.name for p in path.iterdir())[:12]
        raise _fail(path, "no config.json: not a keras-hub preset, Hugging Face or timm checkpoint "
                          f"folder (it holds: {', '.join(present) or 'nothing'})")
    config = _read_json(path, "config.json")
    if "registered_name" in config:
        return KERAS_HUB
    if "model_type" in config:
        return HUGGING_FACE
    if "architecture" in config:
        return TIMM
    raise _fail(path, "config.json has none of registered_name (keras-hub preset), model_type "
                      "(Hugging Face) or architecture (timm)")


def inspect_checkpoint(folder: str | Path) -> CheckpointInfo:
    """Read a checkpoint folder's format, architecture, roles and preprocessing, and check that
    its files agree with each other. Builds no model and reads no weights."""
    path = _folder(folder)
    fmt = detect_format(path)
    config = _read_json(path, "config.json")
    if fmt == KERAS_HUB:
        return _inspect_keras_hub(path, config)
    if fmt == HUGGING_FACE:
        return _inspect_hf(path, config)
    return _inspect_timm(path, config)


def _weights_present(folder: Path, fmt: str) -> str | None:
    if fmt == KERAS_HUB:
        if (folder / "model.weights.h5").is_file():
            return "model.weights.h5"
        if (folder / "model.weights.json").is_file():
            return "model.weights.json"
        return None
    if (folder / "model.safetensors").is_file():
        return "model.safetensors"
    if (folder / "model.safetensors.index.json").is_file():
        return "model.safetensors.index.json"
    return None


def _keras_class(config: dict[str, Any]) -> str:
    name = str(config.get("registered_name", ""))
    return name.split(">", 1)[1] if ">" in name else (name or str(config.get("class_name", "")))


def _inspect_keras_hub(folder: Path, config: dict[str, Any]) -> CheckpointInfo:
    arch = _keras_class(config)
    if arch not in KERAS_HUB_CLASSES:
        raise _fail(folder, f"keras-hub architecture {arch!r} is not supported as an mmclinic tower "
                            f"(supported: {', '.join(sorted(KERAS_HUB_CLASSES))})")
    family, roles = KERAS_HUB_CLASSES[arch]
    cfg = config.get("config", {})
    image = text = None
    if IMAGE in roles:
        image = _keras_image_preprocessing(folder, arch, cfg)
    if TEXT in roles:
        if family == "bert":
            text = _keras_wordpiece(folder, cfg)
        else:
            text_cfg = cfg.get("text_encoder", {}).get("config", {}) if arch == "SigLIPBackbone" else cfg
            text = _keras_sentencepiece(folder, text_cfg)
    return CheckpointInfo(folder, KERAS_HUB, arch, family, roles, image, text,
                          _weights_present(folder, KERAS_HUB), (), config)


def _inspect_hf(folder: Path, config: dict[str, Any]) -> CheckpointInfo:
    model_type = str(config.get("model_type"))
    if model_type not in HF_MODEL_TYPES:
        hint = _HF_HINTS.get(model_type, "keras-hub converts it, if at all, to no architecture mmclinic "
                                         "uses as a tower")
        raise _fail(folder, f"Hugging Face model_type {model_type!r} is not supported "
                            f"(supported: {', '.join(sorted(HF_MODEL_TYPES))}): {hint}")
    family, roles = HF_MODEL_TYPES[model_type]
    notes: list[str] = []
    image = text = None
    if family in ("vit", "dinov2"):
        image = _hf_image_preprocessing(folder, family, config)
    else:
        text = _hf_wordpiece(folder, config, notes)
    weights = _weights_present(folder, HUGGING_FACE)
    if weights is None and (folder / "pytorch_model.bin").is_file():
        notes.append("only pytorch_model.bin: keras-hub reads model.safetensors")
    return CheckpointInfo(folder, HUGGING_FACE, model_type, family, roles, image, text, weights, tuple(notes),
                          config)


def _inspect_timm(folder: Path, config: dict[str, Any]) -> CheckpointInfo:
    arch = str(config.get("architecture"))
    family = next((f for p, f in TIMM_FAMILIES.items() if arch.startswith(p)), None)
    if family is None:
        raise _fail(folder, f"timm architecture {arch!r} is not supported (supported: keras-hub's timm "
                            f"converters for {', '.join(sorted(TIMM_FAMILIES))})")
    _timm_converter(folder, family, config)  # refuses variants keras-hub cannot build
    image = _timm_image_preprocessing(folder, config)
    return CheckpointInfo(folder, TIMM, arch, family, (IMAGE,), image, None, _weights_present(folder, TIMM), (),
                          config)


# --- image preprocessing ------------------------------------------------------------------------


def _triple(folder: Path, value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, dict):  # a serialized array
        value = value.get("config", {}).get("value", value.get("value"))
    if isinstance(value, (int, float)):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) not in (1, 3):
        raise _fail(folder, f"{what} must be one number or three, got {value!r}")
    vals = [float(v) for v in value]
    return (vals[0],) * 3 if len(vals) == 1 else (vals[0], vals[1], vals[2])


def _square(folder: Path, value: Any, what: str) -> int:
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            value = [value["height"], value["width"]]
        else:
            raise _fail(folder, f"{what} must give height and width, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        if value[0] != value[1]:
            raise _fail(folder, f"{what} is {value[0]}x{value[1]}: mmclinic feeds square images")
        return int(value[0])
    raise _fail(folder, f"{what} must be a size in pixels, got {value!r}")


def _keras_image_shape(arch: str, cfg: dict[str, Any]) -> tuple[Any, ...] | None:
    if arch == "SigLIPBackbone":
        cfg = cfg.get("vision_encoder", {}).get("config", {})
    shape = cfg.get("image_shape", cfg.get("input_shape"))
    return tuple(shape) if shape else None


def _keras_image_preprocessing(folder: Path, arch: str, cfg: dict[str, Any]) -> ImagePreprocessing:
    if (folder / "image_converter.json").is_file():
        conv = _read_json(folder, "image_converter.json").get("config", {})
        source = "image_converter.json"
    elif (folder / "preprocessor.json").is_file() and \
            isinstance(_read_json(folder, "preprocessor.json").get("config", {}).get("image_converter"), dict):
        conv = _read_json(folder, "preprocessor.json")["config"]["image_converter"].get("config", {})
        source = "preprocessor.json (image_converter)"
    else:
        raise _fail(folder, "no image_converter.json (nor an image converter in preprocessor.json): the "
                            "checkpoint's input size and normalisation cannot be read; save the preset's "
                            "ImageConverter with save_to_preset(folder)")
    size_value = conv.get("image_size")
    if size_value is None and "height" in conv:
        size_value = [conv.get("height"), conv.get("width")]
    if size_value is None or None in list(size_value):
        raise _fail(folder, f"{source} gives no image_size")
    size = _square(folder, list(size_value), f"{source} image_size")
    scale, offset = conv.get("scale"), conv.get("offset")
    if "mean" in conv and "variance" in conv:  # ImageConverter's legacy arguments
        std = [math.sqrt(v) for v in _triple(folder, conv["variance"], f"{source} variance")]
        s = _triple(folder, scale if scale is not None else 1.0, f"{source} scale")
        scale = [si / sd for si, sd in zip(s, std)]
        offset = [-m / sd for m, sd in zip(_triple(folder, conv["mean"], f"{source} mean"), std)]
    o = _triple(folder, offset if offset is not None else 0.0, f"{source} offset")
    if scale is None:
        # input = p255 + offset = (p * 255 - (-offset)) / 1
        prep = ImagePreprocessing(size, (-o[0], -o[1], -o[2]), (1.0, 1.0, 1.0), 255.0,
                                  str(conv.get("interpolation", "bilinear")), None, source)
    else:
        s = _triple(folder, scale, f"{source} scale")
        if any(v == 0 for v in s):
            raise _fail(folder, f"{source} scale has a zero")
        # keras-hub converters take 0-255 pixels: input = p255 * s + o = (p - mean) / std
        std = tuple(1.0 / (255.0 * v) for v in s)
        mean = tuple(-ov * sd for ov, sd in zip(o, std))
        prep = ImagePreprocessing(size, mean, std, 1.0, str(conv.get("interpolation", "bilinear")), None, source)
    _check_image_size(folder, arch, cfg, prep.image_size, source)
    return prep


def _check_image_size(folder: Path, arch: str, cfg: dict[str, Any], size: int, source: str) -> None:
    """The size the preprocessing feeds must be one the backbone takes."""
    shape = _keras_image_shape(arch, cfg)
    native = shape[0] if shape else None
    if arch in ("ViTBackbone", "SigLIPVisionEncoder", "SigLIPBackbone"):
        if native is not None and native != size:
            raise _fail(folder, f"{source} resizes to {size} px but config.json's image_shape is {native} px; "
                                f"{arch} cannot change its input size")
    elif arch == "DINOV2Backbone":
        patch = int(cfg.get("patch_size", 1))
        if size % patch:
            raise _fail(folder, f"{source} resizes to {size} px, not a multiple of the patch size {patch}")
    elif native is not None and native != size:
        raise _fail(folder, f"{source} resizes to {size} px but config.json fixes the input at {native} px")


def _hf_image_preprocessing(folder: Path, family: str, config: dict[str, Any]) -> ImagePreprocessing:
    name = "preprocessor_config.json"
    if not (folder / name).is_file():
        raise _fail(folder, f"no {name}: the checkpoint's input size and normalisation cannot be read "
                            "(download it with the weights from the model's Hugging Face page)")
    p = _read_json(folder, name)
    if p.get("do_normalize", True):
        if "image_mean" not in p or "image_std" not in p:
            raise _fail(folder, f"{name} has no image_mean / image_std")
        mean = _triple(folder, p["image_mean"], f"{name} image_mean")
        std = _triple(folder, p["image_std"], f"{name} image_std")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if any(s <= 0 for s in std):
        raise _fail(folder, f"{name} image_std must be positive, got {std}")
    scale = 255.0 * float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 255.0
    size = p.get("size")
    shortest = None
    if isinstance(size, dict) and "shortest_edge" in size:
        shortest = int(size["shortest_edge"])
        resize = shortest
    elif isinstance(size, int) and p.get("do_center_crop"):
        shortest = resize = size
    elif size is not None:
        resize = _square(folder, size, f"{name} size")
    else:
        resize = None
    if p.get("do_center_crop") and p.get("crop_size") is not None:
        image_size = _square(folder, p["crop_size"], f"{name} crop_size")
    elif resize is not None:
        image_size, shortest = resize, None
    else:
        raise _fail(folder, f"{name} gives no size or crop_size")
    if shortest == image_size:
        shortest = None  # resizing a square image to the crop size: no crop
    interp = _RESAMPLE.get(p.get("resample", 2), "bilinear")
    prep = ImagePreprocessing(image_size, mean, std, scale, interp, shortest, name)
    patch = int(config.get("patch_size", 1))
    if family == "vit" and int(config.get("image_size", image_size)) != image_size:
        raise _fail(folder, f"{name} gives {image_size} px images but config.json image_size is "
                            f"{config.get('image_size')}; ViT cannot change its input size")
    if image_size % patch:
        raise _fail(folder, f"{name} gives {image_size} px images, not a multiple of the patch size {patch}")
    return prep


def _timm_image_preprocessing(folder: Path, config: dict[str, Any]) -> ImagePreprocessing:
    cfg = config.get("pretrained_cfg")
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("input_size", "mean", "std")):
        raise _fail(folder, "config.json has no pretrained_cfg with input_size, mean and std: the "
                            "checkpoint's normalisation cannot be read")
    size = cfg["input_size"]
    if not isinstance(size, (list, tuple)) or len(size) != 3:
        raise _fail(folder, f"pretrained_cfg input_size must be [channels, height, width], got {size!r}")
    image_size = _square(folder, [int(size[1]), int(size[2])], "pretrained_cfg input_size")
    crop_pct = cfg.get("crop_pct")
    shortest = int(math.floor(image_size / float(crop_pct))) if crop_pct else None
    return ImagePreprocessing(image_size, _triple(folder, cfg["mean"], "pretrained_cfg mean"),
                              _triple(folder, cfg["std"], "pretrained_cfg std"), 1.0,
                              str(cfg.get("interpolation", "bilinear")),
                              shortest if shortest != image_size else None, "config.json pretrained_cfg")


# --- text preprocessing -------------------------------------------------------------------------


def _read_vocabulary(folder: Path, name: str) -> tuple[str, ...]:
    path = folder / name
    if not path.is_file():
        raise _fail(folder, f"{name} is missing: the tokenizer's vocabulary cannot be read")
    vocab = tuple(line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines())
    missing = [t for t in _WORDPIECE_SPECIALS if t not in vocab]
    if missing:
        raise _fail(folder, f"{name} lacks the special tokens {', '.join(missing)}")
    if len(set(vocab)) != len(vocab):
        seen: set[str] = set()
        dupes = sorted({t for t in vocab if t in seen or seen.add(t)})
        raise _fail(folder, f"{name} repeats tokens ({', '.join(repr(t) for t in dupes[:5])}): the ids are ambiguous")
    return vocab


def _check_vocab_rows(folder: Path, n_vocab: int, rows: int, what: str) -> None:
    if n_vocab > rows:
        raise _fail(folder, f"{what} has {n_vocab} entries but the token embedding has {rows} rows: "
                            "token ids past the table (a vocabulary from another model?)")


def _wordpiece(vocab: tuple[str, ...], lowercase: bool, strip_accents: bool, max_len: int,
               source: str) -> TextPreprocessing:
    index = {t: i for i, t in enumerate(vocab)}
    return TextPreprocessing(kind="wordpiece", max_length=max_len, lowercase=lowercase, vocabulary=vocab,
                             strip_accents=strip_accents, start_id=index["[CLS]"], end_id=index["[SEP]"],
                             pad_id=index["[PAD]"], vocabulary_size=len(vocab), model_max_length=max_len,
                             source=source)


def _hf_wordpiece(folder: Path, config: dict[str, Any], notes: list[str]) -> TextPreprocessing:
    vocab = _read_vocabulary(folder, "vocab.txt")
    rows = int(config.get("vocab_size", 0))
    _check_vocab_rows(folder, len(vocab), rows, "vocab.txt")
    tok = _read_json(folder, "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if "do_lower_case" in tok:
        lowercase = bool(tok["do_lower_case"])
        source = "vocab.txt, tokenizer_config.json"
    else:
        lowercase = not vocabulary_is_cased(list(vocab))
        source = "vocab.txt (lower-casing from the vocabulary)"
        notes.append(f"no do_lower_case in tokenizer_config.json: lowercase={lowercase} read from the vocabulary, "
                     "which " + ("has no" if lowercase else "has") + " upper-case pieces")
    strip = tok.get("strip_accents")
    strip_accents = lowercase if strip is None else bool(strip)
    max_len = int(config.get("max_position_embeddings", 512))
    return _wordpiece(vocab, lowercase, strip_accents, max_len, source)


def _keras_wordpiece(folder: Path, cfg: dict[str, Any]) -> TextPreprocessing:
    tok = _read_json(folder, "tokenizer.json")
    tok_cls = _keras_class(tok)
    if tok_cls != "BertTokenizer":
        raise _fail(folder, f"tokenizer.json is a {tok_cls}, not the BertTokenizer a BertBackbone needs")
    vocab = _read_vocabulary(folder, "assets/tokenizer/vocabulary.txt")
    rows = int(cfg.get("vocabulary_size", 0))
    _check_vocab_rows(folder, len(vocab), rows, "assets/tokenizer/vocabulary.txt")
    tcfg = tok.get("config", {})
    return _wordpiece(vocab, bool(tcfg.get("lowercase", False)), bool(tcfg.get("strip_accents", False)),
                      int(cfg.get("max_sequence_length", 512)), "tokenizer.json, assets/tokenizer/vocabulary.txt")


def _keras_sentencepiece(folder: Path, text_cfg: dict[str, Any]) -> TextPreprocessing:
    import sentencepiece as spm

    tok = _read_json(folder, "tokenizer.json")
    tok_cls = _keras_class(tok)
    if tok_cls not in _SENTENCEPIECE_SPECIALS:
        raise _fail(folder, f"tokenizer.json is a {tok_cls!r}; SigLIP text needs one of "
                            f"{', '.join(sorted(_SENTENCEPIECE_SPECIALS))}")
    asset = folder / "assets" / "tokenizer" / "vocabulary.spm"
    if not asset.is_file():
        raise _fail(folder, "assets/tokenizer/vocabulary.spm is missing: the SentencePiece model cannot be read")
    proto = asset.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError variants
        raise _fail(folder, f"assets/tokenizer/vocabulary.spm is not a SentencePiece model ({e})") from None
    end_piece, pad_piece = _SENTENCEPIECE_SPECIALS[tok_cls]
    ids = {}
    for piece in {end_piece, pad_piece}:
        i = sp.piece_to_id(piece)
        if sp.id_to_piece(i) != piece:
            raise _fail(folder, f"the SentencePiece model has no {piece} piece, which {tok_cls} needs")
        ids[piece] = i
    rows = int(text_cfg.get("vocabulary_size", 0))
    _check_vocab_rows(folder, sp.get_piece_size(), rows, "the SentencePiece model")
    seq_len = int(text_cfg.get("max_sequence_length", 64))
    pre = {}
    source = "tokenizer.json, assets/tokenizer/vocabulary.spm"
    if (folder / "preprocessor.json").is_file():
        pre_json = _read_json(folder, "preprocessor.json")
        if _keras_class(pre_json) == "SigLIPPreprocessor":
            pre = pre_json.get("config", {})
            source += ", preprocessor.json"
            if int(pre.get("sequence_length", seq_len)) != seq_len:
                raise _fail(folder, f"preprocessor.json packs {pre.get('sequence_length')} tokens but the text "
                                    f"encoder's max_sequence_length is {seq_len}; SigLIP's text tower takes exactly "
                                    "that many")
    tcfg = tok.get("config", {})
    # keras-hub's SigLIPPreprocessor: optional canonicalisation, SentencePiece, then pack with the
    # end token and pad (its packer has no start token).
    return TextPreprocessing(
        kind="sentencepiece", max_length=seq_len, lowercase=None, proto=proto,
        canonicalize=bool(pre.get("canonicalize_text", True)), add_bos=bool(tcfg.get("add_bos", False)),
        add_eos=bool(tcfg.get("add_eos", False)),
        end_id=ids[end_piece] if pre.get("add_end_token", True) else None, pad_id=ids[pad_piece],
        vocabulary_size=sp.get_piece_size(), model_max_length=seq_len, source=source)


# ----------------------------------------------------------------------------------------------
# In-graph tokenizer


class CheckpointTokenizer(tf.Module):
    """Text -> ``(token_ids int32 (B, L), padding_mask bool (B, L))`` with ``L = max_length``, as
    the checkpoint's tokenizer does it, in TensorFlow ops (tensorflow-text): usable in ``tf.data``,
    inside ``tf.function`` and in a SavedModel when attached to the saved ``tf.Module`` (loading
    one needs ``import tensorflow_text``). Accepts a string, a list of strings or a ``tf.string``
    tensor of any shape (flattened to ``B``)."""

    def __init__(self, prep: TextPreprocessing) -> None:
        super().__init__(name="checkpoint_tokenizer")
        import keras_hub
        import tensorflow_text as tf_text

        self.kind = prep.kind
        self.max_length = prep.max_length
        self.sequence_length = prep.max_length
        self.canonicalize = prep.canonicalize
        self._prep = prep
        if prep.kind == "wordpiece":
            self.wordpiece = keras_hub.tokenizers.WordPieceTokenizer(
                vocabulary=list(prep.vocabulary or ()), lowercase=bool(prep.lowercase),
                strip_accents=prep.strip_accents, dtype="int32")
        elif prep.kind == "sentencepiece":
            self.sentencepiece = tf_text.SentencepieceTokenizer(
                model=prep.proto, out_type=tf.int32, add_bos=prep.add_bos, add_eos=prep.add_eos)
        else:
            raise UsageError(f"unknown tokenizer kind {prep.kind!r}")
        self.packer = keras_hub.layers.StartEndPacker(
            sequence_length=prep.max_length, start_value=prep.start_id, end_value=prep.end_id,
            pad_value=prep.pad_id, return_padding_mask=True, dtype="int32")
        self._tokenize = tf.function(self._graph, input_signature=[tf.TensorSpec([None], tf.string)])

    @property
    def vocab(self) -> list[str]:
        """The vocabulary's entries by id: WordPiece tokens, or the SentencePiece model's pieces."""
        if self._prep.vocabulary is not None:
            return list(self._prep.vocabulary)
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=self._prep.proto)
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]

    def _graph(self, text: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if self.kind == "wordpiece":
            pieces = self.wordpiece(text)
        else:
            if self.canonicalize:
                text = _siglip_canonicalize(text)
            pieces = self.sentencepiece.tokenize(text)
        ids, mask = self.packer(pieces)
        return tf.cast(ids, tf.int32), tf.cast(mask, tf.bool)

    def __call__(self, text: Any) -> tuple[tf.Tensor, tf.Tensor]:
        text = tf.reshape(tf.convert_to_tensor(text, dtype=tf.string), [-1])
        return self._tokenize(text)


def _siglip_canonicalize(text: tf.Tensor) -> tf.Tensor:
    """keras-hub ``SigLIPPreprocessor.canonicalize_inputs``: lower-case, drop punctuation,
    collapse whitespace."""
    text = tf.strings.lower(text)
    text = tf.strings.regex_replace(
        text, r"!|\"|#|\$|%|&|\\|'|\(|\)|\*|\+|,|-|\.|/|:|;|<|=|>|\?|@|\[|\\|\]|\^|_|`|{|\||}|~", "")
    text = tf.strings.regex_replace(text, r"\s+", " ")
    return tf.strings.strip(text)


# ----------------------------------------------------------------------------------------------
# Building models


@keras.saving.register_keras_serializable(package="mmclinic")
class TokenPooling(keras.layers.Layer):
    """``(B, T, D)`` tokens -> ``(B, D)``: the class token (``"cls"``, index 0) or the mean."""

    def __init__(self, mode: str = "cls", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x: Any) -> Any:
        return x[:, 0, :] if self.mode == "cls" else keras.ops.mean(x, axis=1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


def _require_weights(info: CheckpointInfo) -> None:
    if info.weights is not None:
        return
    if info.format == KERAS_HUB:
        raise _fail(info.folder, "the weights file model.weights.h5 is missing (pass load_weights=False for an "
                                 "untrained model of this architecture)")
    extra = " (the folder has pytorch_model.bin, which keras-hub cannot read: download model.safetensors)" \
        if (info.folder / "pytorch_model.bin").is_file() else ""
    raise _fail(info.folder, f"the weights file model.safetensors is missing{extra}")


def _safetensors_module() -> Any:
    try:
        import safetensors
    except ImportError:
        raise UsageError("reading Hugging Face / timm checkpoints needs the safetensors package "
                         "(pip install safetensors)") from None
    return safetensors


class _SafetensorsReader:
    """The loader keras-hub's converters call (``port_weight``, ``get_tensor``), over a folder's
    ``model.safetensors`` (or shards), with errors that name the folder and the tensor.

    Hugging Face names may carry a model prefix (``bert.``, ``dinov2.``) or not; keras-hub's ViT
    converter asks for ``vit.``-prefixed names, which a ``ViTModel`` checkpoint lacks."""

    def __init__(self, folder: Path, exact: bool, optional: tuple[str, ...] = ()) -> None:
        self.folder, self.exact, self.optional = folder, exact, optional
        self.skipped: list[str] = []
        self._prefix: str | None = None
        self._files: dict[str, Any] = {}
        safetensors = _safetensors_module()
        if (folder / "model.safetensors").is_file():
            names = {"model.safetensors": None}
        else:
            index = _read_json(folder, "model.safetensors.index.json")
            names = {str(f): None for f in index.get("weight_map", {}).values()}
        self._where: dict[str, str] = {}
        for name in names:
            try:
                handle = safetensors.safe_open(str(folder / name), framework="np")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise _fail(folder, f"{name} cannot be read ({e})") from None
            self._files[name] = handle
            for key in handle.keys():
                self._where[key] = name

    def __enter__(self) -> "_SafetensorsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._files.clear()

    def _resolve(self, key: str) -> str | None:
        if key in self._where:
            return key
        if self.exact:
            return None
        if self._prefix is not None and self._prefix + key in self._where:
            return self._prefix + key
        found = [k for k in self._where if k.endswith("." + key)]
        if found:
            best = min(found, key=len)
            self._prefix = best[: -len(key)]
            return best
        if key.startswith("vit."):  # a ViTModel checkpoint: no "vit." prefix
            return self._resolve(key[len("vit."):])
        return None

    def get_tensor(self, hf_weight_key: str) -> np.ndarray:
        key = self._resolve(hf_weight_key)
        if key is None:
            raise _fail(self.folder, f"the weights have no tensor {hf_weight_key!r}, which keras-hub's converter "
                                     "needs (a checkpoint of another architecture or layout?)")
        try:
            return self._files[self._where[key]].get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise _fail(self.folder, f"tensor {key!r} cannot be read ({e})") from None

    def port_weight(self, keras_variable: Any, hf_weight_key: str, hook_fn: Any = None) -> None:
        if hf_weight_key in self.optional and self._resolve(hf_weight_key) is None:
            self.skipped.append(hf_weight_key)
            return
        tensor = self.get_tensor(hf_weight_key)
        shape = tuple(keras_variable.shape)
        try:
            if hook_fn is not None:
                tensor = hook_fn(tensor, list(shape))
            tensor = np.asarray(tensor)
        except ValueError as e:
            raise _fail(self.folder, f"tensor {hf_weight_key!r} has shape {np.shape(tensor)}, which does not "
                                     f"fit the model's {shape} ({e})") from None
        if tuple(tensor.shape) != shape:
            raise _fail(self.folder, f"tensor {hf_weight_key!r} has shape {tuple(tensor.shape)}, the model built "
                                     f"from config.json expects {shape}")
        keras_variable.assign(tensor.astype(keras_variable.dtype))


def _hf_converter(folder: Path, model_type: str) -> Any:
    from keras_hub.src.utils.transformers import convert_bert, convert_dinov2, convert_vit

    return {"vit": convert_vit, "dinov2": convert_dinov2, "dinov2_with_registers": convert_dinov2,
            "bert": convert_bert}[model_type]


def _timm_converter(folder: Path, family: str, config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from keras_hub.src.utils.timm import convert_densenet, convert_efficientnet, convert_resnet

    converter = {"resnet": convert_resnet, "efficientnet": convert_efficientnet,
                 "densenet": convert_densenet}[family]
    try:
        return converter, converter.convert_backbone_config(config)
    except (ValueError, KeyError) as e:
        raise _fail(folder, f"keras-hub cannot build timm architecture {config.get('architecture')!r} ({e})") from None


def _load_backbone(info: CheckpointInfo, load_weights: bool, image_size: int | None = None) -> Any:
    """The keras-hub backbone of a checkpoint, with its weights when ``load_weights``."""

    if load_weights:
        _require_weights(info)
    folder = info.folder
    if info.format == KERAS_HUB:
        # The precision in force (train.precision), not the one the preset was saved in: a preset's
        # config.json records its dtype (float32), which would silently override mixed precision.
        kwargs: dict[str, Any] = {"dtype": keras.config.dtype_policy().name}
        if info.family == "dinov2" and image_size is not None:
            kwargs["image_shape"] = (image_size, image_size, 3)
        try:
            # An absolute path, never a preset name keras-hub would download. keras-hub's own loader
            # (Backbone.from_preset's), with the sub-models' saved dtypes left out so that the
            # precision given reaches them too (SigLIPBackbone's two encoders).
            from keras_hub.src.utils.preset_utils import get_preset_loader

            loader = get_preset_loader(str(folder))
            loader.config = _without_nested_dtypes(loader.config)
            return loader.load_backbone(loader.check_backbone_class(), load_weights, **kwargs)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - keras-hub and h5py raise many kinds
            raise _fail(folder, f"keras-hub could not load the preset ({type(e).__name__}: {e})") from None
    config = info.config
    if info.format == HUGGING_FACE:
        converter = _hf_converter(folder, info.architecture)
        try:
            kwargs = converter.convert_backbone_config(config)
        except KeyError as e:
            raise _fail(folder, f"config.json lacks {e.args[0]!r}, which keras-hub's {info.architecture} converter "
                                "reads") from None
        if info.family == "vit":
            # keras-hub's converter leaves ViT's epsilon at its own default; Hugging Face's is 1e-12.
            kwargs["layer_norm_epsilon"] = float(config.get("layer_norm_eps", 1e-12))
        if info.family == "dinov2" and image_size is not None:
            kwargs["image_shape"] = (image_size, image_size, 3)
        if info.family == "bert":
            kwargs["num_segments"] = int(config.get("type_vocab_size", 2))
        exact, optional = False, _OPTIONAL_HF_TENSORS.get(info.family, ())
    else:
        converter, kwargs = _timm_converter(folder, info.family, config)
        exact, optional = True, ()
    try:
        backbone = converter.backbone_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise _fail(folder, f"keras-hub cannot build {converter.backbone_cls.__name__} from config.json ({e})") from None
    if load_weights:
        with _SafetensorsReader(folder, exact, optional) as reader:
            converter.convert_weights(backbone, reader, config)
        if reader.skipped:
            warnings.warn(f"checkpoint folder {folder}: no {', '.join(reader.skipped)} in the weights; those stay "
                          "at their initial values (BERT's pooled_output is untrained; mmclinic pools "
                          "sequence_output)", stacklevel=3)
    return backbone


def _without_nested_dtypes(config: Any, top: bool = True) -> Any:
    """A serialized keras-hub backbone config without the ``dtype`` its nested sub-models were
    saved with (the top level's is replaced by the loader's ``dtype`` argument)."""
    if isinstance(config, dict):
        out = {}
        for k, v in config.items():
            if k == "dtype" and not top:
                continue
            out[k] = _without_nested_dtypes(v, top and k == "config")
        return out
    if isinstance(config, list):
        return [_without_nested_dtypes(v, False) for v in config]
    return config


def _native_size(info: CheckpointInfo) -> int:
    assert info.image is not None
    return info.image.image_size


def load_image_encoder(folder: str | Path, image_size: int | None = None,
                       load_weights: bool = True) -> tuple[keras.Model, ImagePreprocessing]:
    """An image tower from a checkpoint folder, and the checkpoint's own preprocessing.

    The model takes ``(B, S, S, 1)`` float32 grayscale in [0, 1] (mmclinic's display-ready
    pixels) and returns pooled features ``(B, D)``: grayscale to RGB, the checkpoint's
    normalisation (:meth:`ImagePreprocessing.affine`), the backbone, then the architecture's
    pooling: the class token (ViT, DINOv2), the global average (ResNet, EfficientNet, DenseNet),
    SigLIP's attention-pooling head (a SigLIP vision encoder, or the vision half of a whole
    SigLIP model).

    ``S`` is ``image_size``, by default the checkpoint's (``ImagePreprocessing.image_size``).
    CNNs take any size, DINOv2 any multiple of its patch size (position embeddings
    interpolated); ViT and SigLIP only their own. The model does not resize: the data pipeline
    feeds ``S`` x ``S`` images.
    """
    info = inspect_checkpoint(folder)
    if IMAGE not in info.roles:
        raise _fail(info.folder, f"a {info.architecture} checkpoint is a text encoder; it cannot be the image tower")
    prep = info.image
    assert prep is not None
    native = _native_size(info)
    size = native if image_size is None else int(image_size)
    if size != native:
        if info.family in ("vit", "siglip"):
            raise _fail(info.folder, f"image size {size} px requested but this {info.architecture} takes only its "
                                     f"own {native} px (resize the images to {native})")
        if info.family == "dinov2":
            patch = int(info.config.get("config", info.config).get("patch_size", 1))
            if size % patch:
                raise _fail(info.folder, f"image size {size} px is not a multiple of the patch size {patch}")
    backbone = _load_backbone(info, load_weights, size if info.family == "dinov2" else None)
    if info.architecture == "SigLIPBackbone":
        backbone = backbone.vision_encoder
    if info.family == "dinov2":
        backbone = _regrid_dinov2(backbone)
    return _image_model(backbone, info.family, prep, size), prep


def _regrid_dinov2(backbone: Any) -> Any:
    """The same DINOv2 with its position embeddings stored on the grid it runs at.

    keras-hub's DINOv2 keeps the checkpoint's position embeddings (``position_embedding_shape``)
    and trains an interpolated copy for the input size; on saving it interpolates that copy back
    to the checkpoint's grid, and on loading forward again, which loses what training changed
    when the two sizes differ (e.g. ``facebook/dinov2-*``: a 518 px grid, 224 px inputs). Stored
    on the input size's grid, both interpolations are the identity and weights round-trip."""
    size = tuple(int(v) for v in backbone.image_shape[:2])
    emb = backbone.embeddings
    if tuple(int(v) for v in emb.position_embedding_shape[:2]) == size:
        return backbone
    # The same name, hence the same sub-layer names ("<name>_embeddings", or "embeddings" when
    # the backbone was built without a name, as keras-hub's converter does).
    prefix = emb.name[: -len("embeddings")]
    config = {**backbone.get_config(), "position_embedding_shape": size, "name": prefix[:-1] or None}
    regridded = type(backbone).from_config(config)
    if [tuple(v.shape) for v in regridded.weights if v.name != "position_embeddings"] != \
            [tuple(v.shape) for v in backbone.weights if v.name != "position_embeddings"]:
        raise RuntimeError("DINOv2 rebuilt with another position grid has other weights")
    for new, old in zip(regridded.weights, backbone.weights):
        new.assign(emb.interpolated_position_embeddings if old is emb.position_embeddings else old)
    return regridded


def _image_model(backbone: Any, family: str, prep: ImagePreprocessing, size: int) -> keras.Model:
    inp = keras.Input((size, size, 1), name="image")
    rgb = keras.layers.Concatenate(axis=-1, name="gray_to_rgb")([inp, inp, inp])
    a, b = prep.affine()
    x = keras.layers.Rescaling(list(a), offset=list(b), name="checkpoint_normalization")(rgb)
    if family in ("dinov2", "siglip"):
        feats = backbone({"images": x})
    else:
        feats = backbone(x)
    if family == "vit":
        pooled = TokenPooling("cls" if getattr(backbone, "use_class_token", True) else "mean", name="pool")(feats)
    elif family == "dinov2":
        pooled = TokenPooling("cls", name="pool")(feats)
    elif family == "siglip":
        pooled = feats
    else:
        pooled = keras.layers.GlobalAveragePooling2D(name="pool")(feats)
    return keras.Model(inp, pooled, name="image_encoder")


def load_text_encoder(folder: str | Path, max_length: int | None = None,
                      load_weights: bool = True) -> tuple[keras.Model, TextPreprocessing, CheckpointTokenizer]:
    """A text tower from a checkpoint folder, its preprocessing and its in-graph tokenizer.

    The model is keras-hub's backbone: ``BertBackbone`` (``{"token_ids", "segment_ids",
    "padding_mask"}`` -> ``{"sequence_output" (B, L, H), "pooled_output" (B, H)}``) or
    ``SigLIPTextEncoder`` (``{"token_ids"}`` -> ``(B, D)``, its head on the last position; it
    attends to padding too, as SigLIP was trained). :func:`run_text_encoder` calls either.

    ``max_length`` (ids per text, special tokens included) defaults to the checkpoint's maximum;
    BERT takes up to ``max_position_embeddings``, SigLIP exactly its ``max_sequence_length``.
    """
    info = inspect_checkpoint(folder)
    if TEXT not in info.roles:
        raise _fail(info.folder, f"a {info.architecture} checkpoint is an image encoder; it cannot be the text tower")
    prep = text_preprocessing_for(info, max_length)
    backbone = _load_backbone(info, load_weights)
    if info.architecture == "SigLIPBackbone":
        backbone = backbone.text_encoder
    return backbone, prep, CheckpointTokenizer(prep)


def text_preprocessing_for(info: CheckpointInfo, max_length: int | None) -> TextPreprocessing:
    prep = info.text
    assert prep is not None
    if max_length is None:
        return prep
    max_length = int(max_length)
    if info.family == "siglip" and max_length != prep.model_max_length:
        raise _fail(info.folder, f"max_length {max_length} requested but SigLIP's text tower takes exactly "
                                 f"{prep.model_max_length} tokens")
    if max_length > prep.model_max_length:
        raise _fail(info.folder, f"max_length {max_length} exceeds the checkpoint's maximum sequence length "
                                 f"{prep.model_max_length}")
    if max_length < 3:
        raise _fail(info.folder, f"max_length {max_length} leaves no room for text")
    return prep.with_max_length(max_length)


def run_text_encoder(encoder: Any, token_ids: Any, padding_mask: Any, training: bool = False) -> dict[str, Any]:
    """Call a text tower from :func:`load_text_encoder`: ``{"pooled_output": (B, D)}`` always
    (BERT: its pooler on [CLS]; SigLIP: its head on the last position) and, for BERT,
    ``"sequence_output"`` ``(B, L, H)``."""
    import keras_hub

    if isinstance(encoder, keras_hub.models.BertBackbone):
        out = encoder({"token_ids": token_ids, "segment_ids": keras.ops.zeros_like(token_ids),
                       "padding_mask": padding_mask}, training=training)
        return {"sequence_output": out["sequence_output"], "pooled_output": out["pooled_output"]}
    return {"pooled_output": encoder({"token_ids": token_ids}, training=training)}


def load_dual_encoder(folder: str | Path, load_weights: bool = True) -> DualPreset:
    """A whole SigLIP / SigLIP 2 model (keras-hub ``SigLIPBackbone`` preset, e.g. MedSigLIP
    ``medsiglip_900m_448``): both towers, their preprocessing, the tokenizer and the pretrained
    logit scale and bias (see :class:`DualPreset`)."""
    info = inspect_checkpoint(folder)
    if DUAL not in info.roles:
        raise _fail(info.folder, f"a {info.architecture} checkpoint is a single tower, not a dual image-text "
                                 "model (supported: a keras-hub SigLIPBackbone preset)")
    assert info.image is not None and info.text is not None
    backbone = _load_backbone(info, load_weights)
    image_encoder = _image_model(backbone.vision_encoder, "siglip", info.image, info.image.image_size)
    head = backbone.siglip_head
    return DualPreset(image_encoder, backbone.text_encoder, info.image, info.text, CheckpointTokenizer(info.text),
                      float(keras.ops.convert_to_numpy(head.logit_scale)),
                      float(keras.ops.convert_to_numpy(head.logit_bias)), backbone, info)


def checkpoint_tokenizer(folder: str | Path, max_length: int | None = None) -> CheckpointTokenizer:
    """The in-graph tokenizer of a text (or dual) checkpoint folder, without building its model."""
    info = inspect_checkpoint(folder)
    if TEXT not in info.roles:
        raise _fail(info.folder, f"a {info.architecture} checkpoint is an image encoder; it has no tokenizer")
    return CheckpointTokenizer(text_preprocessing_for(info, max_length))


def checkpoint_sha256(folder: str | Path) -> str:
    """SHA-256 over a checkpoint folder's files (relative paths and contents, in sorted order):
    config, weights, tokenizer and preprocessing files alike. Recorded with a run, so that a run
    can be re-opened against the very checkpoint it started from."""
    import hashlib

    path = _folder(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()
