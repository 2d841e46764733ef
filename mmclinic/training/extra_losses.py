"""Extra training objectives from the data itself, as pure functions (see also :mod:`mmclinic.training.losses`).

- :func:`view_contrastive_loss`: InfoNCE between two views of the same items: two augmented
  views of each image (image-image) or two sections of each report, findings and impression
  (text-text), as CXR-CLIP adds them next to the image-text loss (You et al. 2023, "CXR-CLIP:
  Toward Large Scale Chest X-ray Language-Image Pre-training", MICCAI, Sec. 2.2: ICL and TCL).
- :func:`label_cross_entropy` and :func:`multilabel_bce`: auxiliary label heads on the image
  embedding (softmax cross-entropy for one class per image, binary cross-entropy per class for
  multi-label findings), rows with unknown labels left out.
"""

from __future__ import annotations

import tensorflow as tf


def view_contrastive_loss(a_emb: tf.Tensor, b_emb: tf.Tensor, logit_scale: tf.Tensor,
                          valid: tf.Tensor | None = None) -> tf.Tensor:
    """Symmetric InfoNCE between two views of the same B items (CXR-CLIP's image-image and
    text-text terms; the form of CLIP's loss, Radford et al. 2021).

    a_emb, b_emb: (B, D), L2-normalised, row i of both the same item; logit_scale: scalar
    log(1/temperature); valid: optional (B,) 0/1 (or bool), 0 where item i has no second view
    (e.g. a report without both sections): such rows and columns take no part at all. With
    ``logits = exp(logit_scale) * a @ b.T`` restricted to the valid items, returns the mean of the
    cross-entropy of each valid row (a -> b) and each valid column (b -> a) against the diagonal,
    a scalar float32; 0 when no item is valid.
    """
    a = tf.cast(a_emb, tf.float32)
    b = tf.cast(b_emb, tf.float32)
    logits = tf.exp(tf.cast(logit_scale, tf.float32)) * tf.matmul(a, b, transpose_b=True)
    n = tf.shape(logits)[0]
    v = tf.ones([n]) if valid is None else tf.cast(valid, tf.float32)
    pair = v[:, None] * v[None, :]
    masked = tf.where(pair > 0, logits, tf.fill(tf.shape(logits), -1e9))
    diag = tf.linalg.diag_part(logits)
    a2b = tf.reduce_logsumexp(masked, axis=1) - diag
    b2a = tf.reduce_logsumexp(masked, axis=0) - diag
    count = tf.reduce_sum(v)
    return 0.5 * tf.reduce_sum((a2b + b2a) * v) / tf.maximum(count, 1.0)


def label_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy of a single-label head.

    logits: (B, C); labels: (B,) integer class indices, -1 where unknown (left out). Returns the
    mean over the known rows, a scalar float32 (0 when none is known).
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    known = labels >= 0
    per = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(labels, 0), logits=logits)
    w = tf.cast(known, tf.float32)
    return tf.reduce_sum(per * w) / tf.maximum(tf.reduce_sum(w), 1.0)


def multilabel_bce(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Binary cross-entropy of a multi-label head, one independent sigmoid per class.

    logits: (B, C); targets: (B, C) 0/1, -1 where unknown (left out). Returns the mean over the
    known entries, a scalar float32 (0 when none is known).
    """
    logits = tf.cast(logits, tf.float32)
    targets = tf.cast(targets, tf.float32)
    w = tf.cast(targets >= 0, tf.float32)
    per = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.maximum(targets, 0.0), logits=logits)
    return tf.reduce_sum(per * w) / tf.maximum(tf.reduce_sum(w), 1.0)
