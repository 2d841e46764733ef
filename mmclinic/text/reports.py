"""Radiology report parsing: sections, normalisation and the text a model sees."""

from __future__ import annotations

import re
from dataclasses import dataclass

SECTION_ALIASES = {
    "FINDINGS": "findings", "FINDING": "findings", "REPORT": "findings", "DESCRIPTION": "findings",
    "IMPRESSION": "impression", "IMPRESSIONS": "impression", "CONCLUSION": "impression",
    "CONCLUSIONS": "impression", "OPINION": "impression", "SUMMARY": "impression",
    "INDICATION": "indication", "INDICATIONS": "indication", "CLINICAL INDICATION": "indication",
    "REASON FOR EXAM": "indication", "CLINICAL HISTORY": "history", "HISTORY": "history",
    "COMPARISON": "comparison", "COMPARISONS": "comparison", "TECHNIQUE": "technique",
    "EXAM": "exam", "EXAMINATION": "exam",
}
_HEADER = re.compile(
    r"(?:^|\n|(?<=[.\s]))\s*(" + "|".join(sorted((re.escape(k) for k in SECTION_ALIASES), key=len, reverse=True))
    + r")\s*:", re.I)

TEXT_POLICIES = ("findings", "impression", "both", "longest")


@dataclass(frozen=True)
class ParsedReport:
    findings: str
    impression: str
    indication: str
    history: str
    comparison: str
    other: str


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace; turn redaction runs like 'XXXX XXXX' into one token."""
    text = re.sub(r"\bX{2,}(?:[\s-]+X{2,})*\b", "XXXX", text)
    return re.sub(r"\s+", " ", text).strip()


def parse_sections(text: str) -> ParsedReport:
    """Split a report into its sections; text before any header goes to ``other``."""
    parts: dict[str, list[str]] = {}
    matches = list(_HEADER.finditer(text))
    head = text[: matches[0].start()] if matches else text
    for m, nxt in zip(matches, matches[1:] + [None]):
        name = SECTION_ALIASES[m.group(1).upper()]
        body = text[m.end(): nxt.start() if nxt else len(text)]
        parts.setdefault(name, []).append(normalize_whitespace(body))
    get = lambda k: " ".join(p for p in parts.get(k, []) if p)  # noqa: E731
    other = " ".join(x for x in [normalize_whitespace(head), get("exam"), get("technique")] if x)
    return ParsedReport(get("findings"), get("impression"), get("indication"), get("history"),
                        get("comparison"), other)


def model_text(report: ParsedReport, policy: str = "both") -> str:
    """The text a model is trained on, chosen by ``policy``."""
    if policy not in TEXT_POLICIES:
        raise ValueError(f"text policy must be one of {TEXT_POLICIES}, got {policy!r}")
    f, i = report.findings, report.impression
    if not f and not i:
        return report.other  # a report without the usual headers keeps its text
    if policy == "findings":
        return f or i
    if policy == "impression":
        return i or f
    if policy == "longest":
        return f if len(f) >= len(i) else i
    return " ".join(x for x in (f, i) if x)
