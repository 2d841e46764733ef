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


def _binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.size == 0 or labels.all() or not labels.any():
        return None
    return labels, scores


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count one half, as scikit-learn); None with one class.

    Computed as the Mann-Whitney statistic from average ranks: fast enough to bootstrap."""
    from scipy.stats import rankdata

    b = _binary(labels, scores)
    if b is None:
        return None
    y, s = b
    r = rankdata(s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct threshold, highest first."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last]
    return tps.astype(np.float64), (last + 1 - tps).astype(np.float64)


def auprc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision (scikit-learn's definition: sum over thresholds of recall step times
    precision); None with one class."""
    b = _binary(labels, scores)
    if b is None:
        return None
    tps, fps = _curve(*b)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr_target: float = 0.95) -> float | None:
    """False-positive rate at the highest threshold whose sensitivity reaches ``tpr_target``."""
    b = _binary(labels, scores)
    if b is None:
        return None
    tps, fps = _curve(*b)
    tpr, fpr = tps / tps[-1], fps / fps[-1]
    return float(fpr[np.argmax(tpr >= tpr_target - 1e-12)])


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) of the ROC curve from (0, 0), for plots."""
    b = _binary(labels, scores)
    if b is None:
        return None
    tps, fps = _curve(*b)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def pr_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(recall, precision) of the precision-recall curve, for plots."""
    b = _binary(labels, scores)
    if b is None:
        return None
    tps, fps = _curve(*b)
    return np.r_[0.0, tps / tps[-1]], np.r_[1.0, tps / (tps + fps)]


def chance_recall_at_k(pool: int, n_correct: np.ndarray | int, k: int) -> float:
    """Expected R@k of a random ranking: P(at least one of ``n_correct`` candidates among the first
    ``k`` of ``pool``), averaged over queries."""
    m = np.atleast_1d(np.asarray(n_correct, dtype=np.int64))
    out = []
    for c in m:
        p_none = 1.0
        for i in range(min(k, pool)):
            p_none *= max(pool - c - i, 0) / (pool - i)
        out.append(1.0 - p_none)
    return float(np.mean(out)) if out else 0.0


def chance_mean_rank(pool: int, n_correct: np.ndarray | int) -> float:
    """Expected rank of the best of ``n_correct`` candidates in a random ranking of ``pool``."""
    m = np.atleast_1d(np.asarray(n_correct, dtype=np.float64))
    return float(np.mean((pool + 1) / (m + 1)))


def threshold_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr_target: float = 0.95) -> float | None:
    """The highest threshold t such that ``scores >= t`` flags ``tpr_target`` of positives."""
    labels = np.asarray(labels).astype(bool)
    pos = np.sort(np.asarray(scores)[labels])
    if pos.size == 0:
        return None
    idx = int(np.floor((1.0 - tpr_target) * pos.size))
    return float(pos[min(idx, pos.size - 1)])


def _cluster_members(clusters: Sequence[Any]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unique clusters and the item indices of each (ascending), in O(n log n)."""
    uniq, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    counts = np.bincount(inverse.reshape(-1), minlength=len(uniq))
    return uniq, np.split(order, np.cumsum(counts)[:-1])


def bootstrap_ci(stat: Callable[[np.ndarray], float | None], n_items: int, clusters: Sequence[Any],
                 n_boot: int = 200, seed: int = 0, alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile interval of ``stat(indices)`` under resampling of whole clusters (patients)."""
    uniq, members = _cluster_members(clusters)
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


def paired_bootstrap(stat_a: Callable[[np.ndarray], float | None], stat_b: Callable[[np.ndarray], float | None],
                     n_items: int, clusters: Sequence[Any], n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> dict[str, Any]:
    """Difference ``stat_b - stat_a`` on the same items, resampling the same clusters for both.

    Returns the observed difference, its percentile interval, and ``p`` = twice the smaller
    fraction of resamples on either side of zero (a bootstrap two-sided p-value, capped at 1).
    """
    a, b = stat_a(np.arange(n_items)), stat_b(np.arange(n_items))
    if a is None or b is None:
        return {"difference": None, "ci95": None, "p": None, "not_computed": "undefined on this data"}
    uniq, members = _cluster_members(clusters)
    if len(uniq) < 2:
        return {"difference": float(b - a), "ci95": None, "p": None,
                "not_computed": "fewer than 2 patients to resample"}
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        va, vb = stat_a(idx), stat_b(idx)
        if va is not None and vb is not None and np.isfinite(va) and np.isfinite(vb):
            diffs.append(vb - va)
    if len(diffs) < max(10, n_boot // 4):
        return {"difference": float(b - a), "ci95": None, "p": None,
                "not_computed": "too few usable resamples for an interval"}
    d = np.asarray(diffs)
    lo, hi = np.percentile(d, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))
    return {"difference": float(b - a), "ci95": [float(lo), float(hi)], "p": float(p), "resamples": len(diffs),
            "significant": bool(lo > 0 or hi < 0)}
