"""Broken and hostile files end as an image or a typed quarantine reason, within a time box: a
subset of the generated corpus (reliability/corpus.py), short property-based runs of the readers
(reliability/fuzz.py; ``make reliability`` runs the long versions), and regression tests for the
crashes they found."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mmclinic import errors, read_image
from mmclinic.data.sources import scan_medpix2

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from reliability import corpus, fuzz  # noqa: E402


def real(name: str) -> Path:
    return Path(pydicom.data.get_testdata_file(name, download=False))


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd value it reads or writes
        yield


def test_corpus_subset_ends_in_images_or_typed_reasons_within_the_time_box(tmp_path):
    outcomes = corpus.run(corpus.quick(corpus.generate(0)), tmp_path, timeout=30,
                          pixel_budget=corpus.QUICK_PIXEL_BUDGET)
    families = {o.case.family for o in outcomes}
    assert families == set(corpus.QUICK_EVERY) and len(outcomes) > 500
    bad = corpus.failures(outcomes)
    assert not bad, corpus.summary(outcomes, 0)
    by_family = {f: {o.outcome for o in outcomes if o.case.family == f} for f in families}
    assert by_family["empty"] == {"not_dicom"}
    assert "pixel_budget_exceeded" in by_family["deflate"] and "pixel_budget_exceeded" in by_family["gzip"]
    assert "truncated" in by_family["truncate"] and "image" in by_family["header"]


def test_corpus_is_deterministic():
    first = [(c.family, c.name, len(c.data)) for c, _ in zip(corpus.generate(3), range(400))]
    again = [(c.family, c.name, len(c.data)) for c, _ in zip(corpus.generate(3), range(400))]
    assert first == again


@pytest.mark.parametrize("target,examples", [("dicom", 80), ("raster", 40), ("csv", 30), ("jsonl", 30),
                                             ("paths", 20)])
def test_fuzz_readers_short_run(tmp_path, target, examples):
    fuzz.properties(tmp_path, examples, deadline_s=20, seed_value=0)[target]()
    assert fuzz.EXAMPLES[target] >= examples // 2


# --------------------------------------------------------------------------- regressions


CRASHED_BEFORE = {"MR_small_implicit.dcm@52e=1a", "CT_small.dcm@c0=31", "emri_small.dcm@84=5",
                  "MR_small_jp2klossless.dcm@84=5", "JPGExtended.dcm@6ae=d"}
"""Corpus cases that raised pydicom's BytesLengthException out of read_image (an element's length that
does not fit its VR, in the file meta or in the dataset)."""


def test_element_length_that_does_not_fit_its_vr_is_a_typed_error(tmp_path):
    names = {"MR_small_implicit.dcm", "CT_small.dcm", "emri_small.dcm", "MR_small_jp2klossless.dcm",
             "JPGExtended.dcm"}
    cases = {c.name: c for n in names for c in corpus.wrong_lengths(n, corpus.testdata(n)) if c.name in CRASHED_BEFORE}
    cases["JPEG2000.dcm@141"] = corpus.Case("truncate", "cut", corpus.testdata("JPEG2000.dcm")[:0x141])
    assert len(cases) == len(CRASHED_BEFORE) + 1
    for name, case in cases.items():
        (tmp_path / "case.dcm").write_bytes(case.data)
        with pytest.raises(errors.InputError) as info:
            read_image(tmp_path / "case.dcm")
        assert info.value.reason_code in ("corrupt_image", "truncated"), name


def test_unusable_modality_lut_is_a_typed_error(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    for descriptor, data in (([2, 0, 99], b"\x00\x01" * 2), ([65535, 65535, 16], b"\xff" * 10)):
        ds = pydicom.dcmread(real("MR_small.dcm"))
        item = Dataset()
        item.add_new(0x00283002, "US", descriptor)
        item.add_new(0x00283006, "OW", data)
        item.ModalityLUTType = "HU"
        ds.ModalityLUTSequence = Sequence([item])
        ds.save_as(tmp_path / "lut.dcm")
        with pytest.raises(errors.UnsupportedPixelFormat, match=r"lut.dcm: .*ModalityLUTSequence \(0028,3000\)"):
            read_image(tmp_path / "lut.dcm")


def test_rescale_beyond_float_range_is_refused_not_nan(tmp_path):
    for keyword, value in (("RescaleSlope", "-1e308"), ("RescaleIntercept", "1e308")):
        ds = pydicom.dcmread(real("MR_small.dcm"))
        setattr(ds, keyword, value)
        ds.save_as(tmp_path / "r.dcm")
        with pytest.raises(errors.UnsupportedPixelFormat, match="RescaleSlope"):
            read_image(tmp_path / "r.dcm")
    ds = pydicom.dcmread(real("MR_small.dcm"))
    ds.RescaleSlope, ds.RescaleIntercept = "1e6", "-1e9"  # large but fine
    ds.save_as(tmp_path / "ok.dcm")
    assert np.isfinite(read_image(tmp_path / "ok.dcm").pixels).all()


def test_deeply_nested_sequences_are_corrupt_image(tmp_path):
    full = real("MR_small.dcm").read_bytes()
    pixel = full.rindex(b"\xe0\x7f\x10\x00")
    nest = corpus._sq_nest(5000, defined=False, implicit=False)
    (tmp_path / "deep.dcm").write_bytes(full[:pixel] + nest + full[pixel:])
    with pytest.raises(errors.CorruptImage, match="nested too deeply"):
        read_image(tmp_path / "deep.dcm")
    shallow = corpus._sq_nest(10, defined=False, implicit=False)
    (tmp_path / "shallow.dcm").write_bytes(full[:pixel] + shallow + full[pixel:])
    assert read_image(tmp_path / "shallow.dcm").pixels.shape == (64, 64)


def test_medpix_fields_of_the_wrong_json_type_are_bad_input_not_a_crash(tmp_path):
    src = tmp_path / "mp"
    (src / "splitted_dataset").mkdir(parents=True)
    (src / "images").mkdir()
    (src / "images" / "a.png").write_bytes(corpus._png_bytes())
    lines = [
        {"image": "a", "U_id": "c1", "Type": [None], "Description": {"Caption": 3, "Plane": ["x"]}},
        {"image": "a", "U_id": "c2", "Description": [None]},
        {"image": ["a"], "U_id": "c3"},
        {"image": "a", "U_id": True},
    ]
    (src / "splitted_dataset" / "descriptions_train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (src / "splitted_dataset" / "data_train.jsonl").write_text(json.dumps({"U_id": "c1", "Case": [1]}) + "\n"
                                                               + json.dumps({"U_id": 7, "Case": None}) + "\n")
    scan = scan_medpix2(src)
    assert [j.report_key for j in scan.images] == ["a"]
    assert scan.images[0].labels == {"modality": "OT", "plane": "unknown", "location_category": "unknown"}
    assert scan.reports[0].sections["caption"] == "3"
    reasons = [(q["source_path"], q["reason_code"]) for q in scan.quarantine]
    assert reasons == [("data_train.jsonl:1", "bad_input"), ("descriptions_train.jsonl:2", "bad_input"),
                       ("descriptions_train.jsonl:3", "bad_input"), ("descriptions_train.jsonl:4", "bad_input"),
                       ("data_train.jsonl:2", "missing_image")]


def test_truncated_deferred_pixel_data_is_found_without_reading_it(tmp_path):
    ds = pydicom.dcmread(real("CT_small.dcm"))
    ds.PixelData = np.zeros((ds.Rows, ds.Columns * 20), np.int16).tobytes()  # above the 256 KB deferral
    ds.Columns = ds.Columns * 20
    buf = io.BytesIO()
    ds.save_as(buf)
    (tmp_path / "cut.dcm").write_bytes(buf.getvalue()[:-1000])
    with pytest.raises(errors.TruncatedFile, match=r"cut.dcm: element PixelData \(7FE0,0010\) is longer"):
        read_image(tmp_path / "cut.dcm")
