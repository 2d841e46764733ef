"""Keyed pseudonyms and date shifts for DICOM identities.

Identifiers are replaced by a keyed HMAC-SHA256, so that the same input and key
always give the same pseudonym and nobody without the key can reverse or
recompute it. Dates are shifted by a per-patient offset, consistent across that
patient's studies.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from mmclinic.errors import UsageError

KEY_BYTES = 32
MAX_DATE_SHIFT_DAYS = 365


def load_or_create_key(path: str | Path) -> bytes:
    """Read a de-identification key file, creating a new random one if it is absent."""
    path = Path(path)
    if path.exists():
        data = path.read_bytes().strip()
        try:
            key = bytes.fromhex(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise UsageError(f"--deid-key-file {path}: expected a hex-encoded key") from None
        if len(key) < 16:
            raise UsageError(f"--deid-key-file {path}: key must be at least 16 bytes")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


class Pseudonymizer:
    """Keyed, deterministic pseudonyms for patients, studies, images and reports."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def token(self, kind: str, value: str, prefix: str, length: int = 16) -> str:
        return prefix + self.digest(kind, value).hex()[:length]

    def patient(self, patient_id: str) -> str:
        return self.token("patient", patient_id, "P")

    def study(self, study_uid: str) -> str:
        return self.token("study", study_uid, "S")

    def image(self, sop_uid: str) -> str:
        return self.token("image", sop_uid, "I")

    def report(self, accession: str) -> str:
        return self.token("report", accession, "R")

    def unit_interval(self, kind: str, value: str) -> float:
        """A keyed, uniform number in [0, 1): used for splits."""
        return int.from_bytes(self.digest(kind, value)[:8], "big") / 2**64

    def date_shift_days(self, patient_key: str) -> int:
        """Per-patient shift in [-365, -1] days, the same for all of that patient's studies."""
        return -1 - int.from_bytes(self.digest("dateshift", patient_key)[:4], "big") % MAX_DATE_SHIFT_DAYS
