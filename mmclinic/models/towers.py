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


def build_image_tower(name: str, size: int, widths: tuple[int, ...], weights: str | None) -> keras.Model:
    if name not in IMAGE_TOWERS:
        raise UsageError(f"model.image_tower must be one of {sorted(IMAGE_TOWERS)}, got {name!r}")
    return IMAGE_TOWERS[name](size, tuple(widths), weights)


def build_text_tower(vocab_size: int, layers: int, hidden: int, heads: int, intermediate: int,
                     max_length: int, dropout: float) -> keras.Model:
    """A small BERT (keras-hub) trained from scratch on the learned vocabulary."""
    import keras_hub

    return keras_hub.models.BertBackbone(
        vocabulary_size=vocab_size, num_layers=layers, num_heads=heads, hidden_dim=hidden,
        intermediate_dim=intermediate, max_sequence_length=max_length, dropout=dropout, name="text_bert")
