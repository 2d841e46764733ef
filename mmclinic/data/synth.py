"""Synthetic chest radiograph studies: the built-in data of the demo and the tests.

Each study is drawn from a small anatomical model (body, lungs, mediastinum, heart,
spine, ribs, clavicles) with the findings its report states rendered into the
pixels: heart size for cardiomegaly, a fluid level with a meniscus for pleural
effusion, a lucent rim without lung markings for pneumothorax, round opacities
for nodules and masses, patchy air-space opacity for consolidation, tubes, lines
and a pacemaker for support devices. The frontal views follow the radiographic
convention: the patient's right is on the image's left.

Files are valid DICOM (CR and DX SOP classes, 12-bit stored values, rescale
slope/intercept, a window, MONOCHROME1 and MONOCHROME2) carrying realistic but
entirely fake identities, some of which are also planted in the report text so
that de-identification can be proven. The same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
from pathlib import Path

import numpy as np
from scipy import ndimage

FINDINGS = (
    "cardiomegaly",
    "pleural_effusion",
    "pneumothorax",
    "nodule",
    "mass",
    "consolidation",
    "support_device",
)
"""Finding names used in ``labels.csv``; ``no_finding`` marks a normal study."""

CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
UID_ROOT = "1.2.826.0.1.3680043.10.1127."  # a documented example-style root for synthetic data

_FIRST_M = ["James", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Thomas",
            "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Steven", "Andrew", "Kenneth"]
_FIRST_F = ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica",
            "Sarah", "Karen", "Nancy", "Lisa", "Margaret", "Sandra", "Ashley", "Dorothy"]
_LAST = ["Halvorsen", "Quintero", "Abernathy", "Okonkwo", "Lindqvist", "Castellano", "Whitfield",
         "Nakamura", "Brennan", "Delacroix", "Petrovic", "Fairbanks", "Oyelaran", "Ashcombe",
         "Villanueva", "Thorburn", "Marchetti", "Kowalczyk", "Ellsworth", "Haddad"]
_STREETS = ["Larkspur Lane", "Old Mill Road", "Juniper Court", "Harbor View Drive", "Birchwood Ave"]
_TOWNS = ["Millbrook", "Fairhaven", "Ashford", "Cedar Falls", "Westmere"]
_INSTITUTIONS = [
    ("Riverbend General Hospital", "400 Riverbend Parkway, Millbrook"),
    ("St. Aldric Medical Center", "12 Cathedral Square, Fairhaven"),
    ("Northgate Community Clinic", "88 Northgate Road, Ashford"),
]
_MANUFACTURERS = [
    # (manufacturer, model, modality, rescale slope, rescale intercept)
    ("Acme Radiography", "AR-400", "CR", 1.0, 0.0),
    ("Northwind Imaging", "NX Digital", "DX", 1.0, -1024.0),
    ("Helios Medical Systems", "HeliosDR 2", "DX", 0.5, 0.0),
]


@dataclasses.dataclass
class Finding:
    name: str
    side: str = "none"  # left | right | bilateral | none
    location: str = ""  # zone or lobe, device kind
    severity: str = ""  # small | moderate | large


@dataclasses.dataclass
class Study:
    patient: dict
    index: int
    accession: str
    study_uid: str
    date: dt.date
    views: list[str]
    findings: list[Finding]
    referring: str = ""
    prior_date: dt.date | None = None
    report: str = ""


# --------------------------------------------------------------------------- pixels


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _smooth_noise(rng, shape, sigma):
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma)


def _line(img, pts, width, value, yy, xx):
    """Draw a polyline of ``width`` (normalised) by adding ``value`` to ``img``."""
    for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:]):
        dy, dx = y1 - y0, x1 - x0
        length2 = dy * dy + dx * dx + 1e-12
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / length2, 0, 1)
        d = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
        img[d <= width] = np.maximum(img[d <= width], value)


def render_frontal(findings: list[Finding], rng: np.random.Generator, size: int) -> np.ndarray:
    """Attenuation map in [0, 1] of a frontal (PA/AP) chest radiograph."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Small per-image variation in position and scale.
    sy, sx = rng.uniform(-0.02, 0.02, 2)
    scale = rng.uniform(0.96, 1.04)
    yy = (yy - 0.5 - sy) / scale + 0.5
    xx = (xx - 0.5 - sx) / scale + 0.5

    img = np.full((size, size), 0.04, np.float32)
    body = _ellipse(yy, xx, 0.56, 0.5, 0.52, 0.46)
    img[body] = 0.52
    # Lungs: the right lung (image left) is wider and shorter than the left.
    r_lung = _ellipse(yy, xx, 0.45, 0.31, 0.31, 0.15)
    l_lung = _ellipse(yy, xx, 0.46, 0.69, 0.30, 0.14)
    lungs = r_lung | l_lung
    markings = 0.05 * _smooth_noise(rng, (size, size), size / 64) * (size / 64)
    img[lungs] = 0.18 + markings[lungs]
    # Ribs: faint arcs across both lung fields.
    for k in range(8):
        y0 = 0.2 + 0.075 * k
        arc = np.abs(yy - (y0 + 0.12 * (xx - 0.5) ** 2 * 4)) < 0.012
        img[arc & lungs] += 0.07
    # Clavicles.
    _line(img, [(0.17, 0.18), (0.13, 0.45)], 0.012, 0.62, yy, xx)
    _line(img, [(0.17, 0.82), (0.13, 0.55)], 0.012, 0.62, yy, xx)
    # Mediastinum and spine.
    img[(np.abs(xx - 0.5) < 0.055) & (yy > 0.1) & body] = 0.68
    img[(np.abs(xx - 0.5) < 0.025) & body] = 0.8

    names = {f.name: f for f in findings}
    # Heart: sits left of midline (image right); width sets the cardiothoracic ratio.
    cardio = "cardiomegaly" in names
    heart_rx = rng.uniform(0.25, 0.29) if cardio else rng.uniform(0.15, 0.18)
    heart = _ellipse(yy, xx, 0.66, 0.53 + (0.03 if cardio else 0.0), 0.13, heart_rx)
    img[heart & body] = np.maximum(img[heart & body], 0.72)
    # Diaphragm domes close the lung bases.
    img[(yy > 0.74 + 0.05 * np.cos((xx - 0.5) * 6)) & body] = np.maximum(
        img[(yy > 0.74 + 0.05 * np.cos((xx - 0.5) * 6)) & body], 0.55
    )

    def side_mask(side: str) -> np.ndarray:
        return {"right": r_lung, "left": l_lung, "bilateral": lungs}[side]

    def side_x(side: str) -> float:
        return 0.31 if side == "right" else 0.69

    for f in findings:
        if f.name == "pleural_effusion":
            level = {"small": 0.66, "moderate": 0.58, "large": 0.48}[f.severity or "moderate"]
            sides = ["right", "left"] if f.side == "bilateral" else [f.side]
            for s in sides:
                lateral = np.abs(xx - 0.5) - 0.2  # meniscus: higher at the chest wall
                fluid = side_mask(s) & (yy > level - 0.15 * np.clip(lateral, 0, None))
                img[fluid] = 0.6 + 0.02 * rng.standard_normal()
        elif f.name == "pneumothorax":
            # The lung edge falls away from the chest wall: a lucent rim without lung
            # markings outside a visible visceral pleural line.
            cx = side_x(f.side)
            gap = 0.07 if f.severity == "large" else 0.04
            lung = side_mask(f.side)
            cy0 = 0.45 if f.side == "right" else 0.46
            collapsed = _ellipse(yy, xx, cy0 + gap, cx + (gap if f.side == "left" else -gap) * -0.5,
                                 0.30 - gap, 0.145 - gap)
            rim = lung & ~collapsed & (yy < 0.62)
            img[rim] = 0.06
            line = ndimage.binary_dilation(collapsed, iterations=max(1, size // 128)) & ~collapsed & rim
            img[line] = 0.42
        elif f.name in ("nodule", "mass"):
            cy = {"upper": 0.3, "mid": 0.45, "lower": 0.6}[f.location]
            cx = side_x(f.side) + rng.uniform(-0.04, 0.04)
            r = rng.uniform(0.02, 0.03) if f.name == "nodule" else rng.uniform(0.055, 0.075)
            blob = _ellipse(yy, xx, cy + rng.uniform(-0.03, 0.03), cx, r, r)
            img[blob] = np.maximum(img[blob], 0.62)
        elif f.name == "consolidation":
            cy = {"upper": 0.3, "middle": 0.52, "lower": 0.6}[f.location]
            cx = side_x(f.side)
            patch = _ellipse(yy, xx, cy, cx, 0.11, 0.1)
            texture = _smooth_noise(rng, (size, size), size / 40) * (size / 40)
            dense = patch & side_mask(f.side) & (texture > -0.3)
            img[dense] = np.maximum(img[dense], 0.5 + 0.05 * texture[dense])
        elif f.name == "support_device":
            if f.location == "endotracheal_tube":
                _line(img, [(0.0, 0.5), (0.3, 0.5)], 0.006, 0.95, yy, xx)
            elif f.location == "central_line":
                _line(img, [(0.15, 0.2), (0.25, 0.42), (0.48, 0.47)], 0.005, 0.95, yy, xx)
            else:  # pacemaker in the left chest wall (image right), lead to the heart
                img[(np.abs(yy - 0.2) < 0.03) & (np.abs(xx - 0.78) < 0.045)] = 1.0
                _line(img, [(0.2, 0.74), (0.35, 0.6), (0.64, 0.55)], 0.005, 0.95, yy, xx)
    img += 0.015 * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def render_lateral(findings: list[Finding], rng: np.random.Generator, size: int) -> np.ndarray:
    """Attenuation map of a left lateral (LL) view: laterality is not visible here."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 0.04, np.float32)
    body = _ellipse(yy, xx, 0.55, 0.5, 0.52, 0.36)
    img[body] = 0.55
    lung = _ellipse(yy, xx, 0.47, 0.5, 0.32, 0.26)
    img[lung] = 0.22 + 0.04 * _smooth_noise(rng, (size, size), size / 64)[lung] * (size / 64)
    img[(np.abs(xx - 0.8) < 0.04) & body] = 0.82  # spine, posterior
    names = {f.name for f in findings}
    heart_rx = 0.2 if "cardiomegaly" in names else 0.13
    heart = _ellipse(yy, xx, 0.64, 0.38, 0.14, heart_rx)
    img[heart & body] = np.maximum(img[heart & body], 0.7)
    for f in findings:
        if f.name == "pleural_effusion":
            img[lung & (yy > 0.66) & (xx > 0.55)] = 0.6  # posterior costophrenic sulcus
        elif f.name in ("nodule", "mass"):
            r = 0.025 if f.name == "nodule" else 0.065
            cy = {"upper": 0.3, "mid": 0.45, "lower": 0.6}[f.location]
            blob = _ellipse(yy, xx, cy, 0.55, r, r)
            img[blob] = np.maximum(img[blob], 0.62)
        elif f.name == "consolidation":
            patch = _ellipse(yy, xx, 0.5, 0.55, 0.1, 0.12) & lung
            img[patch] = np.maximum(img[patch], 0.5)
    img += 0.015 * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


# --------------------------------------------------------------------------- reports

_SIDE_WORD = {"left": "left", "right": "right", "bilateral": "bilateral"}
_LOBE = {("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
         ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
         ("left", "lower"): "left lower lobe"}
_DEVICE = {"endotracheal_tube": "endotracheal tube", "central_line": "right internal jugular central venous catheter",
           "pacemaker": "left chest wall pacemaker"}


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _finding_sentence(f: Finding, rng: np.random.Generator, uncertain: bool) -> str:
    side = _SIDE_WORD.get(f.side, "")
    if f.name == "cardiomegaly":
        return _pick(rng, ["The heart is enlarged.", "Cardiomegaly is present.",
                           "The cardiac silhouette is enlarged.", "Moderate enlargement of the cardiac silhouette."])
    if f.name == "pleural_effusion":
        sev = f.severity or "moderate"
        if f.side == "bilateral":
            return f"{sev.capitalize()} bilateral pleural effusions with blunting of both costophrenic angles."
        hedge = "Possible" if uncertain and sev == "small" else sev.capitalize()
        return _pick(rng, [f"{hedge} {side} pleural effusion.",
                           f"{hedge} {side} pleural effusion with blunting of the {side} costophrenic angle.",
                           f"There is a {sev} {side} pleural effusion."])
    if f.name == "pneumothorax":
        size = "large" if f.severity == "large" else "small"
        return _pick(rng, [f"There is a {size} {side} pneumothorax.",
                           f"{size.capitalize()} {side} apical pneumothorax.",
                           f"A {side} pneumothorax is present, {size} in size."])
    if f.name in ("nodule", "mass"):
        zone = {"upper": "upper", "mid": "mid", "lower": "lower"}[f.location]
        word = "nodule" if f.name == "nodule" else "mass"
        if uncertain:
            return f"Questionable {side} {zone} zone {word}; consider CT for further evaluation."
        return _pick(rng, [f"A {side} {zone} zone {word} is noted.",
                           f"There is a {'rounded' if word == 'nodule' else 'large'} {word} in the {side} {zone} lung zone.",
                           f"{word.capitalize()} projecting over the {side} {zone} zone."])
    if f.name == "consolidation":
        lobe = _LOBE[(f.side, f.location)]
        if uncertain:
            return f"Patchy opacity in the {lobe}, which may represent pneumonia or atelectasis."
        return _pick(rng, [f"Consolidation in the {lobe}.", f"Airspace consolidation of the {lobe}.",
                           f"Focal consolidation is seen in the {lobe}, compatible with pneumonia."])
    if f.name == "support_device":
        device = _DEVICE[f.location]
        return _pick(rng, [f"A {device} is in place.", f"{device.capitalize()} in satisfactory position.",
                           f"Interval placement of a {device}."])
    raise ValueError(f.name)


def _negative_sentences(present: set[str], rng: np.random.Generator) -> list[str]:
    out = []
    if "cardiomegaly" not in present:
        out.append(_pick(rng, ["The heart size is normal.", "Cardiomediastinal silhouette is within normal limits.",
                               "Normal heart size."]))
    lung_neg = []
    if "consolidation" not in present:
        lung_neg.append("focal consolidation")
    if "pleural_effusion" not in present:
        lung_neg.append("pleural effusion")
    if "pneumothorax" not in present:
        lung_neg.append("pneumothorax")
    if lung_neg:
        if len(lung_neg) == 1:
            out.append(f"No {lung_neg[0]}.")
        else:
            out.append(_pick(rng, ["No ", "There is no ", "No evidence of "])
                       + ", ".join(lung_neg[:-1]) + f" or {lung_neg[-1]}.")
    if not present & {"nodule", "mass"} and rng.random() < 0.6:
        out.append(_pick(rng, ["No suspicious pulmonary nodules.", "No focal mass is identified."]))
    return out


def write_report(study: Study, rng: np.random.Generator) -> str:
    """Free-text report with FINDINGS and IMPRESSION, laterality words matching the pixels."""
    p = study.patient
    present = {f.name for f in study.findings}
    uncertain = rng.random() < 0.2
    view_text = {"PA": "PA", "AP": "AP portable", "LL": "lateral"}
    exam = " and ".join(view_text[v] for v in study.views)
    age = study.patient["age_at"](study.date)
    lines = [f"EXAM: Chest radiograph, {exam}."]
    lines.append(_pick(rng, [f"HISTORY: {age}-year-old {p['sex_word']} with {_pick(rng, ['cough', 'shortness of breath', 'chest pain', 'fever', 'follow-up'])}.",
                             f"INDICATION: {_pick(rng, ['Dyspnea', 'Cough', 'Preoperative evaluation', 'Line placement'])}."]))
    if study.prior_date is not None and rng.random() < 0.7:
        lines.append(f"COMPARISON: {study.prior_date.strftime('%m/%d/%Y')}.")
    sentences = [_finding_sentence(f, rng, uncertain and i == 0) for i, f in enumerate(study.findings)]
    sentences += _negative_sentences(present, rng)
    if rng.random() < 0.5:
        sentences.append(_pick(rng, ["Osseous structures are intact.", "No acute osseous abnormality."]))
    lines.append("FINDINGS: " + " ".join(sentences))
    positives = sentences[: len(study.findings)]
    if positives:
        imp = " ".join(f"{i + 1}. {s}" for i, s in enumerate(positives))
    else:
        imp = _pick(rng, ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                          "Normal chest radiograph."])
    lines.append("IMPRESSION: " + imp)
    # Planted identifiers, as real reports carry them: de-identification must remove them.
    roll = rng.random()
    if roll < 0.25:
        lines.append(f"Findings discussed with Dr. {study.referring} by telephone at {p['phone']} "
                     f"on {study.date.strftime('%m/%d/%Y')}.")
    elif roll < 0.4:
        lines.append(f"Patient {p['given']} {p['family']}, MRN {p['mrn']}, accession {study.accession}.")
    elif roll < 0.5:
        lines.append(f"Report sent to {p['email']}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- studies


def _sample_findings(rng: np.random.Generator, inpatient: bool) -> list[Finding]:
    if rng.random() < 0.3:
        return []
    out: list[Finding] = []
    pool = ["cardiomegaly", "pleural_effusion", "pneumothorax", "nodule", "mass", "consolidation"]
    k = 1 + int(rng.random() < 0.35)
    for name in rng.choice(pool, size=k, replace=False):
        side = "left" if rng.random() < 0.5 else "right"
        if name == "cardiomegaly":
            out.append(Finding("cardiomegaly"))
        elif name == "pleural_effusion":
            if rng.random() < 0.2:
                side = "bilateral"
            out.append(Finding(name, side, "", _pick(rng, ["small", "moderate", "large"])))
        elif name == "pneumothorax":
            out.append(Finding(name, side, "apical", _pick(rng, ["small", "large"])))
        elif name in ("nodule", "mass"):
            out.append(Finding(name, side, _pick(rng, ["upper", "mid", "lower"])))
        else:
            lobes = ["upper", "middle", "lower"] if side == "right" else ["upper", "lower"]
            out.append(Finding(name, side, _pick(rng, lobes)))
    if inpatient and rng.random() < 0.6:
        out.append(Finding("support_device", "none", _pick(rng, ["endotracheal_tube", "central_line", "pacemaker"])))
    return out


def _make_patient(rng: np.random.Generator, i: int) -> dict:
    sex = "M" if rng.random() < 0.5 else "F"
    given = _pick(rng, _FIRST_M if sex == "M" else _FIRST_F)
    family = _pick(rng, _LAST)
    age = int(rng.integers(19, 96))  # some over 89, to exercise age grouping
    birth = dt.date(2020 - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    inst, inst_addr = _INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))]

    def age_at(d: dt.date) -> int:
        return d.year - birth.year - ((d.month, d.day) < (birth.month, birth.day))

    return {
        "mrn": f"{int(rng.integers(10_000_000, 99_999_999))}",
        "given": given,
        "family": family,
        "sex": sex,
        "sex_word": "man" if sex == "M" else "woman",
        "birth": birth,
        "age_at": age_at,
        "address": f"{int(rng.integers(10, 999))} {_pick(rng, _STREETS)}, {_pick(rng, _TOWNS)}",
        "phone": f"555-{int(rng.integers(100, 999)):03d}-{int(rng.integers(1000, 9999)):04d}",
        "email": f"{given.lower()}.{family.lower()}{i}@example.org",
        "institution": inst,
        "institution_address": inst_addr,
        "manufacturer": _MANUFACTURERS[int(rng.integers(len(_MANUFACTURERS)))],
        "inpatient": bool(rng.random() < 0.3),
    }


def _uid(seed: int, *parts: object) -> str:
    digest = hashlib.sha256((f"{seed}:" + ":".join(map(str, parts))).encode()).digest()
    return UID_ROOT + str(int.from_bytes(digest[:12], "big"))


def make_studies(patients: int, seed: int) -> list[Study]:
    rng = np.random.default_rng(seed)
    studies: list[Study] = []
    for i in range(patients):
        p = _make_patient(rng, i)
        n = 1 + int(rng.random() < 0.45) + int(rng.random() < 0.15)
        day = dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 1500)))
        prior = None
        for k in range(n):
            views = ["AP"] if p["inpatient"] and rng.random() < 0.7 else (["PA", "LL"] if rng.random() < 0.4 else ["PA"])
            s = Study(
                patient=p, index=k, accession=f"ACC{int(rng.integers(10**7, 10**8))}",
                study_uid=_uid(seed, i, k), date=day, views=views,
                findings=_sample_findings(rng, p["inpatient"]),
            )
            s.referring = f"{_pick(rng, _FIRST_M + _FIRST_F)} {_pick(rng, _LAST)}"
            s.prior_date = prior
            s.report = write_report(s, rng)
            studies.append(s)
            prior = day
            day = day + dt.timedelta(days=int(rng.integers(20, 400)))
    return studies


# --------------------------------------------------------------------------- DICOM


def to_dicom_bytes(study: Study, view: int, pixels01: np.ndarray, seed: int, monochrome1: bool) -> bytes:
    """Encode an attenuation map as a 12-bit CR/DX DICOM file with the study's identities."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    p = study.patient
    manufacturer, model_name, modality, slope, intercept = p["manufacturer"]
    # Stored values: attenuation -> 12-bit; MONOCHROME1 stores the complement so that
    # the minimum stored value is displayed white.
    stored = np.round(pixels01 * 3800 + 150).astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    out_values = stored.astype(np.float64) * slope + intercept
    lo, hi = np.percentile(out_values, [1, 99])

    sop_uid = _uid(seed, study.study_uid, "sop", view)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_SOP_CLASS if modality == "CR" else DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_ROOT + "1"
    meta.ImplementationVersionName = "MMCLINIC_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = _uid(seed, study.study_uid, "series", view)
    ds.FrameOfReferenceUID = _uid(seed, study.study_uid, "for", view)
    ds.Modality = modality
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.StudyDate = study.date.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = f"{8 + study.index % 10:02d}{(view * 7) % 60:02d}00"
    ds.AccessionNumber = study.accession
    ds.StudyID = f"{study.index + 1}"
    ds.SeriesNumber = view + 1
    ds.InstanceNumber = 1
    ds.StudyDescription = "XR CHEST"
    ds.PatientName = f"{p['family']}^{p['given']}"
    ds.PatientID = p["mrn"]
    ds.OtherPatientIDs = f"H{p['mrn'][::-1]}"
    ds.PatientBirthDate = p["birth"].strftime("%Y%m%d")
    ds.PatientSex = p["sex"]
    ds.PatientAge = f"{min(p['age_at'](study.date), 999):03d}Y"
    ds.PatientAddress = p["address"]
    ds.PatientTelephoneNumbers = p["phone"]
    ds.InstitutionName = p["institution"]
    ds.InstitutionAddress = p["institution_address"]
    ds.ReferringPhysicianName = "^".join(reversed(study.referring.split(" ")))
    ds.PerformingPhysicianName = f"{_LAST[(study.index + view) % len(_LAST)]}^Morgan"
    ds.OperatorsName = f"{_LAST[(study.index + 3) % len(_LAST)]}^Jordan"
    ds.StationName = f"XR-{p['institution'][:3].upper()}-0{view + 1}"
    ds.DeviceSerialNumber = f"SN{len(manufacturer) * 7919:06d}"
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model_name
    ds.BodyPartExamined = "CHEST"
    vp = study.views[view]
    ds.ViewPosition = vp
    ds.ImageLaterality = "L" if vp == "LL" else "U"
    ds.PatientOrientation = ["P", "F"] if vp == "LL" else ["R", "F"] if vp == "AP" else ["L", "F"]
    ds.ImagerPixelSpacing = [0.7, 0.7]
    ds.PixelSpacing = [0.7, 0.7]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels01.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
    ds.WindowWidth = f"{max(hi - lo, 1.0):.1f}"
    ds.PixelData = stored.tobytes()
    # A private block, as vendors write them: de-identification must drop it.
    block = ds.private_block(0x0029, "MMCLINIC SYNTH", create=True)
    block.add_new(0x10, "LO", f"operator note for {p['family']}")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class SynthSummary:
    out: Path
    patients: int
    studies: int
    images: int


def synthesize(out: str | Path, patients: int = 40, seed: int = 0, size: int = 256) -> SynthSummary:
    """Write ``OUT/dicom/**.dcm``, ``OUT/reports.csv`` and ``OUT/labels.csv``."""
    from mmclinic.errors import UsageError

    if patients < 1:
        raise UsageError(f"--patients must be >= 1, got {patients}")
    if not 32 <= size <= 2048:
        raise UsageError(f"--size must be in [32, 2048], got {size}")
    out = Path(out)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    studies = make_studies(patients, seed)
    n_images = 0
    with open(out / "reports.csv", "w", newline="", encoding="utf-8") as rf, \
            open(out / "labels.csv", "w", newline="", encoding="utf-8") as lf:
        rw = csv.writer(rf)
        rw.writerow(["patient_id", "accession_number", "study_instance_uid", "report_text"])
        lw = csv.writer(lf)
        lw.writerow(["patient_id", "accession_number", "study_instance_uid", "finding", "laterality",
                     "location", "severity"])
        for si, s in enumerate(studies):
            rw.writerow([s.patient["mrn"], s.accession, s.study_uid, s.report])
            for f in s.findings or [Finding("no_finding")]:
                lw.writerow([s.patient["mrn"], s.accession, s.study_uid, f.name, f.side, f.location, f.severity])
            study_dir = out / "dicom" / f"s{si:05d}"
            study_dir.mkdir(exist_ok=True)
            for v, view in enumerate(s.views):
                rng = np.random.default_rng([seed, si, v])
                pix = (render_lateral if view == "LL" else render_frontal)(s.findings, rng, size)
                mono1 = bool(rng.random() < 0.35)
                (study_dir / f"i{v}.dcm").write_bytes(to_dicom_bytes(s, v, pix, seed, mono1))
                n_images += 1
    return SynthSummary(out=out, patients=patients, studies=len(studies), images=n_images)
