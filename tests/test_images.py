import io

import numpy as np
import pytest
from PIL import Image

from mmclinic import errors, read_image
from mmclinic.data.images import age_band, encode_png, read_frames, resize_pixels, to_png_bytes, window
from mmclinic.data.synth import Finding, Study, to_dicom_bytes, _make_patient, render_frontal


def _one_study():
    import datetime as dt

    rng = np.random.default_rng(0)
    s = Study(patient=_make_patient(rng, 0), index=0, accession="ACC1", study_uid="1.2.3", date=dt.date(2020, 1, 2),
              views=["PA"], findings=[Finding("cardiomegaly")])
    s.referring = "Ann Example"
    return s


def test_monochrome1_is_inverted_to_match_monochrome2(tmp_path):
    s = _one_study()
    pix = render_frontal(s.findings, np.random.default_rng(1), 64)
    (tmp_path / "m1.dcm").write_bytes(to_dicom_bytes(s, 0, pix, 0, monochrome1=True))
    (tmp_path / "m2.dcm").write_bytes(to_dicom_bytes(s, 0, pix, 0, monochrome1=False))
    a, b = read_image(tmp_path / "m1.dcm"), read_image(tmp_path / "m2.dcm")
    assert a.meta["photometric"] == "MONOCHROME1" and b.meta["photometric"] == "MONOCHROME2"
    # Windows differ slightly (percentiles of complemented values); content must agree.
    assert np.corrcoef(a.pixels.ravel(), b.pixels.ravel())[0, 1] > 0.98
    # Air outside the body is dark, the spine bright, in both.
    for r in (a, b):
        assert r.pixels[2, 2] < 0.2 and r.pixels[40, 32] > 0.7
    assert "PatientName" not in a.meta and all("Example" not in str(v) for v in a.meta.values())


def test_window_linear_matches_standard():
    # PS3.3 C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> min; x > c - 0.5 + (w-1)/2 -> max.
    out = window(np.array([-1.0, 0.0, 49.5, 100.0]), center=50, width=101)
    # float32 arithmetic: exact to well below one 16-bit display level (1.5e-5)
    assert out[0] == 0.0 and out[1] == pytest.approx(0.005, abs=1e-6) and out[2] == pytest.approx(0.5) and out[3] == 1.0


def test_real_pydicom_file():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    rec = read_image(path)
    assert rec.pixels.shape == (128, 128) and 0 <= rec.pixels.min() and rec.pixels.max() <= 1
    assert rec.meta["modality"] == "CT"


def test_bad_inputs_raise_typed_errors(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(errors.NotDicom):
        read_image(tmp_path / "x.txt")
    s = _one_study()
    data = to_dicom_bytes(s, 0, render_frontal([], np.random.default_rng(0), 64), 0, False)
    (tmp_path / "t.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises((errors.TruncatedFile, errors.CorruptImage)):
        read_image(tmp_path / "t.dcm")
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(errors.CorruptImage):
        read_image(tmp_path / "c.png")
    (tmp_path / "whole.dcm").write_bytes(data)
    with pytest.raises(errors.PixelBudgetExceeded):
        read_image(tmp_path / "whole.dcm", pixel_budget=100)


def test_png_8_and_16_bit(tmp_path):
    arr16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "a.png")
    Image.fromarray((arr16 // 257).astype(np.uint8)).save(tmp_path / "b.png")
    a, b = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png")
    assert abs(a.pixels.max() - 1) < 1e-6 and np.abs(a.pixels - b.pixels).max() < 1 / 255 + 1e-6
    png = to_png_bytes(a.pixels, max_side=32)
    assert Image.open(io.BytesIO(png)).size == (32, 32)


def test_png_encoder_round_trips_through_pillow_exactly():
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 65536, (37, 53)).astype(np.uint16),  # odd sizes: row padding must be right
                rng.integers(0, 256, (37, 53, 3)).astype(np.uint8),
                rng.integers(0, 256, (5, 7)).astype(np.uint8),
                np.zeros((1, 1), np.uint16),
                np.arange(35, dtype=np.uint16).reshape(5, 7).T,  # a transposed view
                np.asfortranarray(rng.integers(0, 65536, (6, 9)).astype(np.uint16)),
                rng.integers(0, 256, (8, 6, 3)).astype(np.uint8)[::-1, ::2]):  # strided, flipped
        back = Image.open(io.BytesIO(encode_png(arr)))
        back.load()  # decodes every chunk: CRCs and the deflate stream are checked
        assert np.array_equal(np.asarray(back).astype(arr.dtype), arr), arr.shape
    with pytest.raises(ValueError, match="uint16"):
        encode_png(np.zeros((4, 4), np.float32))
    colour = to_png_bytes(rng.random((64, 64, 3), dtype=np.float32), max_side=32)
    assert Image.open(io.BytesIO(colour)).mode == "RGB"


@pytest.mark.parametrize("shape", [(1024, 1024), (1024, 768), (2048, 1536), (1000, 1000), (300, 200)])
def test_resize_matches_pillow_box_filter(shape):
    """Whole factors take Image.reduce; the result must equal the BOX filter's either way."""
    a = np.random.default_rng(1).random(shape, dtype=np.float32)
    scale = 256 / max(shape)
    size = (max(1, round(shape[1] * scale)), max(1, round(shape[0] * scale)))
    ref = np.asarray(Image.fromarray(a, mode="F").resize(size, Image.Resampling.BOX))
    out = resize_pixels(a, 256)
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-6
    rgb = resize_pixels(np.stack([a, 1 - a, a * 0.5], -1), 256)
    assert rgb.shape == (*ref.shape, 3) and np.abs(rgb[..., 1] - (1 - ref)).max() < 1e-6


def test_age_band_groups_over_89():
    assert age_band("093Y") == "90+" and age_band("045Y") == "40-49" and age_band("") == "unknown"


# --------------------------------------------------------------------------- PNG / JPEG


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour); ``rows=None`` gives a header only."""
    import struct
    import zlib

    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type,
                                                                  0, 0, 0))
    body = _png_chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
    return head + body + _png_chunk(b"IEND", b"")


def test_png_16_bit_keeps_precision_and_is_scaled_min_max(tmp_path):
    arr = (np.arange(64 * 64).reshape(64, 64) % 3901 + 100).astype(np.uint16)  # 12-bit data, 100..4000
    Image.fromarray(arr).save(tmp_path / "twelve.png")
    rec = read_image(tmp_path / "twelve.png")
    assert rec.pixels.dtype == np.float32 and rec.pixels.shape == (64, 64)
    np.testing.assert_allclose(rec.pixels, (arr - 100.0) / 3900.0, atol=1e-6)
    assert len(np.unique(rec.pixels)) == 3901  # more levels than 8 bits could hold
    assert rec.meta["bits_stored"] == 16 and rec.meta["voi_source"] == "min_max"
    assert rec.meta["source_format"] == "png" and rec.meta["photometric"] == "MONOCHROME2"
    Image.fromarray(np.full((8, 8), 700, np.uint16)).save(tmp_path / "flat.png")
    assert read_image(tmp_path / "flat.png").pixels.max() == 0.0  # constant: no range to scale


def test_png_8_bit_grey_alpha_palette_and_bilevel(tmp_path):
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))
    Image.fromarray(grey).save(tmp_path / "l.png")
    a = read_image(tmp_path / "l.png")
    np.testing.assert_array_equal(a.pixels, grey / np.float32(255))
    assert a.meta["bits_stored"] == 8 and a.meta["voi_source"] == "bit_depth"
    alpha = np.zeros_like(grey)  # fully transparent: alpha is dropped, not composited
    Image.fromarray(np.stack([grey, alpha], -1), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png").pixels, a.pixels)
    Image.fromarray(np.stack([grey, grey, grey, alpha], -1), mode="RGBA").save(tmp_path / "grey_rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "grey_rgba.png").pixels, a.pixels)  # grey: 2-D
    colour = np.stack([grey, 255 - grey, np.full_like(grey, 7)], -1)
    Image.fromarray(np.concatenate([colour, alpha[..., None]], -1), mode="RGBA").save(tmp_path / "rgba.png")
    rgba = read_image(tmp_path / "rgba.png")
    assert rgba.pixels.shape == (16, 64, 3) and rgba.meta["photometric"] == "RGB"
    np.testing.assert_array_equal(rgba.pixels, colour / np.float32(255))
    Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(tmp_path / "p.png")
    pal = read_image(tmp_path / "p.png")
    assert pal.pixels.shape == (16, 64, 3) and np.abs(pal.pixels - colour / 255).mean() < 0.03
    Image.fromarray(grey > 127).save(tmp_path / "bilevel.png")
    np.testing.assert_array_equal(read_image(tmp_path / "bilevel.png").pixels, (grey > 127).astype(np.float32))


def test_png_16_bit_colour_is_read_at_8_bits(tmp_path):
    rgb16 = np.zeros((4, 5, 3), np.uint16)
    rgb16[..., 0] = 65535
    rgb16[..., 1] = np.arange(5) * 10000
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    (tmp_path / "rgb16.png").write_bytes(_raw_png(5, 4, 16, 2, rows))
    rec = read_image(tmp_path / "rgb16.png")
    assert rec.pixels.shape == (4, 5, 3)  # Pillow has no 16-bit colour mode: 8-bit precision
    assert np.abs(rec.pixels - rgb16 / 65535).max() <= 1 / 255 + 1e-6


def test_jpeg_grey_and_colour(tmp_path):
    yy, xx = np.mgrid[0:64, 0:64]
    grey = (xx * 4).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    g = read_image(tmp_path / "g.jpg")
    assert g.pixels.shape == (64, 64) and g.meta["source_format"] == "jpeg"
    assert np.abs(g.pixels - grey / 255).mean() < 0.01
    colour = np.stack([xx * 4, yy * 4, 255 - xx * 4], -1).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "c.jpeg", quality=95)
    c = read_image(tmp_path / "c.jpeg")
    assert c.pixels.shape == (64, 64, 3) and np.abs(c.pixels - colour / 255).mean() < 0.02
    frames = read_frames(tmp_path / "c.jpeg")
    assert len(frames) == 1 and frames[0].meta["n_frames"] == 1 and frames[0].meta["frame"] == 0
    with pytest.raises(errors.UsageError):
        read_image(tmp_path / "c.jpeg", frame=1)


def test_truncated_or_corrupt_png_and_jpeg_raise_corrupt_image(tmp_path):
    arr = (np.random.default_rng(0).random((128, 128)) * 65535).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "full.png")
    Image.fromarray((arr >> 8).astype(np.uint8)).save(tmp_path / "full.jpg", quality=90)
    for name in ("full.png", "full.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(errors.CorruptImage, match=f"cut_{name}"):
            read_image(tmp_path / f"cut_{name}")
    data = bytearray((tmp_path / "full.png").read_bytes())
    data[60:80] = b"\xff" * 20  # inside the compressed data: bad CRC / bad stream
    (tmp_path / "bits.png").write_bytes(bytes(data))
    with pytest.raises(errors.CorruptImage, match="bits.png"):
        read_image(tmp_path / "bits.png")


def test_raster_pixel_budget_checked_from_the_header(tmp_path, monkeypatch):
    from PIL import ImageFile

    Image.fromarray(np.zeros((30, 40), np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "rgb.png")
    assert read_image(tmp_path / "a16.png", pixel_budget=30 * 40 * 2).pixels.shape == (30, 40)

    def no_load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with pytest.raises(errors.PixelBudgetExceeded, match="a16.png"):
        read_image(tmp_path / "a16.png", pixel_budget=30 * 40 * 2 - 1)
    with pytest.raises(errors.PixelBudgetExceeded, match="rgb.png"):
        read_image(tmp_path / "rgb.png", pixel_budget=30 * 40 * 3 - 1)


def test_png_header_beyond_pillow_bomb_limit_is_a_budget_error(tmp_path):
    (tmp_path / "huge.png").write_bytes(_raw_png(20000, 20000, 8, 0, None))  # 400 M pixels, no data
    with pytest.raises(errors.PixelBudgetExceeded, match="huge.png"):
        read_image(tmp_path / "huge.png")
    with pytest.raises(errors.PixelBudgetExceeded, match="huge.png"):
        read_image(tmp_path / "huge.png", pixel_budget=1000)


# --------------------------------------------------------------------------- time box (decode pool workers)


def test_time_boxed_read_matches_in_process_read_and_reuses_a_warm_worker(tmp_path):
    import os

    from mmclinic.data.images import run_with_timeout

    Image.fromarray((np.random.default_rng(0).random((30, 40)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    boxed, plain = read_image(tmp_path / "a.png", decode_timeout=30), read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(boxed.pixels, plain.pixels)
    assert boxed.meta == plain.meta
    with pytest.raises(errors.NotDicom, match="x.txt"):
        (tmp_path / "x.txt").write_text("not an image")
        read_image(tmp_path / "x.txt", decode_timeout=30)
    first, second = run_with_timeout(os.getpid, (), 30), run_with_timeout(os.getpid, (), 30)
    assert first == second != os.getpid()  # one worker process, kept between calls


def test_time_boxed_read_gives_ingest_reason_codes_for_a_stuck_or_dying_decoder():
    import os
    import time

    from mmclinic.data.images import run_with_timeout

    start = time.monotonic()
    with pytest.raises(errors.DecodeTimeout, match="slow.png") as info:
        run_with_timeout(time.sleep, (30,), 0.5, name="slow.png")
    assert info.value.reason_code == "decode_timeout" and time.monotonic() - start < 10
    with pytest.raises(errors.CorruptImage, match="crash.png") as info:
        run_with_timeout(os._exit, (3,), 30, name="crash.png")
    assert info.value.reason_code == "decoder_crash"
    assert run_with_timeout(os.getpid, (), 30) != os.getpid()  # a fresh worker took over
    with pytest.raises(errors.UsageError, match="module-level function"):
        run_with_timeout(lambda: 1, (), 30)
    with pytest.raises(errors.UsageError, match="decode_timeout"):
        run_with_timeout(os.getpid, (), 0)
