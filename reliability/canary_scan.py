"""The end-to-end PHI leak scan: plant canary identities in an archive, run every stage, search every byte.

A synthetic archive (``mmclinic synth``) is rewritten so that every place a real export hides
identities carries a distinctive, made-up one ("canaries": surnames such as ``Quzwykab``, IDs
such as ``MRN7QAB000Z9K``):

- DICOM headers: PatientName, PatientID, OtherPatientIDs and OtherPatientIDsSequence,
  IssuerOfPatientID, PatientBirthDate, PatientAge over 89, PatientAddress and telephone,
  AccessionNumber, StudyID, study and instance UIDs, InstitutionName and address,
  referring / performing / reading / requesting physicians, operators, station name, device
  serial number, the file meta's source AE title, image comments, a private block, and
  nested sequences (RequestAttributesSequence with a requested-procedure ID and a requesting
  physician, ReferencedPatientSequence carrying a name and ID);
- report text in the shape of every de-identification rule: names after titles, after
  ``Patient:``, signature labels, before credentials, ``FAMILY, GIVEN`` and ``FAMILY^GIVEN``;
  MRN, MR#, accession and Acc# labels with alphanumeric IDs; numeric and month-name dates;
  phones; a street address, a town with state and ZIP; institutions with their city; a place
  after "lives in"; ages over 89; e-mail; SSN;
- file and folder names: half the patients' study folders and files are named after the
  patient and the MRN.

Then the pipeline runs on it through the command line, as a user would: ``ingest
--write-dicom`` (with ``--burned-in redact`` when Tesseract is installed and ``--full``),
``train`` (the tiny experiment), ``evaluate`` (the run and, with ``--full``, the exported model),
``export``, ``score --data`` and ``score --input`` (a CSV of raw archive files and raw reports),
the review queue's CSV export and the review page, ``serve`` on 127.0.0.1 (requests with raw
canary text, a malformed body and an unknown model name carrying canaries), and ``compare``.
Every file under the work folder (MLflow store and artifacts, TensorBoard events and projector
files, data card and its repository copy, REPORT.json and HTML, figures, SavedModel and its
assets, TensorFlow Serving files, SQLite databases, quarantine.csv, shards) and the captured
stdout and stderr of every command and every HTTP response are searched with
:class:`mmclinic.phi.scan.CanaryScanner`. A hit names the artifact and the canary's kind.

Usage: ``python reliability/canary_scan.py [--patients N] [--steps N] [--workdir DIR] [--full]``;
exits 1 on any hit (``make reliability`` runs it with ``--full``). ``tests/test_canary_scan.py``
runs a small version in ``make test``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mmclinic.phi.dicom_deid import Pseudonymizer  # noqa: E402
from mmclinic.phi.scan import Canary, CanaryScanner, ScanSummary  # noqa: E402

KEY_HEX = "6d6d636c696e69632d63616e6172792d6b6579" + "00" * 13
"""A fixed de-identification key: the pseudonyms and date shifts, hence the collision check below, repeat."""


@dataclasses.dataclass
class Archive:
    """A planted archive: its folder, the key file, the CSV of raw pairs for ``score --input``, the canaries."""

    source: Path
    key_file: Path
    pairs_csv: Path
    canaries: list[Canary]
    patients: int
    studies: int
    images: int

    @property
    def kinds(self) -> set[str]:
        return {c.kind for c in self.canaries}


def _code(i: int) -> str:
    letters = string.ascii_lowercase
    return letters[(i // 676) % 26] + letters[(i // 26) % 26] + letters[i % 26]


def _identity(i: int) -> dict[str, str]:
    """Patient ``i``'s canary identity: distinctive made-up words and IDs."""
    c = _code(i)
    cu = c.upper()
    return {
        "family": f"Quzwyk{c}", "given": f"Vexqel{c}", "patient_id": f"MRN7Q{cu}{i:03d}Z9K",
        "other_id": f"OPQX{cu}{i:03d}W8", "other_seq_id": f"OSQX{cu}{i:03d}J5", "issuer": f"Qirvane{c} Registry",
        "institution_word": f"Xyloquent{c}", "city": f"Vexqorbury{c}",
        "inst_street": f"Quorblex{c}", "street": f"Dravenhill{c}", "town": f"Marrowick{c}",
        "zip": f"{12400 + i:05d}", "phone": f"617-{200 + i % 700:03d}-{4000 + i:04d}",
        "phone2": f"508-{300 + i % 600:03d}-{5100 + i:04d}",
        "ssn": f"{601 + i % 300:03d}-{17 + i % 80:02d}-{3000 + i:04d}",
        "email": f"qzmbox{c}{i:03d}@zqxmail.org",
        "referring": f"Plimzorth{c}", "performing": f"Gryxwald{c}", "operator": f"Thessvin{c}",
        "reader": f"Corvantis{c}", "requesting": f"Brevlorn{c}", "text_name": f"Trelvask{c}",
        "text_name2": f"Ostrevik{c}", "text_inst": f"Brannoch{c}", "text_city": f"Dunmerrow{c}",
        "place": f"Kelvorth{c}", "text_mrn": f"TXQ{cu}{i:03d}M4", "text_acc": f"AXQZ{cu}{i:03d}",
        "station": f"STQZ{cu}{i:03d}", "serial": f"SNQZ{cu}{i:03d}X4", "private": f"PRVQZ{cu}{i:03d}",
        "ae_title": f"AEQZ{cu}{i:03d}", "comment_word": f"Zelmorak{c}",
    }


_TEXT_CANARIES = [  # (kind, identity field)
    ("patient_name", "family"), ("patient_name", "given"), ("patient_id", "patient_id"),
    ("other_patient_id", "other_id"), ("other_patient_ids_sequence", "other_seq_id"),
    ("issuer_of_patient_id", "issuer"), ("institution", "institution_word"), ("institution_city", "city"),
    ("institution_address", "inst_street"), ("patient_address", "street"), ("patient_town", "town"),
    ("email", "email"), ("referring_physician", "referring"), ("performing_physician", "performing"),
    ("operator", "operator"), ("reading_physician", "reader"), ("requesting_physician", "requesting"),
    ("text_signature_name", "text_name"), ("text_titled_name", "text_name2"), ("text_institution", "text_inst"),
    ("text_institution_city", "text_city"), ("text_place", "place"), ("text_mrn", "text_mrn"),
    ("text_accession", "text_acc"), ("station_name", "station"), ("device_serial", "serial"),
    ("private_tag", "private"), ("source_ae_title", "ae_title"), ("image_comments", "comment_word"),
]
_DIGIT_CANARIES = [("patient_phone", "phone"), ("text_phone", "phone2"), ("ssn", "ssn")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dates_clear(dates: dict[str, list[dt.date]], shifts: dict[str, int], taken: set[dt.date]) -> bool:
    """No study date, moved by its patient's shift, lands on any canary date (that would be a false hit)."""
    for pid, days in dates.items():
        for d in days:
            if d + dt.timedelta(days=shifts[pid]) in taken:
                return False
    return True


def _report(ident: dict[str, str], acc: str, birth: dt.date, prior: dt.date, talk: dt.date, old: bool,
            synth_text: str, sex_word: str) -> str:
    """A report with the synthetic findings and a canary in the shape of every de-identification rule."""
    lines = synth_text.splitlines()
    exam = next((ln for ln in lines if ln.startswith("EXAM:")), "EXAM: Chest radiograph.")
    findings = next((ln for ln in lines if ln.startswith("FINDINGS:")), "FINDINGS: No acute findings.")
    impression = next((ln for ln in lines if ln.startswith("IMPRESSION:")), "IMPRESSION: Normal.")
    fam, giv = ident["family"], ident["given"]
    age = "103-year-old" if old else "67-year-old"
    area, rest = ident["phone2"][:3], ident["phone2"][4:]
    return "\n".join([
        exam,
        f"Patient: {fam.upper()}, {giv.upper()}   MRN: {ident['patient_id']}   DOB: {birth.strftime('%m/%d/%Y')}",
        f"Name: {fam}^{giv}. Accession: {acc}. Acc# {ident['text_acc']}. MR# {ident['text_mrn']}.",
        f"HISTORY: {age} {sex_word} {'aged 103 ' if old else ''}with cough. Patient lives in {ident['place']}.",
        f"COMPARISON: {prior.strftime('%B')} {prior.day}, {prior.year}.",
        findings.replace("FINDINGS: ", f"FINDINGS: Compared with the study of {prior.strftime('%m/%d/%Y')} at "
                                       f"{ident['text_inst']} Medical Center, {ident['text_city']}, Ohio. ", 1),
        impression,
        f"Findings discussed with Dr. {ident['text_name2']} by telephone at ({area}) {rest} on "
        f"{talk.day} {talk.strftime('%B')} {talk.year}.",
        f"Referred from {ident['institution_word']} General Hospital, {ident['city']}. "
        f"Referring physician: Dr. {ident['referring']}.",
        f"Home address: {4417 + int(ident['zip']) % 100} {ident['street']} Street, {ident['town']}, NY {ident['zip']}. "
        f"SSN {ident['ssn']}. Contact {ident['email']}. Tel: {ident['phone']}.",
        f"Electronically signed by: {ident['text_name']} Morrow, MD",
    ])


def plant_archive(out: str | Path, patients: int = 12, seed: int = 11, size: int = 64) -> Archive:
    """Write a canary archive to ``out``: ``out/source`` (DICOM tree + reports.csv + labels.csv),
    ``out/deid.key`` and ``out/pairs.csv`` (raw files and raw reports for ``score --input``)."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from mmclinic.data.synth import synthesize

    out = Path(out)
    synth = out / "synth"
    synthesize(synth, patients=patients, seed=seed, size=size)
    source = out / "source"
    (source / "dicom").mkdir(parents=True)
    key_file = out / "deid.key"
    key_file.write_text(KEY_HEX + "\n")
    pseudo = Pseudonymizer(bytes.fromhex(KEY_HEX))
    rng = random.Random(seed)

    with open(synth / "reports.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r["patient_id"], len(order))
    idents = {mrn: _identity(i) for mrn, i in order.items()}

    # Dates: births 1920-1935, studies 2016-2023, all distinct; no shifted study date may equal a canary date.
    while True:
        births = {mrn: dt.date(1920 + i % 16, 1 + (i * 5) % 12, 1 + (i * 7) % 28) for mrn, i in order.items()}
        study_dates: dict[str, list[dt.date]] = {}
        talk_dates: list[dt.date] = []
        for r in rows:
            study_dates.setdefault(r["patient_id"], []).append(
                dt.date(2016, 1, 1) + dt.timedelta(days=rng.randrange(0, 8 * 365)))
            talk_dates.append(dt.date(2016, 1, 1) + dt.timedelta(days=rng.randrange(0, 8 * 365)))
        for days in study_dates.values():
            days.sort()
        every = [*births.values(), *talk_dates, *(d for v in study_dates.values() for d in v)]
        prior_dates = {mrn: days[0] - dt.timedelta(days=rng.randrange(30, 900)) for mrn, days in study_dates.items()}
        every += list(prior_dates.values())
        shifts = {mrn: pseudo.date_shift_days(pseudo.patient(idents[mrn]["patient_id"])) for mrn in order}
        if len(set(every)) == len(every) and _dates_clear(study_dates, shifts, set(every)):
            break

    canaries: list[Canary] = []
    for mrn, ident in idents.items():
        canaries += [Canary(kind, ident[field]) for kind, field in _TEXT_CANARIES]
        canaries += [Canary(kind, ident[field], "digits") for kind, field in _DIGIT_CANARIES]
        canaries.append(Canary("patient_name", f"{ident['family'].upper()}^{ident['given'].upper()}", "name"))
        canaries.append(Canary("birth_date", births[mrn].isoformat(), "date"))
        canaries.append(Canary("text_date", prior_dates[mrn].isoformat(), "date"))
        canaries += [Canary("study_date", d.isoformat(), "date") for d in study_dates[mrn]]
        canaries.append(Canary("zip_code", f"NY {ident['zip']}"))
    canaries += [Canary("text_date", d.isoformat(), "date") for d in talk_dates]
    canaries += [Canary("age_over_89", "103-year-old"), Canary("age_over_89", "aged 103"),
                 Canary("age_over_89", "103 years")]

    report_rows, pair_rows, label_map = [], [], {}
    seen: dict[str, int] = {}
    n_images = 0
    for si, r in enumerate(rows):
        mrn = r["patient_id"]
        ident, i = idents[mrn], order[mrn]
        k = seen[mrn] = seen.get(mrn, -1) + 1
        acc = f"ACCQ{_code(i).upper()}{i:03d}X{k}"
        label_map[r["accession_number"]] = acc
        study_date = study_dates[mrn][k]
        canaries += [Canary("accession", acc), Canary("study_id", f"SIDQ{_code(i).upper()}{i:03d}K{k}"),
                     Canary("study_uid", r["study_instance_uid"])]
        old = i % 3 == 0
        talk = talk_dates[si]
        files = sorted((synth / "dicom" / f"s{si:05d}").glob("*.dcm"))
        named = i % 2 == 0  # folders and files named after the patient, as some exports do
        folder = source / "dicom" / (f"{ident['family'].upper()}_{ident['given'].upper()}_{ident['patient_id']}"
                                     f"_{k}" if named else f"s{si:05d}")
        folder.mkdir()
        for v, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.PatientName = f"{ident['family'].upper()}^{ident['given'].upper()}"
            ds.PatientID = ident["patient_id"]
            ds.IssuerOfPatientID = ident["issuer"]
            ds.OtherPatientIDs = ident["other_id"]
            item = Dataset()
            item.PatientID = ident["other_seq_id"]
            item.IssuerOfPatientID = ident["issuer"]
            ds.OtherPatientIDsSequence = Sequence([item])
            ds.PatientBirthDate = births[mrn].strftime("%Y%m%d")
            ds.PatientAge = "103Y" if old else "067Y"
            ds.PatientAddress = f"{4417 + int(ident['zip']) % 100} {ident['street']} Street, {ident['town']}, NY " \
                                f"{ident['zip']}"
            ds.PatientTelephoneNumbers = ident["phone"]
            ds.AccessionNumber = acc
            ds.StudyID = f"SIDQ{_code(i).upper()}{i:03d}K{k}"
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
            ds.InstitutionName = f"{ident['institution_word']} General Hospital"
            ds.InstitutionAddress = f"{100 + i} {ident['inst_street']} Parkway, {ident['city']}"
            ds.ReferringPhysicianName = f"{ident['referring']}^Dana"
            ds.PerformingPhysicianName = f"{ident['performing']}^Morgan"
            ds.NameOfPhysiciansReadingStudy = f"{ident['reader']}^Lee"
            ds.OperatorsName = f"{ident['operator']}^Jordan"
            ds.StationName = ident["station"]
            ds.DeviceSerialNumber = ident["serial"]
            ds.ImageComments = f"Film of {ident['comment_word']}"
            ds.file_meta.SourceApplicationEntityTitle = ident["ae_title"]
            req = Dataset()
            req.RequestedProcedureID = f"RPQZ{_code(i).upper()}{i:03d}{k}"
            req.ScheduledProcedureStepID = f"SPQZ{_code(i).upper()}{i:03d}{k}"
            req.RequestingPhysician = f"{ident['requesting']}^Ada"
            ds.RequestAttributesSequence = Sequence([req])
            ref = Dataset()
            ref.PatientName = ds.PatientName
            ref.PatientID = ident["patient_id"]
            ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.1.1"
            ref.ReferencedSOPInstanceUID = ds.StudyInstanceUID
            ds.ReferencedPatientSequence = Sequence([ref])
            block = ds.private_block(0x0029, "MMCLINIC SYNTH", create=True)
            block.add_new(0x11, "LO", f"{ident['private']} {ident['family']}")
            block.add_new(0x12, "LO", ident["patient_id"])
            canaries.append(Canary("sop_instance_uid", str(ds.SOPInstanceUID)))
            canaries += [Canary("requested_procedure_id", req.RequestedProcedureID),
                         Canary("scheduled_step_id", req.ScheduledProcedureStepID)]
            name = f"{ident['patient_id']}_{k}_{v}.dcm" if named else f"i{v}.dcm"
            dest = folder / name
            ds.save_as(dest, enforce_file_format=True)
            n_images += 1
            if v == 0:
                pair_rows.append({"image_path": str(dest.relative_to(out)), "report_text": ""})
                if named and k == 0 and i % 4 == 0:  # refused files named after the patient: quarantine.csv
                    (folder / f"{ident['patient_id']}_{k}_cut.dcm").write_bytes(dest.read_bytes()[:900])
                    shutil.copyfile(dest, folder / f"{ident['family'].upper()}_{ident['given'].upper()}_copy.dcm")
        text = _report(ident, acc, births[mrn], prior_dates[mrn], talk, old, r["report_text"],
                       "woman" if "woman" in r["report_text"] else "man")
        report_rows.append({"patient_id": ident["patient_id"], "accession_number": acc,
                            "study_instance_uid": r["study_instance_uid"], "report_text": text})
        pair_rows[-1]["report_text"] = text

    with open(source / "reports.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["patient_id", "accession_number", "study_instance_uid", "report_text"])
        w.writeheader()
        w.writerows(report_rows)
    with open(synth / "labels.csv", newline="", encoding="utf-8") as fh, \
            open(source / "labels.csv", "w", newline="", encoding="utf-8") as oh:
        reader = csv.DictReader(fh)
        w = csv.DictWriter(oh, reader.fieldnames)
        w.writeheader()
        for row in reader:
            i = order[row["patient_id"]]
            w.writerow({**row, "patient_id": idents[row["patient_id"]]["patient_id"],
                        "accession_number": label_map[row["accession_number"]]})
    pairs_csv = out / "pairs.csv"
    with open(pairs_csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["image_path", "report_text"])
        w.writeheader()
        w.writerows(pair_rows)
    shutil.rmtree(synth)
    canaries = list(dict.fromkeys(canaries))  # one copy of each (ages repeat)
    return Archive(source=source, key_file=key_file, pairs_csv=pairs_csv, canaries=canaries, patients=len(order),
                   studies=len(rows), images=n_images)


# --------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass
class PipelineRun:
    """What the pipeline wrote: the work folder, the captured output of every command, the stages run."""

    work: Path
    logs: Path
    captured: Callable[[], tuple[str, str]] | None = None
    stages: list[str] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


class StageFailed(RuntimeError):
    """A command exited non-zero: names the stage and where its output was captured (never the output)."""


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1")
    return env


def _cli(run: PipelineRun, stage: str, args: list[str], cwd: Path | None = None, timeout: float = 900) -> None:
    """Run ``mmclinic ARGS`` with its stdout and stderr captured into ``logs/STAGE.{out,err}``: in a new
    process, or with ``run.captured`` set, in this one through :func:`mmclinic.cli.main` (``run.captured()``
    returns what the call printed: a test's ``capfd.readouterr``)."""
    t0 = time.monotonic()
    if run.captured is None:
        with open(run.logs / f"{stage}.out", "wb") as out, open(run.logs / f"{stage}.err", "wb") as err:
            code = subprocess.run([sys.executable, "-P", "-m", "mmclinic.cli", *args], stdout=out, stderr=err,
                                  cwd=cwd or run.work, env=_env(run.work), timeout=timeout).returncode
    else:
        from mmclinic.cli import main as cli_main

        saved_env, saved_cwd = dict(os.environ), os.getcwd()
        run.captured()  # drop what came before
        try:
            os.environ.update(_env(run.work))
            os.chdir(cwd or run.work)
            code = cli_main(args)
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            if "mlflow" in sys.modules:  # MLflow keeps the last URI it was given: hand back the caller's
                import mlflow

                from mmclinic.tracking import tracking_uri

                mlflow.set_tracking_uri(tracking_uri())
            out, err = run.captured()
            (run.logs / f"{stage}.out").write_text(out, encoding="utf-8", errors="surrogateescape")
            (run.logs / f"{stage}.err").write_text(err, encoding="utf-8", errors="surrogateescape")
    run.seconds[stage] = time.monotonic() - t0
    run.stages.append(stage)
    if code != 0:
        raise StageFailed(f"stage {stage} exited {code}; its output is in {run.logs}/{stage}.err")


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            raise StageFailed(f"{log.stem} exited {proc.returncode} before listening; see {log}")
        time.sleep(0.2)
    raise StageFailed(f"{log.stem} did not start listening in {timeout:.0f} s; see {log}")


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_stage(run: PipelineRun, models: Path, dataset: Path, raw_text: str) -> None:
    """``mmclinic serve`` on a free port: status, metadata, predictions (one with raw canary text), a malformed
    body and an unknown model name carrying canaries; every response body is kept for the scan."""
    import base64

    t0 = time.monotonic()
    out_log, err_log = run.logs / "serve.out", run.logs / "serve.err"
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "mmclinic.cli", "serve", str(models), "--port", "0",
                                 "--host", "127.0.0.1", "--poll-seconds", "0"],
                                stdout=out, stderr=err, cwd=run.work, env=_env(run.work))
    try:
        port = int(_wait_for(out_log, r"http://127\.0\.0\.1:(\d+)/", proc, 300).group(1))
        png = base64.b64encode(sorted((dataset / "images").glob("*.png"))[0].read_bytes()).decode()
        ident = _identity(0)
        calls = [
            ("GET", "/healthz", None), ("GET", "/v1/models/canary", None), ("GET", "/v1/models/canary/metadata", None),
            ("POST", "/v1/models/canary:predict",
             json.dumps({"instances": [{"image_bytes": {"b64": png}, "report_text": "No acute process."}]})),
            ("POST", "/v1/models/canary:predict",
             json.dumps({"instances": [{"image_bytes": {"b64": png}, "report_text": raw_text}]})),
            ("POST", "/v1/models/canary:predict",
             json.dumps({"signature_name": "embed_text", "instances": [{"report_text": raw_text}]})),
            ("POST", "/v1/models/canary:predict", f'{{"instances": [{{"report_text": "{ident["family"]} '
                                                  f'{ident["patient_id"]}"'),  # malformed JSON
            ("POST", f"/v1/models/{ident['family']}{ident['patient_id']}:predict",
             json.dumps({"instances": [{"report_text": raw_text}]})),
            ("GET", f"/v1/models/canary/versions/1/metadata?patient={ident['patient_id']}", None),
            ("GET", "/metrics", None),
        ]
        responses = run.work / "http_responses" / "serve"
        responses.mkdir(parents=True, exist_ok=True)
        for n, (method, path, body) in enumerate(calls):
            status, data = _request(port, method, path, body.encode() if body else None)
            (responses / f"{n:02d}_{method}_{status}.bin").write_bytes(data)
            if n in (0, 3, 4) and status != 200:
                raise StageFailed(f"serve: request {n} answered {status}; see {responses}")
    finally:
        _stop(proc)
    run.seconds["serve"] = time.monotonic() - t0
    run.stages.append("serve")


def _review_stage(run: PipelineRun, db: Path) -> None:
    """The review queue: its CSV export, and the review page's queue and items over HTTP."""
    (run.work / "review").mkdir(exist_ok=True)
    _cli(run, "review_export", ["review", str(db), "--export", str(run.work / "review" / "decisions.csv")])
    t0 = time.monotonic()
    port = _free_port()
    out_log, err_log = run.logs / "review.out", run.logs / "review.err"
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "mmclinic.cli", "review", str(db), "--port", str(port)],
                                stdout=out, stderr=err, cwd=run.work, env=_env(run.work))
    try:
        _wait_for(out_log, r"review page on", proc, 120)
        responses = run.work / "http_responses" / "review"
        responses.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                status, data = _request(port, "GET", "/api/queue")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise StageFailed("review: the page did not answer in 60 s") from None
                time.sleep(0.3)
        (responses / f"queue_{status}.json").write_bytes(data)
        for path in ("/", "/decisions.csv"):
            status, page = _request(port, "GET", path)
            (responses / f"{path.strip('/') or 'index'}_{status}.bin").write_bytes(page)
        items = json.loads(data).get("items", []) if status == 200 and data[:1] in b"{[" else []
        for n, item in enumerate(items[:20]):
            for path in (f"/api/item/{item['id']}", f"/image/{item['id']}"):
                st, body = _request(port, "GET", path)
                (responses / f"item{n:02d}_{path.split('/')[1]}_{st}.bin").write_bytes(body)
    finally:
        _stop(proc)
    run.seconds["review_page"] = time.monotonic() - t0
    run.stages.append("review_page")


def _notebook_stage(run: PipelineRun, dataset: Path, models: Path, db: Path) -> None:
    """The notebooks that read a run's outputs, executed against this work folder (papermill); their
    executed copies, outputs included, are scanned with the rest."""
    import papermill

    t0 = time.monotonic()
    out = run.work / "notebooks"
    out.mkdir(exist_ok=True)
    notebooks = {"04_embeddings.ipynb": {"DEMO_DIR": str(run.work)},
                 "05_data.ipynb": {"DATASET": str(dataset)},
                 "06_scoring.ipynb": {"MODEL_BASE": str(models), "DATASET": str(dataset), "SCORES_DB": str(db)}}
    saved_env = dict(os.environ)
    try:
        os.environ.update(_env(run.work))
        for name, params in notebooks.items():
            try:
                papermill.execute_notebook(str(REPO / "notebooks" / name), str(out / name), parameters=params,
                                           cwd=str(REPO / "notebooks"), kernel_name="python3", progress_bar=False,
                                           execution_timeout=600)
            except Exception as exc:  # noqa: BLE001 - a cell's error may quote data: name the notebook only
                raise StageFailed(f"notebook {name} failed ({type(exc).__name__}); see {out / name}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    run.seconds["notebooks"] = time.monotonic() - t0
    run.stages.append("notebooks")


def tesseract_available() -> bool:
    return shutil.which("tesseract") is not None


def run_pipeline(archive: Archive, work: str | Path, *, steps: int = 20, full: bool = False,
                 burned_in: str | None = None, captured: Callable[[], tuple[str, str]] | None = None,
                 split: str = "all") -> PipelineRun:
    """Every stage on ``archive`` through the command line, writing only under ``work``.

    ``captured``: run the commands in this process (see :func:`_cli`); ``serve`` and the review page
    always run as processes of their own. ``split``: the split ``score --data`` scores."""
    work = Path(work)
    run = PipelineRun(work=work, logs=work / "logs", captured=captured)
    run.logs.mkdir(parents=True, exist_ok=True)
    # A folder laid out like the repository root: ingest copies the data card into its data_cards/.
    root = work / "checkout"
    (root / "data_cards").mkdir(parents=True)
    (root / "mmclinic").symlink_to(REPO / "mmclinic", target_is_directory=True)
    dataset = work / "dataset"
    ingest = ["ingest", str(archive.source), "--out", str(dataset), "--format", "dicom", "--deid-key-file",
              str(archive.key_file), "--write-dicom", "--max-side", "64", "--workers", "2"]
    if burned_in:
        ingest += ["--burned-in", burned_in]
    _cli(run, "ingest", ingest, cwd=root)
    experiment = REPO / "experiments" / "tiny.yaml"
    sets = [f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
            f"train.log_every={max(steps // 4, 1)}", "export.min_recall5_over_chance=0",
            "export.min_mismatch_auroc=0", "data.deterministic=true"]
    train = ["train", str(experiment), "--data", str(dataset), "--workdir", str(work / "run")]
    for s in sets:
        train += ["--set", s]
    _cli(run, "train", train)
    _cli(run, "evaluate", ["evaluate", str(work / "run"), "--data", str(dataset), "--out",
                           str(work / "eval" / "REPORT.json")])
    models = work / "models"
    _cli(run, "export", ["export", str(work / "run"), "--out", str(models), "--name", "canary"])
    if full:
        _cli(run, "evaluate_export", ["evaluate", str(models / "canary"), "--data", str(dataset), "--out",
                                      str(work / "eval_export" / "REPORT.json")])
    db = work / "scores.db"
    _cli(run, "score_data", ["score", str(models / "canary"), "--data", str(dataset), "--db", f"sqlite:///{db}",
                             "--split", split])
    _cli(run, "score_csv", ["score", str(models / "canary"), "--input", str(archive.pairs_csv), "--db",
                            f"sqlite:///{db}"])
    _review_stage(run, db)
    with open(archive.pairs_csv, newline="", encoding="utf-8") as fh:
        raw_text = next(csv.DictReader(fh))["report_text"]
    _serve_stage(run, models, dataset, raw_text)
    _cli(run, "compare", ["compare", str(work / "run"), "--out", str(work / "compare"),
                          *(["--data", str(dataset), "--boot", "50"] if full else [])])
    if full:
        _notebook_stage(run, dataset, models, db)
    return run


def scan(archive: Archive, run: PipelineRun) -> ScanSummary:
    """Every file under the work folder (logs and HTTP responses included), decompressed where cheap."""
    summary = ScanSummary()
    list(CanaryScanner(archive.canaries).scan_tree(run.work, summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--workdir", help="keep the archive and artifacts here (default: a temporary folder, removed)")
    p.add_argument("--full", action="store_true", help="also evaluate the export, compare with a paired "
                   "bootstrap, and ingest with --burned-in redact when Tesseract is installed")
    args = p.parse_args(argv)
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mmclinic-canary-"))
    if args.workdir and base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        archive = plant_archive(base / "archive", patients=args.patients, seed=args.seed)
        kinds = sorted(archive.kinds)
        print(f"planted {len(archive.canaries)} canaries of {len(kinds)} kinds in {archive.images} DICOM files, "
              f"{archive.studies} reports, {archive.patients} patients")
        control = ScanSummary()
        found = {h.kind for h in CanaryScanner(archive.canaries).scan_tree(archive.source, control)}
        found |= {h.kind for h in CanaryScanner(archive.canaries).scan_paths([archive.pairs_csv], base)}
        missing = sorted(set(kinds) - found)
        print(f"negative control: the raw archive holds {len(found)} of {len(kinds)} kinds"
              + (f"; not found: {', '.join(missing)}" if missing else ""))
        burned = "redact" if args.full and tesseract_available() else None
        if args.full and burned is None:
            print("tesseract not installed: ingest runs without --burned-in redact")
        run = run_pipeline(archive, base / "work", steps=args.steps, full=args.full, burned_in=burned)
        summary = scan(archive, run)
        print("stages: " + ", ".join(f"{s} {run.seconds.get(s, 0):.0f} s" for s in run.stages))
        print(f"scanned {summary.files} files ({summary.bytes / 2**20:.1f} MiB), {summary.members} decompressed "
              f"members, {summary.names} file and folder names, for {len(archive.canaries)} canaries in "
              f"{len(CanaryScanner(archive.canaries).forms)} forms")
        for hit in summary.hits:
            print(f"LEAK {hit}")
        print(f"{len(summary.hits)} hits in {time.monotonic() - t0:.0f} s")
        return 1 if summary.hits or missing else 0
    except StageFailed as exc:
        print(f"FAILED: {exc}")
        return 1
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
