"""Evaluation: metric functions on hand-computed cases, calibration, zero-shot, the report's
handling of small or unlabelled data (with a numpy scorer, no model), and one full evaluation
of the shared trained run (fixture) with its HTML, failure cases and MLflow artifacts."""

import hashlib
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from mmclinic.eval import calibration
from mmclinic.eval import metrics
from mmclinic.eval import zeroshot
from mmclinic.config import ConfigError, EvalConfig, config_from_dict
from mmclinic.errors import UsageError
from mmclinic.text.labels import parse_labels

# --------------------------------------------------------------------------- metric functions


def test_metric_functions_hand_cases_with_ties():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # Thresholds .8 (P=1, R=.5), .4 (P=.5), .35 (P=2/3, R=1): AP = .5 * 1 + .5 * 2/3.
    assert metrics.auprc(labels, scores) == pytest.approx(0.5 + 0.5 * 2 / 3)
    tied = np.array([0.5, 0.5, 0.5, 0.9])
    assert metrics.auroc(labels, tied) == pytest.approx(0.75)  # the tied positive-negative pairs count 1/2
    # The tie block enters at once: P = 2/4 at R = 1 (not 2/3, which an arbitrary order could give).
    assert metrics.auprc(labels, tied) == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert metrics.fpr_at_tpr(labels, tied, 0.95) == pytest.approx(1.0)
    assert metrics.auprc(np.array([0, 0]), np.array([0.1, 0.2])) is None
    assert metrics.chance_recall_at_k(4, 2, 1) == pytest.approx(0.5)
    assert metrics.chance_recall_at_k(4, 2, 2) == pytest.approx(1 - (2 / 4) * (1 / 3))
    assert metrics.chance_recall_at_k(10, [1, 1], 5) == pytest.approx(0.5)
    assert metrics.chance_mean_rank(9, 1) == pytest.approx(5.0)


def test_fast_metrics_agree_with_scikit_learn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(100):
        y = rng.integers(0, 2, 30)
        s = rng.integers(0, 6, 30).astype(float)  # many ties
        if y.min() == y.max():
            continue
        assert metrics.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert metrics.auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_paired_bootstrap_detects_a_real_difference_only():
    rng = np.random.default_rng(1)
    clusters = np.repeat(np.arange(40), 2)
    a = rng.random(80) < 0.5
    same = metrics.paired_bootstrap(lambda i: float(a[i].mean()), lambda i: float(a[i].mean()), 80, clusters, 200)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and not same["significant"] and same["p"] == 1.0
    b = a | (rng.random(80) < 0.6)
    better = metrics.paired_bootstrap(lambda i: float(a[i].mean()), lambda i: float(b[i].mean()), 80, clusters, 200)
    assert better["difference"] > 0 and better["significant"] and better["p"] < 0.05


# --------------------------------------------------------------------------- calibration


def test_ece_hand_case_and_reliability():
    labels = np.array([1, 0, 1, 1])
    probs = np.array([0.9, 0.8, 0.3, 0.1])
    # Bin [0, .5): mean p .2, outcome 1 -> .8 * 2/4; bin [.5, 1]: mean p .85, outcome .5 -> .35 * 2/4.
    assert calibration.ece(labels, probs, bins=2) == pytest.approx(0.4 + 0.175)
    rel = calibration.reliability(labels, probs, bins=2)
    assert [b["count"] for b in rel] == [2, 2] and rel[1]["fraction_matched"] == pytest.approx(0.5)
    assert calibration.ece(np.array([1.0]), np.array([1.0]), bins=10) == 0.0  # p = 1 falls in the last bin


def test_temperature_scaling_reduces_nll_on_overconfident_scores():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < calibration.sigmoid(z)).astype(int)
    over = 3.0 * z  # an overconfident model
    t = calibration.fit_temperature(y, over)
    assert t == pytest.approx(3.0, rel=0.15)
    assert calibration.nll(y, over, t) < calibration.nll(y, over) - 0.05
    assert calibration.ece(y, calibration.sigmoid(over / t)) < calibration.ece(y, calibration.sigmoid(over))
    assert calibration.fit_temperature(np.ones(5), np.arange(5.0)) is None


# --------------------------------------------------------------------------- zero-shot


def test_zero_shot_tasks_prompts_and_scores():
    labels = parse_labels(
        ['{"findings": ["pleural_effusion"]}'] * 6 + ['{"findings": []}'] * 6 + [None, "not json",
                                                                                '{"modality": "CT"}'])
    tasks, skipped = zeroshot.build_tasks(labels, min_positives=5)
    assert [t.name for t in tasks] == ["findings=pleural_effusion"]
    assert "modality=*" in skipped  # a single class
    t = tasks[0]
    assert t.positive_prompts == ["pleural effusion", "there is pleural effusion",
                                  "findings consistent with pleural effusion"]
    assert t.negative_prompts == ["no pleural effusion", "no evidence of pleural effusion"]
    # The default prompts are the config's (eval.zeroshot_*_templates), defined once.
    ev = EvalConfig()
    assert t.positive_prompts == [x.format(label="pleural effusion") for x in ev.zeroshot_positive_templates]
    assert list(t.y[:12]) == [1] * 6 + [0] * 6 and list(t.y[12:]) == [-1, -1, -1]

    pos_dir, neg_dir = np.eye(4)[0], np.eye(4)[1]

    def embed(texts):
        return np.stack([neg_dir if x.startswith("no ") else pos_dir for x in texts])

    img = np.stack([pos_dir] * 6 + [neg_dir] * 6 + [pos_dir] * 3)
    s = zeroshot.task_scores(img, t, embed)
    assert metrics.auroc(t.y[:12], s[:12]) == 1.0

    cat = parse_labels([json.dumps({"modality": m, "plane": "Axial"}) for m in ["CT"] * 5 + ["MR"] * 5])
    tasks, skipped = zeroshot.build_tasks(cat, min_positives=5, class_templates=("a {value} image of the {key}",))
    assert [t.name for t in tasks] == ["modality=CT", "modality=MR"] and "plane=*" in skipped
    assert tasks[0].positive_prompts == ["a CT image of the modality"]
    few, skipped = zeroshot.build_tasks(cat, min_positives=6)
    assert not few and "6" in skipped["modality=CT"]


def test_eval_config_templates_override_and_validation():
    cfg = config_from_dict({"eval": {"zeroshot_positive_templates": ["{label} is seen"], "min_slice_size": 3}})
    assert cfg.eval.zeroshot_positive_templates == ("{label} is seen",) and cfg.eval.min_slice_size == 3
    with pytest.raises(ConfigError, match="eval.zeroshot_negative_templates"):
        config_from_dict({"eval": {"zeroshot_negative_templates": ["nothing here"]}})
    with pytest.raises(ConfigError, match="eval.calibration_bins"):
        config_from_dict({"eval": {"calibration_bins": 0}})


# --------------------------------------------------------------------------- compute_report without a model


def _word_vec(word: str, dim: int = 48) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big")
    return np.random.default_rng(seed).normal(size=dim)


class BagOfWordsScorer:
    """A numpy scorer: a text is the mean of its words' vectors; an image is its report's text
    vector plus noise. Cheap, deterministic and better than chance."""

    def __init__(self, image_text: dict[bytes, str], noise: float = 0.3) -> None:
        self.image_text, self.noise = image_text, noise

    def embed_texts(self, texts):
        out = []
        for t in texts:
            words = re.findall(r"[a-z]+", t.lower()) or ["empty"]
            v = np.mean([_word_vec(w) for w in words], axis=0)
            out.append(v / np.linalg.norm(v))
        return np.stack(out) if out else np.zeros((0, 48))

    def embed_images(self, png):
        base = self.embed_texts([self.image_text[p] for p in png])
        rng = np.random.default_rng(len(png))
        v = base + self.noise * rng.normal(size=base.shape) / np.sqrt(base.shape[1])
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def match_logits(self, image_emb, text_emb):
        return 8.0 * np.sum(image_emb * text_emb, axis=1) - 4.0


REPORTS = [
    "There is a left pleural effusion. No pneumothorax.",
    "Large right apical pneumothorax. No pleural effusion.",
    "Cardiomegaly is present. No focal consolidation.",
    "No acute cardiopulmonary process.",
    "Normal chest radiograph.",
    "Consolidation in the right lower lobe. 1. Consolidation in the right lower lobe.",
    "A left upper zone nodule is noted.",
    "Moderate right pleural effusion with blunting of the right costophrenic angle.",
]


def _split(n_images: int, labels: bool = True, duplicate: bool = False):
    from mmclinic.eval.embedding import SplitData

    rows, png, texts = [], [], []
    for i in range(n_images):
        r = i % len(REPORTS)
        text = REPORTS[r] if not (duplicate and r == 4) else "No acute cardiopulmonary process [NAME]."
        rid = f"R{r:03d}" + ("d" if duplicate and r == 4 else "")
        finding = {0: ["pleural_effusion"], 1: ["pneumothorax"], 2: ["cardiomegaly"], 5: ["consolidation"],
                   6: ["nodule"], 7: ["pleural_effusion"]}.get(r, [])
        rows.append({"image_id": f"I{i:03d}", "patient_key": f"P{i // 2:03d}", "study_key": f"S{i:03d}",
                     "report_id": f"{rid}-{i // len(REPORTS)}", "view": "PA" if i % 3 else "AP",
                     "modality": "DX", "sex": "F" if i % 2 else "M", "age_band": "40-49",
                     "manufacturer": "Acme", "laterality": "U", "source_format": "dicom",
                     **({"labels": json.dumps({"findings": finding})} if labels else {})})
        png.append(f"image-{i}".encode())
        texts.append(text)
    meta = pd.DataFrame(rows)
    return SplitData(png=png, texts=texts, meta=meta), BagOfWordsScorer(dict(zip(png, texts)))


def _no_nan(report):
    json.dumps(report, allow_nan=False)  # raises on NaN or infinity anywhere


def test_compute_report_full_structure_on_a_numpy_scorer():
    from mmclinic.eval.evaluate import compute_report, headline

    data, scorer = _split(48)
    ev = EvalConfig(zeroshot_min_positives=3, min_slice_size=10)
    details = {}
    rep = compute_report(scorer, data, boot=30, seed=0, threshold=0.0, config=ev, temperature=2.0, details=details)
    _no_nan(rep)
    ret = rep["retrieval"]
    for block in (ret, ret["dedup"], ret["report_equivalent"]):
        for direction in ("image_to_text", "text_to_image"):
            for k in ("R@1", "R@5", "R@10", "median_rank", "mean_rank"):
                assert set(block[direction][k]) >= {"value", "ci95"}
    # Every text occurs 6 times: in the instance pool the 5 identical copies tie with (and so rank above)
    # the true report; the de-duplicated pool removes them.
    assert ret["image_to_text"]["R@5"]["value"] == 0.0 and ret["pools"]["dedup"]["unique_reports"] == 8
    assert ret["dedup"]["image_to_text"]["R@1"]["value"] > 3 * ret["dedup"]["image_to_text"]["R@1"]["chance"]
    mm = rep["mismatch"]
    assert set(mm["by_corruption"]) == {"other_patient_different_findings", "other_patient_same_findings",
                                        "same_patient_other_study", "laterality_swap", "negation", "finding_swap"}
    assert mm["by_corruption"]["same_patient_other_study"]["pairs"] > 0  # two studies per patient
    assert mm["auroc"]["value"] > 0.6 and mm["auroc"]["ci95"][0] <= mm["auroc"]["value"] <= mm["auroc"]["ci95"][1]
    assert mm["operating_point"]["threshold"] == 0.0 and "sensitivity_by_corruption" in mm["operating_point"]
    cal = rep["calibration"]
    assert cal["ece"]["value"] is not None and cal["temperature_scaling"]["temperature"] == 2.0
    assert len(cal["reliability"]) == ev.calibration_bins
    zs = rep["zero_shot"]
    assert "findings=pleural_effusion" in zs["tasks"] and zs["macro_auroc"]["value"] is not None
    assert rep["slices"]["view=PA"]["image_to_text_R@5"]["value"] is not None
    assert rep["slices"]["sex=F"]["images"] == 24 and rep["slices"]["sex=F"]["ece"]["value"] is not None
    assert "mismatch.negation.auroc" in headline(rep) and "zero_shot.macro_auroc" in headline(rep)
    assert len(details["i2t"]) == 48 and len(details["logits"]) == len(details["cset"].text)


def test_dedup_pool_sizes_on_a_hand_made_case():
    from mmclinic.eval.evaluate import compute_report

    # 8 images, 8 reports; one report is a normal text another patient also has (same normalised text).
    data, scorer = _split(8, duplicate=True)
    data.texts[3] = "No acute cardiopulmonary process."  # R003
    data.texts[4] = "No acute cardiopulmonary process [NAME]."  # R004d: the same after normalisation
    scorer.image_text = dict(zip(data.png, data.texts))
    rep = compute_report(scorer, data, boot=0, config=EvalConfig(min_slice_size=100))
    ret = rep["retrieval"]
    assert ret["pools"]["instance"] == {"images": 8, "reports": 8}
    assert ret["pools"]["dedup"] == {"images": 8, "unique_reports": 7, "duplicate_reports": 1}
    assert ret["image_to_text"]["pool_size"] == 8 and ret["dedup"]["image_to_text"]["pool_size"] == 7
    assert ret["dedup"]["text_to_image"]["queries"] == 7 and ret["text_to_image"]["queries"] == 8
    assert ret["dedup"]["image_to_text"]["R@1"]["chance"] == pytest.approx(1 / 7)
    # Report-equivalent hits are a superset of exact hits in the same pool.
    assert ret["report_equivalent"]["image_to_text"]["R@1"]["value"] >= ret["image_to_text"]["R@1"]["value"]
    assert ret["report_equivalent"]["image_to_text"]["pool_size"] == 8


def test_small_or_unlabelled_data_is_marked_not_computed():
    from mmclinic.eval.evaluate import compute_report

    data, scorer = _split(2, labels=False)
    rep = compute_report(scorer, data, boot=20, config=EvalConfig())
    _no_nan(rep)
    assert "needs at least 3" in rep["retrieval"]["image_to_text"]["R@5"]["not_computed"]
    assert rep["mismatch"]["auroc"]["value"] is None and rep["mismatch"]["auroc"]["not_computed"]
    assert rep["zero_shot"] == {"not_computed": "the manifest has no 'labels' column"}
    assert all("not_computed" in s for s in rep["slices"].values())
    assert rep["calibration"]["temperature_scaling"]["not_computed"]
    other = rep["mismatch"]["by_corruption"]["other_patient_different_findings"]  # a single patient
    assert other["pairs"] == 0 and "no pair of this kind" in other["not_computed"]

    data, scorer = _split(16)
    rep = compute_report(scorer, data, boot=20, config=EvalConfig(zeroshot_min_positives=5))
    _no_nan(rep)
    assert rep["zero_shot"]["macro_auroc"]["value"] is None and rep["zero_shot"]["skipped"]
    assert rep["slices"]["view=AP"]["not_computed"].startswith("fewer than 10 images")
    with pytest.raises(UsageError, match="empty"):
        compute_report(scorer, _split(0)[0], boot=0)


# --------------------------------------------------------------------------- one full evaluation of a trained run


@pytest.fixture(scope="module")
def labelled_dataset(dataset, synth_source, tmp_path_factory):
    """A copy of the shared dataset fixture whose manifest has the ``labels`` column, from the synthetic
    source's labels.csv joined through the study pseudonym (same key as the fixture's)."""
    from mmclinic.phi.dicom_deid import Pseudonymizer, load_or_create_key

    out = tmp_path_factory.mktemp("labelled") / "ds"
    shutil.copytree(dataset, out)
    pseudo = Pseudonymizer(load_or_create_key(dataset.parent / "key.hex"))
    truth = pd.read_csv(synth_source / "labels.csv", dtype=str)
    by_study: dict[str, list[str]] = {}
    for row in truth.itertuples():
        names = by_study.setdefault(pseudo.study(row.study_instance_uid), [])
        if row.finding != "no_finding" and row.finding not in names:
            names.append(row.finding)
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert manifest["study_key"].isin(by_study).all()
    manifest["labels"] = [json.dumps({"findings": sorted(by_study[s])}) for s in manifest["study_key"]]
    manifest.to_parquet(out / "manifest.parquet", index=False)
    return out


@pytest.mark.slow
def test_evaluate_writes_report_html_failure_cases_and_logs_them(trained_run, labelled_dataset, tmp_path):
    import mlflow

    from mmclinic.eval.evaluate import evaluate

    out = tmp_path / "eval" / "REPORT.json"
    report = evaluate(trained_run, labelled_dataset, "test", out)
    saved = json.loads(out.read_text())
    _no_nan(saved)
    for direction in ("image_to_text", "text_to_image"):
        for k in ("R@1", "R@5", "R@10", "median_rank"):
            assert set(saved["retrieval"][direction][k]) >= {"value", "ci95"}
        assert saved["retrieval"]["dedup"][direction]["pool_size"] > 0
    assert {"auroc", "auprc", "fpr_at_95tpr", "by_corruption"} <= set(saved["mismatch"])
    assert saved["calibration"]["temperature_scaling"]["fitted_on"] == "val"
    zs = saved["zero_shot"]
    assert zs["label_source"] == "manifest column 'labels'" and (zs["tasks"] or zs["skipped"])
    assert saved["retrieval"]["report_equivalent"]["findings_source"] == "manifest labels"

    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "http://" not in html and "https://" not in html
    cases = pd.read_parquet(tmp_path / "eval" / "failure_cases.parquet")
    assert {"image_id", "report_id", "rank", "score", "corruption", "report_snippet", "thumbnail"} <= set(cases.columns)
    assert set(cases["case"]) == {"retrieval", "mismatch"}
    assert cases.loc[cases["case"] == "retrieval", "rank"].is_monotonic_decreasing
    assert (tmp_path / "eval" / cases["thumbnail"].dropna().iloc[0]).is_file()
    assert "data:image/png;base64," in (tmp_path / "eval" / "failure_cases.html").read_text()
    manifest_ids = set(pd.read_parquet(labelled_dataset / "manifest.parquet")["image_id"])
    assert set(cases["image_id"]) <= manifest_ids
    latest = json.loads((trained_run / "eval" / "latest.json").read_text())
    assert json.loads((trained_run / "eval" / latest["report"]).read_text())["counts"] == report["counts"]

    client = mlflow.MlflowClient()
    run_id = (trained_run / "mlflow_run_id").read_text().strip()
    names = {a.path for a in client.list_artifacts(run_id, "evaluation/test")}
    assert {"evaluation/test/REPORT.json", "evaluation/test/report.html",
            "evaluation/test/failure_cases.parquet"} <= names
    logged = client.get_run(run_id).data.metrics
    assert "eval.test.mismatch.negation.auroc" in logged and "eval.test.calibration.ece" in logged


@pytest.mark.slow
def test_evaluate_refuses_a_run_without_checkpoint_and_an_empty_split(trained_run, dataset, tmp_path):
    from mmclinic.eval.evaluate import evaluate

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.yaml", "vocab.txt", "run.json"):
        shutil.copy(trained_run / name, bare / name)
    with pytest.raises(UsageError, match="no checkpoint"):
        evaluate(bare, dataset, "test", tmp_path / "r.json")
    empty = tmp_path / "ds"
    shutil.copytree(dataset, empty)
    m = pd.read_parquet(empty / "manifest.parquet")
    m[m["split"] != "test"].to_parquet(empty / "manifest.parquet", index=False)
    with pytest.raises(UsageError, match="split .* is empty"):
        evaluate(trained_run, empty, "test", tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
