"""Zero-shot classification from text prompts, wherever the manifest carries labels.

Labels come from the manifest column ``labels``: one JSON object per image, for example
``{"findings": ["cardiomegaly", "pleural_effusion"]}`` (an empty list: no finding),
``{"modality": "CT", "plane": "Axial", "location_category": "Head"}`` or
``{"problems": ["Cardiomegaly", "Opacity"]}``.

- A list-valued key gives one binary task per value (present vs absent). The score is the
  image's cosine similarity to the positive prompts' ensemble minus that to the negative
  prompts' ensemble ("there is X" vs "no X").
- A string-valued key gives one one-vs-rest task per class. The score is the similarity to the
  class's prompt ensemble minus the mean similarity to the other classes' ensembles.

A prompt ensemble is the mean of the text embeddings of several templates, re-normalised
(as in CLIP's prompt ensembling). Tasks with fewer than ``min_positives`` positives or
negatives are listed as skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmclinic.config import EvalConfig

# The prompt templates are defined once, as the defaults of the ``eval.zeroshot_*_templates`` keys.
_DEFAULTS = EvalConfig()


def readable(name: str) -> str:
    """Label text a prompt can use: underscores to spaces, lower case unless an acronym."""
    text = str(name).replace("_", " ").strip()
    return text if text.isupper() and len(text) <= 5 else text.lower()


@dataclass
class Task:
    name: str
    key: str
    value: str
    kind: str  # "binary" (a list-valued key) or "one_vs_rest" (a string-valued key)
    y: np.ndarray  # 1, 0, or -1 where unknown
    positive_prompts: list[str]
    negative_prompts: list[str]
    """For a one-vs-rest task, the other classes' prompts, ``group`` consecutive prompts per class."""
    group: int = 1


def build_tasks(labels: Sequence[dict[str, Any] | None], min_positives: int,
                positive_templates: Sequence[str] = _DEFAULTS.zeroshot_positive_templates,
                negative_templates: Sequence[str] = _DEFAULTS.zeroshot_negative_templates,
                class_templates: Sequence[str] = _DEFAULTS.zeroshot_class_templates) -> tuple[list[Task], dict[str, str]]:
    """Tasks with enough positives and negatives, and the skipped ones with their reason
    (``labels``: one parsed label object per image, see :func:`mmclinic.text.labels.parse_labels`;
    templates default to :class:`~mmclinic.config.EvalConfig`'s)."""
    n = len(labels)
    list_keys: dict[str, set[str]] = {}
    str_keys: dict[str, set[str]] = {}
    for obj in labels:
        for k, v in (obj or {}).items():
            if isinstance(v, list):
                list_keys.setdefault(k, set()).update(str(x) for x in v)
            elif isinstance(v, (str, int, float, bool)) and v is not None and str(v).strip():
                str_keys.setdefault(k, set()).add(str(v))
    tasks: list[Task] = []
    skipped: dict[str, str] = {}

    def keep(task: Task) -> None:
        pos, neg = int((task.y == 1).sum()), int((task.y == 0).sum())
        if pos < min_positives or neg < min_positives:
            skipped[task.name] = f"{pos} positives and {neg} negatives; needs at least {min_positives} of each"
        else:
            tasks.append(task)

    for key in sorted(list_keys):
        for value in sorted(list_keys[key]):
            y = np.full(n, -1, dtype=np.int64)
            for i, obj in enumerate(labels):
                if obj is not None and isinstance(obj.get(key), list):
                    y[i] = int(value in {str(x) for x in obj[key]})
            label = readable(value)
            keep(Task(f"{key}={value}", key, value, "binary", y,
                      [t.format(label=label) for t in positive_templates],
                      [t.format(label=label) for t in negative_templates]))
    for key in sorted(str_keys):
        classes = sorted(str_keys[key])
        if len(classes) < 2:
            skipped[f"{key}=*"] = f"a single class ({len(classes)}); nothing to tell apart"
            continue
        for value in classes:
            y = np.full(n, -1, dtype=np.int64)
            for i, obj in enumerate(labels):
                v = (obj or {}).get(key)
                if v is not None and not isinstance(v, list) and str(v).strip():
                    y[i] = int(str(v) == value)
            others = [c for c in classes if c != value]
            keep(Task(f"{key}={value}", key, value, "one_vs_rest", y,
                      [t.format(value=readable(value), key=readable(key)) for t in class_templates],
                      [t.format(value=readable(c), key=readable(key)) for c in others for t in class_templates],
                      group=len(class_templates)))
    return tasks, skipped


def _ensemble(emb: np.ndarray) -> np.ndarray:
    v = np.asarray(emb, dtype=np.float64).mean(0)
    return v / max(np.linalg.norm(v), 1e-12)


def task_scores(image_emb: np.ndarray, task: Task, embed_texts: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """Zero-shot score per image for one task (higher: more likely positive)."""
    img = np.asarray(image_emb, dtype=np.float64)
    pos = _ensemble(embed_texts(task.positive_prompts))
    if task.kind == "binary":
        neg = _ensemble(embed_texts(task.negative_prompts))
        return img @ pos - img @ neg
    per = max(task.group, 1)
    neg_emb = np.asarray(embed_texts(task.negative_prompts), dtype=np.float64)
    others = [_ensemble(neg_emb[i:i + per]) for i in range(0, len(neg_emb), per)]
    return img @ pos - np.mean([img @ o for o in others], axis=0)
