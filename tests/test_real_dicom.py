"""The image reader on real DICOM files: pydicom's bundled test files and the pydicom-data package.

Each compressed file is compared with its uncompressed counterpart: exactly for lossless
codecs, approximately for lossy ones. No TensorFlow here; the whole module runs in seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from mmclinic import errors
from mmclinic.data import images
from mmclinic.data.images import (DEFAULT_PIXEL_BUDGET, decode_dicom_frames, open_dicom, percentile_window,
                                  read_frames, read_image, run_with_timeout, window)

pydicom = pytest.importorskip("pydicom")

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
MPEG2 = "1.2.840.10008.1.2.4.100"


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def real(name: str) -> Path:
    """A file shipped with pydicom or the pydicom-data package; skip the test when it is absent."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is neither bundled with pydicom nor installed by the pydicom-data package")
    return Path(path)


def raw_frames(path: Path) -> np.ndarray:
    """Stored values as pydicom decodes them, without any display transform."""
    return pydicom.dcmread(path).pixel_array


def assert_close(a: np.ndarray, b: np.ndarray, mean_tol: float, max_tol: float) -> None:
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    assert diff.mean() < mean_tol and diff.max() < max_tol, (diff.mean(), diff.max())


# --------------------------------------------------------------------------- chest CR, MONOCHROME1


def test_chest_cr_monochrome1_jpeg2000_matches_uncompressed():
    unc = read_image(real("RG1_UNCR.dcm"))
    j2kr = read_image(real("RG1_J2KR.dcm"))  # JPEG 2000 lossless
    j2ki = read_image(real("RG1_J2KI.dcm"))  # JPEG 2000 (lossy)
    assert j2kr.meta["transfer_syntax"] == JPEG_2000_LOSSLESS and j2ki.meta["transfer_syntax"] == JPEG_2000
    for rec in (unc, j2kr, j2ki):
        assert rec.pixels.shape == (1955, 1841) and rec.pixels.dtype == np.float32
        assert rec.meta["photometric"] == "MONOCHROME1" and rec.meta["modality"] == "CR"
        assert rec.meta["body_part"] == "CHEST" and rec.meta["voi_source"] == "window"
    np.testing.assert_array_equal(unc.pixels, j2kr.pixels)
    assert np.corrcoef(unc.pixels.ravel(), j2ki.pixels.ravel())[0, 1] > 0.99
    assert_close(unc.pixels, j2ki.pixels, mean_tol=0.005, max_tol=0.1)


def test_chest_cr_monochrome1_is_inverted_air_dark_mediastinum_bright():
    path = real("RG1_UNCR.dcm")
    pixels = read_image(path).pixels
    stored = raw_frames(path).astype(np.float64)
    h, w = pixels.shape

    def lungs(a):
        return np.concatenate([a[h // 8:h // 2, w // 4:3 * w // 8].ravel(), a[h // 8:h // 2, 5 * w // 8:3 * w // 4].ravel()])

    def mediastinum(a):
        return a[h // 8:5 * h // 8, 7 * w // 16:9 * w // 16]

    def top_corners(a):  # air above the shoulders
        return np.concatenate([a[:h // 16, :w // 16].ravel(), a[:h // 16, -w // 16:].ravel()])

    # Stored MONOCHROME1 values are high where little was absorbed (air, lungs) ...
    assert stored[h // 8:h // 2, w // 4:3 * w // 8].mean() > mediastinum(stored).mean()
    # ... and the display-ready pixels have air dark, mediastinum and spine bright.
    assert mediastinum(pixels).mean() > lungs(pixels).mean() + 0.15
    assert mediastinum(pixels).mean() > top_corners(pixels).mean() + 0.3
    # The file's window (WindowCenter/WindowWidth) was applied, then inverted.
    ds = pydicom.dcmread(path)
    expected = 1.0 - window(stored, float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(pixels, expected, atol=1e-6)


# --------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("reference, compressed, syntax", [
    ("MR_small.dcm", "MR_small_jp2klossless.dcm", JPEG_2000_LOSSLESS),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", JPEG_LS_LOSSLESS),
    ("MR_small.dcm", "MR_small_RLE.dcm", RLE_LOSSLESS),
    ("MR_small.dcm", "MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ("MR_small.dcm", "MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm", JPEG_LOSSLESS_SV1),  # JPEG Lossless, Process 14 SV1
    ("SC_rgb.dcm", "SC_rgb_rle.dcm", RLE_LOSSLESS),
    ("SC_rgb.dcm", "SC_rgb_gdcm_KY.dcm", JPEG_2000),
    ("693_UNCR.dcm", "693_J2KR.dcm", JPEG_2000_LOSSLESS),  # signed CT, BitsStored 14 -> 16 in J2K
    ("US1_UNCR.dcm", "US1_J2KR.dcm", JPEG_2000_LOSSLESS),  # ultrasound, YBR_RCT -> RGB
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm", JPEG_2000_LOSSLESS),
])
def test_lossless_codecs_match_uncompressed_exactly(reference, compressed, syntax):
    ref, rec = read_image(real(reference)), read_image(real(compressed))
    assert rec.meta["transfer_syntax"] == syntax
    np.testing.assert_array_equal(ref.pixels, rec.pixels)
    assert rec.pixels.min() >= 0 and rec.pixels.max() <= 1 and rec.pixels.std() > 0.05


def test_jpeg_lossless_process14_grayscale_decodes():
    rec = read_image(real("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert rec.meta["transfer_syntax"] == JPEG_LOSSLESS_SV1
    assert rec.pixels.shape == (768, 1024) and rec.meta["voi_source"] == "window"
    stored = raw_frames(real("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert np.corrcoef(stored.ravel(), rec.pixels.ravel())[0, 1] > 0.95


@pytest.mark.parametrize("lossy", [
    "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG Baseline, RGB components
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline, YBR_FULL
    "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # JPEG Baseline, YBR_FULL_422
    "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless
    "US1_J2KI.dcm",  # JPEG 2000 lossy, YBR_ICT
])
def test_lossy_codecs_agree_approximately(lossy):
    reference = "US1_UNCR.dcm" if lossy.startswith("US1") else "SC_rgb.dcm"
    ref, rec = read_image(real(reference)), read_image(real(lossy))
    assert rec.pixels.shape == ref.pixels.shape and rec.pixels.ndim == 3
    assert_close(rec.pixels, ref.pixels, mean_tol=0.01, max_tol=0.5)
    assert np.corrcoef(ref.pixels.ravel(), rec.pixels.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("name", ["SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm"])
def test_ybr_is_converted_to_rgb_exactly_once(name):
    from pydicom.pixels import convert_color_space, pixel_array

    ref = read_image(real("SC_rgb.dcm")).pixels
    rec = read_image(real(name))
    assert rec.meta["photometric"].startswith("YBR_FULL")
    assert_close(rec.pixels, ref, mean_tol=3 / 255, max_tol=7 / 255)
    # Not converting, or converting a second time, is far off.
    unconverted = pixel_array(real(name), raw=True).astype(np.float32) / 255
    twice = convert_color_space(np.round(rec.pixels * 255).astype(np.uint8), "YBR_FULL", "RGB") / 255.0
    for wrong in (unconverted, twice):
        assert np.abs(wrong - ref).mean() > 0.05


def test_planar_configuration_and_rgb_ultrasound():
    px, pl = read_image(real("color-px.dcm")), read_image(real("color-pl.dcm"))
    assert pydicom.dcmread(real("color-pl.dcm")).PlanarConfiguration == 1
    assert px.meta["modality"] == "US" and px.pixels.shape == (120, 256, 3)
    np.testing.assert_array_equal(px.pixels, pl.pixels)
    # 8-, 16- and 32-bit RGB scale to the same picture
    rgb8 = read_image(real("SC_rgb.dcm")).pixels
    for name in ("SC_rgb_16bit.dcm", "SC_rgb_32bit.dcm"):
        assert_close(read_image(real(name)).pixels, rgb8, mean_tol=1e-3, max_tol=1e-2)


def test_palette_colour_ultrasound_all_encodings_agree():
    ref = read_image(real("OBXXXX1A.dcm"))
    assert ref.meta["photometric"] == "PALETTE COLOR" and ref.pixels.shape == (600, 800, 3)
    assert ref.meta["voi_source"] == "palette" and ref.pixels.mean() > 0.02
    for other in ("OBXXXX1A_rle.dcm", "OBXXXX1A_expb.dcm"):  # big endian: 16-bit LUT data byte order
        np.testing.assert_array_equal(read_image(real(other)).pixels, ref.pixels)
    seg_le, seg_be = read_image(real("gdcm-US-ALOKA-16.dcm")), read_image(real("gdcm-US-ALOKA-16_big.dcm"))
    np.testing.assert_array_equal(seg_le.pixels, seg_be.pixels)  # segmented palette
    assert seg_le.pixels.shape == (480, 640, 3) and seg_le.pixels.max() > 0.5


# --------------------------------------------------------------------------- LUTs, rescale, bits


def test_signed_ct_rescale_then_window():
    for name in ("693_UNCR.dcm", "CT_small.dcm"):
        path = real(name)
        ds = pydicom.dcmread(path)
        assert ds.PixelRepresentation == 1
        stored = ds.pixel_array
        assert np.issubdtype(stored.dtype, np.signedinteger)
        hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        rec = read_image(path)
        assert rec.meta["modality"] == "CT"
        if "WindowCenter" in ds:
            expected = window(hu, float(ds.WindowCenter), float(ds.WindowWidth))
            assert rec.meta["voi_source"] == "window"
        else:
            expected = percentile_window(hu)
            assert rec.meta["voi_source"] == "percentile"
        np.testing.assert_allclose(rec.pixels, expected, atol=1e-6)
    # 693_UNCR: soft-tissue window 40/100 on HU; without the intercept most pixels would be white
    rec = read_image(real("693_UNCR.dcm"))
    assert 0.05 < rec.pixels.mean() < 0.5


def test_bits_stored_ignores_garbage_in_unused_high_bits(tmp_path):
    path = real("693_UNCR.dcm")  # BitsAllocated 16, BitsStored 14, signed
    ds = pydicom.dcmread(path)
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 14, 1)
    stored = ds.pixel_array.astype(np.int32)
    dirty = ((stored & 0x3FFF) | 0x4000).astype(np.uint16)  # bits 14-15 = 01: not part of the value
    ds.PixelData = dirty.tobytes()
    ds.save_as(tmp_path / "dirty.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "dirty.dcm").pixels, read_image(path).pixels)


def test_voi_lut_and_modality_lut_sequences():
    vpath = real("vlut_04.dcm")
    vds = pydicom.dcmread(vpath)
    rec = read_image(vpath)
    assert rec.meta["voi_source"] == "voi_lut"
    item = vds.VOILUTSequence[0]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    index = np.clip(vds.pixel_array.astype(int) - int(item.LUTDescriptor[1]), 0, len(lut) - 1)
    np.testing.assert_allclose(rec.pixels, lut[index] / (2 ** int(item.LUTDescriptor[2]) - 1), atol=1e-6)

    mpath = real("mlut_18.dcm")
    mds = pydicom.dcmread(mpath)
    item = mds.ModalityLUTSequence[0]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    index = np.clip(mds.pixel_array.astype(int) - int(item.LUTDescriptor[1]), 0, len(lut) - 1)
    np.testing.assert_allclose(read_image(mpath).pixels, percentile_window(lut[index]), atol=1e-6)


def test_enhanced_ct_takes_rescale_and_window_from_functional_groups():
    path = real("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds and "WindowCenter" not in ds
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform, voi = shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]
    records = read_frames(path)
    assert [r.meta["frame"] for r in records] == [0, 1] and records[0].meta["voi_source"] == "window"
    for rec, stored in zip(records, ds.pixel_array, strict=True):
        hu = stored * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
        np.testing.assert_allclose(rec.pixels, window(hu, float(voi.WindowCenter), float(voi.WindowWidth)),
                                   atol=1e-6)
    assert records[0].meta["pixel_spacing"] == pytest.approx([0.388672, 0.388672])


# --------------------------------------------------------------------------- multi-frame


def test_multi_frame_policies():
    path = real("emri_small.dcm")  # 10 frames of 64 x 64 MR
    stored = raw_frames(path)
    frames = read_frames(path)
    assert len(frames) == 10
    assert [r.meta["frame"] for r in frames] == list(range(10))
    assert all(r.meta["n_frames"] == 10 and r.meta["frames"] == 10 for r in frames)
    for rec, s in zip(frames, stored, strict=True):
        np.testing.assert_allclose(rec.pixels, percentile_window(s.astype(np.float64)), atol=1e-6)
    assert not np.array_equal(frames[0].pixels, frames[5].pixels)

    first, middle = read_image(path), read_image(path, frame_policy="middle")
    assert first.meta["frame"] == 0 and middle.meta["frame"] == 5
    np.testing.assert_array_equal(first.pixels, frames[0].pixels)
    np.testing.assert_array_equal(middle.pixels, frames[5].pixels)
    np.testing.assert_array_equal(read_image(path, frame=7).pixels, frames[7].pixels)
    assert [r.meta["frame"] for r in read_frames(path, frame_policy="middle")] == [5]

    with pytest.raises(errors.UnsupportedPixelFormat, match="NumberOfFrames"):
        read_image(path, frame_policy="reject")
    with pytest.raises(errors.UnsupportedPixelFormat):
        read_frames(path, frame_policy="reject")
    with pytest.raises(errors.UsageError, match="read_frames"):
        read_image(path, frame_policy="all")
    with pytest.raises(errors.UsageError):
        read_image(path, frame=10)
    with pytest.raises(errors.UsageError):
        read_image(path, frame_policy="last")
    # A single-frame file is one record under every policy.
    single = read_frames(real("MR_small.dcm"), frame_policy="reject")
    assert len(single) == 1 and single[0].meta["n_frames"] == 1


@pytest.mark.parametrize("reference, compressed", [
    ("emri_small.dcm", "emri_small_RLE.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
    ("SC_rgb_2frame.dcm", "SC_rgb_rle_2frame.dcm"),
])
def test_multi_frame_compressed_matches_uncompressed(reference, compressed):
    ref, rec = read_frames(real(reference)), read_frames(real(compressed))
    assert len(ref) == len(rec) > 1
    for a, b in zip(ref, rec, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)


def test_multi_frame_jpeg_baseline_ybr_ultrasound_middle_frame():
    path = real("color3d_jpeg_baseline.dcm")  # 120 frames, YBR_FULL_422, JPEG Baseline
    rec = read_image(path, frame_policy="middle")
    assert rec.meta["frame"] == 60 and rec.meta["n_frames"] == 120 and rec.meta["transfer_syntax"] == JPEG_BASELINE
    assert rec.pixels.shape == (480, 640, 3)
    ds = pydicom.dcmread(path)
    ds_frames = decode_dicom_frames(ds, path, frame_policy="middle")
    np.testing.assert_array_equal(ds_frames[0].pixels, rec.pixels)


# --------------------------------------------------------------------------- rejected before decoding


def _forbid_decoding(monkeypatch):
    import pydicom.pixels

    def boom(*args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(pydicom.pixels, "get_decoder", boom)


def _with_transfer_syntax(src: Path, dst: Path, uid: str) -> Path:
    """Copy ``src`` with only its file meta TransferSyntaxUID changed (dataset bytes untouched)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info

    with open(src, "rb") as fh:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        body = fh.read()
    meta.TransferSyntaxUID = uid
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    dst.write_bytes(b"\x00" * 128 + b"DICM" + buf.getvalue() + body)
    return dst


@pytest.mark.parametrize("uid, name", [(MPEG2, "MPEG2"), ("1.2.840.10008.1.2.4.201", "High-Throughput JPEG 2000"),
                                       ("1.2.3.4.5", "unknown")])
def test_unsupported_transfer_syntax_rejected_with_its_uid(tmp_path, monkeypatch, uid, name):
    path = _with_transfer_syntax(real("MR_small.dcm"), tmp_path / "mpeg.dcm", uid)
    _forbid_decoding(monkeypatch)
    with pytest.raises(errors.UnsupportedTransferSyntax) as info:
        read_image(path)
    assert uid in str(info.value) and name in str(info.value) and "mpeg.dcm" in str(info.value)
    assert "TransferSyntaxUID (0002,0010)" in str(info.value)
    assert info.value.reason_code == "unsupported_transfer_syntax"


def test_pixel_budget_checked_from_header_before_decoding(monkeypatch):
    path = real("RG1_UNCR.dcm")
    needed = 1955 * 1841 * 2
    _forbid_decoding(monkeypatch)
    with pytest.raises(errors.PixelBudgetExceeded, match="RG1_UNCR.dcm"):
        read_image(path, pixel_budget=needed - 1)
    with pytest.raises(errors.PixelBudgetExceeded):
        read_image(real("RG1_J2KR.dcm"), pixel_budget=needed - 1)
    # NumberOfFrames counts: 10 frames of 64 x 64 x 2 bytes, although one frame is decoded.
    with pytest.raises(errors.PixelBudgetExceeded, match="NumberOfFrames"):
        read_image(real("emri_small.dcm"), pixel_budget=10 * 64 * 64 * 2 - 1)


def test_pixel_budget_boundary_is_inclusive():
    rec = read_image(real("emri_small.dcm"), pixel_budget=10 * 64 * 64 * 2)
    assert rec.pixels.shape == (64, 64)


def test_deflated_dataset_is_inflated_under_a_bound(monkeypatch):
    path = real("image_dfl.dcm")
    assert read_image(path).meta["transfer_syntax"] == "1.2.840.10008.1.2.1.99"
    monkeypatch.setattr(images, "_HEADER_ALLOWANCE", 0)
    with pytest.raises(errors.PixelBudgetExceeded, match="inflates"):
        open_dicom(path, pixel_budget=10_000)


def test_non_dicom_and_no_force_reads(tmp_path):
    (tmp_path / "notes.dcm").write_text("not an image at all, " * 20)
    with pytest.raises(errors.NotDicom, match="notes.dcm"):
        read_image(tmp_path / "notes.dcm")
    with pytest.raises(errors.NotDicom):  # DICOM without preamble and file meta: refused, not forced
        read_image(real("no_meta.dcm"))
    with pytest.raises(errors.MissingImage):
        read_image(tmp_path / "absent.dcm")


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_jp2klossless.dcm", "RG1_J2KR.dcm", "SC_rgb_rle.dcm"])
def test_truncated_dicom_is_a_typed_error(tmp_path, name):
    data = real(name).read_bytes()
    start = data.rindex(b"\xe0\x7f\x10\x00")  # the PixelData (7FE0,0010) tag
    for fraction in (0.01, 0.5, 0.99):  # cut inside the pixel data
        path = tmp_path / f"cut_{name}"
        path.write_bytes(data[: start + int((len(data) - start) * fraction)])
        with pytest.raises(errors.TruncatedFile, match=f"cut_{name}"):
            read_image(path)


def test_real_truncated_and_broken_files():
    with pytest.raises(errors.TruncatedFile, match="MR_truncated.dcm"):
        read_image(real("MR_truncated.dcm"))
    with pytest.raises(errors.TruncatedFile):  # encapsulated pixel data cut short
        read_image(real("emri_small_jpeg_2k_lossless_too_short.dcm"))
    with pytest.raises(errors.CorruptImage, match=r"JPEG-lossy.dcm: PixelData \(7FE0,0010\)"):
        read_image(real("JPEG-lossy.dcm"))  # a codestream the installed decoders refuse


def test_no_pixel_data(tmp_path):
    with pytest.raises(errors.NoPixelData, match="rtplan.dcm"):
        read_image(real("rtplan.dcm"))
    ds = pydicom.dcmread(real("MR_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(errors.NoPixelData, match=r"PixelData \(7FE0,0010\)"):
        read_image(tmp_path / "nopix.dcm")


def test_messages_name_the_tag_never_patient_data(tmp_path):
    ds = pydicom.dcmread(real("MR_small.dcm"))
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN12345"
    ds.BitsStored = 17  # more than BitsAllocated
    ds.save_as(tmp_path / "bad.dcm")
    with pytest.raises(errors.UnsupportedPixelFormat) as info:
        read_image(tmp_path / "bad.dcm")
    text = str(info.value)
    assert "bad.dcm" in text and "BitsStored (0028,0101)" in text
    assert "Doe" not in text and "MRN" not in text and "17" not in text
    ds = pydicom.dcmread(real("MR_small.dcm"))
    ds.PatientName = "Doe^Jane"
    ds.PhotometricInterpretation = "Doe^Jane"
    ds.save_as(tmp_path / "pi.dcm")
    with pytest.raises(errors.UnsupportedPixelFormat) as info:
        read_image(tmp_path / "pi.dcm")
    assert "PhotometricInterpretation (0028,0004)" in str(info.value) and "Doe" not in str(info.value)


# --------------------------------------------------------------------------- metadata


def test_metadata_pixel_spacing_and_burned_in_annotation(tmp_path):
    mr = read_image(real("MR_small.dcm")).meta
    assert mr["pixel_spacing"] == pytest.approx([0.3125, 0.3125]) and mr["burned_in_annotation"] == ""
    assert mr["modality"] == "MR" and mr["photometric"] == "MONOCHROME2" and mr["bits_stored"] == 16
    assert read_image(real("JPGLosslessP14SV1_1s_1f_8b.dcm")).meta["burned_in_annotation"] == "NO"

    ds = pydicom.dcmread(real("CT_small.dcm"))
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.2, 0.3]
    ds.BurnedInAnnotation = "YES"
    ds.ViewPosition, ds.ImageLaterality, ds.Manufacturer = "PA", "L", "Acme"
    ds.save_as(tmp_path / "meta.dcm")
    meta = read_image(tmp_path / "meta.dcm").meta
    assert meta["pixel_spacing"] == pytest.approx([0.2, 0.3]) and meta["burned_in_annotation"] == "YES"
    assert (meta["view"], meta["laterality"], meta["manufacturer"]) == ("PA", "L", "Acme")
    assert "PatientName" not in meta and "PatientID" not in meta
    assert not any(str(ds.PatientName) in str(v) for v in meta.values())
    for key in ("modality", "view", "laterality", "body_part", "manufacturer", "photometric", "pixel_spacing", "sex",
                "age_band", "bits_stored", "burned_in_annotation", "rows", "columns", "frames", "n_frames", "frame",
                "transfer_syntax", "source_format"):
        assert key in meta


# --------------------------------------------------------------------------- time box


def _sleep_then_return(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def _raise_input_error(name: str) -> None:
    raise errors.NoPixelData(f"{name}: no PixelData (7FE0,0010) element", reason_code="no_pixel_data")


def _die() -> None:
    os._exit(3)


def test_run_with_timeout_stops_a_slow_call():
    start = time.monotonic()
    with pytest.raises(errors.DecodeTimeout, match="slow.dcm") as info:
        run_with_timeout(_sleep_then_return, (5,), 0.5, name="slow.dcm")
    assert time.monotonic() - start < 3
    assert info.value.reason_code == "decode_timeout" and isinstance(info.value, errors.InputError)
    assert not multiprocessing.active_children()  # the child was terminated and reaped


def test_run_with_timeout_returns_results_and_errors():
    assert run_with_timeout(_sleep_then_return, (0,), 10) == "done"
    assert run_with_timeout(_sleep_then_return, (0,), None) == "done"  # None: in this process
    with pytest.raises(errors.NoPixelData, match="x.dcm") as info:
        run_with_timeout(_raise_input_error, ("x.dcm",), 10)
    assert info.value.reason_code == "no_pixel_data"
    with pytest.raises(errors.CorruptImage, match="crash.dcm"):
        run_with_timeout(_die, (), 10, name="crash.dcm")
    with pytest.raises(errors.UsageError):
        run_with_timeout(_die, (), 0)


def test_decode_timeout_option_reads_in_a_child_process():
    path = real("MR_small_jpeg_ls_lossless.dcm")
    boxed = read_image(path, decode_timeout=30)
    np.testing.assert_array_equal(boxed.pixels, read_image(path).pixels)
    assert boxed.meta == read_image(path).meta
    assert len(read_frames(real("emri_small_RLE.dcm"), decode_timeout=30)) == 10
    with pytest.raises(errors.NotDicom):
        read_image(Path(__file__), decode_timeout=30)
    assert images.DEFAULT_DECODE_TIMEOUT == 60 and DEFAULT_PIXEL_BUDGET == 1 << 30
