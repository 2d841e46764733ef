"""Reviewers' decisions back into training (train.reviews, the 'reviewed' kind) and fine-tuning
from earlier weights (train.init_from)."""

from __future__ import annotations

import json

import pytest

from mmclinic.config import MISMATCH_KINDS, REVIEWED_KIND, TrainConfig, load_config
from mmclinic.data.negatives import NegativeTables, Reviews, apply_reviews
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
                            texts={"other_patient_same_findings": ("t2", "t1", ""), "negation": ("n1", "n2", "n3")},
                            normalized=("t1", "t2", "t3"), sources={"other_patient_same_findings": ("r2", "r1", "")})
    reviews = Reviews("x.csv", {
        "i1": {"status": "confirmed_mismatch", "report_key": "r1", "scoring_run_ids": ["s1"]},
        "i2": {"status": "confirmed_match", "report_key": "r1", "scoring_run_ids": ["s1", "s2"]},
        "i3": {"status": "dismissed", "report_key": "", "scoring_run_ids": []},
        "t9": {"status": "confirmed_mismatch", "report_key": "", "scoring_run_ids": []},
        "i4": {"status": "confirmed_mismatch", "report_key": "r3", "scoring_run_ids": []}})
    out = apply_reviews(tables, reviews, ["i1", "i2", "i3", "i4"], ["r1", "r2", "r3", "r2"],
                        {"r1": "T1", "r2": "T2", "r3": "T3"})
    assert out.by_image == {REVIEWED_KIND: (("i1",), ("T1",))}
    # i2 (report r2) was confirmed to match r1: r2's generated negative drawn from r1 is gone
    assert out.texts["other_patient_same_findings"] == ("t2", "", "") and out.texts["negation"] == ("n1", "n2", "n3")
    rc = out.review_counts
    assert (rc["confirmed_mismatch"], rc["confirmed_match"], rc["dismissed"], rc["outside_train"],
            rc["generated_negatives_removed"]) == (1, 1, 1, 2, 1)
    assert rc["scoring_run_ids"] == ["s1", "s2"]
    assert apply_reviews(tables, reviews, ["i1"], ["r1"], {}, use_mismatches=False).by_image == {}


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
