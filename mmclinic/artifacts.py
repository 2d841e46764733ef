"""The folders on disk, each opened through one class, never by hand.

- :class:`DatasetDir`: what ``mmclinic ingest`` writes (manifest, reports, shards, data card).
- :class:`RunDir`: what ``mmclinic train`` writes (config, ``run.json``, checkpoints,
  vocabulary, MLflow run id) and ``mmclinic evaluate`` and ``mmclinic export`` add to it.
- :class:`ExportedModel`: one SavedModel version that ``mmclinic export`` writes in TensorFlow
  Serving's layout ``MODEL_BASE/NAME/VERSION/``, with its ``assets.extra/mmclinic.json``;
  :class:`ModelFolder` is ``MODEL_BASE/NAME``, its versions and version labels.

One error policy for all of them: a missing, unreadable or malformed file the command needs is
a :class:`~mmclinic.errors.UsageError` (exit code 2) whose message names the file.

This module sits at the bottom layer beside config and tracking: it imports only
:mod:`mmclinic.errors`, :mod:`mmclinic.config` and the standard library, numpy, pandas and
yaml (no TensorFlow: loading a model from a folder belongs to :mod:`mmclinic.eval.scorers`).
"""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmclinic.config import ExperimentConfig, config_from_dict, load_config
from mmclinic.errors import ConfigError, UsageError

def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; UsageError naming the file when it is missing or not one."""
    if not path.is_file():
        raise UsageError(f"{path}: missing ({what})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: expected a JSON object ({what})")
    return obj


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, replacing the file in one step (a reader never sees half)."""
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it over ``path``: a process killed while writing leaves
    the previous file (or none), never half of the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- dataset


@dataclass
class SplitData:
    """All images of one split with their report text, in ``image_id`` order."""

    png: list[bytes]
    texts: list[str]
    meta: Any  # pandas DataFrame, one row per image (manifest columns plus the report ``text``)


class DatasetDir:
    """A dataset folder written by ``mmclinic ingest``.

    ``arg`` names the folder in error messages: the option it came from (``--data``) or what it
    is (``the run's dataset``).
    """

    MANIFEST = "manifest.parquet"
    REPORTS = "reports.parquet"
    QUARANTINE = "quarantine.csv"
    DATA_CARD = "data_card.md"
    INFO = "dataset.json"
    SHARDS = "shards"

    def __init__(self, path: str | Path, arg: str = "--data") -> None:
        self.path = Path(path)
        self.arg = arg

    @classmethod
    def open(cls, path: str | Path, arg: str = "--data") -> DatasetDir:
        """The dataset at ``path``; UsageError when the folder or its manifest is missing."""
        ds = cls(path, arg)
        if not ds.path.is_dir():
            raise UsageError(f"{arg} not found: {ds.path}")
        if not ds.manifest_path.is_file():
            raise UsageError(f"{arg} {ds.path}: not a dataset folder (no {cls.MANIFEST}); run `mmclinic ingest` "
                             "first")
        return ds

    def __repr__(self) -> str:
        return f"DatasetDir({str(self.path)!r})"

    # ----- paths

    @property
    def manifest_path(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def reports_path(self) -> Path:
        return self.path / self.REPORTS

    @property
    def quarantine_path(self) -> Path:
        return self.path / self.QUARANTINE

    @property
    def data_card_path(self) -> Path:
        return self.path / self.DATA_CARD

    @property
    def info_path(self) -> Path:
        return self.path / self.INFO

    @property
    def shards_dir(self) -> Path:
        return self.path / self.SHARDS

    def shard_files(self, split: str) -> list[str]:
        """The TFRecord shards of ``split`` (``shards/{split}-NNNNN-of-MMMMM.tfrecord``), sorted."""
        return sorted(str(p) for p in self.shards_dir.glob(f"{split}-*.tfrecord"))

    # ----- tables

    def _table(self, path: Path, columns: list[str] | None) -> Any:
        import pandas as pd

        if not path.is_file():
            raise UsageError(f"{self.arg} {self.path}: incomplete dataset folder (no {path.name})")
        return pd.read_parquet(path, columns=columns)

    def manifest(self, columns: list[str] | None = None) -> Any:
        """``manifest.parquet``: one row per accepted image."""
        return self._table(self.manifest_path, columns)

    def reports(self, columns: list[str] | None = None) -> Any:
        """``reports.parquet``: one row per report (``report_id``, ``findings``, ``impression``, ``text``)."""
        return self._table(self.reports_path, columns)

    def info(self) -> dict[str, Any]:
        """``dataset.json`` (``version``, ``format``, ``name``); empty when the folder has none."""
        if not self.info_path.is_file():
            return {}
        return _read_json_object(self.info_path, "the dataset's version record, written by mmclinic ingest")

    @property
    def version(self) -> str:
        """The dataset version ingest recorded, or ``"unknown"``."""
        return self.info().get("version", "unknown")

    @property
    def name(self) -> str:
        return self.info().get("name", self.path.name)

    def split_rows(self, split: str) -> Any:
        """The manifest rows of ``split`` in ``image_id`` order, with their report's ``text``."""
        manifest = self.manifest()
        reports = self.reports()
        rows = manifest[manifest["split"] == split].sort_values("image_id").reset_index(drop=True)
        return rows.merge(reports[["report_id", "text"]], on="report_id", how="left")

    def read_bytes(self, relative: str) -> bytes:
        """A stored file (an image's ``path`` column) by its path relative to the dataset."""
        return (self.path / relative).read_bytes()

    def load_split(self, split: str) -> SplitData:
        """Every image of ``split`` (PNG bytes) with its report text; empty for a split with no rows."""
        rows = self.split_rows(split)
        png = [self.read_bytes(p) for p in rows["path"]]
        return SplitData(png=png, texts=rows["text"].fillna("").tolist(), meta=rows)


# --------------------------------------------------------------------------- training run


def _unescape(text: str) -> str:
    """A string field of a protobuf text file (C escapes) as text."""
    return codecs.escape_decode(text.encode("utf-8"))[0].decode("utf-8")


class RunDir:
    """A training run folder (``mmclinic train --workdir RUN``).

    ``config.yaml`` (resolved config), ``run.json`` (dataset path and version, config hash,
    step), ``checkpoints/``, ``vocab.txt``, ``mlflow_run_id``, ``tensorboard/``, and what later
    commands add: ``eval/<split>/REPORT.json`` with ``eval/latest.json`` (evaluate) and
    ``vetting.json`` (export).
    """

    CONFIG = "config.yaml"
    INFO = "run.json"
    CHECKPOINTS = "checkpoints"
    VOCAB = "vocab.txt"
    MLFLOW_RUN_ID = "mlflow_run_id"
    TENSORBOARD = "tensorboard"
    EVAL = "eval"
    VETTING = "vetting.json"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path, arg: str = "RUN") -> RunDir:
        """The run at ``path``; UsageError naming ``arg`` when it has no ``config.yaml``."""
        run = cls(path)
        if not run.config_path.is_file():
            raise UsageError(f"{arg} {run.path}: not a training run (no {cls.CONFIG})")
        return run

    @classmethod
    def is_run(cls, path: str | Path) -> bool:
        return (Path(path) / cls.CONFIG).is_file()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ----- paths

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def info_path(self) -> Path:
        return self.path / self.INFO

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def vocab_path(self) -> Path:
        return self.path / self.VOCAB

    @property
    def mlflow_run_id_path(self) -> Path:
        return self.path / self.MLFLOW_RUN_ID

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def eval_dir(self) -> Path:
        return self.path / self.EVAL

    @property
    def vetting_path(self) -> Path:
        return self.path / self.VETTING

    # ----- config

    def config(self) -> ExperimentConfig:
        """The resolved config the run was trained with."""
        if not self.config_path.is_file():
            raise UsageError(f"{self.path}: not a training run (no {self.CONFIG})")
        return load_config(self.config_path)

    def write_config(self, config: ExperimentConfig) -> None:
        """Write the resolved config (headed by its hash); creates the folder."""
        self.path.mkdir(parents=True, exist_ok=True)
        _write_text(self.config_path, f"# resolved config, hash {config.hash()}\n" + config.to_yaml())

    # ----- run.json

    def info(self) -> dict[str, Any]:
        """``run.json``: ``data``, ``dataset_version``, ``config_hash``, ``step``."""
        return _read_json_object(self.info_path, "the run's record, written by mmclinic train")

    def write_info(self, info: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.info_path, info)

    def update_info(self, **fields: Any) -> dict[str, Any]:
        """Set ``fields`` in ``run.json``; returns the updated record."""
        info = self.info()
        info.update(fields)
        _write_json(self.info_path, info)
        return info

    @property
    def step(self) -> int:
        """The last checkpointed step recorded in ``run.json`` (0 without one)."""
        return int(self.info().get("step", 0)) if self.info_path.is_file() else 0

    @property
    def dataset_path(self) -> Path:
        """The dataset folder the run was trained on (``run.json``'s ``data``)."""
        data = self.info().get("data")
        if not isinstance(data, str) or not data:
            raise UsageError(f"{self.info_path}: no 'data' entry (the dataset folder the run was trained on)")
        return Path(data)

    # ----- checkpoints

    def pretrained_checkpoints(self) -> dict[str, Any]:
        """``run.json``'s ``checkpoints``: the checkpoint folders the run started from, by role
        (path, format, architecture, content hash); empty for towers built from scratch."""
        return (self.info() if self.info_path.is_file() else {}).get("checkpoints") or {}

    def latest_checkpoint(self) -> str | None:
        """The checkpoint prefix ``checkpoints/checkpoint`` names (as ``tf.train.latest_checkpoint``
        gives it), or None when there is none or its files are gone."""
        try:
            text = (self.checkpoint_dir / "checkpoint").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        match = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.M)
        if not match:
            return None
        prefix = _unescape(match.group(1))
        if not os.path.isabs(prefix):
            prefix = os.path.join(str(self.checkpoint_dir), prefix)
        return prefix if Path(prefix + ".index").is_file() or Path(prefix).exists() else None

    def require_checkpoint(self) -> str:
        latest = self.latest_checkpoint()
        if latest is None:
            raise UsageError(f"{self.path}: the run has no checkpoint yet (train it first)")
        return latest

    # ----- MLflow

    def mlflow_run_id(self) -> str | None:
        """The MLflow run this run logs to, or None when it has none."""
        if not self.mlflow_run_id_path.is_file():
            return None
        return self.mlflow_run_id_path.read_text().strip() or None

    def set_mlflow_run_id(self, run_id: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_text(self.mlflow_run_id_path, run_id + "\n")

    # ----- evaluation and vetting

    def record_evaluation(self, report: Path, split: str, data: Path) -> Path:
        """Keep a copy of ``report`` as ``eval/<split>/REPORT.json`` and point ``eval/latest.json``
        at it (``mmclinic compare`` reads them). Returns the copy."""
        dest = self.eval_dir / split
        dest.mkdir(parents=True, exist_ok=True)
        copy = dest / "REPORT.json"
        if Path(report).resolve() != copy.resolve():
            _write_text(copy, Path(report).read_text(encoding="utf-8"))
        _write_json(self.eval_dir / "latest.json", {
            "split": split, "report": f"{split}/REPORT.json", "written_to": str(Path(report).resolve()),
            "data": str(Path(data).resolve()), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        return copy

    def latest_evaluation(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the latest recorded REPORT.json, None), or (None, why there is none)."""
        pointer = self.eval_dir / "latest.json"
        candidates = []
        if pointer.is_file():
            try:
                candidates.append(self.eval_dir / json.loads(pointer.read_text())["report"])
            except (ValueError, KeyError, TypeError):
                pass
        candidates += sorted(self.eval_dir.glob("*/REPORT.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in candidates:
            if path.is_file():
                return _read_json_object(path, "an evaluation report, written by mmclinic evaluate"), None
        return None, "not evaluated yet (no RUN/eval/latest.json; run `mmclinic evaluate RUN --data D --out F`)"

    def write_vetting(self, result: dict[str, Any]) -> None:
        """``vetting.json``: the export checks and validation figures."""
        _write_json(self.vetting_path, result)


# --------------------------------------------------------------------------- exported models

SAVED_MODEL = "saved_model.pb"
_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_NO_MODEL = ("no exported models here (expected saved_model.pb, NAME/VERSION/saved_model.pb or numbered VERSION "
             "folders, as mmclinic export writes)")


def model_versions(folder: str | Path) -> list[int]:
    """The complete versions of ``MODEL_BASE/NAME``: numbered folders holding ``saved_model.pb``,
    ascending (a version still being written, without it, is left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / SAVED_MODEL).is_file())


class ExportedModel:
    """One exported SavedModel version folder and its ``assets.extra/mmclinic.json``.

    Open it with :meth:`open` from any of ``MODEL_BASE`` (holding one model),
    ``MODEL_BASE/NAME`` (its highest complete version) or ``MODEL_BASE/NAME/VERSION``.
    """

    METADATA = "assets.extra/mmclinic.json"
    MODEL_CARD = "assets.extra/model_card.md"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._metadata: dict[str, Any] | None = None

    @classmethod
    def open(cls, path: str | Path, arg: str = "MODEL_DIR") -> ExportedModel:
        """The model ``path`` names; UsageError (naming ``arg``) when it names none or several."""
        path = Path(path)
        if cls.is_version_dir(path):
            return cls(path)
        folders = find_models(path, arg)
        if len(folders) > 1:
            names = ", ".join(f.name for f in folders)
            raise UsageError(f"{arg} {path}: holds {len(folders)} models ({names}); give one as {path}/NAME")
        return folders[0].latest()

    @staticmethod
    def is_version_dir(path: str | Path) -> bool:
        return (Path(path) / SAVED_MODEL).is_file()

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.path)!r})"

    @property
    def metadata_path(self) -> Path:
        return self.path / self.METADATA

    @property
    def tflite_dir(self) -> Path:
        """``assets.extra/tflite/``: the quantised towers ``mmclinic.serve.tflite`` writes."""
        return self.path / "assets.extra" / "tflite"

    @property
    def model_card_path(self) -> Path:
        return self.path / self.MODEL_CARD

    @property
    def metadata(self) -> dict[str, Any]:
        """``assets.extra/mmclinic.json``, checked for what the commands use (the vetted
        ``mismatch_threshold`` and the training ``config``)."""
        if self._metadata is None:
            meta = _read_json_object(self.metadata_path, "an exported model's metadata; export the model with "
                                                         "`mmclinic export`")
            threshold = meta.get("mismatch_threshold")
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise UsageError(f"{self.metadata_path}: 'mismatch_threshold' must be a number (the vetted "
                                 "threshold)")
            if not isinstance(meta.get("config"), dict):
                raise UsageError(f"{self.metadata_path}: 'config' must be an object (the training config)")
            self._metadata = meta
        return self._metadata

    @property
    def mismatch_threshold(self) -> float:
        """Mismatch-score threshold chosen on validation data when the model was vetted."""
        return float(self.metadata["mismatch_threshold"])

    def config(self) -> ExperimentConfig:
        """The config the model was trained with."""
        try:
            return config_from_dict(self.metadata["config"])
        except ConfigError as exc:
            raise UsageError(f"{self.metadata_path}: 'config': {exc}") from None

    @property
    def name(self) -> str:
        """The name export gave it (else the folder above the version)."""
        return str(self.metadata.get("name", self.path.parent.name))

    @property
    def version(self) -> int:
        """Its version number (from the metadata, else the folder name, else 0)."""
        return int(self.metadata.get("version", self.path.name if self.path.name.isdigit() else 0))

    @classmethod
    def write_metadata(cls, version_dir: Path, metadata: dict[str, Any]) -> None:
        """Write ``assets.extra/mmclinic.json`` into a (staged) version folder."""
        path = Path(version_dir) / cls.METADATA
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metadata, indent=2) + "\n")

    @classmethod
    def write_model_card(cls, version_dir: Path, text: str) -> None:
        """Write ``assets.extra/model_card.md`` into a (staged) version folder."""
        path = Path(version_dir) / cls.MODEL_CARD
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


class ModelFolder:
    """``MODEL_BASE/NAME``: the numbered versions of one model and its ``version_labels.json``.

    ``pinned``: the one version a ``MODEL_BASE/NAME/VERSION`` path named (the others are ignored).
    """

    LABELS = "version_labels.json"

    def __init__(self, path: str | Path, pinned: int | None = None) -> None:
        self.path = Path(path)
        self.pinned = pinned

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r}" + (f", pinned={self.pinned})" if self.pinned is not None else ")")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def labels_path(self) -> Path:
        return self.path / self.LABELS

    @property
    def versions(self) -> list[int]:
        """Complete versions, ascending (just the pinned one when pinned)."""
        return [self.pinned] if self.pinned is not None else model_versions(self.path)

    def version(self, number: int) -> ExportedModel:
        return ExportedModel(self.path / str(number))

    def latest(self) -> ExportedModel:
        """The highest complete version."""
        versions = self.versions
        if not versions:
            raise UsageError(f"{self.path}: {_NO_MODEL}")
        return self.version(versions[-1])

    def next_version(self) -> int:
        """The number the next export takes: one above every numbered folder, complete or not."""
        taken = [int(p.name) for p in self.path.iterdir() if p.is_dir() and p.name.isdigit()] \
            if self.path.is_dir() else []
        return max(taken, default=0) + 1

    def labels(self) -> dict[str, int]:
        """``version_labels.json`` (``{"stable": 1}``), each label naming a complete version; empty
        without the file. Pinned: only the labels that name the pinned version."""
        path = self.path / self.LABELS
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{path}: not a JSON object ({type(exc).__name__})") from None
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: expected an object such as {{\"stable\": 1}}")
        versions = model_versions(self.path)
        labels: dict[str, int] = {}
        for label, version in raw.items():
            if not _LABEL.match(str(label)) or not isinstance(version, int) or version not in versions:
                raise UsageError(f"{path}: label {label!r} must name an exported version of {self.name} (one of "
                                 f"{versions})")
            labels[str(label)] = version
        if self.pinned is not None:
            labels = {k: v for k, v in labels.items() if v == self.pinned}
        return labels

    def install(self, staged: Path, version: int) -> ExportedModel:
        """Move a complete staged SavedModel folder in as ``version``. It arrives under a hidden
        name first and is renamed in one step, so a half-copied version is never visible."""
        self.path.mkdir(parents=True, exist_ok=True)
        dest = self.path / str(version)
        incoming = self.path / f".incoming-{version}"
        shutil.rmtree(incoming, ignore_errors=True)
        shutil.move(str(staged), str(incoming))
        os.rename(incoming, dest)
        return ExportedModel(dest)


def find_models(path: str | Path, arg: str = "MODEL_BASE") -> list[ModelFolder]:
    """The models ``path`` names: every ``NAME`` folder of a ``MODEL_BASE``, one ``MODEL_BASE/NAME``,
    or one version ``MODEL_BASE/NAME/VERSION`` (pinned). UsageError naming ``arg`` when none."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{arg} {path}: not found")
    if not path.is_dir():
        raise UsageError(f"{arg} {path}: not a folder")
    if ExportedModel.is_version_dir(path):
        if not path.name.isdigit():
            raise UsageError(f"{arg} {path}: a SavedModel outside TensorFlow Serving's layout (its folder must be "
                             "the version number, as in MODEL_BASE/NAME/VERSION)")
        return [ModelFolder(path.parent, pinned=int(path.name))]
    if model_versions(path):
        return [ModelFolder(path)]
    folders = [ModelFolder(p) for p in sorted(path.iterdir()) if p.is_dir() and model_versions(p)]
    if not folders:
        raise UsageError(f"{arg} {path}: {_NO_MODEL}")
    return folders
