"""The one display conversion: stored PNGs of any bit depth to 8-bit pictures, thumbnails, sprite."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmclinic.data.images import encode_png, to_png_bytes
from mmclinic.display import display_pixels, sprite, thumbnail, thumbnail_png, to_uint8


def _radiograph(size: int = 128) -> np.ndarray:
    """A dark background with a bright disc and a gradient: float pixels in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    px = 0.1 + 0.3 * xx
    px[(yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.09] = 0.8
    return px.astype(np.float32)


def test_thumbnail_matches_its_sixteen_bit_source():
    """A stored 16-bit PNG (as ingest writes it) gives a thumbnail equal to its source image,
    shrunk: not clipped to white (values above 255 of 65535) as an 8-bit conversion would."""
    src = _radiograph(128)
    stored = to_png_bytes(src)
    assert Image.open(io.BytesIO(stored)).mode.startswith("I;16")
    thumb = Image.open(io.BytesIO(thumbnail_png(stored, 64)))
    assert thumb.mode == "L" and thumb.size == (64, 64)
    expected = src.reshape(64, 2, 64, 2).mean((1, 3)) * 255
    got = np.asarray(thumb, dtype=np.float64)
    assert np.abs(got - expected).max() <= 1.0
    assert got.min() < 40 and (got >= 250).mean() < 0.01  # the background stays dark


@pytest.mark.parametrize("bits", [8, 16])
def test_bit_depths_scale_to_the_same_picture(bits):
    src = _radiograph(32)
    arr = np.round(src * (2 ** bits - 1)).astype(np.uint8 if bits == 8 else np.uint16)
    out = to_uint8(encode_png(arr))
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - np.round(src * 255)).max() <= 1


def test_rgb_and_arrays_and_jpeg():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    assert to_uint8(encode_png(rgb)).shape == (8, 8, 3)
    assert to_uint8(np.full((4, 4), 0.5, np.float32)).max() == 128
    assert to_uint8(np.full((4, 4), 65535, np.uint16)).min() == 255
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(buf, format="JPEG")
    assert abs(int(to_uint8(buf.getvalue()).mean()) - 100) <= 2
    assert thumbnail_png(b"not an image") is None


def test_window_stretches_and_auto_uses_percentiles():
    px = np.linspace(0.2, 0.4, 100, dtype=np.float32).reshape(10, 10)
    win = display_pixels(px, (0.2, 0.4))
    assert win.min() == 0 and win.max() == 1
    auto = to_uint8(px, "auto")
    assert auto.min() == 0 and auto.max() == 255
    with pytest.raises(ValueError, match="window"):
        display_pixels(px, "bone")


def test_thumbnail_keeps_aspect_and_sprite_tiles():
    assert thumbnail(np.zeros((40, 80), np.float32), 20).shape == (10, 20)
    thumbs = np.stack([np.full((4, 4), i / 4, np.float32) for i in range(5)])
    sheet = sprite(thumbs)
    assert sheet.shape == (12, 12) and sheet[0, 4] == round(0.25 * 255) and sheet[4, 4] == 255
