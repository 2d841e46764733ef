"""No path traversal: image paths that tables name (CSV, MedPix JSONL, IU projections) and files listed
in a tree (DICOM, MIMIC-CXR) are read only from inside the source folder, through a real ingest."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmclinic.data.ingest import IngestOptions, ingest
from mmclinic.data.sources import unsafe_path

REPO = Path(__file__).resolve().parent.parent
OPTS = IngestOptions(max_side=32, workers=2)
SECRET = "secret_patient_scan"


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((40, 40)) * 255).astype(np.uint8)).save(path)


def _outside(tmp: Path) -> Path:
    """A valid image next to the source: read, it would be accepted."""
    target = tmp / "elsewhere" / f"{SECRET}.png"
    _png(target, 99)
    return target


def _quarantine(ds: Path) -> pd.DataFrame:
    return pd.read_csv(ds / "quarantine.csv", keep_default_na=False, dtype=str)


def _assert_no_path_in_messages(q: pd.DataFrame) -> None:
    text = " ".join(q["message"])
    assert SECRET not in text and "elsewhere" not in text and "/etc" not in text


def test_unsafe_path_rules(tmp_path):
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    target = _outside(tmp_path)
    (src / "img" / "link.png").symlink_to(target)
    (src / "img" / "loop.png").symlink_to(src / "img" / "loop.png")
    (src / "img" / "inner.png").symlink_to(src / "img" / "real.png")
    refused = {
        "/etc/passwd": "absolute", "\\\\server\\share\\x.png": "absolute", "C:\\scans\\x.png": "absolute",
        "c:x.png": "absolute", "../elsewhere/x.png": "'..'", "img/../../elsewhere/x.png": "'..'",
        "img\\..\\..\\elsewhere\\x.png": "'..'", "a/b/../../../x.png": "'..'", "img/link.png": "outside",
        "img/loop.png": "loop", "img/x\0.png": "NUL",
    }
    for value, why in refused.items():
        reason = unsafe_path(value, src, src)
        assert reason is not None and why in reason, (value, reason)
    for value in ("img/real.png", "img/../img/real.png", "./img/real.png", "img/inner.png", "img/absent.png",
                  "a/b/../c.png"):
        assert unsafe_path(value, src, src) is None, value
    assert unsafe_path("../x.png", src / "img", src) is not None  # '..' may not climb out of the image folder


def test_csv_image_paths_outside_the_source_are_refused_and_never_read(tmp_path):
    target = _outside(tmp_path)
    src = tmp_path / "src"
    _png(src / "img" / "ok.png", 0)
    _png(src / "img" / "sub" / "ok2.png", 1)
    (src / "img" / "link.png").symlink_to(target)
    (src / "img" / "linked_dir").symlink_to(target.parent, target_is_directory=True)
    rows = {
        "img/ok.png": "accepted", "img/sub/../sub/ok2.png": "accepted",
        str(target): "unsafe_path", f"../elsewhere/{SECRET}.png": "unsafe_path",
        f"img/../../elsewhere/{SECRET}.png": "unsafe_path", "img/link.png": "unsafe_path",
        f"img/linked_dir/{SECRET}.png": "unsafe_path", f"img\\..\\..\\elsewhere\\{SECRET}.png": "unsafe_path",
    }
    with open(src / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_path", "report_text", "patient_id", "study_id"])
        for i, path in enumerate(rows):
            w.writerow([path, f"FINDINGS: case {i}. IMPRESSION: normal.", f"pt{i}", f"st{i}"])
    s = ingest(src, tmp_path / "ds", "csv", tmp_path / "k", OPTS)
    q = _quarantine(tmp_path / "ds")
    assert s.accepted == 2 and len(pd.read_parquet(tmp_path / "ds" / "manifest.parquet")) == 2
    assert list(q["reason_code"]) == ["unsafe_path"] * 6 and set(q["kind"]) == {"image"}
    assert s.accepted + len(q) == len(rows)  # every row accounted for, as an image input
    assert all(re.match(r"pairs\.csv:\d+: field image_path ", m) for m in q["message"])
    _assert_no_path_in_messages(q)


def _medpix(src: Path, images: list[str]) -> None:
    (src / "splitted_dataset").mkdir(parents=True)
    (src / "images").mkdir()
    cases, descs = [], []
    for i, name in enumerate(images):
        cases.append({"U_id": f"MPX{i}", "Case": {"Findings": f"Finding {i}.", "Case Diagnosis": "Normal."}})
        descs.append({"image": name, "U_id": f"MPX{i}", "Type": "CT",
                      "Description": {"Caption": f"Caption {i}.", "Plane": "Axial"}, "Location Category": "Head"})
    for name, objs in (("data_train.jsonl", cases), ("descriptions_train.jsonl", descs)):
        (src / "splitted_dataset" / name).write_text("".join(json.dumps(o) + "\n" for o in objs))


def test_medpix_jsonl_image_names_outside_the_image_folder_are_refused(tmp_path):
    target = _outside(tmp_path)
    src = tmp_path / "mp"
    names = ["ok1", "ok2", f"../../elsewhere/{SECRET}", str(target.with_suffix("")), "link", "../reports"]
    _medpix(src, names)
    _png(src / "images" / "ok1.png", 1)
    _png(src / "images" / "ok2.png", 2)
    (src / "images" / "link.png").symlink_to(target)
    _png(src / "reports.png", 3)  # inside the source but outside images/: '..' may not climb out
    (src / "images" / "stray.png").symlink_to(target)  # listed by no description: never read either
    s = ingest(src, tmp_path / "ds", "medpix2", tmp_path / "k", OPTS)
    q = _quarantine(tmp_path / "ds")
    reasons = list(zip(q["source_path"], q["reason_code"], q["kind"]))
    assert s.accepted == 2
    unsafe = [r for r in reasons if r[1] == "unsafe_path"]
    assert len(unsafe) == 5 and {r[2] for r in unsafe} == {"image"}
    assert ("images/stray.png", "unsafe_path", "image") in reasons
    assert {r[1] for r in reasons} == {"unsafe_path", "missing_image"}  # the refused lines' cases have no image
    _assert_no_path_in_messages(q)


def test_iu_xray_projection_filenames_outside_the_image_folder_are_refused(tmp_path):
    target = _outside(tmp_path)
    src = tmp_path / "iu"
    _png(src / "images" / "1_IM-0001-1001.dcm.png", 1)
    _png(src / "images" / "2_IM-0002-1001.dcm.png", 2)
    (src / "images" / "3_link.png").symlink_to(target)
    with open(src / "indiana_reports.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"])
        for uid in range(1, 6):
            w.writerow([uid, "normal", "normal", "Xray Chest PA", "Pain.", "None.", f"Lungs clear {uid}.", "Normal."])
    with open(src / "indiana_projections.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uid", "filename", "projection"])
        w.writerows([[1, "1_IM-0001-1001.dcm.png", "Frontal"], [2, "2_IM-0002-1001.dcm.png", "Frontal"],
                     [3, "3_link.png", "Frontal"], [4, f"../../elsewhere/{SECRET}.png", "Lateral"],
                     [5, str(target), "Lateral"]])
    s = ingest(src, tmp_path / "ds", "iu-xray", tmp_path / "k", OPTS)
    q = _quarantine(tmp_path / "ds")
    assert s.accepted == 2
    images_q = q[q["kind"] == "image"]
    assert list(images_q["reason_code"]) == ["unsafe_path"] * 3
    assert sorted(images_q["source_path"]) == [f"indiana_projections.csv:{n}" for n in (4, 5, 6)]
    assert set(q[q["kind"] == "report"]["reason_code"]) == {"missing_image"}
    _assert_no_path_in_messages(q)


def test_dicom_tree_symlinks_resolving_outside_are_refused(synth_source, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(synth_source, src)
    outside_dcm = sorted((src / "dicom").rglob("*.dcm"))[0]
    moved = tmp_path / "elsewhere" / f"{SECRET}.dcm"
    moved.parent.mkdir()
    outside_dcm.rename(moved)
    outside_dcm.symlink_to(moved)  # its report row is there: read, it would be accepted
    (src / "dicom" / "linked_dir").symlink_to(moved.parent, target_is_directory=True)  # never descended
    n_files = sum(1 for p in (src / "dicom").rglob("*") if p.is_file())
    s = ingest(src, tmp_path / "ds", "dicom", tmp_path / "k", OPTS)
    q = _quarantine(tmp_path / "ds")
    images_q = q[q["kind"] == "image"]
    rel = outside_dcm.relative_to(src).as_posix()
    assert dict(zip(images_q["source_path"], images_q["reason_code"]))[rel] == "unsafe_path"
    assert s.accepted + len(images_q) == n_files
    assert list(images_q["reason_code"]) == ["unsafe_path"]
    _assert_no_path_in_messages(q)


def test_mimic_report_and_image_symlinks_outside_are_refused(tmp_path):
    target = _outside(tmp_path)
    (tmp_path / "elsewhere" / "notes.txt").write_text("FINDINGS: someone else's report. IMPRESSION: x.")
    study = tmp_path / "mimic" / "files" / "p10" / "p10000001" / "s50000001"
    _png(study / "a.png", 1)
    (study / "b.png").symlink_to(target)
    (study.parent / "s50000001.txt").write_text("FINDINGS: Clear lungs. IMPRESSION: Normal.")
    other = tmp_path / "mimic" / "files" / "p10" / "p10000002" / "s50000002"
    _png(other / "c.png", 2)
    (other.parent / "s50000002.txt").symlink_to(tmp_path / "elsewhere" / "notes.txt")
    s = ingest(tmp_path / "mimic", tmp_path / "ds", "mimic-cxr", tmp_path / "k", OPTS)
    q = _quarantine(tmp_path / "ds")
    got = set(zip(q["source_path"], q["reason_code"], q["kind"]))
    # Refused files are named by their paths, less the patient and study IDs the archive holds.
    assert ("files/p10/[REDACTED]/[REDACTED]/b.png", "unsafe_path", "image") in got
    assert ("files/p10/[REDACTED]/s50000002.txt", "unsafe_path", "report") in got
    assert s.accepted == 1 and s.reports == 1
    reports = pd.read_parquet(tmp_path / "ds" / "reports.parquet")
    assert not reports["text"].str.contains("someone else").any()
    _assert_no_path_in_messages(q)


@pytest.mark.parametrize("folder", ["mmclinic", "tests", "bench", "reliability"])
def test_yaml_is_only_loaded_with_safe_load(folder):
    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load|load_all|unsafe_load_all|full_load_all)\(|Loader\s*=")
    for path in sorted((REPO / folder).rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            assert not unsafe.search(line), f"{path.relative_to(REPO)}:{n}: {line.strip()}"
