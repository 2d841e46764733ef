"""The one display conversion: a stored image to the 8-bit picture a person looks at.

Everything that shows an image to a person (the failure-case HTML, the projector's sprite,
notebooks) goes through :func:`display_pixels` / :func:`to_uint8`, so a thumbnail always shows
what the model sees.

Stored images are the PNGs ingest writes (16-bit grayscale, or 8-bit RGB); any PNG or JPEG of
another bit depth is read the same way. Samples are scaled by their bit depth (a 16-bit sample
by 65535, an 8-bit one by 255; Pillow already stretches 1/2/4-bit PNGs to 8 bits), which is
what :func:`mmclinic.data.preprocess.decode_image` gives the model. An optional window then
maps ``(low, high)`` on that [0, 1] scale to black and white; ``"auto"`` takes the 0.5 and 99.5
percentiles of the image.

Base layer: numpy and Pillow only.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Union

import numpy as np

Window = Union[tuple[float, float], str, None]
AUTO_PERCENTILES = (0.5, 99.5)

__all__ = ["Window", "display_pixels", "to_uint8", "display_image", "thumbnail", "thumbnail_png", "png_bytes",
           "sprite"]


def _decode(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> float32 in [0, 1], (H, W) or (H, W, 3), scaled by bit depth."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32) / 65535.0
    if mode == "I":  # 16-bit samples held in 32-bit integers
        return np.clip(np.asarray(im).astype(np.float32) / 65535.0, 0, 1)
    if mode == "F":
        return np.clip(np.asarray(im).astype(np.float32), 0, 1)
    if mode in ("L", "1", "LA", "La"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return rgb[..., 0]
    return rgb


def display_pixels(image: bytes | np.ndarray, window: Window = None) -> np.ndarray:
    """Float32 pixels in [0, 1] to show: from PNG/JPEG bytes (scaled by bit depth) or from an
    array (float in [0, 1], or uint8/uint16 scaled by their range), then windowed.

    ``window``: ``(low, high)`` on the [0, 1] scale, ``"auto"`` (0.5-99.5 percentile) or None.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        px = _decode(bytes(image))
    else:
        arr = np.asarray(image)
        if arr.dtype == np.uint8:
            px = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            px = arr.astype(np.float32) / 65535.0
        else:
            px = np.clip(np.nan_to_num(arr.astype(np.float32), nan=0.0), 0, 1)
        if px.ndim == 3 and px.shape[-1] == 1:
            px = px[..., 0]
    if window is None:
        return px
    if isinstance(window, str):
        if window != "auto":
            raise ValueError(f"window must be (low, high), 'auto' or None, got {window!r}")
        lo, hi = (float(v) for v in np.percentile(px, AUTO_PERCENTILES))
    else:
        lo, hi = (float(v) for v in window)
    if hi <= lo:
        return np.where(px > lo, 1.0, 0.0).astype(np.float32)
    return np.clip((px - lo) / (hi - lo), 0, 1).astype(np.float32)


def to_uint8(image: bytes | np.ndarray, window: Window = None) -> np.ndarray:
    """The 8-bit display image (rounded, never clipped from a wider range)."""
    return np.round(display_pixels(image, window) * 255.0).astype(np.uint8)


def display_image(image: bytes | np.ndarray, window: Window = None, max_side: int | None = None):
    """A Pillow image (mode L or RGB) to show, shrunk by area averaging to ``max_side``."""
    from PIL import Image

    px = display_pixels(image, window)
    if max_side and max(px.shape[:2]) > max_side:
        h, w = px.shape[:2]
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        chans = [px] if px.ndim == 2 else [px[..., c] for c in range(px.shape[-1])]
        small = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize(size, Image.Resampling.BOX))
                 for c in chans]
        px = small[0] if px.ndim == 2 else np.stack(small, -1)
    return Image.fromarray(np.round(np.clip(px, 0, 1) * 255.0).astype(np.uint8))


def thumbnail(image: bytes | np.ndarray, side: int = 96, window: Window = None) -> np.ndarray:
    """The display image shrunk to at most ``side`` pixels on its longest side, as uint8."""
    return np.asarray(display_image(image, window, side))


def png_bytes(pixels: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, 3) display image as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def thumbnail_png(image: bytes | np.ndarray, side: int = 96, window: Window = None) -> bytes | None:
    """An 8-bit PNG thumbnail, or None when the bytes are not a readable image."""
    try:
        return png_bytes(thumbnail(image, side, window))
    except Exception:  # noqa: BLE001 - an undecodable image gets no thumbnail
        return None


def sprite(thumbs: np.ndarray | Sequence[np.ndarray], window: Window = None) -> np.ndarray:
    """Equal-sized grayscale thumbnails (N, h, w) tiled row by row into one square uint8 sheet
    (TensorBoard's projector sprite)."""
    thumbs = np.asarray(thumbs)
    n, h, w = thumbs.shape[:3]
    side = int(np.ceil(np.sqrt(n)))
    sheet = np.zeros((side * h, side * w), np.uint8)
    for i in range(n):
        r, c = divmod(i, side)
        img = to_uint8(thumbs[i], window)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = img if img.ndim == 2 else img.mean(-1).round()
    return sheet
