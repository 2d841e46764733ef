"""Training throughput on this machine: float32 vs mixed_bfloat16, XLA off vs on.

Usage:  .venv/bin/python bench/train_precision.py [--steps 30] [--batch 32] [--size 64]

Times the dual-tower training step of `mmclinic.training.loop` (same model, loss, optimizer) on
synthetic tensors for each setting, side by side in one process, after a warm-up step that
absorbs tracing/compilation (reported separately). Prints a table of examples/s and the ratio
to float32 without XLA. On CPUs without native bfloat16 matrix units, mixed_bfloat16 is usually
*slower* than float32 (casts, emulated kernels): mixed precision pays off on GPUs/TPUs.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def bench(precision: str, jit: bool, steps: int, batch: int, size: int, length: int) -> tuple[float, float]:
    import keras
    import numpy as np
    import tensorflow as tf

    from mmclinic.training import losses
    from mmclinic.models import DualEncoder
    from mmclinic.training.optim import LayerwiseAdamW

    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    try:
        model = DualEncoder(image_size=size, vocab_size=800, max_length=length, image_widths=(16, 32, 64),
                            text_layers=2, text_hidden=64, text_heads=2, text_intermediate=128, embed_dim=64)
        model.build_all()
        opt = LayerwiseAdamW(learning_rate=1e-3, weight_decay=1e-4, global_clipnorm=1.0)
        if precision == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        variables = model.trainable_variables
        opt.build(variables)
        rng = np.random.default_rng(0)
        batch_data = {"image": tf.constant(rng.random((batch, size, size, 1)), tf.float32),
                      "ids": tf.constant(rng.integers(5, 800, (batch, length)), tf.int32),
                      "mask": tf.ones((batch, length), tf.bool)}

        def step(b):
            with tf.GradientTape() as tape:
                img = model.encode_image(b["image"], training=True)
                txt = model.encode_text(b["ids"], b["mask"], training=True)
                swp = model.encode_text(b["ids"], b["mask"], training=True)
                loss = losses.clip_loss(img, txt, model.logit_scale)
                loss += 0.5 * losses.match_loss(model.match_logits(img, swp), tf.zeros([batch]))
                scaled = opt.scale_loss(loss)
            grads = tape.gradient(scaled, variables)
            opt.apply([g for g in grads if g is not None], [v for g, v in zip(grads, variables) if g is not None])
            return loss

        fn = tf.function(step, jit_compile=jit)
        t = time.perf_counter()
        fn(batch_data).numpy()
        first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            loss = fn(batch_data)
        loss.numpy()
        return first, steps * batch / (time.perf_counter() - t)
    finally:
        keras.config.set_dtype_policy("float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--length", type=int, default=64, help="token sequence length")
    args = ap.parse_args()
    rows = []
    for precision in ("float32", "mixed_bfloat16"):
        for jit in (False, True):
            try:
                first, rate = bench(precision, jit, args.steps, args.batch, args.size, args.length)
                rows.append((precision, jit, first, rate))
            except Exception as exc:  # noqa: BLE001 - report a setting that does not run here
                rows.append((precision, jit, float("nan"), float("nan")))
                print(f"{precision} jit={jit}: failed: {type(exc).__name__}: {str(exc)[:200]}")
    base = rows[0][3]
    print(f"\nsmall config (CNN 16-32-64 at {args.size} px + 2-layer BERT h64, batch {args.batch}, "
          f"length {args.length}), {args.steps} timed steps each")
    print(f"{'precision':16s} {'XLA':5s} {'first step s':>12s} {'examples/s':>11s} {'vs float32':>10s}")
    for precision, jit, first, rate in rows:
        print(f"{precision:16s} {'on' if jit else 'off':5s} {first:12.1f} {rate:11.1f} {rate / base:10.2f}")


if __name__ == "__main__":
    main()
