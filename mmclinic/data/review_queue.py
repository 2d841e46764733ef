"""The review queue: the pairs ``mmclinic score`` flagged, and the decisions reviewers make on them.

Two tables beside ``pair_scores`` (same database, any SQLAlchemy URL; SQLite by default):

- ``review_queue``: one row per flagged pair and model version (``pair_id``, ``image_key``,
  ``report_key``, ``model_name``, ``model_version``, ``scoring_run_id``, ``origin``, ``score`` =
  the mismatch score, ``match_score``, ``threshold``, ``status``, ``reviewer``, ``note``,
  ``decided_at``). ``status`` is one of :data:`STATUSES`. ``origin`` says where the page finds the
  de-identified image and report (``dataset:FOLDER`` or ``csv:FILE``); no text or pixels are stored.
- ``review_history``: every decision ever made (``pair_id``, ``status``, ``reviewer``, ``note``,
  ``decided_at``, ``via``), so that two reviewers deciding one pair both stay on record; the
  queue holds the last one.

A decision is about the pair (this image with this report), not about a model: it applies to
every queue row of the pair, and a pair queued again later (re-scoring, a new model version)
keeps the decision it already has. Re-scoring with the same model adds no rows. Rows are written
in batches, each one transaction, so an interrupted ``score`` re-run completes the queue.

The schema is created, or brought up to date, by :func:`ensure_schema` (missing tables, columns
and indexes are added; nothing is dropped).
"""

from __future__ import annotations

import csv
import datetime as dt
import getpass
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmclinic.errors import MmclinicError, UsageError

PENDING = "pending"
DECISIONS = ("confirmed_mismatch", "confirmed_match", "dismissed")
STATUSES = (PENDING, *DECISIONS)
CSV_COLUMNS = ("pair_id", "status", "reviewer", "note")
BATCH = 500

__all__ = ["PENDING", "DECISIONS", "STATUSES", "CSV_COLUMNS", "Decision", "engine_for", "ensure_schema",
           "enqueue", "decide", "decide_many", "queue_rows", "progress", "history", "export_csv", "import_csv",
           "read_decisions_csv", "decided_pairs"]


@dataclass(frozen=True)
class Decision:
    pair_id: str
    status: str
    reviewer: str
    note: str = ""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def engine_for(db: Any, arg: str = "DB"):
    """An SQLAlchemy engine for a URL, an existing engine, or a path to an SQLite file."""
    import sqlalchemy as sa

    if isinstance(db, sa.engine.Engine):
        return db
    url = str(db)
    if "://" not in url:
        path = Path(url)
        if not path.is_file():
            raise UsageError(f"{arg} {url}: no such database file (give a file or an SQLAlchemy URL)")
        url = f"sqlite:///{path.resolve()}"
    try:
        return sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise UsageError(f"{arg} {db!r}: not a usable database URL ({type(exc).__name__})") from None


def tables(metadata):
    """``(review_queue, review_history)`` on ``metadata``."""
    import sqlalchemy as sa

    queue = sa.Table(
        "review_queue", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pair_id", sa.String(128), nullable=False, index=True),
        sa.Column("image_key", sa.String(256)), sa.Column("report_key", sa.String(256)),
        sa.Column("model_name", sa.String(128), nullable=False), sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("scoring_run_id", sa.String(36)), sa.Column("origin", sa.String(1024)),
        sa.Column("score", sa.Float), sa.Column("match_score", sa.Float), sa.Column("threshold", sa.Float),
        sa.Column("status", sa.String(32), nullable=False, default=PENDING),
        sa.Column("reviewer", sa.String(128)), sa.Column("note", sa.Text),
        sa.Column("decided_at", sa.DateTime(timezone=True)), sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Index("uq_review_queue_pair_model", "pair_id", "model_name", "model_version", unique=True),
    )
    hist = sa.Table(
        "review_history", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pair_id", sa.String(128), nullable=False, index=True),
        sa.Column("status", sa.String(32), nullable=False), sa.Column("reviewer", sa.String(128)),
        sa.Column("note", sa.Text), sa.Column("decided_at", sa.DateTime(timezone=True)),
        sa.Column("via", sa.String(32)),
    )
    return queue, hist


_META = None


def _meta():
    global _META
    if _META is None:
        import sqlalchemy as sa

        _META = sa.MetaData()
        tables(_META)
    return _META


def csv_digest(csv_file: str | Path) -> str:
    """A short content digest of a CSV file (for :func:`default_pair_id`)."""
    import hashlib

    return hashlib.sha256(Path(csv_file).read_bytes()).hexdigest()[:12]


def default_pair_id(digest: str, row_index: int) -> str:
    """The pair id of a CSV row without a ``pair_id``: the file's content digest (:func:`csv_digest`)
    and its line, so that row 2 of one clinic's CSV is never taken for row 2 of another's."""
    return f"{digest}:row{row_index + 2}"


def queue_tables():
    m = _meta()
    return m.tables["review_queue"], m.tables["review_history"]


def ensure_schema(engine) -> list[str]:
    """Create the review tables, or add the columns and indexes an older database lacks. Returns
    what was added (``table``, ``table.column``, ``index name``)."""
    import sqlalchemy as sa

    added: list[str] = []
    try:
        insp = sa.inspect(engine)
        existing = set(insp.get_table_names())
        with engine.begin() as conn:
            for table in _meta().sorted_tables:
                if table.name not in existing:
                    table.create(conn)
                    added.append(table.name)
                    continue
                have = {c["name"] for c in insp.get_columns(table.name)}
                for col in table.columns:
                    if col.name not in have:
                        ddl = col.type.compile(dialect=engine.dialect)
                        conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {ddl}'))
                        added.append(f"{table.name}.{col.name}")
                have_idx = {i["name"] for i in insp.get_indexes(table.name)}
                for idx in table.indexes:
                    if idx.name not in have_idx:
                        idx.create(conn)
                        added.append(idx.name)
    except sa.exc.SQLAlchemyError as exc:
        raise MmclinicError(f"review queue: cannot create or migrate the tables ({type(exc).__name__})") from None
    return added


def _latest_decisions(conn, pair_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    import sqlalchemy as sa

    _, hist = queue_tables()
    out: dict[str, dict[str, Any]] = {}
    if not pair_ids:
        return out
    rows = conn.execute(sa.select(hist).where(hist.c.pair_id.in_(list(pair_ids))).order_by(hist.c.id)).mappings()
    for r in rows:
        out[r["pair_id"]] = dict(r)  # ordered by id: the last decision wins
    return out


def enqueue(engine, *, scoring_run_id: str, model_name: str, model_version: int, threshold: float, origin: str,
            pair_ids: Sequence[str], report_ids: Sequence[str], scores: Sequence[float],
            match_scores: Sequence[float], flagged: Sequence[bool], batch_size: int = BATCH) -> dict[str, int]:
    """Queue the flagged, scored pairs of one scoring run. Pairs already queued for this model are
    left as they are; a pair decided before arrives with its decision. Each batch is one
    transaction. Returns ``{"added": n, "present": m}``."""
    import math

    import sqlalchemy as sa

    ensure_schema(engine)
    queue, _ = queue_tables()
    todo = [i for i in range(len(pair_ids))
            if flagged[i] and scores[i] is not None and not math.isnan(float(scores[i]))]
    added = present = 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        keys = [str(pair_ids[i]) for i in chunk]
        for attempt in range(2):
            try:
                with engine.begin() as conn:
                    have = set(conn.execute(sa.select(queue.c.pair_id).where(
                        queue.c.model_name == model_name, queue.c.model_version == int(model_version),
                        queue.c.pair_id.in_(keys))).scalars())
                    decided = _latest_decisions(conn, [k for k in keys if k not in have])
                    now = _now()
                    rows = []
                    for i, key in zip(chunk, keys):
                        if key in have or key in {r["pair_id"] for r in rows}:
                            continue
                        d = decided.get(key)
                        rows.append({"pair_id": key, "image_key": key, "report_key": str(report_ids[i] or ""),
                                     "model_name": model_name, "model_version": int(model_version),
                                     "scoring_run_id": scoring_run_id, "origin": origin,
                                     "score": float(scores[i]),
                                     "match_score": None if match_scores[i] is None or math.isnan(match_scores[i])
                                     else float(match_scores[i]),
                                     "threshold": float(threshold),
                                     "status": d["status"] if d else PENDING,
                                     "reviewer": d["reviewer"] if d else None, "note": d["note"] if d else None,
                                     "decided_at": d["decided_at"] if d else None, "created_at": now})
                    if rows:
                        conn.execute(queue.insert(), rows)
                added += len(rows)
                present += len(keys) - len(rows)
                break
            except sa.exc.IntegrityError:
                if attempt:  # a concurrent scorer inserted the same rows twice over: give up naming the type only
                    raise MmclinicError("review queue: conflicting concurrent writes (IntegrityError)") from None
            except sa.exc.SQLAlchemyError as exc:
                raise MmclinicError(f"review queue: cannot write ({type(exc).__name__})") from None
    return {"added": added, "present": present}


def _check(decisions: Iterable[Decision], where: str = "") -> list[Decision]:
    out = []
    for n, d in enumerate(decisions):
        at = f"{where}{n + 1}" if where else f"decision {n + 1}"
        if d.status not in DECISIONS:
            raise UsageError(f"{at}: status {d.status!r} is not one of {', '.join(DECISIONS)}")
        if not str(d.pair_id or "").strip():
            raise UsageError(f"{at}: empty pair_id")
        if not str(d.reviewer or "").strip():
            raise UsageError(f"{at}: empty reviewer")
        out.append(Decision(str(d.pair_id), d.status, str(d.reviewer).strip(), str(d.note or "")))
    return out


def decide_many(db: Any, decisions: Iterable[Decision], via: str = "api") -> int:
    """Record decisions, all or none: an unknown pair or a status outside :data:`DECISIONS` is a
    UsageError before anything is written. Later decisions on a pair win; all are kept in
    ``review_history``. Returns how many were recorded."""
    import sqlalchemy as sa

    engine = engine_for(db)
    items = _check(decisions)
    ensure_schema(engine)
    queue, hist = queue_tables()
    try:
        with engine.begin() as conn:
            keys = sorted({d.pair_id for d in items})
            known = set(conn.execute(sa.select(queue.c.pair_id).where(queue.c.pair_id.in_(keys))).scalars()) \
                if keys else set()
            unknown = [k for k in keys if k not in known]
            if unknown:
                more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
                raise UsageError(f"unknown pair_id {', '.join(unknown[:5])}{more}: not in the review queue")
            for d in items:
                now = _now()
                conn.execute(hist.insert().values(pair_id=d.pair_id, status=d.status, reviewer=d.reviewer,
                                                  note=d.note, decided_at=now, via=via))
                conn.execute(queue.update().where(queue.c.pair_id == d.pair_id).values(
                    status=d.status, reviewer=d.reviewer, note=d.note, decided_at=now))
    except sa.exc.SQLAlchemyError as exc:
        raise MmclinicError(f"review queue: cannot record the decisions ({type(exc).__name__})") from None
    return len(items)


def decide(db: Any, pair_id: str, status: str, reviewer: str | None = None, note: str = "", via: str = "api") -> None:
    """Record one decision (see :func:`decide_many`); ``reviewer`` defaults to the login name."""
    decide_many(db, [Decision(pair_id, status, reviewer or getpass.getuser(), note)], via=via)


def queue_rows(db: Any, status: str | None = None) -> list[dict[str, Any]]:
    """The queue, one row per pair (its newest queue row), most suspicious first."""
    import sqlalchemy as sa

    engine = engine_for(db)
    ensure_schema(engine)
    queue, _ = queue_tables()
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(queue).order_by(queue.c.id)).mappings()]
    per_pair: dict[str, dict[str, Any]] = {}
    for r in rows:
        per_pair[r["pair_id"]] = r
    out = [r for r in per_pair.values() if status is None or r["status"] == status]
    out.sort(key=lambda r: (-(r["score"] if r["score"] is not None else float("-inf")), r["pair_id"]))
    return out


def progress(db: Any) -> dict[str, int]:
    """Pairs per status, and ``total``."""
    counts = dict.fromkeys(STATUSES, 0)
    for r in queue_rows(db):
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    counts["total"] = sum(counts[s] for s in STATUSES)
    return counts


def history(db: Any, pair_id: str | None = None) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    engine = engine_for(db)
    ensure_schema(engine)
    _, hist = queue_tables()
    q = sa.select(hist).order_by(hist.c.id)
    if pair_id is not None:
        q = q.where(hist.c.pair_id == pair_id)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def export_csv(db: Any, path: str | Path) -> int:
    """Write the decided pairs as ``pair_id, status, reviewer, note``; returns the row count."""
    rows = [r for r in queue_rows(db) if r["status"] in DECISIONS]
    rows.sort(key=lambda r: r["pair_id"])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r["pair_id"], r["status"], r["reviewer"] or "", r["note"] or ""])
    return len(rows)


def read_decisions_csv(path: str | Path) -> list[Decision]:
    """Decisions from a CSV with exactly the columns ``pair_id, status, reviewer, note`` (any
    order); extra or missing columns, or a bad status, are a UsageError naming them."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: not found")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            extra = [c for c in header if c not in CSV_COLUMNS]
            if missing or extra:
                parts = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + \
                        ([f"unexpected column(s) {', '.join(extra)}"] if extra else [])
                raise UsageError(f"{path}: {'; '.join(parts)} (expected {', '.join(CSV_COLUMNS)})")
            rows = [{k.strip(): (v or "").strip() if k != "note" else (v or "") for k, v in r.items() if k}
                    for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: cannot be read as UTF-8 CSV ({type(exc).__name__})") from None
    out = [Decision(r["pair_id"], r["status"], r["reviewer"], r["note"]) for r in rows]
    return _check(out, where=f"{path}: data row ")


def import_csv(db: Any, path: str | Path) -> int:
    """Record the decisions of a CSV (all or none); returns how many."""
    return decide_many(db, read_decisions_csv(path), via="csv")


def decided_pairs(db: Any) -> dict[str, dict[str, Any]]:
    """Each decided pair's last decision with the scoring runs that queued it:
    ``{pair_id: {"status", "reviewer", "report_key", "scoring_run_ids": [...]}}`` (training reads this)."""
    import sqlalchemy as sa

    engine = engine_for(db)
    ensure_schema(engine)
    queue, _ = queue_tables()
    out: dict[str, dict[str, Any]] = {}
    with engine.connect() as conn:
        for r in conn.execute(sa.select(queue).where(queue.c.status.in_(DECISIONS)).order_by(queue.c.id)).mappings():
            d = out.setdefault(r["pair_id"], {"status": r["status"], "reviewer": r["reviewer"],
                                              "report_key": r["report_key"], "scoring_run_ids": []})
            d["status"], d["reviewer"] = r["status"], r["reviewer"]
            if r["scoring_run_id"] and r["scoring_run_id"] not in d["scoring_run_ids"]:
                d["scoring_run_ids"].append(r["scoring_run_id"])
    return out
