"""The features of a training batch, declared once.

The input pipeline (:func:`mmclinic.data.pipeline.make_dataset`) builds its batches from a
:class:`BatchSchema` and checks them against it when the pipeline is built; the training step
(:class:`mmclinic.training.step.TrainStep`) reads the features by these declarations and asks
the pipeline for its own schema. A feature renamed or retyped on one side fails there, by name,
instead of at the first step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmclinic.config import DataConfig
from mmclinic.errors import UsageError


@dataclass(frozen=True)
class Feature:
    """One feature of an example: its name, dtype and per-example shape.

    In ``shape``, ``"image_size"`` and ``"max_length"`` stand for the data config's sizes.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    doc: str = ""


IMAGE = Feature("image", "float32", ("image_size", "image_size", 1),
                "decoded, resized (and, in training, augmented) image in [0, 1]")
TOKEN_IDS = Feature("token_ids", "int32", ("max_length",), "the report's token ids")
PADDING_MASK = Feature("padding_mask", "bool", ("max_length",), "True at real tokens")
SWAPPED_IDS = Feature("swapped_ids", "int32", ("max_length",), "the report with left and right exchanged")
SWAPPED_MASK = Feature("swapped_mask", "bool", ("max_length",), "padding mask of swapped_ids")
HAS_SIDE = Feature("has_side", "bool", (), "the report names a side (its swap differs from it)")
TEXT = Feature("text", "string", (), "the report as the model sees it (multi-positive targets)")
PATIENT_KEY = Feature("patient_key", "string", (), "the patient's pseudonym")
NORM_KEY = Feature("norm_key", "int64", (),
                   "63-bit hash of the normalised report text (needs the negative tables)")


def negative_features(kind: str) -> tuple[Feature, Feature, Feature]:
    """The features of one kind of precomputed negative text (see :mod:`mmclinic.data.negatives`):
    its token ids, padding mask and ``ok`` (False where the report has no negative of that kind)."""
    return (Feature(f"neg_{kind}_ids", "int32", ("max_length",), f"token ids of the {kind} negative"),
            Feature(f"neg_{kind}_mask", "bool", ("max_length",), f"padding mask of the {kind} negative"),
            Feature(f"neg_{kind}_ok", "bool", (), f"the report has a {kind} negative"))


@dataclass(frozen=True)
class BatchSchema:
    """The features a training batch holds, in order, with their dtypes and shapes."""

    image_size: int
    max_length: int
    negative_kinds: tuple[str, ...] = ()
    """Kinds of precomputed negative texts, each adding :func:`negative_features`."""
    extra: tuple[Feature, ...] = ()
    """Optional features after those (see :mod:`mmclinic.data.extra_features`)."""

    @classmethod
    def for_training(cls, data: DataConfig, negative_kinds: Sequence[str] = (),
                     extra: Sequence[Feature] = ()) -> BatchSchema:
        return cls(data.image_size, data.max_length, tuple(negative_kinds), tuple(extra))

    @property
    def features(self) -> tuple[Feature, ...]:
        negatives = tuple(f for kind in self.negative_kinds for f in negative_features(kind))
        return (IMAGE, TOKEN_IDS, PADDING_MASK, SWAPPED_IDS, SWAPPED_MASK, HAS_SIDE, TEXT, PATIENT_KEY, NORM_KEY,
                *negatives, *self.extra)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def shape(self, feature: Feature) -> tuple[int, ...]:
        """The per-example shape of ``feature`` with this schema's sizes."""
        sizes = {"image_size": self.image_size, "max_length": self.max_length}
        return tuple(sizes[d] if isinstance(d, str) else d for d in feature.shape)

    def specs(self, batch_size: int | None = None) -> dict[str, Any]:
        """``tf.TensorSpec`` of every feature of a batch of ``batch_size`` (None: any)."""
        import tensorflow as tf

        return {f.name: tf.TensorSpec((batch_size, *self.shape(f)), tf.as_dtype(f.dtype), f.name)
                for f in self.features}

    def check(self, example: Mapping[str, Any], where: str = "batch", *, batched: bool = False) -> None:
        """Check that ``example`` (tensors or ``tf.TensorSpec`` of one example, or of a batch when
        ``batched``) holds every feature with its dtype and a compatible static shape; a mismatch
        is a UsageError naming the feature and ``where`` it was found."""
        import tensorflow as tf

        missing = [n for n in self.names if n not in example]
        if missing:
            raise UsageError(f"{where}: no feature {missing[0]!r} (features: {', '.join(sorted(example))})")
        for f in self.features:
            value = example[f.name]
            if value.dtype != tf.as_dtype(f.dtype):
                raise UsageError(f"{where}: feature {f.name!r} is {value.dtype.name}, the batch schema "
                                 f"declares {f.dtype}")
            shape = tf.TensorShape(value.shape)
            if batched and shape.rank:
                shape = shape[1:]
            if not shape.is_compatible_with(self.shape(f)):
                raise UsageError(f"{where}: feature {f.name!r} has shape {tuple(value.shape)}, the batch "
                                 f"schema declares {self.shape(f)} per example")

    def select(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """The schema's features of ``example`` that it holds, in the schema's order (see
        :meth:`check` for whether it holds them all, as declared)."""
        return {n: example[n] for n in self.names if n in example}
