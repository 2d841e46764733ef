import math

import numpy as np
import pytest
import tensorflow as tf

from mmclinic.training import losses
from mmclinic.eval import metrics


def test_clip_loss_matches_hand_computation():
    img = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    txt = tf.constant([[1.0, 0.0], [0.6, 0.8]])
    scale = math.log(2.0)  # logits = 2 * cosine
    logits = 2 * np.array([[1.0, 0.6], [0.0, 0.8]])

    def ce(row, i):
        return -(row[i] - np.log(np.exp(row).sum()))

    i2t = (ce(logits[0], 0) + ce(logits[1], 1)) / 2
    t2i = (ce(logits[:, 0], 0) + ce(logits[:, 1], 1)) / 2
    assert float(losses.clip_loss(img, txt, scale)) == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_clip_loss_multi_positive_targets():
    img = tf.constant([[1.0, 0.0], [1.0, 0.0]])
    txt = tf.constant([[1.0, 0.0], [1.0, 0.0]])
    t = losses.same_text_targets(tf.constant(["no finding", "no finding"]))
    # Identical reports are both correct: the loss is log(2) with identity targets and also with
    # multi-positive targets it is the cross-entropy against the uniform target, also log(2).
    assert float(losses.clip_loss(img, txt, 0.0, t)) == pytest.approx(math.log(2), rel=1e-5)
    assert np.array_equal(t.numpy(), np.ones((2, 2)))


def test_sigmoid_loss_matches_hand_computation():
    img = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    txt = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    scale, bias = math.log(10.0), -5.0
    logits = 10 * np.eye(2) - 5
    signs = 2 * np.eye(2) - 1
    want = -np.log(1 / (1 + np.exp(-signs * logits))).sum() / 2
    assert float(losses.sigmoid_loss(img, txt, scale, bias)) == pytest.approx(want, rel=1e-5)


def test_match_loss_weighted():
    got = losses.match_loss(tf.constant([0.0, 0.0]), tf.constant([1.0, 0.0]), tf.constant([1.0, 0.0]))
    assert float(got) == pytest.approx(math.log(2), rel=1e-6)


def test_ranks_break_ties_against_the_model():
    scores = np.array([[0.5, 0.5, 0.1], [0.9, 0.2, 0.3], [0.1, 0.1, 0.1]])
    r = metrics.ranks(scores, [[0], [1], [2]])
    assert list(r) == [2, 3, 3]
    assert list(metrics.ranks(scores, [[0, 1], [0], [1, 2]])) == [1, 1, 2]
    # A constant scorer gets the worst rank, not the best.
    assert list(metrics.ranks(np.zeros((3, 3)), [[0], [1], [2]])) == [3, 3, 3]


def test_mismatch_metrics_hand_cases():
    labels = np.array([0, 0, 1, 1])
    assert metrics.auroc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert metrics.auroc(np.array([1, 1]), np.array([0.1, 0.2])) is None
    assert metrics.fpr_at_tpr(labels, np.array([0.1, 0.4, 0.35, 0.8]), 0.95) == pytest.approx(0.5)
    t = metrics.threshold_at_tpr(labels, np.array([0.1, 0.4, 0.35, 0.8]), 0.95)
    assert t == pytest.approx(0.35)


def test_bootstrap_interval_covers_truth_at_nominal_rate():
    rng = np.random.default_rng(0)
    covered, trials = 0, 60
    for _ in range(trials):
        clusters = np.repeat(np.arange(40), 3)
        x = rng.normal(0.3, 1.0, 40)[clusters] + rng.normal(0, 0.3, 120)
        ci = metrics.bootstrap_ci(lambda idx, x=x: float(x[idx].mean()), len(x), clusters, n_boot=200,
                                  seed=int(rng.integers(1e9)))
        covered += ci[0] <= 0.3 <= ci[1]
    assert 0.85 <= covered / trials <= 1.0
