"""Report tokenization: a WordPiece vocabulary learned from training reports, in-graph ops."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import tensorflow as tf

from mmclinic.data.preprocess import CLS_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS
from mmclinic.errors import UsageError


def learn_vocabulary(texts: Iterable[str], size: int) -> list[str]:
    """Learn a lower-cased WordPiece vocabulary (special tokens first) from report texts."""
    import keras_hub

    texts = [t for t in texts if t]
    if not texts:
        raise UsageError("cannot learn a vocabulary: the training split has no report text")
    vocab = keras_hub.tokenizers.compute_word_piece_vocabulary(
        tf.data.Dataset.from_tensor_slices(texts), vocabulary_size=size, lowercase=True,
        strip_accents=True, reserved_tokens=SPECIAL_TOKENS,
    )
    return list(vocab)


def save_vocabulary(vocab: list[str], path: str | Path) -> None:
    Path(path).write_text("\n".join(vocab) + "\n", encoding="utf-8")


def load_vocabulary(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"vocabulary file not found: {path}")
    return path.read_text(encoding="utf-8").splitlines()


class ReportTokenizer:
    """Text -> (token_ids, padding_mask) of a fixed length, usable in tf.data and in graphs."""

    def __init__(self, vocab: list[str], sequence_length: int) -> None:
        import keras_hub

        self.vocab = vocab
        self.sequence_length = sequence_length
        self.wordpiece = keras_hub.tokenizers.WordPieceTokenizer(
            vocabulary=vocab, lowercase=True, strip_accents=True, dtype="int32")
        self.packer = keras_hub.layers.StartEndPacker(
            sequence_length=sequence_length, start_value=CLS_ID, end_value=SEP_ID, pad_value=PAD_ID,
            return_padding_mask=True)

    def __call__(self, text: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        ids, mask = self.packer(self.wordpiece(text))
        return tf.cast(ids, tf.int32), mask
