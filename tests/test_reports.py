import pytest

from mmclinic.text.reports import model_text, normalize_whitespace, parse_sections


def test_sections_and_variants_are_parsed():
    r = parse_sections("EXAM: Chest PA.\nHISTORY: cough.\nComparison: None.\nFindings: Small left effusion.\n"
                       "  No pneumothorax.\nIMPRESSIONS:  Left effusion.")
    assert r.findings == "Small left effusion. No pneumothorax."
    assert r.impression == "Left effusion." and r.history == "cough." and r.comparison == "None."
    assert "Chest PA." in r.other


def test_text_policies_and_placeholder_normalisation():
    r = parse_sections("FINDINGS: Heart XXXX XXXX normal. IMPRESSION: Normal.")
    assert r.findings == "Heart XXXX normal."
    assert model_text(r, "both") == "Heart XXXX normal. Normal."
    assert model_text(r, "impression") == "Normal." and model_text(r, "longest") == "Heart XXXX normal."
    with pytest.raises(ValueError):
        model_text(r, "everything")
    assert normalize_whitespace("  a \n\t b ") == "a b"


def test_report_without_headers_keeps_its_text():
    r = parse_sections("Lungs are clear.")
    assert r.findings == "" and model_text(r) == "Lungs are clear." == r.other
