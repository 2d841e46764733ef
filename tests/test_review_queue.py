"""The review queue: idempotent enqueueing, decisions, history, CSV round trip, schema migration."""

from __future__ import annotations

import math

import pytest
import sqlalchemy as sa

from mmclinic.errors import UsageError
from mmclinic.data import review_queue as rq


def _enqueue(db, run="run-1", version=1, n=6, flagged=None, batch_size=500):
    ids = [f"img{i:02d}" for i in range(n)]
    return rq.enqueue(rq.engine_for(db), scoring_run_id=run, model_name="tiny", model_version=version,
                      threshold=0.5, origin="dataset:/nowhere", pair_ids=ids, report_ids=[f"r{i}" for i in range(n)],
                      scores=[1.0 + i for i in range(n)], match_scores=[0.1] * n,
                      flagged=flagged if flagged is not None else [i % 2 == 0 for i in range(n)],
                      batch_size=batch_size)


@pytest.fixture()
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'scores.db'}"


def test_enqueue_is_idempotent_and_keeps_decisions(db):
    assert _enqueue(db) == {"added": 3, "present": 0}
    rows = rq.queue_rows(db)
    assert [r["pair_id"] for r in rows] == ["img04", "img02", "img00"]  # most suspicious first
    assert all(r["status"] == "pending" for r in rows)
    rq.decide(db, "img02", "confirmed_mismatch", "ana", "wrong side")
    assert _enqueue(db, run="run-2") == {"added": 0, "present": 3}
    assert len(rq.queue_rows(db)) == 3
    # a new model version queues the pair again; the decision comes with it
    _enqueue(db, run="run-3", version=2)
    engine = rq.engine_for(db)
    with engine.connect() as conn:
        got = conn.execute(sa.text("select model_version, status from review_queue where pair_id='img02' "
                                   "order by model_version")).all()
    assert got == [(1, "confirmed_mismatch"), (2, "confirmed_mismatch")]
    assert rq.progress(db) == {"pending": 2, "confirmed_mismatch": 1, "confirmed_match": 0, "dismissed": 0,
                               "total": 3}


def test_nan_scores_and_unflagged_pairs_stay_out(db):
    ids = ["a", "b", "c"]
    out = rq.enqueue(rq.engine_for(db), scoring_run_id="r", model_name="m", model_version=1, threshold=0.0,
                     origin="csv:/x.csv", pair_ids=ids, report_ids=["", "", ""], scores=[math.nan, 2.0, 3.0],
                     match_scores=[math.nan, 0.1, 0.2], flagged=[True, True, False])
    assert out == {"added": 1, "present": 0}
    assert [r["pair_id"] for r in rq.queue_rows(db)] == ["b"]


def test_interrupted_run_completes_batch_by_batch(db, monkeypatch):
    calls = {"n": 0}
    real = rq._latest_decisions

    def failing(conn, keys):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(conn, keys)

    monkeypatch.setattr(rq, "_latest_decisions", failing)
    with pytest.raises(KeyboardInterrupt):
        _enqueue(db, n=10, flagged=[True] * 10, batch_size=4)
    assert len(rq.queue_rows(db)) == 4  # the first batch was committed, the second rolled back
    monkeypatch.setattr(rq, "_latest_decisions", real)
    assert _enqueue(db, n=10, flagged=[True] * 10, batch_size=4) == {"added": 6, "present": 4}
    assert len(rq.queue_rows(db)) == 10


def test_bad_decisions_write_nothing(db):
    _enqueue(db)
    with pytest.raises(UsageError, match="unknown pair_id nope"):
        rq.decide_many(db, [rq.Decision("img00", "dismissed", "ana"), rq.Decision("nope", "dismissed", "ana")])
    with pytest.raises(UsageError, match="'maybe' is not one of confirmed_mismatch"):
        rq.decide_many(db, [rq.Decision("img00", "dismissed", "ana"), rq.Decision("img02", "maybe", "ana")])
    with pytest.raises(UsageError, match="empty reviewer"):
        rq.decide(db, "img00", "dismissed", " ")
    assert rq.history(db) == []
    assert all(r["status"] == "pending" for r in rq.queue_rows(db))


def test_two_reviewers_last_wins_both_in_history(db):
    _enqueue(db)
    rq.decide(db, "img00", "confirmed_mismatch", "ana", "left/right")
    rq.decide(db, "img00", "confirmed_match", "ben", "it is right")
    row = {r["pair_id"]: r for r in rq.queue_rows(db)}["img00"]
    assert (row["status"], row["reviewer"], row["note"]) == ("confirmed_match", "ben", "it is right")
    assert [(h["reviewer"], h["status"]) for h in rq.history(db, "img00")] == [
        ("ana", "confirmed_mismatch"), ("ben", "confirmed_match")]
    decided = rq.decided_pairs(db)
    assert decided == {"img00": {"status": "confirmed_match", "reviewer": "ben", "report_key": "r0",
                                 "scoring_run_ids": ["run-1"]}}


def test_csv_round_trip_and_bad_columns(db, tmp_path):
    _enqueue(db)
    rq.decide(db, "img00", "dismissed", "ana", "artefact, \"quoted\"")
    out = tmp_path / "d.csv"
    assert rq.export_csv(db, out) == 1
    assert out.read_text().splitlines()[0] == "pair_id,status,reviewer,note"
    other = f"sqlite:///{tmp_path / 'other.db'}"
    _enqueue(other)
    assert rq.import_csv(other, out) == 1
    row = {r["pair_id"]: r for r in rq.queue_rows(other)}["img00"]
    assert (row["status"], row["note"]) == ("dismissed", "artefact, \"quoted\"")
    assert rq.history(other)[0]["via"] == "csv"

    bad = tmp_path / "bad.csv"
    bad.write_text("pair_id,status,reviewer,comment,extra\nimg02,dismissed,ana,x,y\n")
    with pytest.raises(UsageError, match=r"missing column\(s\) note; unexpected column\(s\) comment, extra"):
        rq.import_csv(other, bad)
    bad.write_text("pair_id,status,reviewer,note\nimg02,dismissed,ana,\nimg04,wrong,ana,\n")
    with pytest.raises(UsageError, match="data row 2: status 'wrong'"):
        rq.import_csv(other, bad)
    bad.write_text("pair_id,status,reviewer,note\nimg02,dismissed,ana,\nimg99,dismissed,ana,\n")
    with pytest.raises(UsageError, match="unknown pair_id img99"):
        rq.import_csv(other, bad)
    assert len(rq.history(other)) == 1  # nothing of the bad files was written


def test_schema_migration_adds_missing_columns_and_tables(db):
    engine = rq.engine_for(db)
    with engine.begin() as conn:
        conn.execute(sa.text("create table review_queue (id integer primary key, pair_id varchar(128) not null, "
                             "model_name varchar(128) not null, model_version integer not null, "
                             "status varchar(32) not null)"))
        conn.execute(sa.text("insert into review_queue (pair_id, model_name, model_version, status) "
                             "values ('old', 'tiny', 1, 'pending')"))
    added = rq.ensure_schema(engine)
    assert "review_history" in added and "review_queue.note" in added and "uq_review_queue_pair_model" in added
    assert rq.ensure_schema(engine) == []
    _enqueue(db)
    assert {r["pair_id"] for r in rq.queue_rows(db)} == {"old", "img00", "img02", "img04"}


def test_cli_export_import(db, tmp_path, capsys):
    from mmclinic.cli import main

    _enqueue(db)
    f = tmp_path / "in.csv"
    f.write_text("pair_id,status,reviewer,note\nimg00,confirmed_mismatch,ana,\n")
    path_db = db.removeprefix("sqlite:///")
    assert main(["review", path_db, "--import", str(f), "--export", str(tmp_path / "out.csv")]) == 0
    assert "img00,confirmed_mismatch,ana," in (tmp_path / "out.csv").read_text()
    f.write_text("pair_id,status\nimg00,confirmed_mismatch\n")
    assert main(["review", path_db, "--import", str(f)]) == 2
    assert "missing column(s) reviewer, note" in capsys.readouterr().err


@pytest.mark.slow
def test_score_fills_the_queue_once(dataset, exported_model, tmp_path):
    from mmclinic.serve.scoring import score

    db = f"sqlite:///{tmp_path / 'scores.db'}"
    first = score(exported_model.path, data=dataset, db=db)
    rows = rq.queue_rows(db)
    assert len(rows) == first.flagged > 0
    assert {r["scoring_run_id"] for r in rows} == {first.scoring_run_id}
    assert all(r["origin"] == f"dataset:{dataset.resolve()}" and r["model_version"] == exported_model.version
               for r in rows)
    rq.decide(db, rows[0]["pair_id"], "confirmed_mismatch", "ana")
    score(exported_model.path, data=dataset, db=db)  # the same pairs, the same model: no new rows
    again = rq.queue_rows(db)
    assert len(again) == len(rows)
    assert {r["pair_id"]: r["status"] for r in again}[rows[0]["pair_id"]] == "confirmed_mismatch"
