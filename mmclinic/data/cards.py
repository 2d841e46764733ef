"""Data cards (YAML front matter + text) and the dataset version hash."""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mmclinic.artifacts import DatasetDir


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def frames_version(manifest: pd.DataFrame, reports: pd.DataFrame) -> str:
    """A hash of a dataset's content: manifest and reports rows (images enter by their sha256).

    Rows are hashed one at a time, so memory does not grow with the dataset.
    """
    h = hashlib.sha256()
    for frame, key in ((manifest, "image_id"), (reports, "report_id")):
        if not len(frame):
            continue
        h.update(",".join(frame.columns).encode() + b"\n")
        for row in frame.sort_values(key).itertuples(index=False, name=None):
            h.update(repr(row).encode() + b"\n")
    return h.hexdigest()[:16]


def _dist(series: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in series.fillna("unknown").replace("", "unknown").value_counts().items()}


SECTIONS = ("findings", "impression", "indication", "comparison", "history", "caption")


def section_coverage(reports: pd.DataFrame) -> dict[str, float]:
    """Fraction of accepted reports with a non-empty section, per section."""
    if not len(reports):
        return {}
    return {k: round(float((reports[k].fillna("").str.strip() != "").mean()), 4)
            for k in SECTIONS if k in reports and (reports[k].fillna("") != "").any()}


def _burned_in_text(policy: str | None) -> str:
    """What the ``--burned-in`` policy did, for the data card."""
    tag = "files declaring BurnedInAnnotation (0028,0301) YES are "
    if policy == "quarantine":
        return (f"policy quarantine: {tag}quarantined (burned_in_annotation), and so are files whose stored pixels "
                "hold text found by OCR (burned_in_text)")
    if policy == "redact":
        return (f"policy redact: text found by OCR in the stored pixels is blacked out, the image kept and flagged "
                f"(burned_in), with no de-identified DICOM copy; {tag}kept and flagged")
    return f"policy {policy}: {tag}kept and flagged (burned_in); pixels are not searched for text"


def write_data_card(dataset: Path, *, name: str, source_format: str, flow: dict[str, int],
                    manifest: pd.DataFrame, reports: pd.DataFrame, quarantine: pd.DataFrame,
                    audit: collections.Counter[str], options: dict[str, Any], version: str,
                    tables: list[str] | None = None, notes: list[str] | None = None,
                    duplicates: dict[str, int] | None = None, unpaired_images: int = 0,
                    provenance: str = "", pixel_text: dict[str, Any] | None = None) -> Path:
    """Write ``data_card.md``. ``pixel_text``: the search for text burned into pixels
    (``ingest_stages.pixel_text_counts``), ``None`` or ``{"searched": False}`` when there was none."""
    pixel_text = pixel_text or {"searched": False}
    by_split = {}
    for split in ("train", "val", "test"):
        rows = manifest[manifest["split"] == split]
        by_split[split] = {"patients": int(rows["patient_key"].nunique()), "studies": int(rows["study_key"].nunique()),
                           "images": int(len(rows)), "reports": int(rows["report_id"].nunique())}
    annex_e = None
    if options.get("write_dicom"):
        from mmclinic.phi.annex_e import PROFILE

        annex_e = PROFILE
    front = {
        "name": name,
        "dataset_version": version,
        "created": dt.date.today().isoformat(),
        "source_format": source_format,
        "source_tables": list(tables or []),
        "source_provenance": provenance,
        "counts": {
            # After each step: what the source held, what decoded, what paired, what was accepted.
            **flow,
            "report_rows": flow.get("report_inputs", 0),
            "image_rows": int(len(manifest)),
            "unpaired_images_kept": unpaired_images,
            "quarantined": int(len(quarantine)),
            "quarantined_by_reason": _dist(quarantine["reason_code"]) if len(quarantine) else {},
            "burned_in_flagged": int(manifest["burned_in"].sum()) if "burned_in" in manifest else 0,
        },
        "pixel_text": pixel_text,
        "splits": by_split,
        "distributions": {k: _dist(manifest[k]) for k in ("modality", "view", "sex", "age_band", "manufacturer",
                                                           "photometric", "laterality") if k in manifest},
        "report_sections": {"text_policy": options.get("text_policy"), "coverage": section_coverage(reports)},
        "deidentification": {
            "identifiers": "keyed HMAC-SHA256 pseudonyms (patient, study, image, report)",
            "dates": "not stored; a per-patient shift in [-365, -1] days is recorded",
            "ages": "decade bands, 90 and over grouped",
            "dicom_headers": "not copied into the manifest: only modality, view, laterality, body part, "
                             "manufacturer, photometric interpretation, sex and age band are kept",
            "dicom_copies": annex_e or "not written (use --write-dicom for Annex E de-identified copies)",
            "burned_in_annotation": _burned_in_text(options.get("burned_in")),
            "report_text": "archive identities removed, then pattern rules (typed placeholders)",
            "text_replacements_by_rule": {k: int(v) for k, v in sorted(audit.items()) if v},
        },
        "split_policy": {"unit": "patient", "policy": options.get("split_policy", "hash"),
                         "method": "keyed hash of the patient pseudonym" if options.get("split_policy", "hash") ==
                         "hash" else "the source's own split; its train part split into train/val by keyed hash",
                         "ratios": list(options["split_ratios"]),
                         "stratified_by": options.get("stratify_by"),
                         "duplicates": "patients sharing an identical (sha256) or near-identical image (256-bit "
                                       f"perceptual hash within {options.get('near_duplicate_bits')} bits) share a "
                                       "split",
                         **(duplicates or {})},
        "options": {k: (v if not isinstance(v, dict) else dict(v)) for k, v in options.items()
                    if k != "split_ratios"},
        "manifest_sha256": file_sha256(DatasetDir(dataset).manifest_path),
    }
    limitations = [
        "Report de-identification is rule-based plus the identities held in the archive's own headers and "
        "tables; free-text names that appear in neither can survive. Review before sharing outside the team.",
        "Burned-in annotation in pixels is not detected beyond the DICOM `BurnedInAnnotation` tag (pixels are "
        "searched for text with `--burned-in quarantine` or `redact`)." if not pixel_text.get("searched") else
        "Text in pixels is found by OCR on the stored image: text it cannot read (very small, faint, rotated, "
        "handwritten, on busy texture) can survive; graphics and single letters are not searched for. "
        f"{pixel_text.get('frames_with_text', 0)} of {pixel_text.get('frames_scanned', 0)} frames held text.",
        "Splits are by patient; with few patients a split can be small or empty (counts above).",
        *(notes or []),
    ]
    body = f"""
# Data card: {name}

Built by `mmclinic ingest` from a `{source_format}` source. {flow.get('images_accepted', len(manifest))} of
{flow.get('image_inputs', 0)} image inputs and {flow.get('reports_accepted', len(reports))} of
{flow.get('report_inputs', 0)} reports were accepted ({manifest['patient_key'].nunique()} patients);
{len(quarantine)} inputs were quarantined (see `quarantine.csv`, one row per input with its reason).

## Intended use
Research on image-report retrieval, mismatch detection and zero-shot classification. Not for
clinical decisions.

## Known limitations
""" + "".join(f"- {x}\n" for x in limitations)
    path = DatasetDir(dataset).data_card_path
    path.write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body, encoding="utf-8")
    return path


def read_data_card(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    _, front, _ = text.split("---\n", 2)
    return yaml.safe_load(front)


def copy_into_repository(card: Path, name: str) -> Path | None:
    """Copy a data card into ``data_cards/`` when run from the mmclinic repository root."""
    here = Path.cwd()
    if (here / "data_cards").is_dir() and (here / "mmclinic" / "__init__.py").is_file():
        dest = here / "data_cards" / f"{name}.md"
        shutil.copyfile(card, dest)
        return dest
    return None
