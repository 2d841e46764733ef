"""Calibration of the match score: expected calibration error, reliability data, temperature scaling.

The match score is ``p = sigmoid(match_logit)``, read as the probability that the report
belongs with the image; the outcome is 1 for a true pair and 0 for a corrupted one.

Expected calibration error (ECE) uses ``bins`` equal-width bins on [0, 1] (the last bin
closed): ``ECE = sum_b (n_b / N) * |mean outcome in b - mean p in b|``. This is the binary
(positive-class) form, as in Naeini et al. (AAAI 2015) and Guo et al. (ICML 2017) applied
to one probability; empty bins contribute nothing. Temperature scaling (Guo et al. 2017)
divides the logits by one scalar ``T > 0`` fitted by minimising the negative log-likelihood
on held-out (validation) pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum((np.asarray(p) * bins).astype(np.int64), bins - 1)


def ece(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float | None:
    """Expected calibration error with equal-width bins (see the module docstring)."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if labels.size == 0:
        return None
    idx = _bin_index(probs, bins)
    count = np.bincount(idx, minlength=bins)
    acc = np.bincount(idx, weights=labels, minlength=bins)
    conf = np.bincount(idx, weights=probs, minlength=bins)
    nz = count > 0
    return float(np.sum(np.abs(acc[nz] - conf[nz])) / labels.size)


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """Per bin: its range, pair count, mean predicted probability and observed fraction of true pairs."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    idx = _bin_index(probs, bins)
    out = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        out.append({"bin": [b / bins, (b + 1) / bins], "count": n,
                    "mean_score": float(probs[m].mean()) if n else None,
                    "fraction_matched": float(labels[m].mean()) if n else None})
    return out


def nll(labels: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary negative log-likelihood of ``sigmoid(logits / temperature)``."""
    y = np.asarray(labels, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64) / temperature
    # log(1 + exp(-z)) for y = 1, log(1 + exp(z)) for y = 0, computed stably.
    return float(np.mean(np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1 - y)))


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float | None:
    """The temperature minimising :func:`nll` (searched over log T in [-5, 5]); None without both classes."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(labels)
    if y.size == 0 or y.min() == y.max():
        return None
    res = minimize_scalar(lambda lt: nll(y, logits, float(np.exp(lt))), bounds=(-5.0, 5.0), method="bounded",
                          options={"xatol": 1e-5})
    return float(np.exp(res.x))
