import numpy as np
import tensorflow as tf

from mmclinic.config import DataConfig
from mmclinic.data import preprocess
from mmclinic.data.pipeline import make_dataset
from mmclinic.tokenizer import ReportTokenizer, learn_vocabulary


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


def test_shards_written_without_tensorflow_are_byte_identical_to_tensorflows(tmp_path):
    import tensorflow as tf

    from mmclinic.data.shards import TFRecordWriter, encode_example

    feats = {"image_png": bytes(range(256)) * 50, "text": "Left effusion, ünïcode".encode(), "image_id": b""}
    ours, theirs = tmp_path / "ours.tfrecord", tmp_path / "tf.tfrecord"
    with TFRecordWriter(ours) as w:
        w.write(encode_example(feats))
    with tf.io.TFRecordWriter(str(theirs)) as w:
        w.write(tf.train.Example(features=tf.train.Features(feature={
            k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in feats.items()}))
            .SerializeToString())
    assert ours.read_bytes() == theirs.read_bytes()
