"""Report tokenization: a WordPiece vocabulary learned from training reports, in-graph ops."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import tensorflow as tf

from mmclinic.errors import UsageError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3


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
    """Write the vocabulary beside ``path``, then rename it over ``path``: a run killed while writing never
    leaves a truncated vocabulary for its resume to train on."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_vocabulary(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"vocabulary file not found: {path}")
    return path.read_text(encoding="utf-8").splitlines()


def vocabulary_is_cased(vocab: list[str]) -> bool:
    """True when the vocabulary holds upper-case word pieces (a cased BERT): an uncased
    vocabulary has none besides its bracketed special tokens, and its text must be lower-cased."""
    return any(t != t.lower() for t in vocab if not (t.startswith("[") and t.endswith("]")))


class ReportTokenizer:
    """Text -> (token_ids, padding_mask) of a fixed length, usable in tf.data and in graphs.

    Works for the vocabulary learned from training reports and for a pretrained BERT's
    ``vocab.txt`` alike: the special-token ids are looked up in the vocabulary, and text is
    lower-cased with accents stripped exactly when the vocabulary is uncased (as Hugging Face's
    BertTokenizer does for ``do_lower_case``; keras-hub's own ``BertTokenizer`` keeps accents,
    which turns e.g. "Ménière" into [UNK]).
    """

    def __init__(self, vocab: list[str], sequence_length: int, lowercase: bool | None = None) -> None:
        import keras_hub

        self.vocab = vocab
        self.sequence_length = sequence_length
        index = {t: i for i, t in enumerate(vocab)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in index]
        if missing:
            raise UsageError(f"vocabulary lacks the special tokens {', '.join(missing)}")
        self.pad_id, self.cls_id, self.sep_id = index["[PAD]"], index["[CLS]"], index["[SEP]"]
        self.lowercase = (not vocabulary_is_cased(vocab)) if lowercase is None else lowercase
        self.wordpiece = keras_hub.tokenizers.WordPieceTokenizer(
            vocabulary=vocab, lowercase=self.lowercase, strip_accents=self.lowercase, dtype="int32")
        self.packer = keras_hub.layers.StartEndPacker(
            sequence_length=sequence_length, start_value=self.cls_id, end_value=self.sep_id,
            pad_value=self.pad_id, return_padding_mask=True)

    @classmethod
    def from_preset(cls, folder: str | Path, sequence_length: int) -> "ReportTokenizer":
        """The tokenizer of a local Hugging Face BERT checkpoint folder (its ``vocab.txt``)."""
        return cls(load_vocabulary(Path(folder) / "vocab.txt"), sequence_length)

    def __call__(self, text: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        ids, mask = self.packer(self.wordpiece(text))
        return tf.cast(ids, tf.int32), mask
