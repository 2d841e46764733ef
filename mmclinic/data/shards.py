"""TFRecord shards per split: the stored PNG, the model text and the keys of each image."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

STRING_FEATURES = ("image_id", "patient_key", "study_key", "report_id", "view", "laterality", "modality",
                   "sex", "age_band", "manufacturer", "text")


def write_shards(dataset: Path, manifest: pd.DataFrame, reports: pd.DataFrame, shard_size: int = 256) -> None:
    """Write ``dataset/shards/{split}-NNNNN-of-MMMMM.tfrecord``."""
    import tensorflow as tf

    out = dataset / "shards"
    out.mkdir(parents=True, exist_ok=True)
    texts = dict(zip(reports["report_id"], reports["text"])) if len(reports) else {}

    def bytes_feature(v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    for split, rows in manifest.groupby("split", sort=True):
        rows = rows.sort_values("image_id")
        n = max(1, -(-len(rows) // shard_size))
        for s in range(n):
            chunk = rows.iloc[s * shard_size:(s + 1) * shard_size]
            with tf.io.TFRecordWriter(str(out / f"{split}-{s:05d}-of-{n:05d}.tfrecord")) as w:
                for r in chunk.itertuples(index=False):
                    feats = {k: bytes_feature(str(getattr(r, k) if k != "text" else texts[r.report_id]).encode())
                             for k in STRING_FEATURES}
                    feats["image_png"] = bytes_feature((dataset / r.path).read_bytes())
                    w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


def shard_files(dataset: str | Path, split: str) -> list[str]:
    return sorted(str(p) for p in (Path(dataset) / "shards").glob(f"{split}-*.tfrecord"))
