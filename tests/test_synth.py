import csv
import hashlib

import numpy as np
import pydicom

from mmclinic.data.synth import render_frontal, Finding, synthesize


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    synthesize(tmp_path / "a", patients=4, seed=3, size=48)
    synthesize(tmp_path / "b", patients=4, seed=3, size=48)
    synthesize(tmp_path / "c", patients=4, seed=4, size=48)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_dicom_files_are_valid_and_varied(synth_source):
    files = sorted((synth_source / "dicom").rglob("*.dcm"))
    seen = {"photometric": set(), "view": set(), "sop": set()}
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.BitsStored == 12 and ds.BitsAllocated == 16
        assert "RescaleSlope" in ds and "WindowCenter" in ds and ds.PatientName and ds.PatientID
        assert ds.pixel_array.max() < 4096
        seen["photometric"].add(ds.PhotometricInterpretation)
        seen["view"].add(ds.ViewPosition)
        seen["sop"].add(ds.SOPClassUID)
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["view"] == {"PA", "AP", "LL"}
    assert len(seen["sop"]) == 2  # CR and DX
    rows = list(csv.DictReader(open(synth_source / "reports.csv")))
    per_patient = {}
    for r in rows:
        per_patient.setdefault(r["patient_id"], set()).add(r["accession_number"])
        assert "FINDINGS:" in r["report_text"] and "IMPRESSION:" in r["report_text"]
    assert sum(len(v) > 1 for v in per_patient.values()) >= 5


def test_pixels_encode_findings():
    """Effusion raises the density of the stated lung base; cardiomegaly widens the heart."""
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    size = 128
    base = render_frontal([], rng(), size)
    right = render_frontal([Finding("pleural_effusion", "right", "", "large")], rng(), size)
    left = render_frontal([Finding("pleural_effusion", "left", "", "large")], rng(), size)
    rows = slice(int(0.6 * size), int(0.72 * size))
    img_left_half, img_right_half = slice(0, size // 2), slice(size // 2, size)
    # The patient's right is on the image's left in a frontal view.
    assert right[rows, img_left_half].mean() > base[rows, img_left_half].mean() + 0.05
    assert left[rows, img_right_half].mean() > base[rows, img_right_half].mean() + 0.05
    assert abs(right[rows, img_right_half].mean() - base[rows, img_right_half].mean()) < 0.03
    big = render_frontal([Finding("cardiomegaly")], rng(), size)
    row = int(0.68 * size)
    assert (big[row] > 0.7).sum() > (base[row] > 0.7).sum() + 0.1 * size
