"""tf.data input pipeline over the dataset's TFRecord shards."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import tensorflow as tf

from mmclinic.config import DataConfig
from mmclinic.data import preprocess
from mmclinic.data.negatives import NegativeTables
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
                 training: bool, seed: int = 0, repeat: bool | None = None, skip_batches: int = 0,
                 negatives: NegativeTables | None = None, keys: Sequence[str] | None = None) -> tf.data.Dataset:
    """Batches of ``{"image", "token_ids", "padding_mask", "swapped_ids", "swapped_mask", ...}``.

    ``swapped_*`` is the same report with left and right exchanged: a negative for the
    match head wherever the report names a side (``has_side``).

    ``negatives`` (see :mod:`mmclinic.data.negatives`): per kind ``k`` of its tables, the
    tokenized negative text ``neg_<k>_ids``/``neg_<k>_mask`` and ``neg_<k>_ok`` (False where
    the report has none), looked up by ``report_id``; and ``norm_key``, a 63-bit hash of the
    report's normalised text (equal for reports that are the same after normalisation).

    ``keys``: only these features in the batches (fewer to cache, shuffle, batch and hand over
    each step); None: all of them.

    Texts are fixed per example: they are tokenized once, before the cache; each step only
    shuffles, batches and augments (a batch at a time).

    Training order is a function of ``seed`` and the position in the stream (seeded shuffle,
    batch ``j`` augmented with the stateless seed (``seed``, ``j``)). ``skip_batches`` starts
    the stream after that many batches, so a resumed run sees the batches an uninterrupted one
    would (bit for bit with ``data.deterministic``). Skipped examples still pass the shuffle
    (and, without ``data.cache``, the decoder): cheap next to training steps.
    """
    ds = read_split(dataset, split)
    size = cfg.image_size
    tables = {}
    if negatives is not None:
        table_keys = tf.constant(list(negatives.report_ids), tf.string)
        for kind, texts in (*negatives.texts.items(), ("norm", negatives.normalized)):
            init = tf.lookup.KeyValueTensorInitializer(table_keys, tf.constant(list(texts), tf.string))
            tables[kind] = tf.lookup.StaticHashTable(init, default_value="")

    def texts(ex):
        # A batch of records at a time: the tokenizer is vectorised.
        ex = dict(ex)
        ex["token_ids"], ex["padding_mask"] = tokenizer(ex["text"])
        swapped = preprocess.swap_laterality(ex["text"])
        ex["swapped_ids"], ex["swapped_mask"] = tokenizer(swapped)
        ex["has_side"] = tf.not_equal(swapped, ex["text"])
        for kind, table in tables.items():
            text = table.lookup(ex["report_id"])
            if kind == "norm":
                ex["norm_key"] = tf.strings.to_hash_bucket_fast(text, 2 ** 63 - 1)
                continue
            ex[f"neg_{kind}_ids"], ex[f"neg_{kind}_mask"] = tokenizer(text)
            ex[f"neg_{kind}_ok"] = tf.strings.length(text) > 0
        return ex

    def decode(ex):
        ex = dict(ex)
        ex["image"] = preprocess.decode_image(ex.pop("image_png"), size)
        if keys is None:
            return ex
        missing = sorted(set(keys) - set(ex))
        if missing:
            raise UsageError(f"make_dataset: no feature {missing[0]!r} (features: {', '.join(sorted(ex))})")
        return {k: ex[k] for k in keys}

    ds = ds.batch(256).map(texts, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cfg.cache:
        ds = ds.cache()
    repeat = training if repeat is None else repeat
    if training:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=training)
    if training:
        # Batch j of the stream is augmented with the stateless seed (seed, j), all its images at
        # once; a resumed run skips the batches its earlier steps consumed (the order is a function
        # of the step).
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter()))
        if skip_batches:
            ds = ds.skip(skip_batches)
        if cfg.augment:

            def aug(ex, j):
                ex = dict(ex)
                ex["image"] = preprocess.augment_images(ex["image"], tf.stack([tf.cast(seed, tf.int64), j]),
                                                        cfg.hflip)
                return ex

            ds = ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic or None)
        else:
            ds = ds.map(lambda ex, j: ex)
    options = tf.data.Options()
    options.deterministic = bool(cfg.deterministic or not training)
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
