import hashlib
import json
import shutil

import pandas as pd
import pytest

from mmclinic.data.cards import read_data_card
from mmclinic.data.ingest import IngestOptions, ingest
from mmclinic.data.splits import SPLITS, check_splits
from mmclinic.errors import MmclinicError, UsageError

PAIRING_REASONS = {"duplicate", "missing_patient", "missing_report"}
"""Image refusals made after decoding; every other image refusal of a DICOM source is a failed decode."""


def assert_card_counts_match_tables(ds):
    """Every count in the data card, recomputed from the tables ingest wrote (a DICOM source,
    one frame per file, ``--unpaired quarantine`` or ``keep``)."""
    card = read_data_card(ds / "data_card.md")
    m = pd.read_parquet(ds / "manifest.parquet")
    r = pd.read_parquet(ds / "reports.parquet")
    q = pd.read_csv(ds / "quarantine.csv", keep_default_na=False, dtype=str)
    unpaired = pd.read_parquet(ds / "unpaired_images.parquet") if (ds / "unpaired_images.parquet").exists() else None
    n_unpaired = 0 if unpaired is None else len(unpaired)
    q_images, q_reports = q[q["kind"] == "image"], q[q["kind"] == "report"]
    accepted = len(m) + n_unpaired
    report_refused = q_images["message"].str.contains("its report was quarantined", regex=False)
    expected = {
        "image_inputs": accepted + len(q_images),
        "decoded": accepted + len(q_images) - int((~q_images["reason_code"].isin(PAIRING_REASONS)).sum()),
        "paired_with_report": len(m) + int(report_refused.sum()),
        "images_accepted": accepted,
        "report_inputs": len(r) + len(q_reports),
        "reports_accepted": len(r),
        "report_rows": len(r) + len(q_reports),
        "image_rows": len(m),
        "unpaired_images_kept": n_unpaired,
        "quarantined": len(q),
        "quarantined_by_reason": {k: int(v) for k, v in q["reason_code"].value_counts().items()},
        "burned_in_flagged": int(m["burned_in"].sum()),
    }
    assert card["counts"] == expected
    for split in SPLITS:
        rows = m[m["split"] == split]
        assert card["splits"][split] == {"patients": rows["patient_key"].nunique(),
                                         "studies": rows["study_key"].nunique(), "images": len(rows),
                                         "reports": rows["report_id"].nunique()}, split
    assert sum(card["splits"][s]["images"] for s in SPLITS) == len(m)
    assert set(r["report_id"]) >= set(m["report_id"])
    assert card["manifest_sha256"] == hashlib.sha256((ds / "manifest.parquet").read_bytes()).hexdigest()
    assert card["dataset_version"] == json.loads((ds / "dataset.json").read_text())["version"]
    return card


def test_manifest_columns_and_patient_level_split(dataset):
    m = pd.read_parquet(dataset / "manifest.parquet")
    for col in ("image_id", "patient_key", "study_key", "report_id", "split", "modality", "view", "laterality",
                "source_format", "image_sha256", "path"):
        assert col in m.columns
    assert set(m["split"]) == {"train", "val", "test"}
    assert (m.groupby("patient_key")["split"].nunique() == 1).all()
    bad = m.copy()
    counts = bad["patient_key"].value_counts()
    row = bad.index[bad["patient_key"] == counts.index[0]][0]  # a patient with several images
    assert counts.iloc[0] > 1
    bad.loc[row, "split"] = "test" if bad.loc[row, "split"] != "test" else "train"
    with pytest.raises(MmclinicError, match="split leak"):
        check_splits(bad)
    card = assert_card_counts_match_tables(dataset)
    assert card["counts"]["images_accepted"] == card["counts"]["paired_with_report"] == len(m) > 0
    assert card["manifest_sha256"] and card["splits"]["train"]["patients"] > 0


def test_bad_inputs_quarantined_and_everything_accounted(synth_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth_source, src)
    (src / "dicom" / "notes.txt").write_text("not an image")
    victim = sorted((src / "dicom").rglob("*.dcm"))[0]
    data = victim.read_bytes()
    (src / "dicom" / "truncated.dcm").write_bytes(data[: len(data) // 3])
    import csv as _csv

    import pydicom

    first = next(_csv.DictReader(open(src / "reports.csv")))
    with open(src / "reports.csv", "a") as fh:
        fh.write('999,ACC00000000,1.2.3.4,"FINDINGS: No image for this one. IMPRESSION: Normal."\n')
        fh.write('999,ACC00000001,1.2.3.5,""\n')
        fh.write(f'{first["patient_id"]},{first["accession_number"]},,"FINDINGS: A second row. IMPRESSION: x."\n')
        fh.write(',ACC00000002,,"FINDINGS: Nobody\'s report. IMPRESSION: Normal."\n')
    # A copy of a real image without any patient identifier and a new SOP instance.
    ds = pydicom.dcmread(victim)
    ds.PatientID = ""
    ds.AccessionNumber = "ACC00000002"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"
    ds.save_as(src / "dicom" / "anonymous.dcm")
    # A new image of the report with empty text: paired, then refused with its report.
    ds = pydicom.dcmread(victim)
    ds.AccessionNumber = "ACC00000001"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.998"
    ds.save_as(src / "dicom" / "empty_report.dcm")
    n_files = sum(1 for p in src.rglob("*") if p.is_file()) - 2  # minus reports.csv and labels.csv
    out = tmp_path / "ds"
    s = ingest(src, out, "auto", tmp_path / "k", IngestOptions(max_side=64))
    q = pd.read_csv(out / "quarantine.csv")
    reasons = dict(zip(q["source_path"], q["reason_code"]))
    assert reasons["dicom/notes.txt"] == "not_dicom"
    assert reasons["dicom/truncated.dcm"] in ("truncated", "corrupt_image", "duplicate")
    assert reasons["dicom/anonymous.dcm"] == "missing_patient"
    assert reasons["dicom/empty_report.dcm"] == "missing_report"
    card = assert_card_counts_match_tables(out)
    assert card["counts"]["paired_with_report"] == s.accepted + 1
    assert {"missing_image", "empty_report", "duplicate"} <= set(q["reason_code"])
    image_rows = q[~q["source_path"].str.startswith("reports.csv")]
    assert s.accepted + len(image_rows) == n_files
    report_rows = q[q["source_path"].str.startswith("reports.csv")]
    n_rows = sum(1 for _ in _csv.DictReader(open(src / "reports.csv")))
    assert s.reports + len(report_rows) == n_rows == read_data_card(out / "data_card.md")["counts"]["report_rows"]
    assert "999" not in " ".join(q["message"])


def test_rerun_same_key_reproduces_dataset(synth_source, tmp_path):
    a = ingest(synth_source, tmp_path / "a", "dicom", tmp_path / "k", IngestOptions(max_side=64, workers=1))
    b = ingest(synth_source, tmp_path / "b", "dicom", tmp_path / "k", IngestOptions(max_side=64, workers=2))
    assert a.version == b.version
    ma, mb = (pd.read_parquet(p / "manifest.parquet") for p in (tmp_path / "a", tmp_path / "b"))
    pd.testing.assert_frame_equal(ma, mb)
    ingest(synth_source, tmp_path / "c", "dicom", tmp_path / "other-key", IngestOptions(max_side=64))
    assert set(pd.read_parquet(tmp_path / "c" / "manifest.parquet")["patient_key"]).isdisjoint(set(ma["patient_key"]))


def test_missing_source_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="SOURCE"):
        ingest(tmp_path / "nope", tmp_path / "out")


def test_data_card_copied_into_repository_only_from_its_root(synth_source, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "data_cards").mkdir(parents=True)
    (repo / "mmclinic").mkdir()
    (repo / "mmclinic" / "__init__.py").write_text("")
    monkeypatch.chdir(repo)
    ingest(synth_source, tmp_path / "cardtest", "dicom", tmp_path / "k", IngestOptions(max_side=32))
    assert (repo / "data_cards" / "cardtest.md").read_text() == (tmp_path / "cardtest" / "data_card.md").read_text()
    monkeypatch.chdir(tmp_path)
    ingest(synth_source, tmp_path / "other", "dicom", tmp_path / "k", IngestOptions(max_side=32))
    assert not (repo / "data_cards" / "other.md").exists()


def test_shifted_study_dates_and_pixel_spacing_kept(synth_source, dataset):
    import datetime as dt

    import pydicom

    from mmclinic.phi.dicom_deid import Pseudonymizer, load_or_create_key

    pseudo = Pseudonymizer(load_or_create_key(dataset.parent / "key.hex"))
    m = pd.read_parquet(dataset / "manifest.parquet").set_index("image_id")
    checked = 0
    for f in sorted((synth_source / "dicom").rglob("*.dcm"))[:20]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        row = m.loc[pseudo.image(str(ds.SOPInstanceUID))]
        original = dt.datetime.strptime(str(ds.StudyDate), "%Y%m%d").date()
        assert row["study_date_shifted"] == (original + dt.timedelta(days=int(row["date_shift_days"]))).isoformat()
        assert row["study_date_shifted"] != original.isoformat() and row["pixel_spacing"]
        checked += 1
    assert checked == 20
