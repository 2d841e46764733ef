"""The training step unit: built from the config, fed by the pipeline from one batch schema."""

from __future__ import annotations

import numpy as np
import pytest

from mmclinic.config import MISMATCH_KINDS, load_config

from conftest import REPO

TINY = REPO / "experiments" / "tiny.yaml"


def _tokenizer(dataset, cfg):
    import pandas as pd

    from mmclinic.text.tokenizer import ReportTokenizer, learn_vocabulary

    texts = sorted(pd.read_parquet(dataset / "reports.parquet")["text"])
    return ReportTokenizer(learn_vocabulary(texts, cfg.model.vocab_size), cfg.data.max_length)


def _pipeline(dataset, cfg, tok, kinds, schema):
    from mmclinic.data.negatives import split_negatives
    from mmclinic.data.pipeline import make_dataset

    negatives = split_negatives(dataset, "train", cfg.train.seed, kinds.table_kinds)
    return make_dataset(dataset, "train", cfg.data, tok, cfg.train.batch_size, training=True,
                        negatives=negatives, schema=schema)


def test_mismatch_kinds_set_the_negatives_and_the_schema():
    from mmclinic.data.schema import BatchSchema
    from mmclinic.training.step import MismatchKinds

    cfg = load_config(TINY, ['train.mismatch_kinds=["negation:2", "laterality_swap:1", "finding_swap:0"]'])
    kinds = MismatchKinds.from_config(cfg.train)
    assert kinds.table_kinds == ("negation",) and kinds.text_kinds == ("laterality_swap", "negation")
    assert kinds.positive_weight == 3.0
    names = BatchSchema.for_training(cfg.data, kinds.table_kinds).names
    assert {"neg_negation_ids", "neg_negation_mask", "neg_negation_ok"} <= set(names)
    assert not any(n.startswith("neg_finding_swap") for n in names)


def test_step_trains_on_the_pipeline_batches_of_its_schema(dataset):
    """The pipeline built from the step's schema gives exactly those features with their dtypes and
    shapes; one step on such a batch returns every logged term, finite, and moves the weights."""
    import keras
    import tensorflow as tf

    from mmclinic.training.step import TrainStep

    cfg = load_config(TINY, ["train.warmup_steps=0"])  # warm-up starts at a learning rate of 0
    tok = _tokenizer(dataset, cfg)
    keras.utils.set_random_seed(0)
    step = TrainStep.build(cfg, len(tok.vocab), tf.distribute.get_strategy())
    ds = _pipeline(dataset, cfg, tok, step.kinds, step.schema)
    specs = step.schema.specs(cfg.train.batch_size)
    assert set(ds.element_spec) == set(step.schema.names)
    for name, spec in ds.element_spec.items():
        assert spec.dtype == specs[name].dtype and spec.shape.is_compatible_with(specs[name].shape), name

    before = [np.array(v.numpy()) for v in step.variables]
    out = {k: float(v) for k, v in step(next(iter(step.distribute(ds)))).items()}
    want = {"loss", "contrastive", "match", "match_true_pair"} | {f"{p}_{k}" for k in MISMATCH_KINDS
                                                                   for p in ("match", "share")}
    assert set(out) == want and all(np.isfinite(v) for v in out.values()), out
    assert out["loss"] == pytest.approx(out["contrastive"] + cfg.train.match_weight * out["match"], rel=1e-5)
    moved = [not np.array_equal(a, v.numpy()) for a, v in zip(before, step.variables)]
    assert sum(moved) > len(moved) // 2


def test_pipeline_and_step_refuse_batches_off_the_schema(dataset):
    import dataclasses

    import keras
    import tensorflow as tf

    from mmclinic.errors import UsageError
    from mmclinic.training.step import TrainStep

    cfg = load_config(TINY)
    tok = _tokenizer(dataset, cfg)
    keras.utils.set_random_seed(0)
    step = TrainStep.build(cfg, len(tok.vocab), tf.distribute.get_strategy())
    # A pipeline that cannot meet the schema fails when it is built, naming the feature.
    with pytest.raises(UsageError, match="'image'"):
        _pipeline(dataset, cfg, tok, step.kinds, dataclasses.replace(step.schema, image_size=48))
    wider = dataclasses.replace(step.schema, negative_kinds=(*step.schema.negative_kinds, "no_such_kind"))
    with pytest.raises(UsageError, match="neg_no_such_kind_ids"):
        _pipeline(dataset, cfg, tok, step.kinds, wider)
    # A batch without one of the schema's features fails when the step is traced.
    batch = dict(next(iter(_pipeline(dataset, cfg, tok, step.kinds, step.schema))))
    del batch["has_side"]
    with pytest.raises(UsageError, match="'has_side'"):
        step(batch)
