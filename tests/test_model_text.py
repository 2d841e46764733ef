"""The model text (mmclinic.text.model_text): one TensorFlow definition, eagerly, in tf.data and in a SavedModel."""

from __future__ import annotations

import json
import sys

import pytest

from mmclinic.text import reports as R
from mmclinic.text.model_text import (
    GRAPH_RULES,
    TEXT_POLICIES,
    TextConfig,
    compose_report,
    model_text,
    model_text_graph,
    sections_graph,
)

REPORTS = [
    "EXAM: Chest PA.\nHISTORY: cough.\nComparison: None.\nFindings: Small left effusion.\n  No pneumothorax.\n"
    "IMPRESSIONS:  Left effusion.",
    "FINDINGS: Heart XXXX XXXX normal. IMPRESSION: Normal.",
    "Lungs are clear.",
    "",
    "  \t\n ",
    "INDICATION: cough.\nFINDINGS:\tLungs   clear.  XXXX-XXXX  XXXX heart.\r\nIMPRESSION:\u00a0normal\u2003study",
    "CLINICAL HISTORY: a. REASON FOR EXAM: b. EXAM: c FINDINGS: d",
    "findings: lower case headers. impression: work too.",
    "Findings: one. Findings: two.\n\nImpression: first.\nConclusion: second.",
    "TECHNIQUE: PA and lateral. EXAMINATION: chest.",
    "Report: right upper lobe mass. Opinion: carcinoma likely; sub-FINDINGS: is not a header.",
    "FINDINGS: a much longer findings section than the impression. IMPRESSION: short.",
    "FINDINGS: short. IMPRESSION: a much longer impression section than the findings.",
    "IMPRESSION: only an impression.",
    "Heart size normal.FINDINGS: right after a full stop.",
    "COMPARISON: 2010. INDICATION: fever. FINDINGS: Pneumothorax XXXX on the left. IMPRESSION: Left pneumothorax.",
]


def _python(text: str, policy: str) -> str:
    """The Python section parser and policies of mmclinic.text.reports (the four policies it has)."""
    return R.model_text(R.parse_sections(text), policy)


@pytest.mark.parametrize("policy", R.TEXT_POLICIES)
def test_agrees_with_the_python_parser(policy):
    assert model_text(REPORTS, policy) == [_python(t, policy) for t in REPORTS]


def test_policies():
    text = "Seen for cough. FINDINGS: Heart normal, lungs clear. IMPRESSION: Normal."
    got = {p: model_text(text, p) for p in TEXT_POLICIES}
    assert got == {"findings": "Heart normal, lungs clear.", "impression": "Normal.",
                   "both": "Heart normal, lungs clear. Normal.", "longest": "Heart normal, lungs clear.",
                   "caption": "Seen for cough.", "caption+findings": "Seen for cough. Heart normal, lungs clear."}
    # Falling back: a missing section gives way to the other; no usual header keeps the text.
    assert model_text("IMPRESSION: Normal.", "findings") == "Normal."
    assert model_text("FINDINGS: Clear.", "impression") == "Clear."
    assert model_text("FINDINGS: Clear.", "caption") == "Clear."
    assert model_text("IMPRESSION: Normal.", "caption+findings") == "Normal."
    assert model_text("EXAM: Chest. TECHNIQUE: PA.", "both") == "Chest. PA."
    with pytest.raises(ValueError, match="text policy"):
        TextConfig("everything")


@pytest.mark.parametrize("alias", sorted(R.SECTION_ALIASES))
def test_every_section_header_alias(alias):
    name = R.SECTION_ALIASES[alias]
    for text in (f"{alias}: body text", f"Head. {alias.lower()} : body text", f"Head\n{alias.title()}:body text"):
        s = {k: v.numpy()[0].decode() for k, v in sections_graph([text]).items()}
        assert s[name] == "body text", (alias, text, s)
        assert getattr(R.parse_sections(text), name if name in ("findings", "impression", "indication", "history",
                                                                  "comparison") else "other").endswith("body text")


def test_whitespace_is_pythons_set_and_xxxx_runs_collapse():
    spaces = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
    text = f"FINDINGS:{spaces}a{spaces}XXXX{spaces}XXXX-XXXX b{spaces}"
    assert model_text(text) == "a XXXX b" == _python(text, "both")
    assert model_text("FINDINGS: XXXX, XX. XXXXX") == "XXXX, XXXX. XXXX"


def test_graph_rules_replace_identifiers():
    raw = ("INDICATION: seen by Dr. Jane Smith on 03/14/2024, MRN: 12345678, acc# A99812. "
           "FINDINGS: Call 555-123-4567 or mail a.b@example.org, www.example.org/x. Dr. XXXX reviewed. "
           "IMPRESSION: Normal. Dictated 2024-03-15. SSN 123-45-6789, March 3, 2024.")
    out = model_text(raw, "both")
    for secret in ("Smith", "Jane", "12345678", "A99812", "555", "example", "2024", "6789"):
        assert secret not in out
    assert "Dr. XXXX reviewed" in out  # a redaction run is not a name
    assert {r[0] for r in GRAPH_RULES} >= {"email", "phone", "date", "titled_name", "medical_record_number"}
    # A name followed by a header keeps the header.
    assert model_text("Reviewed by Dr. SMITH FINDINGS: clear.", "findings") == "clear."
    # Clinical shorthand stays.
    keep = "FINDINGS: 5 mm nodule at T2, C5-C6 and L4-5; MR brain 3.5 cm; PA and lateral."
    assert model_text(keep) == keep[len("FINDINGS: "):]


def test_idempotent():
    import numpy as np

    from mmclinic.data.synth import make_studies, write_report

    corpus = REPORTS + ["IMPRESSION:HISTORY: x", "FINDINGS:IMPRESSION: y", "Dr. Adam Dr. Eve FINDINGS: z"]
    rng = np.random.default_rng(0)
    corpus += [write_report(study, rng) for study in make_studies(20, seed=1)]
    for policy in TEXT_POLICIES:
        once = model_text(corpus, policy)
        assert model_text(once, policy) == once, policy


def test_in_tf_function_tf_data_and_a_savedmodel(tmp_path):
    import tensorflow as tf

    cfg = TextConfig("findings")
    want = model_text(REPORTS, cfg)
    ds = tf.data.Dataset.from_tensor_slices(REPORTS).batch(4).map(lambda t: model_text_graph(t, cfg))
    assert [b.decode() for batch in ds for b in batch.numpy()] == want
    ds1 = tf.data.Dataset.from_tensor_slices(REPORTS).map(lambda t: model_text_graph(t, cfg))  # scalars
    assert [b.decode() for b in ds1.as_numpy_iterator()] == want

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def text(self, t):
            return {"model_text": model_text_graph(t, cfg)}

    tf.saved_model.save(M(), str(tmp_path / "m"), signatures={"serving_default": M().text})
    loaded = tf.saved_model.load(str(tmp_path / "m"))
    got = loaded.signatures["serving_default"](t=tf.constant(REPORTS))["model_text"].numpy()
    assert [b.decode() for b in got] == want


def test_composed_sections_give_the_policy_of_the_sections():
    sections = {"caption": "Axial CT of the chest.", "findings": "Right upper lobe mass.",
                "impression": "Carcinoma.", "history": "Smoker.", "indication": "", "comparison": "None."}
    text = compose_report(sections)
    assert model_text(text, "caption") == "Axial CT of the chest."
    assert model_text(text, "caption+findings") == "Axial CT of the chest. Right upper lobe mass."
    assert model_text(text, "both") == "Right upper lobe mass. Carcinoma."
    assert model_text(compose_report({"caption": "Only a caption."}), "both") == "Only a caption."


def test_config_round_trip():
    cfg = TextConfig("longest")
    assert TextConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TextConfig.from_dict(None) == TextConfig()


def test_dataset_records_its_text_config_and_its_texts_are_fixed_points(dataset):
    from mmclinic.artifacts import DatasetDir

    ds = DatasetDir.open(dataset)
    cfg = TextConfig.from_dict(ds.info()["text"])
    assert cfg.policy == "both"
    texts = ds.reports()["text"].tolist()
    assert texts and model_text(texts, cfg) == texts
