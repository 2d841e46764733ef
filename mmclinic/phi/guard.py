"""The last check before anything leaves the process: logs, MLflow, TensorBoard, exports.

:class:`PhiGuard` refuses strings that match identifier patterns or contain a
known identity. Its error names the rule that fired, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from mmclinic.errors import PhiRisk

SCAN_RULES: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b"),
    "phone": re.compile(r"(?<![\d.])\d{3}[\s.-]\d{3}[\s.-]\d{4}(?!\d)"),
    "date": re.compile(r"\b\d{1,2}/\d{1,2}/\d{2,4}\b"),
    # a record number after its label, digits or letters and digits: "MRN 88123456", "MRN: AB12X9", "MR# K77"
    "mrn": re.compile(r"\b(?:MRN|MR\s*#|medical\s+record\s+(?:number|no\.?|#)|patient\s+id|accession(?:\s+(?:number|no\.?|#))?)"
                      r"\s*[:#]?\s*[A-Za-z/-]*\d", re.I),
    "dicom_person_name": re.compile(r"\b[A-Z][a-z]+\^[A-Z][a-z]+\b"),
}


class PhiGuard:
    """Scans text for PHI patterns and, optionally, a set of known identities."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        self.known = {k.lower() for k in known if k and len(k) >= 4}

    def findings(self, text: str) -> list[str]:
        hits = [name for name, rx in SCAN_RULES.items() if rx.search(text)]
        lowered = text.lower()
        if any(k in lowered for k in self.known):
            hits.append("known_identity")
        return hits

    def check(self, text: str, where: str) -> str:
        hits = self.findings(text)
        if hits:
            raise PhiRisk(f"{where}: refused to log a value matching PHI rule(s) {', '.join(hits)}")
        return text

    def check_mapping(self, values: Mapping[str, Any], where: str) -> Mapping[str, Any]:
        for key, value in values.items():
            self.check(str(key), f"{where} key")
            self.check(str(value), f"{where} '{key}'")
        return values


DEFAULT_GUARD = PhiGuard()
