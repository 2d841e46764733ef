"""Manifest ``labels``: one JSON object per image (findings, modality, plane, location, problems)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np


def parse_labels(values: Sequence[Any]) -> list[dict[str, Any] | None]:
    """One parsed ``labels`` object per row; None where missing or not a JSON object."""
    out: list[dict[str, Any] | None] = []
    for v in values:
        if isinstance(v, dict):
            out.append(v)
            continue
        if v is None or (isinstance(v, float) and np.isnan(v)) or not str(v).strip():
            out.append(None)
            continue
        try:
            obj = json.loads(str(v))
        except ValueError:
            obj = None
        out.append(obj if isinstance(obj, dict) else None)
    return out
