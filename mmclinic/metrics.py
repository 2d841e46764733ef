"""Retrieval and mismatch metrics, and bootstrap confidence intervals clustered by patient."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def ranks(scores: np.ndarray, correct: Sequence[Sequence[int]]) -> np.ndarray:
    """1-based rank of the best correct candidate per query row of ``scores`` (Q, C).

    Ties are broken against the model: every incorrect candidate scoring at least as
    high as the best correct one ranks above it (a constant model gets no credit).
    """
    scores = np.asarray(scores, dtype=np.float64)
    out = np.empty(len(scores), dtype=np.int64)
    for q, cands in enumerate(correct):
        cands = np.asarray(list(cands), dtype=np.int64)
        if cands.size == 0:
            raise ValueError(f"query {q} has no correct candidate")
        best = scores[q, cands].max()
        wrong = np.ones(scores.shape[1], dtype=bool)
        wrong[cands] = False
        out[q] = 1 + int(np.count_nonzero(scores[q, wrong] >= best))
    return out


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    return float(average_precision_score(labels, scores))


def fpr_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr_target: float = 0.95) -> float | None:
    """False-positive rate at the first threshold reaching ``tpr_target`` sensitivity."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(fpr[np.searchsorted(tpr, tpr_target, side="left")])


def threshold_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr_target: float = 0.95) -> float | None:
    """The highest threshold t such that ``scores >= t`` flags ``tpr_target`` of positives."""
    labels = np.asarray(labels).astype(bool)
    pos = np.sort(np.asarray(scores)[labels])
    if pos.size == 0:
        return None
    idx = int(np.floor((1.0 - tpr_target) * pos.size))
    return float(pos[min(idx, pos.size - 1)])


def bootstrap_ci(stat: Callable[[np.ndarray], float | None], n_items: int, clusters: Sequence[Any],
                 n_boot: int = 200, seed: int = 0, alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile interval of ``stat(indices)`` under resampling of whole clusters (patients)."""
    clusters = np.asarray(clusters)
    uniq, inverse = np.unique(clusters, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    if len(uniq) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[i] for i in pick])
        v = stat(idx)
        if v is not None and np.isfinite(v):
            values.append(v)
    if len(values) < max(10, n_boot // 4):
        return None
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def with_ci(value: float | None, ci: tuple[float, float] | None, reason: str | None = None) -> dict[str, Any]:
    """The report's figure format: ``{"value": v, "ci95": [lo, hi]}`` (or marked not computed)."""
    if value is None:
        return {"value": None, "ci95": None, "not_computed": reason or "undefined for this data"}
    out: dict[str, Any] = {"value": float(value), "ci95": list(ci) if ci else None}
    if ci is None:
        out["ci_note"] = reason or "too few patients for a bootstrap interval"
    return out
