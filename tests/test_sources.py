"""Ingest sources other than a plain DICOM tree, near-duplicates, burned-in policy, time-boxed decoding."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from mmclinic.data.cards import read_data_card
from mmclinic.data.decode_pool import DecodeSettings, decode_all
from mmclinic.data.ingest import IngestOptions, ingest
from mmclinic.text.reports import normalize_whitespace, parse_sections
from mmclinic.data.sources import detect_format
from mmclinic.data.splits import check_splits, near_duplicate_pairs
from mmclinic.errors import MmclinicError, UsageError

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
OPTS = IngestOptions(max_side=64, workers=2)


def _quarantine(ds: Path) -> pd.DataFrame:
    return pd.read_csv(ds / "quarantine.csv", keep_default_na=False)


# --------------------------------------------------------------------------- csv (PNG/JPEG, 8 and 16 bit)


def _png_source(tmp: Path) -> Path:
    src = tmp / "csvsrc"
    (src / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        arr = rng.random((40, 48))
        if i % 3 == 0:
            Image.fromarray((arr * 65535).astype(np.uint16)).save(src / "img" / f"{i}.png")  # 16-bit gray
            name = f"img/{i}.png"
        elif i % 3 == 1:
            Image.fromarray((arr * 255).astype(np.uint8)).convert("RGB").save(src / "img" / f"{i}.jpg", quality=90)
            name = f"img/{i}.jpg"
        else:
            Image.fromarray((arr * 255).astype(np.uint8)).save(src / "img" / f"{i}.png")
            name = f"img/{i}.png"
        rows.append([name, f"FINDINGS: Study {i}. Left basal opacity. IMPRESSION: Finding {i}.", f"pt{i // 2}",
                     f"st{i}"])
    (src / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rows += [["img/broken.png", "FINDINGS: x. IMPRESSION: y.", "pt99", "st99"],
             ["img/absent.png", "FINDINGS: x. IMPRESSION: y.", "pt98", "st98"],
             ["img/0.png", "   ", "pt97", "st97"],
             ["", "FINDINGS: no image path. IMPRESSION: y.", "pt96", "st96"]]
    with open(src / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_path", "report_text", "patient_id", "study_id"])
        w.writerows(rows)
    return src


def test_csv_source_png_jpeg_8_16_bit_and_bad_rows_accounted(tmp_path):
    src = _png_source(tmp_path)
    assert detect_format(src) == "csv"
    s = ingest(src, tmp_path / "ds", "auto", tmp_path / "k", OPTS)
    m, q = pd.read_parquet(tmp_path / "ds" / "manifest.parquet"), _quarantine(tmp_path / "ds")
    assert s.accepted == 12 and set(m["source_format"]) == {"png", "jpeg"}
    qi = q[q["kind"] == "image"]
    reasons = dict(zip(qi["source_path"], qi["reason_code"]))
    assert reasons["pairs.csv:14"] == "corrupt_image" and reasons["pairs.csv:15"] == "missing_image"
    assert reasons["pairs.csv:17"] == "bad_input"
    assert "empty_report" in set(q["reason_code"])
    card = read_data_card(tmp_path / "ds" / "data_card.md")
    assert card["counts"]["image_inputs"] == 16 == s.accepted + int((q["kind"] == "image").sum())
    assert (m.groupby("patient_key")["split"].nunique() == 1).all()


def test_csv_non_utf8_rows_are_quarantined_naming_the_field_and_the_run_goes_on(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.random.default_rng(len(name)).integers(0, 255, (40, 40), dtype=np.uint8)).save(src / name)
    (src / "pairs.csv").write_bytes(
        b"image_path,report_text,patient_id\n"
        b"a.png,Clear lungs.,P1\n"
        b"b.png,Caf\xe9 au lait lesion.,P2\n"  # latin-1, not UTF-8
        b'c.png,"Normal heart, no effusion.",P3,\xff\n')  # a stray undecodable field beyond the header
    s = ingest(src, tmp_path / "o", "csv", tmp_path / "k", OPTS)
    q = _quarantine(tmp_path / "o").set_index("source_path")
    assert s.accepted == 1 and len(q) == 2
    assert q.loc["pairs.csv:3", "reason_code"] == "bad_text" and q.loc["pairs.csv:3", "kind"] == "image"
    assert "field report_text is not UTF-8" in q.loc["pairs.csv:3", "message"]
    assert "beyond the header" in q.loc["pairs.csv:4", "message"]
    assert "Caf" not in (tmp_path / "o" / "quarantine.csv").read_text()  # the message never quotes the value
    (src / "pairs.csv").write_bytes(b"image_path,report_t\xe9xt,patient_id\na.png,x,1\n")
    with pytest.raises(UsageError, match="pairs.csv: the header row is not UTF-8"):
        ingest(src, tmp_path / "o2", "csv", tmp_path / "k", OPTS)
    (src / "pairs.csv").write_text("path,text\nx.png,y\n")
    with pytest.raises(UsageError, match="missing column"):
        ingest(src, tmp_path / "o3", "csv", tmp_path / "k", OPTS)
    # An unbalanced quote would swallow the rows after it into one cell: the table is refused.
    (src / "pairs.csv").write_text('image_path,report_text,patient_id\na.png,"Clear lungs.,P1\n'
                                   + "".join(f"b.png,Row {i}.,P{i}\n" for i in range(5)))
    with pytest.raises(UsageError, match="pairs.csv: not a readable CSV .*near line"):
        ingest(src, tmp_path / "o4", "csv", tmp_path / "k", OPTS)
    # Quarantine rows name the line the row starts on, multi-line cells and blank lines counted.
    (src / "pairs.csv").write_bytes(b'image_path,report_text,patient_id\na.png,"FINDINGS:\nClear.\n",P1\n\n'
                                    b"b.png,Caf\xe9.,P2\n")
    ingest(src, tmp_path / "o5", "csv", tmp_path / "k", OPTS)
    assert _quarantine(tmp_path / "o5")["source_path"].tolist() == ["pairs.csv:6"]


# --------------------------------------------------------------------------- mimic-cxr layout


def _mimic_tree(synth_source: Path, dest: Path) -> int:
    reports = {r["accession_number"]: r for r in csv.DictReader(open(synth_source / "reports.csv"))}
    n = 0
    for f in sorted((synth_source / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        row = reports[str(ds.AccessionNumber)]
        pid = "p1" + str(abs(hash(row["patient_id"])) % 10**7).zfill(7)
        study = "s5" + str(int(row["accession_number"][3:]) % 10**7).zfill(7)
        d = dest / "files" / pid[:3] / pid / study
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d / f"{f.parent.name}-{f.stem}.dcm")
        (d.parent / f"{study}.txt").write_text("                                 FINAL REPORT\n " + row["report_text"])
        n += 1
    return n


def test_mimic_cxr_layout_on_a_synthetic_tree(synth_source, tmp_path):
    n = _mimic_tree(synth_source, tmp_path / "mimic")
    (tmp_path / "mimic" / "files" / "p10" / "stray.dcm").write_bytes(b"junk")
    assert detect_format(tmp_path / "mimic") == "mimic-cxr"
    s = ingest(tmp_path / "mimic", tmp_path / "ds", "auto", tmp_path / "k", OPTS)
    m = pd.read_parquet(tmp_path / "ds" / "manifest.parquet")
    q = _quarantine(tmp_path / "ds")
    assert s.accepted == n and len(m) == n and list(q["reason_code"]) == ["bad_input"]
    reports = pd.read_parquet(tmp_path / "ds" / "reports.parquet")
    assert (reports["findings"] != "").all() and not reports["text"].str.contains("FINAL REPORT").any()
    check_splits(m)


# --------------------------------------------------------------------------- near-duplicates, burned-in


def test_near_duplicate_pairs_exact_by_pigeonhole():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, (50, 256)).astype(bool)
    near = base.copy()
    for row in near:
        row[rng.choice(256, 5, replace=False)] ^= True  # 5 bits away
    hexes = [np.packbits(b).tobytes().hex() for b in np.vstack([base, near])]
    pairs = set(near_duplicate_pairs(hexes, 5))
    assert {(i, i + 50) for i in range(50)} <= pairs
    assert all(b == a + 50 for a, b in pairs)  # random 256-bit hashes are ~128 bits apart
    assert not near_duplicate_pairs(hexes, 4) or all(b == a + 50 for a, b in near_duplicate_pairs(hexes, 4))


def test_many_identical_hashes_are_linked_without_comparing_every_pair():
    import time as _time

    blank = "00" * 32
    other = "ff" * 32
    t0 = _time.monotonic()
    pairs = near_duplicate_pairs([blank] * 5000 + [other], 20)
    assert _time.monotonic() - t0 < 5
    assert len(pairs) == 4999 and all(a == 0 for a, _ in pairs)  # each copy linked to the first


def test_near_duplicate_of_another_patient_lands_in_the_same_split(synth_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth_source, src)
    victim = sorted((src / "dicom").rglob("*.dcm"))[3]
    ds = pydicom.dcmread(victim)
    arr = ds.pixel_array.astype(np.int32)
    ds.PixelData = np.clip(arr + 7, 0, 4095).astype(np.uint16).tobytes()  # re-windowed copy: not byte-identical
    ds.PatientID, ds.AccessionNumber = "DUP0000001", "ACCDUP00001"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.99.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.2"
    ds.save_as(src / "dicom" / "dup.dcm")
    with open(src / "reports.csv", "a") as fh:
        fh.write('DUP0000001,ACCDUP00001,1.2.826.0.1.3680043.99.2,"FINDINGS: Copy. IMPRESSION: Copy."\n')
    ingest(src, tmp_path / "ds", "dicom", tmp_path / "k", OPTS)
    m = pd.read_parquet(tmp_path / "ds" / "manifest.parquet")
    groups = m.groupby("dup_group")["patient_key"].nunique()
    assert (groups > 1).sum() >= 1
    linked = m[m["dup_group"].isin(groups[groups > 1].index)]
    assert linked["split"].nunique() == 1
    bad = m.copy()
    row = bad.index[bad["image_id"] == linked["image_id"].iloc[0]][0]
    bad.loc[row, "split"] = "test" if bad.loc[row, "split"] != "test" else "train"
    bad.loc[bad["patient_key"] == bad.loc[row, "patient_key"], "split"] = bad.loc[row, "split"]
    with pytest.raises(MmclinicError, match="near-duplicate|identical|patient"):
        check_splits(bad)


def test_burned_in_annotation_policy(synth_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth_source, src)
    victim = sorted((src / "dicom").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(victim)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(victim)
    ingest(src, tmp_path / "keep", "dicom", tmp_path / "k", OPTS)
    m = pd.read_parquet(tmp_path / "keep" / "manifest.parquet")
    assert int(m["burned_in"].sum()) == 1
    if shutil.which("tesseract") is None:  # quarantine also searches pixels for text
        pytest.skip("--burned-in quarantine needs Tesseract OCR: apt-get install tesseract-ocr")
    ingest(src, tmp_path / "quar", "dicom", tmp_path / "k", IngestOptions(max_side=64, workers=2,
                                                                           burned_in="quarantine"))
    q = _quarantine(tmp_path / "quar")
    row = q[q["reason_code"] == "burned_in_annotation"]
    assert len(row) == 1 and "(0028,0301)" in row["message"].iloc[0]


def test_interrupted_run_rerun_gives_the_clean_result(synth_source, tmp_path):
    partial = tmp_path / "ds.partial"
    (partial / "images").mkdir(parents=True)
    (partial / "images" / "stale.png").write_bytes(b"left over by a killed run")
    a = ingest(synth_source, tmp_path / "ds", "dicom", tmp_path / "k", OPTS)
    assert not partial.exists() and not (tmp_path / "ds" / "images" / "stale.png").exists()
    b = ingest(synth_source, tmp_path / "clean", "dicom", tmp_path / "k", OPTS)
    assert a.version == b.version and a.accepted == b.accepted


# --------------------------------------------------------------------------- time box


def slow_decoder(job, settings):
    if job["path"].endswith("slow"):
        time.sleep(30)
    if job["path"].endswith("crash"):
        os._exit(3)
    return {"ok": True, "index": job["index"], "ident": {}, "images": []}


def test_decoding_is_time_boxed_and_a_crashing_decoder_loses_one_file(tmp_path):
    jobs = [{"index": i, "path": p} for i, p in enumerate(["a", "slow", "b", "crash", "c", "d"])]
    settings = DecodeSettings(out_dir=str(tmp_path), decoder=f"{__name__}:slow_decoder")
    t0 = time.monotonic()
    results = {r["index"]: r for r in decode_all(jobs, settings, workers=2, timeout=3.0)}
    assert time.monotonic() - t0 < 25
    assert sorted(results) == list(range(6))
    assert results[1]["reason"] == "decode_timeout" and "slow" in results[1]["message"]
    assert results[3]["reason"] == "decoder_crash"
    assert all(results[i]["ok"] for i in (0, 2, 4, 5))


def test_a_worker_that_cannot_start_stops_the_run_instead_of_quarantining_everything(tmp_path):
    jobs = [{"index": i, "path": p} for i, p in enumerate(["a", "b", "c"])]
    settings = DecodeSettings(out_dir=str(tmp_path), decoder="mmclinic_no_such_module:decode")
    with pytest.raises(MmclinicError, match="exited with code 1 3 times in a row before starting a file"):
        list(decode_all(jobs, settings, workers=2, timeout=30.0))


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SHARED / "medpix2").is_dir(), reason=f"MedPix 2.0 not found at {SHARED / 'medpix2'}")
def test_medpix2_every_record_accounted(tmp_path):
    root = SHARED / "medpix2" / "splitted_dataset"
    n_desc = sum(1 for f in root.glob("descriptions_*.jsonl") for line in open(f) if line.strip())
    s = ingest(SHARED / "medpix2", tmp_path / "mp", "auto", tmp_path / "k",
               IngestOptions(max_side=32, workers=2, split_policy="source"))
    q = _quarantine(tmp_path / "mp")
    card = read_data_card(tmp_path / "mp" / "data_card.md")
    assert card["counts"]["image_inputs"] == n_desc + int(((q["kind"] == "image") &
                                                            (q["reason_code"] == "missing_report")).sum())
    assert s.accepted + int((q["kind"] == "image").sum()) == card["counts"]["image_inputs"]
    m = pd.read_parquet(tmp_path / "mp" / "manifest.parquet")
    dev = sum(1 for line in open(root / "descriptions_dev.jsonl") if line.strip())
    assert (m["split"] == "test").sum() == dev  # published dev -> test; train -> train/val by patient
    labels = m["labels"].map(json.loads)
    assert set(labels.map(lambda d: d["modality"])) == {"CT", "MR"}
    cov = card["report_sections"]["coverage"]
    assert cov["caption"] > 0.99 and cov["findings"] > 0.9
    check_splits(m)


@pytest.mark.skipif(not (SHARED / "iu-xray-reports").is_dir(), reason=f"IU X-ray not found at {SHARED}")
def test_iu_xray_reports_accounted_and_sections_parse(tmp_path):
    src = SHARED / "iu-xray-reports"
    rows = list(csv.DictReader(open(src / "indiana_reports.csv", encoding="utf-8")))
    s = ingest(src, tmp_path / "iu", "auto", tmp_path / "k", IngestOptions(max_side=32, workers=2, unpaired="keep"))
    q = _quarantine(tmp_path / "iu")
    assert s.reports + int((q["kind"] == "report").sum()) == len(rows)
    card = read_data_card(tmp_path / "iu" / "data_card.md")
    assert card["counts"]["image_inputs"] == sum(1 for _ in open(src / "indiana_projections.csv")) - 1
    assert card["report_sections"]["coverage"]["impression"] > 0.99
    # The section parser recovers IU's own split of the sections from the joined text.
    ok = 0
    for r in rows:
        text = f"INDICATION: {r['indication']} FINDINGS: {r['findings']} IMPRESSION: {r['impression']}"
        p = parse_sections(text)
        ok += p.impression == normalize_whitespace(r["impression"]) and p.findings == normalize_whitespace(r["findings"])
    assert ok / len(rows) > 0.99, ok / len(rows)
    reports = pd.read_parquet(tmp_path / "iu" / "reports.parquet")
    assert reports["findings"].str.contains(r"\bXXXX XXXX").sum() == 0  # redaction runs collapsed


def test_multi_frame_policy_all_gives_one_image_per_frame(tmp_path):
    from pydicom.data import get_testdata_file

    frames = get_testdata_file("emri_small.dcm")
    if frames is None:
        pytest.skip("pydicom test file emri_small.dcm not available")
    src = tmp_path / "mf"
    src.mkdir()
    shutil.copy(frames, src / "mr.dcm")
    (src / "pairs.csv").write_text("image_path,report_text,patient_id,study_id\n"
                                   "mr.dcm,FINDINGS: Ten frames. IMPRESSION: Normal.,p1,s1\n")
    s = ingest(src, tmp_path / "all", "csv", tmp_path / "k", IngestOptions(max_side=32, workers=1, frame_policy="all"))
    m = pd.read_parquet(tmp_path / "all" / "manifest.parquet")
    assert s.accepted == 1 and len(m) == 10 and sorted(m["frame"]) == list(range(10))
    assert m["image_id"].nunique() == 10 and m["split"].nunique() == 1
    ingest(src, tmp_path / "rej", "csv", tmp_path / "k", IngestOptions(max_side=32, workers=1, frame_policy="reject"))
    q = _quarantine(tmp_path / "rej")
    assert "NumberOfFrames" in q[q["kind"] == "image"]["message"].iloc[0]


def test_stratified_split_gives_every_split_its_share_of_each_stratum(synth_source, tmp_path):
    ingest(synth_source, tmp_path / "ds", "dicom", tmp_path / "k",
           IngestOptions(max_side=32, workers=2, stratify_by="manufacturer"))
    m = pd.read_parquet(tmp_path / "ds" / "manifest.parquet")
    check_splits(m)
    first = m.groupby("patient_key")["manufacturer"].agg(lambda v: v.mode().iloc[0])
    split = m.groupby("patient_key")["split"].first()
    for value, patients in first.groupby(first):
        share = split[patients.index].value_counts(normalize=True)
        assert abs(share.get("train", 0) - 0.7) <= 0.5 / len(patients) + 0.15, (value, share.to_dict())
    with pytest.raises(UsageError, match="stratify-by"):
        ingest(synth_source, tmp_path / "x", "dicom", tmp_path / "k", IngestOptions(max_side=32, stratify_by="nope"))
