"""Odd but valid files: DICOM without preamble (older exports, ACR-NEMA), gzip-compressed DICOM,
no SOPInstanceUID; and objects that are not images (DICOMDIR, SR, KOS, presentation states,
RT structures, segmentations), each read by ``read_image`` and by a real ingest."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from mmclinic import errors, read_image
from mmclinic.data import images
from mmclinic.data.images import is_dicom, open_dicom
from mmclinic.data.ingest import IngestOptions, ingest


def real(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not installed"
    return Path(path)


def _bare(ds: pydicom.Dataset, *, meta: bool = False, implicit: bool | None = None,
          little: bool | None = None) -> bytes:
    """``ds`` written without the 128-byte preamble and 'DICM' marker (with or without its file meta group)."""
    ds = ds.copy()
    ds.preamble = None
    tsyntax = ds.file_meta.TransferSyntaxUID
    if not meta:
        del ds.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=tsyntax.is_implicit_VR if implicit is None else implicit,
                     little_endian=tsyntax.is_little_endian if little is None else little)
    return buf.getvalue()


def _part10(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- read_image


def test_dicom_without_preamble_reads_like_the_part10_file(tmp_path):
    reference = read_image(real("MR_small.dcm"))
    ds = pydicom.dcmread(real("MR_small.dcm"))
    cases = {
        "explicit.dcm": _bare(ds),
        "meta_no_preamble.dcm": _bare(ds, meta=True),
        "acr_nema_implicit.dcm": _bare(ds, implicit=True, little=True),
        "big_endian.dcm": _bare(pydicom.dcmread(real("MR_small_bigendian.dcm"))),
    }
    for name, data in cases.items():
        assert data[128:132] != b"DICM"
        (tmp_path / name).write_bytes(data)
        assert is_dicom(tmp_path / name), name
        rec = read_image(tmp_path / name)
        np.testing.assert_allclose(rec.pixels, reference.pixels, atol=1e-6, err_msg=name)
        assert rec.meta["modality"] == "MR" and rec.meta["source_format"] == "dicom"
    implicit = open_dicom(tmp_path / "acr_nema_implicit.dcm")
    assert implicit.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"  # the encoding it was read in
    assert open_dicom(tmp_path / "big_endian.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"


def test_real_file_without_preamble_from_pydicom_data_is_read():
    path = real("OT-PAL-8-face.dcm")  # pydicom-data: implicit VR, no preamble, no file meta, palette colour
    assert path.read_bytes()[128:132] != b"DICM" and is_dicom(path)
    rec = read_image(path)
    assert rec.pixels.shape == (480, 640, 3) and rec.meta["transfer_syntax"] == "1.2.840.10008.1.2"


def test_acr_nema_file_without_sop_class_or_uids_is_read(tmp_path):
    ds = pydicom.dcmread(real("CT_small.dcm"))
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        delattr(ds, keyword)
    ds.add_new(0x00080010, "SH", "ACR-NEMA 2.0")  # Recognition Code (retired)
    (tmp_path / "old.img").write_bytes(_bare(ds, implicit=True, little=True))
    rec = read_image(tmp_path / "old.img")
    np.testing.assert_allclose(rec.pixels, read_image(real("CT_small.dcm")).pixels, atol=1e-6)


def test_non_dicom_bytes_with_a_dicom_name_are_not_dicom(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "text.dcm": b"not an image at all, " * 20,
        "random.dcm": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "pdf.dcm": b"%PDF-1.4\n" + b"0" * 300,
        "zip.dcm": b"PK\x03\x04" + b"\x00" * 300,
        # a first element in group 0008 whose value runs past the head: not taken for a dataset
        "almost.dcm": b"\x08\x00\x05\x00CS\xff\xff" + b"A" * 2000,
        "tag_only.dcm": b"\x08\x00\x05\x00",
        "empty.dcm": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert not is_dicom(tmp_path / name), name
        with pytest.raises(errors.NotDicom, match=name):
            read_image(tmp_path / name)
    with pytest.raises(errors.NotDicom):  # pydicom's no_meta.dcm starts one byte into an element
        read_image(real("no_meta.dcm"))


def test_gzip_compressed_dicom_is_read(tmp_path):
    reference = read_image(real("MR_small.dcm"))
    rec = read_image(real("zipMR.gz"))  # pydicom's gzip of MR_small.dcm
    np.testing.assert_array_equal(rec.pixels, reference.pixels)
    (tmp_path / "ct.dcm.gz").write_bytes(gzip.compress(real("CT_small.dcm").read_bytes()))
    np.testing.assert_array_equal(read_image(tmp_path / "ct.dcm.gz").pixels, read_image(real("CT_small.dcm")).pixels)
    bare = _bare(pydicom.dcmread(real("MR_small.dcm")), implicit=True, little=True)
    (tmp_path / "bare.gz").write_bytes(gzip.compress(bare))
    np.testing.assert_allclose(read_image(tmp_path / "bare.gz").pixels, reference.pixels, atol=1e-6)
    (tmp_path / "dfl.gz").write_bytes(gzip.compress(real("image_dfl.dcm").read_bytes()))
    assert read_image(tmp_path / "dfl.gz").meta["transfer_syntax"] == images.DEFLATED
    assert read_image(tmp_path / "ct.dcm.gz", decode_timeout=30).pixels.shape == (128, 128)


def test_broken_gzip_files_get_typed_errors(tmp_path):
    data = gzip.compress(real("MR_small.dcm").read_bytes())
    (tmp_path / "cut.dcm.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.TruncatedFile, match="cut.dcm.gz"):
        read_image(tmp_path / "cut.dcm.gz")
    (tmp_path / "garbled.dcm.gz").write_bytes(data[:10] + bytes(200) + data[210:])
    with pytest.raises(errors.CorruptImage, match="garbled.dcm.gz"):
        read_image(tmp_path / "garbled.dcm.gz")
    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress(b"just some notes\n" * 50))
    with pytest.raises(errors.NotDicom, match="does not hold DICOM"):
        read_image(tmp_path / "notes.txt.gz")


def test_gzip_bomb_is_refused_at_the_budget_without_inflating_it_all(tmp_path, monkeypatch):
    import tracemalloc

    with open(tmp_path / "bomb.dcm.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        gz.write(real("MR_small.dcm").read_bytes())
        block = bytes(1 << 20)
        for _ in range(64):  # 64 MiB of zeros in well under 1 MiB
            gz.write(block)
    assert (tmp_path / "bomb.dcm.gz").stat().st_size < 1 << 20
    monkeypatch.setattr(images, "_HEADER_ALLOWANCE", 0)
    tracemalloc.start()
    try:
        with pytest.raises(errors.PixelBudgetExceeded, match="bomb.dcm.gz: gzip-compressed file decompresses"):
            read_image(tmp_path / "bomb.dcm.gz", pixel_budget=4 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # stopped at the 4 MiB limit, never holding the 64 MiB


def test_file_without_sop_instance_uid_is_read(tmp_path):
    ds = pydicom.dcmread(real("MR_small.dcm"))
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "nouid.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "nouid.dcm").pixels, read_image(real("MR_small.dcm")).pixels)


def _non_image_objects(folder: Path) -> dict[str, str]:
    """File name -> the expected reason code: objects that are not images."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("test-SR.dcm", "rtstruct.dcm", "rtplan.dcm", "liver_1frame.dcm", "rtdose_1frame.dcm"):
        (folder / name).write_bytes(real(name).read_bytes())
        out[name] = "non_image_object"
    kos = pydicom.dcmread(real("test-SR.dcm"))
    kos.SOPClassUID = kos.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"
    (folder / "kos.dcm").write_bytes(_part10(kos))
    out["kos.dcm"] = "non_image_object"
    pr = pydicom.dcmread(real("MR_small.dcm"))
    del pr.PixelData
    pr.SOPClassUID = pr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy PS
    (folder / "pr.dcm").write_bytes(_part10(pr))
    out["pr.dcm"] = "non_image_object"
    (folder / "DICOMDIR").write_bytes(real("DICOMDIR").read_bytes())
    out["DICOMDIR"] = "dicomdir"
    return out


def test_non_image_objects_and_dicomdir_say_they_are_not_images(tmp_path):
    for name, reason in _non_image_objects(tmp_path).items():
        with pytest.raises(errors.NoPixelData) as info:  # NonImageObject is a kind of NoPixelData
            read_image(tmp_path / name)
        assert info.value.reason_code == reason, name
        assert name in str(info.value) and "not an image" in str(info.value) or reason == "dicomdir"
    with pytest.raises(errors.DicomDirectory, match="DICOMDIR"):
        open_dicom(tmp_path / "DICOMDIR")
    with pytest.raises(errors.NonImageObject, match=r"Comprehensive SR Storage"):
        read_image(tmp_path / "test-SR.dcm")
    rt_image = pydicom.dcmread(real("MR_small.dcm"))
    rt_image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.1"  # RT Image Storage is an image
    rt_image.save_as(tmp_path / "rtimage.dcm")
    assert read_image(tmp_path / "rtimage.dcm").pixels.shape == (64, 64)


def test_image_sop_class_without_pixel_data_is_still_no_pixel_data(tmp_path):
    ds = pydicom.dcmread(real("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "ct_nopix.dcm")
    with pytest.raises(errors.NoPixelData) as info:
        read_image(tmp_path / "ct_nopix.dcm")
    assert info.value.reason_code == "no_pixel_data"


# --------------------------------------------------------------------------- through ingest


def _image(src: Path, accession: str, patient: str, uid: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(src)
    ds.AccessionNumber, ds.PatientID = accession, patient
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID = f"{uid}.1"
    return ds


def _odd_source(root: Path) -> tuple[Path, dict[str, str]]:
    """A dicom source of odd files, one report row each; file -> expected outcome ('accepted' or a reason)."""
    src = root / "src"
    (src / "dicom").mkdir(parents=True)
    expected: dict[str, str] = {}
    rows = []

    def add(name: str, data: bytes, outcome: str, accession: str) -> None:
        (src / "dicom" / name).write_bytes(data)
        expected[f"dicom/{name}"] = outcome
        rows.append([f"PT{len(rows)}", accession, f"FINDINGS: study {accession}. IMPRESSION: fine."])

    mr, ct = real("MR_small.dcm"), real("CT_small.dcm")
    add("part10.dcm", _part10(_image(mr, "ACC1", "PT0", "1.2.3.1")), "accepted", "ACC1")
    add("explicit_no_preamble.dcm", _bare(_image(ct, "ACC2", "PT1", "1.2.3.2")), "accepted", "ACC2")
    add("acr_nema.dcm", _bare(_image(mr, "ACC3", "PT2", "1.2.3.3"), implicit=True, little=True), "accepted", "ACC3")
    add("meta_no_preamble.dcm", _bare(_image(ct, "ACC4", "PT3", "1.2.3.4"), meta=True), "accepted", "ACC4")
    add("compressed.dcm.gz", gzip.compress(_part10(_image(mr, "ACC5", "PT4", "1.2.3.5"))), "accepted", "ACC5")
    add("bare.gz", gzip.compress(_bare(_image(ct, "ACC6", "PT5", "1.2.3.6"), implicit=True)), "accepted", "ACC6")
    add("notes.dcm", b"not an image, only notes " * 40, "not_dicom", "ACC7")
    add("garbage.dcm.gz", gzip.compress(b"\x00" * 64 + b"text" * 100), "not_dicom", "ACC8")
    for i, (name, reason) in enumerate(_non_image_objects(root / "objects").items()):
        ds = pydicom.dcmread(root / "objects" / name, force=True)
        if name != "DICOMDIR":
            ds.AccessionNumber, ds.PatientID = f"ACCX{i}", f"PTX{i}"
        data = (root / "objects" / name).read_bytes() if name == "DICOMDIR" else _part10(ds)
        add(name, data, reason, f"ACCX{i}")
    with open(src / "reports.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "accession_number", "report_text"])
        w.writerows(rows)
    return src, expected


def _ingest(src: Path, out: Path) -> tuple[object, pd.DataFrame, pd.DataFrame]:
    summary = ingest(src, out, "dicom", out.parent / "key", IngestOptions(max_side=64, workers=2))
    q = pd.read_csv(out / "quarantine.csv", keep_default_na=False, dtype=str)
    return summary, q, pd.read_parquet(out / "manifest.parquet")


def test_odd_files_through_ingest_accepted_or_quarantined_with_the_fitting_reason(tmp_path):
    src, expected = _odd_source(tmp_path)
    summary, q, manifest = _ingest(src, tmp_path / "ds")
    images_q = q[q["kind"] == "image"]
    got = dict(zip(images_q["source_path"], images_q["reason_code"]))
    assert got == {k: v for k, v in expected.items() if v != "accepted"}
    accepted = sum(v == "accepted" for v in expected.values())
    assert summary.accepted == len(manifest) == accepted
    assert summary.accepted + len(images_q) == len(expected)  # every input accounted for
    reports_q = q[q["kind"] == "report"]
    assert set(reports_q["reason_code"]) == {"missing_image"}  # the refused files' reports, nothing else
    assert len(reports_q) == len(expected) - accepted


def test_dicomdir_records_are_not_followed_outside_the_source(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "IM1").write_bytes(_part10(_image(real("MR_small.dcm"), "ACC_OUT", "PT_OUT", "1.2.9.9")))
    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(real("DICOMDIR"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # '..' is not a valid CS value, which is the point
        for record in ds.DirectoryRecordSequence:
            if "ReferencedFileID" in record:
                record.ReferencedFileID = ["..", "outside", "IM1"]  # a hostile record pointing out of the source
        ds.save_as(src / "DICOMDIR", enforce_file_format=False)
    (src / "inside.dcm").write_bytes(_part10(_image(real("CT_small.dcm"), "ACC_IN", "PT_IN", "1.2.9.8")))
    (src / "reports.csv").write_text("patient_id,accession_number,report_text\n"
                                     "PT_IN,ACC_IN,FINDINGS: inside. IMPRESSION: ok.\n"
                                     "PT_OUT,ACC_OUT,FINDINGS: outside. IMPRESSION: ok.\n")
    summary, q, manifest = _ingest(src, tmp_path / "ds")
    assert summary.accepted == len(manifest) == 1
    reasons = dict(zip(q["source_path"], q["reason_code"]))
    assert reasons["DICOMDIR"] == "dicomdir"
    assert reasons["reports.csv:3"] == "missing_image"  # the outside file was never read


def _without_uid(src: Path, accession: str, patient: str, *, meta_uid: bool) -> pydicom.Dataset:
    """``src`` with no SOPInstanceUID; ``meta_uid``: the file meta still names one (1.2.3.4.ACCESSION digits)."""
    ds = _image(src, accession, patient, "1.2.3.4." + "".join(c for c in accession if c.isdigit()))
    del ds.SOPInstanceUID
    if not meta_uid:
        del ds.file_meta.MediaStorageSOPInstanceUID
    return ds


def _bytes_without_uid(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)  # Part 10 would need MediaStorageSOPInstanceUID
    return buf.getvalue()


def test_file_without_sop_instance_uid_is_accepted_by_ingest_with_a_derived_identifier(tmp_path):
    src = tmp_path / "src"
    (src / "dicom").mkdir(parents=True)
    files = {"0.dcm": _part10(_image(real("MR_small.dcm"), "ACC0", "PT0", "1.2.3.0")),
             "1.dcm": _part10(_without_uid(real("CT_small.dcm"), "ACC1", "PT1", meta_uid=True)),
             "2.dcm": _bytes_without_uid(_without_uid(real("MR_small.dcm"), "ACC2", "PT2", meta_uid=False))}
    for name, data in files.items():
        (src / "dicom" / name).write_bytes(data)
    (src / "reports.csv").write_text("patient_id,accession_number,report_text\n" + "".join(
        f"PT{i},ACC{i},FINDINGS: f{i}. IMPRESSION: ok.\n" for i in range(3)))
    summary, q, manifest = _ingest(src, tmp_path / "ds")
    assert summary.accepted == 3 and len(q) == 0, q.to_dict("records")
    from mmclinic.phi.dicom_deid import Pseudonymizer

    pseudo = Pseudonymizer(bytes.fromhex((tmp_path / "key").read_text().strip()))
    digest = hashlib.sha256(files["2.dcm"]).hexdigest()
    derived = f"2.25.{int(digest[:32], 16)}"
    by_id = dict(zip(manifest["image_id"], manifest["uid_source"]))
    assert by_id == {pseudo.image("1.2.3.0"): "SOPInstanceUID", pseudo.image("1.2.3.4.1"): "MediaStorageSOPInstanceUID",
                     pseudo.image(derived): "content_sha256"}  # the derivation is recorded per image
    # Stable: the same bytes under another name and folder give the same dataset (ids, splits, version).
    moved = tmp_path / "moved"
    (moved / "dicom" / "elsewhere").mkdir(parents=True)
    for name, data in files.items():
        (moved / "dicom" / "elsewhere" / f"renamed-{name}").write_bytes(data)
    shutil.copyfile(src / "reports.csv", moved / "reports.csv")
    again, _, manifest2 = _ingest(moved, tmp_path / "ds2")
    assert sorted(manifest2["image_id"]) == sorted(manifest["image_id"])
    assert again.version == summary.version
    # An identical copy of the UID-less file is a duplicate of it, said so in its message.
    (src / "dicom" / "3.dcm").write_bytes(files["2.dcm"])
    _, q3, manifest3 = _ingest(src, tmp_path / "ds3")
    assert len(manifest3) == 3
    row = q3[q3["source_path"] == "dicom/3.dcm"].iloc[0]
    assert row["reason_code"] == "duplicate" and "no SOPInstanceUID" in row["message"]


def test_file_without_sop_instance_uid_gets_a_keyed_uid_in_its_deidentified_copy(tmp_path):
    src = tmp_path / "src"
    (src / "dicom").mkdir(parents=True)
    data = _bytes_without_uid(_without_uid(real("MR_small.dcm"), "ACC0", "PT0", meta_uid=False))
    (src / "dicom" / "0.dcm").write_bytes(data)
    (src / "reports.csv").write_text("patient_id,accession_number,report_text\nPT0,ACC0,FINDINGS: a. IMPRESSION: ok.\n")
    ingest(src, tmp_path / "ds", "dicom", tmp_path / "key", IngestOptions(max_side=64, workers=1, write_dicom=True))
    from mmclinic.phi.annex_e import remap_uid
    from mmclinic.phi.dicom_deid import Pseudonymizer

    pseudo = Pseudonymizer(bytes.fromhex((tmp_path / "key").read_text().strip()))
    derived = f"2.25.{int(hashlib.sha256(data).hexdigest()[:32], 16)}"
    copies = list((tmp_path / "ds" / "dicom").glob("*.dcm"))
    assert [c.stem for c in copies] == [pseudo.image(derived)]
    copy = pydicom.dcmread(copies[0])
    assert copy.SOPInstanceUID == copy.file_meta.MediaStorageSOPInstanceUID == remap_uid(derived, pseudo)


def test_file_without_sop_instance_uid_and_without_pixels_is_refused_for_its_pixels(tmp_path):
    """Quarantined for what is wrong with the image (no PixelData), the missing UID named beside it."""
    src = tmp_path / "src"
    (src / "dicom").mkdir(parents=True)
    ds = _without_uid(real("MR_small.dcm"), "ACC0", "PT0", meta_uid=False)
    del ds.PixelData
    (src / "dicom" / "0.dcm").write_bytes(_bytes_without_uid(ds))
    (src / "reports.csv").write_text("patient_id,accession_number,report_text\nPT0,ACC0,FINDINGS: a. IMPRESSION: ok.\n")
    summary, q, _ = _ingest(src, tmp_path / "ds")
    assert summary.accepted == 0
    row = q[q["kind"] == "image"].iloc[0]
    assert row["reason_code"] == "no_pixel_data", row.to_dict()
    assert "SOPInstanceUID (0008,0018) is missing" in row["message"] and "PT0" not in row["message"]


def test_refused_file_of_a_patient_with_nothing_accepted_leaves_no_identity_in_quarantine(tmp_path):
    """The only file of a patient, in a folder named after them, refused (no pixel data), with no report:
    its header's name and ID are still known to ingest and redacted from quarantine.csv."""
    from mmclinic.data.ingest import IngestOptions, ingest

    src = tmp_path / "src"
    folder = src / "dicom" / "QUZWYKAB_VEXQELAB_4471902"
    folder.mkdir(parents=True)
    ds = _image(real("CT_small.dcm"), "ACCQ1", "4471902", "1.2.3.99")
    ds.PatientName = "QUZWYKAB^VEXQELAB"
    del ds.PixelData
    ds.save_as(folder / "1.dcm", enforce_file_format=True)
    ok = _image(real("MR_small.dcm"), "ACCQ2", "PTQ2", "1.2.3.98")
    ok.save_as(src / "dicom" / "other.dcm", enforce_file_format=True)
    (src / "reports.csv").write_text("patient_id,accession_number,report_text\n"
                                     "PTQ2,ACCQ2,FINDINGS: clear. IMPRESSION: fine.\n")
    ingest(src, tmp_path / "ds", "dicom", tmp_path / "key.hex", IngestOptions(max_side=64, workers=1))
    text = (tmp_path / "ds" / "quarantine.csv").read_text()
    assert "no_pixel_data" in text and "[REDACTED]" in text
    assert "4471902" not in text and "quzwykab" not in text.lower() and "vexqelab" not in text.lower()
