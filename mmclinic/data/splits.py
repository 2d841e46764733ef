"""Patient-level, deterministic splits by keyed hash, with duplicate images kept together.

Images are grouped when their bytes are identical (sha256) or their 256-bit perceptual
hashes differ in at most a few bits (near-duplicates: the same image re-encoded, resized
or re-windowed). Patients sharing such a group are split together, so the same picture
never sits in two splits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from mmclinic import errors
from mmclinic.phi.dicom_deid import Pseudonymizer

SPLITS = ("train", "val", "test")
_PRIORITY = {"train": 0, "val": 1, "test": 2}
# How a source's own split names map to ours; "train" may give up some patients to val.
SOURCE_SPLIT_MAPS = {
    "medpix2": {"train": "train", "dev": "test", "test": "test"},
    "default": {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"},
}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Any, b: Any) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        lo, hi = (ra, rb) if ra < rb else (rb, ra)
        self.parent[hi] = lo
        return True


@dataclasses.dataclass
class DuplicateGroups:
    image_group: dict[str, str]
    """image_id -> group id (the smallest image_id of its group)."""
    patient_root: dict[str, str]
    """patient_key -> the smallest patient key linked to it through shared images."""
    n_exact: int
    n_near: int
    n_multi_patient: int


def near_duplicate_pairs(hashes: list[str], max_bits: int) -> list[tuple[int, int]]:
    """Index pairs whose perceptual hashes (hex strings of equal length) differ in at most ``max_bits`` bits.

    Exact by the pigeonhole principle: cut the hash into ``max_bits + 1`` bands; two hashes
    within ``max_bits`` bits agree on at least one band, so only hashes sharing a band value
    are compared.
    """
    if max_bits < 0 or len(hashes) < 2:
        return []
    # Identical hashes (blank frames, copies) are linked directly; the band search then runs over
    # distinct values only, so a thousand identical images cost no more than one.
    first: dict[str, int] = {}
    pairs: set[tuple[int, int]] = set()
    for i, h in enumerate(hashes):
        if h in first:
            pairs.add((first[h], i))
        else:
            first[h] = i
    distinct = list(first)
    if len(distinct) < 2:
        return sorted(pairs)
    owner = list(first.values())
    bits = np.unpackbits(np.array([np.frombuffer(bytes.fromhex(h), np.uint8) for h in distinct]), axis=1)
    n_bits = bits.shape[1]
    edges = np.linspace(0, n_bits, min(max_bits + 1, n_bits) + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        buckets: dict[bytes, list[int]] = {}
        for i, key in enumerate(np.packbits(bits[:, lo:hi], axis=1)):
            buckets.setdefault(key.tobytes(), []).append(i)
        for idx in buckets.values():
            if len(idx) < 2:
                continue
            sub = bits[idx]
            for a in range(len(idx) - 1):
                dist = (sub[a + 1:] != sub[a]).sum(axis=1)
                pairs.update((owner[idx[a]], owner[idx[a + 1 + b]]) for b in np.flatnonzero(dist <= max_bits))
    return sorted(pairs)


def duplicate_groups(rows: pd.DataFrame, near_bits: int = 20) -> DuplicateGroups:
    """Group images by identical bytes and near-identical perceptual hash; link their patients."""
    images = _UnionFind()
    ids = list(rows["image_id"])
    for i in ids:
        images.find(i)
    n_exact = 0
    for _, group in rows.groupby("image_sha256"):
        members = sorted(group["image_id"])
        for other in members[1:]:
            n_exact += images.union(members[0], other)
    n_near = 0
    if near_bits >= 0 and "phash" in rows and len(rows):
        for a, b in near_duplicate_pairs(list(rows["phash"]), near_bits):
            n_near += images.union(ids[a], ids[b])
    image_group = {i: images.find(i) for i in ids}
    patients = _UnionFind()
    for p in rows["patient_key"]:
        patients.find(p)
    first_patient: dict[str, str] = {}
    multi: set[str] = set()
    for image_id, patient in zip(ids, rows["patient_key"]):
        g = image_group[image_id]
        if g in first_patient:
            if patients.union(first_patient[g], patient):
                multi.add(g)
        else:
            first_patient[g] = patient
    return DuplicateGroups(image_group=image_group, patient_root={p: patients.find(p) for p in rows["patient_key"]},
                           n_exact=n_exact, n_near=n_near, n_multi_patient=len(multi))


def _check_ratios(ratios: tuple[float, float, float]) -> None:
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise errors.UsageError(f"split ratios must be three non-negative numbers summing to 1, got {ratios}")


def split_of_patient(pseudo: Pseudonymizer, root: str, ratios: tuple[float, float, float]) -> str:
    """The split of a patient group: a keyed hash of its root patient key, so adding patients never moves others."""
    u = pseudo.unit_interval("split", root)
    return "train" if u < ratios[0] else "val" if u < ratios[0] + ratios[1] else "test"


def stratified_splits(rows: pd.DataFrame, roots: dict[str, str], pseudo: Pseudonymizer,
                      ratios: tuple[float, float, float], column: str) -> dict[str, str]:
    """Within each stratum (a group's most common ``column`` value), patient groups ordered by their
    keyed hash take train, val and test in the given ratios: each split gets its share of every stratum."""
    if column not in rows:
        raise errors.UsageError(f"--stratify-by {column}: no such manifest column")
    stratum: dict[str, str] = {}
    for root, values in rows.assign(_root=rows["patient_key"].map(roots)).groupby("_root")[column]:
        stratum[root] = str(values.astype(str).mode().iloc[0])
    out: dict[str, str] = {}
    for _, members in pd.Series(stratum).groupby(lambda r: stratum[r]):
        ordered = sorted(members.index, key=lambda r: pseudo.unit_interval("split", r))
        n = len(ordered)
        cut_train, cut_val = round(n * ratios[0]), round(n * (ratios[0] + ratios[1]))
        for i, root in enumerate(ordered):
            out[root] = "train" if i < cut_train else "val" if i < cut_val else "test"
    return out


def assign_group_splits(rows: pd.DataFrame, groups: DuplicateGroups, pseudo: Pseudonymizer,
                        ratios: tuple[float, float, float], policy: str = "hash",
                        source_format: str = "", stratify_by: str | None = None) -> tuple[dict[str, str], int]:
    """A split per patient key, and how many images the source policy had to move to keep a group whole.

    ``stratify_by`` (hash policy): a manifest column whose values every split should share in the
    given ratios. Without it, a group's split depends only on the key and the group, so adding
    patients never moves existing ones; with it, ranks within a stratum can shift as patients arrive.
    """
    _check_ratios(ratios)
    roots = groups.patient_root
    if policy == "hash" or "_source_split" not in rows:
        if stratify_by:
            by_root = stratified_splits(rows, roots, pseudo, ratios, stratify_by)
            return {p: by_root[r] for p, r in roots.items()}, 0
        return {p: split_of_patient(pseudo, r, ratios) for p, r in roots.items()}, 0
    mapping = SOURCE_SPLIT_MAPS.get(source_format, SOURCE_SPLIT_MAPS["default"])
    trainval = ratios[0] + ratios[1]
    val_share = ratios[1] / trainval if trainval else 0.0
    wanted: dict[str, list[str]] = {}
    for patient, src in zip(rows["patient_key"], rows["_source_split"]):
        mapped = mapping.get(str(src).lower())
        if mapped is None:
            mapped = split_of_patient(pseudo, roots[patient], ratios)
        elif mapped == "train":
            mapped = "val" if pseudo.unit_interval("split", roots[patient]) < val_share else "train"
        wanted.setdefault(roots[patient], []).append(mapped)
    chosen = {root: max(s, key=_PRIORITY.__getitem__) for root, s in wanted.items()}
    moved = sum(sum(x != chosen[root] for x in s) for root, s in wanted.items())
    return {p: chosen[r] for p, r in roots.items()}, moved


def check_splits(manifest: pd.DataFrame) -> None:
    """Refuse a manifest where a patient, an identical image or a near-duplicate group spans two splits."""
    checks = [("patient_key", "patient"), ("image_sha256", "identical image")]
    if "dup_group" in manifest:
        checks.append(("dup_group", "near-duplicate group"))
    for column, what in checks:
        spans = manifest.groupby(column)["split"].nunique()
        bad = spans[spans > 1]
        if len(bad):
            raise errors.MmclinicError(f"split leak: {len(bad)} {what}(s) span more than one split "
                                       f"(first {column}: {bad.index[0]})")
