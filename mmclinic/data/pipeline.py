"""tf.data input pipeline over the dataset's TFRecord shards."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from mmclinic.artifacts import DatasetDir
from mmclinic.config import DataConfig
from mmclinic.data import preprocess
from mmclinic.data.negatives import NegativeTables
from mmclinic.data.schema import (HAS_SIDE, IMAGE, NORM_KEY, PADDING_MASK, SWAPPED_IDS, SWAPPED_MASK, TEXT, TOKEN_IDS,
                                  BatchSchema, negative_features)
from mmclinic.data.shards import STRING_FEATURES
from mmclinic.errors import UsageError

_FEATURES = {k: tf.io.FixedLenFeature([], tf.string) for k in (*STRING_FEATURES, "image_png")}


def read_split(dataset: str | Path, split: str) -> tf.data.Dataset:
    """Parsed records of one split, in a stable order."""
    files = DatasetDir(dataset).shard_files(split)
    if not files:
        raise UsageError(f"--data {dataset}: no shards for split '{split}' (is the split empty?)")
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE if len(files) > 1 else None)
    return ds.map(lambda r: tf.io.parse_single_example(r, _FEATURES), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)


def make_dataset(dataset: str | Path, split: str, cfg: DataConfig, tokenizer, batch_size: int, *,
                 training: bool, seed: int = 0, repeat: bool | None = None, skip_batches: int = 0,
                 negatives: NegativeTables | None = None, schema: BatchSchema | None = None) -> tf.data.Dataset:
    """Batches of ``{"image", "token_ids", "padding_mask", "swapped_ids", "swapped_mask", ...}``
    (the features :mod:`mmclinic.data.schema` declares, with the record's string fields).

    ``swapped_*`` is the same report with left and right exchanged: a negative for the
    match head wherever the report names a side (``has_side``).

    ``negatives`` (see :mod:`mmclinic.data.negatives`): per kind ``k`` of its tables, the
    tokenized negative text ``neg_<k>_ids``/``neg_<k>_mask`` and ``neg_<k>_ok`` (False where
    the report has none), looked up by ``report_id``; and ``norm_key``, a 63-bit hash of the
    report's normalised text (equal for reports that are the same after normalisation).

    ``schema``: the batches hold exactly its features, in its order (fewer to cache, shuffle,
    batch and hand over each step), checked against its dtypes and shapes when the pipeline is
    built; None: every feature.

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
        for kind, (keys, texts) in negatives.by_image.items():  # the reviewers' kind: by image
            init = tf.lookup.KeyValueTensorInitializer(tf.constant(list(keys), tf.string),
                                                       tf.constant(list(texts), tf.string))
            tables[kind] = tf.lookup.StaticHashTable(init, default_value="")

    def texts(ex):
        # A batch of records at a time: the tokenizer is vectorised.
        ex = dict(ex)
        ex[TOKEN_IDS.name], ex[PADDING_MASK.name] = tokenizer(ex[TEXT.name])
        swapped = preprocess.swap_laterality(ex[TEXT.name])
        ex[SWAPPED_IDS.name], ex[SWAPPED_MASK.name] = tokenizer(swapped)
        ex[HAS_SIDE.name] = tf.not_equal(swapped, ex[TEXT.name])
        for kind, table in tables.items():
            text = table.lookup(ex["image_id"] if kind in negatives.by_image else ex["report_id"])
            if kind == "norm":
                ex[NORM_KEY.name] = tf.strings.to_hash_bucket_fast(text, 2 ** 63 - 1)
                continue
            ids, mask, ok = negative_features(kind)
            ex[ids.name], ex[mask.name] = tokenizer(text)
            ex[ok.name] = tf.strings.length(text) > 0
        return ex

    def decode(ex):
        ex = dict(ex)
        ex[IMAGE.name] = preprocess.decode_image(ex.pop("image_png"), size)
        return ex if schema is None else schema.select(ex)

    ds = ds.batch(256).map(texts, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if schema is not None:
        schema.check(ds.element_spec, "make_dataset")
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
                ex[IMAGE.name] = preprocess.augment_images(ex[IMAGE.name], tf.stack([tf.cast(seed, tf.int64), j]),
                                                           cfg.hflip)
                return ex

            ds = ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic or None)
        else:
            ds = ds.map(lambda ex, j: ex)
    options = tf.data.Options()
    options.deterministic = bool(cfg.deterministic or not training)
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
