"""``mmclinic evaluate``: retrieval, mismatch detection, zero-shot classification and
calibration, with patient-clustered bootstrap intervals, slices and failure cases.

Works on a training run folder (rebuilds the model from its config, vocabulary
and latest checkpoint) or on an exported SavedModel (through its signatures), so
a model is scored the same way before and after export; the inference engines are in
:mod:`mmclinic.eval.scorers`, the split and its embeddings in :mod:`mmclinic.eval.embedding`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.artifacts import DatasetDir, ExportedModel, RunDir
from mmclinic.config import EvalConfig
from mmclinic.errors import UsageError
from mmclinic.eval import metrics
from mmclinic.eval.embedding import Embedded, SplitData, embed, load_split, mismatch_set, pair_logits, report_findings
from mmclinic.eval.scorers import RunScorer, SavedModelScorer, Scorer

MIN_EVAL = 3


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


SLICE_COLUMNS = ("modality", "view", "laterality", "sex", "age_band", "manufacturer", "source_format", "tag")


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


def validation_reference(scorer: Scorer, dataset: str | Path | DatasetDir, ev: EvalConfig) -> ValidationReference:
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


def artifact_paths(out: str | Path) -> dict[str, Path]:
    """Files written beside ``REPORT.json``: fixed names next to a file named ``REPORT.json``,
    prefixed by the report's stem otherwise (so two reports can share a folder)."""
    out = Path(out)
    prefix = "" if out.stem == "REPORT" else f"{out.stem}."
    base = out.parent
    return {"html": base / f"{prefix}report.html", "failure_parquet": base / f"{prefix}failure_cases.parquet",
            "failure_html": base / f"{prefix}failure_cases.html", "figures": base / f"{prefix}figures",
            "thumbnails": base / f"{prefix}failure_thumbnails"}


def with_tags(split_data: SplitData, tags: str | Path | Any) -> tuple[SplitData, dict[str, Any]]:
    """``split_data`` with a ``tag`` column from a reviewer's tag table (``image_id, tag``: a CSV
    path or a DataFrame, as :func:`mmclinic.eval.analysis.save_tags` writes it), and a summary of
    the join. Images without a tag are in no ``tag=`` slice; the last tag of an image wins."""
    from mmclinic.eval.analysis import read_tags

    table = read_tags(tags)
    table = table.drop_duplicates("image_id", keep="last")
    mapping = dict(zip(table["image_id"], table["tag"]))
    meta = split_data.meta.copy()
    meta["tag"] = meta["image_id"].map(mapping)
    joined = int(meta["tag"].notna().sum())
    summary = {"source": Path(tags).name if isinstance(tags, (str, Path)) else "table", "tags": len(mapping),
               "joined_images": joined, "not_in_split": len(mapping) - joined,
               "counts": {str(k): int(v) for k, v in meta["tag"].value_counts().sort_index().items()}}
    return SplitData(png=split_data.png, texts=split_data.texts, meta=meta), summary


def evaluate(target: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
             scorer: Scorer | None = None, tags: str | Path | Any | None = None) -> dict[str, Any]:
    """Score a run folder or exported model on ``split`` of ``data``; write REPORT.json.

    Beside ``out`` it also writes ``report.html`` (self-contained, with ROC, PR, recall@K and
    reliability plots), ``failure_cases.parquet`` / ``failure_cases.html`` (worst cases with
    thumbnails) and ``figures/*.png`` (see :func:`artifact_paths`). For a run, a copy of the
    report goes to ``RUN/eval/<split>/REPORT.json`` and ``RUN/eval/latest.json`` points at it
    (``mmclinic compare`` reads them).

    The operating threshold is the exported model's own (chosen on validation data when it
    was vetted) or, for a run, chosen on the validation split of ``data``. The match-logit
    temperature is fitted on the validation split of ``data``.

    ``tags``: a reviewer's tag table (``image_id, tag`` CSV or DataFrame, see :func:`with_tags`);
    each tag becomes a ``tag=VALUE`` slice and ``evaluated.tags`` records the join.
    """
    target = Path(target)
    if not target.exists():
        raise UsageError(f"RUN|MODEL_DIR not found: {target}")
    dataset = DatasetDir.open(data)
    if split not in ("train", "val", "test"):
        raise UsageError(f"--split must be train, val or test, got {split!r}")
    run, model = open_target(target)
    config = run.config() if run is not None else model.config()
    ev = config.eval
    split_data = dataset.load_split(split)
    if not split_data.png:
        raise UsageError(f"--split {split}: the split of {dataset.path} is empty; nothing to evaluate")
    tag_summary = None
    if tags is not None:
        split_data, tag_summary = with_tags(split_data, tags)
    if scorer is None:
        scorer = RunScorer(run.path) if run is not None else SavedModelScorer(model)
    if split == "val":
        ref = ValidationReference(None, None, "the evaluated split is the validation split, on which the "
                                              "temperature and threshold are chosen")
    else:
        ref = validation_reference(scorer, dataset, ev)
    threshold = model.mismatch_threshold if model is not None else ref.threshold
    details: dict[str, Any] = {}
    report = compute_report(scorer, split_data, ev.bootstrap_samples, ev.seed, threshold, config=ev,
                            temperature=ref.temperature, temperature_note=ref.note, details=details)
    report["evaluated"] = {"target": (run.path if run is not None else model.path).name,
                           "kind": "run" if run is not None else "saved_model",
                           "split": split, "dataset_version": dataset.version}
    if tag_summary is not None:
        report["evaluated"]["tags"] = tag_summary
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
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # renamed over REPORT.json once complete: a killed
        tmp.write_text(json.dumps(report, indent=2) + "\n")  # evaluate leaves the old report or none
        os.replace(tmp, out)
        if run is not None:
            run.record_evaluation(out, split, dataset.path)
    if run is not None and run.mlflow_run_id() is not None:
        _log_to_mlflow(run, report, split, out, written)
    return report


def open_target(target: str | Path) -> tuple[RunDir | None, ExportedModel | None]:
    """(the run, None) or (None, the exported model) that ``RUN|MODEL_DIR`` names: a training run
    folder, or ``MODEL_BASE``, ``MODEL_BASE/NAME`` or ``MODEL_BASE/NAME/VERSION``."""
    target = Path(target)
    if not ExportedModel.is_version_dir(target) and RunDir.is_run(target):
        return RunDir(target), None
    try:
        return None, ExportedModel.open(target, "RUN|MODEL_DIR")
    except UsageError as exc:
        raise UsageError(f"{exc}; nor a training run (no {RunDir.CONFIG})") from None


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


def _log_to_mlflow(run: RunDir, report: dict[str, Any], split: str, out: Path | None,
                   artifacts: list[Path] = ()) -> None:
    from mmclinic.tracking import MlflowRun

    mlrun = MlflowRun(run.mlflow_run_id())
    mlrun.log_metrics({f"eval.{split}.{k}": v for k, v in headline(report).items()}, run.step)
    if out is not None:
        mlrun.log_artifact(out, f"evaluation/{split}")
    for path in artifacts:
        if path.is_file():
            sub = f"evaluation/{split}" + (f"/{path.parent.name}" if path.parent != Path(out).parent else "")
            mlrun.log_artifact(path, sub)
