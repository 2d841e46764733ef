"""Recall and false positives of report de-identification, by identifier class, before and after.

    .venv/bin/python bench/deid_recall.py [--notes 1000] [--seed 0] [--presidio-python PATH]

Three sources of text:

- the written case list ``tests/deid_cases.yaml``: recall = listed identifier substrings gone /
  listed; false positives = clean cases changed at all / clean cases;
- synthetic notes (``synthetic_notes``): fake names, record numbers, dates, phones, institutions,
  addresses ... in varied shapes (capitals or not, with or without ":"/"#") planted in varied
  sentence templates among clean clinical sentences (the synthetic demo's report lines and a
  written list), drawn with a seeded generator. An identity counts as removed when none of its
  parts (each name component, the day and month of a date, the town of an address ...) is left
  as a whole word; false positives = clean sentences of the notes no longer present verbatim;
- real published reports, when ``../shared/data`` is there: the IU chest X-ray reports (already
  de-identified: ``XXXX`` marks removed text, so any change is a false positive) and the MedPix 2.0
  case texts (teaching cases: they do hold real dates, URLs and authors of cited papers, so a
  change there is not always a false positive). Reported as the share of texts changed.

Arms, side by side: ``before`` = the rule list as it was at commit 7737409 (copied below, unchanged),
``after`` = ``mmclinic.phi.text_deid.deidentify_text`` (pattern rules only: no archive identities are
passed, so this measures what the patterns alone catch), and Presidio's analyzer when it can run
offline. Presidio runs in a separate interpreter (``--presidio-python``, default this one) with a
blank spaCy English pipeline written to a temporary folder (its default model, en_core_web_lg, is
not installed and would be downloaded), the public-suffix list update switched off and any proxy
pointed at a closed port, so nothing is fetched: only its pattern recognizers can find anything (no
PERSON, LOCATION or organisation: those come from the spaCy model). Two Presidio columns: every
result (its default, score threshold 0) and results scoring >= 0.5. If Presidio cannot be imported
there, the script says so and reports the rule sets only.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = REPO / "tests" / "deid_cases.yaml"
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

# --------------------------------------------------------------------------- the "before" arm
# The rules exactly as they were at commit 7737409 (mmclinic/phi/text_deid.py), kept here so that
# one command prints before and after.

_OLD_MONTHS = "jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|jun(?:e)?|jul(?:y)?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?"
_OLD_NAME = r"[A-Z][a-zA-Z'\-]+(?:\s+[A-Z]\.)?(?:\s+[A-Z][a-zA-Z'\-]+){0,2}"
OLD_RULES: list[tuple[str, re.Pattern[str], str]] = [
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "[EMAIL]"),
    ("url", re.compile(r"\bhttps?://\S+", re.I), "[URL]"),
    ("phone", re.compile(r"(?<!\d)(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\d)|(?<!\d)\d{3}-\d{4}(?!\d)"), "[PHONE]"),
    ("medical_record_number", re.compile(r"\b(?:MRN|MR#|medical record(?: number)?|patient id)[:#\s]*[A-Z]*\d[\w-]*", re.I), "[MRN]"),
    ("accession", re.compile(r"\b(?:accession|acc(?:ession)?\s*(?:no|number|#)?)[:#.\s]*[A-Z]*\d[\w-]*", re.I), "[ACCESSION]"),
    ("date", re.compile(
        r"\b\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})\b|\b\d{4}-\d{2}-\d{2}\b"
        rf"|\b(?:{_OLD_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b|\b\d{{1,2}}\s+(?:{_OLD_MONTHS})\.?\s+\d{{4}}\b",
        re.I), "[DATE]"),
    ("titled_name", re.compile(rf"\b(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+{_OLD_NAME}"), "[NAME]"),
    ("patient_name", re.compile(rf"\b(?:[Pp]atient|[Pp]t\.?|[Nn]ame)[:\s]+(?!is\b|was\b|has\b|with\b){_OLD_NAME}"), "[NAME]"),
    ("age_over_89", re.compile(r"\b(?:9\d|1[0-4]\d)[\s-]*(?:year|yr)s?[\s-]*old\b", re.I), "[AGE 90+]"),
    ("address", re.compile(
        r"\b\d{1,5}\s+(?:[A-Z][a-z]+\s){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Court|Ct|Boulevard|Blvd|Parkway|Pkwy|Way|Square)\b\.?"),
        "[ADDRESS]"),
    ("long_number", re.compile(r"\b[A-Z]{0,4}\d{6,}\b"), "[ID]"),
]


def before(text: str) -> str:
    for _, rx, placeholder in OLD_RULES:
        text = rx.sub(placeholder, text)
    return text


def after(text: str) -> str:
    from mmclinic.phi.text_deid import deidentify_text

    return deidentify_text(text)


# --------------------------------------------------------------------------- synthetic notes

FIRST = ["James", "Robert", "Michael", "William", "David", "Richard", "Thomas", "Daniel", "Mary", "Patricia",
         "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Karen", "Priya", "Kenji", "Oluwaseun", "Mei",
         "Siobhan", "Mateo", "Aisha", "Dmitri", "Ingrid", "Tomasz", "Yusuf", "Chloe", "Anders", "Fatima"]
LAST = ["Halvorsen", "Quintero", "Abernathy", "Okonkwo", "Lindqvist", "Castellano", "Whitfield", "Nakamura",
        "Brennan", "Delacroix", "Petrovic", "Fairbanks", "Oyelaran", "Ashcombe", "Villanueva", "Thorburn",
        "Marchetti", "Kowalczyk", "Ellsworth", "Haddad", "O'Brien", "McAllister", "Nguyen", "Smith-Jones",
        "Kim", "Okafor", "Rossi", "Johansson", "Dubois", "Fitzgerald"]
PLACES = ["Riverbend", "Northgate", "Westmere", "Cedar Falls", "Ashford", "Fairhaven", "Millbrook", "Harborview",
          "Kingsbridge", "Lakeshore", "Oakridge", "Pinecrest", "Stonebridge", "Willowdale", "Brookhaven"]
TOWNS = ["Millbrook", "Fairhaven", "Ashford", "Cedar Falls", "Westmere", "Glenwood", "Port Alder", "Hollins"]
STATES = ["NY", "MA", "CT", "IA", "OH", "TX", "CA", "MN", "OR", "WA"]
COUNTRIES = ["Norway", "Canada", "Ireland", "Sweden"]
STREETS = ["Larkspur", "Old Mill", "Juniper", "Harbor View", "Birchwood", "Maple", "Chestnut Hill", "Elm"]
SUFFIXES = ["Street", "St.", "Avenue", "Ave", "Road", "Rd", "Lane", "Drive", "Court", "Boulevard", "Parkway", "Way"]
INSTITUTION_KINDS = ["General Hospital", "Memorial Hospital", "Medical Center", "Community Clinic", "Regional Medical Center",
                     "Children's Hospital", "University Hospital", "Infirmary", "Health System", "Cancer Institute",
                     "Clinic", "Hospitals", "Medical Centre"]
SAINTS = ["Mary", "Aldric", "Jude", "Luke", "Agnes", "Brigid"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

CLINICAL = [
    "No pneumothorax.", "The lungs are clear.", "Heart size is normal.", "No acute cardiopulmonary process.",
    "A 5 mm nodule in the right upper lobe is unchanged.", "Disc protrusion at C5-C6 and L4-5.",
    "T2 hyperintense focus in the left frontal white matter.", "May represent atelectasis or early pneumonia.",
    "Patchy opacity at the left base, which may represent aspiration.", "Small left pleural effusion.",
    "Endotracheal tube tip 4.5 cm above the carina.", "Right PICC with tip at the cavoatrial junction.",
    "Degenerative changes of the thoracic spine.", "Mild cardiomegaly without pulmonary edema.",
    "Interval increase of the mass from 2.1 to 2.6 cm.", "Lesion measures 12 x 8 mm on series 3 image 45.",
    "Stable compared with the prior study.", "Recommend follow-up CT in 3 months.", "Osseous structures are intact.",
    "The hospital course was uncomplicated.", "Outside hospital images were not available.",
    "Chest PA and lateral views were obtained.", "IMPRESSION: Normal chest radiograph.",
    "Heart XXXX XXXX normal.", "No Morgagni hernia; Virchow node not enlarged.", "Status post CABG.",
    "Kerley B lines are present.", "Slight rightward tracheal deviation.", "Oxygen saturation 95% on room air.",
    "Pain score 5/10.", "Nasogastric tube tip in the stomach.", "ID consult was requested.",
    "The patient was seen in the emergency department.", "MR brain without contrast shows no infarct.",
    "S1 nerve root is compressed.", "Findings were discussed with the referring team.",
]


@dataclasses.dataclass
class Planted:
    kind: str  # identifier class
    value: str  # as written in the note
    parts: list[str]  # each must be gone (whole word, case-sensitive) for the identity to count as removed


@dataclasses.dataclass
class Note:
    text: str
    planted: list[Planted]
    clean: list[str]  # clinical sentences in the note, to be kept verbatim


def _synth_report_lines(n: int = 300, seed: int = 5) -> list[str]:
    """Clinical lines of the synthetic demo's reports (mmclinic.data.synth): no identifier lines."""
    from mmclinic.data.synth import make_studies

    lines = set()
    for s in make_studies(n, seed):
        for line in s.report.split("\n"):
            if line.startswith(("Findings discussed", "Patient ", "Report sent", "COMPARISON:")):
                continue  # the planted identifiers and the prior date
            m = re.match(r"HISTORY: (\d+)-year-old", line)
            if m and int(m.group(1)) >= 90:
                continue  # an age over 89 is an identifier
            lines.add(line)
    return sorted(lines)


def clean_sentences() -> list[str]:
    """Clinical sentences that must come out unchanged: the written list, the synthetic demo's report
    lines and the case list's clean cases."""
    cases = [c["text"] for c in load_cases() if c["class"] == "clean"]
    return sorted(set(CLINICAL) | set(_synth_report_lines()) | set(cases))


def _name(rng: random.Random) -> tuple[str, list[str], str]:
    """(rendered name, its components, shape)."""
    first, last = rng.choice(FIRST), rng.choice(LAST)
    mid = rng.choice("ABCDEJKLMRST")
    shape = rng.choice(["First Last", "First M. Last", "LAST, FIRST", "Last, First", "F. Last", "Last", "LAST",
                        "FIRST LAST"])
    text = {"First Last": f"{first} {last}", "First M. Last": f"{first} {mid}. {last}",
            "LAST, FIRST": f"{last.upper()}, {first.upper()}", "Last, First": f"{last}, {first}",
            "F. Last": f"{first[0]}. {last}", "Last": last, "LAST": last.upper(),
            "FIRST LAST": f"{first.upper()} {last.upper()}"}[shape]
    parts = [last.upper() if shape in ("LAST, FIRST", "LAST", "FIRST LAST") else last]
    if "First" in shape or "FIRST" in shape:
        parts.append(first.upper() if "FIRST" in shape else first)
    return text, parts, shape


NAME_TEMPLATES = [
    "Discussed with Dr. {n} at 3 pm.", "Findings discussed with DR. {N} by telephone.", "Per Dr.{n} the tube was advanced.",
    "Results given to dr. {n}.", "Dr {n} agreed with the plan.", "Signed by: {n}", "Signed By: {N}",
    "Electronically signed by {n}, MD", "{n}, M.D.", "{n} MD", "Reported by: {n}", "Dictated by {n}",
    "Read by {n}.", "Attending: {n}", "ATTENDING: {N}", "Radiologist: {n}", "cc: {n}", "CC: {N}",
    "Reviewed with {n}, PhD.", "Findings communicated to {n} at 14:05.", "Patient: {n}", "PATIENT: {N}",
    "Signed: {n}", "Electronically Signed: {N}",
    "Name: {n}", "Referring physician: {n}", "Interpreted by: {n}, FRCPC", "Line placed by {n}, PA-C.",
]
NAME_TEMPLATES_FULL = ["Patient {fl} arrived by stretcher.", "{fl}, RN, confirmed the dressing.", "{fl} NP saw the patient.",
                       "Mr. {l} tolerated the procedure.", "Mrs. {l} was positioned supine.", "Ms {l} declined sedation.",
                       "Header reads {L}^{F}."]


def _plant_name(rng: random.Random) -> tuple[str, list[Planted]]:
    if rng.random() < 0.25:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        t = rng.choice(NAME_TEMPLATES_FULL)
        text = t.format(fl=f"{first} {last}", l=last, L=last.upper(), F=first.upper())
        parts = [last.upper(), first.upper()] if "{L}" in t else [last] + ([first] if "{fl}" in t else [])
        return text, [Planted("name", text, parts)]
    t = rng.choice(NAME_TEMPLATES)
    n, parts, shape = _name(rng)
    if "{N}" in t:
        n, parts = n.upper(), [p.upper() for p in parts]
    if t.startswith("Per Dr.") and shape not in ("Last", "F. Last"):
        n, parts = n.split(",")[0].split()[-1], [parts[0]]
    text = t.format(n=n, N=n)
    return text, [Planted("name", n, parts)]


def _id_value(rng: random.Random, letters_ok: bool) -> str:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 9)))
    letters = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(rng.randint(1, 3)))
    shapes = [digits, letters + digits, (letters + digits[:3] + rng.choice("ABXQZ") + digits[3:]).lower(),
              f"{digits[:2]}-{digits[2:]}", f"{letters}-{digits}", f"{digits[:3]}/{digits[3:]}" if len(digits) > 4 else digits]
    if letters_ok:
        shapes.append("".join(rng.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(rng.randint(5, 7))))
    return rng.choice(shapes)


def _plant_record(rng: random.Random) -> tuple[str, list[Planted]]:
    kind = rng.choice(["mrn", "mrn", "accession", "other_id"])
    if kind == "mrn":
        label = rng.choice(["MRN", "MRN:", "MRN #", "MRN#", "mrn", "MR#", "MR #:", "Medical record number:",
                            "medical record no.", "Patient ID:", "Pt ID", "PATIENT ID", "Hospital number:", "MEDICAL RECORD #"])
        value = _id_value(rng, letters_ok=not label.endswith("no."))
    elif kind == "accession":
        label = rng.choice(["Acc", "Acc#", "ACC:", "Accession", "Accession no.", "Accession number:", "accession #",
                            "ACCESSION"])
        value = _id_value(rng, letters_ok=not label.endswith("no."))
    else:
        label = rng.choice(["ID:", "ID #", "Study ID", "Case #:", "case no.", "Account number", "Order #", "Encounter ID:",
                            "Outside case"])
        value = _id_value(rng, letters_ok=False)
        if label == "Outside case":
            value = "".join(rng.choice("0123456789") for _ in range(5))
    glue = rng.choice(["", " ", "-"]) if label.isalpha() else " "
    glue = "" if label.endswith("#") and rng.random() < 0.5 else glue
    if glue == " " and label != "Outside case" and rng.random() < 0.15:
        value = f"({value})"
    t = rng.choice(["{x}.", "Images reviewed for {x} at the workstation.", "{x} confirmed with wristband.",
                    "Film labelled {x}, left side marker present.", "({x})"])
    ident = f"{label}{glue}{value}"
    return t.format(x=ident), [Planted(kind, ident, [value])]


def _plant_date(rng: random.Random) -> tuple[str, list[Planted]]:
    y, m, d = rng.randint(1995, 2024), rng.randint(1, 12), rng.randint(1, 28)
    month, mon = MONTHS[m - 1], MONTHS[m - 1][:3]
    ordinal = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}.get(d, "th")
    shapes = [
        (f"{m:02d}/{d:02d}/{y}", [f"{m:02d}/{d:02d}"]), (f"{m}/{d}/{y % 100:02d}", [f"{m}/{d}/{y % 100:02d}"]),
        (f"{m:02d}.{d:02d}.{y}", [f"{m:02d}.{d:02d}"]), (f"{y}-{m:02d}-{d:02d}", [f"{m:02d}-{d:02d}"]),
        (f"{y}/{m:02d}/{d:02d}", [f"{m:02d}/{d:02d}"]), (f"{d:02d}-{mon}-{y}", [f"{d:02d}-{mon}"]),
        (f"{d:02d}{mon.upper()}{y}", [f"{d:02d}{mon.upper()}"]), (f"{month} {d}", [f"{month} {d}"]),
        (f"{month} {d}, {y}", [f"{month} {d}"]), (f"{mon}. {d}", [f"{mon}. {d}"]), (f"{month} {d}{ordinal}", [f"{month} {d}"]),
        (f"{d} {month}", [f"{d} {month}"]), (f"{d} {month} {y}", [f"{d} {month}"]),
        (f"{d}{ordinal} of {month} {y}", [f"{d}{ordinal} of {month}"]), (f"{month} {y}", [month]), (f"{mon} {y}", [mon]),
        (f"{m:02d}/{y}", [f"{m:02d}/{y}"]), (f"{month.upper()} {d}, {y}", [f"{month.upper()} {d}"]),
    ]
    value, parts = rng.choice(shapes)
    t = rng.choice(["Comparison: {x}.", "Study performed on {x}.", "Prior exam from {x} shows the same nodule.",
                    "Admitted {x} with fever.", "DOB: {x}", "Date of service: {x}", "Chest tube removed on {x}; no pneumothorax.",
                    "Last seen in clinic in {x}."])
    return t.format(x=value), [Planted("date", value, parts)]


def _plant_age(rng: random.Random) -> tuple[str, list[Planted]]:
    age = rng.randint(90, 104)
    tens = ["", "-one", "-two", "-three", "-four", "-five", "-six", "-seven", "-eight", "-nine"]
    words = f"ninety{tens[age - 90]}" if age < 100 else f"one hundred{' and ' + tens[age - 100][1:] if age > 100 else ''}"
    value = rng.choice([f"{age}-year-old", f"{age} year old", f"{age} y/o", f"{age}yo", f"{age} yo", f"aged {age}",
                        f"{age} years of age", f"Age: {age}", f"{age} y.o.", f"{age}-yr-old", f"{words}-year-old",
                        f"{age}yo{rng.choice('MF')}"])
    if rng.random() < 0.1:
        value = f"{age}{rng.choice('MF')}"
        return f"{value} with cough.", [Planted("age", value, [value])]
    t = rng.choice(["HISTORY: {x} woman with cough.", "{x} man, fall from standing.", "Patient {x} with dyspnea.",
                    "Indication: {x}; chest pain."])
    return t.format(x=value), [Planted("age", value, [value])]


def _plant_contact(rng: random.Random) -> tuple[str, list[Planted]]:
    kind = rng.choice(["phone", "phone", "email", "url", "ip_address", "ssn"])
    a, b, c = rng.randint(200, 989), rng.randint(200, 989), rng.randint(1000, 9999)
    if kind == "phone":
        value, parts = rng.choice([
            (f"{a}-{b}-{c}", [f"{b}-{c}"]), (f"({a}) {b}-{c}", [f"{b}-{c}"]), (f"{a}.{b}.{c}", [f"{a}.{b}.{c}"]),
            (f"+1 {a} {b} {c}", [f"{b} {c}"]), (f"+44 20 {c} {rng.randint(1000, 9999)}", [str(c)]),
            (f"+47 {rng.randint(20, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}", None),
            (f"{b}-{c}", [f"{b}-{c}"]), (f"{a}-{b}-{c} ext. {rng.randint(10, 9999)}", [f"{b}-{c}"]),
            (f"pager {rng.randint(10000, 99999)}", None), (f"Tel: {rng.randint(20000000, 99999999)}", None),
        ])
        parts = parts or [value.split(maxsplit=1)[1]]
        t = rng.choice(["Call {x} with results.", "Reading room {x}.", "Contact {x} after hours.", "Fax results to {x}."])
    elif kind == "email":
        first, last = rng.choice(FIRST).lower(), rng.choice(LAST).lower().replace("'", "")
        dom = rng.choice(PLACES).lower().replace(" ", "")
        value, parts = f"{first}.{last}{rng.randint(1, 99)}@{dom}-health.org", [f"{first}.{last}", f"{dom}-health"]
        t = rng.choice(["Report sent to {x}.", "E-mail: {x}", "Copy to {x} please."])
    elif kind == "url":
        slug = rng.choice(PLACES).lower().replace(" ", "")
        value = rng.choice([f"https://pacs.{slug}.org/viewer?study={a}{c}", f"www.{slug}-clinic.example/patient/{c}",
                            f"http://{slug}.example.org/p/{a}"])
        parts = [slug]
        t = rng.choice(["Images at {x}.", "See {x} for the portal.", "Link: {x}"])
    elif kind == "ip_address":
        value = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        parts = [value]
        t = rng.choice(["Sent from workstation {x} at night.", "Modality IP {x}."])
    else:
        value = f"{rng.randint(100, 899)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
        parts = [value]
        value = rng.choice([value, f"SSN {value}", f"social security number: {value}"])
        t = rng.choice(["Insurance form lists {x}.", "{x} on the requisition."])
    return t.format(x=value), [Planted(kind, value, parts)]


def _plant_place(rng: random.Random) -> tuple[str, list[Planted]]:
    kind = rng.choice(["institution", "institution", "address", "zip", "location"])
    town, state = rng.choice(TOWNS), rng.choice(STATES)
    if kind == "institution":
        place = rng.choice(PLACES)
        value, parts = rng.choice([
            (f"{place} {rng.choice(INSTITUTION_KINDS)}", [place]),
            (f"St. {(saint := rng.choice(SAINTS))}'s Hospital", [f"{saint}'s"]),
            (f"University of {place} Hospitals and Clinics", [place]),
            (f"{place} University Medical Center", [place]),
            (f"Hospital of the University of {place}", [place]),
            (f"{place.upper()} {rng.choice(INSTITUTION_KINDS).upper()}", [place.upper()]),
        ])
        if rng.random() < 0.3:
            value, parts = f"{value}, {town}, {rng.choice(COUNTRIES)}", parts + [town]
        t = rng.choice(["Outside films from {x} were reviewed.", "Transferred from {x} for further care.",
                        "Prior CT at {x} showed the same nodule.", "Follow-up at {x} is advised.", "SEEN AT {x}."])
    elif kind == "address":
        n = rng.randint(1, 9999)
        street = f"{n} {rng.choice(STREETS)} {rng.choice(SUFFIXES)}"
        value, parts = rng.choice([
            (street, [street.rstrip(".")]), (f"{street}, {town}", [street.rstrip("."), town]),
            (f"{street}, Apt {rng.randint(1, 40)}{rng.choice('ABC')}, {town}, {state} {(z := rng.randint(10000, 99999))}",
             [street.rstrip("."), town, str(z)]),
            (f"P.O. Box {(b := rng.randint(1, 9999))}", [f"Box {b}"]), (f"PO Box {(b := rng.randint(1, 9999))}", [f"Box {b}"]),
        ])
        t = rng.choice(["Lives at {x}.", "Home address {x}.", "Mail films to {x} please."])
    elif kind == "zip":
        z = rng.randint(10000, 99999)
        value, parts = f"{town}, {state} {z}", [town, str(z)]
        t = rng.choice(["Address on file: {x}.", "Forwarding to {x}."])
    else:
        value, parts = town, [town]
        t = rng.choice(["She lives in {x} with her daughter.", "Resides in {x}.", "Patient living in {x} alone."])
    return t.format(x=value), [Planted(kind, value, parts)]


PLANTERS = [_plant_name, _plant_name, _plant_record, _plant_record, _plant_date, _plant_date, _plant_age,
            _plant_contact, _plant_contact, _plant_place, _plant_place]


def synthetic_notes(n: int, seed: int, clean: list[str] | None = None) -> list[Note]:
    """``n`` notes: 2-4 clean clinical sentences and 1-3 planted identities in varied templates."""
    rng = random.Random(seed)
    clean = clean if clean is not None else clean_sentences()
    notes = []
    for _ in range(n):
        parts: list[tuple[str, list[Planted]]] = [(s, []) for s in rng.sample(clean, rng.randint(2, 4))]
        parts += [rng.choice(PLANTERS)(rng) for _ in range(rng.randint(1, 3))]
        rng.shuffle(parts)
        sep = rng.choice([" ", "\n"])
        notes.append(Note(sep.join(p for p, _ in parts), [x for _, pl in parts for x in pl],
                          [p for p, pl in parts if not pl]))
    return notes


def leaked(planted: Planted, out: str) -> bool:
    """Whether any part of a planted identity is left in ``out`` as a whole word."""
    return any(re.search(rf"(?<![A-Za-z0-9]){re.escape(p)}(?![A-Za-z0-9])", out) for p in planted.parts)


# --------------------------------------------------------------------------- measuring

def load_cases(path: Path = CASES) -> list[dict]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@dataclasses.dataclass
class Tally:
    hit: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    total: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, kind: str, ok: bool) -> None:
        self.total[kind] += 1
        self.hit[kind] += int(ok)

    def rate(self, kind: str | None = None) -> str:
        h = sum(self.hit.values()) if kind is None else self.hit[kind]
        t = sum(self.total.values()) if kind is None else self.total[kind]
        return f"{h / t:6.1%} ({h}/{t})" if t else "-"


def measure(redact: Callable[[list[str]], list[str]], cases: list[dict], notes: list[Note], clean: list[str],
            real: dict[str, list[str]]) -> dict[str, object]:
    case_recall, case_clean, case_keep = Tally(), Tally(), Tally()
    outs = redact([c["text"] for c in cases])
    for c, out in zip(cases, outs):
        if c["class"] == "clean":
            case_clean.add("clean", out != c["text"])
        for g in c.get("gone") or []:
            case_recall.add(c["class"], g not in out)
        for k in c.get("keep") or []:
            case_keep.add("keep", k in out)
    note_recall, note_fp = Tally(), Tally()
    for note, out in zip(notes, redact([n.text for n in notes])):
        for p in note.planted:
            note_recall.add(p.kind, not leaked(p, out))
        for s in note.clean:
            note_fp.add("clean", s not in out)
    clean_fp = Tally()
    for s, out in zip(clean, redact(clean)):
        clean_fp.add("clean", out != s)
    real_fp = Tally()
    for name, texts in real.items():
        for s, out in zip(texts, redact(texts)):
            real_fp.add(name, out != s)
    return {"case_recall": case_recall, "case_clean": case_clean, "case_keep": case_keep, "note_recall": note_recall,
            "note_fp": note_fp, "clean_fp": clean_fp, "real_fp": real_fp}


def real_texts() -> dict[str, list[str]]:
    """IU X-ray report sections and MedPix 2.0 case texts and captions, when ../shared/data is there."""
    import csv

    out: dict[str, list[str]] = {}
    iu = SHARED_DATA / "iu-xray-reports" / "indiana_reports.csv"
    if iu.exists():
        with open(iu, encoding="utf-8") as fh:
            out["IU X-ray report sections"] = [r[k] for r in csv.DictReader(fh)
                                               for k in ("indication", "comparison", "findings", "impression") if r[k]]
    mp = SHARED_DATA / "medpix2" / "splitted_dataset"
    if mp.exists():
        texts = set()
        for split in ("train", "dev"):
            for line in open(mp / f"data_{split}.jsonl", encoding="utf-8"):
                texts.update(v for v in (json.loads(line).get("Case") or {}).values() if isinstance(v, str) and v)
            for line in open(mp / f"descriptions_{split}.jsonl", encoding="utf-8"):
                cap = (json.loads(line).get("Description") or {}).get("Caption")
                if cap:
                    texts.add(cap)
        out["MedPix 2.0 case texts"] = sorted(texts)
    return out


# --------------------------------------------------------------------------- Presidio, offline

PRESIDIO_SCRIPT = r"""
import json, logging, sys, tempfile
logging.disable(logging.WARNING)
try:
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
except Exception as exc:
    print(json.dumps({"error": f"cannot import presidio_analyzer/spacy: {exc!r}"}))
    sys.exit(0)
folder = tempfile.mkdtemp(prefix="blank-en-")
spacy.blank("en").to_disk(folder)  # a tokenizer only: no model is downloaded
engine = AnalyzerEngine(nlp_engine=SpacyNlpEngine(models=[{"lang_code": "en", "model_name": folder}]),
                        supported_languages=["en"])
texts = json.load(sys.stdin)
out = []
for t in texts:
    out.append([[r.start, r.end, r.entity_type, r.score] for r in engine.analyze(t, language="en")])
from importlib.metadata import version
print(json.dumps({"version": version("presidio-analyzer"),
                  "entities": sorted(engine.get_supported_entities()), "spans": out}))
"""


def presidio_spans(python: str, texts: list[str]) -> tuple[list[list[list]] | None, str]:
    env = dict(os.environ, TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS="",  # the bundled suffix list, no update
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="",
               HF_HUB_OFFLINE="1")
    try:
        proc = subprocess.run([python, "-c", PRESIDIO_SCRIPT], input=json.dumps(texts), capture_output=True,
                              text=True, env=env, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"could not run {python}: {exc}"
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None, f"{python} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"
    if "error" in res:
        return None, res["error"]
    return res["spans"], f"presidio-analyzer {res['version']}, entities {', '.join(res['entities'])}"


def apply_spans(text: str, spans: Iterable[list], threshold: float) -> str:
    keep = sorted((s, e) for s, e, _, score in spans if score >= threshold)
    merged: list[list[int]] = []
    for s, e in keep:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    for s, e in reversed(merged):
        text = text[:s] + "<PII>" + text[e:]
    return text


# --------------------------------------------------------------------------- report

def _row(label: str, values: list[str]) -> str:
    return f"  {label:<28s}" + "".join(f"{v:>24s}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--notes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presidio-python", default=sys.executable,
                    help="interpreter that has presidio-analyzer (default: this one)")
    args = ap.parse_args()

    cases = load_cases()
    clean = clean_sentences()
    notes = synthetic_notes(args.notes, args.seed, clean)
    real = real_texts()
    arms: dict[str, Callable[[list[str]], list[str]]] = {
        "before (7737409)": lambda ts: [before(t) for t in ts],
        "after": lambda ts: [after(t) for t in ts],
    }
    everything = [c["text"] for c in cases] + [n.text for n in notes] + clean + [t for ts in real.values() for t in ts]
    spans, about = presidio_spans(args.presidio_python, everything)
    if spans is None:
        print(f"Presidio: not run ({about}). Only the rule sets are reported.\n")
    else:
        print(f"Presidio: {about}; offline (blank spaCy pipeline, no suffix-list update, proxies closed): pattern "
              f"recognizers only.\n")
        by_text: dict[str, list] = {}
        for t, s in zip(everything, spans):
            by_text[t] = s
        arms["presidio (all)"] = lambda ts: [apply_spans(t, by_text[t], 0.0) for t in ts]
        arms["presidio (score>=0.5)"] = lambda ts: [apply_spans(t, by_text[t], 0.5) for t in ts]

    results = {name: measure(fn, cases, notes, clean, real) for name, fn in arms.items()}
    names = list(arms)
    n_planted = sum(len(n.planted) for n in notes)
    print(f"Case list: {len(cases)} cases ({CASES.relative_to(REPO)}); synthetic notes: {len(notes)} "
          f"(seed {args.seed}), {n_planted} planted identities; clean sentences: {len(clean)}\n")
    print(_row("", names))

    def block(title: str, key: str) -> None:
        print(title)
        tally = results[names[0]][key]
        kinds = sorted(set().union(*(results[n][key].total for n in names)), key=lambda k: (-tally.total[k], k))
        for k in kinds:
            print(_row(k, [results[n][key].rate(k) for n in names]))
        if len(kinds) > 1:
            print(_row("all", [results[n][key].rate() for n in names]))

    block("Recall on the case list (identifier substrings gone / listed), by class", "case_recall")
    block("Recall on synthetic notes (identities fully removed / planted), by class", "note_recall")
    print("False positives (share changed; lower is better)")
    print(_row("case list: clean cases", [results[n]["case_clean"].rate("clean") for n in names]))
    print(_row("case list: keep substrings", [results[n]["case_keep"].rate("keep") + " kept" for n in names]))
    print(_row("clean sentences", [results[n]["clean_fp"].rate("clean") for n in names]))
    print(_row("notes: clean sentences", [results[n]["note_fp"].rate("clean") for n in names]))
    for k in real:
        print(_row(k, [results[n]["real_fp"].rate(k) for n in names]))
    if not real:
        print(f"  (real reports: {SHARED_DATA} not found, skipped)")


if __name__ == "__main__":
    main()
