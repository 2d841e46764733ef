"""DICOM header de-identification: the PS3.15 Annex E Basic Application Level Confidentiality Profile.

The attribute table is dicom-anonymizer's transcription of PS3.15 Table E.1-1
(:data:`TABLE_VERSION`), run through its ``anonymize_dataset``. Every action of
that table is wrapped so that its effect is counted, and replaced where the
library's own would be random or where the options below keep information:

- **U** (and a UID under **D**): ``2.25.<integer>`` from a keyed HMAC of the
  original UID, so the same UID and key always give the same new UID, in every
  file and sequence (``ReferencedSOPInstanceUID`` follows ``SOPInstanceUID``).
  Class UIDs and the transfer syntax are not in the table and are kept.
- **X/Z/U\\*** sequences (Referenced Image, Source Image) are kept and their
  items de-identified with the whole table, recursively; so is every sequence
  the table does not list. **D** sequences get the table's dummy values with
  keyed UIDs. An element whose VR the library cannot replace is removed.
- ``PatientID`` and ``PatientName`` become the keyed patient pseudonym
  (:meth:`Pseudonymizer.patient`); ``AccessionNumber`` becomes the first 16
  characters (the SH limit) of the keyed report pseudonym
  (:meth:`Pseudonymizer.report`), so the manifest's ``report_id`` starts with it.

Options applied (and recorded in the file's DeidentificationMethodCodeSequence):

- *Retain Longitudinal Temporal Information with Modified Dates*: every DA and
  DT value is shifted by the patient's keyed offset
  (:meth:`Pseudonymizer.date_shift_days` of the patient pseudonym, the same as
  the manifest's ``date_shift_days``), so intervals between a patient's studies
  are kept; times of day (TM, and the time part of DT) are kept. Dates that
  cannot be shifted exactly (partial or malformed) are emptied.
  ``PatientBirthDate`` is emptied and ``PatientBirthTime`` removed, as in the
  basic table. ``LongitudinalTemporalInformationModified`` is set to MODIFIED.
- *Retain Patient Characteristics*, applied narrowly: ``PatientSex``,
  ``PatientSize``, ``PatientWeight`` and ``PatientAge`` are kept, ages of 90
  years and over written as ``090Y`` (HIPAA Safe Harbor); a malformed age is
  removed. The option's other characteristics stay removed as in the basic table.

Private tags are removed (no Retain Safe Private option); curve data and
overlay data and comments are removed as the table says. The file meta
information is rewritten as ours: the source, sending and receiving AE titles
and private information are removed and the implementation UID is pydicom's.
A declared burned-in annotation (BurnedInAnnotation (0028,0301) = YES)
quarantines the file unless ``burned_in="keep"``; pixels are never inspected
or altered. Audits hold counts per action kind, never values.
"""

from __future__ import annotations

import collections
import copy
import datetime as dt
import os
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import pydicom
import pydicom.datadict
import pydicom.errors
import pydicom.tag
import pydicom.uid
from dicomanonymizer import simpledicomanonymizer as sda
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from mmclinic import __version__, errors
from mmclinic.phi.dicom_deid import Pseudonymizer

TABLE_VERSION = "dicomfields_2026c"
"""The dicom-anonymizer attribute table used: PS3.15 Table E.1-1, edition 2026c."""

BURNED_IN_POLICIES = ("quarantine", "keep")
BurnedInPolicy = Literal["quarantine", "keep"]

AGE_CAP_YEARS = 90
UID_ROOT = "2.25."

_PATIENT_NAME = (0x0010, 0x0010)
_PATIENT_ID = (0x0010, 0x0020)
_BIRTH_DATE = (0x0010, 0x0030)
_BIRTH_TIME = (0x0010, 0x0032)
_PATIENT_SEX = (0x0010, 0x0040)
_PATIENT_AGE = (0x0010, 0x1010)
_PATIENT_SIZE = (0x0010, 0x1020)
_PATIENT_WEIGHT = (0x0010, 0x1030)
_ACCESSION = (0x0008, 0x0050)
_BURNED_IN = (0x0028, 0x0301)
_U_STAR_SEQUENCES = {(0x0008, 0x1140), (0x0008, 0x2112)}  # Referenced Image, Source Image
# File meta elements that describe who wrote or sent the file, rewritten on output.
_META_REMOVED = ((0x0002, 0x0016), (0x0002, 0x0017), (0x0002, 0x0018), (0x0002, 0x0100), (0x0002, 0x0102))
_DATE_VRS = ("DA", "DT")
_TIME_VRS = ("DA", "DT", "TM")

# (code value, code meaning) from PS3.16 CID 7050, scheme DCM.
_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)
_RETAINED_CHARACTERISTICS = ("PatientSex", "PatientAge", "PatientSize", "PatientWeight")

# What each dicom-anonymizer action does, as counted in the audit.
_KIND: dict[Callable[..., Any], str] = {
    sda.replace: "replaced",
    sda.empty: "emptied",
    sda.delete: "removed",
    sda.replace_UID: "uids_remapped",
    sda.empty_or_replace: "replaced",
    sda.delete_or_empty: "emptied",
    sda.delete_or_replace: "replaced",
    sda.delete_or_empty_or_replace: "replaced",
    sda.delete_or_empty_or_replace_UID: "u_star",
}

AUDIT_KEYS = ("removed", "emptied", "replaced", "uids_remapped", "pseudonymized", "dates_shifted",
              "dates_emptied", "characteristics_kept", "ages_grouped", "private_removed")

PROFILE: dict[str, Any] = {
    "standard": "DICOM PS3.15 Annex E",
    "profile": "Basic Application Level Confidentiality Profile",
    "options": [
        "Retain Longitudinal Temporal Information with Modified Dates Option",
        "Retain Patient Characteristics Option",
    ],
    "codes": [{"value": v, "scheme": "DCM", "meaning": m} for v, m in _CODES],
    "attribute_table": f"dicom-anonymizer {metadata.version('dicom-anonymizer')} {TABLE_VERSION}",
    "uids": "keyed HMAC-SHA256 of the original UID as 2.25.<integer>; class UIDs and transfer syntax kept",
    "patient_id_and_name": "keyed patient pseudonym",
    "accession_number": "keyed report pseudonym, first 16 characters",
    "dates": "DA and DT shifted by the keyed per-patient offset (-365 to -1 days); times of day kept",
    "birth_date": "emptied; birth time removed",
    "retained_characteristics": list(_RETAINED_CHARACTERISTICS),
    "age": f"ages of {AGE_CAP_YEARS} years and over written as {AGE_CAP_YEARS:03d}Y",
    "private_tags": "removed",
    "curves_and_overlays": "curve data, overlay data and overlay comments removed",
    "burned_in_annotation": "files declaring it are quarantined unless the policy is 'keep'; pixels unchanged",
}
"""What the de-identification does, for the data card. Treat as read-only."""


def _tag_name(tag: tuple[int, int]) -> str:
    keyword = pydicom.datadict.keyword_for_tag(pydicom.tag.Tag(tag)) or "private or unknown tag"
    return f"{keyword} ({tag[0]:04X},{tag[1]:04X})"


def remap_uid(uid: str, pseudonymizer: Pseudonymizer) -> str:
    """The de-identified form of a UID: ``2.25.`` and a 128-bit keyed HMAC as an integer (at most 44 chars)."""
    digest = pseudonymizer.digest("uid", uid.strip().rstrip("\x00"))
    return UID_ROOT + str(int.from_bytes(digest[:16], "big"))


def declares_burned_in_annotation(source: Dataset | str | Path) -> bool:
    """Whether a dataset or DICOM file declares burned-in annotation (BurnedInAnnotation (0028,0301) = YES)."""
    if not isinstance(source, Dataset):
        source = _read(Path(source), stop_before_pixels=True)
    value = source.get(_BURNED_IN)
    return value is not None and str(value.value or "").strip().upper() == "YES"


def _shift_date(value: str, days: int) -> str | None:
    text = value.strip()
    m = re.fullmatch(r"(\d{4})\.?(\d{2})\.?(\d{2})", text)  # YYYYMMDD, or the old YYYY.MM.DD
    if not m:
        return None
    try:
        d = dt.date(int(m[1]), int(m[2]), int(m[3])) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def _shift_datetime(value: str, days: int) -> str | None:
    text = value.strip()
    rest = text[8:]
    if not re.fullmatch(r"(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?([+-]\d{4})?", rest):
        return None
    date = _shift_date(text[:8], days)
    return None if date is None else date + rest


def _group_age(value: str) -> str | None:
    text = value.strip().upper()
    if not re.fullmatch(r"\d{3}[DWMY]", text):
        return None
    if text.endswith("Y") and int(text[:3]) >= AGE_CAP_YEARS:
        return f"{AGE_CAP_YEARS:03d}Y"
    return text


class _Run:
    """The table's actions, wrapped, for one dataset and one patient."""

    def __init__(self, pseudonymizer: Pseudonymizer, patient_key: str) -> None:
        self.pseudo = pseudonymizer
        self.patient_key = patient_key
        self.shift_days = pseudonymizer.date_shift_days(patient_key)
        self.audit: collections.Counter[str] = collections.Counter()
        table = sda.initialize_actions(TABLE_VERSION)
        self.table_tags = {tag for tag in table if len(tag) == 2}
        self.base = {tag: self._wrap(action) for tag, action in table.items()}
        common: dict[tuple[int, int], Callable[[Dataset, Any], None]] = {
            _PATIENT_ID: self._patient_id,
            _ACCESSION: self._accession,
            _BIRTH_DATE: self._empty,
            _PATIENT_AGE: self._age,
            _PATIENT_SEX: self._keep_characteristic,
            _PATIENT_SIZE: self._keep_characteristic,
            _PATIENT_WEIGHT: self._keep_characteristic,
        }
        self.top_rules = {**common, _PATIENT_NAME: self._patient_name}
        self.nested_rules = {**common, _PATIENT_NAME: self._empty}

    # ----- element actions

    def uid(self, elem: DataElement) -> None:
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        new = [remap_uid(str(v), self.pseudo) if str(v or "").strip("\x00 ") else "" for v in values]
        elem.value = new if isinstance(elem.value, MultiValue) else new[0]
        self.audit["uids_remapped"] += 1

    def _replace_sequence(self, elem: DataElement) -> None:
        """The table's D on a sequence: dummy values throughout, but keyed UIDs (no random ones)."""
        for item in elem.value:
            for sub in list(item):
                if sub.VR == "SQ":
                    self._replace_sequence(sub)
                elif sub.VR == "UI":
                    self.uid(sub)
                else:
                    try:
                        sda.replace_element(sub)
                    except NotImplementedError:
                        del item[sub.tag]

    def _wrap(self, action: Callable[[Dataset, Any], None]) -> Callable[[Dataset, Any], None]:
        kind = _KIND[action]

        def apply(dataset: Dataset, tag: tuple[int, int]) -> None:
            elem = dataset.get(tag)
            if elem is None:
                return
            tag = (elem.tag.group, elem.tag.element)
            if elem.VR in _TIME_VRS and tag not in (_BIRTH_DATE, _BIRTH_TIME):
                return  # dates are shifted after the table (longitudinal option); times kept
            done = "emptied" if kind == "u_star" else kind
            if kind == "removed":
                del dataset[tag]
            elif elem.VR == "UI" and kind != "emptied":
                self.uid(elem)
                return
            elif elem.VR == "UI":
                elem.value = ""
            elif kind == "uids_remapped":
                del dataset[tag]  # a U attribute not encoded as a UID: the library would invent a random one
                done = "removed"
            elif elem.VR == "SQ" and kind == "u_star":
                return  # kept; its items are de-identified by clean()
            elif elem.VR == "SQ" and kind == "replaced":
                self._replace_sequence(elem)
            else:
                try:
                    action(dataset, tag)
                except NotImplementedError:  # a VR the library has no dummy value for
                    del dataset[tag]
                    done = "removed"
            self.audit[done] += 1

        return apply

    def _patient_id(self, dataset: Dataset, tag: Any) -> None:
        elem = dataset.get(tag)
        if elem is not None and str(elem.value or "").strip():
            elem.value = self.pseudo.patient(str(elem.value).strip())
            self.audit["pseudonymized"] += 1

    def _patient_name(self, dataset: Dataset, tag: Any) -> None:
        elem = dataset.get(tag)
        if elem is not None:
            elem.value = self.patient_key
            self.audit["pseudonymized"] += 1

    def _accession(self, dataset: Dataset, tag: Any) -> None:
        elem = dataset.get(tag)
        if elem is not None and str(elem.value or "").strip():
            elem.value = self.pseudo.report(str(elem.value).strip())[:16]
            self.audit["pseudonymized"] += 1

    def _empty(self, dataset: Dataset, tag: Any) -> None:
        elem = dataset.get(tag)
        if elem is not None:
            elem.value = ""
            self.audit["emptied"] += 1

    def _keep_characteristic(self, dataset: Dataset, tag: Any) -> None:
        if dataset.get(tag) is not None:
            self.audit["characteristics_kept"] += 1

    def _age(self, dataset: Dataset, tag: Any) -> None:
        elem = dataset.get(tag)
        if elem is None:
            return
        grouped = _group_age(str(elem.value or ""))
        if grouped is None:
            del dataset[tag]
            self.audit["removed"] += 1
            return
        if grouped != str(elem.value).strip().upper():
            self.audit["ages_grouped"] += 1
        elem.value = grouped
        self.audit["characteristics_kept"] += 1

    def _shift(self, elem: DataElement) -> None:
        shift = _shift_date if elem.VR == "DA" else _shift_datetime
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        texts = [str(v or "") for v in values]
        if not any(t.strip() for t in texts):
            return
        new = [shift(t, self.shift_days) for t in texts]
        if any(n is None for n in new):
            elem.value = ""
            self.audit["dates_emptied"] += 1
        else:
            elem.value = new if len(new) > 1 else new[0]
            self.audit["dates_shifted"] += 1

    # ----- datasets

    def clean(self, ds: Dataset, top: bool) -> None:
        """Apply the table to one dataset level, shift its dates, then recurse into kept sequences."""
        sda.anonymize_dataset(ds, extra_anonymization_rules=self.top_rules if top else self.nested_rules,
                              delete_private_tags=True, base_rules_gen=lambda: dict(self.base))
        for elem in list(ds):
            tag = (elem.tag.group, elem.tag.element)
            if elem.VR in _DATE_VRS and tag != _BIRTH_DATE:
                self._shift(elem)
            elif elem.VR == "SQ" and (tag not in self.table_tags or tag in _U_STAR_SEQUENCES):
                for item in elem.value:
                    self.clean(item, top=False)


def _check_policy(burned_in: str) -> None:
    if burned_in not in BURNED_IN_POLICIES:
        raise errors.UsageError(f"burned_in must be one of {', '.join(BURNED_IN_POLICIES)}, got {burned_in!r}")


def deidentify_dataset(ds: Dataset, pseudonymizer: Pseudonymizer, *,
                       burned_in: BurnedInPolicy = "quarantine") -> tuple[Dataset, dict[str, Any]]:
    """De-identify a copy of ``ds`` with the Annex E basic profile and the options in :data:`PROFILE`.

    Returns the de-identified deep copy (``ds`` is not changed; pixel data is
    byte-identical) and an audit: counts per action kind (:data:`AUDIT_KEYS`)
    and ``burned_in_annotation``, true when a declared burned-in annotation was
    kept. Raises :class:`mmclinic.errors.BurnedInAnnotation` for a file declaring
    burned-in annotation under the ``quarantine`` policy, and
    :class:`mmclinic.errors.InputError` when PatientID is missing.
    """
    _check_policy(burned_in)
    if not isinstance(ds, Dataset):
        raise errors.UsageError(f"deidentify_dataset expects a pydicom Dataset, got {type(ds).__name__}")
    burned = declares_burned_in_annotation(ds)
    if burned and burned_in == "quarantine":
        raise errors.BurnedInAnnotation(
            f"{_tag_name(_BURNED_IN)} declares burned-in annotation: the pixels may show identities "
            "(quarantined; policy burned_in='keep' accepts it)")
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        raise errors.InputError(f"{_tag_name(_PATIENT_ID)} is missing or empty: no patient pseudonym or date shift",
                                reason_code="missing_patient_id")

    out = copy.deepcopy(ds)
    run = _Run(pseudonymizer, pseudonymizer.patient(patient_id))
    n_private = sum(1 for e in out.iterall() if e.tag.is_private)
    out.remove_private_tags()
    run.audit["private_removed"] += n_private
    run.clean(out, top=True)

    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for tag in _META_REMOVED:
            if tag in meta:
                del meta[tag]
                run.audit["removed"] += 1
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"MMCLINIC_{__version__}"[:16]

    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = [
        "DICOM PS3.15 Annex E Basic Application Confidentiality Profile",
        "Retain Longitudinal Temporal Information Modified Dates Option",
        "Retain Patient Characteristics Option",
        f"mmclinic {__version__}; table {TABLE_VERSION}",
    ]
    codes = []
    for value, meaning in _CODES:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(codes)
    out.LongitudinalTemporalInformationModified = "MODIFIED"

    audit: dict[str, Any] = {key: run.audit.get(key, 0) for key in AUDIT_KEYS}
    audit["burned_in_annotation"] = burned
    return out, audit


def _read(path: Path, stop_before_pixels: bool = False) -> Dataset:
    if not path.is_file():
        raise errors.MissingImage(f"DICOM file not found: {path.name}")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except pydicom.errors.InvalidDicomError:
        raise errors.NotDicom(f"{path.name}: not a DICOM file (no 'DICM' marker at byte 128)") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise errors.TruncatedFile(f"{path.name}: DICOM header cannot be parsed ({type(exc).__name__})") from None


def write_deidentified(src_path: str | Path, dst_path: str | Path, pseudonymizer: Pseudonymizer, *,
                       burned_in: BurnedInPolicy = "quarantine") -> dict[str, Any]:
    """Read a DICOM file, de-identify it (:func:`deidentify_dataset`) and write it to ``dst_path``.

    The file is written next to its destination and renamed into place, so a
    failure never leaves a partial file; nothing is written for a refused file.
    Returns the audit.
    """
    _check_policy(burned_in)
    src, dst = Path(src_path), Path(dst_path)
    clean, audit = deidentify_dataset(_read(src), pseudonymizer, burned_in=burned_in)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        clean.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return audit
