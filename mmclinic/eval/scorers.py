"""Inference engines: one interface (:class:`Scorer`) over a training run's Keras model and an
exported SavedModel, so that a model is scored the same way before and after export.

A notebook scores with them directly::

    scorer = RunScorer("runs/demo")            # or SavedModelScorer("models/mmclinic-demo")
    image_emb = scorer.embed_images(png_bytes)
    text_emb = scorer.embed_texts(report_texts)
    logits = scorer.match_logits(image_emb, text_emb)

Both take raw report text: the run's text definition (:mod:`mmclinic.text.model_text`) is applied
before the tokenizer, by the exported graph and by :class:`RunScorer` with the same TensorFlow
function, so that a report scores the same on every path. Applying it to text that already went
through it (a dataset's ``text`` column) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmclinic.artifacts import ExportedModel, RunDir
from mmclinic.config import ExperimentConfig
from mmclinic.text.model_text import TextConfig

BATCH_SIZE = 64


class Scorer(Protocol):
    def embed_images(self, png: list[bytes]) -> np.ndarray: ...
    def embed_texts(self, texts: list[str]) -> np.ndarray: ...
    def match_logits(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray: ...


def tf_strings(items: Sequence[Any]) -> Any:
    """A 1-D ``tf.string`` tensor of ``items``."""
    import tensorflow as tf

    return tf.constant(list(items), dtype=tf.string)


def batched(fn: Callable[[list], np.ndarray], items: list, size: int = BATCH_SIZE) -> np.ndarray:
    """``fn`` over consecutive batches of ``items``, outputs concatenated along axis 0."""
    outs = [fn(items[i:i + size]) for i in range(0, len(items), size)]
    return np.concatenate(outs, 0) if outs else np.zeros((0, 0), np.float32)


def load_run_model(run: str | Path | RunDir):
    """(model, tokenizer, config) of a training run, weights from its latest checkpoint."""
    import tensorflow as tf

    from mmclinic.models.dual_encoder import from_model_config
    from mmclinic.models.towers import model_checkpoints
    from mmclinic.models.tokenizers import make_tokenizer
    from mmclinic.text.tokenizer import load_vocabulary

    run = run if isinstance(run, RunDir) else RunDir.open(run, "RUN")
    config = run.config()
    latest = run.require_checkpoint()
    vocab = load_vocabulary(run.vocab_path)
    # Checkpoint towers are rebuilt from their folders' architecture without reading their weights:
    # the run's checkpoint holds every weight. The tokenizer is the checkpoint's own.
    pretrained = model_checkpoints(config.model)
    if pretrained:
        _check_recorded_checkpoints(run)
    model = from_model_config(config.model, config.data.image_size, config.data.max_length, len(vocab),
                              load_pretrained=not pretrained)
    model.build_all()
    # every weight of the model must come from the run: never a silent random init
    tf.train.Checkpoint(model=model).restore(latest).expect_partial().assert_existing_objects_matched()
    return model, make_tokenizer(config, vocab), config


def _check_recorded_checkpoints(run: RunDir) -> None:
    """Warn when a checkpoint folder a run started from (``run.json``'s ``checkpoints``) no longer
    holds the same files: its tokenizer and architecture are read from it again."""
    import warnings

    from mmclinic.models.checkpoints import checkpoint_sha256

    recorded = run.pretrained_checkpoints()
    for role, rec in recorded.items():
        if rec.get("sha256") and checkpoint_sha256(rec["path"]) != rec["sha256"]:
            warnings.warn(f"checkpoint folder {rec['path']} ({role}) has changed since run {run.path} started "
                          "from it (content hash differs): its tokenizer may no longer be the run's", stacklevel=3)


def run_text_config(run: str | Path | RunDir) -> TextConfig:
    """The text definition a run was trained with: ``run.json``'s ``text``, else its dataset's
    (``dataset.json``'s ``text``, written by ingest), else the data card's text policy; the
    defaults for a run without any of them."""
    from mmclinic.artifacts import DatasetDir

    run = run if isinstance(run, RunDir) else RunDir(run)
    info = run.info() if run.info_path.is_file() else {}
    if info.get("text"):
        return TextConfig.from_dict(info["text"])
    data = DatasetDir(run.dataset_path) if info.get("data") else None
    if data is not None and data.path.is_dir():
        if data.info().get("text"):
            return TextConfig.from_dict(data.info()["text"])
        if data.data_card_path.is_file():
            from mmclinic.data.cards import read_data_card

            policy = (read_data_card(data.data_card_path).get("report_sections") or {}).get("text_policy")
            return TextConfig.from_dict({"policy": policy})
    return TextConfig()


class RunScorer:
    """Scores with the Keras model of a training run (or a model, tokenizer and config given).

    ``text_config``: the run's text definition (default: :func:`run_text_config` of ``run``)."""

    def __init__(self, run: str | Path, model: Any = None, tokenizer: Any = None,
                 config: ExperimentConfig | None = None, text_config: TextConfig | None = None) -> None:
        self.run = Path(run)
        if model is None:
            model, tokenizer, config = load_run_model(self.run)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.text_config = text_config or run_text_config(self.run)
        import tensorflow as tf

        from mmclinic.data.preprocess import decode_image
        from mmclinic.text.model_text import model_text_graph

        size = config.data.image_size
        spec = [tf.TensorSpec([None], tf.string)]
        self._img = tf.function(lambda b: self.model.encode_image(
            tf.map_fn(lambda x: decode_image(x, size), b, fn_output_signature=tf.float32), training=False),
            input_signature=spec)
        self._txt = tf.function(lambda t: self.model.encode_text(
            *self.tokenizer(model_text_graph(t, self.text_config)), training=False), input_signature=spec)

    def embed_images(self, png: list[bytes]) -> np.ndarray:
        return batched(lambda b: self._img(tf_strings(b)).numpy(), png)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return batched(lambda b: self._txt(tf_strings(b)).numpy(), texts)

    def match_logits(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.match_logits(image_emb, text_emb))


class SavedModelScorer:
    """Scores with an exported SavedModel through its signatures (``MODEL_BASE``,
    ``MODEL_BASE/NAME`` or ``MODEL_BASE/NAME/VERSION``; see :class:`~mmclinic.artifacts.ExportedModel`)."""

    def __init__(self, model_dir: str | Path | ExportedModel) -> None:
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  (registers the tokenizer's ops)

        self.exported = model_dir if isinstance(model_dir, ExportedModel) else ExportedModel.open(model_dir)
        self.loaded = tf.saved_model.load(str(self.exported.path))
        self.sig = self.loaded.signatures
        self._tf = tf

    def embed_images(self, png: list[bytes]) -> np.ndarray:
        f = self.sig["embed_image"]
        return batched(lambda b: f(image_bytes=self._tf.constant(b))["image_emb"].numpy(), png)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        f = self.sig["embed_text"]
        return batched(lambda b: f(report_text=self._tf.constant(b))["text_emb"].numpy(), texts)

    def match_logits(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        f = self.sig["match_embeddings"]
        return f(image_emb=self._tf.constant(image_emb, self._tf.float32),
                 text_emb=self._tf.constant(text_emb, self._tf.float32))["match_logit"].numpy()
