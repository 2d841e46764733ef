"""``mmclinic ingest``: a source archive to a de-identified, split, sharded dataset folder.

Every input ends in the dataset or in ``quarantine.csv`` with a reason: the source
adapters (:mod:`mmclinic.data.sources`) list images and reports, a pool of worker
processes decodes the images under a time box, and the common steps below pair,
de-identify, group duplicates, split by patient and write. The identities read from
DICOM headers and source tables stay in memory: they pair images with reports and
scrub the report text, and only keyed pseudonyms are written.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from mmclinic import errors
from mmclinic.data import cards, shards, splits
from mmclinic.text import reports as reports_mod
from mmclinic.data.decode_pool import NAME_TAGS, DecodeSettings, decode_all
from mmclinic.data.sources import FORMATS, SCANNERS, CsvColumns, ImageJob, ReportRow, detect_format
from mmclinic.phi.dicom_deid import Pseudonymizer, load_or_create_key
from mmclinic.phi.text_deid import deidentify_text

__all__ = ["FORMATS", "IngestOptions", "IngestSummary", "detect_format", "ingest"]

MANIFEST_COLUMNS = [
    "image_id", "patient_key", "study_key", "report_id", "split", "modality", "view", "laterality",
    "source_format", "image_sha256", "path", "photometric", "sex", "age_band", "manufacturer",
    "body_part", "rows", "columns", "date_shift_days", "source", "labels", "burned_in", "phash", "dup_group",
    "frame", "pixel_spacing", "study_date_shifted",
]
REPORT_COLUMNS = ["report_id", "patient_key", "split", "findings", "impression", "indication", "comparison",
                  "history", "caption", "text"]
QUARANTINE_COLUMNS = ["source_path", "reason_code", "message", "kind"]
SPLIT_POLICIES = ("hash", "source")
TEXT_POLICIES = (*reports_mod.TEXT_POLICIES, "caption", "caption+findings")


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_policy: str = "hash"
    """``hash``: keyed hash of the patient; ``source``: the source's own split where it has one
    (MedPix 2.0 train -> train/val by keyed hash, dev -> test)."""
    stratify_by: str | None = None
    """A manifest column (e.g. ``modality``, ``view``) every split should hold in the split ratios."""
    max_side: int = 512
    """Longest side of the stored, display-ready image."""
    text_policy: str | None = None
    """findings / impression / both / longest / caption / caption+findings; None: the source's default."""
    workers: int = 0
    """Decoding processes; 0 means one per CPU core."""
    shard_size: int = 256
    frame_policy: str = "first"
    """Multi-frame DICOM: first / middle / all (one image per frame) / reject."""
    decode_timeout: float | None = 120.0
    """Seconds one file may take to decode before it is quarantined (``decode_timeout``)."""
    pixel_budget: int = 1 << 30
    """Bytes of decoded pixel data one file may need, checked from the header before decoding."""
    burned_in: str = "keep"
    """Files declaring burned-in annotation: ``keep`` (flagged in the manifest) or ``quarantine``."""
    unpaired: str = "quarantine"
    """``quarantine`` or ``keep``: reports without an image stay in reports.parquet, images without a report
    go to unpaired_images.parquet."""
    near_duplicate_bits: int = 20
    """Images whose 256-bit perceptual hashes differ in at most this many bits share a split; -1 turns it off."""
    write_dicom: bool = False
    """Also write a de-identified DICOM copy (PS3.15 Annex E) of every accepted DICOM file to DATASET/dicom/."""
    csv_columns: CsvColumns = CsvColumns()
    image_dir: str | None = None
    """iu-xray: the image folder inside SOURCE (default: the first of images/, images_normalized/)."""


@dataclasses.dataclass(frozen=True)
class IngestSummary:
    dataset: Path
    accepted: int
    quarantined: int
    reports: int
    splits: dict[str, int]
    version: str


def _default_key_file(dataset: Path) -> Path:
    return dataset.parent / f"{dataset.name}.deid-key"


def _check_options(o: IngestOptions) -> None:
    checks = [
        (o.split_policy in SPLIT_POLICIES, f"--split-policy must be one of {', '.join(SPLIT_POLICIES)}"),
        (o.text_policy is None or o.text_policy in TEXT_POLICIES,
         f"--text-policy must be one of {', '.join(TEXT_POLICIES)}"),
        (o.frame_policy in ("first", "middle", "all", "reject"), "--frame-policy must be first, middle, all or reject"),
        (o.burned_in in ("keep", "quarantine"), "--burned-in must be keep or quarantine"),
        (o.unpaired in ("keep", "quarantine"), "--unpaired must be keep or quarantine"),
        (o.max_side >= 16, "--max-side must be at least 16"),
        (o.decode_timeout is None or o.decode_timeout > 0, "--decode-timeout must be positive"),
        (o.shard_size >= 1, "shard size must be at least 1"),
        (-1 <= o.near_duplicate_bits <= 64, "--near-duplicate-bits must be in [-1, 64]"),
    ]
    for ok, message in checks:
        if not ok:
            raise errors.UsageError(message)


def _model_text(sections: dict[str, str], policy: str) -> str:
    caption, findings = sections.get("caption", ""), sections.get("findings", "")
    if policy == "caption":
        return caption or findings or sections.get("impression", "")
    if policy == "caption+findings":
        return " ".join(x for x in (caption, findings) if x) or sections.get("impression", "")
    parsed = reports_mod.ParsedReport(findings, sections.get("impression", ""), sections.get("indication", ""),
                                      sections.get("history", ""), sections.get("comparison", ""),
                                      sections.get("other", "") or caption)
    return reports_mod.model_text(parsed, policy)


def _release_memory() -> None:
    """Hand freed heap back to the operating system (glibc keeps it otherwise), so that peak
    resident memory tracks what is live rather than what was ever allocated."""
    import ctypes
    import gc

    gc.collect()
    try:
        import pyarrow

        pyarrow.default_memory_pool().release_unused()
    except (ImportError, AttributeError):
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _spacing(value: Any) -> str:
    """Pixel spacing (row\\column, mm) as text; empty when the file has none."""
    if value is None or value == "":
        return ""
    values = value if isinstance(value, (list, tuple)) else [value]
    return "\\".join(f"{float(v):g}" for v in values)


def _shifted_date(study_date: str, shift_days: int) -> str:
    """The study date moved by the patient's shift (ISO); intervals between a patient's studies are kept."""
    import datetime as dt

    try:
        day = dt.datetime.strptime(study_date.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    return (day + dt.timedelta(days=shift_days)).isoformat()


def _report_sections(row: ReportRow, identities: set[str], names: set[str],
                     audit: collections.Counter[str]) -> dict[str, str]:
    """De-identify first, then split into sections (or clean the sections the source already gives)."""
    if row.sections is not None:
        return {k: reports_mod.normalize_whitespace(deidentify_text(v, identities, audit, names))
                for k, v in row.sections.items()}
    parsed = reports_mod.parse_sections(deidentify_text(row.text, identities, audit, names))
    return {"findings": parsed.findings, "impression": parsed.impression, "indication": parsed.indication,
            "history": parsed.history, "comparison": parsed.comparison, "other": parsed.other}


def ingest(source: str | Path, out: str | Path, fmt: str = "auto", deid_key_file: str | Path | None = None,
           options: IngestOptions = IngestOptions()) -> IngestSummary:
    """Build a dataset folder from ``source``; see CONTRACT.md for the files it writes."""
    source, out = Path(source), Path(out)
    if not (source.is_dir() or (source.is_file() and fmt in ("csv", "auto"))):
        raise errors.UsageError(f"SOURCE not found or not a folder: {source}")
    if fmt not in FORMATS:
        raise errors.UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _check_options(options)
    if fmt == "auto":
        fmt = detect_format(source)
    scan = SCANNERS[fmt](source, columns=options.csv_columns, image_dir=options.image_dir)
    text_policy = options.text_policy or scan.default_text_policy
    key_path = Path(deid_key_file) if deid_key_file else _default_key_file(out)
    key = load_or_create_key(key_path)
    pseudo = Pseudonymizer(key)

    # Write into a scratch folder and swap it in at the end: an interrupted run leaves the
    # previous dataset intact, and a re-run starts clean (no duplicates, nothing lost).
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    decoded_dir = tmp / "decoded"
    decoded_dir.mkdir(parents=True)
    (tmp / "images").mkdir()
    if options.write_dicom:
        (tmp / "dicom").mkdir()

    quarantine: list[dict[str, str]] = list(scan.quarantine)
    n_image_inputs = len(scan.images) + sum(q["kind"] == "image" for q in scan.quarantine)
    n_report_inputs = len(scan.reports) + sum(q["kind"] == "report" for q in scan.quarantine)

    def refuse(where: str, reason: str, message: str, kind: str) -> None:
        quarantine.append({"source_path": where, "reason_code": reason, "message": message, "kind": kind})

    # ----- reports: one per key
    reports: dict[str, ReportRow] = {}
    by_study: dict[str, ReportRow] = {}
    for row in scan.reports:
        if row.key in reports or (row.study_id and row.study_id in by_study and scan.format == "dicom"):
            refuse(row.where, "duplicate", f"{row.where}: its accession number / study key repeats an earlier "
                                           "report", "report")
            continue
        reports[row.key] = row
        if row.study_id:
            by_study[row.study_id] = row

    # ----- decode images in parallel, time-boxed; PNGs go straight to disk
    settings = DecodeSettings(out_dir=str(decoded_dir), max_side=options.max_side, frame_policy=options.frame_policy,
                              pixel_budget=options.pixel_budget, burned_in=options.burned_in,
                              dicom_out_dir=str(tmp / "dicom") if options.write_dicom else None,
                              deid_key_hex=key.hex() if options.write_dicom else None)
    workers = options.workers or os.cpu_count() or 1
    jobs = [{"index": i, "path": str(job.path)} for i, job in enumerate(scan.images)]

    # ----- pair each decoded image with its report, in input order as results stream in (a
    # reorder buffer keeps "first file wins" deterministic; memory holds only what pairing keeps)
    identities: dict[str, set[str]] = collections.defaultdict(set)
    names: dict[str, set[str]] = collections.defaultdict(set)
    paired: list[tuple[ImageJob, dict[str, Any], ReportRow | None, str]] = []
    seen_uid: set[str] = set()
    decode_failures = 0
    failed_reports: set[str] = set()

    def pair(job: ImageJob, res: dict[str, Any]) -> None:
        nonlocal decode_failures
        if not res["ok"]:
            decode_failures += 1
            refuse(job.rel, res["reason"], res["message"], "image")
            if job.report_key is not None:
                failed_reports.add(job.report_key)
            return
        ident = res["ident"]
        if job.report_key is not None:
            row = reports.get(job.report_key)
        else:
            row = reports.get(ident.get("AccessionNumber", "").strip()) or \
                by_study.get(ident.get("StudyInstanceUID", "").strip())
        uid = ident.get("SOPInstanceUID") or job.image_uid or job.rel
        if uid in seen_uid:
            what = "tag SOPInstanceUID" if ident.get("SOPInstanceUID") else "its image identifier"
            refuse(job.rel, "duplicate", f"{Path(job.rel).name}: {what} repeats an earlier file", "image")
            return
        patient_id = (job.patient_id or ident.get("PatientID", "") or (row.patient_id if row else "")).strip()
        if not patient_id:
            refuse(job.rel, "missing_patient", f"{Path(job.rel).name}: empty tag PatientID and no patient_id in the "
                                               "report row; patient-level splitting needs one", "image")
            return
        if row is None and options.unpaired == "quarantine":
            field = "tag AccessionNumber or StudyInstanceUID" if job.report_key is None else "its report key"
            refuse(job.rel, "missing_report", f"{Path(job.rel).name}: no report matches {field}", "image")
            return
        seen_uid.add(uid)
        if row is not None:
            identities[row.key].update(v for k, v in ident.items() if v and k not in NAME_TAGS)
            identities[row.key].update(row.identities)
            names[row.key].update(ident[k] for k in NAME_TAGS if ident.get(k))
        keep = {k: ident.get(k, "") for k in ("SOPInstanceUID", "StudyInstanceUID", "StudyDate")}
        paired.append((job, {"ident": keep, "images": res["images"]}, row, patient_id))

    waiting: dict[int, dict[str, Any]] = {}
    next_index = 0
    for res in decode_all(jobs, settings, workers, options.decode_timeout):
        waiting[res["index"]] = res
        while next_index in waiting:
            pair(scan.images[next_index], waiting.pop(next_index))
            next_index += 1

    # ----- reports: de-identify with the identities of their own studies, then sections and model text
    audit: collections.Counter[str] = collections.Counter()
    report_records: dict[str, dict[str, str]] = {}
    used = {row.key for _, _, row, _ in paired if row is not None}
    for key, row in reports.items():
        sections = _report_sections(row, identities[key], names[key], audit)
        row.text, row.sections = "", None  # the identifying original is no longer needed
        identities.pop(key, None)
        names.pop(key, None)
        text = _model_text(sections, text_policy)
        if not text.strip():
            refuse(row.where, "empty_report", f"{row.where}: empty report text under text policy {text_policy}",
                   "report")
            continue
        if key not in used and options.unpaired == "quarantine":
            why = "its image was quarantined" if key in failed_reports else "no image matches this report"
            refuse(row.where, "missing_image", f"{row.where}: {why}", "report")
            continue
        report_records[key] = {
            "report_id": pseudo.report(key), "patient_key": pseudo.patient(row.patient_id or key), "split": "",
            "findings": sections.get("findings", ""), "impression": sections.get("impression", ""),
            "indication": sections.get("indication", ""), "comparison": sections.get("comparison", ""),
            "history": sections.get("history", ""), "caption": sections.get("caption", ""), "text": text,
            "_labels": json.dumps(row.labels, sort_keys=True), "_source_split": row.source_split,
        }

    # ----- manifest rows (one per kept frame); images whose report turned out empty are refused
    manifest_rows, unpaired_rows = [], []
    accepted_inputs = 0
    for job, res, row, patient_id in paired:
        if row is not None and row.key not in report_records:
            refuse(job.rel, "missing_report", f"{Path(job.rel).name}: its report was quarantined (see "
                                              f"{row.where})", "image")
            continue
        accepted_inputs += 1
        ident = res["ident"]
        uid = ident.get("SOPInstanceUID") or job.image_uid or job.rel
        patient_key = pseudo.patient(patient_id)
        study = ident.get("StudyInstanceUID") or job.study_id or (row.study_id if row else "") or uid
        labels = report_records[row.key]["_labels"] if row is not None else json.dumps(job.labels, sort_keys=True)
        for frame, img in enumerate(res["images"]):
            meta = dict(img["meta"])
            meta.update({k: v for k, v in job.meta.items() if v not in (None, "")})
            image_id = pseudo.image(uid if len(res["images"]) == 1 else f"{uid}#frame{frame}")
            rel = f"images/{image_id}.png"
            (decoded_dir / img["png"]).rename(tmp / rel)
            record = {
                "image_id": image_id, "patient_key": patient_key, "study_key": pseudo.study(study),
                "report_id": report_records[row.key]["report_id"] if row is not None else "", "split": "",
                "modality": meta.get("modality", "OT"), "view": meta.get("view", "UNKNOWN"),
                "laterality": meta.get("laterality", "U"), "source_format": meta.get("source_format", ""),
                "image_sha256": img["sha256"], "path": rel, "photometric": meta.get("photometric", ""),
                "sex": meta.get("sex", "U"), "age_band": meta.get("age_band", "unknown"),
                "manufacturer": meta.get("manufacturer", ""), "body_part": meta.get("body_part", ""),
                "rows": int(meta.get("rows", 0) or 0), "columns": int(meta.get("columns", 0) or 0),
                "date_shift_days": pseudo.date_shift_days(patient_key), "source": scan.format, "labels": labels,
                "burned_in": str(meta.get("burned_in_annotation", "")).upper() == "YES",
                "phash": img["phash"], "dup_group": "", "frame": int(meta.get("frame", frame) or 0),
                "pixel_spacing": _spacing(meta.get("pixel_spacing")),
                "study_date_shifted": _shifted_date(ident.get("StudyDate", ""), pseudo.date_shift_days(patient_key)),
                "_source_split": job.source_split or (row.source_split if row else ""),
            }
            (manifest_rows if row is not None else unpaired_rows).append(record)
    if options.write_dicom:  # keep de-identified copies of accepted files only
        keep = {r["image_id"] for r in manifest_rows + unpaired_rows}
        for f in (tmp / "dicom").glob("*.dcm"):
            if f.stem not in keep:
                f.unlink()
    shutil.rmtree(decoded_dir)

    # ----- splits: patients linked by identical or near-identical images form one group
    paired.clear()  # memory stays flat: per-image metadata lives in one table from here on
    all_rows = pd.DataFrame(manifest_rows + unpaired_rows, columns=[*MANIFEST_COLUMNS, "_source_split"])
    manifest_rows.clear()
    unpaired_rows.clear()
    _release_memory()
    groups = splits.duplicate_groups(all_rows, options.near_duplicate_bits)
    all_rows["dup_group"] = all_rows["image_id"].map(groups.image_group)
    split_of, moved = splits.assign_group_splits(all_rows, groups, pseudo, options.split_ratios,
                                                 options.split_policy, scan.format, options.stratify_by)
    all_rows["split"] = all_rows["patient_key"].map(split_of)
    all_rows = all_rows.drop(columns="_source_split")
    is_paired = all_rows["report_id"] != ""
    manifest = all_rows[is_paired].sort_values("image_id", kind="stable").reset_index(drop=True)
    unpaired = all_rows[~is_paired].sort_values("image_id", kind="stable").reset_index(drop=True)
    splits.check_splits(all_rows)

    report_split = dict(zip(manifest["report_id"], manifest["split"]))
    for rec in report_records.values():
        rec["split"] = report_split.get(rec["report_id"]) or splits.split_of_patient(
            pseudo, rec["patient_key"], options.split_ratios)
    reports_df = pd.DataFrame(list(report_records.values()), columns=[*REPORT_COLUMNS, "_labels", "_source_split"])
    reports_df = reports_df.drop(columns=["_labels", "_source_split"])
    reports_df = reports_df.drop_duplicates("report_id").sort_values("report_id").reset_index(drop=True)

    manifest.to_parquet(tmp / "manifest.parquet", index=False)
    reports_df.to_parquet(tmp / "reports.parquet", index=False)
    _release_memory()
    if len(unpaired):
        unpaired.to_parquet(tmp / "unpaired_images.parquet", index=False)
    qdf = pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS).sort_values("source_path", kind="stable")
    qdf.to_csv(tmp / "quarantine.csv", index=False)
    q_images, q_reports = int((qdf["kind"] == "image").sum()), int((qdf["kind"] == "report").sum())
    if accepted_inputs + q_images != n_image_inputs or len(report_records) + q_reports != n_report_inputs:
        raise errors.MmclinicError("internal accounting error: accepted + quarantined != inputs")
    shards.write_shards(tmp, manifest, reports_df, options.shard_size)
    version = cards.frames_version(manifest, reports_df)
    flow = {
        "image_inputs": n_image_inputs,
        "decoded": n_image_inputs - decode_failures - sum(q["kind"] == "image" for q in scan.quarantine),
        "paired_with_report": sum(row is not None for _, _, row, _ in paired),
        "images_accepted": accepted_inputs,
        "report_inputs": n_report_inputs,
        "reports_accepted": len(report_records),
    }
    opts = dataclasses.asdict(options)
    opts["text_policy"] = text_policy
    cards.write_data_card(
        tmp, name=out.name, source_format=fmt, flow=flow, manifest=manifest, reports=reports_df,
        quarantine=qdf, audit=audit, options=opts, version=version, tables=scan.tables, notes=scan.notes,
        duplicates={"exact_groups": groups.n_exact, "near_duplicate_links": groups.n_near,
                    "groups_spanning_patients": groups.n_multi_patient, "moved_by_source_policy": moved},
        unpaired_images=len(unpaired), provenance=scan.provenance,
    )
    (tmp / "dataset.json").write_text(json.dumps({"version": version, "format": fmt, "name": out.name},
                                                 indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    cards.copy_into_repository(out / "data_card.md", out.name)
    counts = manifest["split"].value_counts().to_dict()
    return IngestSummary(dataset=out, accepted=accepted_inputs, quarantined=len(qdf), reports=len(reports_df),
                         splits={k: int(counts.get(k, 0)) for k in splits.SPLITS}, version=version)
