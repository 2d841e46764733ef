"""Report corruptions: pure string functions, deterministic, changing exactly what they claim."""

import re

import numpy as np
import pytest

from mmclinic.text.corruptions import (KINDS, build_corruption_set, negate_finding, normalize_report, positive_findings,
                                  swap_finding, swap_finding_detail, swap_laterality)

SYNTH_LIKE = [
    "There is a left pleural effusion.",
    "Moderate right pleural effusion with blunting of the right costophrenic angle.",
    "Cardiomegaly is present.",
    "The heart is enlarged.",
    "A left pneumothorax is present, small in size.",
    "Nodule projecting over the right upper zone. 1. Nodule projecting over the right upper zone.",
    "Focal consolidation is seen in the right upper lobe, compatible with pneumonia.",
    "Possible small left pleural effusion. No pneumothorax.",
    "Moderate bilateral pleural effusions with blunting of both costophrenic angles.",
]


def test_swap_laterality_changes_every_side_word_and_nothing_else():
    text = ("Left-sided pleural effusion. RIGHT lung is clear; the left costophrenic angle is blunted. "
            "Bilateral nodules, right more than Left. Leftward shift.")
    want = ("Right-sided pleural effusion. LEFT lung is clear; the right costophrenic angle is blunted. "
            "Bilateral nodules, left more than Right. Leftward shift.")
    assert swap_laterality(text) == want
    a, b = re.findall(r"\w+|\W+", text), re.findall(r"\w+|\W+", want)
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    assert len(a) == len(b) and all(x.lower() in ("left", "right") for x, _ in changed) and len(changed) == 5
    assert swap_laterality(swap_laterality(text)) == text
    assert swap_laterality("Bilateral effusions. No pneumothorax.") == "Bilateral effusions. No pneumothorax."


def test_negate_finding_negates_the_stated_finding():
    rng = np.random.default_rng(0)
    assert negate_finding("There is a left pleural effusion.", rng) == "There is no left pleural effusion."
    assert negate_finding("Cardiomegaly is present.", rng) == "Cardiomegaly is not present."
    assert negate_finding("The heart is enlarged.", rng) == "The heart is not enlarged."
    assert negate_finding("A left pneumothorax is present, small in size.", rng) == \
        "No left pneumothorax is present, small in size."
    for text in SYNTH_LIKE:
        before = positive_findings(text)
        out = negate_finding(text, np.random.default_rng(1))
        assert out is not None and out != text
        lost = before - positive_findings(out)
        assert lost, (text, out)  # the chosen finding is no longer stated as present
        assert re.search(r"\b(no|not)\b", out, re.I)


def test_negate_finding_every_mention_and_not_applicable():
    text = "Large right apical pneumothorax. No pleural effusion. 1. Large right apical pneumothorax."
    out = negate_finding(text, np.random.default_rng(0))
    assert out == "No large right apical pneumothorax. No pleural effusion. 1. No large right apical pneumothorax."
    assert negate_finding("No focal consolidation, pleural effusion or pneumothorax. Normal heart size.",
                          np.random.default_rng(0)) is None


def test_swap_finding_changes_exactly_the_finding_term():
    assert swap_finding("There is a left pleural effusion.", np.random.default_rng(0)) in {
        f"There is a left {w}." for w in ("pneumothorax", "consolidation", "nodule", "mass", "atelectasis", "edema",
                                          "cardiomegaly", "opacity", "pneumonia")}
    for seed, text in enumerate(SYNTH_LIKE):
        swap = swap_finding_detail(text, np.random.default_rng(seed))
        if swap is None:
            assert text == "The heart is enlarged."  # no exchangeable noun
            continue
        assert swap.old in positive_findings(text) and swap.new != swap.old
        # Everything outside the replaced spans is unchanged, in order.
        outside = [text[a:b] for a, b in zip([0] + [e for _, e in swap.spans], [s for s, _ in swap.spans] + [len(text)])]
        pattern = "^" + "(.+?)".join(re.escape(p) for p in outside) + "$"
        m = re.match(pattern, swap.text, re.S)
        assert m, (text, swap.text)
        for new_term in m.groups():
            assert new_term.lower().rstrip("s") in swap.new.replace("_", " ") or new_term.lower() in (
                "pneumothoraces", "atelectases", "opacities", "masses")
        assert swap.new not in positive_findings(text)


def test_corruptions_are_deterministic_for_a_seed():
    for text in SYNTH_LIKE:
        for fn in (negate_finding, swap_finding):
            assert fn(text, np.random.default_rng(5)) == fn(text, np.random.default_rng(5))
    args = _toy_set()
    a, b = build_corruption_set(*args, seed=3), build_corruption_set(*args, seed=3)
    assert a.text == b.text and list(a.kind) == list(b.kind) and np.array_equal(a.image, b.image)


def _toy_set():
    texts = ["There is a left pleural effusion.",            # p1 study 1
             "No acute cardiopulmonary process.",            # p1 study 2
             "Normal chest radiograph.",                     # p2
             "Cardiomegaly is present. Left pleural effusion.",  # p3
             "No acute cardiopulmonary process [NAME]."]     # p4: same normalised text as report 1
    image_report = [0, 0, 1, 2, 3, 4]
    patients = ["p1", "p1", "p1", "p2", "p3", "p4"]
    studies = ["s1", "s2", "s3", "s4", "s5"]
    findings = [positive_findings(t) for t in texts]
    return texts, image_report, patients, studies, findings


def test_corruption_set_applies_each_kind_only_where_it_can():
    texts, image_report, patients, studies, findings = _toy_set()
    cs = build_corruption_set(texts, image_report, patients, studies, findings, seed=0)
    assert set(cs.produced) == set(KINDS)
    assert sum(cs.kind == "match") == len(image_report)
    for kind in KINDS:
        assert cs.produced[kind] + cs.skipped[kind] == len(image_report)
        assert cs.produced[kind] == int((cs.kind == kind).sum())
    # Only p1 has a second study; the two images of study 1 and the image of study 2 get one.
    assert cs.produced["same_patient_other_study"] == 3
    norm = [normalize_report(t) for t in texts]
    for i, t, k, s in zip(cs.image, cs.text, cs.kind, cs.source):
        own = image_report[i]
        if k == "match":
            assert t == texts[own]
            continue
        assert normalize_report(t) != norm[own]  # never an identical report posing as a mismatch
        if k.startswith("other_patient"):
            assert patients[image_report.index(s)] != patients[i]
            assert (findings[s] == findings[own]) == (k == "other_patient_same_findings")
    # Normal reports of other patients with other wording are the hard negatives of a normal report.
    hard = [(i, s) for i, k, s in zip(cs.image, cs.kind, cs.source) if k == "other_patient_same_findings"]
    assert (2, 2) in hard  # image 2 (normal, p1) with p2's normal report...
    assert all(s != 4 or image_report[i] != 1 for i, s in hard)  # ...never p4's, which is the same text
    assert cs.produced["laterality_swap"] == 3 and cs.produced["negation"] == 3


def test_unknown_kind_is_refused():
    texts, image_report, patients, studies, findings = _toy_set()
    with pytest.raises(ValueError, match="unknown corruption kind"):
        build_corruption_set(texts, image_report, patients, studies, findings, seed=0, kinds=("flip",))


def test_normalize_report():
    assert normalize_report("1. No acute process.  [NAME] XXXX") == "no acute process"
    assert normalize_report("No acute process") == normalize_report("NO ACUTE PROCESS.")
    assert positive_findings("No focal consolidation, pleural effusion or pneumothorax.") == frozenset()
    assert positive_findings("Cardiomegaly is not present.") == frozenset()
    assert positive_findings("Small left pleural effusion; no pneumothorax.") == {"pleural_effusion"}
