"""``kill -9`` trials: each command is killed at a random point, run again, and must end consistent.

Every trial starts the real command (``.venv/bin/mmclinic ...``) as a subprocess on a small
synthetic archive (``mmclinic synth``), sends it SIGKILL after a seeded random delay, checks what
the kill left behind, runs the very same command again and checks the result:

- ``ingest``: the dataset folder is absent or complete after the kill (a dataset that was there
  before stays readable); after the re-run every input is accounted for exactly once (accepted +
  quarantined == inputs, no repeated ``image_id`` or source path, no stray image file, no
  ``DATASET.partial`` left) and the dataset equals the one an uninterrupted run wrote.
- ``train``: the same command and workdir resume and, in deterministic mode, end with the same
  checkpoint tensors as an uninterrupted run; one MLflow run per workdir, finished, with its
  parameters, and the model registered.
- ``evaluate``: ``REPORT.json`` (and the run's ``eval/`` copy) is absent or complete JSON after the
  kill; after the re-run it holds the same figures as an uninterrupted evaluation.
- ``export``: a half-written version is never listed (:func:`mmclinic.artifacts.find_models`) or
  labelled; after the re-run exactly one complete new version exists beside the ones before.
- ``score``: a few review-queue items are decided (through :mod:`mmclinic.data.review_queue`)
  before a killed re-score; after the kill and after the re-run every scoring run is complete or
  absent, no row is repeated or lost, and the decisions are kept.

Kill times are spread over each command's duration, measured first by an uninterrupted run
(stratified: trial i of n draws from the i-th n-th of the window); two training runs are killed at
events a clock rarely hits instead (``run.json`` written; the last step checkpointed). The script prints a summary table
(stage, trials, kill times, outcomes) and exits 1 when any check failed.

Usage: ``python reliability/kill_trials.py [--seed N] [--workdir DIR] [--keep]
[--trials ingest=6,train=4,train-triggered=2,evaluate=3,export=3,score=4]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # this process reads checkpoints with TensorFlow
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mmclinic.data.ingest_stages import previous_dataset_path  # noqa: E402

MMCLINIC = REPO / ".venv" / "bin" / "mmclinic"
TINY = REPO / "experiments" / "tiny.yaml"
KEY_HEX = "6d6d636c696e69632d6b696c6c2d6b6579" * 2
DEFAULT_TRIALS = {"ingest": 6, "train": 4, "train-triggered": 2, "evaluate": 3, "export": 3, "score": 4}
"""Trials per stage; ``train-triggered``: training runs killed at an event (at most 2) instead of a clock."""
WINDOW = (0.05, 1.0)
"""Kill times as fractions of the uninterrupted run's duration."""
TRAIN_SETTINGS = ("train.steps=16", "train.checkpoint_every=4", "train.eval_every=16", "train.log_every=4",
                  "train.deterministic=true", "data.deterministic=true", "model.dropout=0.1",
                  "export.min_recall5_over_chance=0.0", "export.min_mismatch_auroc=0.0")
"""Deterministic (as tests/test_training.py's resume test), short, and exportable whatever it learned."""
MODEL_NAME = "killtrial"


class CheckFailed(AssertionError):
    """A consistency check failed: the message says which and how."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


# --------------------------------------------------------------------------- running commands


@dataclasses.dataclass
class Outcome:
    """One trial: when the kill was due, whether it landed, and what the checks said."""

    stage: str
    kill_at: float
    killed: bool = False
    ok: bool = True
    detail: str = ""
    orphans: int = 0
    trigger: str = ""
    """For a kill timed by an event instead of a clock: the event (``kill_at`` is then when it came)."""


class Bench:
    """The trials' working folder, environment and commands."""

    def __init__(self, workdir: Path, seed: int = 0, log: Callable[[str], None] = print) -> None:
        self.root = Path(workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.log = log
        (self.root / "tmp").mkdir(exist_ok=True)
        self.key = self.root / "key.hex"
        self.key.write_text(KEY_HEX + "\n")
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{self.root / 'mlflow.db'}",
                    "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(self.root / "tmp"), "PYTHONUNBUFFERED": "1"}
        self.durations: dict[str, float] = {}
        self.last_kill = 0.0
        """Seconds from the start of the last killed command to its kill."""

    # ----- processes

    def run(self, args: list[str], timeout: float = 900) -> tuple[int, float, str]:
        """Run ``mmclinic ARGS`` to the end: (exit code, seconds, output tail)."""
        t0 = time.monotonic()
        proc = subprocess.run([str(MMCLINIC), *args], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        return proc.returncode, time.monotonic() - t0, (proc.stdout + proc.stderr)[-3000:]

    def must_run(self, args: list[str], what: str) -> float:
        rc, seconds, out = self.run(args)
        if rc != 0:
            raise CheckFailed(f"{what}: `mmclinic {' '.join(args)}` exited {rc}:\n{out}")
        return seconds

    def start(self, args: list[str], env: dict[str, str] | None = None, output: Path | None = None) -> subprocess.Popen:
        """Start ``mmclinic ARGS`` in its own process group (``env``: variables to change; ``output``: a file
        for its stdout and stderr, else they are dropped)."""
        out = open(output, "wb") if output is not None else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
        try:
            return subprocess.Popen([str(MMCLINIC), *args], cwd=self.root, env={**self.env, **(env or {})},
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if output is not None:
                out.close()

    def kill(self, proc: subprocess.Popen, at: float, when: Callable[[], bool] | None = None,
             limit: float = 600) -> tuple[bool, int]:
        """SIGKILL ``proc`` (the command's own process, as ``kill -9 PID``) ``at`` seconds after it started,
        or once ``when()`` holds (then ``at`` seconds later). Returns (killed before it ended, processes of
        its group still alive 15 s after the kill: orphans), the group then killed for good."""
        t0 = start = time.monotonic()
        if when is not None:
            while proc.poll() is None and not when() and time.monotonic() - t0 < limit:
                time.sleep(0.05)
            t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < at:
            time.sleep(0.02)
        if proc.poll() is not None:
            self.last_kill = time.monotonic() - start
            return False, 0
        os.kill(proc.pid, signal.SIGKILL)
        self.last_kill = time.monotonic() - start
        proc.wait()
        orphans = 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            orphans = _group_size(proc.pid)
            if orphans == 0:
                break
            time.sleep(0.2)
        if orphans:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return True, orphans

    def kill_times(self, stage: str, n: int, window: tuple[float, float] = WINDOW) -> list[float]:
        """``n`` kill delays over ``window`` of the stage's measured duration, one per stratum, shuffled."""
        lo, hi = window
        d = self.durations[stage]
        times = [d * (lo + (hi - lo) * (i + self.rng.random()) / n) for i in range(n)]
        self.rng.shuffle(times)
        return times


def _group_size(pgid: int) -> int:
    """Live processes in process group ``pgid`` (zombies left out)."""
    n = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            n += 1
    return n


# --------------------------------------------------------------------------- ingest


def ingest_args(source: Path, out: Path, key: Path) -> list[str]:
    return ["ingest", str(source), "--out", str(out), "--deid-key-file", str(key), "--max-side", "64",
            "--workers", "2"]


def image_inputs(source: Path) -> int:
    return sum(1 for p in (source / "dicom").rglob("*.dcm"))


def read_dataset(path: Path) -> dict[str, Any]:
    """The dataset's tables, read as a user would; CheckFailed naming the file that is not readable."""
    import pandas as pd

    from mmclinic.artifacts import DatasetDir

    ds = DatasetDir(path)
    out: dict[str, Any] = {}
    for key, file, reader in (("manifest", ds.manifest_path, pd.read_parquet),
                              ("reports", ds.reports_path, pd.read_parquet),
                              ("quarantine", ds.quarantine_path, lambda p: pd.read_csv(p, keep_default_na=False))):
        try:
            out[key] = reader(file)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            raise CheckFailed(f"{file} is not readable ({type(exc).__name__})") from None
    try:
        out["info"] = json.loads(ds.info_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"{ds.info_path} is not readable ({type(exc).__name__})") from None
    return out


def check_dataset(path: Path, inputs: int, reference: dict[str, Any] | None, final: bool = True) -> None:
    """Every input accounted for exactly once, nothing stray, and (with ``reference``) equal to it;
    ``final``: after a completed run, so no ``DATASET.partial`` may be left."""
    d = read_dataset(path)
    manifest, quarantine = d["manifest"], d["quarantine"]
    q_images = quarantine[quarantine["kind"] == "image"] if len(quarantine) else quarantine
    check(len(manifest) + len(q_images) == inputs,
          f"{path}: accepted {len(manifest)} + quarantined {len(q_images)} != {inputs} inputs")
    check(not manifest["image_id"].duplicated().any(), f"{path}/manifest.parquet: repeated image_id")
    check(not manifest["path"].duplicated().any(), f"{path}/manifest.parquet: repeated path")
    if len(quarantine):
        check(not quarantine["source_path"].duplicated().any(), f"{path}/quarantine.csv: repeated source_path")
    on_disk = {f"images/{p.name}" for p in (path / "images").iterdir()}
    check(on_disk == set(manifest["path"]), f"{path}/images: {len(on_disk - set(manifest['path']))} stray and "
                                            f"{len(set(manifest['path']) - on_disk)} missing image files")
    check(not final or not path.with_name(path.name + ".partial").exists(),
          f"{path.name}.partial left beside the dataset")
    if reference is not None:
        check(d["info"]["version"] == reference["info"]["version"],
              f"{path}: dataset version {d['info']['version']} differs from the uninterrupted run's "
              f"{reference['info']['version']}")
        a = manifest.sort_values("image_id").reset_index(drop=True)
        b = reference["manifest"].sort_values("image_id").reset_index(drop=True)
        check(a.equals(b), f"{path}/manifest.parquet differs from the uninterrupted run's")


def trial_ingest(bench: Bench, source: Path, reference: Path, kill_at: float, name: str,
                 prior: bool, when: Callable[[Path], Callable[[], bool]] | None = None) -> Outcome:
    """Kill an ingest (over a previous dataset when ``prior``) ``kill_at`` seconds after its start (or
    after ``when(out)()`` holds), check, re-run, check."""
    out = bench.root / name
    shutil.rmtree(out, ignore_errors=True)
    if prior:
        shutil.copytree(reference, out)
    args = ingest_args(source, out, bench.key)
    result = Outcome("ingest", kill_at)
    result.killed, result.orphans = bench.kill(bench.start(args), kill_at, when(out) if when else None)
    try:
        inputs = image_inputs(source)
        ref = read_dataset(reference)
        old = previous_dataset_path(out)  # where ingest moves the previous dataset while it swaps
        if out.exists():  # what a reader finds right after the kill: the previous dataset, or a complete new one
            check_dataset(out, inputs, ref, final=False)
        elif prior:
            check(old.exists(), f"{out}: the dataset that was there before the killed ingest is gone")
            check_dataset(old, inputs, ref, final=False)
        bench.must_run(args, "ingest re-run")
        check_dataset(out, inputs, ref)
        check(not old.exists(), f"{old} left beside the dataset after the re-run")
    except CheckFailed as exc:
        result.ok, result.detail = False, str(exc)
    return result


# --------------------------------------------------------------------------- train


def train_args(data: Path, workdir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["train", str(TINY), "--data", str(data), "--workdir", str(workdir)]
    for kv in (*TRAIN_SETTINGS, *extra):
        args += ["--set", kv]
    return args


def checkpoint_tensors(run: Path) -> dict[str, Any]:
    """The tensors of the run's latest checkpoint."""
    import tensorflow as tf

    from mmclinic.artifacts import RunDir

    latest = RunDir(run).latest_checkpoint()
    check(latest is not None, f"{run}: no checkpoint")
    reader = tf.train.load_checkpoint(latest)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def check_training(bench: Bench, run: Path, reference: Path, steps: int) -> None:
    """Step, weights against the uninterrupted run, and the run's MLflow record."""
    import mlflow
    import numpy as np

    from mmclinic.artifacts import RunDir

    info = RunDir(run).info()
    check(info.get("step") == steps, f"{run}/run.json: step {info.get('step')}, expected {steps}")
    check(Path(RunDir(run).latest_checkpoint() or "").name == f"ckpt-{steps}",
          f"{run}: latest checkpoint is {RunDir(run).latest_checkpoint()}, expected ckpt-{steps}")
    a, b = checkpoint_tensors(reference), checkpoint_tensors(run)
    check(set(a) == set(b), f"{run}: checkpoint holds other tensors than the uninterrupted run's")
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    check(not differ, f"{run}: {len(differ)} checkpoint tensors differ from the uninterrupted run's "
                      f"(e.g. {differ[:3]})")
    uri = bench.env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`mmclinic.workdir` = '{run.name}'")
    check(len(runs) == 1, f"{run}: {len(runs)} MLflow runs for one workdir")
    record = runs[0]
    check(record.info.run_id == RunDir(run).mlflow_run_id(), f"{run}/mlflow_run_id names another MLflow run")
    check(record.info.status == "FINISHED", f"{run}: MLflow run status {record.info.status}")
    check("data.manifest_sha256" in record.data.params and "train.steps" in record.data.params,
          f"{run}: the MLflow run lacks its parameters (data.manifest_sha256, train.steps)")
    versions = client.search_model_versions(f"run_id = '{record.info.run_id}'")
    check(len(versions) == 1, f"{run}: {len(versions)} registered model versions for the run, expected 1")


def _recorded_step(run: Path) -> int | None:
    """The last checkpointed step ``run.json`` records (written after the checkpoint), None without one."""
    try:
        return int(json.loads((run / "run.json").read_text()).get("step"))
    except (OSError, ValueError, TypeError):
        return None


def trial_train(bench: Bench, data: Path, reference: Path, kill_at: float, name: str, steps: int,
                when: Callable[[Path], Callable[[], bool]] | None = None,
                before_checks: Callable[[], Any] | None = None) -> Outcome:
    """Kill a training run ``kill_at`` seconds after its start (or after ``when(run)()`` holds), resume it
    with the same command, and compare it with ``reference`` (``before_checks``: wait for it, when it runs
    beside this one)."""
    run = bench.root / name
    shutil.rmtree(run, ignore_errors=True)
    args = train_args(data, run)
    result = Outcome("train", kill_at)
    result.killed, result.orphans = bench.kill(bench.start(args), kill_at, when(run) if when else None)
    try:
        if (run / "run.json").exists():
            try:
                json.loads((run / "run.json").read_text())
            except ValueError:
                raise CheckFailed(f"{run}/run.json is not complete JSON after the kill") from None
        bench.must_run(args, "train resume")
        if before_checks is not None:
            before_checks()
        check_training(bench, run, reference, steps)
    except CheckFailed as exc:
        result.ok, result.detail = False, str(exc)
    return result


# --------------------------------------------------------------------------- evaluate


def evaluate_args(run: Path, data: Path, out: Path) -> list[str]:
    return ["evaluate", str(run), "--data", str(data), "--out", str(out)]


def _report(path: Path, what: str) -> dict[str, Any] | None:
    """The report at ``path``, None when absent; CheckFailed when present but not complete JSON."""
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise CheckFailed(f"{what} {path} is present but not complete JSON") from None
    check(isinstance(report, dict) and {"retrieval", "mismatch"} <= set(report),
          f"{what} {path} lacks its retrieval / mismatch sections")
    return report


def figures(report: dict[str, Any]) -> str:
    return json.dumps({k: report[k] for k in ("retrieval", "mismatch", "zero_shot", "calibration") if k in report},
                      sort_keys=True)


def trial_evaluate(bench: Bench, run: Path, data: Path, reference: dict[str, Any], kill_at: float, name: str,
                   prior: bool) -> Outcome:
    out = bench.root / name / "REPORT.json"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    if prior:
        out.write_text(json.dumps(reference, indent=2) + "\n")
    args = evaluate_args(run, data, out)
    result = Outcome("evaluate", kill_at)
    result.killed, result.orphans = bench.kill(bench.start(args), kill_at)
    try:
        left = _report(out, "REPORT.json")
        check(left is not None or not prior, f"{out}: the previous complete report is gone after the kill")
        for copy in sorted((run / "eval").glob("*/REPORT.json")):
            _report(copy, "the run's copy")
        if (run / "eval" / "latest.json").exists():
            try:
                json.loads((run / "eval" / "latest.json").read_text())
            except ValueError:
                raise CheckFailed(f"{run}/eval/latest.json is not complete JSON after the kill") from None
        bench.must_run(args, "evaluate re-run")
        final = _report(out, "REPORT.json")
        check(final is not None, f"{out}: missing after the re-run")
        check(figures(final) == figures(reference), f"{out}: figures differ from the uninterrupted evaluation's")
    except CheckFailed as exc:
        result.ok, result.detail = False, str(exc)
    return result


# --------------------------------------------------------------------------- export


def export_args(run: Path, base: Path) -> list[str]:
    return ["export", str(run), "--out", str(base), "--name", MODEL_NAME]


def listed_versions(base: Path) -> list[int]:
    """The versions :func:`find_models` lists, each checked complete: SavedModel, variables,
    metadata, model card; the labels name listed versions; models.config parses and names them."""
    from mmclinic.artifacts import ExportedModel, find_models
    from mmclinic.errors import UsageError
    from mmclinic.serve.tfserving import parse_text_proto

    try:
        folders = find_models(base)
    except UsageError:
        folders = []
    versions: list[int] = []
    for folder in folders:
        for v in folder.versions:
            model = ExportedModel(folder.path / str(v))
            check((model.path / "variables" / "variables.index").is_file(), f"{model.path}: listed without variables")
            try:
                model.metadata  # noqa: B018 - parses and checks it
            except Exception as exc:  # noqa: BLE001
                raise CheckFailed(f"{model.path}: listed with unreadable metadata ({type(exc).__name__})") from None
            check(model.model_card_path.is_file() and model.model_card_path.stat().st_size > 0,
                  f"{model.path}: listed without its model card")
            versions.append(v)
        try:
            folder.labels()
        except UsageError as exc:
            raise CheckFailed(f"{folder.labels_path}: {exc}") from None
    numbered = [p for p in (base / MODEL_NAME).iterdir() if p.name.isdigit()] if (base / MODEL_NAME).is_dir() else []
    check(all((p / "saved_model.pb").is_file() for p in numbered), f"{base}: a numbered folder without saved_model.pb")
    config = base / "models.config"
    if config.exists():
        try:
            parsed = parse_text_proto(config.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckFailed(f"{config}: does not parse ({exc})") from None
        text = json.dumps(parsed)
        check(MODEL_NAME in text or not versions, f"{config}: does not name {MODEL_NAME}")
    return sorted(versions)


def trial_export(bench: Bench, run: Path, base: Path, kill_at: float) -> Outcome:
    before = listed_versions(base)
    args = export_args(run, base)
    result = Outcome("export", kill_at)
    result.killed, result.orphans = bench.kill(bench.start(args), kill_at)
    try:
        after_kill = listed_versions(base)
        check(set(before) <= set(after_kill) and len(after_kill) <= len(before) + 1,
              f"{base}: versions {before} became {after_kill} after the kill")
        bench.must_run(args, "export re-run")
        final = listed_versions(base)
        new = [v for v in final if v not in after_kill]
        check(set(after_kill) <= set(final) and len(new) == 1 and new[0] > max(after_kill, default=0),
              f"{base}: versions {after_kill} after the kill, {final} after the re-run (expected one new version)")
        from mmclinic.artifacts import ModelFolder

        labels = ModelFolder(base / MODEL_NAME).labels()  # (checked to name listed versions above)
        check(labels.get("canary") in (None, new[0]), f"{base}/{MODEL_NAME}: label canary is {labels.get('canary')} "
                                                      f"after the re-run, not the new version {new[0]}")
    except CheckFailed as exc:
        result.ok, result.detail = False, str(exc)
    return result


# --------------------------------------------------------------------------- score


def score_args(model: Path, data: Path, db: Path) -> list[str]:
    return ["score", str(model), "--data", str(data), "--split", "all", "--db", f"sqlite:///{db}"]


def db_state(db: Path) -> dict[str, Any]:
    """Scoring runs (each checked complete), queue and history of a scores database."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        runs = con.execute("SELECT scoring_run_id, pairs FROM scoring_runs").fetchall()
        per_run = dict(con.execute("SELECT scoring_run_id, count(*) FROM pair_scores GROUP BY scoring_run_id"))
        dup_scores = con.execute("SELECT count(*) FROM (SELECT 1 FROM pair_scores GROUP BY scoring_run_id, pair_id "
                                 "HAVING count(*) > 1)").fetchone()[0]
        pairs = {r: {p for (p,) in con.execute("SELECT pair_id FROM pair_scores WHERE scoring_run_id = ?", (r,))}
                 for r, _ in runs}
        tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        queue, dup_queue, history = [], 0, []
        if "review_queue" in tables:
            queue = con.execute("SELECT pair_id, model_name, model_version, status, reviewer, note "
                                "FROM review_queue").fetchall()
            dup_queue = con.execute("SELECT count(*) FROM (SELECT 1 FROM review_queue GROUP BY pair_id, model_name, "
                                    "model_version HAVING count(*) > 1)").fetchone()[0]
            history = con.execute("SELECT pair_id, status, reviewer, note FROM review_history ORDER BY id").fetchall()
    finally:
        con.close()
    for run_id, n in runs:
        check(per_run.get(run_id, 0) == n, f"{db}: scoring run {run_id} records {n} pairs but holds "
                                           f"{per_run.get(run_id, 0)} rows")
    check(set(per_run) <= {r for r, _ in runs}, f"{db}: pair_scores rows of an unrecorded scoring run")
    check(dup_scores == 0, f"{db}: {dup_scores} pairs scored twice within one scoring run")
    check(dup_queue == 0, f"{db}: {dup_queue} pairs queued twice for one model version")
    return {"runs": [r for r, _ in runs], "pairs": pairs, "queue": queue, "history": history}


def check_scores(db: Path, reference: dict[str, Any], decisions: dict[str, tuple[str, str, str]],
                 *, min_runs: int) -> dict[str, Any]:
    state = db_state(db)
    check(len(state["runs"]) >= min_runs, f"{db}: {len(state['runs'])} scoring runs, expected {min_runs} or more")
    want = next(iter(reference["pairs"].values()))
    for run_id, pairs in state["pairs"].items():
        check(pairs == want, f"{db}: scoring run {run_id} lost {len(want - pairs)} pairs")
    queued = {(p, m, v) for p, m, v, *_ in state["queue"]}
    want_queue = {(p, m, v) for p, m, v, *_ in reference["queue"]}
    check(queued == want_queue if state["runs"] else True,
          f"{db}: review queue holds {len(queued)} rows, the uninterrupted run's {len(want_queue)}")
    status = {p: (s, r, n) for p, _, _, s, r, n in state["queue"]}
    for pair, decided in decisions.items():
        check(status.get(pair) == decided, f"{db}: pair {pair} lost its decision {decided[0]}")
    check(len(state["history"]) == len(decisions), f"{db}: review_history holds {len(state['history'])} decisions, "
                                                  f"{len(decisions)} were made")
    return state


def decide_some(db: Path, n: int, rng: random.Random) -> dict[str, tuple[str, str, str]]:
    """Decide ``n`` queued pairs through the review-queue API; returns pair -> (status, reviewer, note)."""
    from mmclinic.data.review_queue import DECISIONS, Decision, decide_many, queue_rows

    rows = queue_rows(f"sqlite:///{db}")
    chosen = rng.sample([r["pair_id"] for r in rows], min(n, len(rows)))
    out = {p: (DECISIONS[i % len(DECISIONS)], "reviewer-kt", f"trial note {i}") for i, p in enumerate(chosen)}
    decide_many(f"sqlite:///{db}", [Decision(p, *v) for p, v in out.items()])
    return out


def trial_score(bench: Bench, model: Path, data: Path, reference_db: Path, kill_at: float, name: str,
                rescore: bool) -> Outcome:
    """``rescore``: over a scored database with decisions (kept through the kill); else a first score."""
    db = bench.root / f"{name}.db"
    db.unlink(missing_ok=True)
    reference = db_state(reference_db)
    decisions: dict[str, tuple[str, str, str]] = {}
    if rescore:
        shutil.copyfile(reference_db, db)
        decisions = decide_some(db, 3, bench.rng)
    args = score_args(model, data, db)
    result = Outcome("score", kill_at)
    result.killed, result.orphans = bench.kill(bench.start(args), kill_at)
    try:
        if db.exists() and rescore:
            check_scores(db, reference, decisions, min_runs=1)
        elif db.exists():
            state = db_state(db)
            for run_id, pairs in state["pairs"].items():
                check(pairs == next(iter(reference["pairs"].values())), f"{db}: scoring run {run_id} is partial")
        bench.must_run(args, "score re-run")
        check_scores(db, reference, decisions, min_runs=2 if rescore else 1)
    except CheckFailed as exc:
        result.ok, result.detail = False, str(exc)
    return result


# --------------------------------------------------------------------------- the whole run


def summary(outcomes: list[Outcome]) -> str:
    lines = [f"{'stage':<9} {'trials':>6} {'kill at (s)':>13} {'killed':>6} {'ended first':>11} {'passed':>6} "
             f"{'failed':>6} {'orphans':>7}"]
    for stage in dict.fromkeys(o.stage for o in outcomes):
        rows = [o for o in outcomes if o.stage == stage]
        at = [o.kill_at for o in rows]
        lines.append(f"{stage:<9} {len(rows):>6} {min(at):>6.1f}-{max(at):<6.1f} {sum(o.killed for o in rows):>6} "
                     f"{sum(not o.killed for o in rows):>11} {sum(o.ok for o in rows):>6} "
                     f"{sum(not o.ok for o in rows):>6} {sum(o.orphans for o in rows):>7}")
    lines.append(f"{'all':<9} {len(outcomes):>6} {'':>13} {sum(o.killed for o in outcomes):>6} "
                 f"{sum(not o.killed for o in outcomes):>11} {sum(o.ok for o in outcomes):>6} "
                 f"{sum(not o.ok for o in outcomes):>6} {sum(o.orphans for o in outcomes):>7}")
    return "\n".join(lines)


def run_all(bench: Bench, counts: dict[str, int], patients: int = 24) -> list[Outcome]:
    log = bench.log
    src = bench.root / "synthetic"
    if not src.exists():
        bench.must_run(["synth", str(src), "--patients", str(patients), "--seed", "11", "--size", "64"], "synth")
    outcomes: list[Outcome] = []

    ds = bench.root / "dataset"
    bench.durations["ingest"] = bench.must_run(ingest_args(src, ds, bench.key), "uninterrupted ingest")
    log(f"ingest: uninterrupted run {bench.durations['ingest']:.1f}s")
    for i, at in enumerate(bench.kill_times("ingest", counts.get("ingest", 0))):
        o = trial_ingest(bench, src, ds, at, f"ingest-{i}", prior=i % 2 == 1)
        log(f"  ingest-{i}: kill at {at:.1f}s {'killed' if o.killed else 'ended first'} "
            f"{'ok' if o.ok else 'FAILED: ' + o.detail}")
        outcomes.append(o)

    run_ref = bench.root / "run-uninterrupted"
    bench.durations["train"] = bench.must_run(train_args(ds, run_ref), "uninterrupted training")
    steps = int(next(s for s in TRAIN_SETTINGS if s.startswith("train.steps=")).split("=")[1])
    log(f"train: uninterrupted run {bench.durations['train']:.1f}s")
    for i, at in enumerate(bench.kill_times("train", counts.get("train", 0))):
        o = trial_train(bench, ds, run_ref, at, f"run-{i}", steps)
        log(f"  run-{i}: kill at {at:.1f}s {'killed' if o.killed else 'ended first'} "
            f"{'ok' if o.ok else 'FAILED: ' + o.detail}")
        outcomes.append(o)
    # Kills at the two moments a clock rarely hits: right after the run's folder is written (before its
    # MLflow record is complete), and right after its last checkpoint (while it validates and registers).
    triggers = {"run.json written": lambda r: lambda: (r / "run.json").exists(),
                f"step {steps} checkpointed": lambda r: lambda: _recorded_step(r) == steps}
    for j, (what, when) in enumerate(list(triggers.items())[:counts.get("train-triggered", 2)]):
        o = trial_train(bench, ds, run_ref, 0.0, f"run-at-{j}", steps, when=when)
        o.kill_at, o.trigger = bench.last_kill, what
        log(f"  run-at-{j}: kill when {what} ({o.kill_at:.1f}s) {'killed' if o.killed else 'ended first'} "
            f"{'ok' if o.ok else 'FAILED: ' + o.detail}")
        outcomes.append(o)
    if not any(counts.get(k) for k in ("evaluate", "export", "score")):
        return outcomes

    ref_report = bench.root / "eval-uninterrupted" / "REPORT.json"
    bench.durations["evaluate"] = bench.must_run(evaluate_args(run_ref, ds, ref_report), "uninterrupted evaluate")
    reference = json.loads(ref_report.read_text())
    log(f"evaluate: uninterrupted run {bench.durations['evaluate']:.1f}s")
    for i, at in enumerate(bench.kill_times("evaluate", counts.get("evaluate", 0))):
        o = trial_evaluate(bench, run_ref, ds, reference, at, f"eval-{i}", prior=i % 2 == 1)
        log(f"  eval-{i}: kill at {at:.1f}s {'killed' if o.killed else 'ended first'} "
            f"{'ok' if o.ok else 'FAILED: ' + o.detail}")
        outcomes.append(o)
    if not any(counts.get(k) for k in ("export", "score")):
        return outcomes

    base = bench.root / "models"
    bench.durations["export"] = bench.must_run(export_args(run_ref, base), "uninterrupted export")
    log(f"export: uninterrupted run {bench.durations['export']:.1f}s")
    model = base / MODEL_NAME / str(listed_versions(base)[0])  # scoring uses this version throughout
    for i, at in enumerate(bench.kill_times("export", counts.get("export", 0))):
        o = trial_export(bench, run_ref, base, at)
        log(f"  export-{i}: kill at {at:.1f}s {'killed' if o.killed else 'ended first'} "
            f"{'ok' if o.ok else 'FAILED: ' + o.detail}")
        outcomes.append(o)
    staged = list((bench.root / "tmp").glob("mmclinic-export-*"))
    if staged:
        log(f"export: {len(staged)} staging folder(s) of killed exports left in TMPDIR")

    ref_db = bench.root / "scores-uninterrupted.db"
    bench.durations["score"] = bench.must_run(score_args(model, ds, ref_db), "uninterrupted score")
    log(f"score: uninterrupted run {bench.durations['score']:.1f}s")
    for i, at in enumerate(bench.kill_times("score", counts.get("score", 0))):
        o = trial_score(bench, model, ds, ref_db, at, f"scores-{i}", rescore=i % 4 != 3)
        log(f"  scores-{i}: kill at {at:.1f}s {'killed' if o.killed else 'ended first'} "
            f"{'ok' if o.ok else 'FAILED: ' + o.detail}")
        outcomes.append(o)
    return outcomes


def _counts(text: str) -> dict[str, int]:
    out = dict(DEFAULT_TRIALS)
    for item in filter(None, text.split(",")):
        stage, _, n = item.partition("=")
        if stage not in DEFAULT_TRIALS or not n.isdigit():
            raise SystemExit(f"--trials: expected STAGE=N with STAGE in {', '.join(DEFAULT_TRIALS)}, got {item!r}")
        out[stage] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="working folder (default: a new temporary folder, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--trials", default="", help="trials per stage, e.g. ingest=6,train=4 (default: "
                                                + ",".join(f"{k}={v}" for k, v in DEFAULT_TRIALS.items()) + ")")
    args = p.parse_args(argv)
    if not MMCLINIC.is_file():
        print(f"{MMCLINIC} not found: run `make venv` first", file=sys.stderr)
        return 2
    counts = _counts(args.trials)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mmclinic-kill-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    t0 = time.monotonic()
    bench = Bench(workdir, seed=args.seed, log=lambda s: print(s, flush=True))
    try:
        outcomes = run_all(bench, counts)
    except CheckFailed as exc:  # an uninterrupted run failed: nothing to compare with
        print(f"FAILED before the trials: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"kill -9 trials, seed {args.seed}, {time.monotonic() - t0:.0f}s; uninterrupted runs: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in bench.durations.items()))
    print(summary(outcomes))
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        print(f"FAILED {o.stage} (kill at {o.kill_at:.1f}s): {o.detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
