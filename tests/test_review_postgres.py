"""The scores database and the review queue on a real PostgreSQL server: a throwaway cluster in a
temporary folder, reached over its Unix socket only (no TCP port), started and stopped by the test.

Skips, naming the package, where the server binaries (Debian's ``postgresql``) or the driver
(``psycopg2-binary``, in requirements.lock) are missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _server_binaries() -> Path | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                    if Path(p).parent.name.isdigit() else 0, reverse=True):
        if os.access(f"{d}/initdb", os.X_OK) and os.access(f"{d}/pg_ctl", os.X_OK):
            return Path(d)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:  # the port only names the socket file; the server listens on no TCP port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """An SQLAlchemy URL of a fresh PostgreSQL cluster (database ``postgres``, role ``mmclinic``,
    trust authentication on its Unix socket only)."""
    bindir = _server_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("no PostgreSQL driver: install psycopg2-binary (pinned in requirements.lock)")
    root = Path(tempfile.mkdtemp(prefix="mmclinic-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and the server refuse to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root needs the 'postgres' system user: apt-get install postgresql")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(*args: str) -> None:
        proc = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=180)
        if proc.returncode:
            log = (root / "server.log").read_text() if (root / "server.log").is_file() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr[-2000:]}{log[-2000:]}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "mmclinic", "--auth=trust", "-E", "UTF8", "--locale=C")
    with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{root}'\nport = {port}\nfsync = off\n")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "120", "start")
    try:
        yield f"postgresql+psycopg2://mmclinic@/postgres?host={root}&port={port}"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _create_database(url: str, name: str) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return url.replace("/postgres?", f"/{name}?")


def test_score_queue_decisions_and_csv_round_trip_on_postgresql(postgres_url, exported_model, dataset, tmp_path):
    import sqlalchemy as sa

    from mmclinic.data import review_queue as rq
    from mmclinic.data.negatives import load_reviews
    from mmclinic.errors import UsageError
    from mmclinic.serve.scoring import score

    db = _create_database(postgres_url, "scores_a")
    first = score(exported_model.path, data=dataset, db=db, split="train")
    assert first.pairs > 0 and first.flagged >= 3, first
    engine = sa.create_engine(db)
    assert engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from pair_scores")).scalar() == first.pairs
        assert conn.execute(sa.text("select count(*) from scoring_runs")).scalar() == 1
    pending = rq.queue_rows(db, "pending")
    assert len(pending) == first.flagged and all(r["model_name"] == exported_model.path.parent.name for r in pending)

    # decisions: all or none (an unknown pair writes nothing), the last one wins, history keeps both
    a, b, c = (r["pair_id"] for r in pending[:3])
    with pytest.raises(UsageError, match="unknown pair_id no-such-pair"):
        rq.decide_many(db, [rq.Decision(a, "confirmed_mismatch", "ana"), rq.Decision("no-such-pair", "dismissed", "ana")])
    assert rq.history(db) == [] and rq.progress(db)["pending"] == first.flagged
    rq.decide_many(db, [rq.Decision(a, "confirmed_match", "ana"), rq.Decision(b, "confirmed_match", "ana"),
                        rq.Decision(c, "dismissed", "ben", "artefact, left arm")])
    rq.decide(db, a, "confirmed_mismatch", "ben", "report of the previous study")
    assert rq.progress(db)["confirmed_mismatch"] == 1 and rq.progress(db)["confirmed_match"] == 1
    assert [h["reviewer"] for h in rq.history(db, a)] == ["ana", "ben"]

    # re-scoring with the same model adds no queue rows and keeps the decisions
    again = score(exported_model.path, data=dataset, db=db, split="train")
    assert again.flagged == first.flagged and len(rq.queue_rows(db)) == first.flagged
    assert {r["pair_id"]: r["status"] for r in rq.queue_rows(db) if r["status"] != "pending"} == {
        a: "confirmed_mismatch", b: "confirmed_match", c: "dismissed"}

    # training reads the decisions by URL, with the scoring runs that queued them
    reviews = load_reviews(db)
    assert {k: v["status"] for k, v in reviews.decisions.items()} == {a: "confirmed_mismatch", b: "confirmed_match",
                                                                     c: "dismissed"}
    assert reviews.scoring_run_ids == [first.scoring_run_id]

    # CSV round trip into a second database scored from the same split
    csv = tmp_path / "decisions.csv"
    assert rq.export_csv(db, csv) == 3
    db_b = _create_database(postgres_url, "scores_b")
    score(exported_model.path, data=dataset, db=db_b, split="train")
    assert rq.import_csv(db_b, csv) == 3
    got = {r["pair_id"]: (r["status"], r["reviewer"], r["note"] or "") for r in rq.queue_rows(db_b)
           if r["status"] != "pending"}
    assert got == {a: ("confirmed_mismatch", "ben", "report of the previous study"), b: ("confirmed_match", "ana", ""),
                   c: ("dismissed", "ben", "artefact, left arm")}
    assert {h["via"] for h in rq.history(db_b)} == {"csv"}
    rq.export_csv(db_b, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_text() == csv.read_text()

    # an older database gains the columns it lacks (the schema is migrated in place)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE review_queue DROP COLUMN match_score"))
    assert rq.ensure_schema(engine) == ["review_queue.match_score"]
    engine.dispose()
