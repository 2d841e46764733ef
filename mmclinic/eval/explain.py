"""Why a pair scored as it did: a saliency map on the image and word attributions on the report.

- :func:`integrated_gradients`: attribution of the image-report similarity to each pixel of the
  image the model sees, through the image tower of a run's Keras model (Sundararajan, Taly and
  Yan, "Axiomatic Attribution for Deep Networks", ICML 2017): the path integral of the gradient
  from a baseline (black) to the image, by the midpoint rule. The attributions sum to the
  similarity of the image minus that of the baseline (completeness); :class:`Saliency` reports
  both so that a reader can see how well the integral converged.
- :func:`occlusion_attributions`: each word of the report dropped in turn and the pair re-scored;
  a word's weight is how much the score falls without it (works with any scorer, including an
  exported SavedModel).

:func:`explain_pair` does both for one image and report of a training run.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Saliency:
    """Integrated-gradients map of one image for one text embedding."""

    pixels: np.ndarray  # (H, W) the image the model sees, in [0, 1]
    attribution: np.ndarray  # (H, W) per-pixel attribution (sum over channels)
    similarity: float  # cosine similarity of the image and the text embedding
    baseline_similarity: float  # the same for the baseline image
    steps: int

    @property
    def completeness_error(self) -> float:
        """|sum of attributions - (similarity - baseline similarity)|: small when the integral converged."""
        return float(abs(self.attribution.sum() - (self.similarity - self.baseline_similarity)))


def model_pixels(png: bytes, size: int) -> np.ndarray:
    """The (size, size, 1) float pixels the model sees for stored image bytes (the training
    pipeline's own decode, :func:`mmclinic.data.preprocess.decode_image`)."""
    import tensorflow as tf

    from mmclinic.data.preprocess import decode_image

    return decode_image(tf.constant(png), size).numpy()


def integrated_gradients(model: Any, image: np.ndarray, text_emb: np.ndarray, steps: int = 32,
                         baseline: np.ndarray | None = None) -> Saliency:
    """Integrated gradients of ``cos(model.encode_image(image), text_emb)`` with respect to the
    pixels of ``image`` (H, W, C) in [0, 1]; ``baseline`` defaults to a black image."""
    import tensorflow as tf

    x = tf.constant(np.asarray(image, np.float32))
    base = tf.zeros_like(x) if baseline is None else tf.constant(np.asarray(baseline, np.float32))
    t = tf.constant(np.asarray(text_emb, np.float32).reshape(-1))
    t = t / tf.maximum(tf.norm(t), 1e-12)
    alphas = tf.reshape((tf.range(steps, dtype=tf.float32) + 0.5) / steps, [-1, 1, 1, 1])
    path = base[None] + alphas * (x - base)[None]

    def cosine(images: Any) -> Any:
        emb = tf.cast(model.encode_image(images, training=False), tf.float32)
        emb = emb / tf.maximum(tf.norm(emb, axis=-1, keepdims=True), 1e-12)
        return tf.linalg.matvec(emb, t)

    with tf.GradientTape() as tape:
        tape.watch(path)
        sims = cosine(path)
    avg = tape.gradient(sims, path).numpy().mean(0)
    attr = ((x - base).numpy() * avg).sum(-1)
    ends = cosine(tf.stack([base, x])).numpy()
    px = np.asarray(image, np.float32)
    return Saliency(pixels=px.mean(-1) if px.ndim == 3 else px, attribution=attr, similarity=float(ends[1]),
                    baseline_similarity=float(ends[0]), steps=steps)


@dataclass
class WordAttribution:
    word: str
    weight: float  # score with the word minus score without it


def occlusion_attributions(scorer: Any, image_emb: np.ndarray, text: str, score: str = "similarity"
                           ) -> tuple[float, list[WordAttribution]]:
    """(the full report's score, one attribution per word): each whitespace-separated word dropped
    in turn and the pair re-scored. ``score``: ``similarity`` (cosine of the embeddings) or
    ``match`` (the match head's logit)."""
    if score not in ("similarity", "match"):
        raise ValueError(f"score must be 'similarity' or 'match', got {score!r}")
    words = text.split()
    variants = [text] + [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    embs = np.asarray(scorer.embed_texts(variants), np.float64)
    img = np.asarray(image_emb, np.float64).reshape(-1)
    if score == "similarity":
        norms = np.maximum(np.linalg.norm(embs, axis=1) * np.linalg.norm(img), 1e-12)
        values = embs @ img / norms
    else:
        values = np.asarray(scorer.match_logits(np.repeat(img[None], len(embs), 0).astype(np.float32),
                                                embs.astype(np.float32)), np.float64).reshape(-1)
    return float(values[0]), [WordAttribution(w, float(values[0] - v)) for w, v in zip(words, values[1:])]


def words_html(attributions: list[WordAttribution], scale: float | None = None) -> str:
    """The report with each word shaded by its weight: red where the word raises the score,
    blue where it lowers it (HTML, escaped)."""
    m = scale or max([abs(a.weight) for a in attributions] + [1e-12])
    out = []
    for a in attributions:
        alpha = min(abs(a.weight) / m, 1.0) * 0.8
        rgb = "220,40,40" if a.weight > 0 else "40,90,220"
        out.append(f"<span title='{a.weight:+.4f}' style='background:rgba({rgb},{alpha:.2f});padding:1px 2px;"
                   f"border-radius:3px'>{html.escape(a.word)}</span>")
    return "<div style='line-height:1.9;font-family:sans-serif;font-size:13px'>" + " ".join(out) + "</div>"


@dataclass
class PairExplanation:
    saliency: Saliency
    score: float
    words: list[WordAttribution]


def explain_pair(scorer: Any, png: bytes, text: str, steps: int = 32, score: str = "similarity") -> PairExplanation:
    """Saliency on the image and word attributions on the report for one pair, with a
    :class:`~mmclinic.eval.scorers.RunScorer` (it holds the run's Keras model and config)."""
    size = scorer.config.data.image_size
    text_emb = np.asarray(scorer.embed_texts([text]))[0]
    sal = integrated_gradients(scorer.model, model_pixels(png, size), text_emb, steps)
    image_emb = np.asarray(scorer.embed_images([png]))[0]
    full, words = occlusion_attributions(scorer, image_emb, text, score)
    return PairExplanation(sal, full, words)


def show_saliency(ax: Any, saliency: Saliency, title: str | None = None, positive_only: bool = True) -> None:
    """The image in gray with the attribution map over it (positive attributions by default)."""
    attr = np.clip(saliency.attribution, 0, None) if positive_only else saliency.attribution
    ax.imshow(saliency.pixels, cmap="gray", vmin=0, vmax=1)
    m = float(np.abs(attr).max()) or 1.0
    ax.imshow(attr, cmap="inferno" if positive_only else "coolwarm", alpha=0.5,
              vmin=0 if positive_only else -m, vmax=m)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
