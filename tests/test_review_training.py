"""Reviewers' decisions back into training (train.reviews, the 'reviewed' kind) and fine-tuning
from earlier weights (train.init_from)."""

from __future__ import annotations

import json

import pytest

from mmclinic.config import MISMATCH_KINDS, REVIEWED_KIND, TrainConfig, load_config
from mmclinic.data.negatives import REVIEWED_MATCH_KIND, NegativeTables, Reviews, apply_reviews
from mmclinic.errors import ConfigError

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TINY = REPO / "experiments" / "tiny.yaml"
TRAINED = ["train.steps=200", "train.checkpoint_every=50", "train.eval_every=200", "train.log_every=50",
           "export.min_recall5_over_chance=1.0", "data.deterministic=true"]


def test_reviewed_kind_is_off_by_default_and_needs_decisions():
    assert REVIEWED_KIND not in str(TrainConfig().mismatch_kinds) and len(MISMATCH_KINDS) == 6
    with pytest.raises(ConfigError, match="lists 'reviewed' but 'train.reviews' names no decisions"):
        load_config(TINY, ['train.mismatch_kinds=["negation:1","reviewed:2"]'])
    cfg = load_config(TINY, ['train.mismatch_kinds=["negation:1","reviewed:2"]', "train.reviews=d.csv"])
    assert cfg.train.reviews == "d.csv"


def test_apply_reviews():
    tables = NegativeTables(report_ids=("r1", "r2", "r3"),
                            texts={"other_patient_same_findings": ("t2", "t1", ""), "negation": ("n1", "no T2", "n3")},
                            normalized=("t1", "t2", "t3"), sources={"other_patient_same_findings": ("r2", "r1", "")})
    reviews = Reviews("x.csv", {
        "i1": {"status": "confirmed_mismatch", "report_key": "r1", "scoring_run_ids": ["s1"]},
        "i2": {"status": "confirmed_match", "report_key": "r1", "scoring_run_ids": ["s1", "s2"]},
        "i3": {"status": "dismissed", "report_key": "", "scoring_run_ids": []},
        "t9": {"status": "confirmed_mismatch", "report_key": "", "scoring_run_ids": []},
        "i4": {"status": "confirmed_mismatch", "report_key": "r3", "scoring_run_ids": []},
        "i5": {"status": "confirmed_match", "report_key": "r2", "scoring_run_ids": ["s2"]}})
    out = apply_reviews(tables, reviews, ["i1", "i2", "i3", "i4", "i5"], ["r1", "r2", "r3", "r2", "r2"],
                        {"r1": "T1", "r2": "T2", "r3": "T3"})
    # i2's verified pair is (i2, r1), not its current pair (i2, r2): no hard positive (the step would
    # weigh the current pair); i5 was verified with its own report r2.
    assert out.by_image == {REVIEWED_KIND: (("i1",), ("T1",)), REVIEWED_MATCH_KIND: (("i5",), ("T2",))}
    # i2 (report r2) was verified with r1: r2's generated negatives drawn from r1, or equal to T1 after
    # normalisation, are gone; i5's verified pair is r2 itself: no generated negative equals it
    assert out.texts["other_patient_same_findings"] == ("t2", "", "") and out.texts["negation"] == ("n1", "no T2", "n3")
    rc = out.review_counts
    assert (rc["confirmed_mismatch"], rc["confirmed_match"], rc["dismissed"], rc["outside_train"],
            rc["generated_negatives_removed"], rc["contrastive_excluded"], rc["hard_positives"]) == (1, 2, 1, 2, 1, 1, 1)
    assert rc["scoring_run_ids"] == ["s1", "s2"]
    assert rc["by_scoring_run"] == {"none": {"dismissed": 1, "outside_train": 2},
                                    "s1": {"confirmed_mismatch": 1, "confirmed_match": 1},
                                    "s2": {"confirmed_match": 2}}
    off = apply_reviews(tables, reviews, ["i1"], ["r1"], {}, use_mismatches=False)
    assert off.by_image == {} and off.review_counts["contrastive_excluded"] == 0


def test_a_verified_report_is_removed_wherever_a_generated_kind_made_it():
    """A decision naming another report than the image's current one: a generated negative equal to
    that verified report after normalisation goes, whichever kind made it."""
    tables = NegativeTables(report_ids=("r1", "r2"), texts={"negation": ("No  EFFUSION.", "x")},
                            normalized=("a", "b"), sources={})
    reviews = Reviews("db", {"i1": {"status": "confirmed_match", "report_key": "r9", "scoring_run_ids": []}})
    out = apply_reviews(tables, reviews, ["i1"], ["r1"], {"r9": "no effusion."})
    assert out.texts["negation"] == ("", "x") and out.review_counts["generated_negatives_removed"] == 1


# ------------------------------------------------------------------ the contrastive masks, by hand


def test_contrastive_masks_by_hand():
    import numpy as np

    from mmclinic.training.losses import contrastive_masks

    # images 0, 1 share a report (same text); 2 is a confirmed mismatch whose report reads like 3's
    # after normalisation; 3 is an ordinary pair
    pos, ign = contrastive_masks(np.array([1, 1, 2, 3]), np.array([10, 10, 20, 20]), np.array([1, 1, 0, 1]))
    assert pos.numpy().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert ign.numpy().tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]]


def _clip_by_hand(logits, pos, ign):
    """The masked InfoNCE written out row by row (numpy, float64)."""
    import numpy as np

    def one(lg, p, g):
        rows = []
        for i in range(lg.shape[0]):
            if p[i].sum() == 0:
                continue
            keep = g[i] == 0
            lse = np.log(np.exp(lg[i][keep]).sum())
            rows.append(-sum(p[i, j] / p[i].sum() * (lg[i, j] - lse) for j in range(lg.shape[1]) if p[i, j]))
        return float(np.mean(rows)) if rows else 0.0

    return 0.5 * (one(logits, pos, ign) + one(logits.T, pos.T, ign.T))


def test_masked_clip_loss_against_hand_computation():
    import math

    import numpy as np

    from mmclinic.training.losses import clip_loss, masked_clip_loss, same_key_targets

    eye = np.eye(2, dtype=np.float32)
    # logits = identity (scale 1): each direction -log(e / (e + 1)); ignoring the off-diagonal: 0
    assert float(masked_clip_loss(eye, eye, 0.0, eye, 0 * eye)) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert float(masked_clip_loss(eye, eye, 0.0, eye, 1 - eye)) == pytest.approx(0.0, abs=1e-7)
    # a row and a column without a positive leave the means: only image 0 / text 0 count
    no_second = np.array([[1, 0], [0, 0]], np.float32)
    assert float(masked_clip_loss(eye, eye, 0.0, no_second, 0 * eye)) == pytest.approx(math.log(1 + math.exp(-1)),
                                                                                       rel=1e-6)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5, 3)).astype(np.float32)
    txt = rng.normal(size=(5, 3)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    scale = math.log(4.0)
    logits = 4.0 * img.astype(np.float64) @ txt.T.astype(np.float64)
    pos = np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]], np.float32)
    ign = np.array([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], np.float32)
    assert float(masked_clip_loss(img, txt, scale, pos, ign)) == pytest.approx(_clip_by_hand(logits, pos, ign), rel=1e-5)
    # without masks it is clip_loss, multi-positive targets included
    keys = np.array([7, 7, 1, 2, 3])
    assert float(masked_clip_loss(img, txt, scale, np.eye(5), np.zeros((5, 5)))) == pytest.approx(
        float(clip_loss(img, txt, scale)), rel=1e-6)
    assert float(masked_clip_loss(img, txt, scale, same_key_targets(keys), np.zeros((5, 5)))) == pytest.approx(
        float(clip_loss(img, txt, scale, same_key_targets(keys))), rel=1e-6)


def test_masked_sigmoid_loss_against_hand_computation():
    import math

    import numpy as np

    from mmclinic.training.losses import masked_sigmoid_loss, sigmoid_loss

    eye = np.eye(2, dtype=np.float32)

    def softplus(x):
        return math.log1p(math.exp(x))

    # logits = identity - 1 (scale 1, bias -1): positives 0, negatives -1; -log sigmoid(x) = softplus(-x)
    full = (2 * softplus(0.0) + 2 * softplus(-1.0)) / 2
    assert float(masked_sigmoid_loss(eye, eye, 0.0, -1.0, eye, 0 * eye)) == pytest.approx(full, rel=1e-6)
    assert float(masked_sigmoid_loss(eye, eye, 0.0, -1.0, eye, 0 * eye)) == pytest.approx(
        float(sigmoid_loss(eye, eye, 0.0, -1.0)), rel=1e-6)
    # the confirmed mismatch's diagonal (image 1, text 1) ignored: neither a positive nor a negative
    masked = np.array([[0, 0], [0, 1]], np.float32)
    no_pos = np.array([[1, 0], [0, 0]], np.float32)
    assert float(masked_sigmoid_loss(eye, eye, 0.0, -1.0, no_pos, masked)) == pytest.approx(
        (softplus(0.0) + 2 * softplus(-1.0)) / 2, rel=1e-6)


def test_step_masks_confirmed_mismatches_and_duplicates_out_of_the_contrastive_loss(dataset):
    """The step's contrastive term on a real batch equals the masked loss with masks written out
    from the batch's texts and decisions, and differs from the unmasked loss; the verified pairs
    are flagged for the match head."""
    import keras
    import numpy as np
    import tensorflow as tf

    from mmclinic.artifacts import DatasetDir
    from mmclinic.data.negatives import split_negatives
    from mmclinic.data.pipeline import make_dataset
    from mmclinic.text.corruptions import normalize_report
    from mmclinic.text.tokenizer import ReportTokenizer, learn_vocabulary
    from mmclinic.training import losses
    from mmclinic.training.step import TrainStep

    cfg = load_config(TINY, ['train.mismatch_kinds=["negation:1","reviewed:2"]', "train.reviews=d.csv"])
    ds_dir = DatasetDir(dataset)
    reports = ds_dir.reports(["report_id", "text"])
    texts = reports.set_index("report_id")["text"].to_dict()
    tok = ReportTokenizer(learn_vocabulary(sorted(reports["text"]), cfg.model.vocab_size), cfg.data.max_length)
    keras.utils.set_random_seed(0)
    step = TrainStep.build(cfg, len(tok.vocab), tf.distribute.get_strategy())
    manifest = ds_dir.manifest()
    rows = manifest[manifest["split"] == "train"]
    base = split_negatives(dataset, "train", cfg.train.seed, step.kinds.generated_kinds)

    def first_batch(negatives):
        ds = make_dataset(dataset, "train", cfg.data, tok, 24, training=False, negatives=negatives)
        return next(iter(ds))

    ids = [x.decode() for x in first_batch(apply_reviews(base, Reviews("d", {}), rows["image_id"], rows["report_id"],
                                                         texts))["image_id"].numpy()]
    decisions = {i: {"status": "confirmed_mismatch", "report_key": "", "scoring_run_ids": []} for i in ids[:3]}
    decisions |= {i: {"status": "confirmed_match", "report_key": "", "scoring_run_ids": []} for i in ids[3:5]}
    negatives = apply_reviews(base, Reviews("d", decisions), rows["image_id"], rows["report_id"], texts)
    raw = first_batch(negatives)
    assert raw["neg_reviewed_ok"].numpy().tolist() == [True] * 3 + [False] * 21
    assert raw["neg_reviewed_match_ok"].numpy().tolist() == [False] * 3 + [True] * 2 + [False] * 19
    batch = step.hash_strings(step.schema.select(raw))
    _, terms = step.loss_terms(batch)

    text = [t.decode() for t in raw["text"].numpy()]
    norm = [normalize_report(t) for t in text]
    valid = np.array([0, 0, 0] + [1] * 21)
    pos = np.array([[float(text[i] == text[j] and valid[i]) for j in range(24)] for i in range(24)])
    ign = np.array([[float((norm[i] == norm[j] or text[i] == text[j]) and not pos[i, j]) for j in range(24)]
                    for i in range(24)])
    assert np.all(np.diag(ign)[:3] == 1) and pos[:3].sum() == 0
    img = step.model.encode_image(batch["image"], training=True)
    txt = step.model.encode_text(batch["token_ids"], batch["padding_mask"], training=True)
    want = float(losses.masked_clip_loss(img, txt, step.model.logit_scale, pos, ign))
    assert float(terms["contrastive"]) == pytest.approx(want, rel=1e-5)
    unmasked = float(losses.clip_loss(img, txt, step.model.logit_scale, losses.same_key_targets(batch["text_key"])))
    assert abs(unmasked - want) > 1e-4


@pytest.mark.slow
def test_retrain_from_a_run_with_decisions(dataset, trained_run, tmp_path):
    import mlflow
    import tensorflow as tf

    from mmclinic.artifacts import DatasetDir, RunDir
    from mmclinic.data.negatives import load_reviews, split_negatives
    from mmclinic.data.pipeline import make_dataset
    from mmclinic.eval.scorers import load_run_model
    from mmclinic.models.tokenizers import make_tokenizer
    from mmclinic.text.tokenizer import load_vocabulary
    from mmclinic.tracking import tracking_uri
    from mmclinic.training.loop import train, train_from_file, weights_sha256

    manifest = DatasetDir(dataset).manifest()
    train_ids = sorted(manifest.loc[manifest["split"] == "train", "image_id"])
    test_id = sorted(manifest.loc[manifest["split"] == "test", "image_id"])[0]
    csv = tmp_path / "decisions.csv"
    csv.write_text("pair_id,status,reviewer,note\n"
                   + "".join(f"{i},confirmed_mismatch,ana,\n" for i in train_ids[:3])
                   + "".join(f"{i},confirmed_match,ana,\n" for i in train_ids[3:5])
                   + f"{train_ids[5]},dismissed,ben,\n{test_id},confirmed_mismatch,ana,\n")

    # train.steps 0 from the run: exactly its weights
    cfg0 = load_config(TINY, TRAINED + ["train.steps=0", f"train.init_from={trained_run}"])
    r0 = train(cfg0, dataset, tmp_path / "zero", quiet=True)
    source_model, _, _ = load_run_model(RunDir(trained_run))
    assert r0.weights_sha256 == weights_sha256(source_model)
    assert RunDir(tmp_path / "zero").info()["init_from"]["run_dir"] == str(trained_run.resolve())

    r = train_from_file(TINY, dataset, tmp_path / "ft", TRAINED + ["train.steps=4", "train.log_every=2"], quiet=True,
                        reviews=str(csv), init_from=str(trained_run))
    info = RunDir(tmp_path / "ft").info()
    rc = info["reviews"]
    assert (rc["confirmed_mismatch"], rc["confirmed_match"], rc["dismissed"], rc["outside_train"]) == (3, 2, 1, 1)
    assert rc["source"] == str(csv)
    cfg = RunDir(tmp_path / "ft").config()
    assert cfg.train.mismatch_kinds[-1] == "reviewed:1" and cfg.train.init_from == str(trained_run)
    params = mlflow.MlflowClient(tracking_uri()).get_run(r.mlflow_run_id).data.params
    assert params["train.reviews.confirmed_mismatch"] == "3" and params["train.reviews.confirmed_match"] == "2"
    assert params["train.reviews.scoring_runs"] == "none"

    # the pipeline marks exactly the three confirmed images with a reviewed negative: their own report
    negatives = split_negatives(dataset, "train", cfg.train.seed, ())
    from mmclinic.data.negatives import apply_reviews as apply

    texts = DatasetDir(dataset).reports(["report_id", "text"]).set_index("report_id")["text"].to_dict()
    rows = manifest[manifest["split"] == "train"]
    negatives = apply(negatives, load_reviews(csv), rows["image_id"].tolist(), rows["report_id"].tolist(), texts)
    tok = make_tokenizer(cfg, load_vocabulary(RunDir(tmp_path / "ft").vocab_path))
    ds = make_dataset(dataset, "train", cfg.data, tok, 64, training=False, negatives=negatives)
    marked = []
    for b in ds:
        ok = b["neg_reviewed_ok"].numpy()
        marked += [x.decode() for x in b["image_id"].numpy()[ok]]
        assert tf.reduce_all(tf.equal(b["neg_reviewed_ids"][ok], b["token_ids"][ok]))
    assert sorted(marked) == train_ids[:3]
    assert json.dumps(rc)  # run.json stays plain JSON


@pytest.mark.slow
def test_masks_over_gathered_replicas_equal_one_device():
    """With two replicas gathering embeddings, text keys, normalised keys and the decisions, the
    masked losses are those of one device on the whole batch (the CPU split in two)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import json
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from mmclinic.training import losses

        rng = np.random.default_rng(0)
        n = 8
        img = rng.normal(size=(n, 6)).astype("float32")
        txt = rng.normal(size=(n, 6)).astype("float32")
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        key = np.array([1, 2, 3, 4, 5, 6, 7, 1], "int64")   # 0 and 7: the same report
        norm = np.array([1, 2, 3, 4, 5, 3, 7, 1], "int64")  # 2 and 5: the same after normalisation
        valid = np.array([1, 1, 1, 0, 1, 1, 1, 1], "int64")  # 3 (replica 0) and 6 (replica 1): confirmed
        valid[6] = 0
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

        def both(i, t, k, m, v):
            pos, ign = losses.contrastive_masks(k, m, v)
            return (losses.masked_clip_loss(i, t, np.log(10.0), pos, ign),
                    losses.masked_sigmoid_loss(i, t, np.log(10.0), -2.0, pos, ign))

        def replica_fn(b):
            return both(*losses.gather_replicas(b["img"], b["txt"], b["key"], b["norm"], b["valid"]))

        ds = tf.data.Dataset.from_tensor_slices({"img": img, "txt": txt, "key": key, "norm": norm,
                                                 "valid": valid}).batch(n)
        batch = next(iter(strategy.experimental_distribute_dataset(ds)))
        clip_r, sig_r = strategy.run(tf.function(replica_fn), args=(batch,))
        local = strategy.experimental_local_results
        one = both(img, txt, key, norm, valid)
        print("RESULT", json.dumps({"clip": [float(x) for x in local(clip_r)], "sig": [float(x) for x in local(sig_r)],
                                     "clip1": float(one[0]), "sig1": float(one[1])}))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    for kind in ("clip", "sig"):
        assert all(v == pytest.approx(res[f"{kind}1"], rel=1e-5) for v in res[kind]), res
