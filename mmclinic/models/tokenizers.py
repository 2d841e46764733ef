"""The tokenizer of a run: a text checkpoint's own (WordPiece or SentencePiece, in-graph) or the
run's learned WordPiece vocabulary. Training, evaluation and the exported graph all take it from
:func:`make_tokenizer`."""

from __future__ import annotations

from mmclinic.errors import UsageError
from mmclinic.text.tokenizer import ReportTokenizer


def make_tokenizer(config, vocab: list[str] | None = None):
    """The tokenizer of a run of ``config`` (an :class:`mmclinic.config.ExperimentConfig`):
    a text (or dual) checkpoint's own (WordPiece or SentencePiece, in-graph:
    :class:`mmclinic.models.checkpoints.CheckpointTokenizer`), else a :class:`ReportTokenizer`
    on ``vocab`` (learned from the training reports or a pretrained BERT's ``vocab.txt``). Training,
    evaluation and the exported graph all take it from here. Both give ``(token_ids, padding_mask)``
    of length ``data.max_length`` and have ``vocab`` and ``sequence_length``."""
    folder = text_checkpoint(config.model)
    if folder is not None:
        from mmclinic.models.checkpoints import checkpoint_tokenizer

        return checkpoint_tokenizer(folder, config.data.max_length)
    if vocab is None:
        raise UsageError("a tokenizer of a run without a text checkpoint needs its vocabulary")
    return ReportTokenizer(vocab, config.data.max_length)


def text_checkpoint(model_cfg) -> str | None:
    """The checkpoint folder whose tokenizer the text tower uses (``model.dual_checkpoint`` or
    ``model.text_checkpoint``), or None."""
    if getattr(model_cfg, "dual_checkpoint", None):
        return model_cfg.dual_checkpoint
    if getattr(model_cfg, "text_tower", None) == "checkpoint":
        return model_cfg.text_checkpoint
    return None
