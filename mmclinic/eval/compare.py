"""``mmclinic compare``: runs side by side, and whether their difference is real.

A run is named by its workdir (its ``config.yaml`` and the latest report that
``mmclinic evaluate`` recorded in ``RUN/eval/latest.json``) or by an MLflow run id (its
params and ``eval.*`` metrics). The tables hold the config keys that differ (plus the
name) and the headline metrics with their intervals.

With ``--data``, every workdir run that has a checkpoint is scored on the same split and
the same corruption set, and each is compared with the first such run by a paired
bootstrap: the same resampled patients for both runs, giving the difference in
image-to-text R@5 and in mismatch AUROC with a 95% interval and a two-sided bootstrap p.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.artifacts import DatasetDir, RunDir
from mmclinic.errors import UsageError

KEY_METRICS = ("image_to_text.R@1", "image_to_text.R@5", "image_to_text.R@10", "text_to_image.R@5",
               "dedup.image_to_text.R@5", "mismatch.auroc", "mismatch.auprc", "calibration.ece",
               "zero_shot.macro_auroc")


@dataclass
class RunRecord:
    label: str
    source: str  # "workdir" or "mlflow"
    argument: str
    config: dict[str, str]
    metrics: dict[str, dict[str, Any]]
    workdir: Path | None = None
    note: str | None = None


@dataclass
class CompareResult:
    runs: list[RunRecord]
    configs: Any  # DataFrame: key x run
    metrics: Any  # DataFrame: metric x run (formatted)
    paired: list[dict[str, Any]] = field(default_factory=list)
    paired_note: str | None = None
    files: list[Path] = field(default_factory=list)


def resolve_run(argument: str) -> RunRecord:
    """A run folder or an MLflow run id; UsageError naming the argument otherwise."""
    from mmclinic.eval.evaluate import headline_figures
    from mmclinic.tracking import flatten

    path = Path(argument)
    if path.is_dir():
        run = RunDir.open(path, "RUN_OR_MLFLOW_RUN_ID")
        config = {k: str(v) for k, v in flatten(run.config().to_dict()).items()}
        report, note = run.latest_evaluation()
        metrics = headline_figures(report) if report else {}
        if report:
            ev = report.get("evaluated", {})
            config["evaluated.split"] = str(ev.get("split"))
            config["evaluated.dataset_version"] = str(ev.get("dataset_version"))
        return RunRecord(path.name, "workdir", argument, config, metrics, workdir=path, note=note)
    if re.fullmatch(r"[0-9a-f]{32}", argument):
        import mlflow

        from mmclinic.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        try:
            run = mlflow.MlflowClient().get_run(argument)
        except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing run
            raise UsageError(f"RUN_OR_MLFLOW_RUN_ID {argument}: no such MLflow run in {tracking_uri()}") from None
        metrics: dict[str, dict[str, Any]] = {}
        for key, value in run.data.metrics.items():
            m = re.fullmatch(r"eval\.(?:train|val|test)\.(.+)", key)
            if m:
                metrics[m.group(1).replace("_at_", "@")] = {"value": float(value), "ci95": None}
        config = dict(run.data.params)
        label = run.info.run_name or argument[:8]
        return RunRecord(label, "mlflow", argument, config, metrics,
                         note=None if metrics else "no eval.* metrics in this MLflow run")
    raise UsageError(f"RUN_OR_MLFLOW_RUN_ID {argument!r}: no such run folder, and not an MLflow run id "
                     "(32 hex digits)")


def _fmt(fig: dict[str, Any] | None) -> str:
    from mmclinic.eval.report_html import fmt

    return fmt(fig) if fig else ""


def _tables(runs: list[RunRecord]):
    import pandas as pd

    labels = [r.label for r in runs]
    keys = sorted(set().union(*(r.config for r in runs)))
    differ = [k for k in keys if len({r.config.get(k, "<unset>") for r in runs}) > 1]
    rows = ["name"] + [k for k in differ if k != "name"]
    configs = pd.DataFrame({lab: [r.config.get(k, "<unset>") for k in rows] for lab, r in zip(labels, runs)},
                           index=pd.Index(rows, name="config key"))
    names = [m for m in KEY_METRICS if any(m in r.metrics for r in runs)]
    names += sorted(set().union(*(r.metrics for r in runs)) - set(names))
    metrics = pd.DataFrame({lab: [_fmt(r.metrics.get(m)) for m in names] for lab, r in zip(labels, runs)},
                           index=pd.Index(names, name="metric"))
    return configs, metrics


def _paired(runs: list[RunRecord], data: DatasetDir, split: str, boot: int,
            seed: int | None) -> tuple[list[dict], str | None]:
    """Paired bootstrap of every checkpointed workdir run against the first one."""
    from mmclinic.eval import metrics
    from mmclinic.eval.embedding import embed, load_split, mismatch_set, pair_logits
    from mmclinic.eval.scorers import RunScorer

    usable, skipped = [], []
    for r in runs:
        if r.workdir is None:
            skipped.append(f"{r.label}: an MLflow run (no model to score)")
        elif RunDir(r.workdir).latest_checkpoint() is None:
            skipped.append(f"{r.label}: the run has no checkpoint")
        else:
            usable.append(r)
    if len(usable) < 2:
        return [], "paired bootstrap needs two workdir runs with checkpoints; " + "; ".join(skipped or ["got fewer"])
    split_data = load_split(data, split)
    if len(split_data.png) < 3:
        return [], f"--data {data.path}: the {split} split has {len(split_data.png)} images; needs at least 3"
    seed = RunDir(usable[0].workdir).config().eval.seed if seed is None else seed
    per_run = []
    for r in usable:
        scorer = RunScorer(r.workdir)
        emb = embed(scorer, split_data)
        i2t = metrics.ranks(emb.image_emb @ emb.report_emb.T, [[x] for x in emb.image_report])
        cset = mismatch_set(emb, seed)
        per_run.append((i2t, cset, -pair_logits(scorer, emb, cset)))
    patients = split_data.meta["patient_key"].to_numpy()
    ref_i2t, ref_cset, ref_score = per_run[0]
    labels = ref_cset.label
    pair_patients = patients[ref_cset.image]
    results = []
    for r, (i2t, cset, score) in zip(usable[1:], per_run[1:]):
        if not (np.array_equal(cset.image, ref_cset.image) and list(cset.kind) == list(ref_cset.kind)):
            raise RuntimeError("corruption sets differ between runs on the same data and seed")
        for name, res in (
            ("image_to_text.R@5", metrics.paired_bootstrap(
                lambda i: float(np.mean(ref_i2t[i] <= 5)), lambda i, a=i2t: float(np.mean(a[i] <= 5)),
                len(patients), patients, boot, seed)),
            ("mismatch.auroc", metrics.paired_bootstrap(
                lambda i: metrics.auroc(labels[i], ref_score[i]), lambda i, s=score: metrics.auroc(labels[i], s[i]),
                len(labels), pair_patients, boot, seed)),
        ):
            a = float(np.mean(ref_i2t <= 5)) if name.endswith("R@5") else metrics.auroc(labels, ref_score)
            b = float(np.mean(i2t <= 5)) if name.endswith("R@5") else metrics.auroc(labels, score)
            verdict = ("not computed: " + res["not_computed"]) if res.get("not_computed") else (
                "real difference (95% interval excludes 0)" if res["significant"] else
                "not distinguishable from 0 (95% interval includes 0)")
            results.append({"metric": name, "reference": usable[0].label, "run": r.label, "reference_value": a,
                            "run_value": b, "difference": res["difference"], "ci95": res["ci95"], "p": res["p"],
                            "verdict": verdict, "resamples": res.get("resamples", 0), "split": split,
                            "items": int(len(patients) if name.endswith("R@5") else len(labels)),
                            "patients": int(len(set(patients)))})
    return results, ("; ".join(skipped) + " (left out of the paired bootstrap)") if skipped else None


def _plots(runs: list[RunRecord], paired: list[dict[str, Any]]) -> dict[str, bytes]:
    from mmclinic.eval.report_html import figure_png, subplots  # figures outside pyplot: no backend switch

    out: dict[str, bytes] = {}
    names = [m for m in KEY_METRICS if any(m in r.metrics for r in runs)]
    if names:
        fig, ax = subplots((7, 0.5 + 0.45 * len(names) * max(1, len(runs)) ** 0.5))
        h = 0.8 / len(runs)
        for j, r in enumerate(runs):
            ys = np.arange(len(names)) + j * h
            vals = [r.metrics.get(m, {}).get("value", np.nan) for m in names]
            err = np.array([[v - (r.metrics.get(m, {}).get("ci95") or [v, v])[0],
                             (r.metrics.get(m, {}).get("ci95") or [v, v])[1] - v] for m, v in zip(names, vals)]).T
            ax.barh(ys, vals, height=h, xerr=np.nan_to_num(err), label=r.label, capsize=2)
        ax.set_yticks(np.arange(len(names)) + 0.4 - h / 2, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.05)
        ax.set_title("Headline metrics (95% patient-bootstrap intervals)")
        ax.legend(fontsize=7)
        out["metrics"] = figure_png(fig)
    done = [p for p in paired if p["difference"] is not None and p["ci95"]]
    if done:
        fig, ax = subplots((7, 0.8 + 0.5 * len(done)))
        ys = np.arange(len(done))
        d = np.array([p["difference"] for p in done])
        lo = np.array([p["ci95"][0] for p in done])
        hi = np.array([p["ci95"][1] for p in done])
        ax.errorbar(d, ys, xerr=[d - lo, hi - d], fmt="o", capsize=3)
        ax.axvline(0, c="grey", ls=":")
        ax.set_yticks(ys, [f"{p['metric']}: {p['run']} - {p['reference']}" for p in done], fontsize=8)
        ax.set_title("Paired bootstrap differences (95% intervals)")
        out["paired"] = figure_png(fig)
    return out


def compare(runs: list[str], out: str | Path | None = None, data: str | Path | None = None, split: str = "test",
            boot: int = 1000, seed: int | None = None) -> CompareResult:
    """Side-by-side configs and metrics of ``runs`` (workdirs or MLflow run ids); see the module docstring.

    With ``out``, writes ``configs.{csv,md}``, ``metrics.{csv,md}``, ``paired.{csv,md}`` (with
    ``data``), ``metrics.png``, ``paired.png`` and a self-contained ``compare.html``.
    """
    import pandas as pd

    if not runs:
        raise UsageError("RUN_OR_MLFLOW_RUN_ID: give at least one run")
    if split not in ("train", "val", "test"):
        raise UsageError(f"--split must be train, val or test, got {split!r}")
    if boot <= 0:
        raise UsageError(f"--boot must be > 0, got {boot}")
    dataset = DatasetDir.open(data) if data is not None else None
    records = [resolve_run(a) for a in runs]
    seen: dict[str, int] = {}
    for r in records:  # labels must be unique table columns
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label} ({seen[r.label]})"
    configs, metrics_table = _tables(records)
    result = CompareResult(records, configs, metrics_table)
    if dataset is not None:
        result.paired, result.paired_note = _paired(records, dataset, split, boot, seed)
    else:
        result.paired_note = "no --data given: paired bootstrap not computed"
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for name, df in (("configs", configs), ("metrics", metrics_table)):
            df.to_csv(out / f"{name}.csv")
            (out / f"{name}.md").write_text(_markdown(df) + "\n")
            files += [out / f"{name}.csv", out / f"{name}.md"]
        paired_df = pd.DataFrame(result.paired)
        if len(paired_df):
            paired_df.to_csv(out / "paired.csv", index=False)
            (out / "paired.md").write_text(_markdown(paired_df.set_index("metric")) + "\n")
            files += [out / "paired.csv", out / "paired.md"]
        plots = _plots(records, result.paired)
        for name, png in plots.items():
            (out / f"{name}.png").write_bytes(png)
            files.append(out / f"{name}.png")
        (out / "compare.html").write_text(_html(result, plots), encoding="utf-8")
        files.append(out / "compare.html")
        result.files = files
    return result


def _markdown(df) -> str:
    cols = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        cells = [str(idx)] + ["" if v is None else str(v) for v in row.tolist()]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def summary_text(result: CompareResult) -> str:
    """What the command prints: the tables in Markdown and the paired verdicts."""
    parts = ["## Configs (keys that differ)", _markdown(result.configs), "", "## Metrics", _markdown(result.metrics)]
    notes = [f"- {r.label}: {r.note}" for r in result.runs if r.note]
    if notes:
        parts += ["", *notes]
    parts += ["", "## Paired bootstrap"]
    for p in result.paired:
        ci = f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p["ci95"] else "n/a"
        diff = f"{p['difference']:+.3f}" if p["difference"] is not None else "n/a"
        pv = f"{p['p']:.3f}" if p["p"] is not None else "n/a"
        parts.append(f"- {p['metric']}: {p['run']} - {p['reference']} = {diff} {ci}, p {pv}: {p['verdict']}")
    if result.paired_note:
        parts.append(f"- {result.paired_note}")
    return "\n".join(parts)


def _html(result: CompareResult, plots: dict[str, bytes]) -> str:
    from mmclinic.eval.report_html import img_tag, page, table

    def df_table(df) -> str:
        return table([df.index.name or ""] + [str(c) for c in df.columns],
                      [[idx, *row.tolist()] for idx, row in df.iterrows()])

    body = ["<h2>Configs (keys that differ)</h2>", df_table(result.configs), "<h2>Metrics</h2>",
            df_table(result.metrics)]
    notes = [f"{r.label}: {r.note}" for r in result.runs if r.note]
    if notes:
        body.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    body.append("<h2>Paired bootstrap</h2>")
    if result.paired:
        rows = [[p["metric"], p["reference"], p["run"], f"{p['reference_value']:.3f}", f"{p['run_value']:.3f}",
                 f"{p['difference']:+.3f}" if p["difference"] is not None else "",
                 f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p["ci95"] else "",
                 f"{p['p']:.3f}" if p["p"] is not None else "", p["verdict"]] for p in result.paired]
        body.append(table(["metric", "reference", "run", "reference value", "run value", "difference", "95% CI",
                            "p", "verdict"], rows))
    if result.paired_note:
        body.append(f"<p>{html.escape(result.paired_note)}</p>")
    body.append("<div class='figs'>" + "".join(img_tag(png, name) for name, png in plots.items()) + "</div>")
    return page("mmclinic run comparison", "".join(body))
