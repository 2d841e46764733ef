"""Evaluation artifacts beside REPORT.json: plots, a self-contained HTML report and failure cases.

Everything here is written from the evaluation's arrays and the de-identified dataset
(pseudonymous keys, scrubbed report text); report snippets still pass the PHI guard and
are withheld when a rule fires. Plots are PNG (matplotlib, headless) and are embedded in
the HTML as base64, so each HTML file stands alone.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.eval import metrics

SNIPPET_CHARS = 200


# --------------------------------------------------------------------------- helpers


def fmt(fig: Any, digits: int = 3) -> str:
    """A report figure as text: ``value [lo, hi]`` or why it was not computed."""
    if not isinstance(fig, dict):
        return "" if fig is None else (f"{fig:.{digits}f}" if isinstance(fig, float) else str(fig))
    if fig.get("value") is None:
        return f"not computed ({fig.get('not_computed', 'undefined')})"
    text = f"{fig['value']:.{digits}f}"
    if fig.get("ci95"):
        lo, hi = fig["ci95"]
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


def snippet(text: str, n: int = SNIPPET_CHARS) -> str:
    """The first ``n`` characters of de-identified text, withheld if the PHI guard objects."""
    from mmclinic.phi.guard import DEFAULT_GUARD

    text = " ".join(str(text).split())
    text = text if len(text) <= n else text[: n - 3] + "..."
    hits = DEFAULT_GUARD.findings(text)
    return f"[withheld: matches PHI rule {', '.join(hits)}]" if hits else text


def cell_text(value: Any) -> str:
    """A table cell's text: empty for None, NaN and pandas' missing values (never "nan")."""
    import pandas as pd

    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; cells are escaped unless they are :class:`SafeHtml`; missing values are empty."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, SafeHtml) else html.escape(cell_text(c))}</td>"
                                    for c in r)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class SafeHtml(str):
    """HTML that is already safe (an <img> tag built here)."""


def img_tag(png: bytes | None, alt: str, width: int | None = None) -> SafeHtml:
    """An ``<img>`` with the PNG inline (base64), or empty without one."""
    if not png:
        return SafeHtml("")
    w = f' width="{width}"' if width else ""
    return SafeHtml(f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{base64.b64encode(png).decode()}">')


_STYLE = """<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;
margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}
th{background:#f3f3f3}h2{border-bottom:1px solid #ddd}.figs img{max-width:48%;margin:4px}</style>"""


def page(title: str, body: str) -> str:
    """A self-contained HTML page (the report's style) around ``body``."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}"
            f"</head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


# --------------------------------------------------------------------------- plots


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def subplots(figsize: tuple[float, float]):
    """A figure outside pyplot (no backend switch: a notebook keeps its inline plots)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def make_plots(report: dict[str, Any], details: dict[str, Any]) -> dict[str, bytes]:
    """ROC, precision-recall, recall@K and reliability plots as PNG bytes."""
    out: dict[str, bytes] = {}
    labels, score, kinds = details["labels"], details["mismatch_score"], details["cset"].kind
    groups = [("all corruptions", np.ones(len(labels), bool))] + [
        (k, (kinds == "match") | (kinds == k)) for k in sorted(set(kinds) - {"match"})]
    for name, points, xl, yl in (("roc", metrics.roc_points, "false-positive rate", "true-positive rate"),
                                 ("pr", metrics.pr_points, "recall", "precision")):
        fig, ax = subplots((5.5, 4.5))
        for label, m in groups:
            pts = points(labels[m], score[m])
            if pts is not None:
                ax.plot(pts[0], pts[1], lw=2 if label == "all corruptions" else 1, label=label,
                        drawstyle="steps-post" if name == "pr" else "default")
        if name == "roc":
            ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set_xlabel(xl); ax.set_ylabel(yl); ax.set_xlim(0, 1); ax.set_ylim(0, 1.02)
        ax.set_title("Mismatch detection: " + ("ROC" if name == "roc" else "precision-recall"))
        ax.legend(fontsize=7, loc="lower right" if name == "roc" else "lower left")
        out[name] = figure_png(fig)

    fig, ax = subplots((5.5, 4.5))
    for key, label in (("i2t", "image→text"), ("t2i", "text→image"), ("i2t_dedup", "image→text (dedup)"),
                       ("t2i_dedup", "text→image (dedup)")):
        r = details[key]
        kmax = int(min(50, details["pools"][key]))
        ks = np.arange(1, kmax + 1)
        ax.plot(ks, [(r <= k).mean() for k in ks], label=label, ls="--" if "dedup" in key else "-")
    pool = details["pools"]["i2t"]
    ax.plot(ks, np.minimum(ks / max(pool, 1), 1), ls=":", c="grey", label="chance (image→text)")
    ax.set_xlabel("K"); ax.set_ylabel("recall@K"); ax.set_ylim(0, 1.02); ax.set_title("Retrieval recall@K")
    ax.legend(fontsize=7, loc="lower right")
    out["recall_at_k"] = figure_png(fig)

    cal = report["calibration"]
    fig, ax = subplots((5, 5))
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfect calibration")
    for rel, label in ((cal["reliability"], f"raw (ECE {fmt(cal['ece'], 3).split(' ')[0]})"),
                       (cal.get("temperature_scaling", {}).get("reliability"),
                        f"temperature {cal.get('temperature_scaling', {}).get('temperature', 0):.2f} (ECE "
                        f"{fmt(cal.get('temperature_scaling', {}).get('ece'), 3).split(' ')[0]})")):
        if not rel:
            continue
        xs = [b["mean_score"] for b in rel if b["count"]]
        ys = [b["fraction_matched"] for b in rel if b["count"]]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("mean match score in bin"); ax.set_ylabel("fraction of true pairs")
    ax.set_xlim(0, 1); ax.set_ylim(0, 1); ax.set_title(cal["binning"].split(";")[0])
    ax.legend(fontsize=7, loc="upper left")
    out["reliability"] = figure_png(fig)
    return out


# --------------------------------------------------------------------------- failure cases


def _thumbnail(png: bytes, side: int = 96) -> bytes | None:
    """The display thumbnail (:mod:`mmclinic.display`: scaled by bit depth, never clipped)."""
    from mmclinic.display import thumbnail_png

    return thumbnail_png(png, side)


def failure_cases(details: dict[str, Any], png: list[bytes], n: int):
    """Worst cases as a DataFrame: true reports ranked lowest for their image, and the
    corrupted pairs scored most confidently as matching. Also returns thumbnails by image id."""
    import pandas as pd

    emb, cset = details["emb"], details["cset"]
    ids = emb.meta["image_id"].tolist()
    rows = []
    i2t, sim = details["i2t"], details["sim"]
    for i in np.argsort(-i2t, kind="stable")[:n]:
        r = emb.image_report[i]
        top = int(np.argmax(sim[i]))
        rows.append({"case": "retrieval", "image_id": ids[i], "report_id": emb.report_ids[r], "rank": int(i2t[i]),
                     "score": float(sim[i, r]), "corruption": None, "report_snippet": snippet(emb.texts[r]),
                     "retrieved_report_id": emb.report_ids[top], "retrieved_snippet": snippet(emb.texts[top])})
    probs = details["probs"]
    bad = np.flatnonzero(details["labels"] == 1)
    for j in bad[np.argsort(-probs[bad], kind="stable")][:n]:
        i = int(cset.image[j])
        rows.append({"case": "mismatch", "image_id": ids[i], "report_id": emb.report_ids[cset.source[j]],
                     "rank": None, "score": float(probs[j]), "corruption": str(cset.kind[j]),
                     "report_snippet": snippet(cset.text[j]), "retrieved_report_id": None, "retrieved_snippet": None})
    df = pd.DataFrame(rows, columns=["case", "image_id", "report_id", "rank", "score", "corruption",
                                     "report_snippet", "retrieved_report_id", "retrieved_snippet"])
    df["rank"] = df["rank"].astype("Int64")
    index = {x: k for k, x in enumerate(ids)}
    thumbs = {iid: _thumbnail(png[index[iid]]) for iid in df["image_id"].unique()}
    return df, thumbs


def _failure_html(df, thumbs: dict[str, bytes | None], title: str) -> str:
    import pandas as pd

    parts = ["<p>Worst cases of the evaluated split. Keys are pseudonyms; text is the de-identified report "
             "text (corrupted text for mismatch cases). <b>retrieval</b>: rank of the image's own report "
             "(score: image-report similarity). <b>mismatch</b>: corrupted pairs the model scored most "
             "confidently as matching (score: match probability).</p>"]
    for case, header in (("retrieval", "True report ranked lowest"), ("mismatch", "Highest-scored mismatches")):
        sub = df[df["case"] == case]
        rows = []
        for r in sub.itertuples():
            rows.append([img_tag(thumbs.get(r.image_id), r.image_id, 96), r.image_id, r.report_id,
                         None if pd.isna(r.rank) else int(r.rank),
                         f"{r.score:.3f}", None if pd.isna(r.corruption) else r.corruption, r.report_snippet,
                         None if pd.isna(r.retrieved_snippet) else r.retrieved_snippet])
        parts.append(f"<h2>{html.escape(header)}</h2>")
        parts.append(table(["image", "image_id", "report_id", "rank", "score", "corruption", "report",
                             "top-1 retrieved report"], rows) if rows else "<p>none</p>")
    return page(title, "".join(parts))


# --------------------------------------------------------------------------- the report page


def _retrieval_rows(block: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for direction in ("image_to_text", "text_to_image"):
        b = block.get(direction) or {}
        if not b:
            continue
        rows.append([direction.replace("_", " "), b.get("pool_size"), b.get("queries"),
                     *(fmt(b.get(k)) for k in ("R@1", "R@5", "R@10", "median_rank", "mean_rank")),
                     ", ".join(f"{k} {b[k]['chance']:.3f}" for k in ("R@1", "R@5", "R@10") if "chance" in b[k])])
    return rows


def reportpage(report: dict[str, Any], plots: dict[str, bytes], failure_link: str | None) -> str:
    ev = report.get("evaluated", {})
    parts = [f"<p>Target <b>{html.escape(str(ev.get('target', '')))}</b> ({html.escape(str(ev.get('kind', '')))}), "
             f"split <b>{html.escape(str(ev.get('split', '')))}</b>, dataset version "
             f"{html.escape(str(ev.get('dataset_version', '')))}. Counts: "
             f"{html.escape(str(report.get('counts', {})))}. Intervals: 95% percentile bootstrap over patients "
             f"({report.get('bootstrap', {}).get('samples')} resamples, seed {report.get('bootstrap', {}).get('seed')})."
             "</p>"]
    if failure_link:
        parts.append(f"<p>Failure cases: <a href='{html.escape(failure_link)}'>{html.escape(failure_link)}</a></p>")
    ret = report["retrieval"]
    header = ["direction", "pool", "queries", "R@1", "R@5", "R@10", "median rank", "mean rank", "chance"]
    parts.append("<h2>Retrieval</h2><h3>Every instance</h3>" + table(header, _retrieval_rows(ret)))
    if "dedup" in ret:
        parts.append("<h3>De-duplicated report pool</h3><p>" + html.escape(ret["dedup"]["protocol"]) + "</p>"
                     + table(header, _retrieval_rows(ret["dedup"])))
    if "report_equivalent" in ret:
        eq = ret["report_equivalent"]
        parts.append(f"<h3>Report-equivalent recall</h3><p>{html.escape(eq['criterion'])} (findings from "
                     f"{html.escape(eq['findings_source'])}).</p>" + table(header, _retrieval_rows(eq)))
    mm = report["mismatch"]
    rows = [["all", mm["pairs"], mm["mismatched"], fmt(mm["auroc"]), fmt(mm["auprc"]), fmt(mm["fpr_at_95tpr"]), ""]]
    for kind, b in mm.get("by_corruption", {}).items():
        if "auroc" in b:
            rows.append([kind, b["pairs"], b["mismatched"], fmt(b["auroc"]), fmt(b["auprc"]), fmt(b["fpr_at_95tpr"]),
                         b.get("skipped", "")])
        else:
            rows.append([kind, 0, 0, b.get("not_computed", ""), "", "", b.get("skipped", "")])
    parts.append("<h2>Mismatch detection</h2>" + table(
        ["corruption", "pairs", "mismatched", "AUROC", "AUPRC", "FPR@95%TPR", "skipped (not applicable)"], rows))
    op = mm.get("operating_point")
    if op:
        parts.append(f"<p>Operating threshold {op['threshold']:.4f} (chosen on validation data): sensitivity "
                     f"{fmt(op.get('sensitivity'))}, specificity {fmt(op.get('specificity'))}.</p>")
    cal = report["calibration"]
    ts = cal.get("temperature_scaling", {})
    parts.append("<h2>Calibration of the match score</h2><p>" + html.escape(cal["score"]) + ". "
                 + html.escape(cal["binning"]) + ".</p>" + table(
                     ["", "ECE", "Brier", "NLL"],
                     [["raw", fmt(cal["ece"]), fmt(cal["brier"]), fmt(cal["nll"])]]
                     + ([[f"temperature {ts['temperature']:.3f} (fitted on {ts['fitted_on']})", fmt(ts["ece"]),
                          fmt(ts["brier"]), fmt(ts["nll"])]] if "temperature" in ts else
                        [["temperature scaling", ts.get("not_computed", ""), "", ""]])))
    zs = report.get("zero_shot", {})
    parts.append("<h2>Zero-shot classification</h2>")
    if "tasks" in zs:
        rows = [[name, t["kind"], t["positives"], t["negatives"], fmt(t["auroc"]),
                 " | ".join(t["prompts"]["positive"])] for name, t in zs["tasks"].items()]
        rows.append(["macro mean", "", "", "", fmt(zs["macro_auroc"]), ""])
        rows += [[name, "skipped", "", "", reason, ""] for name, reason in zs.get("skipped", {}).items()]
        parts.append(table(["label", "kind", "positives", "negatives", "AUROC", "positive prompts"], rows))
    else:
        parts.append(f"<p>Not computed: {html.escape(str(zs.get('not_computed', '')))}</p>")
    rows = []
    for key, s in report.get("slices", {}).items():
        if "not_computed" in s:
            rows.append([key, s["images"], s.get("patients", ""), s["not_computed"], "", "", ""])
        else:
            rows.append([key, s["images"], s.get("patients", ""), fmt(s.get("image_to_text_R@1")),
                         fmt(s["image_to_text_R@5"]), fmt(s["mismatch_auroc"]), fmt(s.get("ece"))])
    parts.append("<h2>Slices</h2>" + table(["slice", "images", "patients", "image→text R@1", "image→text R@5",
                                             "mismatch AUROC", "ECE"], rows))
    parts.append("<h2>Plots</h2><div class='figs'>" + "".join(img_tag(png, name) for name, png in plots.items())
                 + "</div>")
    return page("mmclinic evaluation report", "".join(parts))


def write_artifacts(report: dict[str, Any], details: dict[str, Any], split_data, paths: dict[str, Path],
                    n_cases: int = 10) -> list[Path]:
    """Write plots, failure cases and the HTML report; return every file written."""
    written: list[Path] = []
    plots = make_plots(report, details)
    paths["figures"].mkdir(parents=True, exist_ok=True)
    for name, png in plots.items():
        p = paths["figures"] / f"{name}.png"
        p.write_bytes(png)
        written.append(p)
    df, thumbs = failure_cases(details, split_data.png, n_cases)
    paths["thumbnails"].mkdir(parents=True, exist_ok=True)
    for iid, png in thumbs.items():
        if png:
            p = paths["thumbnails"] / f"{iid}.png"
            p.write_bytes(png)
            written.append(p)
    df["thumbnail"] = [f"{paths['thumbnails'].name}/{iid}.png" if thumbs.get(iid) else None for iid in df["image_id"]]
    df.to_parquet(paths["failure_parquet"], index=False)
    paths["failure_html"].write_text(_failure_html(df, thumbs, "mmclinic failure cases"), encoding="utf-8")
    paths["html"].write_text(reportpage(report, plots, paths["failure_html"].name), encoding="utf-8")
    written += [paths["failure_parquet"], paths["failure_html"], paths["html"]]
    return written
