"""Report text de-identification: identifiers become typed placeholders.

Two layers: the identities the archive itself holds for this patient and study
(names, MRN, accession numbers taken from the DICOM header and the reports
table) are removed wherever they appear, and pattern rules catch the rest
(titles with names, dates, phone numbers, e-mail, MRN/accession-like numbers,
street addresses, ages over 89). The audit counts replacements per rule and
never records a value.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable

_MONTHS = "jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|jun(?:e)?|jul(?:y)?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?"
_NAME = r"[A-Z][a-zA-Z'\-]+(?:\s+[A-Z]\.)?(?:\s+[A-Z][a-zA-Z'\-]+){0,2}"

# Order matters: specific rules before general ones.
RULES: list[tuple[str, re.Pattern[str], str]] = [
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "[EMAIL]"),
    ("url", re.compile(r"\bhttps?://\S+", re.I), "[URL]"),
    ("phone", re.compile(r"(?<!\d)(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\d)|(?<!\d)\d{3}-\d{4}(?!\d)"), "[PHONE]"),
    ("medical_record_number", re.compile(r"\b(?:MRN|MR#|medical record(?: number)?|patient id)[:#\s]*[A-Z]*\d[\w-]*", re.I), "[MRN]"),
    ("accession", re.compile(r"\b(?:accession|acc(?:ession)?\s*(?:no|number|#)?)[:#.\s]*[A-Z]*\d[\w-]*", re.I), "[ACCESSION]"),
    ("date", re.compile(
        r"\b\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})\b|\b\d{4}-\d{2}-\d{2}\b"
        rf"|\b(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b|\b\d{{1,2}}\s+(?:{_MONTHS})\.?\s+\d{{4}}\b",
        re.I), "[DATE]"),
    ("titled_name", re.compile(rf"\b(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+{_NAME}"), "[NAME]"),
    ("patient_name", re.compile(rf"\b(?:[Pp]atient|[Pp]t\.?|[Nn]ame)[:\s]+(?!is\b|was\b|has\b|with\b){_NAME}"), "[NAME]"),
    ("age_over_89", re.compile(r"\b(?:9\d|1[0-4]\d)[\s-]*(?:year|yr)s?[\s-]*old\b", re.I), "[AGE 90+]"),
    ("address", re.compile(
        r"\b\d{1,5}\s+(?:[A-Z][a-z]+\s){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Court|Ct|Boulevard|Blvd|Parkway|Pkwy|Way|Square)\b\.?"),
        "[ADDRESS]"),
    ("long_number", re.compile(r"\b[A-Z]{0,4}\d{6,}\b"), "[ID]"),
]


def _known_pattern(values: Iterable[str], names: Iterable[str], text: str | None = None) -> re.Pattern[str] | None:
    """One pattern for the identities the archive holds.

    ``values`` (IDs, accession numbers, addresses, institutions) match as whole strings;
    ``names`` (DICOM PN values such as ``FAMILY^GIVEN``) also match by component, since
    reports write names in any order. Only whole values and name components are used, so
    common words inside an address or institution ("Old", "General") are never redacted.
    """
    parts = set()
    for v in values:
        v = (v or "").strip()
        if len(v) >= 3:
            parts.add(re.escape(v))
    for n in names:
        n = (n or "").strip()
        if len(n) >= 3:
            parts.add(re.escape(n))
        for piece in re.split(r"[\^\s,]+", n):
            if len(piece) >= 3 and not piece.isdigit():
                parts.add(re.escape(piece))
    if text is not None:  # only values that occur at all: the pattern stays small and quick to build
        lower = text.lower()
        parts = {p for p in parts if re.sub(r"\\(.)", r"\1", p).lower() in lower}
    if not parts:
        return None
    return re.compile(r"\b(?:" + "|".join(sorted(parts, key=len, reverse=True)) + r")\b", re.I)


def deidentify_text(text: str, known: Iterable[str] = (), audit: collections.Counter[str] | None = None,
                    known_names: Iterable[str] = ()) -> str:
    """Replace identifiers in ``text`` by typed placeholders; count replacements in ``audit``.

    ``known``: whole identifier values of this patient/study; ``known_names``: person names.
    """
    audit = audit if audit is not None else collections.Counter()
    for name, rx, placeholder in RULES:
        text, n = rx.subn(placeholder, text)
        audit[name] += n
    pattern = _known_pattern(known, known_names, text)
    if pattern is not None:
        text, n = pattern.subn("[REDACTED]", text)
        audit["known_identity"] += n
    return text
