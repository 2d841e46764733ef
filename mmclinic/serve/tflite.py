"""TFLite float16 and int8 versions of an exported model's image tower, vetted like the float model.

``tf.lite.TFLiteConverter`` works in TensorFlow 2.21 here once the tower's variables are frozen
into constants (converting a Keras 3 model's function with live variables fails in
calibration: ``READ_VARIABLE ... variable != nullptr``). The tower is converted from the
training run the model was exported from (the SavedModel's signatures take encoded image
bytes, which TFLite's builtin ops cannot decode): input float32 ``(N, S, S, 1)`` in [0, 1], as
:func:`mmclinic.data.preprocess.decode_image` gives, output the L2-normalised embedding.

int8 uses representative images from the validation split. On the test split the change in
image-to-text R@5 and in mismatch AUROC (match head on the quantised image embedding and the
float text embedding) against the float SavedModel is measured; a quantised model whose drop
exceeds ``export.max_quantization_drop`` is refused (not written). The figures go into
``assets.extra/tflite/quantization.json`` and a section of the model card; accepted models into
``assets.extra/tflite/image_tower_{float16,int8}.tflite``.

The text tower is not converted: its tokenizer is TF-Text ops and its encoder takes token ids
that the graph computes, so a TFLite text tower would need the tokenizer outside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.artifacts import DatasetDir, ExportedModel, RunDir
from mmclinic.config import TFLITE_MODES as MODES


def _decode(png: list[bytes], size: int) -> np.ndarray:
    import tensorflow as tf

    from mmclinic.data.preprocess import decode_image

    return np.stack([decode_image(tf.constant(p), size).numpy() for p in png]).astype(np.float32)


def convert_image_tower(model: Any, size: int, mode: str, representative: np.ndarray | None = None) -> bytes:
    """The image tower as TFLite flatbuffer bytes (``mode``: float32, float16 or int8)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32, name="image")])
    def tower(image):
        return {"image_emb": model.encode_image(image, training=False)}

    frozen = convert_variables_to_constants_v2(tower.get_concrete_function())
    conv = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    if mode == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 needs representative images")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([representative[i:i + 1]] for i in range(len(representative)))
    elif mode != "float32":
        raise ValueError(f"unknown mode {mode!r}")
    return conv.convert()


def run_tflite(flatbuffer: bytes, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, float]:
    """(embeddings, seconds per image) of a converted tower."""
    import tensorflow as tf

    interp = tf.lite.Interpreter(model_content=flatbuffer)
    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    parts, t0 = [], time.perf_counter()
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        interp.resize_tensor_input(inp, list(chunk.shape))
        interp.allocate_tensors()
        interp.set_tensor(inp, chunk)
        interp.invoke()
        parts.append(interp.get_tensor(out).copy())
    return np.concatenate(parts), (time.perf_counter() - t0) / max(1, len(images))


def figures(image_emb: np.ndarray, text_emb: np.ndarray, match_logits: Any) -> dict[str, float]:
    """Image-to-text R@5 (each image's own report among the top 5) and mismatch AUROC (own report
    vs the next image's report)."""
    from sklearn.metrics import roc_auc_score

    n = len(image_emb)
    sims = image_emb @ text_emb.T
    rank = (sims > np.diag(sims)[:, None]).sum(axis=1)
    other = np.roll(np.arange(n), -1)
    pos, neg = match_logits(image_emb, text_emb), match_logits(image_emb, text_emb[other])
    auroc = roc_auc_score(np.r_[np.ones(n), np.zeros(n)], np.r_[pos, neg])
    return {"image_to_text_R@5": float(np.mean(rank < 5)), "mismatch_auroc": float(auroc)}


def quantize(version_dir: str | Path, run: str | Path, data: str | Path | None = None,
             max_drop: float | None = None, modes: tuple[str, ...] = MODES, model: Any = None,
             config: Any = None) -> dict[str, Any]:
    """Convert, measure and (when within ``max_drop``, default ``export.max_quantization_drop``)
    write the TFLite image towers (``modes``) of the exported version ``version_dir``; the figures.

    ``mmclinic export`` calls it on the staged version (before it is installed) with the run's
    model already loaded (``model``, ``config``) and ``modes`` from ``export.tflite``."""
    from mmclinic.eval.embedding import load_split
    from mmclinic.eval.scorers import SavedModelScorer, load_run_model

    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"TFLite modes must be among {', '.join(MODES)}; got {list(modes)}")
    exported = ExportedModel(version_dir)
    run_dir = RunDir.open(run, "RUN")
    if model is None or config is None:
        model, _, config = load_run_model(run_dir)
    max_drop = config.export.max_quantization_drop if max_drop is None else max_drop
    size = int(exported.metadata.get("image_size", config.data.image_size))
    ds = DatasetDir.open(data or run_dir.dataset_path, "--data")
    val, test = load_split(ds, "val"), load_split(ds, "test")
    scorer = SavedModelScorer(exported.path)
    text_emb = scorer.embed_texts(test.texts)
    t0 = time.perf_counter()
    float_emb = scorer.embed_images(test.png)
    float_s = (time.perf_counter() - t0) / max(1, len(test.png))
    base = figures(float_emb, text_emb, scorer.match_logits)
    test_images = _decode(test.png, size)
    representative = _decode(val.png[:200], size)
    out_dir = exported.tflite_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"split": "test", "instances": len(test.png), "max_quantization_drop": max_drop,
                              "float_savedmodel": {**base, "seconds_per_image": float_s}, "text_tower": "not converted "
                              "(TF-Text tokenizer ops in the graph)", "image_tower": {}}
    f32 = convert_image_tower(model, size, "float32")
    _, f32_s = run_tflite(f32, test_images)
    result["image_tower"]["float32"] = {"bytes": len(f32), "seconds_per_image": f32_s}
    for mode in modes:
        flat = convert_image_tower(model, size, mode, representative)
        emb, secs = run_tflite(flat, test_images)
        got = figures(emb, text_emb, scorer.match_logits)
        drop = {k: base[k] - got[k] for k in base}
        accepted = max(drop.values()) <= max_drop
        result["image_tower"][mode] = {**got, "drop": drop, "bytes": len(flat), "seconds_per_image": secs,
                                       "max_embedding_cosine_distance": float(np.max(1 - np.sum(
                                           emb / np.linalg.norm(emb, axis=1, keepdims=True) * float_emb, axis=1))),
                                       "accepted": accepted}
        if accepted:
            (out_dir / f"image_tower_{mode}.tflite").write_bytes(flat)
    (out_dir / "quantization.json").write_text(json.dumps(result, indent=2) + "\n")
    _card(exported, result)
    return result


def _card(exported: ExportedModel, r: dict[str, Any]) -> None:
    b = r["float_savedmodel"]
    rows = [f"| float SavedModel | {b['image_to_text_R@5']:.3f} | {b['mismatch_auroc']:.3f} | - | - | "
            f"{b['seconds_per_image'] * 1000:.2f} |"]
    for mode in (m for m in MODES if m in r["image_tower"]):
        m = r["image_tower"][mode]
        rows.append(f"| TFLite {mode} image tower | {m['image_to_text_R@5']:.3f} ({-m['drop']['image_to_text_R@5']:+.3f})"
                    f" | {m['mismatch_auroc']:.3f} ({-m['drop']['mismatch_auroc']:+.3f}) | {m['bytes'] / 1024:.0f} KiB"
                    f" | {'written' if m['accepted'] else 'REFUSED'} | {m['seconds_per_image'] * 1000:.2f} |")
    section = (f"\n## TFLite (test split, {r['instances']} pairs; refused when a figure drops by more than "
               f"{r['max_quantization_drop']})\n| model | image-to-text R@5 | mismatch AUROC | size | status | ms/image |\n"
               "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    card = exported.model_card_path.read_text() if exported.model_card_path.is_file() else ""
    card = card.split("\n## TFLite (")[0].rstrip("\n") + "\n"
    exported.model_card_path.write_text(card + section)
