"""One report, one score on every path: evaluation's scorers (the run's Keras model and the SavedModel),
`mmclinic score --input`, `mmclinic serve` over REST and a plain tf.saved_model.load in another process
all make the model text with the same function (mmclinic.text.model_text)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5

RAW_REPORTS = [
    "EXAM: Chest PA and lateral.\nINDICATION: Cough, seen by Dr. Jane Smith on 03/14/2024.\n"
    "FINDINGS:   The heart is  normal in size.\n\n  Lungs   are clear. XXXX XXXX  XXXX.\nIMPRESSION: Normal chest.",
    "INDICATION: fever\nCOMPARISON: 01/02/2023\nFINDINGS: Small left pleural effusion.\nIMPRESSION: Left effusion.",
    "FINDINGS: LARGE RIGHT PNEUMOTHORAX WITH MEDIASTINAL SHIFT. IMPRESSION: TENSION PNEUMOTHORAX. "
    "DISCUSSED WITH DR. JONES AT 14:00.",
    "clinical history: 72-year-old with dyspnea. findings: cardiomegaly. impression: cardiomegaly, no edema.",
    "Findings: Right lower lobe consolidation.\tImpression:\u00a0Pneumonia.\r\nSigned by: Robert Brown, MD",
    "HISTORY: MRN: 12345678, accession A99812.\nFINDINGS: Left upper lobe nodule, 8 mm.\nIMPRESSION: Nodule.",
    "REASON FOR EXAM: line placement. TECHNIQUE: AP portable. FINDINGS: Right IJ catheter tip in the SVC. "
    "CONCLUSION: Satisfactory line position.",
    "Lungs are clear. No effusion. Call 555-123-4567 with questions.",
    "REPORT: Endotracheal tube 4 cm above the carina. OPINION: Tube in good position.",
    "FINDINGS: XXXX-XXXX XXXX opacity in the XXXX lobe. IMPRESSION: XXXX.",
    "COMPARISON: None. FINDINGS: Pacemaker leads in the right atrium and ventricle. IMPRESSION: Pacemaker.",
    "INDICATIONS: Trauma.\nFINDINGS: Fractures of the left 5th and 6th ribs. Report sent to a.b@example.org.\n"
    "IMPRESSIONS: Left rib fractures.",
    "EXAMINATION: CHEST 2V. FINDINGS: Normal heart size. Normal mediastinum. CONCLUSIONS: Normal.",
    "Findings: one finding. Findings: another. Impression: first. Summary: second.",
    "FINDINGS: Mild interstitial edema. IMPRESSION: Mild CHF. Dictated 2024-03-15 by Dr. Alan Turing.",
    "INDICATION: follow-up. FINDINGS: Resolving right middle lobe pneumonia. IMPRESSION: Improving. "
    "Patient: John Doe, DOB March 3, 1950.",
    "  \n  FINDINGS:\n\n\nNo acute abnormality.\n\n",
    "HISTORY: cough.\nFINDINGS: The cardiomediastinal silhouette is within normal limits. IMPRESSION: Negative.",
    "FINDINGS: Heart XXXX XXXX normal. Visit www.example.org/report for images. IMPRESSION: Normal.",
    "Small left pleural effusion.",
]


def _post(httpd, path, body):
    conn = http.client.HTTPConnection(*httpd.server_address[:2], timeout=120)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    assert resp.status == 200, raw[:200]
    return json.loads(raw)


_PLAIN_LOAD = r"""
import base64, json, sys
import tensorflow as tf, tensorflow_text  # noqa: F401
job = json.load(open(sys.argv[1]))
m = tf.saved_model.load(job["model"])
out = m.signatures["serving_default"](image_bytes=tf.constant([base64.b64decode(p) for p in job["png"]]),
                                      report_text=tf.constant(job["texts"]))
print(json.dumps({"match_score": out["match_score"].numpy().tolist(),
                  "match_logit": out["match_logit"].numpy().tolist()}))
"""


@pytest.fixture(scope="module")
def paths(exported_model, trained_run, dataset, tmp_path_factory):
    """Match scores of RAW_REPORTS (each with one of the dataset's images) by every path."""
    import sqlalchemy as sa

    from mmclinic.data.images import read_image, to_png_bytes
    from mmclinic.eval.scorers import RunScorer, SavedModelScorer
    from mmclinic.serve.scoring import score
    from mmclinic.serve.server import make_http_server

    work = tmp_path_factory.mktemp("parity")
    images = sorted((dataset / "images").glob("*.png"))[:len(RAW_REPORTS)]
    image_paths = [images[i % len(images)] for i in range(len(RAW_REPORTS))]
    # The bytes `score --input` sends for a file: read_image, then PNG (every path gets the same bytes).
    png = [to_png_bytes(read_image(p).pixels, 1024) for p in image_paths]
    sig = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))  # noqa: E731
    got: dict[str, np.ndarray] = {}

    for name, scorer in (("SavedModelScorer", SavedModelScorer(exported_model.path)),
                         ("RunScorer", RunScorer(trained_run))):
        img, txt = scorer.embed_images(png), scorer.embed_texts(RAW_REPORTS)
        got[name] = sig(scorer.match_logits(img, txt))

    import pandas as pd

    csv = work / "pairs.csv"
    pd.DataFrame({"image_path": [str(p) for p in image_paths], "report_text": RAW_REPORTS,
                  "pair_id": [f"p{i:02d}" for i in range(len(RAW_REPORTS))]}).to_csv(csv, index=False)
    db = f"sqlite:///{work / 'scores.db'}"
    result = score(exported_model.path, input_csv=csv, db=db)
    assert result.pairs == len(RAW_REPORTS) and result.failed == 0
    with sa.create_engine(db).connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT pair_id, match_score FROM pair_scores")).fetchall())
    got["score --input"] = np.array([rows[f"p{i:02d}"] for i in range(len(RAW_REPORTS))])

    httpd = make_http_server(exported_model.path.parent.parent, "127.0.0.1", 0, max_batch=64, max_body_mb=16,
                             log=io.StringIO())
    if hasattr(httpd, "start"):  # returns once the server accepts connections
        httpd.start()
    else:
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        body = {"instances": [{"image_bytes": {"b64": base64.b64encode(b).decode()}, "report_text": t}
                              for b, t in zip(png, RAW_REPORTS)]}
        preds = _post(httpd, f"/v1/models/{exported_model.path.parent.name}:predict", body)["predictions"]
        got["serve REST"] = np.array([p["match_score"] for p in preds])
    finally:
        httpd.shutdown()
        httpd.server_close()

    job = work / "job.json"
    job.write_text(json.dumps({"model": str(exported_model.path), "texts": RAW_REPORTS,
                               "png": [base64.b64encode(b).decode() for b in png]}))
    proc = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(job)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    got["tf.saved_model.load"] = np.array(plain["match_score"])
    return got, png


def test_every_path_gives_the_same_match_score(paths):
    got, _ = paths
    reference = got["tf.saved_model.load"]
    assert len(reference) == len(RAW_REPORTS) and np.all(np.isfinite(reference))
    diffs = {name: float(np.max(np.abs(scores - reference))) for name, scores in got.items()}
    print("max |difference| to a plain tf.saved_model.load:", json.dumps(diffs))
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_the_graph_makes_the_text_the_python_function_makes(exported_model):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from mmclinic.text.model_text import TextConfig, model_text

    info = json.loads((exported_model.path / "assets.extra" / "mmclinic.json").read_text())
    cfg = TextConfig.from_dict(info["text"])
    loaded = tf.saved_model.load(str(exported_model.path))
    in_graph = loaded.signatures["model_text"](report_text=tf.constant(RAW_REPORTS))["model_text"].numpy()
    assert [t.decode() for t in in_graph] == model_text(RAW_REPORTS, cfg)
    assert "Turing" not in in_graph[14].decode() and "[DATE]" in in_graph[14].decode()


def test_text_config_is_carried_into_the_export(exported_model, dataset):
    from mmclinic.artifacts import DatasetDir

    info = json.loads((exported_model.path / "assets.extra" / "mmclinic.json").read_text())
    assert info["text"] == DatasetDir(dataset).info()["text"]
    assert info["text_out_of_graph"]
    card = (exported_model.path / "assets.extra" / "model_card.md").read_text()
    assert "## Report text" in card and "Not applied in the graph" in card


def test_dataset_texts_score_as_they_did_in_training(exported_model, dataset):
    """The dataset's texts are fixed points of the model text: the graph applying it again changes nothing."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from mmclinic.artifacts import DatasetDir

    texts = DatasetDir(dataset).reports()["text"].tolist()[:64]
    loaded = tf.saved_model.load(str(exported_model.path))
    out = loaded.signatures["model_text"](report_text=tf.constant(texts))["model_text"].numpy()
    assert [t.decode() for t in out] == texts


def test_ingest_makes_the_text_the_graph_makes_of_the_raw_report():
    """Ingest de-identifies with every rule, then makes the model text; for identifiers of the kinds the graph's
    rules cover, the graph makes the same text of the raw report (the corpus holds only such identifiers)."""
    from mmclinic.phi.text_deid import deidentify_text
    from mmclinic.text.model_text import model_text

    for policy in ("both", "findings"):
        assert model_text([deidentify_text(t) for t in RAW_REPORTS], policy) == model_text(RAW_REPORTS, policy)
