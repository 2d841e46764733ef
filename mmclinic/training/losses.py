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


_MASKED_LOGIT = -1e9
"""An ignored entry's logit in a softmax: finite, so that a zero target times its log-probability
stays 0 (``-inf`` would give NaN), and far below any real logit (|logit| <= 100 after clipping)."""


def contrastive_masks(text_key: tf.Tensor, norm_key: tf.Tensor, valid: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Label-aware masks of the in-batch contrastive loss (as CXR-CLIP and open_clip users build
    them from labels): which (image i, text j) entries are positives, and which are neither
    positive nor negative.

    text_key: (B,) integer keys of the report text the model sees (equal text, equal key);
    norm_key: (B,) integer keys of the report after normalisation (a reworded copy of the same
    report, or the report of the same study, shares it); valid: (B,) 0/1 (or bool), 0 where a
    reviewer confirmed that example i's image and its report do not belong together.

    Returns ``(positives, ignore)``, both (B, B) float32 0/1, disjoint:

    - ``positives[i, j]`` = 1 where text j is image i's report (the same text) and i is valid
      (multi-positive where a report appears twice in the batch);
    - ``ignore[i, j]`` = 1 where text j is a duplicate of image i's positive that is not itself a
      positive (the same report after normalisation): it is not pushed apart as a negative; and,
      for a confirmed mismatch i, every entry carrying its confirmed-wrong report (the diagonal
      included): the pair is neither a positive nor a negative of the contrastive loss (the
      match head has it as a hard negative).

    Every other entry is a negative.
    """
    valid = tf.cast(valid, tf.float32)
    same = same_key_targets(text_key)
    near = tf.maximum(same_key_targets(norm_key), same)
    positives = same * valid[:, None]
    ignore = near * (1.0 - positives)
    return positives, ignore


def masked_clip_loss(image_emb: tf.Tensor, text_emb: tf.Tensor, logit_scale: tf.Tensor, positives: tf.Tensor,
                     ignore: tf.Tensor) -> tf.Tensor:
    """:func:`clip_loss` (symmetric InfoNCE, Radford et al. 2021) with label-aware masks.

    image_emb, text_emb: (B, D), L2-normalised; logit_scale: scalar log(1/temperature);
    positives, ignore: (B, B) 0/1 over (image i, text j), disjoint (see
    :func:`contrastive_masks`). Ignored entries leave both softmaxes (their logit is
    :data:`_MASKED_LOGIT`). Image-to-text: row i's target spreads evenly over its positives;
    text-to-image: column j's over its positives. A row (column) without a positive is left out of
    its direction's mean. Returns a scalar float32: the mean of the two directions' means (0 for
    a direction with no row to count). With ``positives`` the identity and ``ignore`` zero it
    equals :func:`clip_loss`.
    """
    scale = tf.exp(tf.cast(logit_scale, tf.float32))
    logits = scale * tf.matmul(tf.cast(image_emb, tf.float32), tf.cast(text_emb, tf.float32), transpose_b=True)
    positives = tf.cast(positives, tf.float32)
    ignore = tf.cast(ignore, tf.float32) * (1.0 - positives)

    def direction(lg: tf.Tensor, pos: tf.Tensor, ign: tf.Tensor) -> tf.Tensor:
        lg = tf.where(ign > 0, tf.fill(tf.shape(lg), _MASKED_LOGIT), lg)
        count = tf.reduce_sum(pos, axis=1)
        counted = tf.cast(count > 0, tf.float32)
        targets = pos / tf.maximum(count, 1.0)[:, None]
        per = -tf.reduce_sum(targets * tf.nn.log_softmax(lg, axis=1), axis=1)
        return tf.reduce_sum(per * counted) / tf.maximum(tf.reduce_sum(counted), 1.0)

    return 0.5 * (direction(logits, positives, ignore)
                  + direction(tf.transpose(logits), tf.transpose(positives), tf.transpose(ignore)))


def masked_sigmoid_loss(image_emb: tf.Tensor, text_emb: tf.Tensor, logit_scale: tf.Tensor, logit_bias: tf.Tensor,
                        positives: tf.Tensor, ignore: tf.Tensor) -> tf.Tensor:
    """:func:`sigmoid_loss` (SigLIP, Zhai et al. 2023, Algorithm 1) with label-aware masks: every
    entry not ignored is an independent binary problem, label 1 on ``positives``.

    Shapes as :func:`masked_clip_loss`; logit_bias is a scalar. Returns a scalar float32: the sum
    over the entries not ignored, divided by B (as the paper averages over images). With
    ``positives`` the identity and ``ignore`` zero it equals :func:`sigmoid_loss`.
    """
    logits = tf.exp(tf.cast(logit_scale, tf.float32)) * tf.matmul(tf.cast(image_emb, tf.float32),
                                                                   tf.cast(text_emb, tf.float32), transpose_b=True)
    logits += tf.cast(logit_bias, tf.float32)
    positives = tf.cast(positives, tf.float32)
    keep = 1.0 - tf.cast(ignore, tf.float32) * (1.0 - positives)
    per = tf.math.log_sigmoid((2.0 * positives - 1.0) * logits)
    return -tf.reduce_sum(keep * per) / tf.cast(tf.shape(logits)[0], tf.float32)


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
