"""A researcher's checkpoint through the workbench: a tiny checkpoint folder (written offline from
random weights) -> zero-shot run (train.steps=0) that evaluate scores -> a few fine-tuning steps ->
export -> the SavedModel reloaded in a separate process scores as the Keras model does. Plus the
checkpoint config keys, their refusals and the experiment files that use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mmclinic.config import load_config
from mmclinic.errors import ConfigError, UsageError

from conftest import REPO

TINY = REPO / "experiments" / "tiny.yaml"
EXPERIMENTS = ["medsiglip-gpu.yaml", "raddino-biomedbert.yaml", "siglip-base-cpu-locked.yaml"]


# --- config keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_checkpoint_experiment_files_load(name):
    cfg = load_config(REPO / "experiments" / name)
    m = cfg.model
    assert "checkpoint" in (m.image_tower, m.text_tower)
    if m.dual_checkpoint:
        assert m.image_checkpoint is None and m.text_checkpoint is None
    text = (REPO / "experiments" / name).read_text()
    assert text.startswith("#") and "mmclinic train experiments/" + name in text


@pytest.mark.parametrize("overrides,match", [
    (["model.image_tower=checkpoint"], "set 'model.image_checkpoint'"),
    (["model.text_tower=checkpoint"], "set 'model.text_checkpoint'"),
    (["model.image_checkpoint=/x"], "only of it"),
    (["model.dual_checkpoint=/x"], "set 'model.image_tower' and 'model.text_tower' to 'checkpoint'"),
    (["model.dual_checkpoint=/x", "model.image_tower=checkpoint", "model.text_tower=checkpoint",
      "model.text_checkpoint=/y"], "cannot be set together"),
    (["data.hflip=true"], "left and right"),
    (["train.steps=-1"], ">= 0"),
])
def test_checkpoint_keys_are_checked_when_the_config_loads(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, overrides)


def test_zero_steps_is_a_valid_config():
    assert load_config(TINY, ["train.steps=0"]).train.steps == 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import checkpoint_factory as cf

    work = tmp_path_factory.mktemp("researcher_checkpoints")
    return {"siglip": cf.write_siglip_preset(work / "siglip")[0],
            "vit": cf.write_keras_image_preset(work / "vit", "vit")[0],
            "bert": cf.write_hf_bert(work / "bert")[0]}


def _dual(folder, *more):
    return ["model.image_tower=checkpoint", "model.text_tower=checkpoint", f"model.dual_checkpoint={folder}",
            "data.image_size=32", "data.max_length=16", "train.loss=sigmoid", *more]


def test_checkpoint_folders_are_checked_before_a_run_starts(folders, tmp_path):
    from mmclinic.models.towers import check_checkpoints

    rec = check_checkpoints(load_config(TINY, _dual(folders["siglip"])))
    assert rec["dual"]["architecture"] == "SigLIPBackbone" and len(rec["dual"]["sha256"]) == 64
    cases = [
        (_dual(tmp_path / "nowhere"), "checkpoint folder not found"),
        (_dual(folders["siglip"], "data.image_size=64"), "set data.image_size: 32"),
        (_dual(folders["siglip"], "data.max_length=24"), "exactly 16 tokens"),
        (_dual(folders["vit"]), "single tower"),
        (["model.image_tower=checkpoint", f"model.image_checkpoint={folders['bert']}"], "text encoder"),
        (["model.text_tower=checkpoint", f"model.text_checkpoint={folders['vit']}"], "image encoder"),
        (["model.text_tower=checkpoint", f"model.text_checkpoint={folders['bert']}", "data.max_length=48"],
         "exceeds the checkpoint's maximum sequence length 32"),
    ]
    for overrides, match in cases:
        with pytest.raises(UsageError, match=match) as e:
            check_checkpoints(load_config(TINY, overrides))
        assert "checkpoint folder" in str(e.value)


def test_a_checkpoint_tower_run_uses_the_checkpoints_tokenizer(folders):
    from mmclinic.models.checkpoints import CheckpointTokenizer
    from mmclinic.models.tokenizers import make_tokenizer
    from mmclinic.text.tokenizer import ReportTokenizer

    cfg = load_config(TINY, _dual(folders["siglip"]))
    tok = make_tokenizer(cfg)
    assert isinstance(tok, CheckpointTokenizer) and tok.kind == "sentencepiece" and tok.sequence_length == 16
    assert "</s>" in tok.vocab
    cfg = load_config(TINY, ["model.text_tower=checkpoint", f"model.text_checkpoint={folders['bert']}",
                             "data.max_length=24"])
    assert make_tokenizer(cfg).kind == "wordpiece"
    assert isinstance(make_tokenizer(load_config(TINY), ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]), ReportTokenizer)


# --- zero-shot, fine-tune, export, reload ---------------------------------------------------------

FAST = ["train.checkpoint_every=10", "train.eval_every=100", "train.log_every=1", "train.batch_size=8",
        "export.min_recall5_over_chance=0", "export.min_mismatch_auroc=0", "eval.bootstrap_samples=5"]


def _reload_in_a_fresh_process(path, png: list[bytes], texts: list[str]) -> np.ndarray:
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        import tensorflow_text  # noqa: F401 - the tokenizer's ops
        m = tf.saved_model.load({str(path)!r})
        png = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())["png"]]
        texts = json.loads(sys.argv[1])
        out = m.signatures["serving_default"](image_bytes=tf.constant(png), report_text=tf.constant(texts))
        print(json.dumps(out["match_score"].numpy().tolist()))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], input=json.dumps(
        {"png": [p.hex() for p in png]}), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.array(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["siglip_dual", "vit_bert"])
def test_checkpoint_zero_shot_then_fine_tune_then_export(case, folders, dataset, tmp_path):
    import tensorflow as tf

    from mmclinic.artifacts import RunDir
    from mmclinic.eval.embedding import load_split
    from mmclinic.eval.evaluate import evaluate
    from mmclinic.eval.scorers import RunScorer, load_run_model
    from mmclinic.models.checkpoints import checkpoint_sha256, load_dual_encoder, run_text_encoder
    from mmclinic.serve.export import export
    from mmclinic.training.loop import train

    if case == "siglip_dual":
        model_keys = _dual(folders["siglip"])
        recorded = {"dual": folders["siglip"]}
    else:
        model_keys = ["model.image_tower=checkpoint", f"model.image_checkpoint={folders['vit']}",
                      "model.text_tower=checkpoint", f"model.text_checkpoint={folders['bert']}",
                      "data.image_size=32", "data.max_length=24"]
        recorded = {"image": folders["vit"], "text": folders["bert"]}

    # Zero-shot: no training step, a run evaluate scores.
    zero = tmp_path / "zero_shot"
    result = train(load_config(TINY, [*model_keys, *FAST, "train.steps=0"]), dataset, zero, quiet=True)
    assert result.step == 0
    info = RunDir(zero).info()
    for role, folder in recorded.items():
        assert info["checkpoints"][role]["sha256"] == checkpoint_sha256(folder)
        assert info["checkpoints"][role]["path"] == str(folder.resolve())
    report = evaluate(zero, dataset, "test")
    assert "zero_shot" in report and report["retrieval"]["image_to_text"]["R@5"]["value"] is not None

    if case == "siglip_dual":
        # Untrained, the run's logits are the checkpoint's own zero-shot logits.
        model, tokenizer, config = load_run_model(zero)
        preset = load_dual_encoder(folders["siglip"])
        val = load_split(dataset, "val")
        from mmclinic.data.preprocess import decode_image

        images = tf.stack([decode_image(tf.constant(p), 32) for p in val.png[:6]])
        ids, mask = tokenizer(val.texts[:6])
        emb = model({"image": images, "token_ids": ids, "padding_mask": mask})
        got = np.asarray(model.contrastive_logits(emb["image_emb"], emb["text_emb"]))
        want = np.asarray(preset.logits(preset.image_encoder(images),
                                        run_text_encoder(preset.text_encoder, ids, mask)["pooled_output"]))
        np.testing.assert_allclose(got, want, atol=1e-4)

    # Fine-tune a few steps: the weights move away from the checkpoint's.
    tuned = tmp_path / "tuned"
    result = train(load_config(TINY, [*model_keys, *FAST, "train.steps=3", "train.warmup_steps=0"]), dataset,
                   tuned, quiet=True)
    assert result.step == 3 and np.isfinite(result.final_loss)

    # Export: the SavedModel, reloaded in another process, scores as the Keras model does.
    exported = export(tuned, tmp_path / "models", "ckpt")
    assert exported.checks["reload_parity"]["passed"], exported.checks["reload_parity"]
    val = load_split(dataset, "val")
    k = min(6, len(val.png))
    scorer = RunScorer(tuned)
    want = 1 / (1 + np.exp(-scorer.match_logits(scorer.embed_images(val.png[:k]), scorer.embed_texts(val.texts[:k]))))
    got = _reload_in_a_fresh_process(exported.path, val.png[:k], val.texts[:k])
    np.testing.assert_allclose(got, want, atol=1e-5)
