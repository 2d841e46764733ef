"""Training throughput on this machine: float32 vs mixed_bfloat16, XLA off vs on.

Usage:  .venv/bin/python bench/train_precision.py [--steps 30] [--batch 32] [--size 64]

Times the real training step (`mmclinic.training.step.TrainStep`, as `mmclinic train` runs it:
the demo experiment's model, contrastive and match losses with every mismatch kind, optimizer,
logit-scale clip) on synthetic batches of the step's own batch schema, for each setting side by
side in one process, after a warm-up step that absorbs tracing/compilation (reported
separately). Prints a table of examples/s and the ratio to float32 without XLA. On CPUs without
native bfloat16 matrix units, mixed_bfloat16 is usually *slower* than float32 (casts, emulated
kernels): mixed precision pays off on GPUs/TPUs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEMO = Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml"
VOCAB = 800


def synthetic_batch(schema, batch: int, vocab: int, seed: int = 0) -> dict:
    """A batch of every feature ``schema`` declares, with its dtype and shape: random pixels and
    token ids, every token real, every negative present, every report and patient different."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in schema.specs(batch).items():
        shape = tuple(spec.shape)
        if spec.dtype == tf.float32:
            value = rng.random(shape)
        elif spec.dtype == tf.int32:
            value = rng.integers(5, vocab, shape)
        elif spec.dtype == tf.bool:
            value = np.ones(shape, bool)
        elif spec.dtype == tf.int64:
            value = np.arange(batch).reshape(shape)
        elif spec.dtype == tf.string:
            value = np.array([f"{name} {i}" for i in range(batch)]).reshape(shape)
        else:
            raise TypeError(f"no synthetic values for feature {name!r} of dtype {spec.dtype.name}")
        out[name] = tf.constant(value, spec.dtype)
    return out


def bench(precision: str, jit: bool, steps: int, batch: int, size: int, length: int) -> tuple[float, float]:
    import keras
    import tensorflow as tf

    from mmclinic.config import load_config
    from mmclinic.training.step import TrainStep

    config = load_config(DEMO, [f"train.precision={precision}", f"train.jit_compile={str(jit).lower()}",
                                f"train.batch_size={batch}", f"data.image_size={size}",
                                f"data.max_length={length}"])
    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(config.train.seed)
    try:
        step = TrainStep.build(config, VOCAB, tf.distribute.get_strategy())
        batch_data = synthetic_batch(step.schema, step.global_batch, VOCAB)
        t = time.perf_counter()
        step(batch_data)["loss"].numpy()
        first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            out = step(batch_data)
        out["loss"].numpy()
        return first, steps * step.global_batch / (time.perf_counter() - t)
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
    print(f"\ndemo config (CNN 16-32-64 at {args.size} px + 2-layer BERT h64, vocabulary {VOCAB}, batch "
          f"{args.batch}, length {args.length}, every mismatch kind), {args.steps} timed steps each")
    print(f"{'precision':16s} {'XLA':5s} {'first step s':>12s} {'examples/s':>11s} {'vs float32':>10s}")
    for precision, jit, first, rate in rows:
        print(f"{precision:16s} {'on' if jit else 'off':5s} {first:12.1f} {rate:11.1f} {rate / base:10.2f}")


if __name__ == "__main__":
    main()
