import io

import numpy as np
import pytest
from PIL import Image

from mmclinic import errors, read_image
from mmclinic.data.images import age_band, to_png_bytes, window
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
    assert out[0] == 0.0 and out[1] == pytest.approx(0.005) and out[2] == pytest.approx(0.5) and out[3] == 1.0


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
    with pytest.raises(errors.PixelBudgetExceeded):
        read_image(tmp_path / "t.dcm", pixel_budget=100)


def test_png_8_and_16_bit(tmp_path):
    arr16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "a.png")
    Image.fromarray((arr16 // 257).astype(np.uint8)).save(tmp_path / "b.png")
    a, b = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png")
    assert abs(a.pixels.max() - 1) < 1e-6 and np.abs(a.pixels - b.pixels).max() < 1 / 255 + 1e-6
    png = to_png_bytes(a.pixels, max_side=32)
    assert Image.open(io.BytesIO(png)).size == (32, 32)


def test_age_band_groups_over_89():
    assert age_band("093Y") == "90+" and age_band("045Y") == "40-49" and age_band("") == "unknown"
