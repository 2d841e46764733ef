"""``mmclinic ingest``: a DICOM tree plus a reports table to a de-identified dataset folder.

Every input file ends in the manifest or in ``quarantine.csv`` with a reason. The
identities read from DICOM headers and the reports table stay in memory: they
are used to pair images with reports and to scrub the report text, and only
keyed pseudonyms are written.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import csv
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from mmclinic import errors
from mmclinic.data import cards, reports as reports_mod, shards, splits
from mmclinic.data.images import decode_dicom, open_dicom, to_png_bytes
from mmclinic.phi.dicom_deid import Pseudonymizer, load_or_create_key
from mmclinic.phi.text_deid import deidentify_text

FORMATS = ("auto", "dicom", "medpix2", "iu-xray", "mimic-cxr", "csv")
MANIFEST_COLUMNS = [
    "image_id", "patient_key", "study_key", "report_id", "split", "modality", "view", "laterality",
    "source_format", "image_sha256", "path", "photometric", "sex", "age_band", "manufacturer",
    "body_part", "rows", "columns", "date_shift_days",
]
_NAME_TAGS = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName")
_IDENTITY_TAGS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "PatientAddress", "PatientTelephoneNumbers",
                  "InstitutionName", "InstitutionAddress", *_NAME_TAGS)


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    max_side: int = 512
    """Longest side of the stored, display-ready image."""
    text_policy: str = "both"
    workers: int = 0
    """Decoding processes; 0 means one per CPU core."""
    shard_size: int = 256
    frame_policy: str = "first"


@dataclasses.dataclass(frozen=True)
class IngestSummary:
    dataset: Path
    accepted: int
    quarantined: int
    reports: int
    splits: dict[str, int]
    version: str


def detect_format(source: Path) -> str:
    """Guess the source layout from the files it holds."""
    if (source / "reports.csv").is_file() and any(source.rglob("*.dcm")):
        return "dicom"
    if (source / "splitted_dataset").is_dir() or any(source.glob("descriptions_*.jsonl")):
        return "medpix2"
    if (source / "indiana_reports.csv").is_file():
        return "iu-xray"
    raise errors.UsageError(
        f"SOURCE {source}: cannot detect its format; pass --format (one of {', '.join(FORMATS[1:])})"
    )


def _read_one_dicom(args: tuple[str, str, int, str]) -> dict[str, Any]:
    """Worker: one header read gives identities and pixels; pixels -> a PNG. Runs in a pool."""
    path, rel, max_side, frame_policy = args
    try:
        ds = open_dicom(path)
        ident = {k: str(ds.get(k, "") or "") for k in (*_IDENTITY_TAGS, "StudyInstanceUID", "SOPInstanceUID")}
        if not ident["SOPInstanceUID"]:
            raise errors.UnsupportedPixelFormat(f"{Path(path).name}: missing tag SOPInstanceUID (0008,0018)")
        rec = decode_dicom(ds, path, frame_policy=frame_policy)
        png = to_png_bytes(rec.pixels, max_side)
        return {"ok": True, "rel": rel, "meta": rec.meta, "ident": ident, "png": png}
    except errors.InputError as exc:
        return {"ok": False, "rel": rel, "reason": exc.reason_code, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one quarantined file
        return {"ok": False, "rel": rel, "reason": "corrupt_image",
                "message": f"{Path(path).name}: cannot be read ({type(exc).__name__})"}


def _read_reports_csv(path: Path, quarantine: list[dict[str, str]], rel_name: str) -> list[dict[str, str]]:
    required = ["accession_number", "report_text"]
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise errors.UsageError(f"{rel_name}: not UTF-8 text (byte {exc.start})") from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise errors.UsageError(f"{rel_name}: missing column(s) {', '.join(missing)}")
    rows = []
    for i, row in enumerate(reader, start=2):
        where = f"{rel_name}:{i}"
        if not (row.get("accession_number") or row.get("study_instance_uid")):
            quarantine.append({"source_path": where, "reason_code": "bad_input",
                               "message": f"{where}: empty field accession_number"})
            continue
        if not (row.get("report_text") or "").strip():
            quarantine.append({"source_path": where, "reason_code": "empty_report",
                               "message": f"{where}: empty field report_text"})
            continue
        row["_where"] = where
        rows.append(row)
    return rows


def _default_key_file(dataset: Path) -> Path:
    return dataset.parent / f"{dataset.name}.deid-key"


def ingest(source: str | Path, out: str | Path, fmt: str = "auto", deid_key_file: str | Path | None = None,
           options: IngestOptions = IngestOptions()) -> IngestSummary:
    """Build a dataset folder from ``source``; see CONTRACT.md for the files it writes."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise errors.UsageError(f"SOURCE not found or not a folder: {source}")
    if fmt not in FORMATS:
        raise errors.UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        fmt = detect_format(source)
    if fmt != "dicom":
        raise errors.UsageError(f"--format {fmt}: this source layout is not supported yet (supported: dicom)")
    key_path = Path(deid_key_file) if deid_key_file else _default_key_file(out)
    pseudo = Pseudonymizer(load_or_create_key(key_path))

    # Write into a scratch folder and swap it in at the end: an interrupted run leaves
    # the previous dataset intact and a re-run starts clean.
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)

    quarantine: list[dict[str, str]] = []
    tables = {"reports.csv", "labels.csv"}
    files = sorted(p for p in source.rglob("*") if p.is_file())
    image_files = [p for p in files if p.relative_to(source).as_posix() not in tables]
    if not (source / "reports.csv").is_file():
        raise errors.UsageError(f"SOURCE {source}: reports.csv not found (a dicom source needs one)")
    report_rows = _read_reports_csv(source / "reports.csv", quarantine, "reports.csv")
    n_report_rows = len(report_rows) + len(quarantine)  # every data row of reports.csv

    workers = options.workers or os.cpu_count() or 1
    jobs = [(str(p), p.relative_to(source).as_posix(), options.max_side,
             options.frame_policy) for p in image_files]
    results: list[dict[str, Any]] = []
    if workers == 1 or len(jobs) < 8:
        results = [_read_one_dicom(j) for j in jobs]
    else:
        with cf.ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_read_one_dicom, jobs, chunksize=8))

    # ----- pair images with reports by accession number (or study UID)
    by_acc: dict[str, dict[str, str]] = {}
    by_uid: dict[str, dict[str, str]] = {}
    unique_rows = []
    for row in report_rows:
        acc = (row.get("accession_number") or "").strip()
        uid = (row.get("study_instance_uid") or "").strip()
        if (acc and acc in by_acc) or (uid and uid in by_uid):
            field = "accession_number" if acc and acc in by_acc else "study_instance_uid"
            quarantine.append({"source_path": row["_where"], "reason_code": "duplicate",
                               "message": f"{row['_where']}: field {field} repeats an earlier row"})
            continue
        if acc:
            by_acc[acc] = row
        if uid:
            by_uid[uid] = row
        unique_rows.append(row)
    report_rows = unique_rows
    identities: dict[str, set[str]] = collections.defaultdict(set)  # report key -> known identifier values
    names: dict[str, set[str]] = collections.defaultdict(set)  # report key -> known person names
    used_reports: set[int] = set()
    accepted: list[dict[str, Any]] = []
    seen_sop: set[str] = set()
    for res in results:
        if not res["ok"]:
            quarantine.append({"source_path": res["rel"], "reason_code": res["reason"], "message": res["message"]})
            continue
        ident = res["ident"]
        row = by_acc.get(ident["AccessionNumber"].strip()) or by_uid.get(ident["StudyInstanceUID"].strip())
        if row is None:
            quarantine.append({"source_path": res["rel"], "reason_code": "missing_report",
                               "message": f"{Path(res['rel']).name}: no report matches tag AccessionNumber "
                                          "or StudyInstanceUID"})
            continue
        if ident["SOPInstanceUID"] in seen_sop:
            quarantine.append({"source_path": res["rel"], "reason_code": "duplicate",
                               "message": f"{Path(res['rel']).name}: tag SOPInstanceUID repeats an earlier file"})
            continue
        patient_id = (ident["PatientID"] or row.get("patient_id", "")).strip()
        if not patient_id:
            quarantine.append({"source_path": res["rel"], "reason_code": "missing_patient",
                               "message": f"{Path(res['rel']).name}: empty tag PatientID and no patient_id in "
                                          "the report row; patient-level splitting needs one"})
            continue
        seen_sop.add(ident["SOPInstanceUID"])
        used_reports.add(id(row))
        identities[row["_where"]].update(v for k, v in ident.items() if v and k not in _NAME_TAGS)
        names[row["_where"]].update(ident[k] for k in _NAME_TAGS if ident.get(k))
        identities[row["_where"]].update(v for v in (row.get("patient_id"), row.get("accession_number")) if v)
        accepted.append({"res": res, "row": row, "patient_id": patient_id})

    # ----- reports: de-identify with the identities of their own studies, parse sections
    audit: collections.Counter[str] = collections.Counter()
    report_records: dict[str, dict[str, str]] = {}
    for row in report_rows:
        if id(row) not in used_reports:
            quarantine.append({"source_path": row["_where"], "reason_code": "missing_image",
                               "message": f"{row['_where']}: no image matches field accession_number"})
            continue
        clean = deidentify_text(row["report_text"], identities[row["_where"]], audit, names[row["_where"]])
        parsed = reports_mod.parse_sections(clean)
        text = reports_mod.model_text(parsed, options.text_policy)
        rid = pseudo.report(row.get("accession_number") or row.get("study_instance_uid", ""))
        report_records[row["_where"]] = {
            "report_id": rid, "findings": parsed.findings, "impression": parsed.impression,
            "indication": parsed.indication, "comparison": parsed.comparison, "text": text,
        }

    manifest_rows = []
    for item in accepted:
        res, row = item["res"], item["row"]
        rep = report_records[row["_where"]]
        meta, ident = res["meta"], res["ident"]
        patient_key = pseudo.patient(item["patient_id"])
        image_id = pseudo.image(ident["SOPInstanceUID"])
        png: bytes = res["png"]
        rel = f"images/{image_id}.png"
        (tmp / rel).write_bytes(png)
        manifest_rows.append({
            "image_id": image_id, "patient_key": patient_key,
            "study_key": pseudo.study(ident["StudyInstanceUID"] or row.get("accession_number", "")),
            "report_id": rep["report_id"], "split": "", "modality": meta["modality"], "view": meta["view"],
            "laterality": meta["laterality"], "source_format": meta["source_format"],
            "image_sha256": hashlib.sha256(png).hexdigest(), "path": rel, "photometric": meta["photometric"],
            "sex": meta["sex"], "age_band": meta["age_band"], "manufacturer": meta["manufacturer"],
            "body_part": meta["body_part"], "rows": meta["rows"], "columns": meta["columns"],
            "date_shift_days": pseudo.date_shift_days(patient_key),
        })
    manifest = pd.DataFrame(manifest_rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.sort_values("image_id", kind="stable").reset_index(drop=True)
    manifest["split"] = splits.assign_splits(manifest, pseudo, options.split_ratios)
    splits.check_splits(manifest)
    reports_df = pd.DataFrame(list(report_records.values()))
    if len(reports_df):
        reports_df = reports_df.drop_duplicates("report_id").sort_values("report_id").reset_index(drop=True)

    manifest.to_parquet(tmp / "manifest.parquet", index=False)
    reports_df.to_parquet(tmp / "reports.parquet", index=False)
    qdf = pd.DataFrame(quarantine, columns=["source_path", "reason_code", "message"])
    qdf = qdf.sort_values("source_path", kind="stable")
    qdf.to_csv(tmp / "quarantine.csv", index=False)
    report_q = qdf.source_path.str.startswith("reports.csv")
    if len(manifest) + int((~report_q).sum()) != len(image_files) or \
            len(report_records) + int(report_q.sum()) != n_report_rows:
        raise errors.MmclinicError("internal accounting error: accepted + quarantined != inputs")
    shards.write_shards(tmp, manifest, reports_df, options.shard_size)
    version = cards.dataset_version(tmp)
    cards.write_data_card(
        tmp, name=out.name, source_format=fmt, n_inputs=len(image_files), n_report_rows=n_report_rows,
        manifest=manifest, reports=reports_df, quarantine=qdf, audit=audit, options=dataclasses.asdict(options),
        version=version,
    )
    (tmp / "dataset.json").write_text(json.dumps({"version": version, "format": fmt, "name": out.name},
                                                 indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    cards.copy_into_repository(out / "data_card.md", out.name)
    counts = manifest["split"].value_counts().to_dict()
    return IngestSummary(dataset=out, accepted=len(manifest), quarantined=len(qdf), reports=len(reports_df),
                         splits={k: int(counts.get(k, 0)) for k in splits.SPLITS}, version=version)
