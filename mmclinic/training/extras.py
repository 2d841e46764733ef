"""The optional parts of the training step, each off unless the config asks for it.

- Locked-tower tuning (``train.locked_tower``, LiT: Zhai et al. 2022, "LiT: Zero-Shot Transfer
  with Locked-image text Tuning"): the locked backbone is frozen and runs in inference mode; with
  ``train.cache_locked`` the step reads its features from the batch (cached once per dataset
  version, :mod:`mmclinic.training.lit`) and only projects them.
- Image-image and text-text contrastive terms (``train.image_image_weight``,
  ``train.text_text_weight``; CXR-CLIP), :func:`mmclinic.training.extra_losses.view_contrastive_loss`.
- Auxiliary label heads on the image embedding (``train.aux_labels``).
- The logit-scale cap (``train.max_logit_scale``), :func:`logit_scale_cap`.

:class:`ExtraTerms` is what :class:`mmclinic.training.step.TrainStep` calls; with none of the
options on it adds no feature, no variable and no term, and the step is as it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from mmclinic.config import ExperimentConfig, parse_aux_labels
from mmclinic.data.extra_features import (FINDINGS_IDS, HAS_SECTIONS, IMAGE_VIEW2, IMPRESSION_IDS, LOCKED_IMAGE,
                                          ExtraInputs, LabelTable, locked_text_name, mask_name)
from mmclinic.data.schema import IMAGE, TOKEN_IDS, Feature
from mmclinic.errors import UsageError
from mmclinic.training import extra_losses

DEFAULT_MAX_LOGIT_SCALE = math.log(100.0)
"""The logit scale's cap for an own model (a temperature of at least 0.01)."""


def logit_scale_cap(config: ExperimentConfig, initial_scale: float) -> float:
    """The cap of the learnable logit scale: ``train.max_logit_scale`` when set; otherwise
    :data:`DEFAULT_MAX_LOGIT_SCALE`, or for ``model.dual_checkpoint`` the larger of it and the
    checkpoint's own scale (``initial_scale``, the model's scale before any step), so that the first
    fine-tuning step does not cut a pretrained SigLIP's temperature."""
    if config.train.max_logit_scale is not None:
        return float(config.train.max_logit_scale)
    if config.model.dual_checkpoint:
        return max(DEFAULT_MAX_LOGIT_SCALE, float(initial_scale))
    return DEFAULT_MAX_LOGIT_SCALE


def lock_tower(model: Any, tower: str) -> None:
    """Freeze the backbone of the locked tower (``image`` or ``text``; ``none``: nothing), all of it:
    its projection stays trainable."""
    if tower == "image":
        model.image_backbone.trainable = False
    elif tower == "text":
        model.text_backbone.trainable = False


@keras.saving.register_keras_serializable(package="mmclinic")
class AuxHeads(keras.layers.Layer):
    """One linear head per auxiliary label on the (B, D) image embedding: ``call(emb)`` returns
    ``{label: (B, C) logits}``."""

    def __init__(self, labels: Sequence[tuple[str, int]], embed_dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label_sizes = [(str(n), int(c)) for n, c in labels]
        self.embed_dim = int(embed_dim)
        self.heads = [keras.layers.Dense(c, name=f"aux_head_{i}") for i, (_, c) in enumerate(self.label_sizes)]
        for head in self.heads:
            head.build((None, self.embed_dim))
        self.built = True

    def call(self, emb: Any) -> dict[str, Any]:
        return {name: head(emb) for (name, _), head in zip(self.label_sizes, self.heads)}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "labels": self.label_sizes, "embed_dim": self.embed_dim}


class ExtraTerms:
    """The optional features, embeddings and loss terms of one training step (see the module).

    ``inputs``: the data the options need (:class:`~mmclinic.data.extra_features.ExtraInputs`:
    label tables, report sections; the locked caches come later, :meth:`with_caches`).
    ``text_sources``: the token-id features the step encodes (their locked features, when cached).
    Build it (:meth:`build`) inside the strategy's scope: the auxiliary heads are variables.
    """

    def __init__(self, config: ExperimentConfig, model: Any, inputs: ExtraInputs | None,
                 heads: AuxHeads | None, text_sources: Sequence[str]) -> None:
        tc = config.train
        self.config = config
        self.model = model
        self.inputs = inputs if inputs is not None else ExtraInputs()
        self.heads = heads
        self.aux_weights = parse_aux_labels(tc.aux_labels)
        self.locked = tc.locked_tower
        self.cached = tc.locked_tower != "none" and tc.cache_locked
        self.image_image = tc.image_image_weight
        self.text_text = tc.text_text_weight
        self.text_sources = tuple(text_sources) + ((FINDINGS_IDS.name, IMPRESSION_IDS.name) if self.text_text else ())
        self.tables: dict[str, LabelTable] = {t.name: t for t in self.inputs.labels}
        missing = [n for n in self.aux_weights if n not in self.tables]
        if missing:
            raise UsageError(f"train.aux_labels: no label table for {missing[0]!r} (read them with "
                             "mmclinic.data.extra_features.read_label_tables)")
        if self.text_text and self.inputs.sections is None:
            raise UsageError("train.text_text_weight needs the reports' sections (ExtraInputs.sections)")
        self.active = bool(self.locked != "none" or self.image_image or self.text_text or self.aux_weights)

    @classmethod
    def build(cls, config: ExperimentConfig, model: Any, inputs: ExtraInputs | None,
              text_sources: Sequence[str]) -> ExtraTerms:
        """The step's extras with their heads built (call inside the strategy's scope)."""
        weights = parse_aux_labels(config.train.aux_labels)
        heads = None
        if weights:
            tables = {t.name: t for t in (inputs.labels if inputs is not None else ())}
            sizes = [(n, len(tables[n].classes)) for n in weights if n in tables]
            if len(sizes) == len(weights):
                heads = AuxHeads(sizes, model.embed_dim, name="aux_heads")
        return cls(config, model, inputs, heads, text_sources)

    @property
    def variables(self) -> list:
        """Trainable variables beyond the model's (the auxiliary heads)."""
        return list(self.heads.trainable_variables) if self.heads is not None else []

    def checkpoint_objects(self) -> dict[str, Any]:
        """What the run's checkpoint must hold beyond the model (the auxiliary heads)."""
        return {"aux_heads": self.heads} if self.heads is not None else {}

    def locked_dims(self) -> dict[str, int]:
        """Feature width of the locked backbone (``image`` or ``text``) when its features are cached."""
        if not self.cached:
            return {}
        m = self.model
        if self.locked == "image":
            feats = m.image_features(tf.zeros((1, m.image_size, m.image_size, 1)), training=False)
        else:
            feats = m.text_features(tf.zeros((1, m.max_length), tf.int32), tf.ones((1, m.max_length), tf.bool),
                                    training=False)
        return {self.locked: int(feats.shape[-1])}

    def features(self) -> tuple[Feature, ...]:
        """The batch features the options need (added to the step's schema)."""
        out: list[Feature] = []
        if self.image_image:
            out.append(IMAGE_VIEW2)
        if self.text_text:
            from mmclinic.data.extra_features import FINDINGS_MASK, IMPRESSION_MASK

            out += [FINDINGS_IDS, FINDINGS_MASK, IMPRESSION_IDS, IMPRESSION_MASK, HAS_SECTIONS]
        out += [self.tables[n].feature for n in self.aux_weights]
        for role, dim in self.locked_dims().items():
            if role == "image":
                out.append(Feature(LOCKED_IMAGE, "float32", (dim,), "the locked image tower's features"))
            else:
                out += [Feature(locked_text_name(s), "float32", (dim,), f"locked text features of {s}")
                        for s in self.text_sources]
        return tuple(out)

    def pipeline_inputs(self) -> ExtraInputs | None:
        """What the input pipeline builds the features from (None when nothing is on)."""
        if not self.active:
            return None
        return ExtraInputs(second_view=bool(self.image_image),
                           sections=self.inputs.sections if self.text_text else None,
                           labels=tuple(self.tables[n] for n in self.aux_weights),
                           locked_image=self.inputs.locked_image, locked_text=self.inputs.locked_text,
                           locked_text_sources=self.text_sources if self.inputs.locked_text is not None else ())

    def with_caches(self, image=None, text=None) -> None:
        """Attach the locked tower's feature caches (:mod:`mmclinic.training.lit`)."""
        import dataclasses

        self.inputs = dataclasses.replace(self.inputs, locked_image=image, locked_text=text)

    # ------------------------------------------------------------------ embeddings

    def image_embeddings(self, batch: Mapping[str, tf.Tensor], name: str = IMAGE.name) -> tf.Tensor:
        """(B, D) image embeddings of the batch's ``name`` images: the trainable tower as usual; the
        locked one in inference mode, or its cached features projected (``image`` only)."""
        m = self.model
        if self.locked != "image":
            return m.encode_image(batch[name], training=True)
        if self.cached and name == IMAGE.name:
            return m.project_image(batch[LOCKED_IMAGE])
        return m.project_image(m.image_features(batch[name], training=False))

    def text_embeddings(self, batch: Mapping[str, tf.Tensor], ids_names: Sequence[str]) -> tf.Tensor:
        """(len(ids_names) * B, D) text embeddings of the batch's token-id features, concatenated in
        that order (one encoder call)."""
        m = self.model
        if self.locked == "text" and self.cached:
            return m.project_text(tf.concat([batch[locked_text_name(n)] for n in ids_names], 0))
        ids = tf.concat([batch[n] for n in ids_names], 0)
        masks = tf.concat([batch[mask_name(n)] for n in ids_names], 0)
        if self.locked == "text":
            return m.project_text(m.text_features(ids, masks, training=False))
        return m.encode_text(ids, masks, training=True)

    # ------------------------------------------------------------------ terms

    def terms(self, batch: Mapping[str, tf.Tensor], img: tf.Tensor) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """The weighted sum of the extra terms and each term (``image_image``, ``text_text``,
        ``aux_<label>``) for the batch whose image embeddings are ``img``."""
        total = tf.constant(0.0)
        out: dict[str, tf.Tensor] = {}
        scale = self.model.logit_scale
        if self.image_image:
            view2 = self.image_embeddings(batch, IMAGE_VIEW2.name)
            out["image_image"] = extra_losses.view_contrastive_loss(img, view2, scale)
            total += self.image_image * out["image_image"]
        if self.text_text:
            both = self.text_embeddings(batch, (FINDINGS_IDS.name, IMPRESSION_IDS.name))
            findings, impression = tf.split(both, 2, 0)
            out["text_text"] = extra_losses.view_contrastive_loss(findings, impression, scale,
                                                                  batch[HAS_SECTIONS.name])
            total += self.text_text * out["text_text"]
        if self.heads is not None:
            logits = self.heads(img)
            for name, weight in self.aux_weights.items():
                table = self.tables[name]
                target = batch[table.feature.name]
                loss = (extra_losses.multilabel_bce(logits[name], target) if table.multilabel
                        else extra_losses.label_cross_entropy(logits[name], target))
                out[table.feature.name] = loss
                total += weight * loss
        return total, out


def text_sources(kinds: Any) -> tuple[str, ...]:
    """The token-id features a step encodes: the report's, then each text negative kind's
    (:attr:`mmclinic.training.step.MismatchKinds.text_kinds`)."""
    from mmclinic.data.schema import SWAPPED_IDS, negative_features

    return (TOKEN_IDS.name,) + tuple(SWAPPED_IDS.name if k == "laterality_swap" else negative_features(k)[0].name
                                     for k in kinds.text_kinds)


def read_extra_inputs(config: ExperimentConfig, data: Any) -> ExtraInputs | None:
    """What the options of ``config`` need from the dataset folder ``data``: the auxiliary label
    tables (training split) and the reports' sections; None when no option needs any."""
    from mmclinic.data.extra_features import read_label_tables, read_sections

    tc = config.train
    names = list(parse_aux_labels(tc.aux_labels))
    if not names and not tc.text_text_weight:
        return None
    return ExtraInputs(sections=read_sections(data) if tc.text_text_weight else None,
                       labels=read_label_tables(data, names) if names else ())
