"""tf.data input pipeline over the dataset's TFRecord shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from mmclinic.artifacts import DatasetDir
from mmclinic.config import DataConfig
from mmclinic.data import preprocess
from mmclinic.data.extra_features import (FINDINGS_IDS, FINDINGS_MASK, HAS_SECTIONS, IMAGE_VIEW2, IMPRESSION_IDS,
                                          IMPRESSION_MASK, LOCKED_IMAGE, VIEW2_SEED_OFFSET, ExtraInputs, mask_name,
                                          locked_text_name, token_row_keys)
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
                 negatives: NegativeTables | None = None, schema: BatchSchema | None = None,
                 extras: ExtraInputs | None = None) -> tf.data.Dataset:
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

    ``extras`` (see :mod:`mmclinic.data.extra_features`): the optional features it asks for (a
    second augmented view, the findings and impression sections tokenized, auxiliary labels by
    image, a locked tower's cached features by image id or token row); None: none of them.

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
    extra = _ExtraLookups(extras) if extras is not None else None

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
        return ex if extra is None else extra.texts(ex, tokenizer)

    def decode(ex):
        ex = dict(ex)
        ex[IMAGE.name] = preprocess.decode_image(ex.pop("image_png"), size)
        if extra is not None:
            ex = extra.example(ex)
        return ex if schema is None else schema.select(ex)

    ds = ds.batch(256).map(texts, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if schema is not None:
        spec = dict(ds.element_spec)
        if extras is not None and extras.second_view:  # made per batch, below
            spec[IMAGE_VIEW2.name] = spec[IMAGE.name]
        schema.check(spec, "make_dataset")
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
                if extras is not None and extras.second_view:
                    # The second view: the same stored image, its own draw (the first view's are unchanged).
                    ex[IMAGE_VIEW2.name] = preprocess.augment_images(
                        ex[IMAGE.name], tf.stack([tf.cast(seed, tf.int64), j + VIEW2_SEED_OFFSET]), cfg.hflip)
                ex[IMAGE.name] = preprocess.augment_images(ex[IMAGE.name], tf.stack([tf.cast(seed, tf.int64), j]),
                                                           cfg.hflip)
                return ex

            ds = ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic or None)
        elif extras is not None and extras.second_view:
            ds = ds.map(lambda ex, j: {**ex, IMAGE_VIEW2.name: ex[IMAGE.name]})
        else:
            ds = ds.map(lambda ex, j: ex)
    options = tf.data.Options()
    options.deterministic = bool(cfg.deterministic or not training)
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class _ExtraLookups:
    """The tables behind :class:`~mmclinic.data.extra_features.ExtraInputs`' features."""

    def __init__(self, extras: ExtraInputs) -> None:
        self.extras = extras
        self.sections = None
        if extras.sections is not None:
            keys = tf.constant(list(extras.sections), tf.string)
            self.sections = [tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                keys, tf.constant([v[i] for v in extras.sections.values()], tf.string)), default_value="")
                for i in (0, 1)]
        self.labels = []
        for t in extras.labels:
            index = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(list(t.image_ids), tf.string), tf.range(len(t.image_ids), dtype=tf.int64)),
                default_value=len(t.image_ids))
            unknown = np.full((1, *t.values.shape[1:]), -1, t.values.dtype)
            self.labels.append((t.feature.name, index, tf.constant(np.concatenate([t.values, unknown]))))
        self.image = self._cache(extras.locked_image, tf.string)
        self.text = self._cache(extras.locked_text, tf.int64)

    @staticmethod
    def _cache(cache, dtype):
        if cache is None:
            return None
        table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(cache.keys, dtype), tf.range(len(cache.keys), dtype=tf.int64)), default_value=-1)
        return table, tf.constant(cache.features, tf.float32)

    def texts(self, ex, tokenizer):
        """A batch of records: the sections tokenized, the locked text features looked up."""
        if self.sections is not None:
            findings, impression = (t.lookup(ex["report_id"]) for t in self.sections)
            ex[FINDINGS_IDS.name], ex[FINDINGS_MASK.name] = tokenizer(findings)
            ex[IMPRESSION_IDS.name], ex[IMPRESSION_MASK.name] = tokenizer(impression)
            ex[HAS_SECTIONS.name] = tf.logical_and(tf.strings.length(findings) > 0, tf.strings.length(impression) > 0)
        if self.text is not None:
            table, feats = self.text
            for name in self.extras.locked_text_sources:
                rows = table.lookup(token_row_keys(ex[name], ex[mask_name(name)]))
                check = tf.debugging.assert_non_negative(
                    rows, message=f"locked text features: a token sequence of {name} is not in the cache")
                with tf.control_dependencies([check]):
                    ex[locked_text_name(name)] = tf.gather(feats, rows)
        return ex

    def example(self, ex):
        """One decoded example: its auxiliary labels and locked image features."""
        for name, index, values in self.labels:
            ex[name] = tf.gather(values, index.lookup(ex["image_id"]))
        if self.image is not None:
            table, feats = self.image
            row = table.lookup(ex["image_id"])
            check = tf.debugging.assert_non_negative(row, message="locked image features: an image is not in the cache")
            with tf.control_dependencies([check]):
                ex[LOCKED_IMAGE] = tf.gather(feats, row)
        return ex
