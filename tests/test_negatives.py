"""Mismatch negatives for the match head: the tables built from the training split, their
configuration, the pipeline's lookups and the loss that weighs them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mmclinic.config import MISMATCH_KINDS, load_config, parse_mismatch_kinds
from mmclinic.text.corruptions import normalize_report
from mmclinic.data.negatives import TABLE_KINDS, build_negatives, split_negatives

from conftest import REPO

TINY = REPO / "experiments" / "tiny.yaml"


@pytest.fixture(scope="module")
def train_rows(dataset):
    manifest = pd.read_parquet(dataset / "manifest.parquet")
    reports = pd.read_parquet(dataset / "reports.parquet")
    rows = manifest[manifest["split"] == "train"].drop_duplicates("report_id")
    return rows.merge(reports[["report_id", "text"]], on="report_id").set_index("report_id")


def _findings(labels: str) -> set[str]:
    return set(json.loads(labels)["findings"])


def test_negative_tables_are_deterministic_and_independent_of_row_order(dataset):
    a, b = split_negatives(dataset, "train", seed=3), split_negatives(dataset, "train", seed=3)
    assert a == b and a.kinds == TABLE_KINDS
    assert all(n > 0 for n in a.counts().values()), a.counts()
    assert a.findings_source == "manifest labels"
    # A report's negatives depend on the seed and its id, not on where its row is.
    manifest = pd.read_parquet(dataset / "manifest.parquet")
    rows = manifest[manifest["split"] == "train"].drop_duplicates("report_id")
    rows = rows.merge(pd.read_parquet(dataset / "reports.parquet")[["report_id", "text"]], on="report_id")
    shuffled = rows.sample(frac=1.0, random_state=1)
    c = build_negatives(shuffled["report_id"].tolist(), shuffled["text"].tolist(), shuffled["patient_key"].tolist(),
                        shuffled["study_key"].tolist(), shuffled["labels"].tolist(), seed=3)
    assert c.texts == split_negatives(dataset, "train", seed=3).texts
    other_seed = split_negatives(dataset, "train", seed=4)
    assert other_seed.texts != a.texts


def test_every_negative_differs_from_its_report_and_partners_are_the_right_reports(dataset, train_rows):
    tables = split_negatives(dataset, "train", seed=0)
    assert set(tables.report_ids) == set(train_rows.index)  # the training split only
    for kind in TABLE_KINDS:
        for rid, text in zip(tables.report_ids, tables.texts[kind]):
            if text:
                assert normalize_report(text) != normalize_report(train_rows.loc[rid, "text"]), (kind, rid)
    same = tables.sources["same_patient_other_study"]
    other = tables.sources["other_patient_same_findings"]
    for i, rid in enumerate(tables.report_ids):
        me = train_rows.loc[rid]
        if same[i]:
            partner = train_rows.loc[same[i]]
            assert partner["patient_key"] == me["patient_key"] and partner["study_key"] != me["study_key"]
            assert tables.texts["same_patient_other_study"][i] == partner["text"]
        if other[i]:
            partner = train_rows.loc[other[i]]
            assert partner["patient_key"] != me["patient_key"]
            assert _findings(partner["labels"]) == _findings(me["labels"])
            assert tables.texts["other_patient_same_findings"][i] == partner["text"]
    # A negation states the absence of a finding the report states.
    negated = [(t, train_rows.loc[r, "text"]) for r, t in zip(tables.report_ids, tables.texts["negation"]) if t]
    assert negated and all(" no " in f" {t.lower()}" for t, _ in negated)


def test_mismatch_kinds_config_parses_and_rejects_bad_kinds():
    from mmclinic.errors import ConfigError

    default = load_config(TINY).train
    assert parse_mismatch_kinds(default.mismatch_kinds) == {k: 1.0 for k in MISMATCH_KINDS}
    cfg = load_config(TINY, ["train.mismatch_kinds=[negation:2, laterality_swap, finding_swap:0]"])
    assert parse_mismatch_kinds(cfg.train.mismatch_kinds) == {"negation": 2.0, "laterality_swap": 1.0}
    for bad in ("[negate:1]", "[negation:-1]", "[negation:x]", "[negation, negation]", "[negation:0]"):
        with pytest.raises(ConfigError, match="train.mismatch_kinds"):
            load_config(TINY, [f"train.mismatch_kinds={bad}"])
    assert load_config(TINY, ["train.mismatch_kinds=[]", "train.match_weight=0"]).train.mismatch_kinds == ()


def test_pipeline_looks_up_and_tokenizes_the_negatives_of_each_report(dataset):
    import tensorflow as tf

    from mmclinic.config import DataConfig
    from mmclinic.data.pipeline import make_dataset
    from mmclinic.text.tokenizer import ReportTokenizer, learn_vocabulary

    texts = pd.read_parquet(dataset / "reports.parquet")["text"].tolist()
    tok = ReportTokenizer(learn_vocabulary(texts, 300), 40)
    tables = split_negatives(dataset, "train", seed=0)
    row = {r: i for i, r in enumerate(tables.report_ids)}
    cfg = DataConfig(image_size=32, max_length=40, deterministic=True)
    batch = next(iter(make_dataset(dataset, "train", cfg, tok, 16, training=True, negatives=tables)))
    ids = [r.decode() for r in batch["report_id"].numpy()]
    for kind in TABLE_KINDS:
        want = [tables.texts[kind][row[r]] for r in ids]
        assert np.array_equal(batch[f"neg_{kind}_ok"].numpy(), [bool(t) for t in want])
        want_ids, want_mask = tok(tf.constant(want))
        assert np.array_equal(batch[f"neg_{kind}_ids"].numpy(), want_ids.numpy())
        assert np.array_equal(batch[f"neg_{kind}_mask"].numpy(), want_mask.numpy())
    norm = [tables.normalized[row[r]] for r in ids]
    assert np.array_equal(batch["norm_key"].numpy(), tf.strings.to_hash_bucket_fast(norm, 2 ** 63 - 1).numpy())
    # The token ids of the report itself are those of its text, as before.
    assert np.array_equal(batch["token_ids"].numpy(), tok(batch["text"])[0].numpy())


def test_match_loss_by_kind_weighs_kinds_and_ignores_missing_negatives():
    import tensorflow as tf

    from mmclinic.training import losses

    pos = tf.constant([2.0, 1.0, 0.5])
    neg = {"negation": tf.constant([1.0, -1.0, 3.0]), "laterality_swap": tf.constant([0.0, 2.0, -2.0])}
    ok = {"negation": tf.constant([True, True, False]), "laterality_swap": tf.constant([False, False, False])}
    total, parts = losses.match_loss_by_kind(pos, neg, ok, {"negation": 2.0, "laterality_swap": 1.0})
    # Missing negatives count for nothing: the same as the negation kind alone (same positive weight).
    alone, _ = losses.match_loss_by_kind(pos, {"negation": neg["negation"]}, {"negation": ok["negation"]},
                                         {"negation": 2.0}, positive_weight=3.0)
    assert float(total) == pytest.approx(float(alone))
    bce = lambda x, y: float(tf.nn.sigmoid_cross_entropy_with_logits(labels=float(y), logits=x))  # noqa: E731
    want = (3.0 * sum(bce(x, 1) for x in (2.0, 1.0, 0.5)) + 2.0 * (bce(1.0, 0) + bce(-1.0, 0))) / (3 * 3.0 + 2 * 2.0)
    assert float(total) == pytest.approx(want, rel=1e-5)
    assert float(parts["match_negation"]) == pytest.approx((bce(1.0, 0) + bce(-1.0, 0)) / 2, rel=1e-5)
    assert float(parts["share_negation"]) == pytest.approx(2 / 3)
    assert float(parts["match_laterality_swap"]) == 0.0 and float(parts["share_laterality_swap"]) == 0.0
