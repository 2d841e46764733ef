"""Training mechanics: resume bit for bit, freezing, layer-wise learning rates, mixed precision,
model registry and lineage in MLflow, the experiment files."""

from __future__ import annotations

import numpy as np
import pytest

from mmclinic.config import MISMATCH_KINDS, load_config
from mmclinic.data.negatives import TABLE_KINDS

from conftest import REPO

TINY = REPO / "experiments" / "tiny.yaml"
DETERMINISTIC = ["train.steps=20", "train.checkpoint_every=10", "train.eval_every=20", "train.log_every=5",
                 "train.deterministic=true", "data.deterministic=true", "model.dropout=0.1"]


def _checkpoint(run, step):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(run / "checkpoints" / f"ckpt-{step}"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


@pytest.fixture(scope="module")
def straight_run(dataset, tmp_path_factory):
    from mmclinic.training.loop import train

    run = tmp_path_factory.mktemp("straight") / "run"
    return train(load_config(TINY, DETERMINISTIC), dataset, run, quiet=True)


@pytest.mark.slow
def test_interrupted_then_resumed_run_equals_uninterrupted_bit_for_bit(straight_run, dataset, tmp_path):
    """Stopped after its step-10 checkpoint and resumed, a deterministic run ends with the very
    weights, optimizer state and dropout states of a run that never stopped (data order included)."""
    import mlflow

    from mmclinic.training.loop import train

    cfg = load_config(TINY, DETERMINISTIC)
    run = tmp_path / "resumed"
    first = train(cfg, dataset, run, quiet=True, stop_after=10)
    assert first.step == 10 and first.model_version is None
    assert mlflow.MlflowClient().get_run(first.mlflow_run_id).info.status == "KILLED"
    second = train(cfg, dataset, run, quiet=True)
    assert second.step == 20 and second.mlflow_run_id == first.mlflow_run_id
    assert second.weights_sha256 == straight_run.weights_sha256
    a, b = _checkpoint(straight_run.workdir, 20), _checkpoint(run, 20)
    assert set(a) == set(b) and any(k.startswith("rng") for k in a)
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])][:5]


@pytest.mark.slow
def test_run_registers_its_model_and_logs_lineage(straight_run, dataset):
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(straight_run.mlflow_run_id)
    assert run.info.status == "FINISHED"
    for key in ("train.loss", "train.temperature", "train.learning_rate", "val.image_to_text.R_at_5",
                "val.text_to_image.R_at_1", "val.mismatch.auroc", "train.examples_per_second"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "train.loss")) == 4  # every log_every steps
    # Every mismatch kind (all on by default) is learned and logged: its loss and its share of rows.
    for kind in MISMATCH_KINDS:
        assert f"train.match_{kind}" in run.data.metrics and f"train.share_{kind}" in run.data.metrics, kind
        assert 0 < run.data.metrics[f"train.share_{kind}"] <= 1, kind
    for kind in TABLE_KINDS:
        assert int(run.data.params[f"train.negatives.{kind}"]) > 0, kind
    assert run.data.params["data.manifest_sha256"] and run.data.tags["mmclinic.git_commit"]
    assert run.data.tags["mmclinic.weights_sha256"] == straight_run.weights_sha256
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == run.data.params["data.manifest_sha256"][:36]
    assert str(dataset.resolve()) in inp.dataset.source
    artifacts = {f.path for d in ("", "dataset", "environment") for f in client.list_artifacts(run.info.run_id, d)}
    assert {"config.yaml", "dataset/data_card.md", "environment/requirements.lock",
            "environment/requirements-minilm.lock"} <= artifacts
    # A new version in the model registry, without an alias (aliases come with vetting and export).
    version = client.get_model_version("mmclinic", straight_run.model_version)
    assert version.run_id == run.info.run_id and not version.aliases
    assert version.tags["mmclinic.config_hash"] == run.data.tags["mmclinic.config_hash"]
    model = mlflow.tensorflow.load_model(f"models:/mmclinic/{straight_run.model_version}")
    assert model.count_params() > 0


def _initial_and_trained(cfg, dataset, run):
    import keras

    from mmclinic.eval.scorers import load_run_model
    from mmclinic.models.dual_encoder import from_model_config
    from mmclinic.training.loop import train

    train(cfg, dataset, run, quiet=True)
    trained, tok, _ = load_run_model(run)
    keras.utils.set_random_seed(cfg.train.seed)  # the initialisation train() started from
    initial = from_model_config(cfg.model, cfg.data.image_size, cfg.data.max_length, len(tok.vocab))
    initial.build_all()
    return initial, trained


@pytest.mark.slow
def test_frozen_variables_stay_and_the_others_learn(dataset, tmp_path):
    cfg = load_config(TINY, ["train.steps=3", "train.eval_every=100", "train.checkpoint_every=3",
                             "train.warmup_steps=0", "model.text_layers=2", "train.freeze_text_layers=1",
                             "train.freeze_image=true"])
    initial, trained = _initial_and_trained(cfg, dataset, tmp_path / "frozen")

    def values(model, part):
        return {v.path.split("/", 1)[-1]: np.asarray(v.numpy()) for v in part(model)}

    frozen_parts = [lambda m: m.image_backbone.weights,  # batch-norm statistics included
                    lambda m: [v for group in m.text_depth_layers()[:2] for layer in group for v in layer.weights]]
    for part in frozen_parts:
        a, b = values(initial, part), values(trained, part)
        assert a and all(np.array_equal(a[k], b[k]) for k in a)
    learning = [lambda m: m.text_depth_layers()[2][0].trainable_weights, lambda m: m.image_proj.weights,
                lambda m: m.text_proj.weights]
    for part in learning:
        a, b = values(initial, part), values(trained, part)
        assert a and all(not np.array_equal(a[k], b[k]) for k in a)


def test_freezing_more_layers_than_the_tower_has_is_an_error():
    from mmclinic.errors import UsageError
    from mmclinic.models import DualEncoder

    m = DualEncoder(image_size=32, vocab_size=50, max_length=12, image_widths=(4,), text_layers=1,
                    text_hidden=16, text_heads=2, text_intermediate=32, embed_dim=8)
    with pytest.raises(UsageError, match="freeze_text_layers"):
        m.freeze(text_layers=2)


def test_layerwise_learning_rates_scale_the_adamw_step_and_its_weight_decay():
    """The factor acts on the learning rate: Adam's step is invariant to a gradient scale, so a
    factor on gradients would do nothing; the decoupled weight decay follows the factor too."""
    import keras

    from mmclinic.models import DualEncoder
    from mmclinic.training.optim import LayerwiseAdamW

    a, b, c = (keras.Variable(np.ones(3, "float32"), name=n) for n in ("a", "b", "c"))
    opt = LayerwiseAdamW(learning_rate=0.01, weight_decay=0.1, lr_multipliers={b.path: 0.1, c.path: 0.0})
    opt.build([a, b, c])
    g = np.full(3, 5.0, "float32")
    opt.apply([g, g * 1000, g], [a, b, c])
    step_a, step_b = 1 - np.asarray(a), 1 - np.asarray(b)
    # AdamW's first step: lr * (1 + weight_decay) for a unit weight (bias-corrected m / sqrt(v) = 1).
    assert step_a == pytest.approx(np.full(3, 0.01 * 1.1), rel=1e-4)
    assert step_b == pytest.approx(0.1 * step_a, rel=1e-4)
    assert np.array_equal(np.asarray(c), np.ones(3))

    m = DualEncoder(image_size=32, vocab_size=50, max_length=12, image_widths=(4,), text_layers=2,
                    text_hidden=16, text_heads=2, text_intermediate=32, embed_dim=8)
    m.build_all()
    mult = m.text_lr_multipliers(multiplier=0.5, layer_decay=0.8)
    depth = m.text_depth_layers()
    factor = [mult[layer.trainable_weights[0].path] for layer in (depth[0][0], depth[1][0], depth[2][0])]
    assert factor == pytest.approx([0.5 * 0.8 ** 3, 0.5 * 0.8 ** 2, 0.5 * 0.8])
    assert not any(v.path in mult for v in m.text_proj.weights + m.image_proj.weights)


@pytest.mark.slow
def test_mixed_bfloat16_trains_with_float32_losses(dataset, tmp_path):
    import keras

    from mmclinic.training.loop import train

    cfg = load_config(TINY, ["train.steps=3", "train.eval_every=100", "train.checkpoint_every=3",
                             "train.log_every=1", "train.precision=mixed_bfloat16"])
    before = keras.config.dtype_policy().name
    result = train(cfg, dataset, tmp_path / "bf16", quiet=True)
    assert result.step == 3 and np.isfinite(result.final_loss)
    assert keras.config.dtype_policy().name == before  # the global policy is restored


def test_mixed_float16_model_gives_float32_embeddings_and_loss():
    """mixed_float16 (with a LossScaleOptimizer in training) is accepted; embeddings and losses
    are float32. Training steps in float16 are not run here: float16 kernels are slow on CPU."""
    import keras

    from mmclinic.training import losses
    from mmclinic.models import DualEncoder

    cfg = load_config(TINY, ["train.precision=mixed_float16"])
    assert cfg.train.precision == "mixed_float16"
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        m = DualEncoder(image_size=32, vocab_size=50, max_length=12, image_widths=(4,), text_layers=1,
                        text_hidden=16, text_heads=2, text_intermediate=32, embed_dim=8)
        m.build_all()
        out = m({"image": np.zeros((2, 32, 32, 1), "float32"), "token_ids": np.ones((2, 12), "int32"),
                 "padding_mask": np.ones((2, 12), bool)})
        assert m.image_proj.compute_dtype == "float16"
        assert out["image_emb"].dtype == "float32" and out["text_emb"].dtype == "float32"
        loss = losses.clip_loss(out["image_emb"], out["text_emb"], m.logit_scale)
        assert loss.dtype == "float32" and np.isfinite(float(loss))
    finally:
        keras.config.set_dtype_policy(before)


def test_experiment_files_parse():
    medpix = load_config(REPO / "experiments" / "medpix2-minilm.yaml")
    assert medpix.model.text_tower == "minilm" and medpix.train.freeze_text_layers > 0
    gpu = load_config(REPO / "experiments" / "gpu-resnet50-bert.yaml")
    assert gpu.train.strategy == "mirrored" and gpu.train.precision.startswith("mixed_")
    assert gpu.model.text_tower == "bert_preset" and gpu.model.text_preset


def test_config_rejects_bad_training_keys():
    from mmclinic.errors import ConfigError

    for bad, key in (("train.layer_decay=1.5", "layer_decay"), ("train.freeze_text_layers=-1", "freeze_text_layers"),
                     ("train.strategy=tpu", "strategy"), ("model.text_preset=/x", "text_preset"),
                     ("model.text_tower=bert_preset", "text_preset")):
        with pytest.raises(ConfigError, match=key):
            load_config(TINY, [bad])


def test_multi_worker_without_tf_config_is_a_usage_error(dataset, tmp_path, monkeypatch):
    from mmclinic.errors import UsageError
    from mmclinic.training.loop import train

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UsageError, match="TF_CONFIG"):
        train(load_config(TINY, ["train.strategy=multi_worker"]), dataset, tmp_path / "mw", quiet=True)
