"""Report corruptions: plausible wrong reports for mismatch evaluation and training.

Every function here is pure Python on strings (plus a ``numpy`` random generator where a
choice is made), deterministic for a given generator state, and returns ``None`` when the
corruption does not apply to a text. The rules are deliberately simple and readable
(sentence-level, NegEx-style cues); they are tested on the synthetic reports' phrasing and
on typical chest radiograph report sentences.

Kinds, as evaluation counts them (:data:`KINDS`):

- ``other_patient_different_findings`` (easy): another patient's report stating other findings;
- ``other_patient_same_findings`` (hard): another patient's report stating the same findings
  (for example both normal) but worded differently;
- ``same_patient_other_study``: the same patient's report of another study;
- ``laterality_swap``: the image's own report with left and right exchanged;
- ``negation``: the own report with one stated finding negated in every sentence stating it;
- ``finding_swap``: the own report with one stated finding term replaced by another finding's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

KINDS = (
    "other_patient_different_findings",
    "other_patient_same_findings",
    "same_patient_other_study",
    "laterality_swap",
    "negation",
    "finding_swap",
)

# --------------------------------------------------------------------------- finding terms

FINDING_PATTERNS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (r"cardiomegaly", r"(?:heart|cardiac silhouette) (?:is|appears) enlarged",
                     r"enlarge(?:d|ment of the) (?:heart|cardiac silhouette)"),
    "pleural_effusion": (r"pleural effusions?", r"effusions?"),
    "pneumothorax": (r"pneumothorax", r"pneumothoraces"),
    "nodule": (r"nodules?",),
    "mass": (r"mass(?:es)?",),
    "consolidation": (r"consolidations?",),
    "atelectasis": (r"atelectas[ie]s",),
    "edema": (r"o?edema",),
    "pneumonia": (r"pneumonias?",),
    "opacity": (r"opacit(?:y|ies)",),
    "fracture": (r"fractures?",),
    "emphysema": (r"emphysema",),
    "support_device": (r"endotracheal tube", r"(?:venous )?catheter", r"pacemaker", r"(?:central|picc) line"),
}
"""Canonical finding name -> regular expressions of its mentions (matched case-insensitively)."""

SWAP_NOUNS: dict[str, tuple[str, str]] = {
    "pleural_effusion": ("pleural effusion", "pleural effusions"),
    "pneumothorax": ("pneumothorax", "pneumothoraces"),
    "consolidation": ("consolidation", "consolidations"),
    "nodule": ("nodule", "nodules"),
    "mass": ("mass", "masses"),
    "atelectasis": ("atelectasis", "atelectases"),
    "edema": ("edema", "edema"),
    "cardiomegaly": ("cardiomegaly", "cardiomegaly"),
    "opacity": ("opacity", "opacities"),
    "pneumonia": ("pneumonia", "pneumonias"),
}
"""Findings whose mention is a plain noun that :func:`swap_finding` may exchange: (singular, plural)."""

_SWAP_SURFACE = re.compile(
    r"\b(pleural effusions?|effusions?|pneumothorax|pneumothoraces|consolidations?|nodules?|mass(?:es)?|"
    r"atelectas[ie]s|o?edema|cardiomegaly|opacit(?:y|ies)|pneumonias?)\b", re.I)
_SURFACE_CANON = [
    (re.compile(r"(pleural )?effusions?", re.I), "pleural_effusion"),
    (re.compile(r"pneumothora(?:x|ces)", re.I), "pneumothorax"),
    (re.compile(r"consolidations?", re.I), "consolidation"),
    (re.compile(r"nodules?", re.I), "nodule"),
    (re.compile(r"mass(?:es)?", re.I), "mass"),
    (re.compile(r"atelectas[ie]s", re.I), "atelectasis"),
    (re.compile(r"o?edema", re.I), "edema"),
    (re.compile(r"cardiomegaly", re.I), "cardiomegaly"),
    (re.compile(r"opacit(?:y|ies)", re.I), "opacity"),
    (re.compile(r"pneumonias?", re.I), "pneumonia"),
]
_PLURAL = re.compile(r"(?:effusions|pneumothoraces|consolidations|nodules|masses|atelectases|opacities|pneumonias)$",
                     re.I)

_FINDING_RX = {name: re.compile(r"\b(?:" + "|".join(p) + r")\b", re.I) for name, p in FINDING_PATTERNS.items()}
_NEGATION = re.compile(
    r"\b(?:no|not|without|negative for|free of|absence of|absent|resolved|resolution of|clear of|"
    r"removed|ruled out|rule out|neither|nor)\b", re.I)
_POST_NEGATION = re.compile(r"^\W*(?:\w+\W+){0,3}?(?:is|are|was|were)\s+(?:not|no longer)\b|^\W*(?:has|have)\s+resolved\b",
                            re.I)
_HEDGE = re.compile(r"\b(?:possible|possibly|questionable|may represent|cannot be excluded|suspected|"
                    r"suspicious for|probable|likely|could represent|consider)\b", re.I)
_SENTENCE = re.compile(r"[^.;!?]+(?:[.;!?]+|$)")
_CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|though|with the exception of)\b|,\s*(?=which\b)", re.I)
_SIDE = re.compile(r"\b(left|right)\b", re.I)


@dataclass(frozen=True)
class Mention:
    """One mention of a finding: its span in the text and whether it is stated as present."""

    finding: str
    start: int
    end: int
    sentence: tuple[int, int]
    negated: bool
    hedged: bool

    @property
    def positive(self) -> bool:
        return not self.negated


def sentences(text: str) -> list[tuple[int, int]]:
    """Spans of sentences (split after ``. ; ! ?``), leading whitespace excluded."""
    out = []
    for m in _SENTENCE.finditer(text):
        start, end = m.start(), m.end()
        while start < end and text[start].isspace():
            start += 1
        if start < end:
            out.append((start, end))
    return out


def find_mentions(text: str) -> list[Mention]:
    """Every finding mention, with NegEx-style negation and hedging within its clause."""
    out: list[Mention] = []
    for s0, s1 in sentences(text):
        sent = text[s0:s1]
        breaks = [m.end() for m in _CLAUSE_BREAK.finditer(sent)]
        taken: list[tuple[int, int]] = []
        for name, rx in _FINDING_RX.items():
            for m in rx.finditer(sent):
                if any(a < m.end() and m.start() < b for a, b in taken):
                    continue  # "pleural effusion" already counted; not again as "effusion"
                taken.append((m.start(), m.end()))
                clause_start = max([b for b in breaks if b <= m.start()], default=0)
                clause_end = min([b for b in breaks if b > m.end()], default=len(sent))
                before, after = sent[clause_start:m.start()], sent[m.end():clause_end]
                negated = bool(_NEGATION.search(before) or _POST_NEGATION.search(after))
                out.append(Mention(name, s0 + m.start(), s0 + m.end(), (s0, s1),
                                   negated=negated, hedged=bool(_HEDGE.search(sent))))
    return sorted(out, key=lambda x: x.start)


def positive_findings(text: str) -> frozenset[str]:
    """Canonical findings stated as present (hedged statements count; negated ones do not)."""
    return frozenset(m.finding for m in find_mentions(text) if m.positive)


def normalize_report(text: str) -> str:
    """The comparison form of a report: lower case, de-identification placeholders
    (``[NAME]``, ``XXXX``) and list numbering removed, punctuation dropped, spaces collapsed.
    Two reports with the same normalised text are the same report for retrieval purposes."""
    t = re.sub(r"\[[A-Z_ ]+\]|\bX{2,}\b", " ", text)
    t = re.sub(r"(?:(?<=\s)|^)\d+\.\s", " ", t)
    t = re.sub(r"[^0-9a-z]+", " ", t.lower())
    return re.sub(r"\s+", " ", t).strip()


# --------------------------------------------------------------------------- text corruptions


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_laterality(text: str) -> str:
    """Every side word exchanged (``left`` <-> ``right``, case kept, also in ``left-sided``);
    nothing else changes (``bilateral`` stays). Returns the text unchanged when it names no side."""
    return _SIDE.sub(lambda m: _match_case("right" if m.group(0).lower() == "left" else "left", m.group(0)), text)


def _negate_sentence(sent: str) -> str:
    """A sentence stating a finding rewritten to state its absence."""
    lead = re.match(r"\s*(?:\d+\.\s*)?", sent).end()
    head, body = sent[:lead], sent[lead:]
    body = re.sub(r"^(?:possible|questionable|probable|suspected)\s+", "", body, flags=re.I)
    m = re.match(r"(there|There|THERE) (is|are|was|were) (?:(?:a|an|some|several|multiple) )?", body)
    if m:
        return head + f"{m.group(1)} {m.group(2)} no " + body[m.end():]
    m = re.match(r"(?:a|an) ", body, re.I)
    if m:
        return head + "No " + body[m.end():]
    m = re.search(r"\b(is|are)\b(?! not\b)", body)
    if m and not re.match(r"\s*(?:no|not)\b", body[m.end():], re.I):
        return head + body[:m.end()] + " not" + body[m.end():]
    first = body.split(" ", 1)[0]
    rest = body if first.isupper() and len(first) > 1 else body[:1].lower() + body[1:]
    return head + "No " + rest


def negate_finding(text: str, rng: np.random.Generator) -> str | None:
    """Negate one finding the report states: every sentence stating it as present is rewritten
    ("There is a left pleural effusion." -> "There is no left pleural effusion.").
    ``None`` when the report states no finding."""
    mentions = [m for m in find_mentions(text) if m.positive and m.finding != "support_device"]
    if not mentions:
        return None
    names = sorted({m.finding for m in mentions})
    chosen = names[int(rng.integers(len(names)))]
    spans = sorted({m.sentence for m in mentions if m.finding == chosen})
    out, pos = [], 0
    for s0, s1 in spans:
        out.append(text[pos:s0])
        out.append(_negate_sentence(text[s0:s1]))
        pos = s1
    out.append(text[pos:])
    result = "".join(out)
    return result if result != text else None


@dataclass(frozen=True)
class FindingSwap:
    text: str
    old: str
    new: str
    spans: tuple[tuple[int, int], ...]
    """Spans in the original text that were replaced."""


def swap_finding_detail(text: str, rng: np.random.Generator) -> FindingSwap | None:
    """:func:`swap_finding` with what was replaced, for tests and failure tables."""
    positive = positive_findings(text)
    mentioned = {m.finding for m in find_mentions(text)}
    spans_by: dict[str, list[tuple[int, int, str]]] = {}
    for mention in find_mentions(text):
        if not mention.positive:
            continue
        for m in _SWAP_SURFACE.finditer(text, mention.start, mention.end):
            surface = m.group(0)
            canon = next(c for rx, c in _SURFACE_CANON if rx.fullmatch(surface))
            spans_by.setdefault(canon, []).append((m.start(), m.end(), surface))
    if not spans_by:
        return None
    olds = sorted(spans_by)
    old = olds[int(rng.integers(len(olds)))]
    unmentioned = [c for c in SWAP_NOUNS if c not in mentioned]
    candidates = unmentioned or [c for c in SWAP_NOUNS if c not in positive and c != old]
    if not candidates:
        return None
    new = candidates[int(rng.integers(len(candidates)))]
    out, pos = [], 0
    spans = spans_by[old]
    for s, e, surface in spans:
        word = SWAP_NOUNS[new][1 if _PLURAL.search(surface) else 0]
        out += [text[pos:s], _match_case(word, surface)]
        pos = e
    out.append(text[pos:])
    return FindingSwap("".join(out), old, new, tuple((s, e) for s, e, _ in spans))


def swap_finding(text: str, rng: np.random.Generator) -> str | None:
    """Replace one stated finding's term by another finding's, everywhere it is stated
    ("Small left pleural effusion." -> "Small left pneumothorax."); only the term changes.
    The replacement is a finding the report does not mention. ``None`` when the report states
    no exchangeable finding."""
    swap = swap_finding_detail(text, rng)
    return swap.text if swap else None


# --------------------------------------------------------------------------- corruption sets


def _ids(values: Sequence) -> np.ndarray:
    index: dict = {}
    return np.array([index.setdefault(v, len(index)) for v in values], dtype=np.int64)


@dataclass
class CorruptionSet:
    """Image-report pairs: each image with its own report (``kind == "match"``) and corruptions.

    ``text`` is the text shown with the image, ``source`` the index of the report it came from
    (the own report for text corruptions)."""

    image: np.ndarray
    text: list[str]
    kind: np.ndarray
    source: np.ndarray
    produced: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> np.ndarray:
        """1 for a mismatched pair, 0 for the true pair."""
        return (self.kind != "match").astype(int)


def build_corruption_set(report_texts: Sequence[str], image_report: Sequence[int], image_patient: Sequence[str],
                         report_study: Sequence[str], report_findings: Sequence[frozenset[str]], seed: int,
                         kinds: Sequence[str] = KINDS) -> CorruptionSet:
    """A fixed, seeded corruption set: for every image its true pair plus one pair per applicable kind.

    ``report_texts``: one text per report; ``image_report``: index into it per image;
    ``image_patient``: patient key per image; ``report_study``: study key per report;
    ``report_findings``: the findings each report states (labels or :func:`positive_findings`).
    A kind that does not apply to an image (no other study of the patient, no side word, ...)
    is skipped and counted in ``skipped``. The same inputs and seed give the same set.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown corruption kind {unknown[0]!r}; allowed: {', '.join(KINDS)}")
    image_report = np.asarray(image_report, dtype=np.int64)
    image_patient = np.asarray(image_patient)
    norm = [normalize_report(t) for t in report_texts]
    n_reports = len(report_texts)
    norm_id = _ids(norm)
    find_id = _ids([tuple(sorted(f)) for f in report_findings])
    report_patient = np.empty(n_reports, dtype=object)
    for i, r in enumerate(image_report):
        report_patient[r] = image_patient[i]
    report_study = np.asarray(report_study, dtype=object)
    img, txt, kind, src = [], [], [], []
    produced = {k: 0 for k in kinds}
    skipped = {k: 0 for k in kinds}

    def add(i: int, text: str, k: str, s: int) -> None:
        img.append(i); txt.append(text); kind.append(k); src.append(s)

    for i, r in enumerate(image_report):
        add(i, report_texts[r], "match", int(r))
        other_text = norm_id != norm_id[r]
        other_patient = (report_patient != image_patient[i]) & other_text
        same_findings = find_id == find_id[r]
        for ki, k in enumerate(KINDS):
            if k not in kinds:
                continue
            rng = np.random.default_rng([seed, i, ki])
            choice: tuple[str, int] | None = None
            if k in ("other_patient_different_findings", "other_patient_same_findings", "same_patient_other_study"):
                if k == "same_patient_other_study":
                    mask = (report_patient == image_patient[i]) & (report_study != report_study[r]) & other_text
                else:
                    mask = other_patient & (same_findings if k == "other_patient_same_findings" else ~same_findings)
                cands = np.flatnonzero(mask)
                if cands.size:
                    j = int(cands[int(rng.integers(cands.size))])
                    choice = (report_texts[j], j)
            else:
                text = report_texts[r]
                out = (swap_laterality(text) if k == "laterality_swap" else
                       negate_finding(text, rng) if k == "negation" else swap_finding(text, rng))
                if out is not None and out != text and normalize_report(out) != norm[r]:
                    choice = (out, int(r))
            if choice is None:
                skipped[k] += 1
            else:
                produced[k] += 1
                add(i, choice[0], k, choice[1])
    return CorruptionSet(image=np.asarray(img, dtype=np.int64), text=txt, kind=np.asarray(kind, dtype=object),
                         source=np.asarray(src, dtype=np.int64), produced=produced, skipped=skipped)
