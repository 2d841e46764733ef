"""Patient-level, deterministic splits by keyed hash, with exact duplicates kept together."""

from __future__ import annotations

import pandas as pd

from mmclinic import errors
from mmclinic.phi.dicom_deid import Pseudonymizer

SPLITS = ("train", "val", "test")


def assign_splits(manifest: pd.DataFrame, pseudo: Pseudonymizer,
                  ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> pd.Series:
    """A split per row. Patients sharing an identical image form one group and one split.

    The split of a group depends only on the key and its smallest patient key, so
    adding patients to an archive never moves existing ones.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise errors.UsageError(f"split ratios must be three non-negative numbers summing to 1, got {ratios}")
    # Union-find over patients linked by identical image bytes.
    parent: dict[str, str] = {p: p for p in manifest["patient_key"]}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for _, group in manifest.groupby("image_sha256"):
        keys = sorted(set(group["patient_key"]))
        for other in keys[1:]:
            a, b = find(keys[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    cut_train, cut_val = ratios[0], ratios[0] + ratios[1]

    def split_of(patient: str) -> str:
        u = pseudo.unit_interval("split", find(patient))
        return "train" if u < cut_train else "val" if u < cut_val else "test"

    return manifest["patient_key"].map(split_of)


def check_splits(manifest: pd.DataFrame) -> None:
    """Refuse a manifest where a patient or an identical image spans two splits."""
    for column, what in (("patient_key", "patient"), ("image_sha256", "identical image")):
        spans = manifest.groupby(column)["split"].nunique()
        bad = spans[spans > 1]
        if len(bad):
            raise errors.MmclinicError(f"split leak: {len(bad)} {what}(s) span more than one split "
                                       f"(first {column}: {bad.index[0]})")
