"""Saliency (integrated gradients) and word attributions (occlusion) of one image-report pair."""

from __future__ import annotations

import numpy as np
import pytest

from mmclinic.eval.explain import integrated_gradients, occlusion_attributions, words_html


class _LinearTower:
    """encode_image = W @ flatten(image): integrated gradients of a linear map are exact."""

    def __init__(self, h: int, w: int, d: int = 4, seed: int = 0) -> None:
        self.w = np.random.default_rng(seed).normal(size=(h * w, d)).astype(np.float32)

    def encode_image(self, x, training=False):
        import tensorflow as tf

        return tf.reshape(x, [tf.shape(x)[0], -1]) @ self.w


def test_integrated_gradients_sum_to_the_similarity_change():
    import keras

    keras.utils.set_random_seed(0)
    tower = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(4, 3, activation="tanh"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(8, bias_initializer="ones")])

    class Model:
        def encode_image(self, x, training=False):
            return tower(x, training=training)

    img = np.random.default_rng(1).uniform(size=(16, 16, 1)).astype(np.float32)
    text = np.random.default_rng(2).normal(size=8)
    sal = integrated_gradients(Model(), img, text, steps=64)
    assert sal.attribution.shape == (16, 16) and sal.pixels.shape == (16, 16)
    assert sal.completeness_error < 0.02 * max(abs(sal.similarity - sal.baseline_similarity), 1e-3) + 1e-3


def test_integrated_gradients_point_at_the_pixels_that_matter():
    """Only the top-left quadrant moves the embedding: attributions elsewhere are zero."""
    tower = _LinearTower(8, 8)
    tower.w.reshape(8, 8, -1)[4:, :, :] = 0
    tower.w.reshape(8, 8, -1)[:, 4:, :] = 0
    img = np.ones((8, 8, 1), np.float32)
    sal = integrated_gradients(tower, img, tower.w.sum(0), steps=16)
    assert np.abs(sal.attribution[4:, :]).max() == 0 and np.abs(sal.attribution[:, 4:]).max() == 0
    assert np.abs(sal.attribution[:4, :4]).sum() > 0


class _BagOfWords:
    """embed_texts: counts of a small vocabulary; 'effusion' carries the image's direction."""

    vocab = ["left", "pleural", "effusion", "normal", "heart"]

    def embed_texts(self, texts):
        out = np.zeros((len(texts), len(self.vocab)), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                if w.strip(".") in self.vocab:
                    out[i, self.vocab.index(w.strip("."))] += 1
        return out + 1e-3

    def match_logits(self, image_emb, text_emb):
        return (image_emb * text_emb).sum(-1)


@pytest.mark.parametrize("score", ["similarity", "match"])
def test_occlusion_ranks_the_decisive_word_first(score):
    image = np.array([0, 0, 1, 0, 0], np.float32)
    full, words = occlusion_attributions(_BagOfWords(), image, "Small left pleural effusion.", score)
    assert [w.word for w in words] == ["Small", "left", "pleural", "effusion."]
    assert max(words, key=lambda w: w.weight).word == "effusion."
    assert full > 0
    html = words_html(words)
    assert "effusion." in html and "rgba(220,40,40" in html


def test_occlusion_rejects_unknown_score_and_escapes_html():
    with pytest.raises(ValueError, match="score"):
        occlusion_attributions(_BagOfWords(), np.ones(5), "a b", "auroc")
    _, words = occlusion_attributions(_BagOfWords(), np.ones(5), "<b>left</b> heart")
    assert "<b>" not in words_html(words)
