import datetime as dt
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomanonymizer import simpledicomanonymizer
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from mmclinic import errors
from mmclinic.data.synth import synthesize
from mmclinic.phi.annex_e import (
    AUDIT_KEYS,
    PROFILE,
    declares_burned_in_annotation,
    deidentify_dataset,
    remap_uid,
    write_deidentified,
)
from mmclinic.phi.dicom_deid import Pseudonymizer

KEY = bytes.fromhex("6d6d636c696e69632d616e6e65782d65" * 2)
OTHER_KEY = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0" * 2)
CLASS_UID_KEYWORDS = {"SOPClassUID", "MediaStorageSOPClassUID", "ReferencedSOPClassUID", "TransferSyntaxUID",
                      "ImplementationClassUID"}
IDENTITY_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "PatientAddress",
                     "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
                     "OperatorsName", "PerformingPhysicianName", "AccessionNumber", "StudyDate", "SeriesDate",
                     "ContentDate")
UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _deidentify_tree(src: Path, dst: Path, key: bytes, **kwargs) -> dict[Path, dict]:
    pseudo = Pseudonymizer(key)
    return {f.relative_to(src): write_deidentified(f, dst / f.relative_to(src), pseudo, **kwargs)
            for f in sorted(src.rglob("*.dcm"))}


def _all_uids(ds: Dataset, skip_classes: bool = True) -> set[str]:
    uids = set()
    elements = list(ds.iterall()) + (list(ds.file_meta) if getattr(ds, "file_meta", None) else [])
    for elem in elements:
        if elem.VR == "UI" and elem.value and not (skip_classes and elem.keyword in CLASS_UID_KEYWORDS):
            uids.update(str(v) for v in (elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue)
                                         else [elem.value]))
    return uids


def _with_private_blocks(path: Path) -> None:
    """Add private data at the top level and inside a sequence item, as vendors write it."""
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0019, "ACME RESEARCH 1.0", create=True)
    block.add_new(0x01, "LO", "private copy of Quixotic^Zebulon")
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.StudyInstanceUID + ".99"
    item.private_block(0x0041, "ACME NESTED", create=True).add_new(0x02, "SH", "Zebulon")
    ds.ReferencedImageSequence = [item]
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Synthetic source files (one with extra private blocks) and their de-identified copies under two keys."""
    base = tmp_path_factory.mktemp("annex_e")
    synthesize(base / "src", patients=4, seed=3, size=32)
    files = sorted((base / "src").rglob("*.dcm"))
    _with_private_blocks(files[0])
    audits = _deidentify_tree(base / "src", base / "out", KEY)
    _deidentify_tree(base / "src", base / "again", KEY)
    _deidentify_tree(base / "src", base / "other", OTHER_KEY)
    return base, files, audits


def _planted(files: list[Path]) -> set[str]:
    values: set[str] = set()
    for f in files:
        ds = pydicom.dcmread(f)
        for kw in IDENTITY_KEYWORDS:
            elem = ds.data_element(kw)
            if elem is None or not elem.value:
                continue
            for v in elem.value if isinstance(elem.value, pydicom.multival.MultiValue) else [elem.value]:
                values.add(str(v))
                if elem.VR == "PN":
                    values.update(c for c in re.split(r"[\^=]", str(v)) if c)
        values.update(_all_uids(ds))
    values.add("Quixotic")
    values.add("Zebulon")
    return {v for v in values if len(v) >= 4}


def test_no_planted_identity_left_in_any_written_byte(archive):
    base, files, _ = archive
    planted = _planted(files)
    assert len(planted) > 40
    assert sum(v.encode() in files[0].read_bytes() for v in planted) >= 10  # the search can find them
    outputs = sorted((base / "out").rglob("*.dcm"))
    assert len(outputs) == len(files)
    for f in outputs:
        data = f.read_bytes()
        leaked = [v for v in planted if v.encode() in data or v.upper().encode() in data]
        assert not leaked, f"{f.name}: {len(leaked)} planted value(s) left"
        ds = pydicom.dcmread(f)
        text = "\n".join(str(e.value) for e in ds.iterall() if e.VR not in ("OB", "OW"))
        assert not [v for v in planted if v.lower() in text.lower()]


def test_same_key_gives_identical_bytes_and_another_key_other_uids(archive):
    base, files, _ = archive
    for f in files:
        rel = f.relative_to(base / "src")
        assert (base / "out" / rel).read_bytes() == (base / "again" / rel).read_bytes()
        ours = _all_uids(pydicom.dcmread(base / "out" / rel))
        theirs = _all_uids(pydicom.dcmread(base / "other" / rel))
        assert ours and theirs and not ours & theirs


def test_uids_are_valid_keyed_and_file_meta_follows(archive):
    base, files, _ = archive
    pseudo = Pseudonymizer(KEY)
    for f in files:
        src = pydicom.dcmread(f)
        out = pydicom.dcmread(base / "out" / f.relative_to(base / "src"))
        for uid in _all_uids(out):
            assert len(uid) <= 64 and UID_RE.fullmatch(uid) and uid.startswith("2.25."), uid
        assert out.SOPInstanceUID == remap_uid(src.SOPInstanceUID, pseudo)
        assert out.StudyInstanceUID == remap_uid(src.StudyInstanceUID, pseudo)
        assert out.FrameOfReferenceUID == remap_uid(src.FrameOfReferenceUID, pseudo)
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.SOPClassUID == src.SOPClassUID == out.file_meta.MediaStorageSOPClassUID
        assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    # Studies stay studies: files of one source study share their new StudyInstanceUID.
    by_study: dict[str, set[str]] = {}
    for f in files:
        by_study.setdefault(pydicom.dcmread(f).StudyInstanceUID, set()).add(
            pydicom.dcmread(base / "out" / f.relative_to(base / "src")).StudyInstanceUID)
    assert all(len(new) == 1 for new in by_study.values())
    assert len({next(iter(new)) for new in by_study.values()}) == len(by_study)


def test_library_random_uid_generator_is_never_used(archive):
    base, files, _ = archive
    before = dict(simpledicomanonymizer.dictionary)
    deidentify_dataset(pydicom.dcmread(files[0]), Pseudonymizer(KEY))
    assert simpledicomanonymizer.dictionary == before


def test_dates_shift_per_patient_keeping_intervals(archive):
    base, files, _ = archive
    pseudo = Pseudonymizer(KEY)
    studies: dict[str, dict[dt.date, dt.date]] = {}
    shifts: dict[str, int] = {}
    for f in files:
        src = pydicom.dcmread(f)
        out = pydicom.dcmread(base / "out" / f.relative_to(base / "src"))
        assert out.PatientID == out.PatientName == pseudo.patient(src.PatientID)
        before = dt.datetime.strptime(src.StudyDate, "%Y%m%d").date()
        after = dt.datetime.strptime(out.StudyDate, "%Y%m%d").date()
        assert out.SeriesDate == out.ContentDate == out.StudyDate
        assert out.StudyTime == src.StudyTime  # times of day kept
        shift = (after - before).days
        assert shift == pseudo.date_shift_days(pseudo.patient(src.PatientID))
        assert shifts.setdefault(out.PatientID, shift) == shift  # one shift per patient
        studies.setdefault(out.PatientID, {})[before] = after
        assert out.PatientBirthDate == ""
        assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    multi = [dates for dates in studies.values() if len(dates) >= 2]
    assert multi, "the synthetic archive should hold a patient with two studies"
    for dates in multi:
        (b0, a0), (b1, a1) = sorted(dates.items())[:2]
        assert (a1 - a0) == (b1 - b0) != dt.timedelta(0)
    assert len(set(shifts.values())) > 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_datetime_partial_and_malformed_dates():
    ds = _minimal()
    ds.AcquisitionDateTime = "20200131235959.5+0100"
    ds.InstanceCreationDate = "2020"
    ds.AcquisitionDate = "2020.01.31"
    out, audit = deidentify_dataset(ds, Pseudonymizer(KEY))
    shift = Pseudonymizer(KEY).date_shift_days(Pseudonymizer(KEY).patient("PX1"))
    day = dt.date(2020, 1, 31) + dt.timedelta(days=shift)
    assert out.AcquisitionDateTime == day.strftime("%Y%m%d") + "235959.5+0100"
    assert out.AcquisitionDate == day.strftime("%Y%m%d")
    assert out.InstanceCreationDate == ""
    assert audit["dates_emptied"] == 1 and audit["dates_shifted"] == 2


def test_private_tags_removed_at_every_level(archive):
    base, files, audits = archive
    rel = files[0].relative_to(base / "src")
    out = pydicom.dcmread(base / "out" / rel)
    assert not [e for e in out.iterall() if e.tag.is_private]
    assert audits[rel]["private_removed"] >= 4  # synth's block + two creators and elements added here
    assert b"Zebulon" not in (base / "out" / rel).read_bytes()


def test_identity_removed_flag_and_method_codes(archive):
    base, files, _ = archive
    out = pydicom.dcmread(base / "out" / files[1].relative_to(base / "src"))
    assert out.PatientIdentityRemoved == "YES"
    assert any("mmclinic" in v for v in out.DeidentificationMethod)
    assert all(len(v) <= 64 for v in out.DeidentificationMethod)
    codes = {(item.CodeValue, item.CodingSchemeDesignator) for item in out.DeidentificationMethodCodeSequence}
    assert codes == {("113100", "DCM"), ("113107", "DCM"), ("113108", "DCM")}
    assert [c["value"] for c in PROFILE["codes"]] == ["113100", "113107", "113108"]
    assert out.PatientSex in ("M", "F") and out.PatientAge.endswith("Y")
    for kw in ("OtherPatientIDs", "PatientAddress", "PatientTelephoneNumbers", "InstitutionAddress",
               "PerformingPhysicianName", "StudyDescription"):
        assert kw not in out
    src = pydicom.dcmread(files[1])
    assert out.AccessionNumber == Pseudonymizer(KEY).report(src.AccessionNumber)[:16]


def test_pixels_unchanged_and_readable(archive):
    from mmclinic.data.images import read_image

    base, files, _ = archive
    for f in files[:3]:
        dst = base / "out" / f.relative_to(base / "src")
        assert pydicom.dcmread(dst).PixelData == pydicom.dcmread(f).PixelData
        before, after = read_image(f), read_image(dst)
        np.testing.assert_array_equal(before.pixels, after.pixels)


def _minimal(**values) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientID = "PX1"
    ds.PatientName = "Doe^Jane"
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_ages_over_89_grouped_and_malformed_removed():
    pseudo = Pseudonymizer(KEY)
    out, audit = deidentify_dataset(_minimal(PatientAge="095Y"), pseudo)
    assert out.PatientAge == "090Y" and audit["ages_grouped"] == 1
    assert deidentify_dataset(_minimal(PatientAge="089Y"), pseudo)[0].PatientAge == "089Y"
    assert deidentify_dataset(_minimal(PatientAge="120M"), pseudo)[0].PatientAge == "120M"
    assert "PatientAge" not in deidentify_dataset(_minimal(PatientAge="old"), pseudo)[0]


def test_burned_in_annotation_quarantined_or_kept_with_flag(tmp_path):
    pseudo = Pseudonymizer(KEY)
    ds = _minimal(BurnedInAnnotation="YES")
    assert declares_burned_in_annotation(ds) and not declares_burned_in_annotation(_minimal())
    with pytest.raises(errors.BurnedInAnnotation) as info:
        deidentify_dataset(ds, pseudo)
    assert info.value.reason_code == "burned_in_annotation" and "(0028,0301)" in str(info.value)
    out, audit = deidentify_dataset(ds, pseudo, burned_in="keep")
    assert audit["burned_in_annotation"] is True and out.BurnedInAnnotation == "YES"
    assert deidentify_dataset(_minimal(), pseudo)[1]["burned_in_annotation"] is False
    with pytest.raises(errors.UsageError):
        deidentify_dataset(ds, pseudo, burned_in="ignore")
    # Refused files are not written.
    src = tmp_path / "in.dcm"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(src, enforce_file_format=True)
    assert declares_burned_in_annotation(src)
    with pytest.raises(errors.BurnedInAnnotation):
        write_deidentified(src, tmp_path / "out.dcm", pseudo)
    assert not list(tmp_path.glob("*out.dcm*"))


def test_referenced_sop_instance_uid_follows_the_referenced_file(archive, tmp_path):
    base, files, _ = archive
    a, b = files[1], files[2]
    ref = pydicom.dcmread(a)
    ds = pydicom.dcmread(b)
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    ds.ReferencedImageSequence = [item]
    nested = Dataset()
    nested.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    nested.ContentDate = ref.StudyDate
    nested.PatientName = "Quixotic^Zebulon"
    ds.SourceImageSequence = [nested]
    ds.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    pseudo = Pseudonymizer(KEY)
    write_deidentified(a, tmp_path / "a_out.dcm", pseudo)
    write_deidentified(tmp_path / "b.dcm", tmp_path / "b_out.dcm", pseudo)
    a_out, b_out = pydicom.dcmread(tmp_path / "a_out.dcm"), pydicom.dcmread(tmp_path / "b_out.dcm")
    got = b_out.ReferencedImageSequence[0]
    assert got.ReferencedSOPInstanceUID == a_out.SOPInstanceUID != ref.SOPInstanceUID
    assert got.ReferencedSOPClassUID == ref.SOPClassUID
    src_item = b_out.SourceImageSequence[0]
    assert src_item.ReferencedSOPInstanceUID == a_out.SOPInstanceUID
    shift = pseudo.date_shift_days(pseudo.patient(ds.PatientID))  # the shift of the file's patient
    expected = dt.datetime.strptime(ref.StudyDate, "%Y%m%d").date() + dt.timedelta(days=shift)
    assert src_item.ContentDate == expected.strftime("%Y%m%d")
    assert src_item.PatientName == ""


def test_sequences_follow_the_table_deterministically():
    def item(**values) -> Dataset:
        it = Dataset()
        for key, value in values.items():
            setattr(it, key, value)
        return it

    ds = _minimal()
    # D: dummy values, keyed UIDs.
    ds.VerifyingObserverSequence = [item(VerifyingObserverName="Quixotic^Zebulon", VerificationDateTime="20200131",
                                         ReferencedSOPInstanceUID="1.2.3.4.6")]
    # X/Z/D and Z: emptied or replaced; not in the table: kept and cleaned with the whole table.
    ds.InstitutionCodeSequence = [item(CodeValue="RIVERBEND", CodingSchemeDesignator="L", CodeMeaning="Riverbend")]
    ds.AnatomicRegionSequence = [item(CodeValue="T-D3000", CodingSchemeDesignator="SRT", CodeMeaning="Chest",
                                      OperatorsName="Quixotic^Zebulon", StudyDate="20200131")]
    ds.add_new(0x60003000, "OW", b"\x01\x00" * 8)  # overlay data
    ds.add_new(0x60004000, "LT", "Zebulon")  # overlay comments
    ds.add_new(0x60000010, "US", 4)  # overlay rows: not in the table
    ds.add_new(0x50003000, "OW", b"\x00\x00")  # retired curve data
    pseudo = Pseudonymizer(KEY)
    before = dict(simpledicomanonymizer.dictionary)
    out, audit = deidentify_dataset(ds, pseudo)
    again, _ = deidentify_dataset(ds, pseudo)
    assert out.to_json() == again.to_json() and simpledicomanonymizer.dictionary == before
    verifying = out.VerifyingObserverSequence[0]
    assert verifying.VerifyingObserverName == "ANONYMIZED"
    assert verifying.ReferencedSOPInstanceUID == remap_uid("1.2.3.4.6", pseudo)
    assert "Riverbend" not in out.to_json() and "Zebulon" not in out.to_json()
    anatomic = out.AnatomicRegionSequence[0]
    assert anatomic.CodeMeaning == "Chest" and anatomic.OperatorsName == "ANONYMIZED"
    assert anatomic.StudyDate != "20200131"
    assert 0x60003000 not in out and 0x60004000 not in out and 0x50003000 not in out and 0x60000010 in out
    assert audit["removed"] >= 3 and audit["replaced"] >= 2


def test_missing_patient_id_names_the_tag():
    ds = _minimal()
    ds.PatientID = ""
    with pytest.raises(errors.InputError) as info:
        deidentify_dataset(ds, Pseudonymizer(KEY))
    assert "PatientID (0010,0020)" in str(info.value) and info.value.reason_code == "missing_patient_id"


def test_input_dataset_is_not_modified_and_audit_holds_counts_only(archive):
    base, files, audits = archive
    ds = pydicom.dcmread(files[0])
    before = ds.to_json()
    _, audit = deidentify_dataset(ds, Pseudonymizer(KEY))
    assert ds.to_json() == before
    assert set(audit) == set(AUDIT_KEYS) | {"burned_in_annotation"}
    for a in list(audits.values()) + [audit]:
        assert all(type(v) is int for k, v in a.items() if k != "burned_in_annotation")
        assert a["uids_remapped"] >= 4 and a["pseudonymized"] >= 3 and a["dates_shifted"] >= 3


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_real_files_from_pydicom_stay_valid_without_original_uids(name, tmp_path):
    src = Path(get_testdata_file(name))
    shutil.copy(src, tmp_path / name)
    audit = write_deidentified(tmp_path / name, tmp_path / "out.dcm", Pseudonymizer(KEY))
    original = pydicom.dcmread(src)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    data = (tmp_path / "out.dcm").read_bytes()
    assert not [u for u in _all_uids(original) if u.encode() in data]
    assert out.SOPClassUID == original.SOPClassUID
    assert out.PixelData == original.PixelData
    np.testing.assert_array_equal(out.pixel_array, original.pixel_array)
    assert not [e for e in out.iterall() if e.tag.is_private]
    assert str(original.PatientName).encode() not in data and original.PatientID.encode() not in data
    dates = [kw for kw in ("StudyDate", "SeriesDate", "ContentDate") if original.get(kw)]
    assert dates and all(getattr(out, kw) != getattr(original, kw) for kw in dates)
    assert out.file_meta.ImplementationClassUID == pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    assert audit["uids_remapped"] >= 4
