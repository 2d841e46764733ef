"""Mismatch negatives for the match head, precomputed from one split (the training split).

For every report of the split, at most one text per kind, chosen deterministically from the
seed and the report id (so a report's variants do not depend on the order of the rows):

- ``other_patient_same_findings``: another patient's report stating the same findings (the
  manifest's list-valued ``labels`` where present, else the report text rules of
  :func:`mmclinic.text.corruptions.positive_findings`);
- ``same_patient_other_study``: the same patient's report of another study;
- ``negation``: the report with one stated finding negated (:func:`mmclinic.text.corruptions.negate_finding`);
- ``finding_swap``: the report with one stated finding's term replaced (:func:`mmclinic.text.corruptions.swap_finding`).

An empty string means the kind does not apply to that report. No text equals the report's own
after :func:`mmclinic.text.corruptions.normalize_report`. The other two kinds of
``train.mismatch_kinds`` need no table: ``other_patient`` is another report of the batch and
``laterality_swap`` is made in the graph (:func:`mmclinic.data.preprocess.swap_laterality`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmclinic.artifacts import DatasetDir

TABLE_KINDS = ("other_patient_same_findings", "same_patient_other_study", "negation", "finding_swap")


@dataclass(frozen=True)
class NegativeTables:
    """Per report id, one text per kind ("" where the kind does not apply)."""

    report_ids: tuple[str, ...]
    texts: dict[str, tuple[str, ...]]
    """kind -> one text per report id, in ``report_ids`` order."""
    normalized: tuple[str, ...]
    """Each report's own text in comparison form (:func:`mmclinic.text.corruptions.normalize_report`)."""
    sources: dict[str, tuple[str, ...]]
    """For the partner kinds, the report id each text came from ("" where none)."""
    findings_source: str = ""
    by_image: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    """Kinds looked up by ``image_id`` instead of ``report_id``: kind -> (image ids, texts); the
    ``reviewed`` kind (see :func:`apply_reviews`)."""
    review_counts: dict[str, Any] = field(default_factory=dict)
    """What :func:`apply_reviews` used (empty without reviews)."""

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.texts)

    def counts(self) -> dict[str, int]:
        """Reports with a text of each kind."""
        return {k: sum(bool(t) for t in v) for k, v in self.texts.items()}


def _report_seed(seed: int, report_id: str, kind: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{report_id}\x00{kind}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _pick(rng: np.random.Generator, group: Sequence[int], ok: Callable[[int], bool]) -> int | None:
    """A seeded choice among ``group``'s members that pass ``ok`` (rejection sampling first, so
    a large group is not scanned for every report)."""
    if len(group) > 64:
        for _ in range(16):
            j = group[int(rng.integers(len(group)))]
            if ok(j):
                return j
    cands = [j for j in group if ok(j)]
    return cands[int(rng.integers(len(cands)))] if cands else None


def _report_findings(labels: Sequence[Any], texts: Sequence[str]) -> tuple[list[frozenset[str]], str]:
    """As :func:`mmclinic.eval.embedding.report_findings` (one row per report here): list-valued label
    keys, else the text rules."""
    from mmclinic.text.corruptions import positive_findings
    from mmclinic.text.labels import parse_labels

    out: list[frozenset[str] | None] = []
    for obj in parse_labels(list(labels)):
        lists = {k: v for k, v in (obj or {}).items() if isinstance(v, list)}
        out.append(frozenset(f"{k}:{str(x).lower()}" for k, v in lists.items() for x in v) if lists else None)
    n_labels = sum(x is not None for x in out)
    source = ("manifest labels" if n_labels == len(out) else "report text rules" if n_labels == 0 else
              f"manifest labels ({n_labels} reports), report text rules ({len(out) - n_labels} reports)")
    return [x if x is not None else positive_findings(t) for x, t in zip(out, texts)], source


def build_negatives(report_ids: Sequence[str], texts: Sequence[str], patients: Sequence[str],
                    studies: Sequence[str], labels: Sequence[Any] | None, seed: int,
                    kinds: Sequence[str] = TABLE_KINDS) -> NegativeTables:
    """Negative texts of ``kinds`` for each report (one row per report: its id, text, patient key,
    study key and manifest ``labels``, None where absent). Deterministic for the inputs and seed."""
    from mmclinic.text.corruptions import negate_finding, normalize_report, swap_finding

    unknown = sorted(set(kinds) - set(TABLE_KINDS))
    if unknown:
        raise ValueError(f"unknown negative kind {unknown[0]!r}; allowed: {', '.join(TABLE_KINDS)}")
    order = sorted(range(len(report_ids)), key=lambda i: report_ids[i])
    ids = [str(report_ids[i]) for i in order]
    txt = [str(texts[i] or "") for i in order]
    pat = [str(patients[i]) for i in order]
    stu = [str(studies[i]) for i in order]
    norm = [normalize_report(t) for t in txt]
    findings, source = _report_findings([labels[i] for i in order] if labels is not None else [None] * len(ids), txt)
    by_findings: dict[frozenset[str], list[int]] = {}
    by_patient: dict[str, list[int]] = {}
    for i in range(len(ids)):
        by_findings.setdefault(findings[i], []).append(i)
        by_patient.setdefault(pat[i], []).append(i)

    out: dict[str, list[str]] = {k: [] for k in TABLE_KINDS if k in kinds}
    src: dict[str, list[str]] = {k: [] for k in out if k in ("other_patient_same_findings", "same_patient_other_study")}
    for i, rid in enumerate(ids):
        for kind in out:
            rng = _report_seed(seed, rid, kind)
            text, partner = "", ""
            if not norm[i]:
                pass
            elif kind in src:
                if kind == "other_patient_same_findings":
                    j = _pick(rng, by_findings[findings[i]], lambda j, i=i: pat[j] != pat[i] and norm[j] != norm[i])
                else:
                    j = _pick(rng, by_patient[pat[i]], lambda j, i=i: stu[j] != stu[i] and norm[j] != norm[i])
                if j is not None:
                    text, partner = txt[j], ids[j]
            else:
                variant = negate_finding(txt[i], rng) if kind == "negation" else swap_finding(txt[i], rng)
                if variant and normalize_report(variant) != norm[i]:
                    text = variant
            out[kind].append(text)
            if kind in src:
                src[kind].append(partner)
    return NegativeTables(report_ids=tuple(ids), texts={k: tuple(v) for k, v in out.items()},
                          normalized=tuple(norm), sources={k: tuple(v) for k, v in src.items()},
                          findings_source=source)


def split_negatives(dataset: str | Path | DatasetDir, split: str, seed: int, kinds: Sequence[str] = TABLE_KINDS) -> NegativeTables:
    """:func:`build_negatives` over the reports of one split of a dataset folder (manifest and
    reports tables): partners come from that split only."""
    ds = dataset if isinstance(dataset, DatasetDir) else DatasetDir.open(dataset)
    manifest = ds.manifest()
    reports = ds.reports(columns=["report_id", "text"])
    rows = manifest[manifest["split"] == split].sort_values("image_id")
    cols = ["report_id", "patient_key"] + [c for c in ("study_key", "labels") if c in rows.columns]
    # One row per report: its first image's patient, study and labels.
    per_report = rows[cols].drop_duplicates("report_id").merge(reports, on="report_id", how="left")
    studies = per_report["study_key"] if "study_key" in per_report.columns else per_report["report_id"]
    return build_negatives(per_report["report_id"].tolist(), per_report["text"].fillna("").tolist(),
                           per_report["patient_key"].tolist(), studies.tolist(),
                           per_report["labels"].tolist() if "labels" in per_report.columns else None, seed, kinds)


# --------------------------------------------------------------------------- reviewers' decisions

REVIEWED_KIND = "reviewed"
REVIEWED_MATCH_KIND = "reviewed_match"
"""The by-image table marking reviewer-verified true pairs (confirmed matches): its ``ok``
feature is read by the step (a hard positive), its text is never encoded."""


@dataclass(frozen=True)
class Reviews:
    """Reviewers' decisions (``train.reviews``): per pair id, the last decision."""

    source: str
    decisions: dict[str, dict[str, Any]]
    """pair_id -> ``{"status", "report_key", "scoring_run_ids"}``."""

    @property
    def sha256(self) -> str:
        blob = json.dumps({k: [v["status"], v.get("report_key") or ""] for k, v in sorted(self.decisions.items())},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def scoring_run_ids(self) -> list[str]:
        return sorted({r for d in self.decisions.values() for r in d.get("scoring_run_ids", ())})


def load_reviews(spec: str | Path) -> Reviews:
    """The decisions of a scores database (an SQLAlchemy URL or an SQLite file: its
    ``review_queue``) or of a decisions CSV (``pair_id, status, reviewer, note``; the last row of
    a pair wins)."""
    from mmclinic.data import review_queue

    spec = str(spec)
    if spec.lower().endswith(".csv") and "://" not in spec:
        decisions: dict[str, dict[str, Any]] = {}
        for d in review_queue.read_decisions_csv(spec):
            decisions[d.pair_id] = {"status": d.status, "report_key": "", "scoring_run_ids": []}
        return Reviews(spec, decisions)
    return Reviews(spec, review_queue.decided_pairs(review_queue.engine_for(spec, "train.reviews")))


def apply_reviews(tables: NegativeTables, reviews: Reviews, images: Sequence[str], image_reports: Sequence[str],
                  report_texts: dict[str, str], use_mismatches: bool = True) -> NegativeTables:
    """``tables`` with the reviewers' decisions on the training pairs (``images`` with their
    ``image_reports``, the training split). What each decision means for training:

    - **confirmed mismatch** of an image with its own report (the dataset's pairing is wrong):
      the pair becomes that image's ``reviewed`` negative for the match head (looked up by image
      id; the step no longer counts it as a true pair there) and it leaves the contrastive loss
      (neither a positive nor a negative: see :func:`mmclinic.training.losses.contrastive_masks`),
      when ``use_mismatches``. A confirmed mismatch naming another report than the image's own is
      about a pair the dataset does not hold: counted as ``outside_train``.
    - **confirmed match** of an image X with a report R: the model's flag was a false alarm, and
      (X, R) is a *verified true pair*. (1) It is a hard positive: X's true pair weighs the
      ``reviewed`` kind's weight more in the match loss (the ``reviewed_match`` table marks it),
      when ``use_mismatches`` and R is X's report in the dataset (the pair the step weighs is the one
      the reviewer saw). (2) It is never a negative: a generated negative of X's report
      drawn from R, or equal to R after :func:`mmclinic.text.corruptions.normalize_report`, is
      removed (``generated_negatives_removed``); in the batch, texts equal to X's report after
      normalisation are never X's negatives (the contrastive masks; the ``other_patient`` kind
      skips them). With the dataset's own pairing (R is X's report) (2) holds by construction,
      since no generated negative equals the report it was made from, and nothing is removed;
      it removes negatives when the decision names another report of the split than X's, e.g. a
      decision kept from an earlier pairing of the images.
    - **dismissed**: counted, not used.

    Decisions on images outside the training split are counted (``outside_train``), not used.
    ``review_counts`` records every count, overall and per scoring run (``by_scoring_run``: the
    review batches the decisions came from)."""
    from mmclinic.text.corruptions import normalize_report

    own = dict(zip(map(str, images), map(str, image_reports)))
    row = {rid: i for i, rid in enumerate(tables.report_ids)}
    texts = {k: list(v) for k, v in tables.texts.items()}
    counts: dict[str, Any] = {"confirmed_mismatch": 0, "confirmed_match": 0, "dismissed": 0, "outside_train": 0,
                              "generated_negatives_removed": 0, "contrastive_excluded": 0, "hard_positives": 0}
    by_run: dict[str, dict[str, int]] = {}
    neg_ids, neg_texts, match_ids, match_texts = [], [], [], []
    for pair_id in sorted(reviews.decisions):
        d = reviews.decisions[pair_id]
        report = own.get(pair_id)
        key = d.get("report_key") or report
        used = report is not None and not (d["status"] == "confirmed_mismatch" and key != report)
        status = d["status"] if used else "outside_train"
        counts[status] += 1
        for run in d.get("scoring_run_ids") or ["none"]:
            per = by_run.setdefault(run, {})
            per[status] = per.get(status, 0) + 1
        if not used:
            continue
        if d["status"] == "confirmed_mismatch" and use_mismatches:
            neg_ids.append(pair_id)
            neg_texts.append(str(report_texts.get(report, "") or ""))
            counts["contrastive_excluded"] += 1
        elif d["status"] == "confirmed_match":
            if use_mismatches and key == report:  # only the pair the reviewer saw is a verified true pair
                match_ids.append(pair_id)
                match_texts.append(str(report_texts.get(key, "") or "") or pair_id)
                counts["hard_positives"] += 1
            if report in row:
                verified = normalize_report(str(report_texts.get(key, "") or ""))
                for kind in texts:
                    src = tables.sources.get(kind)
                    t = texts[kind][row[report]]
                    if t and ((src is not None and src[row[report]] == key)
                              or (verified and normalize_report(t) == verified)):
                        texts[kind][row[report]] = ""
                        counts["generated_negatives_removed"] += 1
    counts["by_scoring_run"] = {k: by_run[k] for k in sorted(by_run)}
    counts["scoring_run_ids"] = reviews.scoring_run_ids
    counts["source"] = _without_password(reviews.source)
    counts["sha256"] = reviews.sha256
    by_image = dict(tables.by_image)
    if use_mismatches:
        # A table with no decision holds one row no image id matches (a lookup table cannot be empty).
        by_image[REVIEWED_KIND] = (tuple(neg_ids), tuple(neg_texts)) if neg_ids else (("",), ("",))
        by_image[REVIEWED_MATCH_KIND] = (tuple(match_ids), tuple(match_texts)) if match_ids else (("",), ("",))
    return replace(tables, texts={k: tuple(v) for k, v in texts.items()}, by_image=by_image, review_counts=counts)


def _without_password(source: str) -> str:
    """A decisions source as recorded with the run: a database URL without its password."""
    if "://" not in str(source):
        return str(source)
    try:
        from sqlalchemy.engine import make_url

        return make_url(str(source)).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: keep only its scheme
        return str(source).split("://", 1)[0] + "://..."
