"""Training throughput from TFRecord shards vs the same batches held in memory, side by side.

    .venv/bin/python bench/pipeline_vs_memory.py [--steps 60] [--patients 120]

Prints examples/s for both and their ratio (target >= 0.95: the input pipeline keeps up with
the training step). Both loops run the real training step (`mmclinic.training.step.TrainStep`
of the demo experiment, every mismatch kind, fed as `mmclinic train` feeds it: the pipeline
built from the step's batch schema with the training split's negative tables), interleaved in
rounds (the order alternating) so that machine noise hits both alike; the reported ratio is the
median of the per-round ratios, with their range. It also times the pipeline alone (no training
step), to show what share of the step's time the input work could take at most.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--patients", type=int, default=120)
    args = ap.parse_args()

    import keras
    import pandas as pd
    import tensorflow as tf

    from mmclinic.config import load_config
    from mmclinic.data.ingest import IngestOptions, ingest
    from mmclinic.data.negatives import split_negatives
    from mmclinic.data.pipeline import make_dataset
    from mmclinic.data.synth import synthesize
    from mmclinic.text.tokenizer import ReportTokenizer, learn_vocabulary
    from mmclinic.training.step import MismatchKinds, TrainStep

    cfg = load_config(Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="mmclinic-bench-"))
    os.chdir(tmp)  # outside the repository: ingest would copy this throwaway data card into data_cards/
    synthesize(tmp / "src", patients=args.patients, seed=0, size=128)
    ingest(tmp / "src", tmp / "ds", "dicom", tmp / "key", IngestOptions(max_side=128))
    texts = pd.read_parquet(tmp / "ds" / "reports.parquet")["text"].tolist()
    tok = ReportTokenizer(learn_vocabulary(texts, cfg.model.vocab_size), cfg.data.max_length)
    keras.utils.set_random_seed(cfg.train.seed)
    kinds = MismatchKinds.from_config(cfg.train)
    negatives = split_negatives(tmp / "ds", "train", cfg.train.seed, kinds.table_kinds)
    step = TrainStep.build(cfg, len(tok.vocab), tf.distribute.get_strategy(), kinds)
    bs = step.global_batch

    # The features the step's schema declares, as train() asks for them.
    ds = make_dataset(tmp / "ds", "train", cfg.data, tok, bs, training=True, seed=cfg.train.seed,
                      negatives=negatives, schema=step.schema)
    it = step.distribute(ds)
    memory = [next(it) for _ in range(8)]
    step(memory[0])["loss"].numpy()  # trace once

    def run_pipeline(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            out = step(next(it))
        out["loss"].numpy()
        return n * bs / (time.perf_counter() - t0)

    def run_memory(n: int) -> float:
        t0 = time.perf_counter()
        for s in range(n):
            out = step(memory[s % len(memory)])
        out["loss"].numpy()
        return n * bs / (time.perf_counter() - t0)

    def run_alone(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        return n * bs / (time.perf_counter() - t0)

    alone = run_alone(10 * args.steps)
    pipe, mem = [], []
    for r in range(args.rounds):
        if r % 2:
            mem.append(run_memory(args.steps))
            pipe.append(run_pipeline(args.steps))
        else:
            pipe.append(run_pipeline(args.steps))
            mem.append(run_memory(args.steps))
        print(f"round {r + 1}: shards {pipe[-1]:7.1f}  memory {mem[-1]:7.1f}  ratio {pipe[-1] / mem[-1]:.3f}",
              flush=True)
    ratios = sorted(a / b for a, b in zip(pipe, mem))
    p, m = sorted(pipe)[len(pipe) // 2], sorted(mem)[len(mem) // 2]
    print(f"image {cfg.data.image_size}px, batch {bs}, {args.steps} steps x {args.rounds} rounds (medians)")
    print(f"pipeline alone (no step):  {alone:8.1f} examples/s")
    print(f"from shards (tf.data):     {p:8.1f} examples/s")
    print(f"held in memory:            {m:8.1f} examples/s")
    print(f"ratio shards/memory:       {ratios[len(ratios) // 2]:8.3f}  (median of rounds; range "
          f"{ratios[0]:.3f}-{ratios[-1]:.3f}; target >= 0.95)")


if __name__ == "__main__":
    main()
