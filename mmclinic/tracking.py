"""Experiment tracking: MLflow runs, TensorBoard scalars and the embedding projector.

Everything that leaves the process for a tracker passes :data:`GUARD` first.
"""

from __future__ import annotations

import csv
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.artifacts import RunDir
from mmclinic.phi.guard import DEFAULT_GUARD as GUARD

EXPERIMENT_NAME = "mmclinic"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or ``sqlite:///mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MlflowRun:
    """One MLflow run per training run; resumed by the id stored in the workdir
    (:meth:`mmclinic.artifacts.RunDir.mlflow_run_id`)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    @classmethod
    def start_or_resume(cls, workdir: Path, run_name: str, tags: Mapping[str, str]) -> "MlflowRun":
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        run_dir = RunDir(workdir)
        client = mlflow.MlflowClient()
        run_id = run_dir.mlflow_run_id()
        if run_id is not None:
            try:
                client.get_run(run_id)
                return cls(run_id)
            except Exception:  # noqa: BLE001 - a different tracking store: start a new run
                pass
        exp = client.get_experiment_by_name(EXPERIMENT_NAME)
        exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT_NAME)
        GUARD.check_mapping(tags, "mlflow tags")
        run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
        run_dir.set_mlflow_run_id(run.info.run_id)
        return cls(run.info.run_id)

    @property
    def client(self):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        return mlflow.MlflowClient()

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in GUARD.check_mapping(params, "mlflow params").items()
               if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k.replace("@", "_at_"), float(v), ts, int(step)) for k, v in metrics.items()
                 if v is not None and np.isfinite(v)]
        GUARD.check_mapping({m.key: m.value for m in batch}, "mlflow metrics")
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in GUARD.check_mapping(tags, "mlflow tags").items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.suffix in (".md", ".yaml", ".json", ".txt", ".lock", ".tsv", ".csv"):
            GUARD.check(path.read_text(encoding="utf-8", errors="replace"), f"artifact {path.name}")
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def record(self) -> Any:
        """The MLflow run as the store has it now (``info.status``, ``data.params``, ``data.tags``)."""
        return self.client.get_run(self.run_id)

    def registered_version(self, registered_name: str) -> str | None:
        """The version of ``registered_name`` this run registered, or None."""
        versions = self.client.search_model_versions(f"name = '{registered_name}' and run_id = '{self.run_id}'")
        return str(max(int(v.version) for v in versions)) if versions else None

    def log_dataset(self, folder: Path, name: str, digest: str, context: str = "train") -> None:
        """Dataset lineage: the dataset folder (by path, name and manifest digest) as a run input."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        GUARD.check(f"{name} {folder}", "mlflow dataset")
        ds = MetaDataset(LocalArtifactDatasetSource(str(Path(folder).resolve())), name=name, digest=digest[:36])
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds._to_mlflow_entity(),
                                                                   tags=[InputTag("mlflow.data.context", context)])])

    def log_keras_model(self, model: Any, registered_name: str, pip_requirements: Sequence[str],
                        tags: Mapping[str, str] | None = None) -> str:
        """Log a Keras model under ``model/`` of this run and register it as a new version of
        ``registered_name`` (no alias: aliases are set when a version is vetted and exported).
        Returns the version number."""
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        number = self.registered_version(registered_name)  # registered before the process was killed
        if number is None:
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.tensorflow.log_model(model, name="model", pip_requirements=list(pip_requirements))
                number = str(mlflow.register_model(info.model_uri, registered_name).version)
        for k, v in GUARD.check_mapping(dict(tags or {}), "mlflow model version tags").items():
            self.client.set_model_version_tag(registered_name, number, k, str(v))
        return number


class NullRun:
    """The tracker of a non-chief worker: it records nothing (only the chief writes)."""

    run_id = ""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class Scalars:
    """TensorBoard scalar writer (``logdir=None``: writes nothing, for non-chief workers)."""

    def __init__(self, logdir: Path | None) -> None:
        import tensorflow as tf

        self._tf = tf
        self.writer = tf.summary.create_file_writer(str(logdir)) if logdir is not None else None

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        with self.writer.as_default(step=step):
            for k, v in metrics.items():
                if v is not None:
                    self._tf.summary.scalar(k, float(v))
        self.writer.flush()


def write_projector(logdir: Path, image_emb: np.ndarray, text_emb: np.ndarray,
                    metadata: Sequence[Mapping[str, str]], thumbnails: np.ndarray | None = None) -> Path:
    """Write image and text embeddings for TensorBoard's projector, with metadata and a sprite.

    ``metadata`` rows must already be de-identified; each value still passes the guard.
    ``thumbnails``: (N, h, w) float in [0, 1], used for the image embedding's sprite.
    """
    import tensorflow as tf
    from tensorboard.plugins import projector

    logdir.mkdir(parents=True, exist_ok=True)
    cols = list(metadata[0].keys()) if metadata else ["index"]
    for which in ("image", "text"):
        with open(logdir / f"metadata_{which}.tsv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, delimiter="\t", lineterminator="\n")
            w.writerow(["kind", *cols])
            for row in metadata:
                vals = [str(row.get(c, "")).replace("\t", " ").replace("\n", " ") for c in cols]
                GUARD.check(" ".join(vals), "projector metadata")
                w.writerow([which, *vals])
    ckpt = tf.train.Checkpoint(image_embedding=tf.Variable(image_emb, name="image_embedding"),
                               text_embedding=tf.Variable(text_emb, name="text_embedding"))
    ckpt.save(str(logdir / "embedding.ckpt"))
    config = projector.ProjectorConfig()
    for which in ("image", "text"):
        emb = config.embeddings.add()
        emb.tensor_name = f"{which}_embedding/.ATTRIBUTES/VARIABLE_VALUE"
        emb.metadata_path = f"metadata_{which}.tsv"
        if which == "image" and thumbnails is not None and len(thumbnails):
            emb.sprite.image_path = "sprite.png"
            emb.sprite.single_image_dim.extend([thumbnails.shape[2], thumbnails.shape[1]])
            _write_sprite(logdir / "sprite.png", thumbnails)
    projector.visualize_embeddings(str(logdir), config)
    return logdir


def _write_sprite(path: Path, thumbs: np.ndarray) -> None:
    from PIL import Image

    from mmclinic.display import sprite

    Image.fromarray(sprite(thumbs)).save(path)
