"""``mmclinic demo``: synth -> ingest -> train -> evaluate -> export -> score, end to end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mmclinic.artifacts import DatasetDir, RunDir
from mmclinic.config import load_config

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _experiment(name: str) -> Path:
    path = EXPERIMENTS / f"{name}.yaml"
    if path.is_file():
        return path
    from mmclinic.errors import UsageError

    raise UsageError(f"experiment file not found: {path}")


def run_demo(workdir: str | Path = "demo_run", patients: int = 80, experiment: str | Path | None = None,
             overrides: list[str] = (), seed: int = 0) -> dict[str, str]:
    """Run the whole loop on synthetic data in ``workdir``; return where the outputs are."""
    from mmclinic.data.ingest import IngestOptions, ingest
    from mmclinic.data.synth import synthesize
    from mmclinic.eval.evaluate import evaluate, headline
    from mmclinic.serve.export import export
    from mmclinic.serve.scoring import score
    from mmclinic.training.loop import train

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    t0 = time.time()

    def stage(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    source = workdir / "synthetic"
    stage(f"synth: {patients} synthetic patients -> {source}")
    s = synthesize(source, patients=patients, seed=seed, size=128)
    stage(f"       {s.studies} studies, {s.images} DICOM files")
    dataset = workdir / "dataset"
    stage(f"ingest: {source} -> {dataset}")
    key = workdir / "deid.key"
    if not key.exists():
        # Synthetic data only: a fixed key makes the demo's pseudonyms and splits, and so its
        # figures, the same on every machine. Real archives get a random key (see ingest).
        key.write_text("6d6d636c696e69632d64656d6f2d6b6579" * 2 + "\n")
    summary = ingest(source, dataset, "dicom", key, IngestOptions(max_side=128))
    stage(f"       accepted {summary.accepted}, quarantined {summary.quarantined}, splits {summary.splits}")
    config = load_config(experiment or _experiment("demo"), overrides)
    run = workdir / "run"
    stage(f"train: {config.name} ({config.train.steps} steps) -> {run}")
    train(config, dataset, run)
    report_path = workdir / "REPORT.json"
    stage(f"evaluate: test split -> {report_path}")
    report = evaluate(run, dataset, "test", report_path)
    for k, v in headline(report).items():
        print(f"       {k:32s} {v:.3f}")
    models = workdir / "models"
    stage(f"export: vetting, then SavedModel -> {models}")
    exported = export(run, models, "mmclinic-demo")
    stage(f"       {exported.path}")
    db = f"sqlite:///{workdir / 'scores.db'}"
    stage(f"score: test pairs with the exported model -> {db}")
    scored = score(exported.path, data=dataset, db=db, split="test")
    stage(f"       {scored.pairs} pairs scored, {scored.flagged} flagged for review")
    data_card = DatasetDir(dataset).data_card_path
    out = {
        "dataset": str(dataset), "data_card": str(data_card), "run": str(run),
        "report": str(report_path), "model": str(exported.path), "scores_db": db,
        "mlflow": os.environ["MLFLOW_TRACKING_URI"], "tensorboard": str(RunDir(run).tensorboard_dir),
    }
    (workdir / "demo_outputs.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"""
Done in {time.time() - t0:.0f}s. Outputs:
  dataset + data card   {dataset}  ({data_card})
  training run          {run}
  evaluation report     {report_path}
  exported SavedModel   {exported.path}
  review flags (SQL)    {db}

Open them:
  .venv/bin/mlflow ui --backend-store-uri {out['mlflow']}          # runs, params, metrics
  .venv/bin/tensorboard --logdir {out['tensorboard']}              # scalars + embedding projector
  .venv/bin/saved_model_cli show --dir {exported.path} --all
  .venv/bin/mmclinic serve {exported.path.parent.parent}   # TF Serving REST API on 127.0.0.1:8501
  .venv/bin/mmclinic evaluate {exported.path} --data {dataset} --out {workdir / 'REPORT_export.json'}
""", flush=True)
    return out
