"""tf.distribute: negatives gathered across replicas, mirrored training, two workers agreeing.

TensorFlow fixes its devices when it starts, so each test runs its TensorFlow work in a
subprocess (the CPU split into two logical devices, or one process per worker).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

TINY = str(REPO / "experiments" / "tiny.yaml")


def _run(code: str, timeout: int = 600, env: dict | None = None) -> str:
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_gathered_loss_and_gradients_equal_single_replica_on_the_global_batch():
    """Two replicas with gathered negatives give the loss and gradients of one device on the
    whole batch (the CPU split into two logical devices)."""
    out = _run("""
        import json
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        import numpy as np
        from mmclinic.training import losses
        from mmclinic.models import DualEncoder

        keras.utils.set_random_seed(0)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = DualEncoder(image_size=32, vocab_size=50, max_length=12, image_widths=(4, 8), text_layers=1,
                                text_hidden=16, text_heads=2, text_intermediate=32, embed_dim=8)
            model.build_all()
        rng = np.random.default_rng(0)
        n = 8
        images = rng.random((n, 32, 32, 1)).astype("float32")
        ids = rng.integers(5, 50, (n, 12)).astype("int32")
        mask = np.ones((n, 12), bool)
        keys = np.array([1, 2, 3, 4, 5, 6, 7, 1], "int64")  # two identical reports: multi-positive
        variables = model.trainable_variables

        def loss_of(img_in, ids_in, mask_in, key_in, gather):
            img = model.encode_image(img_in, training=False)
            txt = model.encode_text(ids_in, mask_in, training=False)
            if gather:
                img, txt, key_in = losses.gather_replicas(img, txt, key_in)
            targets = losses.same_key_targets(key_in)
            return (losses.clip_loss(img, txt, model.logit_scale, targets),
                    losses.sigmoid_loss(img, txt, model.logit_scale, model.logit_bias, targets))

        def replica_fn(batch):
            with tf.GradientTape() as tape:
                clip, sig = loss_of(batch["image"], batch["ids"], batch["mask"], batch["key"], True)
                share = (clip + sig) / strategy.num_replicas_in_sync
            grads = tape.gradient(share, variables)
            return clip, sig, [tf.convert_to_tensor(g) if g is not None else tf.zeros_like(v)
                               for g, v in zip(grads, variables)]

        ds = tf.data.Dataset.from_tensor_slices({"image": images, "ids": ids, "mask": mask, "key": keys}).batch(n)
        batch = next(iter(strategy.experimental_distribute_dataset(ds)))
        clip_r, sig_r, grads_r = strategy.run(tf.function(replica_fn), args=(batch,))
        local = strategy.experimental_local_results
        shapes = [tuple(x.shape) for x in local(batch["image"])]
        clip_multi = [float(x) for x in local(clip_r)]
        sig_multi = [float(x) for x in local(sig_r)]
        grad_multi = [sum(np.asarray(g) for g in local(gr)) for gr in grads_r]

        with tf.GradientTape() as tape:  # one device, the whole batch
            clip1, sig1 = loss_of(*(tf.constant(a) for a in (images, ids, mask, keys)), False)
            total = clip1 + sig1
        grads1 = [np.asarray(tf.convert_to_tensor(g)) if g is not None else np.zeros(v.shape) for g, v in
                  zip(tape.gradient(total, variables), variables)]
        gdiff = max(float(np.max(np.abs(a - b))) for a, b in zip(grad_multi, grads1))
        gscale = max(float(np.max(np.abs(b))) for b in grads1)
        # Everything but the match head (not in these losses) and BERT's unused pooler learns.
        zero = [v.path for v, g in zip(variables, grad_multi) if not np.any(g)]
        nonzero = len(variables) - len([p for p in zero if "match" not in p and "pooled_dense" not in p])
        print("RESULT", json.dumps({"shapes": shapes, "clip_multi": clip_multi, "clip1": float(clip1),
                                     "sig_multi": sig_multi, "sig1": float(sig1), "gdiff": gdiff,
                                     "gscale": gscale, "nonzero": nonzero, "nvars": len(variables), "zero": zero}))
    """)
    res = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert res["shapes"] == [[4, 32, 32, 1], [4, 32, 32, 1]]  # each replica holds half the batch
    for kind in ("clip", "sig"):
        assert all(v == pytest.approx(res[f"{kind}1"], rel=1e-5, abs=1e-6) for v in res[f"{kind}_multi"]), res
    assert res["gdiff"] <= 1e-5 * max(1.0, res["gscale"]), res
    assert res["nonzero"] == res["nvars"], res["zero"]  # gradients reach both towers through the gather


def test_mirrored_strategy_trains_on_two_devices(dataset, tmp_path):
    """`train.strategy: mirrored` over two logical CPU devices (a fresh process: collective keys
    of an earlier strategy in the same process would clash)."""
    out = _run(f"""
        import json
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from mmclinic.config import load_config
        from mmclinic.training.loop import train
        cfg = load_config({TINY!r}, ["train.strategy=mirrored", "train.steps=4", "train.batch_size=8",
                                    "train.log_every=2", "train.eval_every=100", "train.checkpoint_every=4"])
        r = train(cfg, {str(dataset)!r}, {str(tmp_path / "mirrored")!r}, quiet=True)
        print("TRAIN", json.dumps({{"step": r.step, "loss": r.final_loss, "run": r.mlflow_run_id}}))
    """)
    trained = json.loads(out.split("TRAIN ", 1)[1].splitlines()[0])
    assert trained["step"] == 4 and trained["loss"] == trained["loss"]  # finite
    import mlflow

    params = mlflow.MlflowClient().get_run(trained["run"]).data.params
    assert params["train.replicas"] == "2" and params["train.global_batch"] == "16"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_complete_and_agree_on_the_weights(dataset, tmp_path):
    """`train.strategy: multi_worker` with two worker processes on 127.0.0.1 sharing one workdir:
    only the chief writes the run; both end with the same weights."""
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    run = tmp_path / "run"
    code = f"""
        import json, os
        from mmclinic.config import load_config
        from mmclinic.training.loop import train
        cfg = load_config({TINY!r}, ["train.strategy=multi_worker", "train.steps=10", "train.batch_size=8",
                                    "train.log_every=5", "train.eval_every=100", "train.checkpoint_every=5",
                                    "train.deterministic=true", "data.deterministic=true"])
        r = train(cfg, {str(dataset)!r}, {str(run)!r}, quiet=True)
        idx = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        with open({str(tmp_path)!r} + f"/worker{{idx}}.json", "w") as fh:
            json.dump({{"step": r.step, "sha": r.weights_sha256, "loss": r.final_loss, "run_id": r.mlflow_run_id}}, fh)
    """
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), "TF_CONFIG": tf_config}
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(log[-4000:] for log in logs)
    w0, w1 = (json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2))
    assert w0["step"] == w1["step"] == 10
    assert w0["sha"] == w1["sha"] and len(w0["sha"]) == 64
    assert w0["run_id"] and not w1["run_id"]  # only the chief tracks
    assert list((run / "checkpoints").glob("ckpt-10*")) and json.loads((run / "run.json").read_text())["step"] == 10
    assert not list(run.glob("workertemp_*"))  # the other worker's scratch space is gone
