"""``mmclinic train``: the dual-tower model with contrastive and match objectives.

The same command with the same workdir resumes from the latest checkpoint; a
changed config refuses to resume and names the keys that differ.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.config import ExperimentConfig, diff_configs, load_config
from mmclinic.errors import MmclinicError, UsageError

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class TrainResult:
    workdir: Path
    step: int
    final_loss: float
    mlflow_run_id: str
    val_metrics: dict[str, float]


def _check_dataset(data: Path) -> dict[str, Any]:
    if not (data / "manifest.parquet").is_file():
        raise UsageError(f"--data {data}: not a dataset folder (no manifest.parquet); run `mmclinic ingest` first")
    info = json.loads((data / "dataset.json").read_text()) if (data / "dataset.json").is_file() else {}
    return info


def _prepare_workdir(config: ExperimentConfig, workdir: Path, data: Path, version: str) -> bool:
    """Write or check ``config.yaml`` and ``run.json``; True when resuming."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "config.yaml"
    if cfg_path.is_file():
        previous = load_config(cfg_path)
        changed = diff_configs(previous, config)
        if changed:
            raise UsageError(f"--workdir {workdir} holds a run with a different config; refusing to resume "
                             f"(keys that differ: {', '.join(changed)}). Use a new --workdir.")
        run_info = json.loads((workdir / "run.json").read_text())
        if run_info.get("dataset_version") not in (None, version):
            raise UsageError(f"--workdir {workdir} was trained on dataset version {run_info['dataset_version']}, "
                             f"--data {data} is version {version}; refusing to resume")
        return True
    cfg_path.write_text(f"# resolved config, hash {config.hash()}\n" + config.to_yaml())
    (workdir / "run.json").write_text(json.dumps({
        "data": str(data.resolve()), "dataset_version": version, "config_hash": config.hash(), "step": 0,
    }, indent=2) + "\n")
    return False


def _update_run_json(workdir: Path, **fields: Any) -> None:
    path = workdir / "run.json"
    info = json.loads(path.read_text())
    info.update(fields)
    path.write_text(json.dumps(info, indent=2) + "\n")


def _lr_schedule(cfg):
    import keras

    decay = max(cfg.steps - cfg.warmup_steps, 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if cfg.warmup_steps else cfg.learning_rate, decay_steps=decay, alpha=0.05,
        warmup_target=cfg.learning_rate if cfg.warmup_steps else None, warmup_steps=cfg.warmup_steps)


def _strategy(name: str):
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def train(config: ExperimentConfig, data: str | Path, workdir: str | Path, *, quiet: bool = False) -> TrainResult:
    """Train (or resume) a run in ``workdir`` on dataset folder ``data``."""
    data, workdir = Path(data), Path(workdir)
    if not data.is_dir():
        raise UsageError(f"--data not found: {data}")
    info = _check_dataset(data)
    version = info.get("version", "unknown")
    resuming = _prepare_workdir(config, workdir, data, version)

    import keras
    import pandas as pd
    import tensorflow as tf

    from mmclinic import losses
    from mmclinic.data.cards import file_sha256
    from mmclinic.data.pipeline import make_dataset
    from mmclinic.evaluate import RunScorer, compute_report, headline, load_split
    from mmclinic.models.dual_encoder import from_model_config
    from mmclinic.tokenizer import ReportTokenizer, learn_vocabulary, load_vocabulary, save_vocabulary
    from mmclinic.tracking import MlflowRun, Scalars, flatten, git_commit, write_projector

    tc = config.train
    keras.utils.set_random_seed(tc.seed)
    if tc.deterministic:
        tf.config.experimental.enable_op_determinism()

    manifest = pd.read_parquet(data / "manifest.parquet")
    reports = pd.read_parquet(data / "reports.parquet")
    train_reports = reports[reports["report_id"].isin(manifest.loc[manifest["split"] == "train", "report_id"])]
    if len(train_reports) == 0:
        raise UsageError(f"--data {data}: the train split is empty")
    vocab_path = workdir / "vocab.txt"
    if vocab_path.is_file():
        vocab = load_vocabulary(vocab_path)
    else:
        vocab = learn_vocabulary(sorted(train_reports["text"]), config.model.vocab_size)
        save_vocabulary(vocab, vocab_path)
    tokenizer = ReportTokenizer(vocab, config.data.max_length)

    strategy = _strategy(tc.strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch = tc.batch_size * replicas
    with strategy.scope():
        model = from_model_config(config.model, config.data.image_size, config.data.max_length, len(vocab))
        model.build_all()
        optimizer = keras.optimizers.AdamW(learning_rate=_lr_schedule(tc), weight_decay=tc.weight_decay,
                                           global_clipnorm=tc.clip_norm)
        optimizer.build(model.trainable_variables)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    manager = tf.train.CheckpointManager(ckpt, str(workdir / "checkpoints"), max_to_keep=3)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    start = int(step_var.numpy())

    mlrun = MlflowRun.start_or_resume(workdir, run_name=f"{config.name}-{workdir.name}", tags={
        "mmclinic.config_hash": config.hash(), "mmclinic.dataset_version": version,
        "mmclinic.git_commit": git_commit(), "mmclinic.workdir": workdir.name,
    })
    if not resuming:
        mlrun.log_params(flatten(config.to_dict()))
        mlrun.log_params({"data.dataset_version": version,
                          "data.manifest_sha256": file_sha256(data / "manifest.parquet"),
                          "data.train_images": int((manifest["split"] == "train").sum()),
                          "model.actual_vocab_size": len(vocab)})
        mlrun.log_artifact(workdir / "config.yaml")
        if (data / "data_card.md").is_file():
            mlrun.log_artifact(data / "data_card.md", "dataset")
        lock = Path(__file__).resolve().parent.parent / "requirements.lock"
        if lock.is_file():
            mlrun.log_artifact(lock, "environment")

    scalars = Scalars(workdir / "tensorboard")
    ds = make_dataset(data, "train", config.data, tokenizer, global_batch, training=True, seed=tc.seed)
    dist_ds = iter(strategy.experimental_distribute_dataset(ds))
    keys = ("image", "token_ids", "padding_mask", "swapped_ids", "swapped_mask", "has_side", "text")

    def step_fn(batch):
        with tf.GradientTape() as tape:
            img = model.encode_image(batch["image"], training=True)
            txt = model.encode_text(batch["token_ids"], batch["padding_mask"], training=True)
            swp = model.encode_text(batch["swapped_ids"], batch["swapped_mask"], training=True)
            targets = losses.same_text_targets(batch["text"])
            if tc.loss == "clip":
                contrastive = losses.clip_loss(img, txt, model.logit_scale, targets)
            else:
                contrastive = losses.sigmoid_loss(img, txt, model.logit_scale, model.logit_bias, targets)
            rolled = tf.roll(txt, 1, 0)
            same_as_rolled = tf.equal(batch["text"], tf.roll(batch["text"], 1, 0))
            n = tf.shape(img)[0]
            logits = tf.concat([model.match_logits(img, txt), model.match_logits(img, rolled),
                                model.match_logits(img, swp)], 0)
            labels = tf.concat([tf.ones([n]), tf.cast(same_as_rolled, tf.float32), tf.zeros([n])], 0)
            weights = tf.concat([2.0 * tf.ones([n]), tf.ones([n]), tf.cast(batch["has_side"], tf.float32)], 0)
            match = losses.match_loss(logits, labels, weights)
            total = contrastive + tc.match_weight * match
            scaled = total / replicas
        # Parts the chosen loss does not use (the sigmoid bias under CLIP, BERT's pooler) get no gradient.
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, model.trainable_variables) if g is not None])
        model.logit_scale.assign(tf.minimum(model.logit_scale, MAX_LOGIT_SCALE))
        return {"loss": total, "contrastive": contrastive, "match": match}

    @tf.function
    def train_step(dist_batch):
        out = strategy.run(step_fn, args=(dist_batch,))
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in out.items()}

    try:
        val = load_split(data, "val")
    except UsageError:
        val = None
    val_scorer = RunScorer(workdir, model, tokenizer, config) if val is not None and len(val.png) >= 3 else None

    def validate(step: int) -> dict[str, float]:
        if val_scorer is None:
            return {}
        rep = compute_report(val_scorer, val, boot=0, seed=0)
        flat = {f"val.{k}": v for k, v in headline(rep).items()
                if k in ("image_to_text.R@1", "image_to_text.R@5", "text_to_image.R@5", "mismatch.auroc")}
        scalars.write(flat, step)
        mlrun.log_metrics(flat, step)
        return flat

    status = "FAILED"
    last_loss = float("nan")
    val_metrics: dict[str, float] = {}
    t0, done0 = time.time(), start
    try:
        if start >= tc.steps and not quiet:
            print(f"run already complete at step {start}/{tc.steps}", flush=True)
        for step in range(start + 1, tc.steps + 1):
            batch = next(dist_ds)
            out = train_step({k: batch[k] for k in keys})
            step_var.assign(step)
            log_now = step % tc.log_every == 0 or step == tc.steps
            save_now = step % tc.checkpoint_every == 0 or step == tc.steps
            if log_now or save_now:  # never checkpoint weights from a diverged step
                vals = {k: float(v.numpy()) for k, v in out.items()}
                if not all(np.isfinite(v) for v in vals.values()) or vals["loss"] > 1e4:
                    raise MmclinicError(
                        f"loss became {vals['loss']} at step {step}; stopped. The last good checkpoint "
                        f"({manager.latest_checkpoint or 'none'}) is kept.")
                last_loss = vals["loss"]
            if log_now:
                vals["temperature"] = float(np.exp(-model.logit_scale.numpy()))
                vals["learning_rate"] = float(np.asarray(optimizer.learning_rate))
                scalars.write({f"train/{k}": v for k, v in vals.items()}, step)
                mlrun.log_metrics({f"train.{k}": v for k, v in vals.items()}, step)
                if not quiet:
                    rate = (step - done0) / max(time.time() - t0, 1e-9)
                    eta = (tc.steps - step) / max(rate, 1e-9)
                    print(f"step {step}/{tc.steps}  loss {vals['loss']:.4f}  contrastive {vals['contrastive']:.4f}  "
                          f"match {vals['match']:.4f}  T {vals['temperature']:.4f}  "
                          f"{rate * global_batch:.1f} ex/s  ETA {eta:.0f}s", flush=True)
            if save_now:
                manager.save(checkpoint_number=step)
                _update_run_json(workdir, step=step)
            if step % tc.eval_every == 0 or step == tc.steps:
                val_metrics = validate(step)
                if val_metrics and not quiet:
                    print("  validation: " + "  ".join(f"{k} {v:.3f}" for k, v in val_metrics.items()), flush=True)
        if val_scorer is not None and start < tc.steps:
            _write_projector(workdir, val, val_scorer, write_projector)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlrun.end(status)
    if not quiet:
        print(f"trained to step {int(step_var.numpy())}: final loss {last_loss:.4f}; run {workdir}", flush=True)
    return TrainResult(workdir=workdir, step=int(step_var.numpy()), final_loss=last_loss,
                       mlflow_run_id=mlrun.run_id, val_metrics=val_metrics)


def _write_projector(workdir: Path, val, scorer, write_projector) -> None:
    """Validation embeddings (images and reports) with de-identified metadata and thumbnails."""
    import tensorflow as tf

    from mmclinic.data.preprocess import decode_image

    img = scorer.embed_images(val.png)
    txt = scorer.embed_texts(val.texts)
    thumbs = np.stack([decode_image(tf.constant(p), 32).numpy()[..., 0] for p in val.png])
    rows = [{"image_id": r.image_id, "split": "val", "modality": r.modality, "view": r.view,
             "laterality": r.laterality, "sex": r.sex, "age_band": r.age_band,
             "report": (t[:80] + "...") if len(t) > 80 else t}
            for r, t in zip(val.meta.itertuples(), val.texts)]
    write_projector(workdir / "tensorboard", img, txt, rows, thumbs)


def train_from_file(experiment: str | Path, data: str | Path, workdir: str | Path | None,
                    overrides: list[str] = (), quiet: bool = False) -> TrainResult:
    config = load_config(experiment, overrides)
    if workdir is None:
        workdir = Path("runs") / f"{config.name}-{config.hash()[:8]}"
    return train(config, data, workdir, quiet=quiet)

