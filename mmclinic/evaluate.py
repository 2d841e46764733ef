"""``mmclinic evaluate``: retrieval and mismatch detection with patient-clustered intervals.

Works on a training run folder (rebuilds the model from its config, vocabulary
and latest checkpoint) or on an exported SavedModel (through its signatures), so
a model is scored the same way before and after export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmclinic import metrics
from mmclinic.config import EvalConfig, ExperimentConfig, config_from_dict, load_config
from mmclinic.errors import UsageError

MIN_SLICE = 10
MIN_EVAL = 3


class Scorer(Protocol):
    def embed_images(self, png: list[bytes]) -> np.ndarray: ...
    def embed_texts(self, texts: list[str]) -> np.ndarray: ...
    def match_logits(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray: ...


class RunScorer:
    """Scores with the Keras model of a training run."""

    def __init__(self, run: str | Path, model: Any = None, tokenizer: Any = None,
                 config: ExperimentConfig | None = None) -> None:
        self.run = Path(run)
        if model is None:
            model, tokenizer, config = load_run_model(self.run)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        import tensorflow as tf

        from mmclinic.data.preprocess import decode_image

        size = config.data.image_size
        spec = [tf.TensorSpec([None], tf.string)]
        self._img = tf.function(lambda b: self.model.encode_image(
            tf.map_fn(lambda x: decode_image(x, size), b, fn_output_signature=tf.float32), training=False),
            input_signature=spec)
        self._txt = tf.function(lambda t: self.model.encode_text(*self.tokenizer(t), training=False),
                                input_signature=spec)

    def embed_images(self, png: list[bytes]) -> np.ndarray:
        return _batched(lambda b: self._img(tf_strings(b)).numpy(), png)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return _batched(lambda b: self._txt(tf_strings(b)).numpy(), texts)

    def match_logits(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.match_logits(image_emb, text_emb))


class SavedModelScorer:
    """Scores with an exported SavedModel through its signatures."""

    def __init__(self, model_dir: str | Path) -> None:
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  (registers the tokenizer's ops)

        self.loaded = tf.saved_model.load(str(model_dir))
        self.sig = self.loaded.signatures
        self._tf = tf

    def embed_images(self, png: list[bytes]) -> np.ndarray:
        f = self.sig["embed_image"]
        return _batched(lambda b: f(image_bytes=self._tf.constant(b))["image_emb"].numpy(), png)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        f = self.sig["embed_text"]
        return _batched(lambda b: f(report_text=self._tf.constant(b))["text_emb"].numpy(), texts)

    def match_logits(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        f = self.sig["match_embeddings"]
        return f(image_emb=self._tf.constant(image_emb, self._tf.float32),
                 text_emb=self._tf.constant(text_emb, self._tf.float32))["match_logit"].numpy()


def tf_strings(items: list) -> Any:
    import tensorflow as tf

    return tf.constant(list(items), dtype=tf.string)


def _batched(fn, items: list, size: int = 64) -> np.ndarray:
    outs = [fn(items[i:i + size]) for i in range(0, len(items), size)]
    return np.concatenate(outs, 0) if outs else np.zeros((0, 0), np.float32)


def load_run_model(run: str | Path):
    """(model, tokenizer, config) of a training run, weights from its latest checkpoint."""
    import tensorflow as tf

    from mmclinic.models.dual_encoder import from_model_config
    from mmclinic.tokenizer import ReportTokenizer, load_vocabulary

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UsageError(f"{run}: not a training run (no config.yaml)")
    config = load_config(run / "config.yaml")
    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    if latest is None:
        raise UsageError(f"{run}: the run has no checkpoint yet (train it first)")
    vocab = load_vocabulary(run / "vocab.txt")
    model = from_model_config(config.model, config.data.image_size, config.data.max_length, len(vocab))
    model.build_all()
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return model, ReportTokenizer(vocab, config.data.max_length), config


@dataclass
class SplitData:
    png: list[bytes]
    texts: list[str]
    meta: Any  # pandas DataFrame, one row per image


def load_split(dataset: str | Path, split: str) -> SplitData:
    """All images of a split with their report text, from the dataset folder."""
    import pandas as pd

    dataset = Path(dataset)
    if not (dataset / "manifest.parquet").is_file():
        raise UsageError(f"--data {dataset}: not a dataset folder (no manifest.parquet)")
    manifest = pd.read_parquet(dataset / "manifest.parquet")
    reports = pd.read_parquet(dataset / "reports.parquet")
    rows = manifest[manifest["split"] == split].sort_values("image_id").reset_index(drop=True)
    rows = rows.merge(reports[["report_id", "text"]], on="report_id", how="left")
    png = [(dataset / p).read_bytes() for p in rows["path"]]
    return SplitData(png=png, texts=rows["text"].fillna("").tolist(), meta=rows)


@dataclass
class Embedded:
    image_emb: np.ndarray
    report_emb: np.ndarray  # one per unique report
    report_ids: list[str]
    image_report: np.ndarray  # index into report_emb per image
    meta: Any
    texts: list[str]


def embed(scorer: Scorer, data: SplitData) -> Embedded:
    report_ids = sorted(set(data.meta["report_id"]))
    index = {r: i for i, r in enumerate(report_ids)}
    text_of = dict(zip(data.meta["report_id"], data.texts))
    texts = [text_of[r] for r in report_ids]
    return Embedded(
        image_emb=scorer.embed_images(data.png), report_emb=scorer.embed_texts(texts), report_ids=report_ids,
        image_report=np.array([index[r] for r in data.meta["report_id"]]), meta=data.meta, texts=texts)


def mismatch_set(emb: Embedded, seed: int) -> dict[str, np.ndarray]:
    """A fixed, seeded set of pairs: each image with its own report and with corruptions.

    Kinds: ``other_patient`` (a report of a different patient) and ``laterality_swap``
    (its own report with left and right exchanged, where it names a side).
    """
    from mmclinic.data.preprocess import swap_laterality_py

    rng = np.random.default_rng(seed)
    patients = emb.meta["patient_key"].to_numpy()
    n = len(patients)
    img_idx, txt_src, kinds = [], [], []
    swapped_texts: list[str] = []
    for i in range(n):
        img_idx.append(i); txt_src.append(("report", emb.image_report[i])); kinds.append("match")
        others = np.flatnonzero(patients != patients[i])
        if others.size:
            j = int(rng.choice(others))
            img_idx.append(i); txt_src.append(("report", emb.image_report[j])); kinds.append("other_patient")
        text = emb.texts[emb.image_report[i]]
        swapped = swap_laterality_py(text)
        if swapped != text:
            swapped_texts.append(swapped)
            img_idx.append(i); txt_src.append(("swapped", len(swapped_texts) - 1)); kinds.append("laterality_swap")
    return {"img": np.array(img_idx), "src": txt_src, "kind": np.array(kinds), "swapped_texts": swapped_texts}


def mismatch_scores(scorer: Scorer, emb: Embedded, pairs: dict[str, Any]) -> np.ndarray:
    """Mismatch score per pair: the negated match logit (higher means more likely mismatched)."""
    swapped_emb = scorer.embed_texts(pairs["swapped_texts"]) if pairs["swapped_texts"] else None
    txt = np.stack([emb.report_emb[k] if src == "report" else swapped_emb[k] for src, k in pairs["src"]])
    return -scorer.match_logits(emb.image_emb[pairs["img"]], txt)


def _figure(stat, n: int, clusters, n_boot: int, seed: int) -> dict[str, Any]:
    if n < MIN_EVAL:
        return metrics.with_ci(None, None, f"needs at least {MIN_EVAL} items, got {n}")
    value = stat(np.arange(n))
    if value is None:
        return metrics.with_ci(None, None)
    return metrics.with_ci(value, metrics.bootstrap_ci(stat, n, clusters, n_boot, seed) if n_boot else None,
                           None if n_boot else "bootstrap disabled")


def compute_report(scorer: Scorer, data: SplitData, boot: int = 200, seed: int = 0,
                   threshold: float | None = None, target_sensitivity: float | None = None) -> dict[str, Any]:
    """Every figure of REPORT.json for one split.

    ``threshold``: an operating point chosen elsewhere (the validation split), reported here.
    ``target_sensitivity``: also choose the threshold reaching it on this split.
    """
    if len(data.png) == 0:
        raise UsageError("the evaluation split is empty")
    emb = embed(scorer, data)
    patients = emb.meta["patient_key"].to_numpy()
    sim = emb.image_emb @ emb.report_emb.T  # (images, reports)
    i2t = metrics.ranks(sim, [[r] for r in emb.image_report])
    t2i = metrics.ranks(sim.T, [np.flatnonzero(emb.image_report == r) for r in range(len(emb.report_ids))])
    report_patient = np.array([patients[np.flatnonzero(emb.image_report == r)[0]]
                               for r in range(len(emb.report_ids))])

    def retrieval(r: np.ndarray, clusters: np.ndarray, pool: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in (1, 5, 10):
            out[f"R@{k}"] = _figure(lambda idx, k=k: float(np.mean(r[idx] <= k)), len(r), clusters, boot, seed)
            out[f"R@{k}"]["chance"] = min(1.0, k / pool)
        out["median_rank"] = _figure(lambda idx: float(np.median(r[idx])), len(r), clusters, boot, seed)
        out["mean_rank"] = _figure(lambda idx: float(np.mean(r[idx])), len(r), clusters, boot, seed)
        out["pool_size"] = pool
        out["queries"] = len(r)
        return out

    pairs = mismatch_set(emb, seed)
    mscore = mismatch_scores(scorer, emb, pairs)
    labels = (pairs["kind"] != "match").astype(int)
    pair_patients = patients[pairs["img"]]

    def mm_block(mask: np.ndarray) -> dict[str, Any]:
        lab, sc, cl = labels[mask], mscore[mask], pair_patients[mask]
        out = {
            "auroc": _figure(lambda idx: metrics.auroc(lab[idx], sc[idx]), len(lab), cl, boot, seed),
            "auprc": _figure(lambda idx: metrics.auprc(lab[idx], sc[idx]), len(lab), cl, boot, seed),
            "fpr_at_95tpr": _figure(lambda idx: metrics.fpr_at_tpr(lab[idx], sc[idx]), len(lab), cl, boot, seed),
            "pairs": int(mask.sum()), "mismatched": int(lab.sum()),
        }
        return out

    mismatch = mm_block(np.ones(len(labels), bool))
    mismatch["by_corruption"] = {
        kind: mm_block((pairs["kind"] == "match") | (pairs["kind"] == kind))
        for kind in ("other_patient", "laterality_swap") if (pairs["kind"] == kind).any()
    }
    if target_sensitivity is not None:
        mismatch["threshold_at_target_sensitivity"] = {
            "target": target_sensitivity,
            "threshold": metrics.threshold_at_tpr(labels, mscore, target_sensitivity)}
    if threshold is not None:
        flagged = mscore >= threshold
        mismatch["operating_point"] = {
            "threshold": threshold,
            "sensitivity": float(flagged[labels == 1].mean()) if (labels == 1).any() else None,
            "specificity": float((~flagged[labels == 0]).mean()) if (labels == 0).any() else None,
        }

    slices: dict[str, Any] = {}
    for column in ("view", "modality", "sex", "age_band", "manufacturer"):
        for value, idx in emb.meta.groupby(column).indices.items():
            key = f"{column}={value}"
            if len(idx) < MIN_SLICE:
                slices[key] = {"images": int(len(idx)), "not_computed": f"fewer than {MIN_SLICE} images"}
                continue
            sub = np.isin(pairs["img"], idx)
            lab, sc, cl = labels[sub], mscore[sub], pair_patients[sub]
            slices[key] = {
                "images": int(len(idx)),
                "image_to_text_R@5": _figure(lambda j, idx=idx: float(np.mean(i2t[idx][j] <= 5)), len(idx),
                                             patients[idx], boot, seed),
                "mismatch_auroc": _figure(lambda j, lab=lab, sc=sc: metrics.auroc(lab[j], sc[j]), len(lab), cl,
                                          boot, seed),
            }
    return {
        "retrieval": {"image_to_text": retrieval(i2t, patients, len(emb.report_ids)),
                      "text_to_image": retrieval(t2i, report_patient, len(patients))},
        "mismatch": mismatch,
        "slices": slices,
        "counts": {"images": len(patients), "reports": len(emb.report_ids),
                   "patients": int(len(set(patients)))},
        "bootstrap": {"samples": boot, "seed": seed, "unit": "patient"},
    }


def operating_threshold(scorer: Scorer, dataset: str | Path, target_sensitivity: float, seed: int) -> float | None:
    """Mismatch-score threshold reaching ``target_sensitivity`` on the validation split."""
    try:
        data = load_split(dataset, "val")
    except UsageError:
        return None
    if not data.png:
        return None
    emb = embed(scorer, data)
    pairs = mismatch_set(emb, seed)
    sc = mismatch_scores(scorer, emb, pairs)
    return metrics.threshold_at_tpr(pairs["kind"] != "match", sc, target_sensitivity)


def _target_config(target: Path, is_saved_model: bool) -> tuple[ExperimentConfig | None, dict[str, Any]]:
    """The config a run or exported model was trained with, and an export's metadata."""
    if is_saved_model:
        meta_path = target / "assets.extra" / "mmclinic.json"
        if not meta_path.is_file():
            return None, {}
        meta = json.loads(meta_path.read_text())
        return config_from_dict(meta.get("config", {})), meta
    if (target / "config.yaml").is_file():
        return load_config(target / "config.yaml"), {}
    return None, {}


def evaluate(target: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
             scorer: Scorer | None = None) -> dict[str, Any]:
    """Score a run folder or exported model on ``split`` of ``data``; write REPORT.json.

    The operating threshold is the exported model's own (chosen on validation data when it
    was vetted) or, for a run, chosen on the validation split of ``data``.
    """
    target, data = Path(target), Path(data)
    if not target.exists():
        raise UsageError(f"RUN|MODEL_DIR not found: {target}")
    if not data.is_dir():
        raise UsageError(f"--data not found: {data}")
    if split not in ("train", "val", "test"):
        raise UsageError(f"--split must be train, val or test, got {split!r}")
    is_saved_model = (target / "saved_model.pb").is_file()
    config, export_meta = _target_config(target, is_saved_model)
    ev = config.eval if config else EvalConfig()
    if scorer is None:
        scorer = SavedModelScorer(target) if is_saved_model else RunScorer(target)
    split_data = load_split(data, split)
    if not split_data.png:
        raise UsageError(f"--split {split}: the split of {data} is empty")
    if "mismatch_threshold" in export_meta:
        threshold = float(export_meta["mismatch_threshold"])
    else:
        threshold = operating_threshold(scorer, data, ev.target_sensitivity, ev.seed) if split != "val" else None
    report = compute_report(scorer, split_data, ev.bootstrap_samples, ev.seed, threshold)
    report["evaluated"] = {"target": target.name, "kind": "saved_model" if is_saved_model else "run",
                           "split": split, "dataset_version": _dataset_version(data)}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    if not is_saved_model and (target / "mlflow_run_id").is_file():
        _log_to_mlflow(target, report, split, out)
    return report


def _dataset_version(data: Path) -> str:
    try:
        return json.loads((data / "dataset.json").read_text())["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


def headline(report: dict[str, Any]) -> dict[str, float]:
    """Flat figures for trackers and consoles."""
    out = {}
    for direction in ("image_to_text", "text_to_image"):
        for k, v in report["retrieval"][direction].items():
            if isinstance(v, dict) and v.get("value") is not None:
                out[f"{direction}.{k}"] = v["value"]
    for k in ("auroc", "auprc", "fpr_at_95tpr"):
        v = report["mismatch"][k]["value"]
        if v is not None:
            out[f"mismatch.{k}"] = v
    return out


def _log_to_mlflow(run: Path, report: dict[str, Any], split: str, out: Path | None) -> None:
    from mmclinic.tracking import MlflowRun

    mlrun = MlflowRun((run / "mlflow_run_id").read_text().strip())
    step = json.loads((run / "run.json").read_text()).get("step", 0) if (run / "run.json").is_file() else 0
    mlrun.log_metrics({f"eval.{split}.{k}": v for k, v in headline(report).items()}, step)
    if out is not None:
        mlrun.log_artifact(out, f"evaluation/{split}")
