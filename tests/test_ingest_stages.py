"""Ingest's stages one at a time, on the synthetic archive, with decode results made up in the test
(no worker processes): scan, pairing in input order, the report table, the manifest and the splits."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from mmclinic.data import ingest_stages as stages
from mmclinic.phi.dicom_deid import Pseudonymizer

KEY = bytes(range(32))


@pytest.fixture()
def scan(synth_source):
    """A fresh scan per test: the report stage empties the report rows it reads."""
    return stages.scan_source(synth_source, "dicom")


def _headers(scan):
    return [pydicom.dcmread(job.path, stop_before_pixels=True) for job in scan.images]


def _ok(index, ds, **changes):
    """A decode result as the decode pool gives it, from a file's header (with ``changes`` to it)."""
    ident = {k: str(ds.get(k, "") or "") for k in ("PatientID", "AccessionNumber", "StudyInstanceUID",
                                                    "SOPInstanceUID", "StudyDate", "PatientName")}
    ident.update(changes)
    return {"ok": True, "index": index, "ident": ident, "images": []}


def _report_key(scan, ds):
    row = scan.reports.get(str(ds.AccessionNumber)) or scan.by_study.get(str(ds.StudyInstanceUID))
    return row.key


def test_scan_keeps_one_report_per_key_and_counts_inputs(synth_source, tmp_path):
    import csv
    import shutil

    src = tmp_path / "src"
    shutil.copytree(synth_source, src)
    with open(src / "reports.csv", newline="") as fh:
        first = next(csv.reader(fh, strict=True)) and next(csv.reader(fh, strict=True))
    with open(src / "reports.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(first)  # the first report once more
    scan = stages.scan_source(src, "dicom")
    assert scan.image_inputs == len(scan.images) == sum(1 for _ in (src / "dicom").rglob("*.dcm"))
    assert scan.report_inputs == len(scan.reports) + 1
    assert [q["reason_code"] for q in scan.quarantine] == ["duplicate"]
    assert scan.text_policy == "both"
    assert stages.scan_source(src, "dicom", text_policy="findings").text_policy == "findings"
    assert [j["index"] for j in stages.decode_jobs(scan)] == list(range(len(scan.images)))


def test_results_are_paired_in_input_order_whatever_order_they_arrive_in():
    jobs = ["a", "b", "c", "d", "e"]
    arrived, out = [], []

    def results():
        for i in (3, 0, 4, 1, 2):
            arrived.append(i)
            yield {"index": i}

    for job, res in stages.in_input_order(jobs, results()):
        out.append((job, res["index"], len(arrived)))
    # "a" as soon as result 0 arrived (2nd), "b" with the 4th, the rest with the last
    assert out == [("a", 0, 2), ("b", 1, 4), ("c", 2, 5), ("d", 3, 5), ("e", 4, 5)]


def test_pairing_first_file_wins_refusals_and_paired_count(scan):
    heads = _headers(scan)
    n = len(heads)
    one_image = [i for i in range(n) if sum(_report_key(scan, h) == _report_key(scan, heads[i]) for h in heads) == 1]
    failed = next(i for i in one_image if i > 5)
    results = [_ok(i, h) for i, h in enumerate(heads)]
    results[failed] = {"ok": False, "index": failed, "reason": "corrupt_image", "message": "x.dcm: cannot be read"}
    results[2] = _ok(2, heads[2], SOPInstanceUID=str(heads[1].SOPInstanceUID))  # repeats an earlier file
    results[4] = _ok(4, heads[4], PatientID="", AccessionNumber="none", StudyInstanceUID="none")
    results[5] = _ok(5, heads[5], AccessionNumber="none", StudyInstanceUID="none")
    pairing = stages.pair_images(scan, reversed(results))  # the last file's result arrives first
    rels = [j.rel for j in scan.images]
    refused = {q["source_path"]: q["reason_code"] for q in pairing.quarantine}
    assert refused == {rels[failed]: "corrupt_image", rels[2]: "duplicate", rels[4]: "missing_patient",
                       rels[5]: "missing_report"}
    assert [p.job.rel for p in pairing.pairs] == [r for i, r in enumerate(rels) if i not in (failed, 2, 4, 5)]
    assert pairing.decode_failures == 1 and pairing.failed_reports == set()  # DICOM pairs by header
    assert pairing.paired_with_report == len(pairing.pairs) == n - 4
    p = pairing.pairs[0]
    assert set(p.ident) == {"SOPInstanceUID", "StudyInstanceUID", "StudyDate"}  # nothing else is kept
    assert str(heads[0].PatientID) in pairing.identities[p.report.key]
    assert str(heads[0].PatientName) in pairing.names[p.report.key]

    kept = stages.pair_images(scan, results, unpaired="keep")
    assert kept.paired_with_report == len(kept.pairs) - 1  # the image without a report is kept
    assert [p.report for p in kept.pairs if p.job.rel == rels[5]] == [None]


def test_report_table_scrubs_drops_originals_and_refuses(scan):
    heads = _headers(scan)
    results = [_ok(i, h) for i, h in enumerate(heads)]
    empty_key = _report_key(scan, heads[0])
    lonely = next(i for i in range(len(heads)) if _report_key(scan, heads[i]) != empty_key and
                  sum(_report_key(scan, h) == _report_key(scan, heads[i]) for h in heads) == 1)
    lonely_key = _report_key(scan, heads[lonely])
    results[lonely] = {"ok": False, "index": lonely, "reason": "truncated", "message": "x.dcm: truncated"}
    scan.reports[empty_key].text = "   "
    pairing = stages.pair_images(scan, results)
    table = stages.build_reports(scan, pairing, Pseudonymizer(KEY))
    assert {q["reason_code"] for q in table.quarantine} == {"empty_report", "missing_image"}
    assert set(table.records) == set(scan.reports) - {lonely_key, empty_key}
    assert all(row.text == "" and row.sections is None for row in scan.reports.values())
    assert not pairing.identities and not pairing.names
    texts = " ".join(r["text"] for r in table.records.values())
    assert not any(str(h.PatientID) in texts for h in heads)
    assert all(r["split"] == "" for r in table.records.values())  # splits come with the manifest


def test_manifest_and_splits_from_stage_outputs(scan, tmp_path):
    heads = _headers(scan)
    ws = stages.open_workspace(tmp_path / "ds", write_dicom=False)
    rng = np.random.default_rng(0)
    results = []
    for i, h in enumerate(heads):
        (ws.decoded / f"{i}-0.png").write_bytes(b"png %d" % i)
        frame = {"png": f"{i}-0.png", "sha256": f"{i:064x}", "phash": rng.bytes(32).hex(),
                 "meta": {"modality": "CR", "view": "PA", "rows": 8, "columns": 8}}
        results.append({**_ok(i, h), "images": [frame]})
    refused_key = _report_key(scan, heads[0])
    scan.reports[refused_key].text = ""  # its report is refused, so are its images
    n_refused = sum(_report_key(scan, h) == refused_key for h in heads)
    pseudo = Pseudonymizer(KEY)
    pairing = stages.pair_images(scan, results)
    reports = stages.build_reports(scan, pairing, pseudo)
    rows = stages.build_manifest(scan, pairing, reports, pseudo, ws)
    assert pairing.pairs == [] and not ws.decoded.exists()
    assert rows.accepted_inputs == len(rows.paired) == len(heads) - n_refused and rows.unpaired == []
    assert [q["reason_code"] for q in rows.quarantine] == ["missing_report"] * n_refused
    assert "its report was quarantined" in rows.quarantine[0]["message"]
    assert all((ws.root / r["path"]).is_file() for r in rows.paired)

    tables = stages.assign_splits(rows, reports, pseudo, source_format="dicom", ratios=(0.7, 0.15, 0.15))
    assert rows.paired == [] and list(tables.manifest.columns) == stages.MANIFEST_COLUMNS
    m = tables.manifest
    assert len(m) == len(heads) - n_refused and m["image_id"].is_monotonic_increasing
    assert (m.groupby("patient_key")["split"].nunique() == 1).all()
    split_of_report = dict(zip(tables.reports["report_id"], tables.reports["split"]))
    assert all(split_of_report[r] == s for r, s in zip(m["report_id"], m["split"]))
    assert list(tables.reports.columns) == stages.REPORT_COLUMNS

    flow = stages.flow_counts(scan, pairing, reports, rows)
    assert flow["paired_with_report"] == flow["images_accepted"] + n_refused == len(heads)
    q = stages.quarantine_table(scan, pairing, reports, rows)
    assert list(q.columns) == stages.QUARANTINE_COLUMNS and q["source_path"].is_monotonic_increasing
    assert len(q) == n_refused + 1  # the images and their report
