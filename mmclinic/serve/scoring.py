"""``mmclinic score``: batch-score image-report pairs with an exported model into SQL.

Writes two tables through SQLAlchemy (SQLite by default, any URL such as
PostgreSQL): ``scoring_runs`` (one row per invocation) and ``pair_scores`` (one
row per pair, with the review flag). Only pseudonymous keys and scores are
stored: no report text, no image.

Report text goes to the SavedModel as given: its graph makes the model text (the run's text
definition, :mod:`mmclinic.text.model_text`), as it does behind ``mmclinic serve`` and
TensorFlow Serving, so a CSV row scores what a REST client sending the same report gets.
Images of a CSV are read with :func:`mmclinic.data.images.read_image` under a time box
(:data:`~mmclinic.data.images.DEFAULT_DECODE_TIMEOUT` per file; a stuck file is recorded as
``decode_timeout``).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmclinic.artifacts import DatasetDir, ExportedModel
from mmclinic.errors import InputError, MmclinicError, UsageError


@dataclass(frozen=True)
class ScoreResult:
    scoring_run_id: str
    pairs: int
    flagged: int
    failed: int
    db: str


def _tables(metadata):
    import sqlalchemy as sa

    runs = sa.Table(
        "scoring_runs", metadata,
        sa.Column("scoring_run_id", sa.String(36), primary_key=True),
        sa.Column("model_name", sa.String(128)), sa.Column("model_version", sa.Integer),
        sa.Column("threshold", sa.Float), sa.Column("source", sa.String(256)),
        sa.Column("pairs", sa.Integer), sa.Column("flagged", sa.Integer), sa.Column("failed", sa.Integer),
        sa.Column("created_at", sa.DateTime(timezone=True)),
    )
    scores = sa.Table(
        "pair_scores", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("scoring_run_id", sa.String(36), sa.ForeignKey("scoring_runs.scoring_run_id"), index=True),
        sa.Column("pair_id", sa.String(128), index=True), sa.Column("report_id", sa.String(128)),
        sa.Column("match_score", sa.Float), sa.Column("mismatch_score", sa.Float),
        sa.Column("flagged", sa.Boolean), sa.Column("error", sa.String(64)),
    )
    return runs, scores


def _pairs_from_dataset(data: DatasetDir, split: str) -> tuple[list[str], list[str], list[bytes | None], list[str],
                                                               list]:
    splits = ("train", "val", "test") if split == "all" else (split,)
    ids, rids, png, texts, errs = [], [], [], [], []
    for s in splits:
        d = data.load_split(s)
        ids += d.meta["image_id"].tolist(); rids += d.meta["report_id"].tolist()
        png += d.png; texts += d.texts; errs += [None] * len(d.png)
    return ids, rids, png, texts, errs


def _pairs_from_csv(path: Path) -> tuple[list[str], list[str], list[bytes | None], list[str], list]:
    import pandas as pd

    from mmclinic.data.images import DEFAULT_DECODE_TIMEOUT, read_image, to_png_bytes

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--input {path}: cannot be read as CSV ({type(exc).__name__})") from None
    for col in ("image_path", "report_text"):
        if col not in df.columns:
            raise UsageError(f"--input {path}: missing column {col}")
    from mmclinic.data.review_queue import csv_digest, default_pair_id

    digest = csv_digest(path)
    ids, rids, png, texts, errs = [], [], [], [], []
    for i, row in df.iterrows():
        pair_id = row.get("pair_id") or default_pair_id(digest, i)
        ids.append(pair_id); rids.append(row.get("report_id", ""))
        # The raw report: the model's graph applies the text definition the run was trained with.
        texts.append(row["report_text"])
        img_path = Path(row["image_path"])
        if not img_path.is_absolute():
            img_path = path.parent / img_path
        try:
            record = read_image(img_path, decode_timeout=DEFAULT_DECODE_TIMEOUT)
            png.append(to_png_bytes(record.pixels, 1024)); errs.append(None)
        except InputError as exc:
            png.append(None); errs.append(exc.reason_code)
    return ids, rids, png, texts, errs


def score(model_dir: str | Path, *, data: str | Path | None = None, input_csv: str | Path | None = None,
          db: str = "sqlite:///scores.db", split: str = "test", batch_size: int = 64) -> ScoreResult:
    """Score pairs from a dataset split (or a CSV of image_path, report_text) into ``db``.

    ``model_dir``: ``MODEL_BASE``, ``MODEL_BASE/NAME`` (its latest complete version) or
    ``MODEL_BASE/NAME/VERSION`` (see :class:`~mmclinic.artifacts.ExportedModel`)."""
    import sqlalchemy as sa
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    if (data is None) == (input_csv is None):
        raise UsageError("give exactly one of --data DATASET or --input CSV")
    model = ExportedModel.open(model_dir, "MODEL_DIR")
    threshold = model.mismatch_threshold
    if data is not None:
        dataset = DatasetDir.open(data)
        ids, rids, png, texts, errs = _pairs_from_dataset(dataset, split)
        source = f"dataset:{dataset.path.name}:{split}"
    else:
        input_csv = Path(input_csv)
        if not input_csv.is_file():
            raise UsageError(f"--input not found: {input_csv}")
        ids, rids, png, texts, errs = _pairs_from_csv(input_csv)
        source = f"csv:{input_csv.name}"
    try:
        engine = sa.create_engine(db)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise UsageError(f"--db {db!r}: not a usable database URL ({type(exc).__name__})") from None

    serve = tf.saved_model.load(str(model.path)).signatures["serving_default"]
    ok = [i for i, e in enumerate(errs) if e is None]
    match = np.full(len(ids), np.nan)
    logit = np.full(len(ids), np.nan)
    for start in range(0, len(ok), batch_size):
        idx = ok[start:start + batch_size]
        out = serve(image_bytes=tf.constant([png[i] for i in idx]), report_text=tf.constant([texts[i] for i in idx]))
        match[idx] = out["match_score"].numpy()
        logit[idx] = out["match_logit"].numpy()
    mismatch = -logit
    flagged = np.where(np.isnan(mismatch), False, mismatch >= threshold)
    run_id = str(uuid.uuid4())
    metadata = sa.MetaData()
    runs_t, scores_t = _tables(metadata)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(runs_t.insert().values(
                scoring_run_id=run_id, model_name=model.name, model_version=model.version,
                threshold=threshold, source=source, pairs=len(ids), flagged=int(flagged.sum()),
                failed=int(sum(e is not None for e in errs)), created_at=dt.datetime.now(dt.timezone.utc)))
            conn.execute(scores_t.insert(), [
                {"scoring_run_id": run_id, "pair_id": ids[i], "report_id": rids[i],
                 "match_score": None if np.isnan(match[i]) else float(match[i]),
                 "mismatch_score": None if np.isnan(mismatch[i]) else float(mismatch[i]),
                 "flagged": bool(flagged[i]), "error": errs[i]} for i in range(len(ids))])
    except sa.exc.SQLAlchemyError as exc:
        # The driver's message can echo the URL (with a password) or row values: name the type only.
        raise MmclinicError(f"--db: cannot write the scores ({type(exc).__name__})") from None
    from mmclinic.data.review_queue import enqueue  # the flagged pairs go to review (mmclinic review)

    enqueue(engine, scoring_run_id=run_id, model_name=model.name, model_version=model.version, threshold=threshold,
            origin=f"dataset:{Path(data).resolve()}" if data is not None else f"csv:{Path(input_csv).resolve()}",
            pair_ids=ids, report_ids=rids, scores=mismatch.tolist(), match_scores=match.tolist(),
            flagged=flagged.tolist())
    return ScoreResult(scoring_run_id=run_id, pairs=len(ids), flagged=int(flagged.sum()),
                       failed=int(sum(e is not None for e in errs)), db=db)
