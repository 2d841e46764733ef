"""Locked-tower features, computed once per dataset version (LiT: Zhai et al. 2022, "LiT:
Zero-Shot Transfer with Locked-image text Tuning").

With ``train.locked_tower`` and ``train.cache_locked`` the locked backbone's features of every
training input are computed once, in inference mode, and stored as
``CACHE_DIR/<role>-<key>.npz``; each training step then reads them from the batch and runs only the
trainable tower. The key (:func:`cache_key`) is a SHA-256 over

- the locked backbone's weights as loaded (:func:`backbone_fingerprint`: the checkpoint's
  content, or a run's weights with ``train.init_from``),
- its preprocessing (image: ``data.image_size`` and the decoder; text: the tokenizer's class and
  vocabulary, ``data.max_length``, the pooling),
- the dataset version,
- the inputs it covers (image ids; or the token rows of the reports, their mismatch negatives and
  sections),

so a change in any of them names another file: a stale cache is never read. A file whose stored
key or inputs differ from the expected ones is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from mmclinic.data.extra_features import ExtraInputs, FeatureCache, mask_name, token_row_keys
from mmclinic.errors import UsageError

CACHE_FORMAT = 1
"""Bumped when what a cache file holds changes."""
IMAGE_DECODER = "preprocess.decode_image: area resize, grayscale [0, 1]"
BATCH = 64


def backbone_fingerprint(backbone: Any) -> str:
    """SHA-256 over the backbone's weights (dtype, shape, bytes, in weight order)."""
    h = hashlib.sha256()
    for v in backbone.weights:
        a = np.ascontiguousarray(np.asarray(v.numpy()))
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_key(role: str, fingerprint: str, preprocessing: dict[str, Any], dataset_version: str,
              items_digest: str) -> str:
    """The cache key (64 hex digits) of a locked tower's features; see the module. The precision in
    force (``train.precision``'s Keras dtype policy) is part of it: features computed in float32 are
    not those of a bfloat16 tower."""
    import keras

    blob = json.dumps({"format": CACHE_FORMAT, "role": role, "weights": fingerprint, "preprocessing": preprocessing,
                       "dataset_version": dataset_version, "items": items_digest,
                       "precision": keras.config.dtype_policy().name}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _digest(keys: np.ndarray) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(str(k).encode() + b"\n")
    return h.hexdigest()


def load_or_compute(cache_dir: Path, role: str, key: str, keys: np.ndarray, compute) -> tuple[FeatureCache, dict]:
    """The cache ``cache_dir/<role>-<key[:16]>.npz`` when it holds exactly ``key`` and ``keys``;
    otherwise ``compute()`` -> (N, F) features, written there (atomically). Returns the cache and
    what the run records (``key``, ``file``, ``items``, ``dim``, ``reused``, ``seconds``)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{role}-{key[:16]}.npz"
    t0 = time.time()
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                stored_key, stored_keys, feats = str(z["key"]), z["keys"], z["features"]
            if stored_key == key and stored_keys.shape == keys.shape and np.array_equal(stored_keys, keys):
                cache = FeatureCache(keys, feats.astype(np.float32), key)
                return cache, {"key": key, "file": str(path), "items": int(len(keys)), "dim": cache.dim,
                               "reused": True, "seconds": round(time.time() - t0, 2)}
        except (OSError, ValueError, KeyError):
            pass  # unreadable or another layout: recomputed below
    feats = np.asarray(compute(), np.float32)
    if feats.shape[0] != len(keys):
        raise UsageError(f"locked {role} features: {feats.shape[0]} rows for {len(keys)} inputs")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, key=np.array(key), keys=keys, features=feats)
    os.replace(tmp, path)
    cache = FeatureCache(keys, feats, key)
    return cache, {"key": key, "file": str(path), "items": int(len(keys)), "dim": cache.dim, "reused": False,
                   "seconds": round(time.time() - t0, 2)}


def _batched(fn, *arrays: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(arrays[0]), BATCH):
        out.append(np.asarray(fn(*(tf.constant(a[i:i + BATCH]) for a in arrays))))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def image_cache(model: Any, dataset: str | Path, image_size: int, dataset_version: str,
                cache_dir: str | Path) -> tuple[FeatureCache, dict]:
    """The locked image backbone's features of every training image (stored, not augmented)."""
    from mmclinic.data.pipeline import read_split
    from mmclinic.data.preprocess import decode_image

    ds = read_split(dataset, "train").map(lambda ex: (ex["image_id"], decode_image(ex["image_png"], image_size)))
    ids, images = [], []
    for i, img in ds.batch(256):
        ids += [x.decode() for x in i.numpy()]
        images.append(img.numpy())
    keys = np.array(ids)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    pixels = np.concatenate(images)[order]
    prep = {"image_size": int(image_size), "decoder": IMAGE_DECODER}
    key = cache_key("image", backbone_fingerprint(model.image_backbone), prep, dataset_version, _digest(keys))
    fn = tf.function(lambda x: model.image_features(x, training=False))
    return load_or_compute(Path(cache_dir), "image", key, keys, lambda: _batched(fn, pixels))


def text_cache(model: Any, dataset: str | Path, data_cfg: Any, tokenizer: Any, negatives: Any, sources: tuple[str, ...],
               inputs: ExtraInputs, dataset_version: str, cache_dir: str | Path) -> tuple[FeatureCache, dict]:
    """The locked text backbone's features of every token row the training stream holds: each
    training report's, its mismatch negatives' and (with the text-text term) its sections'."""
    from mmclinic.data.pipeline import make_dataset

    probe = ExtraInputs(sections=inputs.sections)
    ds = make_dataset(dataset, "train", replace(data_cfg, augment=False), tokenizer, 256, training=False,
                      repeat=False, negatives=negatives, extras=probe)
    ids, masks = [], []
    for batch in ds:
        for name in sources:
            ids.append(batch[name].numpy())
            masks.append(batch[mask_name(name)].numpy())
    ids_all, masks_all = np.concatenate(ids), np.concatenate(masks)
    row_keys = token_row_keys(tf.constant(ids_all), tf.constant(masks_all)).numpy()
    keys, first = np.unique(row_keys, return_index=True)
    ids_u, masks_u = ids_all[first], masks_all[first]
    vocab = "\n".join(getattr(tokenizer, "vocab", []) or [])
    prep = {"max_length": int(data_cfg.max_length), "tokenizer": type(tokenizer).__name__,
            "vocabulary_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
            "pooling": model.text_pooling, "pooled_output": bool(model.text_pooled)}
    key = cache_key("text", backbone_fingerprint(model.text_backbone), prep, dataset_version, _digest(keys))
    fn = tf.function(lambda i, m: model.text_features(i, m, training=False))
    return load_or_compute(Path(cache_dir), "text", key, keys, lambda: _batched(fn, ids_u, masks_u))


def attach_caches(step: Any, dataset: str | Path, tokenizer: Any, negatives: Any, dataset_version: str,
                  cache_dir: str | Path) -> dict | None:
    """Compute (or reuse) the cache of ``step``'s locked tower and attach it to its extras; the
    record for ``run.json`` and MLflow, or None when no tower is locked with ``train.cache_locked``."""
    extras, config = step.extras, step.config
    if not extras.cached:
        return None
    if extras.locked == "image":
        cache, info = image_cache(step.model, dataset, config.data.image_size, dataset_version, cache_dir)
        extras.with_caches(image=cache)
    else:
        cache, info = text_cache(step.model, dataset, config.data, tokenizer, negatives, extras.text_sources,
                                 extras.inputs, dataset_version, cache_dir)
        extras.with_caches(text=cache)
    return {"role": extras.locked, **info}
