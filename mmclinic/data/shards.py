"""TFRecord shards per split: the stored PNG, the model text and the keys of each image."""

from __future__ import annotations

import struct
from pathlib import Path

import pandas as pd

from mmclinic.artifacts import DatasetDir

STRING_FEATURES = ("image_id", "patient_key", "study_key", "report_id", "view", "laterality", "modality",
                   "sex", "age_band", "manufacturer", "text")


def varint(n: int) -> bytes:
    """An unsigned protobuf varint (also used for TensorFlow Serving's warm-up records)."""
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint((number << 3) | 2) + varint(len(payload)) + payload


def encode_example(features: dict[str, bytes]) -> bytes:
    """A serialized ``tf.train.Example`` whose features are single ``bytes_list`` values.

    Written by hand (the wire format is small and stable) so that ingest does not need to
    import TensorFlow; the tests parse the result with TensorFlow.
    """
    entries = b"".join(_field(1, _field(1, k.encode()) + _field(2, _field(1, _field(1, v))))
                       for k, v in sorted(features.items()))
    return _field(1, entries)


def _masked_crc(data: bytes) -> bytes:
    import google_crc32c

    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class TFRecordWriter:
    """The TFRecord container: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""

    def __init__(self, path: str | Path) -> None:
        self._fh = open(path, "wb")

    def write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._fh.write(header + _masked_crc(header) + record + _masked_crc(record))

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def write_shards(dataset: Path, manifest: pd.DataFrame, reports: pd.DataFrame, shard_size: int = 256) -> None:
    """Write ``dataset/shards/{split}-NNNNN-of-MMMMM.tfrecord``."""
    out = DatasetDir(dataset).shards_dir
    out.mkdir(parents=True, exist_ok=True)
    texts = dict(zip(reports["report_id"], reports["text"])) if len(reports) else {}
    for split, rows in manifest.groupby("split", sort=True):
        rows = rows.sort_values("image_id")
        n = max(1, -(-len(rows) // shard_size))
        for s in range(n):
            chunk = rows.iloc[s * shard_size:(s + 1) * shard_size]
            with TFRecordWriter(out / f"{split}-{s:05d}-of-{n:05d}.tfrecord") as w:
                for r in chunk.itertuples(index=False):
                    feats = {k: str(getattr(r, k) if k != "text" else texts[r.report_id]).encode()
                             for k in STRING_FEATURES}
                    feats["image_png"] = (dataset / r.path).read_bytes()
                    w.write(encode_example(feats))
