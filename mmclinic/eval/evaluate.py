"""``mmclinic evaluate``: retrieval, mismatch detection, zero-shot classification and
calibration, with patient-clustered bootstrap intervals, slices and failure cases.

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

from mmclinic.eval import metrics
from mmclinic.config import EvalConfig, ExperimentConfig, config_from_dict, load_config
from mmclinic.errors import UsageError

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
    from mmclinic.text.tokenizer import ReportTokenizer, load_vocabulary

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


def report_findings(emb: Embedded) -> tuple[list[frozenset[str]], str]:
    """The findings each report states, and where they came from.

    From the manifest's ``labels`` column where it holds list-valued keys (``findings``,
    ``problems``: their union, lower case), otherwise from the report text by the rules of
    :func:`mmclinic.text.corruptions.positive_findings`.
    """
    from mmclinic.text.corruptions import positive_findings
    from mmclinic.text.labels import parse_labels

    out: list[frozenset[str] | None] = [None] * len(emb.report_ids)
    if "labels" in emb.meta.columns:
        for obj, r in zip(parse_labels(emb.meta["labels"].tolist()), emb.image_report):
            lists = {k: v for k, v in (obj or {}).items() if isinstance(v, list)}
            if lists and out[r] is None:
                out[r] = frozenset(f"{k}:{str(x).lower()}" for k, v in lists.items() for x in v)
    from_labels = sum(x is not None for x in out)
    final = [x if x is not None else positive_findings(t) for x, t in zip(out, emb.texts)]
    if from_labels == len(out):
        source = "manifest labels"
    elif from_labels == 0:
        source = "report text rules"
    else:
        source = f"manifest labels ({from_labels} reports), report text rules ({len(out) - from_labels} reports)"
    return final, source


def mismatch_set(emb: Embedded, seed: int, findings: list[frozenset[str]] | None = None,
                 kinds: tuple[str, ...] | None = None):
    """A fixed, seeded :class:`~mmclinic.text.corruptions.CorruptionSet` of the split (see that module)."""
    from mmclinic.text.corruptions import KINDS, build_corruption_set

    if findings is None:
        findings, _ = report_findings(emb)
    studies = emb.meta["study_key"].to_numpy() if "study_key" in emb.meta.columns else emb.meta["report_id"].to_numpy()
    report_study = [None] * len(emb.report_ids)
    for r, st in zip(emb.image_report, studies):
        report_study[r] = st if report_study[r] is None else report_study[r]
    return build_corruption_set(emb.texts, emb.image_report, emb.meta["patient_key"].to_numpy(), report_study,
                                findings, seed, kinds or KINDS)


def pair_logits(scorer: Scorer, emb: Embedded, cset) -> np.ndarray:
    """Match logit of every pair of a corruption set (higher: more likely the report belongs)."""
    known = {t: i for i, t in enumerate(emb.texts)}
    new = sorted({t for t in cset.text if t not in known})
    new_emb = scorer.embed_texts(new) if new else np.zeros((0, emb.report_emb.shape[1]), np.float32)
    new_index = {t: i for i, t in enumerate(new)}
    txt = np.stack([emb.report_emb[known[t]] if t in known else new_emb[new_index[t]] for t in cset.text])
    return np.asarray(scorer.match_logits(emb.image_emb[cset.image], txt), dtype=np.float64).reshape(-1)


def _figure(stat, n: int, clusters, n_boot: int, seed: int, reason: str | None = None) -> dict[str, Any]:
    """A figure with its patient-bootstrap interval, or marked not computed with the reason."""
    if n < MIN_EVAL:
        return metrics.with_ci(None, None, f"needs at least {MIN_EVAL} items, got {n}")
    value = stat(np.arange(n))
    if value is None or not np.isfinite(value):
        return metrics.with_ci(None, None, reason)
    return metrics.with_ci(value, metrics.bootstrap_ci(stat, n, clusters, n_boot, seed) if n_boot else None,
                           None if n_boot else "bootstrap disabled")


def _retrieval_block(r: np.ndarray, clusters: np.ndarray, pool: int, n_correct: np.ndarray, boot: int,
                     seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in (1, 5, 10):
        out[f"R@{k}"] = _figure(lambda idx, k=k: float(np.mean(r[idx] <= k)), len(r), clusters, boot, seed)
        out[f"R@{k}"]["chance"] = metrics.chance_recall_at_k(pool, n_correct, k)
    out["median_rank"] = _figure(lambda idx: float(np.median(r[idx])), len(r), clusters, boot, seed)
    out["mean_rank"] = _figure(lambda idx: float(np.mean(r[idx])), len(r), clusters, boot, seed)
    out["mean_rank"]["chance"] = metrics.chance_mean_rank(pool, n_correct)
    out["pool_size"] = int(pool)
    out["queries"] = int(len(r))
    return out


def _mismatch_block(labels: np.ndarray, scores: np.ndarray, clusters: np.ndarray, boot: int, seed: int,
                    fpr_tpr: float = 0.95) -> dict[str, Any]:
    both = "needs both true and mismatched pairs"
    n_true, n_bad = int((labels == 0).sum()), int((labels == 1).sum())
    if min(n_true, n_bad) < MIN_EVAL:
        small = f"needs at least {MIN_EVAL} true and {MIN_EVAL} mismatched pairs, got {n_true} and {n_bad}"
        return {k: metrics.with_ci(None, None, small) for k in ("auroc", "auprc", "fpr_at_95tpr")} | {
            "pairs": int(len(labels)), "mismatched": n_bad,
            "prevalence": float(labels.mean()) if len(labels) else None}
    return {
        "auroc": _figure(lambda i: metrics.auroc(labels[i], scores[i]), len(labels), clusters, boot, seed, both),
        "auprc": _figure(lambda i: metrics.auprc(labels[i], scores[i]), len(labels), clusters, boot, seed, both),
        "fpr_at_95tpr": _figure(lambda i: metrics.fpr_at_tpr(labels[i], scores[i], fpr_tpr), len(labels), clusters,
                                boot, seed, both),
        "pairs": int(len(labels)), "mismatched": int(labels.sum()),
        "prevalence": float(labels.mean()) if len(labels) else None,
    }


def compute_report(scorer: Scorer, data: SplitData, boot: int = 200, seed: int = 0,
                   threshold: float | None = None, target_sensitivity: float | None = None, *,
                   config: EvalConfig | None = None, temperature: float | None = None,
                   temperature_note: str | None = None, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of REPORT.json for one split.

    ``threshold``: an operating point chosen elsewhere (the validation split), reported here.
    ``target_sensitivity``: also choose the threshold reaching it on this split.
    ``config``: prompt templates, minimum sizes and bins (defaults: :class:`EvalConfig`).
    ``temperature``: a match-logit temperature fitted elsewhere (validation); ECE is reported
    before and after it (``temperature_note`` says why it is missing when None).
    ``details``: when a dict, filled with the per-item arrays behind the figures (plots and
    failure tables use them).
    """
    from mmclinic.eval import calibration
    from mmclinic.text.corruptions import KINDS, normalize_report

    ev = config or EvalConfig()
    if len(data.png) == 0:
        raise UsageError("the evaluation split is empty")
    emb = embed(scorer, data)
    patients = emb.meta["patient_key"].to_numpy()
    n_img, n_rep = len(patients), len(emb.report_ids)
    images_of = [np.flatnonzero(emb.image_report == r) for r in range(n_rep)]
    report_patient = np.array([patients[ix[0]] for ix in images_of])

    # Retrieval on every instance: each image against every report of the split.
    sim = emb.image_emb @ emb.report_emb.T  # (images, reports)
    i2t = metrics.ranks(sim, [[r] for r in emb.image_report])
    t2i = metrics.ranks(sim.T, images_of)
    n_t2i = np.array([len(ix) for ix in images_of])
    # De-duplicated pool (CXR-CLIP protocol): candidate reports unique by normalised text.
    norm = [normalize_report(t) for t in emb.texts]
    first: dict[str, int] = {}
    for r, x in enumerate(norm):
        first.setdefault(x, r)
    uniq = list(first)
    gindex = {u: g for g, u in enumerate(uniq)}
    gid = np.array([gindex[x] for x in norm])
    rep_of_group = np.array([first[u] for u in uniq])
    g_emb = emb.report_emb[rep_of_group]
    img_gid = gid[emb.image_report]
    g_images = [np.flatnonzero(img_gid == g) for g in range(len(uniq))]
    g_patient = np.array([patients[ix[0]] for ix in g_images])
    sim_g = emb.image_emb @ g_emb.T
    i2t_d = metrics.ranks(sim_g, [[g] for g in img_gid])
    t2i_d = metrics.ranks(sim_g.T, g_images)
    # Report-equivalent: a retrieved report with the same normalised text or the same findings is a hit.
    findings, findings_source = report_findings(emb)
    f_id = {f: i for i, f in enumerate(sorted(set(findings), key=lambda x: sorted(x)))}
    fid = np.array([f_id[f] for f in findings])
    equiv = (gid[:, None] == gid[None, :]) | (fid[:, None] == fid[None, :])
    eq_reports = [np.flatnonzero(equiv[r]) for r in range(n_rep)]
    i2t_e = metrics.ranks(sim, [eq_reports[r] for r in emb.image_report])
    eq_images = [np.flatnonzero(equiv[r][emb.image_report]) for r in range(n_rep)]
    t2i_e = metrics.ranks(sim.T, eq_images)

    retrieval = {
        "image_to_text": _retrieval_block(i2t, patients, n_rep, np.ones(n_img), boot, seed),
        "text_to_image": _retrieval_block(t2i, report_patient, n_img, n_t2i, boot, seed),
        "dedup": {
            "protocol": "candidate reports unique by normalised text; an image's target is its report's text; "
                        "text-to-image queries are the unique texts, every image with that text a hit",
            "image_to_text": _retrieval_block(i2t_d, patients, len(uniq), np.ones(n_img), boot, seed),
            "text_to_image": _retrieval_block(t2i_d, g_patient, n_img, np.array([len(g) for g in g_images]), boot,
                                              seed),
        },
        "report_equivalent": {
            "criterion": "a retrieved report with the same normalised text or the same set of findings counts",
            "findings_source": findings_source,
            "image_to_text": _retrieval_block(i2t_e, patients, n_rep,
                                              np.array([len(eq_reports[r]) for r in emb.image_report]), boot, seed),
            "text_to_image": _retrieval_block(t2i_e, report_patient, n_img,
                                              np.array([len(x) for x in eq_images]), boot, seed),
        },
        "pools": {
            "instance": {"images": n_img, "reports": n_rep},
            "dedup": {"images": n_img, "unique_reports": len(uniq), "duplicate_reports": n_rep - len(uniq)},
        },
    }

    # Mismatch detection on the fixed, seeded corruption set.
    cset = mismatch_set(emb, seed, findings)
    logits = pair_logits(scorer, emb, cset)
    mscore = -logits
    labels = cset.label
    pair_patients = patients[cset.image]
    mismatch = _mismatch_block(labels, mscore, pair_patients, boot, seed)
    mismatch["score"] = "negated match logit (higher: more likely mismatched)"
    mismatch["by_corruption"] = {}
    for kind in KINDS:
        if cset.produced.get(kind, 0) == 0:
            mismatch["by_corruption"][kind] = {
                "not_computed": f"no pair of this kind applies to this split ({cset.skipped.get(kind, 0)} skipped)",
                "pairs": 0, "skipped": cset.skipped.get(kind, 0)}
            continue
        m = (cset.kind == "match") | (cset.kind == kind)
        block = _mismatch_block(labels[m], mscore[m], pair_patients[m], boot, seed)
        block["skipped"] = cset.skipped.get(kind, 0)
        mismatch["by_corruption"][kind] = block
    mismatch["corruption_set"] = {"seed": seed, "true_pairs": int((labels == 0).sum()),
                                  "produced": dict(cset.produced), "skipped": dict(cset.skipped),
                                  "findings_source": findings_source}
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
            "sensitivity_by_corruption": {k: float(flagged[cset.kind == k].mean()) for k in KINDS
                                          if (cset.kind == k).any()},
        }

    # Calibration of the match probability sigmoid(logit) against "is the true pair".
    y_match = 1 - labels
    bins = ev.calibration_bins
    probs = calibration.sigmoid(logits)

    def cal_block(p: np.ndarray, t: float) -> dict[str, Any]:
        return {
            "ece": _figure(lambda i: calibration.ece(y_match[i], p[i], bins), len(p), pair_patients, boot, seed),
            "brier": _figure(lambda i: float(np.mean((p[i] - y_match[i]) ** 2)), len(p), pair_patients, boot, seed),
            "nll": calibration.nll(y_match, logits, t) if len(p) else None,
            "reliability": calibration.reliability(y_match, p, bins),
        }

    cal = {"score": "sigmoid(match_logit); outcome 1 for the true pair, 0 for a corrupted one",
           "binning": f"{bins} equal-width bins on [0, 1]; ECE = sum over bins of (pairs in bin / pairs) * "
                      "|fraction of true pairs - mean score|", "pairs": int(len(probs)), **cal_block(probs, 1.0)}
    if temperature is not None and np.isfinite(temperature) and temperature > 0:
        probs_t = calibration.sigmoid(logits / temperature)
        cal["temperature_scaling"] = {"temperature": float(temperature), "fitted_on": "val",
                                      **cal_block(probs_t, float(temperature))}
    else:
        probs_t = None
        cal["temperature_scaling"] = {"not_computed": temperature_note or "no temperature was fitted"}

    zero_shot = _zero_shot(scorer, emb, patients, ev, boot, seed)
    slices = _slices(emb, patients, i2t, cset, labels, mscore, y_match, probs, ev, boot, seed)

    if details is not None:
        details.update({
            "emb": emb, "i2t": i2t, "t2i": t2i, "i2t_dedup": i2t_d, "t2i_dedup": t2i_d,
            "sim": sim, "pools": {"i2t": n_rep, "t2i": n_img, "i2t_dedup": len(uniq), "t2i_dedup": n_img},
            "cset": cset, "logits": logits, "mismatch_score": mscore, "labels": labels,
            "probs": probs, "probs_scaled": probs_t, "y_match": y_match, "bins": bins,
            "patients": patients,
        })
    return {
        "retrieval": retrieval,
        "mismatch": mismatch,
        "calibration": cal,
        "zero_shot": zero_shot,
        "slices": slices,
        "counts": {"images": n_img, "reports": n_rep, "unique_report_texts": len(uniq),
                   "patients": int(len(set(patients)))},
        "bootstrap": {"samples": boot, "seed": seed, "unit": "patient", "interval": "percentile, 95%"},
    }


def _zero_shot(scorer: Scorer, emb: Embedded, patients: np.ndarray, ev: EvalConfig, boot: int,
               seed: int) -> dict[str, Any]:
    from mmclinic.eval import zeroshot
    from mmclinic.text.labels import parse_labels

    if "labels" not in emb.meta.columns:
        return {"not_computed": "the manifest has no 'labels' column"}
    labels = parse_labels(emb.meta["labels"].tolist())
    if not any(labels):
        return {"not_computed": "the manifest's 'labels' column holds no label object for this split"}
    tasks, skipped = zeroshot.build_tasks(labels, ev.zeroshot_min_positives, ev.zeroshot_positive_templates,
                                          ev.zeroshot_negative_templates, ev.zeroshot_class_templates)
    out: dict[str, Any] = {
        "label_source": "manifest column 'labels'",
        "score": "prompt-ensemble similarity: positive minus negative prompts (binary), "
                 "own class minus mean of other classes (one-vs-rest)",
        "templates": {"positive": list(ev.zeroshot_positive_templates),
                      "negative": list(ev.zeroshot_negative_templates),
                      "class": list(ev.zeroshot_class_templates)},
        "min_positives": ev.zeroshot_min_positives, "tasks": {}, "skipped": skipped,
    }
    cache: dict[str, np.ndarray] = {}

    def embed_texts(texts: list[str]) -> np.ndarray:
        todo = sorted({t for t in texts if t not in cache})
        if todo:
            for t, e in zip(todo, scorer.embed_texts(todo)):
                cache[t] = e
        return np.stack([cache[t] for t in texts])

    scored = []
    for task in tasks:
        known = np.flatnonzero(task.y >= 0)
        s = zeroshot.task_scores(emb.image_emb, task, embed_texts)[known]
        y, cl = task.y[known], patients[known]
        out["tasks"][task.name] = {
            "kind": task.kind, "positives": int(y.sum()), "negatives": int((y == 0).sum()),
            "auroc": _figure(lambda i, y=y, s=s: metrics.auroc(y[i], s[i]), len(y), cl, boot, seed,
                             "needs positives and negatives"),
            "prompts": {"positive": task.positive_prompts, "negative": task.negative_prompts[:6]},
        }
        scored.append((known, y, s))
    if not scored:
        out["macro_auroc"] = metrics.with_ci(None, None, "no label has enough positives and negatives")
        return out

    full = np.zeros((len(patients), len(scored)))
    lab = np.full((len(patients), len(scored)), -1)
    for j, (known, y, s) in enumerate(scored):
        full[known, j], lab[known, j] = s, y

    def macro(idx: np.ndarray) -> float | None:
        vals = []
        for j in range(len(scored)):
            m = lab[idx, j] >= 0
            v = metrics.auroc(lab[idx, j][m], full[idx, j][m]) if m.any() else None
            if v is not None:
                vals.append(v)
        return float(np.mean(vals)) if len(vals) == len(scored) else None

    out["macro_auroc"] = _figure(macro, len(patients), patients, boot, seed, "a label lost all its positives")
    out["macro_auroc"]["tasks"] = len(scored)
    return out


SLICE_COLUMNS = ("modality", "view", "laterality", "sex", "age_band", "manufacturer", "source_format")


def _slices(emb: Embedded, patients: np.ndarray, i2t: np.ndarray, cset, labels: np.ndarray, mscore: np.ndarray,
            y_match: np.ndarray, probs: np.ndarray, ev: EvalConfig, boot: int, seed: int) -> dict[str, Any]:
    from mmclinic.eval import calibration

    out: dict[str, Any] = {}
    min_size = ev.min_slice_size
    for column in SLICE_COLUMNS:
        if column not in emb.meta.columns:
            continue
        for value, idx in emb.meta.groupby(column, dropna=True).indices.items():
            key = f"{column}={value}"
            idx = np.asarray(idx)
            n_pat = int(len(set(patients[idx])))
            if len(idx) < min_size:
                out[key] = {"images": int(len(idx)), "patients": n_pat,
                            "not_computed": f"fewer than {min_size} images (eval.min_slice_size)"}
                continue
            sub = np.isin(cset.image, idx)
            lab, sc, cl, ym, pr = labels[sub], mscore[sub], patients[cset.image[sub]], y_match[sub], probs[sub]
            ri = i2t[idx]
            out[key] = {
                "images": int(len(idx)), "patients": n_pat,
                "image_to_text_R@1": _figure(lambda j, ri=ri: float(np.mean(ri[j] <= 1)), len(idx), patients[idx],
                                             boot, seed),
                "image_to_text_R@5": _figure(lambda j, ri=ri: float(np.mean(ri[j] <= 5)), len(idx), patients[idx],
                                             boot, seed),
                "mismatch_auroc": _figure(lambda j, lab=lab, sc=sc: metrics.auroc(lab[j], sc[j]), len(lab), cl,
                                          boot, seed, "needs both true and mismatched pairs"),
                "ece": _figure(lambda j, ym=ym, pr=pr: calibration.ece(ym[j], pr[j], ev.calibration_bins), len(pr),
                               cl, boot, seed),
            }
    return out


@dataclass
class ValidationReference:
    """What evaluation of another split takes from the validation split."""

    threshold: float | None
    temperature: float | None
    note: str | None = None


def validation_reference(scorer: Scorer, dataset: str | Path, ev: EvalConfig) -> ValidationReference:
    """Mismatch threshold for ``ev.target_sensitivity`` and match-logit temperature, from the validation split."""
    from mmclinic.eval import calibration

    try:
        data = load_split(dataset, "val")
    except UsageError as exc:
        return ValidationReference(None, None, f"no validation split: {exc}")
    if len(data.png) < MIN_EVAL:
        return ValidationReference(None, None, f"the validation split has {len(data.png)} images, needs {MIN_EVAL}")
    emb = embed(scorer, data)
    cset = mismatch_set(emb, ev.seed)
    logits = pair_logits(scorer, emb, cset)
    labels = cset.label
    return ValidationReference(metrics.threshold_at_tpr(labels, -logits, ev.target_sensitivity),
                               calibration.fit_temperature(1 - labels, logits),
                               None)


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


def artifact_paths(out: str | Path) -> dict[str, Path]:
    """Files written beside ``REPORT.json``: fixed names next to a file named ``REPORT.json``,
    prefixed by the report's stem otherwise (so two reports can share a folder)."""
    out = Path(out)
    prefix = "" if out.stem == "REPORT" else f"{out.stem}."
    base = out.parent
    return {"html": base / f"{prefix}report.html", "failure_parquet": base / f"{prefix}failure_cases.parquet",
            "failure_html": base / f"{prefix}failure_cases.html", "figures": base / f"{prefix}figures",
            "thumbnails": base / f"{prefix}failure_thumbnails"}


def evaluate(target: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
             scorer: Scorer | None = None) -> dict[str, Any]:
    """Score a run folder or exported model on ``split`` of ``data``; write REPORT.json.

    Beside ``out`` it also writes ``report.html`` (self-contained, with ROC, PR, recall@K and
    reliability plots), ``failure_cases.parquet`` / ``failure_cases.html`` (worst cases with
    thumbnails) and ``figures/*.png`` (see :func:`artifact_paths`). For a run, a copy of the
    report goes to ``RUN/eval/<split>/REPORT.json`` and ``RUN/eval/latest.json`` points at it
    (``mmclinic compare`` reads them).

    The operating threshold is the exported model's own (chosen on validation data when it
    was vetted) or, for a run, chosen on the validation split of ``data``. The match-logit
    temperature is fitted on the validation split of ``data``.
    """
    target, data = Path(target), Path(data)
    if not target.exists():
        raise UsageError(f"RUN|MODEL_DIR not found: {target}")
    if not data.is_dir():
        raise UsageError(f"--data not found: {data}")
    if split not in ("train", "val", "test"):
        raise UsageError(f"--split must be train, val or test, got {split!r}")
    is_saved_model = (target / "saved_model.pb").is_file()
    if not is_saved_model and not (target / "config.yaml").is_file():
        raise UsageError(f"RUN|MODEL_DIR {target}: neither a training run (config.yaml) nor a SavedModel")
    config, export_meta = _target_config(target, is_saved_model)
    ev = config.eval if config else EvalConfig()
    split_data = load_split(data, split)
    if not split_data.png:
        raise UsageError(f"--split {split}: the split of {data} is empty; nothing to evaluate")
    if scorer is None:
        scorer = SavedModelScorer(target) if is_saved_model else RunScorer(target)
    if split == "val":
        ref = ValidationReference(None, None, "the evaluated split is the validation split, on which the "
                                              "temperature and threshold are chosen")
    else:
        ref = validation_reference(scorer, data, ev)
    threshold = float(export_meta["mismatch_threshold"]) if "mismatch_threshold" in export_meta else ref.threshold
    details: dict[str, Any] = {}
    report = compute_report(scorer, split_data, ev.bootstrap_samples, ev.seed, threshold, config=ev,
                            temperature=ref.temperature, temperature_note=ref.note, details=details)
    report["evaluated"] = {"target": target.name, "kind": "saved_model" if is_saved_model else "run",
                           "split": split, "dataset_version": _dataset_version(data)}
    written: list[Path] = []
    if out is not None:
        from mmclinic.eval import report_html

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = artifact_paths(out)
        written = report_html.write_artifacts(report, details, split_data, paths, ev.failure_cases)
        rel = lambda p: str(p.relative_to(out.parent))  # noqa: E731
        report["artifacts"] = {
            "report_html": rel(paths["html"]), "failure_cases_parquet": rel(paths["failure_parquet"]),
            "failure_cases_html": rel(paths["failure_html"]),
            "figures": sorted(rel(p) for p in written if p.parent == paths["figures"]),
            "thumbnails": sum(p.parent == paths["thumbnails"] for p in written)}
        out.write_text(json.dumps(report, indent=2) + "\n")
        if not is_saved_model:
            _record_in_run(target, out, split, data)
    if not is_saved_model and (target / "mlflow_run_id").is_file():
        _log_to_mlflow(target, report, split, out, written)
    return report


def _record_in_run(run: Path, out: Path, split: str, data: Path) -> None:
    """Keep the run's latest report where ``mmclinic compare`` finds it."""
    import shutil
    import time

    dest = run / "eval" / split
    dest.mkdir(parents=True, exist_ok=True)
    if out.resolve() != (dest / "REPORT.json").resolve():
        shutil.copyfile(out, dest / "REPORT.json")
    (run / "eval" / "latest.json").write_text(json.dumps({
        "split": split, "report": f"{split}/REPORT.json", "written_to": str(out.resolve()),
        "data": str(data.resolve()), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2) + "\n")


def _dataset_version(data: Path) -> str:
    try:
        return json.loads((data / "dataset.json").read_text())["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


def headline_figures(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's main figures by flat name, each ``{"value", "ci95"}`` (only those computed)."""
    out: dict[str, dict[str, Any]] = {}

    def put(name: str, fig: Any) -> None:
        if isinstance(fig, dict) and fig.get("value") is not None:
            out[name] = fig

    ret = report["retrieval"]
    for direction in ("image_to_text", "text_to_image"):
        for k, v in ret[direction].items():
            put(f"{direction}.{k}", v)
        for block in ("dedup", "report_equivalent"):
            for k in ("R@1", "R@5", "R@10"):
                put(f"{block}.{direction}.{k}", ret.get(block, {}).get(direction, {}).get(k))
    mm = report["mismatch"]
    for k in ("auroc", "auprc", "fpr_at_95tpr"):
        put(f"mismatch.{k}", mm.get(k))
    for kind, block in mm.get("by_corruption", {}).items():
        put(f"mismatch.{kind}.auroc", block.get("auroc"))
    cal = report.get("calibration", {})
    ts = cal.get("temperature_scaling", {})
    put("calibration.ece", cal.get("ece"))
    put("calibration.ece_after_temperature", ts.get("ece"))
    if ts.get("temperature") is not None:
        put("calibration.temperature", {"value": ts["temperature"], "ci95": None})
    put("zero_shot.macro_auroc", report.get("zero_shot", {}).get("macro_auroc"))
    return out


def headline(report: dict[str, Any]) -> dict[str, float]:
    """Flat figures for trackers and consoles (only those computed)."""
    return {k: v["value"] for k, v in headline_figures(report).items()}


def _log_to_mlflow(run: Path, report: dict[str, Any], split: str, out: Path | None,
                   artifacts: list[Path] = ()) -> None:
    from mmclinic.tracking import MlflowRun

    mlrun = MlflowRun((run / "mlflow_run_id").read_text().strip())
    step = json.loads((run / "run.json").read_text()).get("step", 0) if (run / "run.json").is_file() else 0
    mlrun.log_metrics({f"eval.{split}.{k}": v for k, v in headline(report).items()}, step)
    if out is not None:
        mlrun.log_artifact(out, f"evaluation/{split}")
    for path in artifacts:
        if path.is_file():
            sub = f"evaluation/{split}" + (f"/{path.parent.name}" if path.parent != Path(out).parent else "")
            mlrun.log_artifact(path, sub)
