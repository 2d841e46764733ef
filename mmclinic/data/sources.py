"""Source layouts ``mmclinic ingest`` reads, each turned into image jobs and report rows.

A source adapter only lists what the source holds; decoding, pairing, de-identification
and splitting are common to all sources (see :mod:`mmclinic.data.ingest`). Every input an
adapter sees ends as an image job, a report row, or a quarantine row with its reason.

Layouts:
- ``dicom``: a DICOM tree plus ``reports.csv`` keyed by accession number or study UID
  (optionally ``labels.csv``, as ``mmclinic synth`` writes it).
- ``csv``: one CSV with an image path column and a report text column (names configurable).
- ``medpix2``: MedPix 2.0's published JSONL layout (per-case findings, per-image captions).
- ``iu-xray``: Open-i's ``indiana_reports.csv`` + ``indiana_projections.csv`` + an image folder.
- ``mimic-cxr``: ``pNN/pXXXXXXXX/sYYYYYYYY/*.dcm|jpg`` with reports ``sYYYYYYYY.txt``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any, Callable

from mmclinic import errors

FORMATS = ("auto", "dicom", "medpix2", "iu-xray", "mimic-cxr", "csv")
_MIMIC_STUDY = re.compile(r"^s\d+$")
_MIMIC_PATIENT = re.compile(r"^p\d+$")


@dataclasses.dataclass
class ReportRow:
    """One report as the source holds it (identifying text included; scrubbed later)."""

    key: str
    where: str
    """Where it came from, for messages: ``file:line``. Never the text."""
    text: str = ""
    sections: dict[str, str] | None = None
    """Sections the source already separates (IU X-ray, MedPix); otherwise parsed from ``text``."""
    patient_id: str = ""
    study_id: str = ""
    identities: set[str] = dataclasses.field(default_factory=set)
    names: set[str] = dataclasses.field(default_factory=set)
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    source_split: str = ""


@dataclasses.dataclass
class ImageJob:
    """One image file to decode, with what the source says about it."""

    path: Path
    rel: str
    report_key: str | None = None
    """``None``: paired by the DICOM header's AccessionNumber / StudyInstanceUID."""
    patient_id: str = ""
    study_id: str = ""
    image_uid: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    source_split: str = ""


@dataclasses.dataclass
class SourceScan:
    format: str
    images: list[ImageJob]
    reports: list[ReportRow]
    quarantine: list[dict[str, str]]
    """Inputs refused while listing; ``kind`` is ``image`` or ``report``."""
    tables: list[str]
    default_text_policy: str = "both"
    notes: list[str] = dataclasses.field(default_factory=list)
    """Facts about the source for the data card's known limitations."""
    provenance: str = "supplied by the user; record its origin and licence in this card"


@dataclasses.dataclass(frozen=True)
class CsvColumns:
    image: str = "image_path"
    text: str = "report_text"
    patient: str = "patient_id"
    study: str = "study_id"
    split: str = ""
    """Optional column with the source's own split (train/val/test) for ``--split-policy source``."""


# --------------------------------------------------------------------------- helpers


def _read_text(path: Path, rel: str) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise errors.UsageError(f"{rel}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise errors.UsageError(f"{rel}: cannot be read ({type(exc).__name__})") from None


_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape


def _read_csv(path: Path, rel: str, required: list[str], quarantine: list[dict[str, str]] | None = None,
              kind: str = "report", any_of: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a CSV table as dicts, ``_line`` being the line the row starts on (the header is 1).

    A row that is not UTF-8 text goes to ``quarantine`` (as ``kind``) with its line and field
    named, never its value, and the table goes on; without a quarantine list (tables that are not
    inputs, like labels.csv) such a row is an error. A table the CSV parser cannot read (an
    unbalanced quote, a field beyond the size limit) is an error naming the line: rows after it
    cannot be trusted to be what they seem.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise errors.UsageError(f"{rel}: cannot be read ({type(exc).__name__})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)

    def parse_error(exc: csv.Error) -> errors.UsageError:
        return errors.UsageError(f"{rel}: not a readable CSV ({exc.__class__.__name__} near line {reader.line_num})")

    try:
        fields = next(reader, [])
    except csv.Error as exc:
        raise parse_error(exc) from None
    if any(_SURROGATE.search(f) for f in fields):
        raise errors.UsageError(f"{rel}: the header row is not UTF-8 text")
    missing = [c for c in required if c not in fields]
    if missing:
        raise errors.UsageError(f"{rel}: missing column(s) {', '.join(missing)}")
    if any_of and not any(c in fields for c in any_of):
        raise errors.UsageError(f"{rel}: missing column {any_of[0]} (or {' or '.join(any_of[1:])})")
    rows = []
    while True:
        line = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise parse_error(exc) from None
        if not values:
            continue  # a blank line
        bad = [fields[i] if i < len(fields) else "(beyond the header)" for i, v in enumerate(values)
               if _SURROGATE.search(v)]
        if bad:
            message = f"{rel}:{line}: field {bad[0]} is not UTF-8 text"
            if quarantine is None:
                raise errors.UsageError(message)
            quarantine.append({"source_path": f"{rel}:{line}", "reason_code": "bad_text", "kind": kind,
                               "message": message})
            continue
        row: dict[str, Any] = dict(zip(fields, values))
        row.update({f: None for f in fields[len(values):]})
        if len(values) > len(fields):
            row[None] = values[len(fields):]  # type: ignore[index] - as csv.DictReader keeps extras
        row["_line"] = str(line)
        rows.append(row)
    return rows


def _image_files(root: Path, skip: set[Path]) -> list[Path]:
    """Files under ``root`` (symbolic links to files included; linked folders are not descended)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p not in skip and not p.name.startswith("."))


_DRIVE = re.compile(r"^[A-Za-z]:")


def outside_source(path: Path, source: Path) -> str | None:
    """Why ``path`` is not inside ``source`` once symbolic links are followed; None when it is."""
    try:
        real, top = path.resolve(), source.resolve()
    except (OSError, RuntimeError):  # a symbolic link loop
        return "cannot be resolved (a loop of symbolic links)"
    if real != top and not real.is_relative_to(top):
        return "is a symbolic link that resolves outside the source folder"
    return None


def unsafe_path(value: str, base: Path, source: Path) -> str | None:
    """Why the image path ``value`` that a table names must not be read, or None when it may.

    ``value`` is relative to the folder ``base`` inside the ``source`` folder. Refused: an
    absolute path (POSIX, a Windows drive or a UNC path), a NUL byte, ``..`` components that climb
    out of ``base`` (``/`` and ``\\`` both count as separators), and a path whose real location
    (symbolic links followed) is outside ``source``. The reason names no part of the path.
    """
    if "\0" in value:
        return "contains a NUL byte"
    if value.startswith(("/", "\\")) or _DRIVE.match(value) or Path(value).is_absolute():
        return "is an absolute path (image paths must be relative to the source folder)"
    depth = 0
    for part in re.split(r"[/\\]", value):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "climbs out of its folder with '..'"
        elif part not in ("", "."):
            depth += 1
    return outside_source(base / value, source)


def _refuse_path(quarantine: list[dict[str, str]], where: str, message: str, kind: str = "image") -> None:
    quarantine.append({"source_path": where, "reason_code": errors.UnsafePath.reason_code, "kind": kind,
                       "message": message})


def _sex(value: Any) -> str:
    v = str(value or "").strip().lower()
    return {"male": "M", "m": "M", "female": "F", "f": "F"}.get(v, "U")


def _age_band_years(value: Any) -> str:
    from mmclinic.data.images import age_band

    try:
        years = int(float(str(value).strip()))
    except (TypeError, ValueError):
        return "unknown"
    return age_band(f"{years:03d}Y") if years >= 0 else "unknown"


# --------------------------------------------------------------------------- detection


def detect_format(source: Path) -> str:
    """Guess the source layout from the files it holds."""
    if source.is_file() and source.suffix.lower() == ".csv":
        return "csv"
    if (source / "splitted_dataset").is_dir() or any(source.glob("descriptions_*.jsonl")):
        return "medpix2"
    if (source / "indiana_reports.csv").is_file():
        return "iu-xray"
    if (source / "reports.csv").is_file():
        return "dicom"
    root = source / "files" if (source / "files").is_dir() else source
    for group in sorted(root.glob("p*"))[:5]:
        if group.is_dir() and any(_MIMIC_PATIENT.match(p.name) for p in group.iterdir() if p.is_dir()):
            return "mimic-cxr"
    csvs = sorted(source.glob("*.csv"))
    if len(csvs) == 1:
        return "csv"
    raise errors.UsageError(
        f"SOURCE {source.name}: cannot detect its format; pass --format (one of {', '.join(FORMATS[1:])})"
    )


# --------------------------------------------------------------------------- dicom


def scan_dicom(source: Path, **_: Any) -> SourceScan:
    reports_csv = source / "reports.csv"
    if not reports_csv.is_file():
        raise errors.UsageError(f"SOURCE {source.name}: reports.csv not found (a dicom source needs one)")
    quarantine: list[dict[str, str]] = []
    rows = _read_csv(reports_csv, "reports.csv", ["report_text"], quarantine, "report",
                     any_of=("accession_number", "study_instance_uid"))
    labels = _synth_labels(source / "labels.csv")
    reports: list[ReportRow] = []
    for row in rows:
        where = f"reports.csv:{row['_line']}"
        acc = (row.get("accession_number") or "").strip()
        uid = (row.get("study_instance_uid") or "").strip()
        if not (acc or uid):
            quarantine.append({"source_path": where, "reason_code": "bad_input", "kind": "report",
                               "message": f"{where}: empty field accession_number"})
            continue
        rep = ReportRow(key=acc or uid, where=where, text=row.get("report_text") or "",
                        patient_id=(row.get("patient_id") or "").strip(), study_id=uid or acc,
                        labels=labels.get(acc) or labels.get(uid) or {})
        rep.identities.update(v for v in (rep.patient_id, acc, uid) if v)
        reports.append(rep)
    tables = {reports_csv, source / "labels.csv"}
    images = []
    for p in _image_files(source, tables):
        rel = p.relative_to(source).as_posix()
        why = outside_source(p, source) if p.is_symlink() else None  # rglob does not descend linked folders
        if why:
            _refuse_path(quarantine, rel, f"{p.name}: {why}; it is not read")
            continue
        images.append(ImageJob(path=p, rel=rel))
    return SourceScan("dicom", images, reports, quarantine, ["reports.csv"] + (
        ["labels.csv"] if (source / "labels.csv").is_file() else []))


def _synth_labels(path: Path) -> dict[str, dict[str, Any]]:
    """``labels.csv`` as ``mmclinic synth`` writes it: findings per study, for evaluation."""
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    for row in _read_csv(path, path.name, ["finding"]):
        for key in (row.get("accession_number"), row.get("study_instance_uid")):
            if not key:
                continue
            found = out.setdefault(key, {"findings": []})["findings"]
            name = (row.get("finding") or "").strip()
            if name and name != "no_finding" and name not in found:
                found.append(name)
    return out


# --------------------------------------------------------------------------- csv


def scan_csv(source: Path, columns: CsvColumns = CsvColumns(), **_: Any) -> SourceScan:
    if source.is_file():
        table = source
        root = source.parent
    else:
        csvs = sorted(source.glob("*.csv"))
        if len(csvs) != 1:
            raise errors.UsageError(f"SOURCE {source.name}: a csv source needs exactly one .csv file at its top "
                                    f"level (found {len(csvs)}); or pass the CSV file itself as SOURCE")
        table, root = csvs[0], source
    required = [columns.image, columns.text, columns.patient]
    quarantine: list[dict[str, str]] = []
    rows = _read_csv(table, table.name, required, quarantine, "image")
    reports: dict[str, ReportRow] = {}
    images: list[ImageJob] = []
    for row in rows:
        where = f"{table.name}:{row['_line']}"
        image = (row.get(columns.image) or "").strip()
        text = row.get(columns.text) or ""
        patient = (row.get(columns.patient) or "").strip()
        study = (row.get(columns.study) or "").strip() if columns.study in row else ""
        problem = ("image", f"empty field {columns.image}") if not image else \
            ("patient", f"empty field {columns.patient}") if not patient else None
        why = unsafe_path(image, root, root) if image else None
        if why:
            _refuse_path(quarantine, where, f"{where}: field {columns.image} {why}; it is not read")
            continue
        if problem:
            quarantine.append({"source_path": where, "reason_code": "missing_patient" if problem[0] == "patient"
                               else "bad_input", "kind": "image", "message": f"{where}: {problem[1]}"})
            continue
        key = f"{patient}/{study}" if study else where
        if key not in reports:
            rep = ReportRow(key=key, where=where, text=text, patient_id=patient, study_id=study or where,
                            source_split=(row.get(columns.split) or "").strip().lower() if columns.split else "")
            rep.identities.update(v for v in (patient, study) if v)
            reports[key] = rep
        elif text.strip() and text.strip() != reports[key].text.strip():
            quarantine.append({"source_path": where, "reason_code": "conflicting_report", "kind": "image",
                               "message": f"{where}: field {columns.text} differs from an earlier row of the "
                                          f"same {columns.study}"})
            continue
        images.append(ImageJob(path=root / image, rel=f"{table.name}:{row['_line']}", report_key=key, patient_id=patient,
                               study_id=study or where, image_uid=f"{table.name}:{image}",
                               source_split=reports[key].source_split))
    return SourceScan("csv", images, list(reports.values()), quarantine, [table.name])


# --------------------------------------------------------------------------- medpix2


def _jsonl(path: Path, rel: str) -> list[tuple[int, dict[str, Any] | None]]:
    """(line number, object) per non-blank line; None for a line that is not UTF-8 JSON of an object."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise errors.UsageError(f"{rel}: cannot be read ({type(exc).__name__})") from None
    out = []
    for i, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        out.append((i, obj if isinstance(obj, dict) else None))
    return out


def _medpix_modality(kind: Any) -> str:
    k = _scalar_text(kind).strip().upper()
    return {"CT": "CT", "MRI": "MR", "MR": "MR"}.get(k, k or "OT")


def _scalar_text(value: Any) -> str:
    """A JSON field as text: a string, or a number written out; anything else (a list, an object) is empty."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return ""


def _key(value: Any) -> str:
    """A JSON identifier (a string or an integer) as text; empty when it is blank or anything else."""
    text = _scalar_text(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    return text if text.strip() else ""


def scan_medpix2(source: Path, **_: Any) -> SourceScan:
    base = source / "splitted_dataset" if (source / "splitted_dataset").is_dir() else source
    image_dir = source / "images"
    if not image_dir.is_dir():
        raise errors.UsageError(f"SOURCE {source.name}: images/ folder not found (medpix2 layout)")
    splits = sorted({p.stem.split("_", 1)[1] for p in base.glob("descriptions_*.jsonl")})
    if not splits:
        raise errors.UsageError(f"SOURCE {source.name}: no descriptions_*.jsonl found (medpix2 layout)")
    quarantine: list[dict[str, str]] = []
    images: list[ImageJob] = []
    reports: list[ReportRow] = []
    tables: list[str] = []
    referenced: set[Path] = set()
    for split in splits:
        cases: dict[str, dict[str, Any]] = {}
        data_file = base / f"data_{split}.jsonl"
        case_seen: set[str] = set()
        if data_file.is_file():
            tables.append(data_file.relative_to(source).as_posix())
            for line, obj in _jsonl(data_file, data_file.name):
                where = f"{data_file.name}:{line}"
                if obj is None or not _key(obj.get("U_id")) or not isinstance(obj.get("Case") or {}, dict):
                    quarantine.append({"source_path": where, "reason_code": "bad_input", "kind": "report",
                                       "message": f"{where}: not UTF-8 JSON of an object with field U_id (a string "
                                                  "or an integer) and field Case an object"})
                    continue
                cases[_key(obj["U_id"])] = dict(obj, _where=where)
        desc_file = base / f"descriptions_{split}.jsonl"
        tables.append(desc_file.relative_to(source).as_posix())
        for line, obj in _jsonl(desc_file, desc_file.name):
            where = f"{desc_file.name}:{line}"
            if obj is None or not _key(obj.get("image")) or not _key(obj.get("U_id")) or \
                    not isinstance(obj.get("Description") or {}, dict):
                quarantine.append({"source_path": where, "reason_code": "bad_input", "kind": "image",
                                   "message": f"{where}: not UTF-8 JSON of an object with fields image and U_id (strings "
                                              "or integers) and field Description an object"})
                continue
            name, case_id = _key(obj["image"]), _key(obj["U_id"])
            why = unsafe_path(f"{name}.png", image_dir, source)
            if why:
                referenced.add(image_dir / f"{name}.png")  # accounted for by this refusal
                _refuse_path(quarantine, where, f"{where}: field image {why}; it is not read")
                continue
            desc = obj.get("Description") or {}
            case = cases.get(case_id, {})
            case_seen.add(case_id)
            body = case.get("Case") or {}
            sections = {
                "caption": _scalar_text(desc.get("Caption")),
                "findings": _scalar_text(body.get("Findings")),
                "impression": _scalar_text(body.get("Case Diagnosis")),
                "history": _scalar_text(body.get("History")),
            }
            labels = {"modality": _medpix_modality(obj.get("Type", "")),
                      "plane": _scalar_text(desc.get("Plane")).strip() or "unknown",
                      "location_category": _scalar_text(obj.get("Location Category")).strip() or "unknown"}
            rep = ReportRow(key=name, where=where, sections=sections, patient_id=case_id, study_id=case_id,
                            labels=labels, source_split=split)
            reports.append(rep)
            path = image_dir / f"{name}.png"
            referenced.add(path)
            images.append(ImageJob(
                path=path, rel=f"images/{name}.png", report_key=name, patient_id=case_id, study_id=case_id,
                image_uid=name, labels=labels, source_split=split,
                meta={"modality": labels["modality"], "view": labels["plane"].upper(), "sex": _sex(desc.get("Sex")),
                      "age_band": _age_band_years(desc.get("Age")), "body_part": labels["location_category"]}))
        for case_id, case in cases.items():
            if case_id not in case_seen:  # its text reaches the dataset only through its images' reports
                quarantine.append({"source_path": case["_where"], "reason_code": "missing_image", "kind": "report",
                                   "message": f"{case['_where']}: case has no image in descriptions_{split}.jsonl"})
    for path in _image_files(image_dir, referenced):
        why = outside_source(path, source) if path.is_symlink() or image_dir.is_symlink() else None
        if why:
            _refuse_path(quarantine, path.relative_to(source).as_posix(), f"{path.name}: {why}; it is not read")
            continue
        quarantine.append({"source_path": path.relative_to(source).as_posix(), "reason_code": "missing_report",
                           "kind": "image", "message": f"{path.name}: not listed in any descriptions_*.jsonl"})
    return SourceScan("medpix2", images, reports, quarantine, tables, default_text_policy="caption",
                      provenance="MedPix 2.0 (Siragusa et al., Data Science and Engineering, 2025, "
                                 "doi 10.1007/s41019-025-00297-8); images from the U.S. National Library of "
                                 "Medicine's MedPix teaching files; no licence file ships with it: research use",
                      notes=["MedPix cases are teaching files: U_id (one case) is used as the patient.",
                             "Many images carry burned-in text (a watermark, uploader names); PNG files declare "
                             "nothing, so it is not detected."])


# --------------------------------------------------------------------------- iu-xray


def _split_terms(value: str) -> list[str]:
    terms = [t.strip() for t in re.split(r"[;]", value or "") if t.strip()]
    return [t for t in terms if t.lower() != "normal"]


def scan_iu_xray(source: Path, image_dir: str | None = None, **_: Any) -> SourceScan:
    quarantine: list[dict[str, str]] = []
    rows = _read_csv(source / "indiana_reports.csv", "indiana_reports.csv", ["uid", "findings", "impression"],
                     quarantine, "report")
    proj_path = source / "indiana_projections.csv"
    projections = _read_csv(proj_path, proj_path.name, ["uid", "filename"], quarantine, "image") \
        if proj_path.is_file() else []
    reports: list[ReportRow] = []
    seen: set[str] = set()
    for row in rows:
        where = f"indiana_reports.csv:{row['_line']}"
        uid = (row.get("uid") or "").strip()
        if not uid or uid in seen:
            quarantine.append({"source_path": where, "reason_code": "bad_input" if not uid else "duplicate",
                               "kind": "report", "message": f"{where}: " + ("empty field uid" if not uid else
                                                                            "field uid repeats an earlier row")})
            continue
        seen.add(uid)
        sections = {k: (row.get(k) or "").strip() for k in ("findings", "impression", "indication", "comparison")}
        labels = {"problems": _split_terms(row.get("Problems", "")), "mesh": _split_terms(row.get("MeSH", ""))}
        reports.append(ReportRow(key=uid, where=where, sections=sections, patient_id=uid, study_id=uid,
                                 labels=labels))
    folder = None
    for cand in ([image_dir] if image_dir else []) + ["images", "images_normalized", "NLMCXR_png", "."]:
        if cand and (source / cand).is_dir() and any((source / cand).glob("*.png")):
            folder = source / cand
            break
    images: list[ImageJob] = []
    by_uid = {r.key: r for r in reports}
    for row in projections:
        where = f"{proj_path.name}:{row['_line']}"
        uid, fname = (row.get("uid") or "").strip(), (row.get("filename") or "").strip()
        if uid not in by_uid or not fname:
            quarantine.append({"source_path": where, "reason_code": "missing_report", "kind": "image",
                               "message": f"{where}: field uid has no row in indiana_reports.csv"})
            continue
        why = unsafe_path(fname, folder or source / "images", source)
        if why:
            _refuse_path(quarantine, where, f"{where}: field filename {why}; it is not read")
            continue
        view = (row.get("projection") or "").strip().upper() or "UNKNOWN"
        images.append(ImageJob(path=(folder or source / "images") / fname, rel=where, report_key=uid,
                               patient_id=uid, study_id=uid, image_uid=fname, labels=by_uid[uid].labels,
                               meta={"modality": "CR", "view": view}))
    notes = ["Open-i does not give a patient identifier: each report uid is treated as its own patient, so two "
             "studies of one patient can fall into different splits.",
             "'XXXX' marks text removed by the original de-identification; runs of it are collapsed to one token."]
    if folder is None:
        notes.append("No image folder was found: every listed image is quarantined as missing_image.")
    return SourceScan("iu-xray", images, reports, quarantine, provenance=(
                      "Indiana University chest X-ray collection (Open-i, U.S. National Library of Medicine), "
                      "commonly distributed under CC BY-NC-ND 4.0"), tables=
                      ["indiana_reports.csv"] + ([proj_path.name] if proj_path.is_file() else []), notes=notes)


# --------------------------------------------------------------------------- mimic-cxr


def scan_mimic_cxr(source: Path, **_: Any) -> SourceScan:
    root = source / "files" if (source / "files").is_dir() else source
    quarantine: list[dict[str, str]] = []
    reports: list[ReportRow] = []
    images: list[ImageJob] = []
    accounted: set[Path] = set()
    for patient_dir in sorted(p for g in root.glob("p*") if g.is_dir() for p in g.iterdir()
                              if p.is_dir() and _MIMIC_PATIENT.match(p.name)):
        patient = patient_dir.name
        for report in sorted(patient_dir.glob("s*.txt")):
            study = report.stem
            rel = report.relative_to(source).as_posix()
            accounted.add(report)
            why = outside_source(report, source)
            if why:
                _refuse_path(quarantine, rel, f"{report.name}: {why}; it is not read", "report")
                continue
            if not _MIMIC_STUDY.match(study):
                quarantine.append({"source_path": rel, "reason_code": "bad_input", "kind": "report",
                                   "message": f"{report.name}: not named sYYYYYYYY.txt"})
                continue
            try:
                text = _read_text(report, rel)
            except errors.UsageError as exc:
                quarantine.append({"source_path": rel, "reason_code": "bad_text", "kind": "report",
                                   "message": str(exc)})
                continue
            rep = ReportRow(key=f"{patient}/{study}", where=rel, text=text, patient_id=patient, study_id=study)
            rep.identities.update({patient, study})
            reports.append(rep)
        for study_dir in sorted(p for p in patient_dir.iterdir() if p.is_dir() and _MIMIC_STUDY.match(p.name)):
            for f in _image_files(study_dir, set()):
                accounted.add(f)
                why = outside_source(f, source)
                if why:
                    _refuse_path(quarantine, f.relative_to(source).as_posix(), f"{f.name}: {why}; it is not read")
                    continue
                images.append(ImageJob(path=f, rel=f.relative_to(source).as_posix(),
                                       report_key=f"{patient_dir.name}/{study_dir.name}", patient_id=patient_dir.name,
                                       study_id=study_dir.name, image_uid=f.stem))
    if not reports and not images:
        raise errors.UsageError(f"SOURCE {source.name}: no pNN/pXXXXXXXX/sYYYYYYYY folders (mimic-cxr layout)")
    for f in _image_files(root, accounted):
        if f.suffix.lower() not in (".dcm", ".jpg", ".jpeg", ".png", ".txt"):
            continue
        if why := outside_source(f, source):
            _refuse_path(quarantine, f.relative_to(source).as_posix(), f"{f.name}: {why}; it is not read")
        else:
            quarantine.append({"source_path": f.relative_to(source).as_posix(), "reason_code": "bad_input",
                               "kind": "image", "message": f"{f.name}: outside the pNN/pXXXXXXXX/sYYYYYYYY layout"})
    return SourceScan("mimic-cxr", images, reports, quarantine, [],
                      provenance="MIMIC-CXR (Johnson et al., Scientific Data 2019), PhysioNet credentialed access "
                                 "under its data use agreement")


SCANNERS: dict[str, Callable[..., SourceScan]] = {
    "dicom": scan_dicom, "csv": scan_csv, "medpix2": scan_medpix2, "iu-xray": scan_iu_xray,
    "mimic-cxr": scan_mimic_cxr,
}
