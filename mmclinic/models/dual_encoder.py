"""The dual-tower model: image and text towers, projections, temperature, match head."""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from mmclinic.models.towers import build_image_tower, build_text_tower


@keras.saving.register_keras_serializable(package="mmclinic")
class DualEncoder(keras.Model):
    """Maps images and reports into one embedding space and scores pairs.

    ``call({"image": (B, S, S, 1), "token_ids": (B, L), "padding_mask": (B, L)})`` returns
    ``{"image_emb": (B, D), "text_emb": (B, D)}``, both L2-normalised. ``logit_scale``
    (log of 1/temperature) and ``logit_bias`` feed the contrastive losses;
    :meth:`match_logits` scores (image, report) pairs as consistent or not.
    """

    def __init__(self, *, image_size: int, vocab_size: int, max_length: int, image_tower: str = "small_cnn",
                 image_widths: tuple[int, ...] = (16, 32, 64), image_weights: str | None = None,
                 text_layers: int = 2, text_hidden: int = 64, text_heads: int = 2, text_intermediate: int = 128,
                 embed_dim: int = 64, init_temperature: float = 0.07, dropout: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cfg = dict(
            image_size=image_size, vocab_size=vocab_size, max_length=max_length, image_tower=image_tower,
            image_widths=list(image_widths), image_weights=image_weights, text_layers=text_layers,
            text_hidden=text_hidden, text_heads=text_heads, text_intermediate=text_intermediate,
            embed_dim=embed_dim, init_temperature=init_temperature, dropout=dropout,
        )
        self.image_backbone = build_image_tower(image_tower, image_size, tuple(image_widths), image_weights)
        self.text_backbone = build_text_tower(vocab_size, text_layers, text_hidden, text_heads,
                                              text_intermediate, max_length, dropout)
        self.image_proj = keras.layers.Dense(embed_dim, name="image_proj")
        self.text_proj = keras.layers.Dense(embed_dim, name="text_proj")
        self.match_hidden = keras.layers.Dense(embed_dim, activation="gelu", name="match_hidden")
        self.match_out = keras.layers.Dense(1, name="match_out")
        self.logit_scale = self.add_weight(
            name="logit_scale", shape=(), initializer=keras.initializers.Constant(math.log(1 / init_temperature)))
        self.logit_bias = self.add_weight(name="logit_bias", shape=(), initializer=keras.initializers.Constant(-10.0))
        # The match logit starts from the (affinely rescaled) cosine similarity that contrastive
        # training shapes, and the head learns what similarity misses (e.g. swapped sides).
        self.match_scale = self.add_weight(name="match_scale", shape=(), initializer=keras.initializers.Constant(10.0))
        self.match_shift = self.add_weight(name="match_shift", shape=(), initializer=keras.initializers.Constant(-2.0))
        self.image_size = image_size
        self.max_length = max_length

    def encode_image(self, image: Any, training: bool = False) -> Any:
        feats = self.image_backbone(image, training=training)
        return _l2_normalize(self.image_proj(feats))

    def encode_text(self, token_ids: Any, padding_mask: Any, training: bool = False) -> Any:
        out = self.text_backbone({"token_ids": token_ids, "segment_ids": ops.zeros_like(token_ids),
                                  "padding_mask": padding_mask}, training=training)
        seq = out["sequence_output"]
        mask = ops.cast(ops.expand_dims(padding_mask, -1), seq.dtype)
        pooled = ops.sum(seq * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)
        return _l2_normalize(self.text_proj(pooled))

    def match_logits(self, image_emb: Any, text_emb: Any) -> Any:
        """(B, D), (B, D) -> (B,) logit that the report belongs with the image."""
        cosine = ops.sum(image_emb * text_emb, axis=-1)
        feats = ops.concatenate([image_emb * text_emb, ops.abs(image_emb - text_emb)], axis=-1)
        head = ops.squeeze(self.match_out(self.match_hidden(feats)), -1)
        return self.match_scale * cosine + self.match_shift + head

    def call(self, inputs: dict[str, Any], training: bool = False) -> dict[str, Any]:
        out = {}
        if "image" in inputs:
            out["image_emb"] = self.encode_image(inputs["image"], training)
        if "token_ids" in inputs:
            out["text_emb"] = self.encode_text(inputs["token_ids"], inputs["padding_mask"], training)
        return out

    def build(self, input_shape: Any = None) -> None:
        """Create every variable by running each part once on dummy inputs."""
        img = ops.zeros((1, self.image_size, self.image_size, 1))
        ids = ops.zeros((1, self.max_length), dtype="int32")
        mask = ops.ones((1, self.max_length), dtype="bool")
        self.match_logits(self.encode_image(img), self.encode_text(ids, mask))
        self.built = True

    def build_all(self) -> None:
        if not self.built:
            self.build()

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(self._cfg)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DualEncoder":
        config = dict(config)
        config["image_widths"] = tuple(config.get("image_widths", (16, 32, 64)))
        return cls(**config)

    def get_build_config(self) -> dict[str, Any]:
        return {"build_all": True}

    def build_from_config(self, config: dict[str, Any]) -> None:
        self.build()


def _l2_normalize(x: Any) -> Any:
    return x / ops.sqrt(ops.maximum(ops.sum(x * x, axis=-1, keepdims=True), 1e-12))


def from_model_config(model_cfg: Any, image_size: int, max_length: int, vocab_size: int) -> DualEncoder:
    """Build a :class:`DualEncoder` from a :class:`mmclinic.config.ModelConfig`."""
    return DualEncoder(
        image_size=image_size, vocab_size=vocab_size, max_length=max_length, image_tower=model_cfg.image_tower,
        image_widths=tuple(model_cfg.image_widths), image_weights=model_cfg.image_weights,
        text_layers=model_cfg.text_layers, text_hidden=model_cfg.text_hidden, text_heads=model_cfg.text_heads,
        text_intermediate=model_cfg.text_intermediate, embed_dim=model_cfg.embed_dim,
        init_temperature=model_cfg.init_temperature, dropout=model_cfg.dropout)
