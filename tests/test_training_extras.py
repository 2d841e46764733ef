"""Training that makes the most of small datasets: locked towers with cached features, image-image
and text-text terms, auxiliary label heads, the logit-scale cap; and the configuration keys."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmclinic.config import ExperimentConfig, config_from_dict, load_config
from mmclinic.errors import ConfigError

from conftest import REPO

TINY = REPO / "experiments" / "tiny.yaml"
NEW_KEYS = {"locked_tower": "text", "cache_locked": False, "image_image_weight": 0.5, "text_text_weight": 0.5,
            "aux_labels": ["view:1"], "max_logit_scale": 5.0}


# ---------------------------------------------------------------- configuration


def test_new_keys_at_their_default_leave_the_hash_as_it_was():
    import hashlib
    import json

    from mmclinic.config import HASH_OMITTED_AT_DEFAULT

    cfg = load_config(TINY)
    plain = cfg.to_dict()
    for dotted in HASH_OMITTED_AT_DEFAULT:
        section, key = dotted.split(".")
        del plain[section][key]
    before = hashlib.sha256(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert cfg.hash() == before
    for key, value in NEW_KEYS.items():
        other = config_from_dict({"train": {key: value}, "data": {"augment": True}})
        assert other.hash() != ExperimentConfig().hash(), key


def test_locked_image_cache_with_augmentation_is_refused_naming_the_keys():
    with pytest.raises(ConfigError, match=r"train.locked_tower.*train.cache_locked.*data.augment"):
        config_from_dict({"train": {"locked_tower": "image"}})
    assert config_from_dict({"train": {"locked_tower": "image"}, "data": {"augment": False}}).train.cache_locked
    assert not config_from_dict({"train": {"locked_tower": "image", "cache_locked": False}}).train.cache_locked
    with pytest.raises(ConfigError, match="train.image_image_weight"):
        config_from_dict({"train": {"locked_tower": "image", "image_image_weight": 1.0}, "data": {"augment": False}})
    with pytest.raises(ConfigError, match="train.aux_labels"):
        config_from_dict({"train": {"aux_labels": ["sex:1"]}})
    with pytest.raises(ConfigError, match="train.max_logit_scale"):
        config_from_dict({"train": {"max_logit_scale": -1.0}})
    with pytest.raises(ConfigError, match=r"data.hflip.*dextrocardia"):
        config_from_dict({"data": {"hflip": True}})


def test_logit_scale_cap_defaults_and_overrides():
    from mmclinic.training.extras import DEFAULT_MAX_LOGIT_SCALE, logit_scale_cap

    own = ExperimentConfig()
    dual = config_from_dict({"model": {"image_tower": "checkpoint", "text_tower": "checkpoint",
                                       "dual_checkpoint": "/somewhere"}})
    assert logit_scale_cap(own, math.log(200.0)) == pytest.approx(math.log(100.0)) == DEFAULT_MAX_LOGIT_SCALE
    assert logit_scale_cap(dual, math.log(117.0)) == pytest.approx(math.log(117.0))
    assert logit_scale_cap(dual, math.log(10.0)) == pytest.approx(math.log(100.0))
    assert logit_scale_cap(config_from_dict({"train": {"max_logit_scale": 3.0}}), 9.0) == 3.0


# ---------------------------------------------------------------- pure losses against numpy


def _np_view_loss(a, b, scale, valid):
    idx = np.flatnonzero(valid)
    lg = np.exp(scale) * a[idx] @ b[idx].T
    def ce(m):
        m = m - m.max(1, keepdims=True)
        return -(np.diag(m) - np.log(np.exp(m).sum(1)))
    return 0.5 * (ce(lg).mean() + ce(lg.T).mean())


def test_view_contrastive_loss_matches_hand_computation():
    from mmclinic.training.extra_losses import view_contrastive_loss

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    valid = np.array([1, 1, 0, 1, 0, 1])
    got = float(view_contrastive_loss(a.astype("float32"), b.astype("float32"), np.float32(1.5), valid))
    assert got == pytest.approx(_np_view_loss(a, b, 1.5, valid), rel=1e-5)
    full = float(view_contrastive_loss(a.astype("float32"), b.astype("float32"), np.float32(1.5)))
    assert full == pytest.approx(_np_view_loss(a, b, 1.5, np.ones(6)), rel=1e-5)
    assert full != pytest.approx(got)
    assert float(view_contrastive_loss(a.astype("float32"), b.astype("float32"), 1.5, np.zeros(6))) == 0.0


def test_label_losses_match_hand_computation():
    from mmclinic.training.extra_losses import label_cross_entropy, multilabel_bce

    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 1.0, 1.0]], "float32")
    labels = np.array([0, -1, 2])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = -(np.log(p[0, 0]) + np.log(p[2, 2])) / 2
    assert float(label_cross_entropy(logits, labels)) == pytest.approx(want, rel=1e-5)
    targets = np.array([[1, 0, -1], [-1, -1, -1], [0, 1, 1]], "float32")
    s = 1 / (1 + np.exp(-logits))
    known = targets >= 0
    per = -(targets * np.log(s) + (1 - targets) * np.log(1 - s))
    assert float(multilabel_bce(logits, targets)) == pytest.approx(per[known].mean(), rel=1e-5)


def test_aux_head_learns_a_separable_label():
    import keras
    import tensorflow as tf

    from mmclinic.training.extra_losses import label_cross_entropy
    from mmclinic.training.extras import AuxHeads

    rng = np.random.default_rng(1)
    emb = rng.normal(size=(64, 8)).astype("float32")
    labels = (emb[:, 0] > 0).astype("int32") + (emb[:, 1] > 0).astype("int32")  # three classes
    heads = AuxHeads([("view", 3)], 8)
    opt = keras.optimizers.Adam(0.05)
    first = None
    for _ in range(150):
        with tf.GradientTape() as tape:
            loss = label_cross_entropy(heads(emb)["view"], labels)
        opt.apply(tape.gradient(loss, heads.trainable_variables), heads.trainable_variables)
        first = float(loss) if first is None else first
    acc = float(np.mean(np.argmax(heads(emb)["view"].numpy(), 1) == labels))
    assert float(loss) < 0.5 * first and acc > 0.9


# ---------------------------------------------------------------- the step


def _tokenizer(dataset, cfg):
    import pandas as pd

    from mmclinic.text.tokenizer import ReportTokenizer, learn_vocabulary

    texts = sorted(pd.read_parquet(dataset / "reports.parquet")["text"])
    return ReportTokenizer(learn_vocabulary(texts, cfg.model.vocab_size), cfg.data.max_length)


def _step(dataset, cfg, tok):
    import keras
    import tensorflow as tf

    from mmclinic.training.extras import read_extra_inputs
    from mmclinic.training.step import TrainStep

    keras.utils.set_random_seed(0)
    return TrainStep.build(cfg, len(tok.vocab), tf.distribute.get_strategy(),
                           extra_inputs=read_extra_inputs(cfg, dataset))


def _batch(dataset, cfg, tok, step):
    from mmclinic.data.negatives import split_negatives
    from mmclinic.data.pipeline import make_dataset

    negatives = split_negatives(dataset, "train", cfg.train.seed, step.kinds.generated_kinds)
    ds = make_dataset(dataset, "train", cfg.data, tok, cfg.train.batch_size, training=True, negatives=negatives,
                      schema=step.schema, extras=step.extras.pipeline_inputs())
    return negatives, next(iter(ds))


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["image", "text"])
def test_cached_locked_features_give_the_loss_of_the_uncached_tower(dataset, tmp_path, tower):
    """The same batch, the same weights: the step reading the locked tower's cached features and the
    step running the locked tower give the same loss (within float tolerance)."""
    from mmclinic.training.lit import attach_caches

    over = ["train.warmup_steps=0", f"train.locked_tower={tower}", "data.augment=false",
            'train.mismatch_kinds=["other_patient:1", "laterality_swap:1", "negation:1"]']
    cached_cfg, plain_cfg = load_config(TINY, over), load_config(TINY, over + ["train.cache_locked=false"])
    tok = _tokenizer(dataset, cached_cfg)
    cached, plain = _step(dataset, cached_cfg, tok), _step(dataset, plain_cfg, tok)
    plain.model.set_weights(cached.model.get_weights())
    from mmclinic.data.negatives import split_negatives

    negatives = split_negatives(dataset, "train", 0, cached.kinds.generated_kinds)
    record = attach_caches(cached, dataset, tok, negatives, "v-test", tmp_path)
    assert record["role"] == tower and not record["reused"] and record["items"] > 0
    locked = cached.model.image_backbone if tower == "image" else cached.model.text_backbone
    assert not locked.trainable_weights and all(any(v is w for w in cached.variables) for v in cached.model.image_proj.weights)
    _, batch = _batch(dataset, cached_cfg, tok, cached)
    feature = "locked_image" if tower == "image" else "locked_token_ids"
    assert feature in batch and feature not in plain.schema.names
    a = {k: float(v) for k, v in cached.loss_terms(cached.hash_strings(batch))[1].items()}
    b = {k: float(v) for k, v in plain.loss_terms(plain.hash_strings(batch))[1].items()}
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


def test_changed_key_never_reuses_a_cache(dataset, tmp_path):
    from mmclinic.training.lit import image_cache

    cfg = load_config(TINY, ["train.locked_tower=image", "data.augment=false"])
    tok = _tokenizer(dataset, cfg)
    step = _step(dataset, cfg, tok)
    model = step.model
    first, rec1 = image_cache(model, dataset, 32, "v1", tmp_path)
    again, rec2 = image_cache(model, dataset, 32, "v1", tmp_path)
    assert not rec1["reused"] and rec2["reused"] and rec1["key"] == rec2["key"]
    np.testing.assert_array_equal(first.features, again.features)
    other, rec3 = image_cache(model, dataset, 32, "v2", tmp_path)  # another dataset version
    assert not rec3["reused"] and rec3["key"] != rec1["key"] and rec3["file"] != rec1["file"]
    w = model.image_backbone.weights[0]
    w.assign(w.numpy() + 0.5)  # other weights: another key, features computed afresh
    moved, rec4 = image_cache(model, dataset, 32, "v1", tmp_path)
    assert not rec4["reused"] and rec4["key"] != rec1["key"]
    assert not np.allclose(moved.features, first.features)
    # A file under the right name holding another key is recomputed, never read.
    np.savez(rec4["file"], key=np.array("stale"), keys=moved.keys, features=np.zeros_like(moved.features))
    fresh, rec5 = image_cache(model, dataset, 32, "v1", tmp_path)
    assert not rec5["reused"]
    np.testing.assert_allclose(fresh.features, moved.features, rtol=1e-6)


@pytest.mark.slow
def test_step_adds_image_image_text_text_and_aux_terms(dataset):
    """One step with every extra term: each is logged, finite, and the total is their weighted sum;
    the heads' variables train; the cap is the configured one."""
    cfg = load_config(TINY, ["train.warmup_steps=0", "train.image_image_weight=0.5", "train.text_text_weight=0.25",
                             'train.aux_labels=["view:0.3", "labels.findings:0.2"]', "train.max_logit_scale=2.0"])
    tok = _tokenizer(dataset, cfg)
    step = _step(dataset, cfg, tok)
    assert step.logit_scale_cap == 2.0
    heads = step.extras.variables
    assert heads and all(any(v is w for w in step.variables) for v in heads)
    _, batch = _batch(dataset, cfg, tok, step)
    assert {"image_view2", "findings_ids", "impression_ids", "has_sections", "aux_view", "aux_labels_findings"} \
        <= set(batch)
    assert not np.array_equal(batch["image"].numpy(), batch["image_view2"].numpy())
    before = [h.numpy().copy() for h in heads]
    out = {k: float(v) for k, v in _eager_step(step, batch).items()}
    for k in ("image_image", "text_text", "aux_view", "aux_labels_findings"):
        assert np.isfinite(out[k]) and out[k] > 0, (k, out)
    want = (out["contrastive"] + cfg.train.match_weight * out["match"] + 0.5 * out["image_image"]
            + 0.25 * out["text_text"] + 0.3 * out["aux_view"] + 0.2 * out["aux_labels_findings"])
    assert out["loss"] == pytest.approx(want, rel=1e-5)
    assert all(not np.array_equal(b, h.numpy()) for b, h in zip(before, heads))
    assert float(step.model.logit_scale.numpy()) <= 2.0 + 1e-6


def _eager_step(step, batch):
    """The distributed step run eagerly (no tracing: seconds, not tens of seconds, for one step)."""
    return step.distributed.python_function(batch)


def test_dual_checkpoint_scale_above_100_survives_a_step(dataset, tmp_path):
    """A pretrained SigLIP's logit scale above log(100) is the cap by default: the first
    fine-tuning step no longer cuts it."""
    from checkpoint_factory import write_siglip_preset

    import keras
    import tensorflow as tf

    from mmclinic.models.tokenizers import make_tokenizer
    from mmclinic.training.step import TrainStep

    folder, _, _ = write_siglip_preset(tmp_path / "siglip", logit_scale=math.log(150.0))
    cfg = load_config(TINY, ["train.warmup_steps=0", "data.max_length=16", "model.image_tower=checkpoint",
                             "model.text_tower=checkpoint", f"model.dual_checkpoint={folder}",
                             'train.mismatch_kinds=["other_patient:1"]', "train.learning_rate=0.0001"])
    keras.utils.set_random_seed(0)
    tok = make_tokenizer(cfg)
    step = TrainStep.build(cfg, len(tok.vocab), tf.distribute.get_strategy())
    assert step.logit_scale_cap == pytest.approx(math.log(150.0), rel=1e-6)
    _, batch = _batch(dataset, cfg, tok, step)
    _eager_step(step, batch)
    assert float(step.model.logit_scale.numpy()) > math.log(100.0) + 0.3


@pytest.mark.slow
def test_run_records_the_cap_and_reuses_its_locked_cache_when_resumed(dataset, tmp_path):
    """A run with a locked, cached text tower and auxiliary heads: the cache is computed once and
    reused by the resumed run (its key and the cap in run.json), the heads are checkpointed."""
    import json

    from mmclinic.training.loop import train

    cfg = load_config(TINY, ["train.steps=3", "train.locked_tower=text", 'train.aux_labels=["view:0.5"]',
                             "train.eval_every=100", "train.checkpoint_every=1", "train.log_every=1"])
    run = tmp_path / "run"
    first = train(cfg, dataset, run, quiet=True, stop_after=1)  # never complete: no validation or registration
    info = json.loads((run / "run.json").read_text())
    assert first.step == 1 and info["logit_scale_cap"] == pytest.approx(math.log(100.0))
    assert info["locked_cache"]["role"] == "text" and not info["locked_cache"]["reused"]
    assert (run / "embedding_cache").is_dir()
    second = train(cfg, dataset, run, quiet=True, stop_after=2)
    again = json.loads((run / "run.json").read_text())
    assert second.step == 2 and again["locked_cache"]["reused"]
    assert again["locked_cache"]["key"] == info["locked_cache"]["key"]
