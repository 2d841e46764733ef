"""A split in memory, embedded by a scorer, and its seeded mismatch pairs: the inputs that the
evaluation report, run comparison and export vetting share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.artifacts import DatasetDir, SplitData
from mmclinic.eval.scorers import Scorer

__all__ = ["Embedded", "SplitData", "embed", "load_split", "mismatch_set", "pair_logits", "report_findings"]


def load_split(dataset: str | Path | DatasetDir, split: str) -> SplitData:
    """All images of a split with their report text, from the dataset folder."""
    ds = dataset if isinstance(dataset, DatasetDir) else DatasetDir.open(dataset)
    return ds.load_split(split)


@dataclass
class Embedded:
    image_emb: np.ndarray
    report_emb: np.ndarray  # one per unique report
    report_ids: list[str]
    image_report: np.ndarray  # index into report_emb per image
    meta: Any
    texts: list[str]


def embed(scorer: Scorer, data: SplitData) -> Embedded:
    """Every image of ``data`` and each of its reports once (in ``report_id`` order)."""
    report_ids = sorted(set(data.meta["report_id"]))
    index = {r: i for i, r in enumerate(report_ids)}
    text_of = dict(zip(data.meta["report_id"], data.texts))
    texts = [text_of[r] for r in report_ids]
    return Embedded(
        image_emb=scorer.embed_images(data.png), report_emb=scorer.embed_texts(texts), report_ids=report_ids,
        image_report=np.array([index[r] for r in data.meta["report_id"]]), meta=data.meta, texts=texts)


def report_findings(emb: Embedded) -> tuple[list[frozenset[str]], str]:
    """The findings each report states, and where they came from.

    From the manifest's ``labels`` column where it holds list-valued keys (``findings``,
    ``problems``: their union, lower case), otherwise from the report text by the rules of
    :func:`mmclinic.text.corruptions.positive_findings`.
    """
    from mmclinic.text.corruptions import positive_findings
    from mmclinic.text.labels import parse_labels

    out: list[frozenset[str] | None] = [None] * len(emb.report_ids)
    if "labels" in emb.meta.columns:
        for obj, r in zip(parse_labels(emb.meta["labels"].tolist()), emb.image_report):
            lists = {k: v for k, v in (obj or {}).items() if isinstance(v, list)}
            if lists and out[r] is None:
                out[r] = frozenset(f"{k}:{str(x).lower()}" for k, v in lists.items() for x in v)
    from_labels = sum(x is not None for x in out)
    final = [x if x is not None else positive_findings(t) for x, t in zip(out, emb.texts)]
    if from_labels == len(out):
        source = "manifest labels"
    elif from_labels == 0:
        source = "report text rules"
    else:
        source = f"manifest labels ({from_labels} reports), report text rules ({len(out) - from_labels} reports)"
    return final, source


def mismatch_set(emb: Embedded, seed: int, findings: list[frozenset[str]] | None = None,
                 kinds: tuple[str, ...] | None = None):
    """A fixed, seeded :class:`~mmclinic.text.corruptions.CorruptionSet` of the split (see that module)."""
    from mmclinic.text.corruptions import KINDS, build_corruption_set

    if findings is None:
        findings, _ = report_findings(emb)
    studies = emb.meta["study_key"].to_numpy() if "study_key" in emb.meta.columns else emb.meta["report_id"].to_numpy()
    report_study = [None] * len(emb.report_ids)
    for r, st in zip(emb.image_report, studies):
        report_study[r] = st if report_study[r] is None else report_study[r]
    return build_corruption_set(emb.texts, emb.image_report, emb.meta["patient_key"].to_numpy(), report_study,
                                findings, seed, kinds or KINDS)


def pair_logits(scorer: Scorer, emb: Embedded, cset) -> np.ndarray:
    """Match logit of every pair of a corruption set (higher: more likely the report belongs)."""
    known = {t: i for i, t in enumerate(emb.texts)}
    new = sorted({t for t in cset.text if t not in known})
    new_emb = scorer.embed_texts(new) if new else np.zeros((0, emb.report_emb.shape[1]), np.float32)
    new_index = {t: i for i, t in enumerate(new)}
    txt = np.stack([emb.report_emb[known[t]] if t in known else new_emb[new_index[t]] for t in cset.text])
    return np.asarray(scorer.match_logits(emb.image_emb[cset.image], txt), dtype=np.float64).reshape(-1)
