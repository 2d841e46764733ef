import collections
import csv

import pydicom

from mmclinic.phi.guard import PhiGuard
from mmclinic.phi.text_deid import deidentify_text


def test_text_rules_replace_identifiers_and_audit_counts_without_values():
    audit = collections.Counter()
    text = ("Discussed with Dr. Alice Carver at 555-201-3344 on 03/14/2024. MRN: 88123456. "
            "Accession ACC12345678. Mail bob.smith@example.org. 94-year-old man. No pneumothorax.")
    out = deidentify_text(text, audit=audit)
    for secret in ("Alice", "Carver", "555-201", "03/14/2024", "88123456", "ACC12345678", "bob.smith", "94-year"):
        assert secret not in out
    assert "No pneumothorax." in out and "[DATE]" in out and "[PHONE]" in out
    assert all(isinstance(v, int) for v in audit.values()) and audit["titled_name"] == 1


def test_known_identities_removed_even_without_patterns():
    out = deidentify_text("Seen by halvorsen today; quintero aware. MR 12345678 reviewed.",
                          known=["12345678"], known_names=["HALVORSEN^MARY", "Quintero"])
    assert "halvorsen" not in out.lower() and "quintero" not in out.lower() and "12345678" not in out


def test_words_inside_addresses_and_institutions_are_not_redacted():
    out = deidentify_text("65-year-old man. General appearance normal. Old granuloma.",
                          known=["12 Old Mill Road, Millbrook", "Riverbend General Hospital"])
    assert out == "65-year-old man. General appearance normal. Old granuloma."


def test_guard_refuses_and_names_rule_not_value():
    g = PhiGuard(known=["Halvorsen"])
    try:
        g.check("call 555-201-3344", "where")
    except Exception as exc:  # noqa: BLE001
        assert "phone" in str(exc) and "555" not in str(exc)
    else:
        raise AssertionError("guard let a phone number through")
    assert g.findings("seen by HALVORSEN") == ["known_identity"]
    assert g.findings("left pleural effusion") == []


def _planted_identities(source):
    values = set()
    for f in (source / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in ("PatientID", "AccessionNumber", "PatientBirthDate", "PatientTelephoneNumbers", "PatientAddress",
                   "InstitutionName", "StudyInstanceUID", "SOPInstanceUID", "OtherPatientIDs"):
            values.add(str(ds.get(kw, "")))
        name = str(ds.PatientName)
        values.update(name.split("^"))
        values.update(str(ds.ReferringPhysicianName).split("^"))
    for row in csv.DictReader(open(source / "reports.csv")):
        values.add(row["patient_id"])
        values.add(row["accession_number"])
    return {v for v in values if len(v) >= 5}


def test_no_planted_identity_in_any_dataset_file(synth_source, dataset):
    """Byte search of every output file for every planted identity (names, IDs, UIDs, dates, phones)."""
    secrets = _planted_identities(synth_source)
    assert len(secrets) > 100
    files = [p for p in dataset.rglob("*") if p.is_file()]
    assert any(p.suffix == ".tfrecord" for p in files) and any(p.suffix == ".png" for p in files)
    copies = [p for p in files if p.suffix == ".dcm"]  # the Annex E de-identified DICOM copies
    assert len(copies) == len(list((synth_source / "dicom").rglob("*.dcm")))
    assert all(pydicom.dcmread(p, stop_before_pixels=True).PatientIdentityRemoved == "YES" for p in copies[:5])
    for p in files:
        blob = p.read_bytes().lower()
        for s in secrets:
            assert s.lower().encode() not in blob, f"planted identity found in {p.name}"
