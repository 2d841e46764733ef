"""``mmclinic ingest``: a source archive to a de-identified, split, sharded dataset folder.

Every input ends in the dataset or in ``quarantine.csv`` with a reason: the source
adapters (:mod:`mmclinic.data.sources`) list images and reports, a pool of worker
processes (:mod:`mmclinic.data.decode_pool`) decodes the images under a time box, and
the stages in :mod:`mmclinic.data.ingest_stages` pair, de-identify, group duplicates,
split by patient and write. The identities read from DICOM headers and source tables
stay in memory: they pair images with reports and scrub the report text, and only keyed
pseudonyms are written.

:class:`IngestOptions` holds the one copy of every option's default (the command line
reads them from it), and the choices of each policy are the tuples below.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mmclinic import errors
from mmclinic.config import MIN_IMAGE_SIDE
from mmclinic.data import ingest_stages as stages
from mmclinic.data.decode_pool import PIXEL_TEXT_POLICIES, DecodeSettings, decode_all
from mmclinic.data.images import DEFAULT_PIXEL_BUDGET, FRAME_POLICIES
from mmclinic.data.sources import FORMATS, CsvColumns, detect_format
from mmclinic.data.splits import SPLITS
from mmclinic.phi.dicom_deid import Pseudonymizer, load_or_create_key
from mmclinic.phi.pixel_text import require_tesseract
from mmclinic.text import reports as reports_mod

__all__ = ["FORMATS", "IngestOptions", "IngestSummary", "detect_format", "ingest"]

SPLIT_POLICIES = ("hash", "source")
TEXT_POLICIES = (*reports_mod.TEXT_POLICIES, "caption", "caption+findings")
UNPAIRED_POLICIES = ("quarantine", "keep")
BURNED_IN_POLICIES = ("keep", "quarantine", "redact")


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
    pixel_budget: int = DEFAULT_PIXEL_BUDGET
    """Bytes of decoded pixel data one file may need, checked from the header before decoding."""
    burned_in: str = "keep"
    """``keep``: files declaring burned-in annotation (BurnedInAnnotation YES) are flagged in the manifest;
    ``quarantine``: those, and files with text found in their pixels by OCR, are quarantined; ``redact``: text
    found in the pixels is blacked out in the stored image, and the file kept and flagged. Pixels are
    searched (Tesseract, :mod:`mmclinic.phi.pixel_text`) under ``quarantine`` and ``redact`` only."""
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
    frame_policies = f"{', '.join(FRAME_POLICIES[:-1])} or {FRAME_POLICIES[-1]}"
    checks = [
        (o.split_policy in SPLIT_POLICIES, f"--split-policy must be one of {', '.join(SPLIT_POLICIES)}"),
        (o.text_policy is None or o.text_policy in TEXT_POLICIES,
         f"--text-policy must be one of {', '.join(TEXT_POLICIES)}"),
        (o.frame_policy in FRAME_POLICIES, f"--frame-policy must be {frame_policies}"),
        (o.burned_in in BURNED_IN_POLICIES, f"--burned-in must be one of {', '.join(BURNED_IN_POLICIES)}"),
        (o.unpaired in UNPAIRED_POLICIES, "--unpaired must be keep or quarantine"),
        (o.max_side >= MIN_IMAGE_SIDE, f"--max-side must be at least {MIN_IMAGE_SIDE}"),
        (o.decode_timeout is None or o.decode_timeout > 0, "--decode-timeout must be positive"),
        (o.shard_size >= 1, "shard size must be at least 1"),
        (-1 <= o.near_duplicate_bits <= 64, "--near-duplicate-bits must be in [-1, 64]"),
    ]
    for ok, message in checks:
        if not ok:
            raise errors.UsageError(message)


def ingest(source: str | Path, out: str | Path, fmt: str = "auto", deid_key_file: str | Path | None = None,
           options: IngestOptions = IngestOptions()) -> IngestSummary:
    """Build a dataset folder from ``source``; see docs/INTERFACE.md for the files it writes.

    The stages are in :mod:`mmclinic.data.ingest_stages`: scan, decode and pair, report table,
    manifest, splits, write.
    """
    source, out = Path(source), Path(out)
    if not (source.is_dir() or (source.is_file() and fmt in ("csv", "auto"))):
        raise errors.UsageError(f"SOURCE not found or not a folder: {source}")
    if fmt not in FORMATS:
        raise errors.UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _check_options(options)
    ocr = None  # the OCR engine, when the policy searches pixels for text (checked before any work)
    if options.burned_in in PIXEL_TEXT_POLICIES:
        ocr = f"tesseract {require_tesseract(f'--burned-in {options.burned_in}')}"
    scan = stages.scan_source(source, detect_format(source) if fmt == "auto" else fmt,
                              csv_columns=options.csv_columns, image_dir=options.image_dir,
                              text_policy=options.text_policy)
    key = load_or_create_key(Path(deid_key_file) if deid_key_file else _default_key_file(out))
    pseudo = Pseudonymizer(key)
    ws = stages.open_workspace(out, options.write_dicom)

    settings = DecodeSettings(out_dir=str(ws.decoded), max_side=options.max_side, frame_policy=options.frame_policy,
                              pixel_budget=options.pixel_budget, burned_in=options.burned_in,
                              dicom_out_dir=str(ws.dicom) if ws.dicom is not None else None,
                              deid_key_hex=key.hex() if options.write_dicom else None)
    results = decode_all(stages.decode_jobs(scan), settings, options.workers or os.cpu_count() or 1,
                         options.decode_timeout)
    pairing = stages.pair_images(scan, results, options.unpaired)
    reports = stages.build_reports(scan, pairing, pseudo, options.unpaired)
    rows = stages.build_manifest(scan, pairing, reports, pseudo, ws)
    tables = stages.assign_splits(rows, reports, pseudo, source_format=scan.source.format,
                                  ratios=options.split_ratios, policy=options.split_policy,
                                  stratify_by=options.stratify_by, near_duplicate_bits=options.near_duplicate_bits)
    card_options = dataclasses.asdict(options)
    card_options["text_policy"] = scan.text_policy
    written = stages.write_dataset(ws, out, scan, pairing, reports, rows, tables, card_options=card_options,
                                   shard_size=options.shard_size, ocr_engine=ocr)
    counts = tables.manifest["split"].value_counts().to_dict()
    return IngestSummary(dataset=written.dataset, accepted=rows.accepted_inputs, quarantined=written.quarantined,
                         reports=len(tables.reports), splits={k: int(counts.get(k, 0)) for k in SPLITS},
                         version=written.version)
