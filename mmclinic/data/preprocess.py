"""Preprocessing ops as plain tensor functions, shared by tf.data and the exported graph."""

from __future__ import annotations

import re

import tensorflow as tf

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3


def decode_image(png_or_jpeg: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded PNG/JPEG bytes (scalar string) -> float32 (size, size, 1) in [0, 1]."""
    img = tf.io.decode_image(png_or_jpeg, channels=1, dtype=tf.float32, expand_animations=False)
    img = tf.image.resize(img, [size, size], method="area")
    img = tf.ensure_shape(img, [size, size, 1])
    return tf.clip_by_value(img, 0.0, 1.0)


def augment_image(img: tf.Tensor, seed: tf.Tensor, hflip: bool = False) -> tf.Tensor:
    """Radiograph-safe augmentation: small zoom/shift crop, brightness and contrast jitter.

    No horizontal flip unless asked: a flip swaps left and right, which reports name.
    ``seed`` is a shape-[2] int tensor (stateless ops, reproducible).
    """
    size = tf.shape(img)[0]
    s = tf.random.stateless_uniform([], seed, 0.85, 1.0)
    crop = tf.cast(tf.cast(size, tf.float32) * s, tf.int32)
    img = tf.image.stateless_random_crop(img, [crop, crop, 1], seed + 1)
    img = tf.image.resize(img, [size, size], method="area")
    img = tf.image.stateless_random_brightness(img, 0.08, seed + 2)
    img = tf.image.stateless_random_contrast(img, 0.85, 1.15, seed + 3)
    if hflip:
        img = tf.image.stateless_random_flip_left_right(img, seed + 4)
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
