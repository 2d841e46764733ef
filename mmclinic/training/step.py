"""The training step unit: one optimisation step of the dual-tower model, built from the config.

:class:`TrainStep` composes the towers' encoders, the match head's negatives and the losses. It
exposes the per-replica step (:meth:`TrainStep.replica_step`) and the distributed step
(:attr:`TrainStep.distributed`, a ``tf.function``; calling the instance runs it), each returning
the losses the loop logs. The batches it reads follow :attr:`TrainStep.schema`, the declaration
(:mod:`mmclinic.data.schema`) the input pipeline builds them from.

The training loop (:mod:`mmclinic.training.loop`) and the benchmarks in ``bench/`` time and run
this same step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from mmclinic.config import ExperimentConfig, TrainConfig, parse_mismatch_kinds
from mmclinic.data.negatives import REVIEWED_KIND, REVIEWED_MATCH_KIND, TABLE_KINDS
from mmclinic.data.schema import (HAS_SIDE, NORM_KEY, PATIENT_KEY, SWAPPED_IDS, SWAPPED_MASK,
                                  TEXT, TOKEN_IDS, BatchSchema, negative_features)
from mmclinic.training import losses
from mmclinic.training.extras import ExtraTerms, lock_tower, logit_scale_cap, text_sources
from mmclinic.training.optim import build_optimizer

MAX_LOGIT_SCALE = math.log(100.0)
"""The default cap of the learnable logit scale (a temperature of at least 0.01); the step's own cap
is :attr:`TrainStep.logit_scale_cap` (``train.max_logit_scale``)."""

TEXT_KEY = "text_key"
"""The step's own feature: the 63-bit hash of ``text`` (strings stay outside XLA and collectives)."""

KEY_BUCKETS = 2 ** 63 - 1


@dataclass(frozen=True)
class MismatchKinds:
    """The match head's negatives: each enabled kind and its weight (``train.mismatch_kinds``)."""

    weights: Mapping[str, float]

    @classmethod
    def from_config(cls, train: TrainConfig) -> MismatchKinds:
        return cls(parse_mismatch_kinds(train.mismatch_kinds))

    @property
    def table_kinds(self) -> tuple[str, ...]:
        """Kinds precomputed per report from the training split (:mod:`mmclinic.data.negatives`), and
        with reviews the by-image tables of the reviewers' decisions (``reviewed``: confirmed
        mismatches; ``reviewed_match``: verified true pairs, a flag the step reads, never encoded)."""
        return self.generated_kinds + ((REVIEWED_KIND, REVIEWED_MATCH_KIND) if REVIEWED_KIND in self.weights else ())

    @property
    def generated_kinds(self) -> tuple[str, ...]:
        """The table kinds generated from the training split's reports (all but ``reviewed``)."""
        return tuple(k for k in TABLE_KINDS if k in self.weights)

    @property
    def text_kinds(self) -> tuple[str, ...]:
        """Kinds whose negative is another text to encode: the in-graph laterality swap and the
        precomputed tables, encoded in one call."""
        return tuple(k for k in ("laterality_swap", *self.table_kinds) if k in self.weights)

    @property
    def positive_weight(self) -> float:
        """The true pair weighs as much as one negative of every kind (balanced classes)."""
        return sum(self.weights.values()) or 1.0


def build_model(config: ExperimentConfig, vocab_size: int, replicas: int = 1, *, load_pretrained: bool = True):
    """The dual-tower model of ``config`` set up for training: built, its batch norm synchronised
    when there are several replicas, frozen as ``train.freeze_*`` says. Call it inside the
    strategy's scope."""
    import keras

    from mmclinic.models.dual_encoder import from_model_config

    tc = config.train
    model = from_model_config(config.model, config.data.image_size, config.data.max_length, vocab_size,
                              load_pretrained=load_pretrained)
    model.build_all()
    if replicas > 1:
        # Global-batch statistics in batch norm (SimCLR's "global BN": per-replica statistics
        # leak which examples share a replica to a contrastive loss), and moving statistics
        # that stay identical on every replica and worker.
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True
    model.freeze(tc.freeze_text_layers, tc.freeze_image)
    lock_tower(model, tc.locked_tower)
    return model


class TrainStep:
    """One training step of ``model`` under ``strategy``, as ``config`` describes it.

    Per replica: the image and report embeddings, the contrastive loss (CLIP or SigLIP, over the
    global batch when ``train.global_negatives`` gathers the replicas' embeddings) with
    multi-positive targets for identical reports, and the match loss on the true pairs and one
    negative of every enabled kind; their gradients summed over replicas and applied by
    ``optimizer``. After the replicas, the logit scale is clipped at :attr:`logit_scale_cap`. The
    optional terms (locked towers, image-image and text-text terms, auxiliary heads) are ``extras``
    (:class:`mmclinic.training.extras.ExtraTerms`).

    ``optimizer`` is built for ``model.trainable_variables`` (see
    :func:`mmclinic.training.optim.build_optimizer`); :meth:`build` makes both from the config.
    """

    def __init__(self, config: ExperimentConfig, model: Any, optimizer: Any, strategy: Any,
                 kinds: MismatchKinds | None = None, extras: ExtraTerms | None = None) -> None:
        tc = config.train
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.kinds = kinds if kinds is not None else MismatchKinds.from_config(tc)
        self.replicas = strategy.num_replicas_in_sync
        self.global_batch = tc.batch_size * self.replicas
        self.extras = extras if extras is not None else ExtraTerms(config, model, None, None,
                                                                   text_sources(self.kinds))
        self.variables = model.trainable_variables + self.extras.variables
        self.logit_scale_cap = logit_scale_cap(config, float(model.logit_scale.numpy()))
        """Where the logit scale is clipped after every step (the loop sets a resumed run's recorded cap)."""
        self.schema = BatchSchema.for_training(config.data, self.kinds.table_kinds, self.extras.features())
        """The features a batch must hold (the input pipeline builds its batches from it)."""
        self._gather = self.replicas > 1 and tc.global_negatives
        self._compiled = tf.function(self.replica_step, jit_compile=True) if tc.jit_compile else self.replica_step
        self.distributed = tf.function(self._distributed_step)
        """The step on one distributed batch (a ``tf.function``): the replicas' mean losses."""
        self._checked: set[frozenset[str]] = set()

    @classmethod
    def build(cls, config: ExperimentConfig, vocab_size: int, strategy: Any, kinds: MismatchKinds | None = None, *,
              load_pretrained: bool = True, extra_inputs: Any = None) -> TrainStep:
        """The model (:func:`build_model`), its optimizer and the step, in ``strategy``'s scope.
        ``extra_inputs``: the data the optional terms need
        (:class:`mmclinic.data.extra_features.ExtraInputs`: label tables, report sections)."""
        kinds = kinds if kinds is not None else MismatchKinds.from_config(config.train)
        with strategy.scope():
            model = build_model(config, vocab_size, strategy.num_replicas_in_sync, load_pretrained=load_pretrained)
            extras = ExtraTerms.build(config, model, extra_inputs, text_sources(kinds))
            optimizer = build_optimizer(config.train, model, extras.variables)
        return cls(config, model, optimizer, strategy, kinds, extras)

    def __call__(self, dist_batch: Mapping[str, Any]) -> dict[str, tf.Tensor]:
        """:attr:`distributed` on ``dist_batch``, checked against :attr:`schema` (once per set of
        feature names; a mismatch is a UsageError naming the feature)."""
        names = frozenset(dist_batch)
        if names not in self._checked:
            first = {k: self.strategy.experimental_local_results(v)[0] for k, v in dist_batch.items()}
            self.schema.check(first, "TrainStep", batched=True)
            self._checked.add(names)
        return self.distributed(dist_batch)

    def distribute(self, dataset: tf.data.Dataset) -> Iterator:
        """An iterator of distributed batches for this step from a dataset of global batches of
        :attr:`schema`: every worker reads the same stream and keeps its slice of each batch."""
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return iter(self.strategy.experimental_distribute_dataset(dataset.with_options(options)))

    def loss_terms(self, batch: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """The forward pass on one replica's batch (``text`` and ``patient_key`` hashed, see
        :meth:`hash_strings`): the total loss and the terms the loop logs (``loss``,
        ``contrastive``, ``match``, and ``match_<kind>``, ``share_<kind>``, ``match_true_pair``)."""
        model, tc = self.model, self.config.train
        img = self.extras.image_embeddings(batch)  # model.encode_image, unless a tower is locked
        txt = self.extras.text_embeddings(batch, (TOKEN_IDS.name,))
        key = batch[TEXT_KEY]
        # The global batch's negatives (differentiable all-gather, see losses.gather_replicas).
        # Label-aware masks (losses.contrastive_masks): a duplicate of the positive (the same report
        # after normalisation) is no negative; a reviewer-confirmed mismatch is no positive.
        norm, valid = batch[NORM_KEY.name], self.pair_valid(batch)
        img_all, txt_all, key_all, norm_all, valid_all = (
            losses.gather_replicas(img, txt, key, norm, valid) if self._gather else (img, txt, key, norm, valid))
        positives, ignore = losses.contrastive_masks(key_all, norm_all, valid_all)
        if tc.loss == "clip":
            contrastive = losses.masked_clip_loss(img_all, txt_all, model.logit_scale, positives, ignore)
        else:
            contrastive = losses.masked_sigmoid_loss(img_all, txt_all, model.logit_scale, model.logit_bias,
                                                     positives, ignore)
        negs = self.match_negatives(batch, txt)
        positive_weight = self.kinds.positive_weight
        if REVIEWED_KIND in self.kinds.weights:
            # A reviewer confirmed that the image and its own report do not belong together: that
            # pair is the image's reviewed negative, and no true pair for the match head.
            reviewed_ok = tf.cast(batch[negative_features(REVIEWED_KIND)[2].name], tf.float32)
            # A confirmed match (the model's flag was a false alarm) is a hard positive: its true
            # pair weighs the reviewed kind's weight more.
            verified = tf.cast(batch[negative_features(REVIEWED_MATCH_KIND)[2].name], tf.float32)
            positive_weight = (positive_weight + self.kinds.weights[REVIEWED_KIND] * verified) * (1.0 - reviewed_ok)
        match, per_kind = losses.match_loss_by_kind(
            model.match_logits(img, txt), {k: model.match_logits(img, e) for k, e, _ in negs},
            {k: ok for k, _, ok in negs}, self.kinds.weights, positive_weight)
        total = contrastive + tc.match_weight * match
        extra: dict[str, tf.Tensor] = {}
        if self.extras.active:  # image-image, text-text, auxiliary heads
            added, extra = self.extras.terms(batch, img)
            total = total + added
        return total, {"loss": total, "contrastive": contrastive, "match": match, **per_kind, **extra}

    def pair_valid(self, batch: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """(B,) int64: 0 where a reviewer confirmed that the example's image and its report do not
        belong together (its ``reviewed`` negative exists), else 1."""
        if REVIEWED_KIND not in self.kinds.weights:
            return tf.ones_like(batch[NORM_KEY.name])
        return 1 - tf.cast(batch[negative_features(REVIEWED_KIND)[2].name], tf.int64)

    def match_negatives(self, batch: Mapping[str, tf.Tensor], txt: tf.Tensor) -> list[tuple[str, tf.Tensor, tf.Tensor]]:
        """The match head's negatives, ``(kind, text embeddings, ok)`` per enabled kind: each
        image meets one negative of every kind where that kind exists for its report (``ok``). A
        negative the same as the own report after normalisation never counts."""
        negs = []
        if "other_patient" in self.kinds.weights:
            norm_key, patient = batch[NORM_KEY.name], batch[PATIENT_KEY.name]
            other = tf.logical_and(tf.not_equal(norm_key, tf.roll(norm_key, 1, 0)),
                                   tf.not_equal(patient, tf.roll(patient, 1, 0)))
            negs.append(("other_patient", tf.roll(txt, 1, 0), other))
        text_kinds = self.kinds.text_kinds
        if text_kinds:
            parts = {k: (SWAPPED_IDS, SWAPPED_MASK, HAS_SIDE) if k == "laterality_swap" else negative_features(k)
                     for k in text_kinds}
            # One encoder call over every kind's texts (their cached features when the text tower is locked).
            emb = self.extras.text_embeddings(batch, [parts[k][0].name for k in text_kinds])
            for k, e in zip(text_kinds, tf.split(emb, len(text_kinds), 0)):
                negs.append((k, e, batch[parts[k][2].name]))
        return negs

    def replica_step(self, batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """One replica's step on its slice of the global batch (strings hashed): the loss terms,
        their gradients summed over the replicas, applied. Returns :meth:`loss_terms`' terms."""
        with tf.GradientTape() as tape:
            total, terms = self.loss_terms(batch)
            # Each replica's share: gradients are summed over replicas below. With gathered
            # negatives every replica computes the same global contrastive term, and the sum of
            # the shares' gradients is the gradient of the global loss.
            scaled = self.optimizer.scale_loss(total / self.replicas)
        # Parts the chosen loss does not use (the sigmoid bias under CLIP) get no gradient.
        grads = tape.gradient(scaled, self.variables)
        pairs = [(g, v) for g, v in zip(grads, self.variables) if g is not None]
        summed = [g for g, _ in pairs]
        if self.replicas > 1:
            summed = tf.distribute.get_replica_context().all_reduce("SUM", summed)
        self.optimizer.apply(summed, [v for _, v in pairs])
        return terms

    def hash_strings(self, batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """A batch of :attr:`schema` with its strings as 63-bit keys (strings stay outside XLA and
        collectives): ``text`` becomes ``text_key`` (identical reports share a key) and
        ``patient_key`` its hash."""
        batch = self.schema.select(batch)
        batch[TEXT_KEY] = tf.strings.to_hash_bucket_fast(batch.pop(TEXT.name), KEY_BUCKETS)
        batch[PATIENT_KEY.name] = tf.strings.to_hash_bucket_fast(batch[PATIENT_KEY.name], KEY_BUCKETS)
        return batch

    def _replica(self, batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return self._compiled(self.hash_strings(batch))

    def _distributed_step(self, dist_batch: Any) -> dict[str, tf.Tensor]:
        out = self.strategy.run(self._replica, args=(dist_batch,))
        self.model.logit_scale.assign(tf.minimum(self.model.logit_scale, self.logit_scale_cap))
        return {k: self.strategy.reduce("MEAN", v, axis=None) for k, v in out.items()}
