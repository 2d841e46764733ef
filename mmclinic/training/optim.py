"""The optimizer: AdamW with a learning-rate factor per variable (layer-wise decay, frozen-free).

Why a factor on the learning rate and not on the gradient: Adam divides the first moment by
the root of the second, so multiplying a gradient by a constant leaves the update unchanged
(up to epsilon) — gradient scaling does nothing under Adam — and AdamW's decoupled weight
decay (``var -= lr * wd * var``) never sees the gradient at all. Scaling the learning rate
per variable scales both the Adam step and the weight decay of that variable, which is what
PyTorch's parameter groups do. One optimizer (not one per group) keeps a single step counter
and schedule, a single loss scale under float16 and one global-norm clip over all gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
from keras import ops

from mmclinic.config import TrainConfig


@keras.saving.register_keras_serializable(package="mmclinic")
class LayerwiseAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate (and so decoupled weight decay) is multiplied per variable.

    ``lr_multipliers``: variable path (``Variable.path``) -> factor; absent paths use 1.
    ``aggregated_gradients``: the caller passes gradients already summed over replicas (and
    clipping then acts on the global gradient); the optimizer does not all-reduce them again.
    """

    def __init__(self, *args: Any, lr_multipliers: Mapping[str, float] | None = None,
                 aggregated_gradients: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        self.aggregated_gradients = aggregated_gradients

    def build(self, var_list: list) -> None:
        super().build(var_list)
        self._lr_scales = [self.lr_multipliers.get(v.path, 1.0) for v in var_list]

    def _apply_weight_decay(self, variables: list) -> None:
        # Applied per variable in update_step, with that variable's learning rate.
        return

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        scale = self._lr_scales[self._get_variable_index(variable)]
        lr = ops.cast(learning_rate, variable.dtype)
        if scale != 1.0:
            lr = lr * scale
        if self.weight_decay and self._use_weight_decay(variable):
            wd = ops.cast(self.weight_decay, variable.dtype)
            self.assign_sub(variable, variable * wd * lr)
        super().update_step(gradient, variable, lr)

    def _all_reduce_sum_gradients(self, grads_and_vars: Any) -> list:
        if self.aggregated_gradients:
            return list(grads_and_vars)
        return super()._all_reduce_sum_gradients(grads_and_vars)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(lr_multipliers=dict(self.lr_multipliers), aggregated_gradients=self.aggregated_gradients)
        return config


def lr_schedule(train: TrainConfig) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up to ``train.learning_rate`` over ``train.warmup_steps``, then cosine decay to
    5 % of it at ``train.steps``."""
    decay = max(train.steps - train.warmup_steps, 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if train.warmup_steps else train.learning_rate, decay_steps=decay, alpha=0.05,
        warmup_target=train.learning_rate if train.warmup_steps else None, warmup_steps=train.warmup_steps)


def build_optimizer(train: TrainConfig, model: Any, extra_variables: Any = ()) -> keras.optimizers.Optimizer:
    """The run's optimizer for ``model``'s trainable variables (freeze the model first), built.

    :class:`LayerwiseAdamW` on :func:`lr_schedule`, with the text tower's layer-wise rates when
    ``train.text_lr_multiplier`` or ``train.layer_decay`` ask for them, wrapped in loss scaling
    under ``mixed_float16``. Gradients are to reach it already summed over replicas, so its
    global-norm clip sees the global gradient (as on one device). Call it inside the strategy's
    scope. ``extra_variables``: trainable variables outside the model (auxiliary heads).
    """
    multipliers = ({} if train.text_lr_multiplier == 1.0 and train.layer_decay == 1.0
                   else model.text_lr_multipliers(train.text_lr_multiplier, train.layer_decay))
    optimizer = LayerwiseAdamW(learning_rate=lr_schedule(train), weight_decay=train.weight_decay,
                               global_clipnorm=train.clip_norm, lr_multipliers=multipliers, aggregated_gradients=True)
    if train.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables + list(extra_variables))
    return optimizer
