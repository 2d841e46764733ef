"""The review loop end to end: score -> queue -> decisions -> retrain from the champion with them
-> challenger vetted against the champion -> canary -> promote -> rollback, each step visible in
MLflow (aliases, tags) and in the database."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "experiments" / "tiny.yaml"
TRAINED = ["train.steps=200", "train.checkpoint_every=50", "train.eval_every=200", "train.log_every=50",
           "export.min_recall5_over_chance=1.0", "data.deterministic=true"]


def _labels(folder: Path) -> dict:
    return json.loads((folder / "version_labels.json").read_text())


@pytest.mark.slow
def test_review_loop(dataset, trained_run, exported_model, tmp_path):
    from mlflow import MlflowClient

    from mmclinic.artifacts import DatasetDir, RunDir
    from mmclinic.cli import main
    from mmclinic.errors import UsageError
    from mmclinic.eval.embedding import load_split
    from mmclinic.serve import registry
    from mmclinic.data import review_queue as rq
    from mmclinic.serve.export import export
    from mmclinic.serve.scoring import score
    from mmclinic.tracking import tracking_uri
    from mmclinic.training.loop import train_from_file

    client = MlflowClient(tracking_uri())
    name = RunDir(trained_run).config().export.name
    v1 = registry._run_version(client, name, RunDir(trained_run).mlflow_run_id())
    try:
        # the run exported into a MODEL_BASE of this test: the vetted challenger, labelled canary
        # (the first version of the model: a candidate nobody promoted yet)
        first = export(trained_run, tmp_path / "models", "tiny")
        folder = first.path.parent
        assert first.checks["not_worse_than_champion"]["detail"].startswith("no champion")
        assert client.get_model_version_by_alias(name, "challenger").version == v1.version
        assert client.get_model_version(name, v1.version).tags["mmclinic.vetted"] == "true"
        assert _labels(folder) == {"canary": first.version}
        registry.promote(name)
        assert client.get_model_version_by_alias(name, "champion").version == v1.version
        assert _labels(folder) == {"stable": first.version}

        # score the training split: flagged pairs arrive in the queue; scripted decisions
        db = f"sqlite:///{tmp_path / 'scores.db'}"
        scored = score(exported_model.path, data=dataset, db=db, split="train")
        pending = rq.queue_rows(db, "pending")
        assert len(pending) == scored.flagged >= 6
        decisions = ([rq.Decision(r["pair_id"], "confirmed_mismatch", "ana") for r in pending[:3]]
                     + [rq.Decision(r["pair_id"], "confirmed_match", "ben") for r in pending[3:5]]
                     + [rq.Decision(pending[5]["pair_id"], "dismissed", "ana", "artefact")])
        assert rq.decide_many(db, decisions) == 6
        assert rq.progress(db)["confirmed_mismatch"] == 3 and len(rq.history(db)) == 6

        # retrain from the champion with those decisions (a few gentle steps)
        # The gate is non-inferiority on the paired interval: on a validation split of 9 patients the
        # calibration error's interval is wide even for a near copy of the champion (its bound was
        # 0.061 here), so this run's ECE margin is 0.10 (the default, 0.05, needs more patients).
        gates = '["image_to_text.R@5:0.05","mismatch.auroc:0.05","mismatch.auroc.by_kind:0.10","calibration.ece:0.10"]'
        ft = train_from_file(TINY, dataset, tmp_path / "ft", TRAINED + ["train.steps=6", "train.learning_rate=0.00001",
                                                                         "train.warmup_steps=1",
                                                                         f"export.champion_gates={gates}"],
                             quiet=True, reviews=db, init_from=f"models:/{name}@champion")
        info = RunDir(tmp_path / "ft").info()
        assert info["init_from"]["run_dir"] == str(trained_run.resolve())
        assert info["reviews"]["confirmed_mismatch"] == 3 and info["reviews"]["confirmed_match"] == 2
        assert info["reviews"]["scoring_run_ids"] == [scored.scoring_run_id]
        params = client.get_run(ft.mlflow_run_id).data.params
        assert params["train.reviews.scoring_runs"] == scored.scoring_run_id
        assert params["train.reviews.confirmed_mismatch"] == "3"

        # a margin nobody can meet: the failed metrics are named
        cfg = RunDir(tmp_path / "ft").config()
        strict = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, champion_gates=(
            "image_to_text.R@5:-1", "mismatch.auroc:0.5")))
        val = load_split(DatasetDir(dataset), "val")
        ok, detail = registry.champion_check(RunDir(tmp_path / "ft"), strict, val)
        assert not ok and f"worse than champion {name} v{v1.version}: image_to_text.R@5" in detail
        assert "mismatch.auroc " not in detail  # within its margin

        # the challenger: vetted against the champion, alias challenger, label canary
        exp = export(tmp_path / "ft", folder.parent, folder.name)
        assert exp.checks["not_worse_than_champion"]["passed"], exp.checks["not_worse_than_champion"]
        v2 = client.get_model_version_by_alias(name, "challenger")
        assert str(v2.version) == ft.model_version and v2.version != v1.version
        comparison = json.loads(v2.tags["mmclinic.champion_comparison"])
        assert comparison["champion"] == int(v1.version) and comparison["passed"]
        assert {m["metric"] for m in comparison["metrics"]} >= {"image_to_text.R@5", "mismatch.auroc",
                                                                 "calibration.ece"}
        assert _labels(folder) == {"stable": first.version, "canary": exp.version}
        models_config = folder.parent / "models.config"
        if models_config.is_file():  # TensorFlow Serving's config follows the labels
            assert '"canary"' in models_config.read_text()

        # a version export never vetted cannot be promoted
        unvetted = client.create_model_version(name, v2.source)
        with pytest.raises(UsageError, match="never vetted"):
            registry.promote(name, unvetted.version)

        assert main(["promote", name]) == 0
        assert client.get_model_version_by_alias(name, "champion").version == v2.version
        assert client.get_model_version_by_alias(name, "previous").version == v1.version
        assert _labels(folder) == {"stable": exp.version, "previous": first.version}

        assert main(["rollback", name]) == 0
        assert client.get_model_version_by_alias(name, "champion").version == v1.version
        assert client.get_model_version_by_alias(name, "previous").version == v2.version
        assert _labels(folder)["stable"] == first.version
        moves = registry.history(name)
        assert [m["action"] for m in moves][-3:] == ["challenger", "promote", "rollback"]
        assert moves[-2]["version"] == int(v2.version) and moves[-2]["previous"] == int(v1.version)
        assert moves[-1]["version"] == int(v1.version) and moves[-1]["who"]
        assert "vetted against champion" in moves[-2]["evaluation"]
        card = (exp.path / "assets.extra" / "model_card.md").read_text()
        assert "## Registry history" in card and "promote to `champion` / `stable`" in card
        assert "rolled_back" in "".join(client.get_model_version(name, v2.version).tags)
    finally:
        for alias in ("champion", "previous", "challenger"):
            try:
                client.delete_registered_model_alias(name, alias)
            except Exception:  # noqa: BLE001 - already absent
                pass
