"""The text the model sees: one definition, in TensorFlow string ops, used by every path.

``model_text(raw report text, text config) -> model text`` is written once, as
``tf.strings`` operations (RE2 regular expressions), so that the same code runs

- eagerly on the CPU from Python: ingest (after its full de-identification with the
  archive's own identities), training's and evaluation's scorers, ``mmclinic score``;
- inside ``tf.data`` pipelines and ``tf.function``;
- inside the exported SavedModel, before the tokenizer: ``serving_default``,
  ``embed_text``, and therefore ``mmclinic serve`` and TensorFlow Serving in production,
  fed the raw report.

Steps, in order:

1. section headers (:data:`mmclinic.text.reports.SECTION_ALIASES`, case-insensitive, at the
   start, after whitespace or after a full stop, followed by ``:``) are marked, so that no
   rule below reaches into one;
2. the de-identification pattern rules that RE2 can express (:data:`GRAPH_RULES`: e-mail,
   URL, social security, phone, record and accession numbers after their label, numeric
   and month-name dates with a year, names after a title, after signature labels
   (``Signed by:``, ``Dictated by``, ``Attending:``, ``cc:`` ...) and after ``Patient:`` /
   ``Name:``, long numbers), with the placeholders of :mod:`mmclinic.phi.text_deid`; the
   report is split at the headers; the text before the first header is the head;
3. every part is normalised: runs of ``XXXX`` redactions become one ``XXXX``, whitespace
   runs (Python's ``str.isspace`` set) become one space, ends trimmed;
4. the text policy (:class:`TextConfig`) chooses the sections: ``findings``,
   ``impression``, ``both``, ``longest`` (a report with neither keeps its head, exam and
   technique text), ``caption`` and ``caption+findings`` (the caption is the head: a
   report written as caption, then headed sections).

The result is idempotent: ``model_text(model_text(x)) == model_text(x)`` (tested), so
applying it again to text that already went through it changes nothing.

What it cannot do in the graph: remove the identities only the archive knows (names and
numbers from DICOM headers and source tables), and the look-around rules of
:mod:`mmclinic.phi.text_deid` (names after signature labels, with credentials or in
capitals, institutions, addresses, ages over 89 ...). :data:`OUT_OF_GRAPH` lists them;
the model card and ``docs/SERVING_CLIENTS.md`` say so.

Sections parsed here follow :func:`mmclinic.text.reports.parse_sections` on ASCII text;
two small differences on other text: ``\\b`` around ``XXXX`` runs is ASCII (RE2), and
the rule patterns use ASCII classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mmclinic.text.reports import SECTION_ALIASES

TEXT_POLICIES = ("findings", "impression", "both", "longest", "caption", "caption+findings")
DEFINITION_VERSION = 1
"""Bumped whenever the function's output can change for some input."""

# Python's whitespace (``str.isspace``, what ``re``'s ``\s`` matches in str patterns) as an RE2 class body.
_WS = r"\t-\r\x{1c}-\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_HEAD_MARK, _NAME_MARK = "\x1e", "\x1f"  # whitespace to Python, so step 0 turns any in the input into spaces

_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December"
           "|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec")
_SMALL_MARK = "\x1d"
"""Put before a capitalised small word (At, THE, With ...) while the name rules run: never part of a name."""
_SMALL_WORDS = ("at", "on", "in", "to", "by", "for", "and", "or", "of", "the", "with", "was", "is", "re", "regarding",
                "who", "per", "via", "from")
_SMALL = r"\b(" + "|".join(w[0].upper() + "".join(f"[{c.upper()}{c}]" for c in w[1:]) for w in _SMALL_WORDS) + r")\b"
# A name word: capitalised or in capitals, two letters or more, not a redaction run (XXXX).
_NW = r"(?:[A-WYZ][A-Za-z'’-]*[A-Za-z]|X+[A-WYZa-z][A-Za-z'’-]*)"
# Initials, a name word, then up to two more (a middle initial only between name words).
_PERSON = rf"(?:[A-Z]\.[ \t]*){{0,2}}{_NW}(?:[ \t]+[A-Z]\.?(?:[ \t]+{_NW}){{1,2}}|(?:[ \t]+{_NW}){{0,2}})"
_CREDS = (r"(?:,[ \t]*(?:MD|DO|RN|NP|PhD|MBBS|FRCR|FRCPC)\b|,[ \t]*(?:M\.D\.|D\.O\.|R\.N\.|N\.P\.|Ph\.D\.)"
          r"|[ \t]+(?:MD|PhD|MBBS|FRCR|FRCPC)\b|[ \t]+(?:M\.D\.|Ph\.D\.))*")
_TITLE = r"\b(?:(?:Dr|dr|Doctor|Prof|Professor|Mr|Mrs|Ms|Mx|Miss)(?:\.[ \t]*|[ \t]+)|(?:DR|MRS|PROF)\.[ \t]*)"
_SIGNATURE_LABEL = (r"\b((?i:(?:electronically[ \t]+)?(?:co-?)?(?:signed|reported|dictated|read|reviewed|interpreted"
                    r"|transcribed|verified|approved|authenticated|finalized)[ \t]+\x1d?by[ \t]*:?"
                    r"|(?:attending|radiologist|resident|fellow|technologist)(?:[ \t]+(?:physician|radiologist))?"
                    r"[ \t]*:|cc[ \t]*:)[ \t]*)")
_PATIENT_LABEL = (r"((?:\b[Pp]atient|\bPATIENT|\bP[Tt]\.?)(?:[ \t]+(?i:name))?[ \t]*:[ \t]*"
                  r"|\b(?i:full|last|first|given|family|patient'?s)[ \t]+(?i:name)[ \t]*:[ \t]*"
                  r"|\b(?:[Nn]ame|NAME)[ \t]*:[ \t]*)")
_NUMBER = r"[A-Za-z0-9-]*[0-9][A-Za-z0-9-]*"

GRAPH_RULES: tuple[tuple[str, str, str], ...] = (
    ("email", r"\b[A-Za-z0-9_.+-]+@[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+\b", "[EMAIL]"),
    ("url", r"(?i)\b(?:https?://|www\.)[^\s\x1d-\x1f<>\"]*[^\s\x1d-\x1f<>\".,;:!?)\]']", "[URL]"),
    ("ssn", r"\b(?i:ssn|social[ \t]+security(?:[ \t]+number)?)[ \t]*[:#]?[ \t]*[0-9]{3}[ -]?[0-9]{2}[ -]?[0-9]{4}\b"
            r"|\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", "[SSN]"),
    ("phone", r"(?:\+1[ .-]?)?(?:\([0-9]{3}\)[ .-]?|\b[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}\b", "[PHONE]"),
    ("medical_record_number",
     r"\b(?i:mrn|mr[ \t]*#|medical[ \t]+record(?:[ \t]+(?:number|no\.?|#))?)[ \t]*[:#=-]?[ \t]*" + _NUMBER, "[MRN]"),
    ("accession_number", r"\b(?i:accession(?:[ \t]+(?:number|no\.?|#))?|acc[ \t]*#)[ \t]*[:#=-]?[ \t]*" + _NUMBER,
     "[ACCESSION]"),
    ("date", r"\b[0-9]{1,2}/[0-9]{1,2}/(?:[0-9]{4}|[0-9]{2})\b|\b[0-9]{1,2}-[0-9]{1,2}-(?:[0-9]{4}|[0-9]{2})\b"
             r"|\b[0-9]{1,2}\.[0-9]{1,2}\.[0-9]{4}\b|\b(?:19|20)[0-9]{2}[/-][0-9]{1,2}[/-][0-9]{1,2}\b"
             rf"|\b(?i:{_MONTHS})\.?[ \t]+[0-9]{{1,2}}(?i:st|nd|rd|th)?,?[ \t]+(?:19|20)[0-9]{{2}}\b"
             rf"|\b[0-9]{{1,2}}(?i:st|nd|rd|th)?[ \t]+(?i:{_MONTHS})\.?,?[ \t]+(?:19|20)[0-9]{{2}}\b", "[DATE]"),
    ("titled_name", _TITLE + _PERSON + _CREDS, "[NAME]"),
    ("signature_name", _SIGNATURE_LABEL + _PERSON + _CREDS, r"\1[NAME]"),
    ("patient_name", _PATIENT_LABEL + _PERSON, r"\1[NAME]"),
    ("long_number", r"\b[A-Z]{0,4}[0-9]{6,}\b", "[ID]"),
)
"""``(name, RE2 pattern, rewrite)``: the rules that run in the graph, in the order of
:data:`mmclinic.phi.text_deid.RULES` and with its placeholders."""

OUT_OF_GRAPH = (
    "identities known only from the archive: names, IDs and accession numbers from DICOM headers and source tables",
    "person names after phrases such as 'discussed with' or 'called to' and after role labels other than those of "
    "the graph's signature rule, names with credentials (MD, RN ...) but no title or label, names in DICOM form "
    "(family and given name joined by a caret), and names in capitals without a title or label",
    "dates in forms the graph's rules do not cover: a month abbreviation between numbers, a month and day without "
    "a year, a day and month after 'on'",
    "record identifiers after weaker labels (ID, case, study, account ... numbers), IP addresses, phone numbers in "
    "international or extension forms, social security numbers without dashes or a label",
    "ages over 89, institutions, street addresses, ZIP codes and places",
)
"""The rules of :mod:`mmclinic.phi.text_deid` the exported graph does not apply (look-around
patterns or data known only at ingest): a client removes these before sending a report."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """What defines the model text of a run: the text policy and the definition's version."""

    policy: str = "both"
    version: int = DEFINITION_VERSION

    def __post_init__(self) -> None:
        if self.policy not in TEXT_POLICIES:
            raise ValueError(f"text policy must be one of {', '.join(TEXT_POLICIES)}, got {self.policy!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "version": self.version, "graph_rules": [r[0] for r in GRAPH_RULES]}

    @classmethod
    def from_dict(cls, obj: dict[str, Any] | None) -> TextConfig:
        """From :meth:`to_dict`'s record; ``None`` or an empty record: the defaults."""
        obj = obj or {}
        return cls(policy=obj.get("policy") or "both", version=int(obj.get("version", DEFINITION_VERSION)))


def _section_patterns() -> tuple[str, dict[str, str]]:
    aliases = sorted(SECTION_ALIASES, key=len, reverse=True)  # letters and spaces: nothing to escape
    header = (rf"(^|[.{_WS}])[{_WS}]*((?i:" + "|".join(aliases) + rf"))[{_WS}]*:")
    by_section: dict[str, list[str]] = {}
    for alias, name in SECTION_ALIASES.items():
        by_section.setdefault(name, []).append(alias)
    return header, {name: "(?i:" + "|".join(sorted(a, key=len, reverse=True)) + ")" for name, a in by_section.items()}


_HEADER, _SECTION_NAME = _section_patterns()


def _normalize(t):
    """XXXX runs to one token, whitespace runs to one space, ends trimmed (``reports.normalize_whitespace``)."""
    import tensorflow as tf

    t = tf.strings.regex_replace(t, rf"\bX{{2,}}(?:[{_WS}-]+X{{2,}})*\b", "XXXX")
    t = tf.strings.regex_replace(t, f"[{_WS}]+", " ")
    return tf.strings.regex_replace(t, "^ | $", "")


def _join_nonempty(parts, axis: int = -1):
    """Join the non-empty strings of ``parts`` (dense or ragged, last axis) with one space."""
    import tensorflow as tf

    if not isinstance(parts, tf.RaggedTensor):
        parts = tf.RaggedTensor.from_tensor(parts)
    kept = tf.ragged.boolean_mask(parts, tf.not_equal(parts, ""))
    return tf.strings.reduce_join(kept, axis=axis, separator=" ")


def _mark_headers(texts):
    """Control characters that serve as marks become spaces; each section header becomes
    ``<mark>NAME<mark>`` (its colon and surrounding whitespace dropped), so that no rule reaches into it."""
    import tensorflow as tf

    texts = tf.strings.regex_replace(texts, f"[{_SMALL_MARK}{_HEAD_MARK}{_NAME_MARK}]", " ")
    return tf.strings.regex_replace(texts, _HEADER, rf"\1{_HEAD_MARK}\2{_NAME_MARK}")


def _deidentify_marked(texts):
    import tensorflow as tf

    texts = tf.strings.regex_replace(texts, _SMALL, _SMALL_MARK + r"\1")
    for _, pattern, rewrite in GRAPH_RULES:
        texts = tf.strings.regex_replace(texts, pattern, rewrite)
    return tf.strings.regex_replace(texts, _SMALL_MARK, "")


def deidentify_graph(texts):
    """The de-identification rules the graph applies (:data:`GRAPH_RULES`) on a string tensor (section
    headers are never part of a match)."""
    import tensorflow as tf

    marked = _deidentify_marked(_mark_headers(texts))
    return tf.strings.regex_replace(marked, rf"{_HEAD_MARK}([^{_NAME_MARK}]*){_NAME_MARK}", r"\1:")


def _split_marked(marked) -> dict[str, Any]:
    import tensorflow as tf

    head = _normalize(tf.strings.regex_replace(marked, f"{_HEAD_MARK}(?s:.*)$", ""))
    rest = tf.strings.split(marked, _HEAD_MARK)[:, 1:]  # one "NAME<mark>body" per header
    names = tf.ragged.map_flat_values(tf.strings.regex_replace, rest, f"{_NAME_MARK}(?s:.*)$", "")
    bodies = tf.ragged.map_flat_values(lambda x: _normalize(tf.strings.regex_replace(x, f"^[^{_NAME_MARK}]*"
                                                                                        f"{_NAME_MARK}", "")), rest)
    out = {"head": head}
    for name, pattern in _SECTION_NAME.items():
        is_name = tf.ragged.map_flat_values(tf.strings.regex_full_match, names, pattern)
        out[name] = _join_nonempty(tf.ragged.boolean_mask(bodies, is_name))
    return out


def sections_graph(texts) -> dict[str, Any]:
    """Split a 1-D string tensor of reports into normalised sections: ``head``, and one string per
    section of :data:`SECTION_ALIASES` (``findings``, ``impression``, ``indication``, ``history``,
    ``comparison``, ``technique``, ``exam``); repeated sections are joined with a space."""
    return _split_marked(_mark_headers(texts))


def _choose(policy: str, s: dict[str, Any]):
    import tensorflow as tf

    f, i = s["findings"], s["impression"]
    has_f, has_i = tf.not_equal(f, ""), tf.not_equal(i, "")
    if policy == "caption":
        cap = s["head"]
        return tf.where(tf.not_equal(cap, ""), cap, tf.where(has_f, f, i))
    if policy == "caption+findings":
        both = _join_nonempty(tf.stack([s["head"], f], axis=1))
        return tf.where(tf.not_equal(both, ""), both, i)
    if policy == "findings":
        chosen = tf.where(has_f, f, i)
    elif policy == "impression":
        chosen = tf.where(has_i, i, f)
    elif policy == "longest":
        chosen = tf.where(tf.strings.length(f, unit="UTF8_CHAR") >= tf.strings.length(i, unit="UTF8_CHAR"), f, i)
    else:  # both
        chosen = _join_nonempty(tf.stack([f, i], axis=1))
    other = _join_nonempty(tf.stack([s["head"], s["exam"], s["technique"]], axis=1))
    return tf.where(has_f | has_i, chosen, other)  # a report without the usual headers keeps its text


def _model_text_once(texts, policy: str):
    return _choose(policy, _split_marked(_deidentify_marked(_mark_headers(texts))))


def model_text_graph(texts, config: TextConfig | str = "both"):
    """The model text of every report of a string tensor (any shape), in TensorFlow ops.

    Usable eagerly, in ``tf.function``, ``tf.data`` and SavedModels. Idempotent: the function
    is applied until its output no longer changes (twice for nearly every report; at most
    four times).
    """
    import tensorflow as tf

    config = config if isinstance(config, TextConfig) else TextConfig(policy=config)
    texts = tf.convert_to_tensor(texts, tf.string)
    shape = tf.shape(texts)
    flat = tf.reshape(texts, [-1])
    once = _model_text_once(flat, config.policy)

    def more(prev, cur, n):
        return tf.logical_and(n < 4, tf.reduce_any(tf.not_equal(prev, cur)))

    def step(prev, cur, n):
        return cur, _model_text_once(cur, config.policy), n + 1

    any_length = tf.TensorShape([None])
    _, out, _ = tf.while_loop(more, step, (flat, once, tf.constant(1)), parallel_iterations=1,
                              shape_invariants=(any_length, any_length, tf.TensorShape([])))
    return tf.reshape(out, shape)


_EAGER_CACHE: dict[TextConfig, Any] = {}


def _compiled(config: TextConfig):
    import tensorflow as tf

    fn = _EAGER_CACHE.get(config)
    if fn is None:
        fn = tf.function(lambda t: model_text_graph(t, config), input_signature=[tf.TensorSpec([None], tf.string)],
                         autograph=False)
        _EAGER_CACHE[config] = fn
    return fn


def model_text(texts: str | Sequence[str], config: TextConfig | str = "both", batch_size: int = 4096
               ) -> str | list[str]:
    """:func:`model_text_graph` from Python, on the CPU: one text or a list of texts in, the same out."""
    import tensorflow as tf

    config = config if isinstance(config, TextConfig) else TextConfig(policy=config)
    single = isinstance(texts, str)
    items = [texts] if single else list(texts)
    out: list[str] = []
    fn = _compiled(config)
    with tf.device("/CPU:0"):
        for start in range(0, len(items), batch_size):
            got = fn(tf.constant(items[start:start + batch_size], tf.string)).numpy()
            out += [b.decode("utf-8") for b in got]
    return out[0] if single else out


def compose_report(sections: dict[str, str]) -> str:
    """A report written from sections a source gives separately (caption first, then headed
    sections), as a client would send it; :func:`model_text` of it takes the same sections back."""
    order = (("findings", "FINDINGS"), ("impression", "IMPRESSION"), ("indication", "INDICATION"),
             ("history", "HISTORY"), ("comparison", "COMPARISON"))
    lines = [sections.get("caption", "") or sections.get("other", "")]
    lines += [f"{header}: {sections[key]}" for key, header in order if sections.get(key)]
    return "\n".join(x for x in lines if x)
