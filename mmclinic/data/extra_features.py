"""Optional training features: a second augmented view, report sections, auxiliary labels and a
locked tower's cached features.

Each is off unless the training config asks for it (``train.image_image_weight``,
``train.text_text_weight``, ``train.aux_labels``, ``train.locked_tower``); the training step
declares the features it needs (:meth:`ExtraInputs.features`, added to its
:class:`~mmclinic.data.schema.BatchSchema`) and the input pipeline
(:func:`mmclinic.data.pipeline.make_dataset`) builds them from the same :class:`ExtraInputs`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmclinic.artifacts import DatasetDir
from mmclinic.config import AUX_LABEL_COLUMNS
from mmclinic.data.schema import Feature
from mmclinic.errors import ConfigError
from mmclinic.text.labels import parse_labels

IMAGE_VIEW2 = Feature("image_view2", "float32", ("image_size", "image_size", 1),
                      "a second augmented view of the image (its own random draw)")
FINDINGS_IDS = Feature("findings_ids", "int32", ("max_length",), "token ids of the report's findings section")
FINDINGS_MASK = Feature("findings_mask", "bool", ("max_length",), "padding mask of findings_ids")
IMPRESSION_IDS = Feature("impression_ids", "int32", ("max_length",), "token ids of the report's impression section")
IMPRESSION_MASK = Feature("impression_mask", "bool", ("max_length",), "padding mask of impression_ids")
HAS_SECTIONS = Feature("has_sections", "bool", (), "the report has both a findings and an impression section")
LOCKED_IMAGE = "locked_image"
"""Name of the locked image tower's cached features (B, F)."""
VIEW2_SEED_OFFSET = 1 << 40
"""Added to the batch counter in the augmentation seed of the second view (the first keeps its draws)."""


def locked_text_name(ids_name: str) -> str:
    """The cached-feature name of a token-id feature (``token_ids`` -> ``locked_token_ids``)."""
    return f"locked_{ids_name}"


def aux_name(label: str) -> str:
    """The batch feature of an auxiliary label (``labels.plane`` -> ``aux_labels_plane``)."""
    return "aux_" + re.sub(r"[^0-9A-Za-z]+", "_", label).strip("_")


@dataclass(frozen=True)
class LabelTable:
    """One auxiliary label of the training images: its classes (from the training split) and per
    image a class index (single label, -1 where unknown) or a 0/1 vector (multi-label, all -1
    where unknown)."""

    name: str
    classes: tuple[str, ...]
    multilabel: bool
    image_ids: tuple[str, ...]
    values: np.ndarray
    """(N,) int32 class indices, or (N, C) float32 multi-hot rows, one per ``image_ids``."""

    @property
    def feature(self) -> Feature:
        if self.multilabel:
            return Feature(aux_name(self.name), "float32", (len(self.classes),),
                           f"multi-hot {self.name} (-1: unknown)")
        return Feature(aux_name(self.name), "int32", (), f"class index of {self.name} (-1: unknown)")


@dataclass(frozen=True)
class FeatureCache:
    """A locked backbone's features: ``keys`` (N,) (image ids, or :func:`token_row_keys` of token
    rows) and ``features`` (N, F) float32, one row per key."""

    keys: np.ndarray
    features: np.ndarray
    key: str = ""
    """The cache key it was stored under (see :mod:`mmclinic.training.lit`)."""

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


@dataclass(frozen=True)
class ExtraInputs:
    """What the optional training features need: ``second_view`` (``image_view2``), ``sections``
    (report_id -> (findings, impression)), ``labels``, ``locked_image`` (a cache by image id) and
    ``locked_text`` (a cache by token row) with the token-id features it covers."""

    second_view: bool = False
    sections: dict[str, tuple[str, str]] | None = None
    labels: tuple[LabelTable, ...] = ()
    locked_image: FeatureCache | None = None
    locked_text: FeatureCache | None = None
    locked_text_sources: tuple[str, ...] = field(default=())

    def features(self) -> tuple[Feature, ...]:
        out: list[Feature] = []
        if self.second_view:
            out.append(IMAGE_VIEW2)
        if self.sections is not None:
            out += [FINDINGS_IDS, FINDINGS_MASK, IMPRESSION_IDS, IMPRESSION_MASK, HAS_SECTIONS]
        out += [t.feature for t in self.labels]
        if self.locked_image is not None:
            out.append(Feature(LOCKED_IMAGE, "float32", (self.locked_image.dim,), "the locked image tower's features"))
        if self.locked_text is not None:
            out += [Feature(locked_text_name(s), "float32", (self.locked_text.dim,), f"locked text features of {s}")
                    for s in self.locked_text_sources]
        return tuple(out)


def token_row_keys(ids, mask):
    """(B, L) token ids and padding mask -> (B,) int64: the key of each token row in a locked text
    cache (a 63-bit hash of the ids, padding positions written as -1)."""
    import tensorflow as tf

    masked = tf.where(tf.cast(mask, tf.bool), tf.cast(ids, tf.int64), tf.constant(-1, tf.int64))
    joined = tf.strings.reduce_join(tf.strings.as_string(masked), axis=-1, separator=",")
    return tf.strings.to_hash_bucket_fast(joined, 2 ** 63 - 1)


def read_sections(dataset: str | Path) -> dict[str, tuple[str, str]]:
    """report_id -> (findings, impression) of the dataset's reports (empty strings where absent)."""
    reports = DatasetDir(dataset).reports(["report_id", "findings", "impression"])
    return {str(r): (str(f or ""), str(i or "")) for r, f, i in zip(reports["report_id"], reports["findings"],
                                                                 reports["impression"])}


def read_label_tables(dataset: str | Path, names: Sequence[str], split: str = "train",
                      key: str = "train.aux_labels") -> tuple[LabelTable, ...]:
    """The :class:`LabelTable` of each label name (``modality``, ``view``, ``laterality`` or
    ``labels.KEY``) over the images of ``split``. A label with fewer than two classes there is a
    ConfigError naming ``key``."""
    manifest = DatasetDir(dataset).manifest()
    rows = manifest[manifest["split"] == split]
    ids = tuple(str(i) for i in rows["image_id"])
    parsed = parse_labels(list(rows["labels"])) if "labels" in rows.columns else [None] * len(rows)
    out = []
    for name in names:
        if name in AUX_LABEL_COLUMNS:
            raw: list = [None if v is None or str(v).strip().lower() in ("", "unknown", "nan", "none") else str(v)
                         for v in rows[name]] if name in rows.columns else [None] * len(rows)
        else:
            sub = name[len("labels."):]
            raw = [(obj or {}).get(sub) for obj in parsed]
        lists = [v for v in raw if isinstance(v, list)]
        if lists:
            classes = tuple(sorted({str(x) for v in lists for x in v}))
            values = np.full((len(raw), len(classes)), -1.0, np.float32)
            index = {c: j for j, c in enumerate(classes)}
            for i, v in enumerate(raw):
                if isinstance(v, list):
                    values[i] = 0.0
                    for x in v:
                        values[i, index[str(x)]] = 1.0
            multilabel = True
        else:
            known = [None if v is None or not str(v).strip() else str(v) for v in raw]
            classes = tuple(sorted({v for v in known if v is not None}))
            index = {c: j for j, c in enumerate(classes)}
            values = np.array([index[v] if v is not None else -1 for v in known], np.int32)
            multilabel = False
        if len(classes) < 2:
            raise ConfigError(f"config key '{key}': label {name!r} has {len(classes)} class(es) among the {split} "
                              f"images of {dataset}; a head needs at least two")
        out.append(LabelTable(name, classes, multilabel, ids, values))
    return tuple(out)


def mask_name(ids_name: str) -> str:
    """The padding-mask feature of a token-id feature (``token_ids`` -> ``padding_mask``,
    ``neg_negation_ids`` -> ``neg_negation_mask``)."""
    return "padding_mask" if ids_name == "token_ids" else ids_name[:-len("_ids")] + "_mask"
