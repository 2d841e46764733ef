"""Champion, challenger, promotion: the MLflow registry aliases and TensorFlow Serving labels.

- ``mmclinic export`` vets a run against fixed thresholds and, with :func:`champion_check`,
  against the current **champion** (the MLflow alias ``champion`` of the run's registered
  model, ``export.name``) on the same evaluation set (the run's validation split): a paired
  bootstrap over patients (the one ``mmclinic compare`` uses) of image-to-text R@5, mismatch
  AUROC overall and by corruption kind, and the match score's expected calibration error. The
  decision is a non-inferiority test on the bootstrap interval (:func:`gate_decision`): the
  challenger fails a metric when the upper end of the 95 % interval of how much worse it is than
  the champion exceeds the metric's margin (``export.champion_gates``: ``metric:margin``); the
  failed metrics are named. Without a champion the check passes with a note.
- On success, :func:`mark_challenger` sets the alias ``challenger`` on the run's registered
  version (tags ``mmclinic.vetted``, ``mmclinic.export_path``, ``mmclinic.export_version``,
  ``mmclinic.champion_comparison``) and the serving label ``canary`` in
  ``MODEL_BASE/NAME/version_labels.json``. The first vetted export of a model (no ``stable``
  version yet) is labelled ``canary`` too: it is a candidate that nobody has promoted, and a
  client's canary split (``/labels/canary``) reaches it from the start, while ``/labels/stable``
  answers 404 until a version is promoted (a client without a stable label sends every request
  to the model's latest version, TensorFlow Serving's default).
- :func:`promote` moves ``champion`` (MLflow) and ``stable`` (serving) to the challenger (or a
  given vetted version); the previous champion keeps the alias ``previous`` (and the label
  ``previous``). :func:`rollback` moves them back. A version ``export`` never vetted is refused.

Every move is recorded, with who, when and which evaluation, as a registered-model tag
``mmclinic.move.NNNN`` (JSON), as tags on the version, and as a line in the version's model card.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmclinic.artifacts import ExportedModel, ModelFolder
from mmclinic.errors import MmclinicError, UsageError

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
STABLE, CANARY = "stable", "canary"
DEFAULT_GATES = ("image_to_text.R@5:0.05", "mismatch.auroc:0.05", "mismatch.auroc.by_kind:0.10",
                 "calibration.ece:0.05")
COMPARISON_FILE = "champion_comparison.json"

__all__ = ["champion_check", "gate_decision", "mark_challenger", "promote", "rollback", "history", "parse_gates", "DEFAULT_GATES"]


def _client():
    from mlflow import MlflowClient

    from mmclinic.tracking import tracking_uri

    return MlflowClient(tracking_uri())


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def parse_gates(items) -> dict[str, float]:
    """``("mismatch.auroc:0.05", ...)`` -> ``{"mismatch.auroc": 0.05}``."""
    known = {g.partition(":")[0] for g in DEFAULT_GATES}
    out = {}
    for item in items:
        name, _, raw = str(item).partition(":")
        if name not in known:
            raise UsageError(f"export.champion_gates: unknown metric {name!r} (allowed: {', '.join(sorted(known))})")
        try:
            out[name] = float(raw)
        except ValueError:
            raise UsageError(f"export.champion_gates: margin of {name!r} must be a number, got {raw!r}") from None
    return out


def _alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _run_version(client, name: str, mlflow_run_id: str | None):
    """The registered version of ``name`` that the training run registered, or None."""
    from mlflow.exceptions import MlflowException

    if not mlflow_run_id:
        return None
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{mlflow_run_id}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


# --------------------------------------------------------------------------- vetting against the champion


def gate_decision(difference: float | None, ci95: Sequence[float] | None, margin: float,
                  higher_is_better: bool) -> dict[str, Any]:
    """The champion gate of one metric: non-inferiority on the paired bootstrap interval.

    ``difference`` is challenger minus champion, ``ci95`` its paired-bootstrap percentile interval
    (:func:`mmclinic.eval.metrics.paired_bootstrap`). "How much worse" is ``-difference`` for a
    metric where higher is better and ``difference`` otherwise; its interval is the matching
    mirror of ``ci95``. The challenger passes when the interval's upper end (the most it may
    plausibly be worse, a one-sided 97.5 % bound) is at most ``margin``; it fails otherwise.

    Why the bound and not the point difference: the point difference passes a challenger whose
    loss is hidden in the noise of a small evaluation set (a point loss of 0.02 with an interval
    reaching 0.15 would pass a 0.05 margin); the bound requires the data to show that the loss is
    within the margin, the usual rule of a non-inferiority comparison. The price is that a small
    evaluation set (wide intervals) fails challengers that may be fine: widen the margin or
    evaluate on more patients, the record shows which bound failed. A paired bootstrap keeps the
    interval narrow when the two models rank the same patients alike (a fine-tune of the champion).

    Where no interval could be made (fewer than 2 patients, too few usable resamples) the point
    difference decides, and the record says so (``basis: "point"``); where the metric is undefined
    on the data (``difference`` None, e.g. a corruption kind absent) the gate passes with
    ``basis: "undefined"``. Returns ``{"passed", "worse", "worse_bound", "basis"}``.
    """
    if difference is None:
        return {"passed": True, "worse": None, "worse_bound": None, "basis": "undefined"}
    worse = -difference if higher_is_better else difference
    if ci95 is None:
        return {"passed": bool(worse <= margin), "worse": float(worse), "worse_bound": float(worse), "basis": "point"}
    bound = -float(ci95[0]) if higher_is_better else float(ci95[1])
    return {"passed": bool(bound <= margin), "worse": float(worse), "worse_bound": bound, "basis": "ci95"}


def _scores(run_path: Path, split_data, seed: int):
    from mmclinic.eval import metrics
    from mmclinic.eval.embedding import embed, mismatch_set, pair_logits
    from mmclinic.eval.scorers import RunScorer

    scorer = RunScorer(run_path)
    emb = embed(scorer, split_data)
    i2t = metrics.ranks(emb.image_emb @ emb.report_emb.T, [[x] for x in emb.image_report])
    cset = mismatch_set(emb, seed)
    logits = pair_logits(scorer, emb, cset)
    return i2t, cset, logits


def _statistics(cset, bins: int) -> dict[str, tuple[Any, bool, str]]:
    """metric -> (statistic(run, idx) over items, higher_is_better, item kind)."""
    from mmclinic.eval import metrics
    from mmclinic.eval.calibration import ece

    labels = cset.label
    stats: dict[str, tuple[Any, bool, str]] = {
        "image_to_text.R@5": (lambda r, i: float(np.mean(r["i2t"][i] <= 5)), True, "images"),
        "mismatch.auroc": (lambda r, i: metrics.auroc(labels[i], -r["logits"][i]), True, "pairs"),
        "calibration.ece": (lambda r, i: ece(1 - labels[i], 1 / (1 + np.exp(-r["logits"][i])), bins), False, "pairs"),
    }
    for kind in sorted(set(cset.kind) - {"match"}):
        keep = np.isin(cset.kind, ["match", kind])
        stats[f"mismatch.auroc.{kind}"] = (
            lambda r, i, keep=keep: metrics.auroc(labels[i][keep[i]], -r["logits"][i][keep[i]]), True, "pairs")
    return stats


def champion_check(run_dir, config, split_data, split: str = "val") -> tuple[bool, str]:
    """Compare the run with the registered champion of ``config.export.name`` on ``split_data``
    (paired patient bootstrap). Returns ``(passed, detail)`` and writes the comparison to the
    run's ``eval/champion_comparison.json`` (read by :func:`mark_challenger`)."""
    from mmclinic.artifacts import RunDir
    from mmclinic.eval import metrics

    name = config.export.name
    gates = parse_gates(getattr(config.export, "champion_gates", DEFAULT_GATES))
    boot = int(getattr(config.export, "champion_bootstrap", 200))
    out_path = Path(run_dir.eval_dir) / COMPARISON_FILE
    out_path.parent.mkdir(parents=True, exist_ok=True)
    client = _client()
    champion = _alias(client, name, CHAMPION)
    record: dict[str, Any] = {"registered_model": name, "split": split, "gates": gates, "at": _now()}
    if champion is None:
        record |= {"champion": None, "passed": True, "note": f"no champion of {name} yet: nothing to compare"}
        out_path.write_text(json.dumps(record, indent=2) + "\n")
        return True, record["note"]
    own = _run_version(client, name, run_dir.mlflow_run_id())
    if own is not None and own.version == champion.version:
        record |= {"champion": int(champion.version), "passed": True, "note": "the run is the champion"}
        out_path.write_text(json.dumps(record, indent=2) + "\n")
        return True, record["note"]
    champ_dir = (champion.tags or {}).get("mmclinic.run_dir")
    if not champ_dir or not RunDir.is_run(champ_dir) or RunDir(champ_dir).latest_checkpoint() is None:
        record |= {"champion": int(champion.version), "passed": False,
                   "note": f"champion {name} v{champion.version}: its run folder ({champ_dir or 'not recorded'}) "
                           "is not available to score"}
        out_path.write_text(json.dumps(record, indent=2) + "\n")
        return False, record["note"]
    seed = config.eval.seed
    i2t_c, cset_c, log_c = _scores(Path(champ_dir), split_data, seed)
    i2t_n, cset_n, log_n = _scores(run_dir.path, split_data, seed)
    if not (np.array_equal(cset_c.image, cset_n.image) and list(cset_c.kind) == list(cset_n.kind)):
        raise MmclinicError("champion check: the corruption sets differ between the two models")
    runs = {"champion": {"i2t": i2t_c, "logits": log_c}, "challenger": {"i2t": i2t_n, "logits": log_n}}
    patients = split_data.meta["patient_key"].to_numpy()
    clusters = {"images": patients, "pairs": patients[cset_c.image]}
    rows, failed = [], []
    for metric, (stat, higher, items) in _statistics(cset_c, config.eval.calibration_bins).items():
        margin = gates.get(metric, gates.get("mismatch.auroc.by_kind") if metric.startswith("mismatch.auroc.")
                           else None)
        if margin is None:
            continue
        res = metrics.paired_bootstrap(lambda i, s=stat: s(runs["champion"], i),
                                       lambda i, s=stat: s(runs["challenger"], i),
                                       len(clusters[items]), clusters[items], boot, seed)
        diff = res["difference"]
        gate = gate_decision(diff, res["ci95"], margin, higher)
        all_idx = np.arange(len(clusters[items]))
        rows.append({"metric": metric, "champion": stat(runs["champion"], all_idx),
                     "challenger": stat(runs["challenger"], all_idx), "difference": diff, "ci95": res["ci95"],
                     "p": res["p"], "margin": margin, "higher_is_better": higher, "passed": gate["passed"],
                     "worse_bound": gate["worse_bound"], "basis": gate["basis"]})
        if not gate["passed"]:
            what = "up to" if gate["basis"] == "ci95" else "(point, no interval)"
            failed.append(f"{metric} worse by {what} {gate['worse_bound']:.3f} (point {gate['worse']:.3f}, "
                          f"{'higher' if higher else 'lower'} is better) > margin {margin:.3f}")
    passed = not failed
    record |= {"champion": int(champion.version), "champion_run": str(champ_dir), "passed": passed,
               "boot": boot, "patients": int(len(set(patients))), "metrics": rows}
    out_path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    if passed:
        return True, f"not worse than champion {name} v{champion.version} beyond the margins on {len(rows)} metrics"
    return False, f"worse than champion {name} v{champion.version}: " + "; ".join(failed)


# --------------------------------------------------------------------------- labels, aliases, records


def _write_labels(folder: Path, update: dict[str, int | None]) -> dict[str, int]:
    path = ModelFolder(folder).labels_path
    labels = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for k, v in update.items():
        if v is None:
            labels.pop(k, None)
        else:
            labels[k] = int(v)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(labels, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    base = folder.parent
    try:  # TensorFlow Serving's models.config (written by export) carries the labels too
        from mmclinic.serve.tfserving import MODELS_CONFIG, write_file, models_config
    except ImportError:
        return labels
    if (base / MODELS_CONFIG).is_file():
        write_file(base / MODELS_CONFIG, models_config(base, "/models"))
    return labels


def _card_line(export_path: str | None, line: str) -> None:
    if not export_path:
        return
    card = ExportedModel(export_path).model_card_path
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        if "\n## Registry history\n" not in text:
            text += "\n## Registry history\n"
        card.write_text(text + f"- {line}\n", encoding="utf-8")


def _record(client, name: str, action: str, version: str, who: str, evaluation: str, **extra: Any) -> dict:
    reg = client.get_registered_model(name)
    n = sum(1 for k in (reg.tags or {}) if k.startswith("mmclinic.move."))
    entry = {"action": action, "version": int(version), "who": who, "when": _now(), "evaluation": evaluation, **extra}
    client.set_registered_model_tag(name, f"mmclinic.move.{n + 1:04d}", json.dumps(entry, sort_keys=True))
    return entry


def history(name: str) -> list[dict[str, Any]]:
    """The recorded moves of ``name``, oldest first."""
    reg = _client().get_registered_model(name)
    return [json.loads(v) for k, v in sorted((reg.tags or {}).items()) if k.startswith("mmclinic.move.")]


def _evaluation_summary(tags: dict[str, str]) -> str:
    raw = tags.get("mmclinic.champion_comparison")
    if not raw:
        return "fixed vetting thresholds only"
    try:
        c = json.loads(raw)
    except json.JSONDecodeError:
        return raw[:200]
    if c.get("champion") is None:
        return f"vetted by export ({c.get('note')})"
    return (f"vetted against champion v{c['champion']} on the {c.get('split')} split "
            f"(paired patient bootstrap, {'passed' if c.get('passed') else 'failed'})")


def mark_challenger(run_dir, config, export_name: str, version_dir: Path, version: int) -> str | None:
    """After a vetted export: serving label ``canary`` -> ``version``, MLflow alias ``challenger``
    on the run's registered version with its vetting recorded. Returns the registered version,
    or None when the run registered none (the label is set all the same)."""
    version_dir = Path(version_dir)
    labels_path = ModelFolder(version_dir.parent).labels_path
    stable = json.loads(labels_path.read_text(encoding="utf-8")).get(STABLE) if labels_path.is_file() else None
    # The canary beside the stable version, or the first candidate of a model with none yet:
    # promote then makes it stable (and drops the canary label that points to the same version).
    if stable != version:
        _write_labels(version_dir.parent, {CANARY: version})
    client = _client()
    name = config.export.name
    mv = _run_version(client, name, run_dir.mlflow_run_id())
    comparison_path = Path(run_dir.eval_dir) / COMPARISON_FILE
    comparison = json.loads(comparison_path.read_text()) if comparison_path.is_file() else {}
    short = {k: comparison.get(k) for k in ("champion", "split", "passed", "note", "patients", "boot")}
    short["metrics"] = [{k: m.get(k) for k in ("metric", "champion", "challenger", "difference", "ci95", "worse_bound",
                                                "basis", "margin", "passed")}
                        for m in comparison.get("metrics", [])]
    who = getpass.getuser()
    if mv is None:
        _card_line(str(version_dir), f"{_now()}: exported as `{export_name}/{version}`, label `{CANARY}` "
                                     f"(no registered MLflow version for the run) by {who}")
        return None
    tags = {"mmclinic.vetted": "true", "mmclinic.export_path": str(version_dir.resolve()),
            "mmclinic.export_name": export_name, "mmclinic.export_version": str(version),
            "mmclinic.champion_comparison": json.dumps(short, default=float)[:5000]}
    for k, v in tags.items():
        client.set_model_version_tag(name, mv.version, k, v)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    evaluation = _evaluation_summary(tags)
    _record(client, name, "challenger", mv.version, who, evaluation, export=f"{export_name}/{version}")
    _card_line(str(version_dir), f"{_now()}: vetted; MLflow `{name}` v{mv.version} alias `{CHALLENGER}`, serving "
                                 f"label `{CANARY}` by {who} ({evaluation})")
    return str(mv.version)


def _move(client, name: str, target, action: str, who: str, previous_version) -> dict[str, Any]:
    tags = target.tags or {}
    export_path = tags.get("mmclinic.export_path")
    folder = Path(export_path).parent if export_path else None
    if folder is not None and folder.is_dir():
        update: dict[str, int | None] = {STABLE: int(tags["mmclinic.export_version"])}
        if previous_version is not None:
            prev_tags = previous_version.tags or {}
            update[PREVIOUS] = int(prev_tags["mmclinic.export_version"]) if "mmclinic.export_version" in prev_tags \
                else None
        labels = _write_labels(folder, update)
        if labels.get(CANARY) == labels.get(STABLE):
            labels = _write_labels(folder, {CANARY: None})
    else:
        labels = {}
    client.set_registered_model_alias(name, CHAMPION, target.version)
    if previous_version is not None:
        client.set_registered_model_alias(name, PREVIOUS, previous_version.version)
    challenger = _alias(client, name, CHALLENGER)
    if challenger is not None and challenger.version == target.version:
        client.delete_registered_model_alias(name, CHALLENGER)
    when = _now()
    client.set_model_version_tag(name, target.version, f"mmclinic.{action}_at", when)
    client.set_model_version_tag(name, target.version, f"mmclinic.{action}_by", who)
    evaluation = _evaluation_summary(tags)
    entry = _record(client, name, action, target.version, who, evaluation,
                    previous=int(previous_version.version) if previous_version is not None else None,
                    labels=labels)
    _card_line(export_path, f"{when}: {action} to `{CHAMPION}` / `{STABLE}` by {who} ({evaluation}); "
                            f"previous champion: {f'v{previous_version.version}' if previous_version else 'none'}")
    return entry


def promote(name: str, version: int | str | None = None, who: str | None = None) -> dict[str, Any]:
    """Move ``champion`` and ``stable`` to the challenger (or ``version``); the champion before
    keeps ``previous``. Refused for a version ``export`` never vetted."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        target = client.get_model_version(name, str(version)) if version is not None else _alias(client, name,
                                                                                                   CHALLENGER)
    except MlflowException:
        raise UsageError(f"promote: {name} has no version {version}") from None
    if target is None:
        raise UsageError(f"promote: {name} has no '{CHALLENGER}' (export a run that passes vetting first)")
    if (target.tags or {}).get("mmclinic.vetted") != "true":
        raise UsageError(f"promote: {name} version {target.version} was never vetted by mmclinic export; refusing")
    current = _alias(client, name, CHAMPION)
    if current is not None and current.version == target.version:
        raise UsageError(f"promote: {name} version {target.version} is already the champion")
    return _move(client, name, target, "promote", who or getpass.getuser(), current)


def rollback(name: str, who: str | None = None) -> dict[str, Any]:
    """Move ``champion`` and ``stable`` back to ``previous``; the rolled-back version becomes
    ``previous``."""
    client = _client()
    current, previous = _alias(client, name, CHAMPION), _alias(client, name, PREVIOUS)
    if previous is None or current is None:
        raise UsageError(f"rollback: {name} has no '{PREVIOUS}' champion to go back to")
    client.set_model_version_tag(name, current.version, "mmclinic.rolled_back", _now())
    return _move(client, name, previous, "rollback", who or getpass.getuser(), current)
