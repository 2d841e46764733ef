"""Training objectives as pure functions of embeddings, scale and bias."""

from __future__ import annotations

import tensorflow as tf


def clip_loss(image_emb: tf.Tensor, text_emb: tf.Tensor, logit_scale: tf.Tensor,
              targets: tf.Tensor | None = None) -> tf.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, "Learning Transferable Visual Models
    From Natural Language Supervision", eq. in Fig. 3).

    image_emb, text_emb: (B, D), L2-normalised; logit_scale: scalar log(1/temperature).
    targets: optional (B, B) multi-positive matrix (rows sum to 1 after normalisation);
    identity when None. Returns a scalar float32.
    """
    image_emb = tf.cast(image_emb, tf.float32)
    text_emb = tf.cast(text_emb, tf.float32)
    scale = tf.exp(tf.cast(logit_scale, tf.float32))
    logits = scale * tf.matmul(image_emb, text_emb, transpose_b=True)
    n = tf.shape(logits)[0]
    if targets is None:
        targets = tf.eye(n)
    targets = tf.cast(targets, tf.float32)
    t_i2t = targets / tf.reduce_sum(targets, axis=1, keepdims=True)
    t_t2i = tf.transpose(targets) / tf.reduce_sum(tf.transpose(targets), axis=1, keepdims=True)
    loss_i2t = tf.nn.softmax_cross_entropy_with_logits(t_i2t, logits)
    loss_t2i = tf.nn.softmax_cross_entropy_with_logits(t_t2i, tf.transpose(logits))
    return 0.5 * (tf.reduce_mean(loss_i2t) + tf.reduce_mean(loss_t2i))


def sigmoid_loss(image_emb: tf.Tensor, text_emb: tf.Tensor, logit_scale: tf.Tensor, logit_bias: tf.Tensor,
                 targets: tf.Tensor | None = None) -> tf.Tensor:
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image
    Pre-Training", Algorithm 1): every (image, text) pair is an independent binary problem.

    Shapes as :func:`clip_loss`; logit_bias is a scalar. Returns a scalar float32
    (summed over pairs, averaged over images, as in the paper).
    """
    image_emb = tf.cast(image_emb, tf.float32)
    text_emb = tf.cast(text_emb, tf.float32)
    logits = tf.exp(tf.cast(logit_scale, tf.float32)) * tf.matmul(image_emb, text_emb, transpose_b=True)
    logits += tf.cast(logit_bias, tf.float32)
    n = tf.shape(logits)[0]
    labels = tf.eye(n) if targets is None else tf.cast(targets > 0, tf.float32)
    signs = 2.0 * labels - 1.0
    return -tf.reduce_sum(tf.math.log_sigmoid(signs * logits)) / tf.cast(n, tf.float32)


def match_loss(logits: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor | None = None) -> tf.Tensor:
    """Binary cross-entropy of the match head: label 1 for a consistent (image, report) pair.

    logits, labels, weights: (N,). Returns the weighted mean, a scalar float32.
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.float32)
    per = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    if weights is None:
        return tf.reduce_mean(per)
    weights = tf.cast(weights, tf.float32)
    return tf.reduce_sum(per * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def match_loss_by_kind(positive_logits: tf.Tensor, negative_logits: dict[str, tf.Tensor],
                       available: dict[str, tf.Tensor], weights: dict[str, float],
                       positive_weight: float | None = None) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """:func:`match_loss` over true pairs (label 1) and negatives of several kinds (label 0).

    positive_logits: (B,); negative_logits[k], available[k]: (B,) logits and 0/1 (or bool) masks,
    a row counting only where its kind exists; weights[k]: the kind's weight. The true pairs weigh
    ``positive_weight`` each (default: the sum of the kinds' weights, as many as one negative of
    every kind). Returns the weighted mean and, per kind ``k``, ``match_<k>`` (mean loss over the
    rows where it exists, 0 where none does) and ``share_<k>`` (the share of rows where it exists),
    plus ``match_true_pair``.
    """
    n = tf.shape(positive_logits)[0]
    kinds = list(negative_logits)
    if positive_weight is None:
        positive_weight = sum(weights[k] for k in kinds) or 1.0
    oks = [tf.cast(available[k], tf.float32) for k in kinds]
    logits = tf.concat([tf.cast(positive_logits, tf.float32)]
                       + [tf.cast(negative_logits[k], tf.float32) for k in kinds], 0)
    labels = tf.concat([tf.ones([n])] + [tf.zeros([n])] * len(kinds), 0)
    w = tf.concat([positive_weight * tf.ones([n])] + [weights[k] * ok for k, ok in zip(kinds, oks)], 0)
    parts = {"match_true_pair": match_loss(positive_logits, tf.ones([n]))}
    for k, ok in zip(kinds, oks):
        parts[f"match_{k}"] = match_loss(negative_logits[k], tf.zeros([n]), ok)
        parts[f"share_{k}"] = tf.reduce_mean(ok)
    return match_loss(logits, labels, w), parts


def same_text_targets(text: tf.Tensor) -> tf.Tensor:
    """(B,) strings -> (B, B) 0/1 matrix marking identical reports (multi-positive targets)."""
    return tf.cast(tf.equal(text[:, None], text[None, :]), tf.float32)


def same_key_targets(keys: tf.Tensor) -> tf.Tensor:
    """(B,) integer keys (e.g. hashes of the report text) -> (B, B) 0/1 matrix of equal keys."""
    return tf.cast(tf.equal(keys[:, None], keys[None, :]), tf.float32)


def gather_replicas(*tensors: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """All-gather (along axis 0) tensors across the replicas of a ``tf.distribute`` strategy, so
    that a contrastive loss sees the global batch's negatives (open_clip's gather-with-grad).

    Differentiable: the gradient reaching each replica's input is the sum over replicas of the
    gradients of its slice of the gathered tensor. With each replica minimising loss / R and the
    replicas' gradients summed, that is the gradient of the global-batch loss. Outside a
    multi-replica context the tensors come back unchanged.

    The (B, D) float tensors travel as one concatenated collective, the others one each: a
    single differentiable gather keeps the collectives of the backward pass in the same order
    on every replica (several can be emitted in a different order per replica and deadlock).
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tensors
    floats = [i for i, t in enumerate(tensors) if t.dtype.is_floating]
    out: list[tf.Tensor | None] = [None] * len(tensors)
    if floats:
        widths = [int(tensors[i].shape[-1]) for i in floats]
        joined = tf.concat([tf.cast(tensors[i], tf.float32) for i in floats], axis=1)
        parts = tf.split(ctx.all_gather(joined, axis=0), widths, axis=1)
        for i, part in zip(floats, parts):
            out[i] = tf.cast(part, tensors[i].dtype)
    for i, t in enumerate(tensors):
        if out[i] is None:
            out[i] = ctx.all_gather(tf.stop_gradient(t), axis=0)
    return tuple(out)
