"""Preprocessing ops as plain tensor functions, shared by tf.data and the exported graph."""

from __future__ import annotations

import re

import tensorflow as tf


def decode_image(png_or_jpeg: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded PNG/JPEG bytes (scalar string) -> float32 (size, size, 1) in [0, 1]."""
    img = tf.io.decode_image(png_or_jpeg, channels=1, dtype=tf.float32, expand_animations=False)
    img = tf.image.resize(img, [size, size], method="area")
    img = tf.ensure_shape(img, [size, size, 1])
    return tf.clip_by_value(img, 0.0, 1.0)


def augment_image(img: tf.Tensor, seed: tf.Tensor, hflip: bool = False) -> tf.Tensor:
    """Radiograph-safe augmentation of one (size, size, C) image: :func:`augment_images` of a
    batch of one."""
    return augment_images(img[None], seed, hflip)[0]


def augment_images(images: tf.Tensor, seed: tf.Tensor, hflip: bool = False) -> tf.Tensor:
    """Radiograph-safe augmentation of a batch (B, size, size, C) in [0, 1], each image its own
    draw: a small zoom/shift crop (85-100 % of the side, resampled bilinearly to the full size),
    brightness and contrast jitter.

    No horizontal flip unless asked: a flip swaps left and right, which reports name. Training
    never asks (``data.hflip`` is refused by the config): flipping the image alone contradicts its
    report, its laterality-swap negative and the other mismatch negatives built from the report.
    ``seed`` is a shape-[2] int tensor for the whole batch (stateless ops, reproducible).
    """
    images = tf.cast(images, tf.float32)
    b = tf.shape(images)[0]
    size = images.shape[1] if images.shape[1] is not None else tf.shape(images)[1]
    side = tf.cast(size, tf.float32)
    crop = tf.floor(side * tf.random.stateless_uniform([b], seed, 0.85, 1.0))
    y0 = tf.floor(tf.random.stateless_uniform([b], seed + 1) * (side - crop + 1.0))
    x0 = tf.floor(tf.random.stateless_uniform([b], seed + 2) * (side - crop + 1.0))
    y0, x0 = tf.minimum(y0, side - crop), tf.minimum(x0, side - crop)
    # Box corners at the centres of the crop's first and last pixels (crop_and_resize's convention).
    last = tf.maximum(side - 1.0, 1.0)
    boxes = tf.stack([y0 / last, x0 / last, (y0 + crop - 1.0) / last, (x0 + crop - 1.0) / last], axis=1)
    img = tf.image.crop_and_resize(images, boxes, tf.range(b), tf.stack([size, size]), method="bilinear")
    img = img + tf.random.stateless_uniform([b, 1, 1, 1], seed + 3, -0.08, 0.08)
    factor = tf.random.stateless_uniform([b, 1, 1, 1], seed + 4, 0.85, 1.15)
    mean = tf.reduce_mean(img, axis=[1, 2], keepdims=True)
    img = (img - mean) * factor + mean
    if hflip:
        flip = tf.random.stateless_uniform([b], seed + 5) < 0.5
        img = tf.where(flip[:, None, None, None], tf.reverse(img, axis=[2]), img)
    return tf.clip_by_value(img, 0.0, 1.0)


_SIDE_PATTERN = r"(?i)\b(left|right)\b"


def swap_laterality(text: tf.Tensor) -> tf.Tensor:
    """Swap 'left' and 'right' in a string tensor (a laterality-error corruption)."""
    for src, tmp in (("Left", "\x01"), ("left", "\x02"), ("LEFT", "\x03")):
        text = tf.strings.regex_replace(text, rf"\b{src}\b", tmp)
    for src, dst in (("Right", "Left"), ("right", "left"), ("RIGHT", "LEFT")):
        text = tf.strings.regex_replace(text, rf"\b{src}\b", dst)
    for tmp, dst in (("\x01", "Right"), ("\x02", "right"), ("\x03", "RIGHT")):
        text = tf.strings.regex_replace(text, tmp, dst)
    return text


def swap_laterality_py(text: str) -> str:
    """The same corruption in Python: every side word swapped, nothing else touched."""
    def repl(m: re.Match[str]) -> str:
        w = m.group(0)
        out = "right" if w.lower() == "left" else "left"
        return out.upper() if w.isupper() else out.capitalize() if w[0].isupper() else out
    return re.sub(_SIDE_PATTERN, repl, text)
