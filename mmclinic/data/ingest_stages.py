"""The stages of ``mmclinic ingest``, each a function from typed inputs to a typed result.

::

    scan_source      source folder  -> Scan         (listed images, one report per key, refusals)
    pair_images      decode results -> Pairing      (each decoded image with its report, in input order)
    build_reports    Scan, Pairing  -> ReportTable  (de-identified sections and model text)
    build_manifest   ... ReportTable -> ManifestRows (one row per kept frame; PNGs moved into images/)
    assign_splits    ManifestRows   -> SplitTables  (duplicate groups, patient-level splits, final tables)
    write_dataset    everything     -> Written      (parquet, quarantine.csv, shards, data card, swap-in)

:func:`mmclinic.data.ingest.ingest` composes them; decoding itself is
:func:`mmclinic.data.decode_pool.decode_all`. Every stage returns its own refusals
(``quarantine`` rows); the dataset's quarantine list is their concatenation in stage order.

Memory stays flat as archives grow: results are paired as they stream in (a reorder buffer
keeps "first file wins" deterministic) and keep only small metadata per image; a report's
identifying original text and the identities gathered for it are dropped as soon as it is
de-identified; per-image metadata goes into one table before the splits. Stages that hand
memory on say so: :func:`build_reports` empties the identities of its :class:`Pairing` and
the text of its reports, :func:`build_manifest` empties ``Pairing.pairs`` and
:func:`assign_splits` empties the rows of its :class:`ManifestRows`. Only ``Pairing.known`` (the
identity values themselves, as tokens) lives until the quarantine list is written: refused files are
named by their paths, and exports name folders and files after the patient.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmclinic import errors
from mmclinic.artifacts import DatasetDir
from mmclinic.data import cards, shards, splits
from mmclinic.data.decode_pool import NAME_TAGS
from mmclinic.data.sources import SCANNERS, CsvColumns, ImageJob, ReportRow, SourceScan
from mmclinic.phi.dicom_deid import Pseudonymizer
from mmclinic.phi.text_deid import KnownIdentities, deidentify_text
from mmclinic.text import model_text as model_text_mod
from mmclinic.text import reports as reports_mod

MANIFEST_COLUMNS = [
    "image_id", "patient_key", "study_key", "report_id", "split", "modality", "view", "laterality",
    "source_format", "image_sha256", "path", "photometric", "sex", "age_band", "manufacturer",
    "body_part", "rows", "columns", "date_shift_days", "source", "labels", "burned_in", "phash", "dup_group",
    "frame", "pixel_spacing", "study_date_shifted", "uid_source",
]
REPORT_COLUMNS = ["report_id", "patient_key", "split", "findings", "impression", "indication", "comparison",
                  "history", "caption", "text"]
QUARANTINE_COLUMNS = ["source_path", "reason_code", "message", "kind"]


def _refusal(where: str, reason: str, message: str, kind: str) -> dict[str, str]:
    """One quarantine.csv row."""
    return {"source_path": where, "reason_code": reason, "message": message, "kind": kind}


# --------------------------------------------------------------------------- workspace


@dataclasses.dataclass(frozen=True)
class Workspace:
    """The scratch folder a dataset is built in (``DATASET.partial``), swapped in at the end."""

    root: Path
    decoded: Path
    """Where the decoding workers write their PNGs (``{job index}-{frame}.png``)."""
    dicom: Path | None
    """De-identified DICOM copies (``--write-dicom``); ``None`` when not written."""


PREVIOUS_SUFFIX = ".mmclinic-previous"


def previous_dataset_path(out: Path) -> Path:
    """Where ingest keeps the previous dataset while it swaps the new one in (``DATASET.mmclinic-previous``)."""
    return out.with_name(out.name + PREVIOUS_SUFFIX)


def open_workspace(out: Path, write_dicom: bool) -> Workspace:
    """A clean ``DATASET.partial`` beside ``out``: an interrupted run leaves the previous dataset
    intact, and a re-run starts clean (no duplicates, nothing lost)."""
    root = out.with_name(out.name + ".partial")
    if root.exists():
        shutil.rmtree(root)
    ws = Workspace(root=root, decoded=root / "decoded", dicom=root / "dicom" if write_dicom else None)
    ws.decoded.mkdir(parents=True)
    (root / "images").mkdir()
    if ws.dicom is not None:
        ws.dicom.mkdir()
    return ws


# --------------------------------------------------------------------------- scan


@dataclasses.dataclass
class Scan:
    """What the source holds: images to decode and one report per key."""

    format: str
    source: SourceScan
    reports: dict[str, ReportRow]
    """One report per key, first row wins."""
    by_study: dict[str, ReportRow]
    """The same reports by study id (DICOM images pair by StudyInstanceUID when the accession misses)."""
    text_policy: str
    """The text policy asked for, else the source's default."""
    quarantine: list[dict[str, str]]
    """Inputs refused while listing, then repeated reports."""
    image_inputs: int
    report_inputs: int

    @property
    def images(self) -> list[ImageJob]:
        return self.source.images


def scan_source(source: Path, fmt: str, *, csv_columns: CsvColumns | None = None, image_dir: str | None = None,
                text_policy: str | None = None) -> Scan:
    """List the images and reports of ``source`` in format ``fmt`` (not ``auto``); keep one report per key.

    ``csv_columns`` (``csv``) and ``image_dir`` (``iu-xray``) as in :class:`mmclinic.data.ingest.IngestOptions`.
    """
    scanned = SCANNERS[fmt](source, columns=csv_columns or CsvColumns(), image_dir=image_dir)
    quarantine = list(scanned.quarantine)
    reports: dict[str, ReportRow] = {}
    by_study: dict[str, ReportRow] = {}
    for row in scanned.reports:
        if row.key in reports or (row.study_id and row.study_id in by_study and scanned.format == "dicom"):
            quarantine.append(_refusal(row.where, "duplicate", f"{row.where}: its accession number / study key "
                                                               "repeats an earlier report", "report"))
            continue
        reports[row.key] = row
        if row.study_id:
            by_study[row.study_id] = row
    return Scan(format=fmt, source=scanned, reports=reports, by_study=by_study,
                text_policy=text_policy or scanned.default_text_policy, quarantine=quarantine,
                image_inputs=len(scanned.images) + sum(q["kind"] == "image" for q in scanned.quarantine),
                report_inputs=len(scanned.reports) + sum(q["kind"] == "report" for q in scanned.quarantine))


def decode_jobs(scan: Scan) -> list[dict[str, Any]]:
    """The decode pool's jobs for the scanned images: ``index`` is the position in ``scan.images``."""
    return [{"index": i, "path": str(job.path)} for i, job in enumerate(scan.images)]


# --------------------------------------------------------------------------- pair


@dataclasses.dataclass(slots=True)
class PairedImage:
    """One decoded input image and what pairing kept of it."""

    job: ImageJob
    ident: dict[str, str]
    """SOPInstanceUID, StudyInstanceUID and StudyDate from the header (empty for non-DICOM)."""
    images: list[dict[str, Any]]
    """The decode pool's frames: ``png`` (file in the workspace), ``sha256``, ``phash``, ``meta``."""
    report: ReportRow | None
    patient_id: str
    uid_source: str = ""
    """DICOM: where the image's identifier came from (:data:`mmclinic.data.images.UID_SOURCES`: the tag
    SOPInstanceUID, else the file meta's, else derived from the file's bytes); empty for other images."""


@dataclasses.dataclass
class Pairing:
    """Decoded images paired with their reports, in input order."""

    pairs: list[PairedImage]
    identities: collections.defaultdict[str, set[str]]
    """Per report key: identifying values from its images' headers and its source row, to scrub its text."""
    names: collections.defaultdict[str, set[str]]
    """Per report key: person names from its images' headers."""
    decode_failures: int
    failed_reports: set[str]
    """Report keys whose image failed to decode (their refusal says so)."""
    paired_with_report: int
    """Images paired with a report (counted here, before later stages empty ``pairs``)."""
    quarantine: list[dict[str, str]]
    known: KnownIdentities = dataclasses.field(default_factory=KnownIdentities)
    """Every identity read from a header or a report row, refused files' included: quarantine.csv names files
    by their source path, and exports name folders and files after the patient (:func:`quarantine_table`)."""
    pixel_text: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """Frames searched for text in their pixels (``frames``), those with text (``with_text``) and its regions
    (``regions``), over every decoded file, refused ones included (``--burned-in quarantine|redact``)."""


def in_input_order(jobs: Sequence[ImageJob], results: Iterable[dict[str, Any]]
                   ) -> Iterator[tuple[ImageJob, dict[str, Any]]]:
    """``(job, result)`` in the order of ``jobs`` while results arrive in any order (by ``index``).

    Only results that arrived ahead of an earlier one wait, so "first file wins" stays
    deterministic however the workers finish.
    """
    waiting: dict[int, dict[str, Any]] = {}
    next_index = 0
    for res in results:
        waiting[res["index"]] = res
        while next_index in waiting:
            yield jobs[next_index], waiting.pop(next_index)
            next_index += 1


def pair_images(scan: Scan, results: Iterable[dict[str, Any]], unpaired: str = "quarantine") -> Pairing:
    """Pair each decoded image with its report as results stream in from the decode pool.

    An image pairs by its report key, else by the header's AccessionNumber, else its
    StudyInstanceUID. Refused: failed decodes (their reason), a repeated image
    (``duplicate``), no patient (``missing_patient``), no report with ``unpaired="quarantine"``
    (``missing_report``). Only the three header values the manifest needs are kept.
    """
    pairs: list[PairedImage] = []
    identities: collections.defaultdict[str, set[str]] = collections.defaultdict(set)
    names: collections.defaultdict[str, set[str]] = collections.defaultdict(set)
    quarantine: list[dict[str, str]] = []
    seen_uid: set[str] = set()
    decode_failures = 0
    failed_reports: set[str] = set()
    pixel_text: collections.Counter[str] = collections.Counter()
    known = KnownIdentities()
    for row in scan.reports.values():
        known.add(row.identities)
    known.add(job.patient_id for job in scan.images)  # mimic-cxr's pXXXXXXXX folders, a CSV's patient column
    for job, res in in_input_order(scan.images, results):
        pixel_text.update(res.get("pixel_text") or {})
        ident = res.get("ident") or {}  # a refused file's too: its identities are redacted from quarantine.csv
        known.add((v for k, v in ident.items() if k not in NAME_TAGS), (ident.get(k, "") for k in NAME_TAGS))
        if not res["ok"]:
            decode_failures += 1
            quarantine.append(_refusal(job.rel, res["reason"], res["message"], "image"))
            if job.report_key is not None:
                failed_reports.add(job.report_key)
            continue
        if job.report_key is not None:
            row = scan.reports.get(job.report_key)
        else:
            row = scan.reports.get(ident.get("AccessionNumber", "").strip()) or \
                scan.by_study.get(ident.get("StudyInstanceUID", "").strip())
        uid = ident.get("SOPInstanceUID") or job.image_uid or job.rel
        name = Path(job.rel).name
        if uid in seen_uid:
            what = {"SOPInstanceUID": "tag SOPInstanceUID", "MediaStorageSOPInstanceUID": "tag "
                    "MediaStorageSOPInstanceUID (it has no SOPInstanceUID)", "content_sha256": "its content "
                    "(it has no SOPInstanceUID)"}.get(res.get("uid_source", ""), "its image identifier")
            quarantine.append(_refusal(job.rel, "duplicate", f"{name}: {what} repeats an earlier file", "image"))
            continue
        patient_id = (job.patient_id or ident.get("PatientID", "") or (row.patient_id if row else "")).strip()
        if not patient_id:
            quarantine.append(_refusal(job.rel, "missing_patient", f"{name}: empty tag PatientID and no patient_id "
                                       "in the report row; patient-level splitting needs one", "image"))
            continue
        if row is None and unpaired == "quarantine":
            field = "tag AccessionNumber or StudyInstanceUID" if job.report_key is None else "its report key"
            quarantine.append(_refusal(job.rel, "missing_report", f"{name}: no report matches {field}", "image"))
            continue
        seen_uid.add(uid)
        if row is not None:
            identities[row.key].update(v for k, v in ident.items() if v and k not in NAME_TAGS)
            identities[row.key].update(row.identities)
            names[row.key].update(ident[k] for k in NAME_TAGS if ident.get(k))
        keep = {k: ident.get(k, "") for k in ("SOPInstanceUID", "StudyInstanceUID", "StudyDate")}
        pairs.append(PairedImage(job, keep, res["images"], row, patient_id, res.get("uid_source", "")))
    return Pairing(pairs=pairs, identities=identities, names=names, decode_failures=decode_failures,
                   failed_reports=failed_reports, paired_with_report=sum(p.report is not None for p in pairs),
                   quarantine=quarantine, known=known, pixel_text=pixel_text)


# --------------------------------------------------------------------------- reports


@dataclasses.dataclass
class ReportTable:
    """Accepted reports, de-identified, by report key (split still empty)."""

    records: dict[str, dict[str, str]]
    """``REPORT_COLUMNS`` plus ``_labels`` (JSON) and ``_source_split``."""
    audit: collections.Counter[str]
    """Text replacements by de-identification rule, for the data card."""
    quarantine: list[dict[str, str]]


def report_sections(row: ReportRow, identities: set[str], names: set[str],
                    audit: collections.Counter[str]) -> tuple[dict[str, str], str]:
    """De-identify first, then split into sections (or clean the sections the source already gives).

    Also returns the de-identified report as one text (sections a source gives separately are
    written as a report: :func:`mmclinic.text.model_text.compose_report`), the input of the model text.
    """
    if row.sections is not None:
        sections = {k: reports_mod.normalize_whitespace(deidentify_text(v, identities, audit, names))
                    for k, v in row.sections.items()}
        return sections, model_text_mod.compose_report(sections)
    text = deidentify_text(row.text, identities, audit, names)
    parsed = reports_mod.parse_sections(text)
    return {"findings": parsed.findings, "impression": parsed.impression, "indication": parsed.indication,
            "history": parsed.history, "comparison": parsed.comparison, "other": parsed.other}, text


def build_reports(scan: Scan, pairing: Pairing, pseudo: Pseudonymizer, unpaired: str = "quarantine") -> ReportTable:
    """De-identify every report with the identities of its own studies, then sections and model text.

    Refused: an empty model text (``empty_report``), and with ``unpaired="quarantine"`` a report
    no accepted image pairs with (``missing_image``). Each report's original text and the
    identities gathered for it are dropped as soon as it is de-identified (``scan.reports``'
    rows and ``pairing.identities`` / ``pairing.names`` are emptied as it goes).
    """
    audit: collections.Counter[str] = collections.Counter()
    records: dict[str, dict[str, str]] = {}
    quarantine: list[dict[str, str]] = []
    used = {p.report.key for p in pairing.pairs if p.report is not None}
    policy = scan.text_policy
    deidentified: dict[str, tuple[dict[str, str], str]] = {}
    for key, row in scan.reports.items():
        deidentified[key] = report_sections(row, pairing.identities[key], pairing.names[key], audit)
        row.text, row.sections = "", None  # the identifying original is no longer needed
        pairing.identities.pop(key, None)
        pairing.names.pop(key, None)
    # The model text: the one definition every path uses (and the exported graph), in one batch.
    texts = model_text_mod.model_text([d[1] for d in deidentified.values()], model_text_mod.TextConfig(policy))
    for (key, (sections, _)), text in zip(deidentified.items(), texts):
        row = scan.reports[key]
        if not text.strip():
            quarantine.append(_refusal(row.where, "empty_report",
                                       f"{row.where}: empty report text under text policy {policy}", "report"))
            continue
        if key not in used and unpaired == "quarantine":
            why = "its image was quarantined" if key in pairing.failed_reports else "no image matches this report"
            quarantine.append(_refusal(row.where, "missing_image", f"{row.where}: {why}", "report"))
            continue
        records[key] = {
            "report_id": pseudo.report(key), "patient_key": pseudo.patient(row.patient_id or key), "split": "",
            "findings": sections.get("findings", ""), "impression": sections.get("impression", ""),
            "indication": sections.get("indication", ""), "comparison": sections.get("comparison", ""),
            "history": sections.get("history", ""), "caption": sections.get("caption", ""), "text": text,
            "_labels": json.dumps(row.labels, sort_keys=True), "_source_split": row.source_split,
        }
    return ReportTable(records=records, audit=audit, quarantine=quarantine)


# --------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class ManifestRows:
    """One row per kept frame (``MANIFEST_COLUMNS`` plus ``_source_split``; split and dup_group empty)."""

    paired: list[dict[str, Any]]
    unpaired: list[dict[str, Any]]
    """Rows of images without a report (``--unpaired keep``)."""
    accepted_inputs: int
    """Input images accepted (a multi-frame file kept as several frames counts once)."""
    quarantine: list[dict[str, str]]
    redacted: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """Accepted images whose stored pixels had text blacked out (``images``) and its regions (``regions``)."""


def spacing_text(value: Any) -> str:
    """Pixel spacing (row\\column, mm) as text; empty when the file has none."""
    if value is None or value == "":
        return ""
    values = value if isinstance(value, (list, tuple)) else [value]
    return "\\".join(f"{float(v):g}" for v in values)


def shifted_date(study_date: str, shift_days: int) -> str:
    """The study date moved by the patient's shift (ISO); intervals between a patient's studies are kept."""
    import datetime as dt

    try:
        day = dt.datetime.strptime(study_date.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    return (day + dt.timedelta(days=shift_days)).isoformat()


def build_manifest(scan: Scan, pairing: Pairing, reports: ReportTable, pseudo: Pseudonymizer,
                   ws: Workspace) -> ManifestRows:
    """Manifest rows for the paired images; their PNGs move from the workspace's ``decoded/`` to ``images/``.

    An image whose report was refused is refused too (``missing_report``). De-identified
    DICOM copies of refused files are deleted, ``decoded/`` is removed, and ``pairing.pairs``
    is emptied: per-image metadata lives in these rows from here on.
    """
    paired_rows: list[dict[str, Any]] = []
    unpaired_rows: list[dict[str, Any]] = []
    quarantine: list[dict[str, str]] = []
    accepted = 0
    redacted: collections.Counter[str] = collections.Counter()
    for p in pairing.pairs:
        job, row = p.job, p.report
        if row is not None and row.key not in reports.records:
            quarantine.append(_refusal(job.rel, "missing_report", f"{Path(job.rel).name}: its report was quarantined "
                                                                  f"(see {row.where})", "image"))
            continue
        accepted += 1
        ident = p.ident
        uid = ident.get("SOPInstanceUID") or job.image_uid or job.rel
        patient_key = pseudo.patient(p.patient_id)
        study = ident.get("StudyInstanceUID") or job.study_id or (row.study_id if row else "") or uid
        labels = reports.records[row.key]["_labels"] if row is not None else json.dumps(job.labels, sort_keys=True)
        for frame, img in enumerate(p.images):
            meta = dict(img["meta"])
            meta.update({k: v for k, v in job.meta.items() if v not in (None, "")})
            image_id = pseudo.image(uid if len(p.images) == 1 else f"{uid}#frame{frame}")
            text_regions = int(meta.get("pixel_text_regions") or 0)  # blacked out in the stored image
            redacted.update({"images": int(text_regions > 0), "regions": text_regions})
            rel = f"images/{image_id}.png"
            (ws.decoded / img["png"]).rename(ws.root / rel)
            record = {
                "image_id": image_id, "patient_key": patient_key, "study_key": pseudo.study(study),
                "report_id": reports.records[row.key]["report_id"] if row is not None else "", "split": "",
                "modality": meta.get("modality", "OT"), "view": meta.get("view", "UNKNOWN"),
                "laterality": meta.get("laterality", "U"), "source_format": meta.get("source_format", ""),
                "image_sha256": img["sha256"], "path": rel, "photometric": meta.get("photometric", ""),
                "sex": meta.get("sex", "U"), "age_band": meta.get("age_band", "unknown"),
                "manufacturer": meta.get("manufacturer", ""), "body_part": meta.get("body_part", ""),
                "rows": int(meta.get("rows", 0) or 0), "columns": int(meta.get("columns", 0) or 0),
                "date_shift_days": pseudo.date_shift_days(patient_key), "source": scan.source.format,
                "labels": labels,
                "burned_in": str(meta.get("burned_in_annotation", "")).upper() == "YES" or text_regions > 0,
                "phash": img["phash"], "dup_group": "", "frame": int(meta.get("frame", frame) or 0),
                "pixel_spacing": spacing_text(meta.get("pixel_spacing")),
                "study_date_shifted": shifted_date(ident.get("StudyDate", ""), pseudo.date_shift_days(patient_key)),
                "uid_source": p.uid_source,
                "_source_split": job.source_split or (row.source_split if row else ""),
            }
            (paired_rows if row is not None else unpaired_rows).append(record)
    if ws.dicom is not None:  # keep de-identified copies of accepted files only
        keep = {r["image_id"] for r in paired_rows + unpaired_rows}
        for f in ws.dicom.glob("*.dcm"):
            if f.stem not in keep:
                f.unlink()
    shutil.rmtree(ws.decoded)
    pairing.pairs.clear()
    return ManifestRows(paired=paired_rows, unpaired=unpaired_rows, accepted_inputs=accepted, quarantine=quarantine,
                        redacted=redacted)


# --------------------------------------------------------------------------- splits


@dataclasses.dataclass
class SplitTables:
    """The dataset's tables, every row with its split."""

    manifest: pd.DataFrame
    """Paired images, ``MANIFEST_COLUMNS``, sorted by image_id."""
    unpaired: pd.DataFrame
    """Images without a report (``unpaired_images.parquet``), same columns."""
    reports: pd.DataFrame
    """``REPORT_COLUMNS``, sorted by report_id."""
    groups: splits.DuplicateGroups
    moved: int
    """Patients moved by the source split policy to keep a duplicate group together."""


def release_memory() -> None:
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


def assign_splits(rows: ManifestRows, reports: ReportTable, pseudo: Pseudonymizer, *, source_format: str,
                  ratios: tuple[float, float, float], policy: str = "hash", stratify_by: str | None = None,
                  near_duplicate_bits: int = 20) -> SplitTables:
    """Split by patient: patients linked by identical or near-identical images form one group and
    share a split; a report takes its images' split (else its patient's keyed-hash split).

    ``rows``' lists are emptied once they are in one table. Raises :class:`errors.MmclinicError`
    if a patient or a duplicate group would span two splits.
    """
    all_rows = pd.DataFrame(rows.paired + rows.unpaired, columns=[*MANIFEST_COLUMNS, "_source_split"])
    rows.paired.clear()
    rows.unpaired.clear()
    release_memory()
    groups = splits.duplicate_groups(all_rows, near_duplicate_bits)
    all_rows["dup_group"] = all_rows["image_id"].map(groups.image_group)
    split_of, moved = splits.assign_group_splits(all_rows, groups, pseudo, ratios, policy, source_format, stratify_by)
    all_rows["split"] = all_rows["patient_key"].map(split_of)
    all_rows = all_rows.drop(columns="_source_split")
    is_paired = all_rows["report_id"] != ""
    manifest = all_rows[is_paired].sort_values("image_id", kind="stable").reset_index(drop=True)
    unpaired = all_rows[~is_paired].sort_values("image_id", kind="stable").reset_index(drop=True)
    splits.check_splits(all_rows)

    report_split = dict(zip(manifest["report_id"], manifest["split"]))
    for rec in reports.records.values():
        rec["split"] = report_split.get(rec["report_id"]) or splits.split_of_patient(pseudo, rec["patient_key"],
                                                                                     ratios)
    reports_df = pd.DataFrame(list(reports.records.values()), columns=[*REPORT_COLUMNS, "_labels", "_source_split"])
    reports_df = reports_df.drop(columns=["_labels", "_source_split"])
    reports_df = reports_df.drop_duplicates("report_id").sort_values("report_id").reset_index(drop=True)
    return SplitTables(manifest=manifest, unpaired=unpaired, reports=reports_df, groups=groups, moved=moved)


# --------------------------------------------------------------------------- write


@dataclasses.dataclass(frozen=True)
class Written:
    dataset: Path
    version: str
    quarantined: int


def quarantine_table(scan: Scan, pairing: Pairing, reports: ReportTable, rows: ManifestRows) -> pd.DataFrame:
    """Every stage's refusals, in stage order, sorted by source path (stable).

    Paths and messages lose the identities the archive holds (``[REDACTED]``): a folder or file named
    after a patient, an MRN or an accession number names a refused file by its path."""
    refused = [*scan.quarantine, *pairing.quarantine, *reports.quarantine, *rows.quarantine]
    table = pd.DataFrame(refused, columns=QUARANTINE_COLUMNS)
    for col in ("source_path", "message"):
        table[col] = [pairing.known.redact(v) if isinstance(v, str) else v for v in table[col]]
    return table.sort_values("source_path", kind="stable")


def flow_counts(scan: Scan, pairing: Pairing, reports: ReportTable, rows: ManifestRows) -> dict[str, int]:
    """The data card's counts after each step: what the source held, what decoded, what paired,
    what was accepted."""
    return {
        "image_inputs": scan.image_inputs,
        "decoded": len(scan.images) - pairing.decode_failures,
        "paired_with_report": pairing.paired_with_report,
        "images_accepted": rows.accepted_inputs,
        "report_inputs": scan.report_inputs,
        "reports_accepted": len(reports.records),
    }


def pixel_text_counts(pairing: Pairing, rows: ManifestRows, quarantine: pd.DataFrame,
                      ocr_engine: str | None) -> dict[str, Any]:
    """The data card's account of text searched for in pixels (``ocr_engine`` None: not searched)."""
    if ocr_engine is None:
        return {"searched": False}
    return {"searched": True, "engine": ocr_engine, "frames_scanned": pairing.pixel_text["frames"],
            "frames_with_text": pairing.pixel_text["with_text"],
            "files_quarantined": int((quarantine["reason_code"] == "burned_in_text").sum()),
            "images_redacted": rows.redacted["images"], "regions_redacted": rows.redacted["regions"]}


def write_dataset(ws: Workspace, out: Path, scan: Scan, pairing: Pairing, reports: ReportTable, rows: ManifestRows,
                  tables: SplitTables, *, card_options: dict[str, Any], shard_size: int,
                  ocr_engine: str | None = None) -> Written:
    """Write the tables, shards, data card and ``dataset.json`` into the workspace, check that every
    input is accepted or quarantined, then swap the workspace in as ``out`` (and copy the data card
    into the repository's ``data_cards/`` when run from its root). ``ocr_engine`` names the engine that
    searched the pixels for text (``--burned-in quarantine|redact``), ``None`` when they were not searched."""
    tmp = ws.root
    layout = DatasetDir(tmp)  # the folder's file names are defined once, in DatasetDir
    tables.manifest.to_parquet(layout.manifest_path, index=False)
    tables.reports.to_parquet(layout.reports_path, index=False)
    release_memory()
    if len(tables.unpaired):
        tables.unpaired.to_parquet(tmp / "unpaired_images.parquet", index=False)
    qdf = quarantine_table(scan, pairing, reports, rows)
    qdf.to_csv(layout.quarantine_path, index=False)
    q_images, q_reports = int((qdf["kind"] == "image").sum()), int((qdf["kind"] == "report").sum())
    if rows.accepted_inputs + q_images != scan.image_inputs or len(reports.records) + q_reports != scan.report_inputs:
        raise errors.MmclinicError("internal accounting error: accepted + quarantined != inputs")
    shards.write_shards(tmp, tables.manifest, tables.reports, shard_size)
    version = cards.frames_version(tables.manifest, tables.reports)
    groups = tables.groups
    cards.write_data_card(
        tmp, name=out.name, source_format=scan.format, flow=flow_counts(scan, pairing, reports, rows),
        manifest=tables.manifest, reports=tables.reports, quarantine=qdf, audit=reports.audit, options=card_options,
        version=version, tables=scan.source.tables, notes=scan.source.notes,
        duplicates={"exact_groups": groups.n_exact, "near_duplicate_links": groups.n_near,
                    "groups_spanning_patients": groups.n_multi_patient, "moved_by_source_policy": tables.moved},
        unpaired_images=len(tables.unpaired), provenance=scan.source.provenance,
        pixel_text=pixel_text_counts(pairing, rows, qdf, ocr_engine),
    )
    layout.info_path.write_text(json.dumps({"version": version, "format": scan.format, "name": out.name,
                                                  "text": model_text_mod.TextConfig(scan.text_policy).to_dict()},
                                                 indent=2) + "\n")
    # The previous dataset is moved aside whole, never deleted in place: a run killed here leaves it
    # complete (as DATASET or DATASET.mmclinic-previous), and the next run removes what is left of it.
    # The name is one only this code makes, so that a user's own DATASET.old is never touched.
    old = previous_dataset_path(out)
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    cards.copy_into_repository(DatasetDir(out).data_card_path, out.name)
    return Written(dataset=out, version=version, quarantined=len(qdf))
