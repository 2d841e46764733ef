"""``mmclinic review DB``: a page for working through the review queue.

A Starlette app served by uvicorn, bound to 127.0.0.1 unless told otherwise. For each queued
pair it shows the image (display-ready pixels through :mod:`mmclinic.display`, the window
adjustable with two sliders), the de-identified report text, the model's mismatch score and
threshold, and takes a decision by button or key (``m`` confirmed mismatch, ``c`` confirmed
match, ``d`` dismissed, ``n``/``p`` next/previous), with a note. Each decision is written to the
database at once (``POST /api/decide``) and kept in ``review_history``.

Only de-identified data is shown: a dataset's stored images and ``reports.parquet`` text (what
ingest wrote), or for a CSV source the image read through ``read_image`` and the report after
:func:`mmclinic.phi.text_deid.deidentify_text`.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any

from mmclinic.data import review_queue as rq
from mmclinic.errors import MmclinicError

__all__ = ["create_app", "serve_review", "item_image", "item_text"]


@functools.lru_cache(maxsize=8)
def _dataset_tables(folder: str):
    from mmclinic.artifacts import DatasetDir

    ds = DatasetDir.open(folder, "the queued dataset")
    manifest = ds.manifest(["image_id", "path"]).set_index("image_id")["path"].to_dict()
    reports = ds.reports(["report_id", "text"]).set_index("report_id")["text"].to_dict()
    return ds, manifest, reports


@functools.lru_cache(maxsize=8)
def _csv_rows(file: str) -> dict[str, dict[str, str]]:
    import pandas as pd

    df = pd.read_csv(file, dtype=str, keep_default_na=False)
    digest = rq.csv_digest(file)
    out = {}
    for i, row in df.iterrows():
        out[row.get("pair_id") or rq.default_pair_id(digest, i)] = {"image_path": row["image_path"],
                                                                  "report_text": row["report_text"]}
    return out


def _origin(row: dict[str, Any]) -> tuple[str, str]:
    kind, _, where = str(row.get("origin") or "").partition(":")
    return kind, where


def item_image(row: dict[str, Any]) -> bytes | Any:
    """The stored image of a queue row: PNG bytes (dataset) or display-ready pixels (CSV)."""
    kind, where = _origin(row)
    if kind == "dataset":
        ds, manifest, _ = _dataset_tables(where)
        return ds.read_bytes(manifest[row["image_key"]])
    if kind == "csv":
        from mmclinic.data.images import DEFAULT_DECODE_TIMEOUT, read_image

        from mmclinic.phi import pixel_text

        path = Path(_csv_rows(where)[row["pair_id"]]["image_path"])
        if not path.is_absolute():
            path = Path(where).parent / path
        # A user's image was never through ingest: its pixels may carry names and IDs. It is shown
        # only with text found by OCR blacked out, and not at all without the OCR engine.
        if pixel_text.tesseract_version() is None:
            raise ImageWithheld("an image from a user CSV is shown only with the text found in its pixels "
                                "blacked out, and the OCR engine is not installed: apt-get install tesseract-ocr")
        pixels = read_image(path, decode_timeout=DEFAULT_DECODE_TIMEOUT).pixels
        return pixel_text.redact_text(pixels)[0]
    raise KeyError(row.get("origin"))


class ImageWithheld(MmclinicError):
    """An image the page will not show as it is (a user's image without the OCR redaction)."""


def item_text(row: dict[str, Any]) -> str:
    """The de-identified report text of a queue row."""
    kind, where = _origin(row)
    if kind == "dataset":
        return str(_dataset_tables(where)[2].get(row["report_key"], "") or "")
    if kind == "csv":
        from mmclinic.phi.text_deid import deidentify_text

        return deidentify_text(_csv_rows(where)[row["pair_id"]]["report_text"])
    raise KeyError(row.get("origin"))


def _public(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "pair_id", "model_name", "model_version", "score", "match_score", "threshold", "status", "reviewer",
            "note")
    out = {k: row.get(k) for k in keep}
    out["decided_at"] = row["decided_at"].isoformat() if row.get("decided_at") else None
    return out


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mmclinic review</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;flex-direction:column;height:100vh}
header{padding:.5em 1em;background:#223;color:#eee;display:flex;gap:2em;align-items:center}
main{display:flex;flex:1;gap:1em;padding:1em;overflow:auto}
#imgbox{flex:1;text-align:center} #imgbox img{max-width:100%;max-height:70vh;image-rendering:pixelated;background:#000}
#side{flex:1;display:flex;flex-direction:column;gap:.6em}
#report{white-space:pre-wrap;border:1px solid #ccc;padding:.6em;min-height:8em}
.status{font-weight:bold} button{font-size:1em;margin-right:.4em} kbd{border:1px solid #999;padding:0 .3em}
</style></head>
<body>
<header><b>mmclinic review</b><span id="progress"></span><span>reviewer
<input id="reviewer" size="12" value="__REVIEWER__"></span>
<span>keys: <kbd>m</kbd> mismatch <kbd>c</kbd> match <kbd>d</kbd> dismiss <kbd>n</kbd>/<kbd>p</kbd> next/previous</span>
</header>
<main><div id="imgbox"><img id="image" alt="image of the pair"><div>
window low <input type="range" id="low" min="0" max="100" value="0">
high <input type="range" id="high" min="0" max="100" value="100"></div></div>
<div id="side"><div>pair <b id="pair"></b> &middot; model <span id="model"></span></div>
<div>mismatch score <b id="score"></b> (threshold <span id="threshold"></span>) &middot;
status <span class="status" id="status"></span></div>
<div id="report"></div>
<textarea id="note" rows="3" placeholder="note (optional)"></textarea>
<div><button id="btn-m">confirmed mismatch (m)</button><button id="btn-c">confirmed match (c)</button>
<button id="btn-d">dismissed (d)</button><button id="btn-n">next (n)</button></div>
<div id="message" role="status"></div></div></main>
<script>
let items = [], pos = 0;
const $ = (id) => document.getElementById(id);
async function load() {
  const r = await fetch('api/queue'); const j = await r.json();
  items = j.items; showProgress(j.progress);
  pos = Math.max(0, items.findIndex(x => x.status === 'pending'));
  show();
}
function showProgress(p) {
  $('progress').textContent = (p.total - p.pending) + ' of ' + p.total + ' decided';
}
function imgUrl() {
  const it = items[pos];
  return 'image/' + it.id + '?low=' + $('low').value / 100 + '&high=' + $('high').value / 100;
}
async function show() {
  if (!items.length) { $('message').textContent = 'the queue is empty'; return; }
  const it = items[pos];
  $('pair').textContent = it.pair_id; $('model').textContent = it.model_name + ' v' + it.model_version;
  $('score').textContent = it.score.toFixed(3); $('threshold').textContent = it.threshold.toFixed(3);
  $('status').textContent = it.status; $('note').value = it.note || '';
  $('image').src = imgUrl();
  const r = await fetch('api/item/' + it.id); const j = await r.json();
  $('report').textContent = j.report_text;
  document.body.dataset.pair = it.pair_id;
}
async function decide(status) {
  const it = items[pos];
  localStorage.setItem('reviewer', $('reviewer').value);
  const r = await fetch('api/decide', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({pair_id: it.pair_id, status: status, reviewer: $('reviewer').value, note: $('note').value})});
  const j = await r.json();
  if (!r.ok) { $('message').textContent = 'not saved: ' + j.error; return; }
  it.status = status; it.note = $('note').value; showProgress(j.progress);
  $('message').textContent = 'saved: ' + it.pair_id + ' ' + status;
  document.body.dataset.saved = String(Number(document.body.dataset.saved || 0) + 1);
  move(1);
}
function move(d) { if (!items.length) return; pos = Math.min(items.length - 1, Math.max(0, pos + d)); show(); }
document.addEventListener('keydown', (e) => {
  if (e.target.tagName === 'TEXTAREA' || e.target.tagName === 'INPUT' && e.target.type !== 'range') return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  if (k === 'm') decide('confirmed_mismatch'); else if (k === 'c') decide('confirmed_match');
  else if (k === 'd') decide('dismissed'); else if (k === 'n') move(1); else if (k === 'p') move(-1);
});
$('btn-m').onclick = () => decide('confirmed_mismatch'); $('btn-c').onclick = () => decide('confirmed_match');
$('btn-d').onclick = () => decide('dismissed'); $('btn-n').onclick = () => move(1);
$('low').oninput = $('high').oninput = () => { if (items.length) $('image').src = imgUrl(); };
if (!$('reviewer').value) $('reviewer').value = localStorage.getItem('reviewer') || '';
load();
</script></body></html>
"""


def create_app(db: Any, reviewer: str = ""):
    """The Starlette app over the queue in ``db`` (URL, engine or SQLite file)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from mmclinic.display import display_image, png_bytes

    engine = rq.engine_for(db)
    rq.ensure_schema(engine)

    def _row(item_id: int) -> dict[str, Any] | None:
        import sqlalchemy as sa

        queue, _ = rq.queue_tables()
        with engine.connect() as conn:
            r = conn.execute(sa.select(queue).where(queue.c.id == item_id)).mappings().first()
        return dict(r) if r else None

    async def page(request: Request):
        return HTMLResponse(PAGE.replace("__REVIEWER__", html.escape(reviewer, quote=True)))

    async def queue(request: Request):
        rows = rq.queue_rows(engine)
        return JSONResponse({"items": [_public(r) for r in rows], "progress": rq.progress(engine)})

    async def item(request: Request):
        row = _row(int(request.path_params["item_id"]))
        if row is None:
            return JSONResponse({"error": "no such queue item"}, status_code=404)
        try:
            text = item_text(row)
        except (KeyError, OSError, MmclinicError):
            text = "(the report is not available: its source moved or changed)"
        return JSONResponse({**_public(row), "report_text": text,
                             "history": [{"status": h["status"], "reviewer": h["reviewer"], "note": h["note"],
                                          "decided_at": h["decided_at"].isoformat() if h["decided_at"] else None}
                                         for h in rq.history(engine, row["pair_id"])]})

    async def image(request: Request):
        row = _row(int(request.path_params["item_id"]))
        if row is None:
            return JSONResponse({"error": "no such queue item"}, status_code=404)
        try:
            low = float(request.query_params.get("low", 0.0))
            high = float(request.query_params.get("high", 1.0))
        except ValueError:
            return JSONResponse({"error": "low and high must be numbers in [0, 1]"}, status_code=400)
        window = None if (low, high) == (0.0, 1.0) else (low, high)
        try:
            pic = display_image(item_image(row), window, max_side=1024)
        except ImageWithheld as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        except (KeyError, OSError, MmclinicError):
            return JSONResponse({"error": "the image is not available: its source moved or changed"},
                                status_code=404)
        import numpy as np

        return Response(png_bytes(np.asarray(pic)), media_type="image/png", headers={"Cache-Control": "no-store"})

    async def decide(request: Request):
        # JSON only: a cross-site form (text/plain, no preflight) cannot record decisions.
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return JSONResponse({"error": "decisions are posted as application/json"}, status_code=415)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        try:
            rq.decide_many(engine, [rq.Decision(str(body.get("pair_id") or ""), str(body.get("status") or ""),
                                                str(body.get("reviewer") or reviewer or ""),
                                                str(body.get("note") or ""))], via="page")
        except MmclinicError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400 if exc.exit_code == 2 else 500)
        return JSONResponse({"ok": True, "progress": rq.progress(engine)})

    async def export(request: Request):
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(rq.CSV_COLUMNS)
        for r in sorted(rq.queue_rows(engine), key=lambda r: r["pair_id"]):
            if r["status"] in rq.DECISIONS:
                w.writerow([r["pair_id"], r["status"], r["reviewer"] or "", r["note"] or ""])
        return Response(buf.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="decisions.csv"'})

    return Starlette(routes=[
        Route("/", page), Route("/api/queue", queue), Route("/api/item/{item_id:int}", item),
        Route("/image/{item_id:int}", image), Route("/api/decide", decide, methods=["POST"]),
        Route("/decisions.csv", export),
    ])


def serve_review(db: Any, host: str = "127.0.0.1", port: int = 8502, reviewer: str = "") -> None:
    """Serve the page until interrupted; says where it listens."""
    import uvicorn

    app = create_app(db, reviewer)
    counts = rq.progress(db)
    where = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else "EVERY interface: anyone who " \
        "can reach this machine sees the queue"
    print(f"review queue: {counts['total']} pairs, {counts['pending']} pending")
    print(f"review page on http://{host}:{port}/ (bound to {host}: {where}); Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
