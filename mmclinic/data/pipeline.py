"""tf.data input pipeline over the dataset's TFRecord shards."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from mmclinic.config import DataConfig
from mmclinic.data import preprocess
from mmclinic.data.shards import STRING_FEATURES, shard_files
from mmclinic.errors import UsageError

_FEATURES = {k: tf.io.FixedLenFeature([], tf.string) for k in (*STRING_FEATURES, "image_png")}


def read_split(dataset: str | Path, split: str) -> tf.data.Dataset:
    """Parsed records of one split, in a stable order."""
    files = shard_files(dataset, split)
    if not files:
        raise UsageError(f"--data {dataset}: no shards for split '{split}' (is the split empty?)")
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE if len(files) > 1 else None)
    return ds.map(lambda r: tf.io.parse_single_example(r, _FEATURES), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)


def make_dataset(dataset: str | Path, split: str, cfg: DataConfig, tokenizer, batch_size: int, *,
                 training: bool, seed: int = 0, repeat: bool | None = None, skip_batches: int = 0) -> tf.data.Dataset:
    """Batches of ``{"image", "token_ids", "padding_mask", "swapped_ids", "swapped_mask", ...}``.

    ``swapped_*`` is the same report with left and right exchanged: a negative for the
    match head wherever the report names a side.

    Training order is a function of ``seed`` and the position in the stream (seeded shuffle,
    example ``k`` augmented with the stateless seed (``seed``, ``k``)). ``skip_batches`` starts
    the stream after that many batches, so a resumed run sees the batches an uninterrupted one
    would (bit for bit with ``data.deterministic``). Skipped examples still pass the shuffle
    (and, without ``data.cache``, the decoder): cheap next to training steps.
    """
    ds = read_split(dataset, split)
    size = cfg.image_size

    def decode(ex):
        out = {k: ex[k] for k in STRING_FEATURES}
        out["image"] = preprocess.decode_image(ex["image_png"], size)
        return out

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cfg.cache:
        ds = ds.cache()
    repeat = training if repeat is None else repeat
    if training:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if training:
        # Example k of the stream is augmented with seed (seed, k); a resumed run skips the
        # examples its earlier steps consumed (the order is a function of the step).
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter()))
        if skip_batches:
            ds = ds.skip(skip_batches * batch_size)
    if training and cfg.augment:

        def aug(ex, i):
            ex = dict(ex)
            ex["image"] = preprocess.augment_image(ex["image"], tf.stack([tf.cast(seed, tf.int64), i]), cfg.hflip)
            return ex

        ds = ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic or None)
    elif training:
        ds = ds.map(lambda ex, i: ex)
    ds = ds.batch(batch_size, drop_remainder=training)

    def tokenize(ex):
        ex = dict(ex)
        ex["token_ids"], ex["padding_mask"] = tokenizer(ex["text"])
        swapped = preprocess.swap_laterality(ex["text"])
        ex["swapped_ids"], ex["swapped_mask"] = tokenizer(swapped)
        ex["has_side"] = tf.not_equal(swapped, ex["text"])
        return ex

    ds = ds.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = bool(cfg.deterministic or not training)
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
