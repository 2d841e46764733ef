import pytest
import numpy as np
import tensorflow as tf

from mmclinic.config import DataConfig
from mmclinic.data import preprocess
from mmclinic.data.pipeline import make_dataset
from mmclinic.text.tokenizer import ReportTokenizer, learn_vocabulary


def test_swap_laterality_changes_every_side_word_and_nothing_else():
    text = "Left effusion. RIGHT apex clear; the right lung and left base. Leftover words stay."
    want = "Right effusion. LEFT apex clear; the left lung and right base. Leftover words stay."
    assert preprocess.swap_laterality_py(text) == want
    assert preprocess.swap_laterality(tf.constant(text)).numpy().decode() == want


def test_decode_eager_and_in_tf_data_agree(dataset):
    png = next(iter(sorted((dataset / "images").glob("*.png")))).read_bytes()
    eager = preprocess.decode_image(tf.constant(png), 32).numpy()
    ds = tf.data.Dataset.from_tensors(png).map(lambda b: preprocess.decode_image(b, 32))
    assert np.array_equal(eager, next(iter(ds)).numpy()) and eager.shape == (32, 32, 1)


def test_augmentation_never_flips_by_default():
    img = tf.concat([tf.zeros((32, 16, 1)), tf.ones((32, 16, 1))], axis=1)
    for i in range(20):
        out = preprocess.augment_image(img, tf.constant([i, 0], tf.int64)).numpy()
        assert out[:, :8].mean() < out[:, -8:].mean()


def test_batches_have_expected_shapes(dataset):
    import pandas as pd

    texts = pd.read_parquet(dataset / "reports.parquet")["text"].tolist()
    tok = ReportTokenizer(learn_vocabulary(texts, 300), 40)
    batch = next(iter(make_dataset(dataset, "train", DataConfig(image_size=32, max_length=40), tok, 8,
                                   training=True)))
    assert batch["image"].shape == (8, 32, 32, 1) and batch["token_ids"].shape == (8, 40)
    assert batch["padding_mask"].dtype == tf.bool and batch["swapped_ids"].shape == (8, 40)


def test_shards_written_without_tensorflow_read_back_in_tensorflow(tmp_path):
    """The hand-written TFRecord container and tf.train.Example encoding parse in TensorFlow
    (length and data CRCs checked by its reader) to exactly the features written."""
    import tensorflow as tf

    from mmclinic.data.shards import TFRecordWriter, encode_example

    records = [{"image_png": bytes(range(256)) * 50, "text": "Left effusion, ünïcode".encode(), "image_id": b""},
               {"image_png": b"x" * 300_000, "text": b"", "image_id": b"I123"}]
    path = tmp_path / "ours.tfrecord"
    with TFRecordWriter(path) as w:
        for feats in records:
            w.write(encode_example(feats))
    read = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    assert len(read) == len(records)
    for raw, feats in zip(read, records):
        ex = tf.train.Example.FromString(raw)
        assert {k: list(v.bytes_list.value) for k, v in ex.features.feature.items()} == \
            {k: [v] for k, v in feats.items()}
    blob = bytearray(path.read_bytes())
    blob[20] ^= 0xFF  # corrupt one data byte: the reader's CRC check must notice
    path.write_bytes(bytes(blob))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
