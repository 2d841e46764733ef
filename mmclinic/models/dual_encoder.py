"""The dual-tower model: image and text towers, projections, temperature, match head."""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from mmclinic.errors import UsageError
from mmclinic.models.towers import build_image_tower, build_text_tower, text_layers_by_depth


@keras.saving.register_keras_serializable(package="mmclinic")
class DualEncoder(keras.Model):
    """Maps images and reports into one embedding space and scores pairs.

    ``call({"image": (B, S, S, 1), "token_ids": (B, L), "padding_mask": (B, L)})`` returns
    ``{"image_emb": (B, D), "text_emb": (B, D)}``, both L2-normalised float32 (also under a
    mixed-precision policy). ``logit_scale``
    (log of 1/temperature) and ``logit_bias`` feed the contrastive losses;
    :meth:`match_logits` scores (image, report) pairs as consistent or not.
    """

    def __init__(self, *, image_size: int, vocab_size: int, max_length: int, image_tower: str = "small_cnn",
                 image_widths: tuple[int, ...] = (16, 32, 64), image_weights: str | None = None,
                 text_layers: int = 2, text_hidden: int = 64, text_heads: int = 2, text_intermediate: int = 128,
                 embed_dim: int = 64, init_temperature: float = 0.07, dropout: float = 0.0,
                 text_tower: str = "small_bert", text_preset: str | None = None, text_pooling: str = "mean",
                 image_checkpoint: str | None = None, text_checkpoint: str | None = None,
                 dual_checkpoint: str | None = None, load_pretrained: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if text_pooling not in ("mean", "cls"):
            raise UsageError(f"model.text_pooling must be 'mean' or 'cls', got {text_pooling!r}")
        self._cfg = dict(
            image_size=image_size, vocab_size=vocab_size, max_length=max_length, image_tower=image_tower,
            image_widths=list(image_widths), image_weights=image_weights, text_layers=text_layers,
            text_hidden=text_hidden, text_heads=text_heads, text_intermediate=text_intermediate,
            embed_dim=embed_dim, init_temperature=init_temperature, dropout=dropout,
            text_tower=text_tower, text_preset=text_preset, text_pooling=text_pooling,
            image_checkpoint=image_checkpoint, text_checkpoint=text_checkpoint, dual_checkpoint=dual_checkpoint,
        )
        scale, bias = math.log(1 / init_temperature), -10.0
        # Pretrained weights come from the checkpoint folders; a reload (from_config, with
        # load_pretrained=False) builds the same architecture and takes them from the saved file.
        if dual_checkpoint:
            preset = _dual_preset(dual_checkpoint, image_size, max_length, load_pretrained)
            self.image_backbone, self.text_backbone = preset.image_encoder, preset.text_encoder
            # Both towers already end in the shared space (SigLIP's attention-pooling head, its text
            # head): no new projection, and the checkpoint's own logit scale and bias.
            embed_dim = int(self.image_backbone.output_shape[-1])
            self.image_proj = keras.layers.Identity(name="image_proj")
            self.text_proj = keras.layers.Identity(name="text_proj")
            scale, bias = preset.logit_scale, preset.logit_bias
        else:
            self.image_backbone = build_image_tower(image_tower, image_size, tuple(image_widths), image_weights,
                                                    checkpoint=image_checkpoint, load_weights=load_pretrained)
            self.text_backbone = build_text_tower(vocab_size, text_layers, text_hidden, text_heads,
                                                  text_intermediate, max_length, dropout, tower=text_tower,
                                                  preset=text_preset, load_weights=load_pretrained,
                                                  checkpoint=text_checkpoint)
            self.image_proj = keras.layers.Dense(embed_dim, name="image_proj")
            self.text_proj = keras.layers.Dense(embed_dim, name="text_proj")
        self.embed_dim = embed_dim
        self.text_pooled = not hasattr(self.text_backbone, "segment_embedding")  # SigLIP text: pooled output only
        self.text_pooling = text_pooling
        self.match_hidden = keras.layers.Dense(embed_dim, activation="gelu", name="match_hidden")
        self.match_out = keras.layers.Dense(1, name="match_out")
        self.logit_scale = self.add_weight(
            name="logit_scale", shape=(), initializer=keras.initializers.Constant(scale))
        self.logit_bias = self.add_weight(name="logit_bias", shape=(), initializer=keras.initializers.Constant(bias))
        # The match logit starts from the (affinely rescaled) cosine similarity that contrastive
        # training shapes, and the head learns what similarity misses (e.g. swapped sides).
        self.match_scale = self.add_weight(name="match_scale", shape=(), initializer=keras.initializers.Constant(10.0))
        self.match_shift = self.add_weight(name="match_shift", shape=(), initializer=keras.initializers.Constant(-2.0))
        self.image_size = image_size
        self.max_length = max_length

    def encode_image(self, image: Any, training: bool = False) -> Any:
        return self.project_image(self.image_features(image, training))

    def image_features(self, image: Any, training: bool = False) -> Any:
        """(B, S, S, 1) -> (B, F): the image backbone's pooled features, before the projection (what a
        locked image tower's cache holds)."""
        return self.image_backbone(image, training=training)

    def project_image(self, features: Any) -> Any:
        """(B, F) backbone features -> (B, D) unit image embeddings (float32)."""
        return _l2_normalize(ops.cast(self.image_proj(features), "float32"))

    def encode_text(self, token_ids: Any, padding_mask: Any, training: bool = False) -> Any:
        return self.project_text(self.text_features(token_ids, padding_mask, training))

    def text_features(self, token_ids: Any, padding_mask: Any, training: bool = False) -> Any:
        """(B, L) token ids and padding mask -> (B, F): the text backbone's pooled output, before the
        projection (what a locked text tower's cache holds)."""
        if self.text_pooled:
            # SigLIP's text tower: exactly its own length, attends to the padding as it was trained,
            # its head on the last position.
            return self.text_backbone({"token_ids": token_ids}, training=training)
        out = self.text_backbone({"token_ids": token_ids, "segment_ids": ops.zeros_like(token_ids),
                                  "padding_mask": padding_mask}, training=training)
        seq = out["sequence_output"]
        if self.text_pooling == "cls":
            return seq[:, 0, :]
        mask = ops.cast(ops.expand_dims(padding_mask, -1), seq.dtype)
        return ops.sum(seq * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)

    def project_text(self, features: Any) -> Any:
        """(B, F) pooled text features -> (B, D) unit text embeddings (float32)."""
        return _l2_normalize(ops.cast(self.text_proj(features), "float32"))

    def contrastive_logits(self, image_emb: Any, text_emb: Any) -> Any:
        """(B_img, D), (B_txt, D) unit embeddings -> (B_img, B_txt) ``exp(logit_scale) * cos +
        logit_bias``: SigLIP's logits (with a dual checkpoint, untrained, the checkpoint's own)."""
        cos = ops.matmul(ops.cast(image_emb, "float32"), ops.transpose(ops.cast(text_emb, "float32")))
        return ops.exp(self.logit_scale) * cos + self.logit_bias

    def match_logits(self, image_emb: Any, text_emb: Any) -> Any:
        """(B, D), (B, D) -> (B,) logit that the report belongs with the image."""
        cosine = ops.sum(image_emb * text_emb, axis=-1)
        feats = ops.concatenate([image_emb * text_emb, ops.abs(image_emb - text_emb)], axis=-1)
        head = ops.cast(ops.squeeze(self.match_out(self.match_hidden(feats)), -1), "float32")
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
        # The weights follow from the saved file or checkpoint, not from the text checkpoint.
        config.setdefault("load_pretrained", False)
        return cls(**config)

    def text_depth_layers(self) -> list[list[keras.layers.Layer]]:
        """Text backbone layers by depth: embeddings first, then each transformer layer."""
        return text_layers_by_depth(self.text_backbone)

    def freeze(self, text_layers: int = 0, image: bool = False) -> None:
        """Freeze the text embeddings and first ``text_layers`` transformer layers, and/or the
        image backbone (whose batch norms then run in inference mode). Projections and heads stay
        trainable. Call before building the optimizer."""
        depth = self.text_depth_layers()
        if text_layers > len(depth) - 1:
            raise UsageError(f"train.freeze_text_layers {text_layers} exceeds the text tower's "
                             f"{len(depth) - 1} transformer layers")
        if text_layers > 0:
            for group in depth[:text_layers + 1]:
                for layer in group:
                    layer.trainable = False
        if image:
            self.image_backbone.trainable = False

    def text_lr_multipliers(self, multiplier: float = 1.0, layer_decay: float = 1.0) -> dict[str, float]:
        """Learning-rate factor by variable path for the text backbone (the rest: 1).

        Layer-wise decay as in ELECTRA/BEiT: with L transformer layers, layer i (1-based) gets
        ``multiplier * layer_decay ** (L + 1 - i)`` and the embeddings ``... ** (L + 1)``.
        """
        depth = self.text_depth_layers()
        n = len(depth)  # L + 1
        out: dict[str, float] = {}
        for i, group in enumerate(depth):
            factor = float(multiplier * layer_decay ** (n - i))
            for layer in group:
                for v in layer.trainable_weights:
                    out[v.path] = factor
        return out

    def _trackable_children(self, save_type: str = "checkpoint", **kwargs: Any) -> dict[str, Any]:
        """TensorFlow checkpoints (the run's ``tf.train.Checkpoint``) also reach every weight of a
        tower built from a checkpoint folder by its position in the tower: some keras-hub backbones
        (ViT's encoder builds its blocks in ``build``) hide layers from TensorFlow's object graph,
        which would then restore them at random. Positions are the same for the same architecture."""
        children = super()._trackable_children(save_type, **kwargs)
        cfg = getattr(self, "_cfg", {})
        if save_type != "checkpoint" or not self.built or not (
                cfg.get("dual_checkpoint") or cfg.get("image_tower") == "checkpoint"
                or cfg.get("text_tower") == "checkpoint"):
            return children
        import tensorflow as tf

        holder = self.__dict__.get("_tower_variables")
        if holder is None:
            holder = tf.Module(name="checkpoint_tower_variables")
            holder.image = list(self.image_backbone.weights)
            holder.text = list(self.text_backbone.weights)
            object.__setattr__(self, "_tower_variables", holder)  # kept out of Keras's own tracking
        return {**children, "checkpoint_tower_variables": holder}

    def get_build_config(self) -> dict[str, Any]:
        return {"build_all": True}

    def build_from_config(self, config: dict[str, Any]) -> None:
        self.build()


def _dual_preset(folder: str, image_size: int, max_length: int, load_weights: bool) -> Any:
    from mmclinic.models.checkpoints import load_dual_encoder

    preset = load_dual_encoder(folder, load_weights=load_weights)
    if preset.image.image_size != image_size:
        raise UsageError(f"model.dual_checkpoint: checkpoint folder {preset.info.folder}: its images are "
                         f"{preset.image.image_size} px but the model's image size is {image_size}; "
                         f"set data.image_size: {preset.image.image_size}")
    if preset.text.model_max_length != max_length:
        raise UsageError(f"model.dual_checkpoint: checkpoint folder {preset.info.folder}: SigLIP's text tower "
                         f"takes exactly {preset.text.model_max_length} tokens but the model's max_length is "
                         f"{max_length}; set data.max_length: {preset.text.model_max_length}")
    return preset


def _l2_normalize(x: Any) -> Any:
    return x / ops.sqrt(ops.maximum(ops.sum(x * x, axis=-1, keepdims=True), 1e-12))


def from_model_config(model_cfg: Any, image_size: int, max_length: int, vocab_size: int,
                      load_pretrained: bool = True) -> DualEncoder:
    """Build a :class:`DualEncoder` from a :class:`mmclinic.config.ModelConfig`.

    ``load_pretrained=False`` skips reading pretrained text weights that a checkpoint will replace.
    """
    return DualEncoder(
        image_size=image_size, vocab_size=vocab_size, max_length=max_length, image_tower=model_cfg.image_tower,
        image_widths=tuple(model_cfg.image_widths), image_weights=model_cfg.image_weights,
        text_layers=model_cfg.text_layers, text_hidden=model_cfg.text_hidden, text_heads=model_cfg.text_heads,
        text_intermediate=model_cfg.text_intermediate, embed_dim=model_cfg.embed_dim,
        init_temperature=model_cfg.init_temperature, dropout=model_cfg.dropout,
        text_tower=model_cfg.text_tower, text_preset=model_cfg.text_preset, text_pooling=model_cfg.text_pooling,
        image_checkpoint=model_cfg.image_checkpoint, text_checkpoint=model_cfg.text_checkpoint,
        dual_checkpoint=model_cfg.dual_checkpoint, load_pretrained=load_pretrained)
