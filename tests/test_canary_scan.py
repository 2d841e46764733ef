"""The end-to-end PHI leak scan on a small canary archive: no planted identity in any artifact.

``reliability/canary_scan.py`` plants distinctive made-up identities in every place an export
hides them (DICOM tags, private tags, nested sequences, report text in every rule's shape, file
and folder names), runs ingest, train, evaluate, export, score (dataset and raw CSV), the review
queue and page, serve and compare, and :mod:`mmclinic.phi.scan` searches every byte written.
``make reliability`` runs the larger version.
"""

from __future__ import annotations

import base64
import gzip
import io
import sys

import pytest

from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from reliability import canary_scan  # noqa: E402

from mmclinic.phi.scan import Canary, CanaryScanner, ScanSummary  # noqa: E402

PATIENTS = 12


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return canary_scan.plant_archive(tmp_path_factory.mktemp("canary") / "archive", patients=PATIENTS)


def test_scanner_finds_every_form_and_names_no_value():
    canaries = [Canary("patient_name", "QZXWYNAME^JOHNQ", "name"), Canary("mrn", "MRN7Q3Z9K"),
                Canary("birth_date", "1931-07-29", "date"), Canary("phone", "617-201-4037", "digits")]
    scanner = CanaryScanner(canaries)
    cases = {
        b"PN=QZXWYNAME^JOHNQ": ("patient_name", "as written", "utf-8"),
        "johnq qzxwyname".encode("utf-16-le"): ("patient_name", "given family", "utf-16-le"),
        b"id mrn7q3z9k.": ("mrn", "as written", "utf-8"),
        base64.b64encode(b"x MRN7Q3Z9K y"): ("mrn", "as written", "base64"),
        b"DA\x08\x0019310729": ("birth_date", "digits", "utf-8"),
        b"born July 29, 1931": ("birth_date", "month d, yyyy", "utf-8"),
        b"call (617) 201-4037": ("phone", "(nnn) nnn-nnnn", "utf-8"),
    }
    for data, want in cases.items():
        assert want in scanner.find(data), want
    # Digits inside longer numbers or words are not a date; nothing here is a canary.
    assert not scanner.find(b"0.193107291 a19310729 16172014037 MRN7Q3Z9 qzxwynam")
    hits = scanner.scan_bytes(gzip.compress(b"note: MRN7Q3Z9K"), "shard.gz")
    assert [(h.where, h.kind) for h in hits] == [("shard.gz[gunzip]", "mrn")]
    assert "MRN7Q3Z9K" not in str(hits[0]) and "shard.gz" in str(hits[0])


def test_scanner_reads_parquet_values_and_zip_members(tmp_path):
    import zipfile

    import pandas as pd

    scanner = CanaryScanner([Canary("mrn", "MRN7Q3Z9K")])
    pd.DataFrame({"text": ["MRN7Q3Z9K " * 50]}).to_parquet(tmp_path / "t.parquet", compression="snappy")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", "x" * 100 + "MRN7Q3Z9K")
    (tmp_path / "model.keras").write_bytes(buf.getvalue())
    (tmp_path / "MRN7Q3Z9K").mkdir()
    summary = ScanSummary()
    where = {h.where for h in scanner.scan_tree(tmp_path, summary)}
    assert {"t.parquet[parquet values]", "model.keras[zip:config.json]", "MRN7Q3Z9K[file name]"} <= where
    assert summary.files == 2 and summary.names == 3 and len(summary.hits) >= 3


def test_dicom_person_name_after_a_label_or_title_loses_both_parts():
    """Leaks the scan found: a name rule stopping at the caret left the given name behind."""
    from mmclinic.phi.text_deid import deidentify_text

    for text in ("Name: Quzwykab^Vexqelab.", "Dr. Quzwykab^Vexqelab called.", "Patient: QUZWYKAB^VEXQELAB",
                 "Signed by: Quzwykab^Vexqelab"):
        out = deidentify_text(text)
        assert "Vexqelab" not in out.title() and "Quzwykab" not in out.title() and "[NAME]" in out, out


def test_known_identities_leave_file_paths_and_messages():
    from mmclinic.phi.text_deid import KnownIdentities

    known = KnownIdentities()
    known.add(["MRN7QAB001Z9K", "ACC-77-1042", "1", "3001", "88123456"], ["QUZWYKAB^VEXQELAB"])
    assert known.redact("scans/88123456/IM-0001-3001.dcm") == "scans/[REDACTED]/IM-0001-3001.dcm"
    path = "dicom/QUZWYKAB_VEXQELAB_MRN7QAB001Z9K/acc_77_1042/i1.dcm: tag SOPInstanceUID repeats (Quzwykab)"
    assert known.redact(path) == "dicom/[REDACTED]_[REDACTED]/[REDACTED]/i1.dcm: tag SOPInstanceUID repeats ([REDACTED])"
    assert known.redact("dicom/s00001/i1.dcm") == "dicom/s00001/i1.dcm"  # short values and other words stay
    assert known.redact("QuzwykabJohn.dcm") == "QuzwykabJohn.dcm"  # inside a longer run: not matched
    # Names and IDs as exports also spell them: run together, without punctuation, in any script,
    # an ID's digits alone; placeholders are no identities.
    known.add(["MRN-004512", "UNKNOWN"], ["Иванов^Иван", "O'BRIEN^SEAN", "ANONYMOUS"])
    assert known.redact("QuzwykabVexqelab/MRN004512/1.dcm") == "[REDACTED]/[REDACTED]/1.dcm"
    assert known.redact("p/004512/Иванов_Иван/OBrien.dcm") == "p/[REDACTED]/[REDACTED]/[REDACTED].dcm"
    assert known.redact("unknown transfer syntax in anonymous/1.dcm") == "unknown transfer syntax in anonymous/1.dcm"


def test_negative_control_the_raw_archive_holds_every_canary_kind(archive):
    """The scan that finds nothing in the artifacts finds every planted kind in the source."""
    scanner = CanaryScanner(archive.canaries)
    found = {h.kind for h in scanner.scan_tree(archive.source)} | {h.kind for h in
                                                                   scanner.scan_paths([archive.pairs_csv],
                                                                                      archive.source.parent)}
    assert len(archive.kinds) >= 40 and len(archive.canaries) >= 40 * PATIENTS
    assert found == archive.kinds, f"kinds not found in the raw archive: {sorted(archive.kinds - found)}"
    names = {h.kind for h in scanner.scan_tree(archive.source) if h.where.endswith("[file name]")}
    assert {"patient_name", "patient_id"} <= names


@pytest.mark.slow
def test_no_canary_in_any_artifact_of_the_whole_pipeline(archive, tmp_path, capfd):
    run = canary_scan.run_pipeline(archive, tmp_path / "work", steps=3, captured=capfd.readouterr, split="test")
    assert run.stages == ["ingest", "train", "evaluate", "export", "score_data", "score_csv", "review_export",
                          "review_page", "serve", "compare"]
    summary = canary_scan.scan(archive, run)
    assert not summary.hits, "canaries found:\n" + "\n".join(map(str, summary.hits))

    # The scan covered what every stage writes (names relative to the work folder).
    work = run.work
    written = {p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()}
    expected = ["mlflow.db", "scores.db", "dataset/quarantine.csv", "dataset/manifest.parquet",
                "dataset/reports.parquet", "dataset/data_card.md", "checkout/data_cards/dataset.md",
                "run/vocab.txt", "eval/REPORT.json", "eval/report.html", "review/decisions.csv",
                "logs/serve.out", "logs/serve.err", "logs/ingest.err"]
    assert set(expected) <= written, sorted(set(expected) - written)
    for pattern in ("dataset/dicom/*.dcm", "dataset/shards/*", "run/tensorboard/events.out.tfevents.*",
                    "run/tensorboard/**/*.tsv", "models/canary/1/saved_model.pb", "models/canary/1/assets.extra/*",
                    "mlruns/**/*", "compare/*", "http_responses/serve/*", "http_responses/review/*"):
        assert any(work.glob(pattern)), pattern
    assert summary.files == len(written) and summary.bytes > 1e6
    # Files named after the patient were refused (a cut file, a copy): quarantine.csv lists them, by path.
    import pandas as pd

    q = pd.read_csv(work / "dataset" / "quarantine.csv")
    planted = len(range(0, PATIENTS, 4))
    assert sorted(q["reason_code"]) == ["duplicate"] * planted + ["truncated"] * planted
    assert q["source_path"].str.startswith("dicom/[REDACTED]_[REDACTED]_0/[REDACTED]_").all()
