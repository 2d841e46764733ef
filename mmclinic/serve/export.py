"""``mmclinic export``: vet a run, then write a SavedModel in TensorFlow Serving's layout.

The SavedModel carries its preprocessing: image decoding and resizing, and the
report tokenizer, are in the graph. Signatures:

- ``serving_default(image_bytes: string[N], report_text: string[N])`` ->
  ``match_score`` (probability that the report belongs with the image), ``match_logit``,
  ``similarity`` (cosine of the two embeddings)
- ``embed_image(image_bytes)``, ``embed_text(report_text)``, ``match_embeddings(image_emb, text_emb)``
- ``model_text(report_text)``: the text the model sees for a raw report
- ``score_tokens(image_bytes, token_ids, padding_mask)`` for servers without TF-Text ops.

``report_text`` is the raw report: the graph applies the run's text definition
(:func:`mmclinic.text.model_text.model_text_graph`: the de-identification rules RE2 can
express, sections, the run's text policy, normalisation) before tokenizing, the same
function ingest, training, evaluation and ``mmclinic score`` use. The rules it cannot apply
are listed in the model card and ``docs/SERVING_CLIENTS.md``.

Loading needs ``import tensorflow_text`` (the tokenizer's ops); TensorFlow Serving's
official build links them.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic.artifacts import DatasetDir, ExportedModel, ModelFolder, RunDir
from mmclinic.errors import UsageError, VettingFailed
from mmclinic.text.model_text import GRAPH_RULES, OUT_OF_GRAPH, TextConfig, model_text_graph


@dataclass(frozen=True)
class ExportResult:
    path: Path
    version: int
    checks: dict[str, Any]
    tflite: dict[str, Any] | None = None
    """The TFLite figures (:func:`mmclinic.serve.tflite.quantize`) when towers were asked for."""


def build_serving_module(model, vocab: "list[str] | Any", image_size: int, max_length: int,
                         text_config: TextConfig | None = None):
    """The exported signatures over ``model``; report text goes through ``text_config``'s model text
    (:func:`mmclinic.text.model_text.model_text_graph`) before the tokenizer: a ReportTokenizer on
    ``vocab`` (a list), or ``vocab`` itself when it is a tokenizer (a checkpoint's own, see
    :func:`mmclinic.models.tokenizers.make_tokenizer`)."""
    import tensorflow as tf

    from mmclinic.data.preprocess import decode_image
    from mmclinic.text.tokenizer import ReportTokenizer

    text_config = text_config or TextConfig()

    class ServingModule(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="mmclinic")
            self.model = model
            # A run's vocabulary, or a tokenizer (a checkpoint's own, see mmclinic.models.tokenizers.make_tokenizer).
            self.tokenizer = ReportTokenizer(list(vocab), max_length) if isinstance(vocab, (list, tuple)) else vocab
            self.image_size = tf.constant(image_size)

        def _images(self, image_bytes):
            imgs = tf.map_fn(lambda b: decode_image(b, image_size), image_bytes, fn_output_signature=tf.float32)
            return self.model.encode_image(imgs, training=False)

        def _texts(self, report_text):
            ids, mask = self.tokenizer(model_text_graph(report_text, text_config))
            return self.model.encode_text(ids, mask, training=False)

        def _pair(self, img, txt):
            logit = self.model.match_logits(img, txt)
            return {"match_score": tf.sigmoid(logit), "match_logit": logit,
                    "similarity": tf.reduce_sum(img * txt, axis=-1)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                      tf.TensorSpec([None], tf.string, name="report_text")])
        def serve(self, image_bytes, report_text):
            return self._pair(self._images(image_bytes), self._texts(report_text))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def embed_image(self, image_bytes):
            return {"image_emb": self._images(image_bytes)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="report_text")])
        def embed_text(self, report_text):
            return {"text_emb": self._texts(report_text)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="report_text")])
        def model_text(self, report_text):
            return {"model_text": model_text_graph(report_text, text_config)}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="image_emb"),
                                      tf.TensorSpec([None, None], tf.float32, name="text_emb")])
        def match_embeddings(self, image_emb, text_emb):
            return self._pair(image_emb, text_emb)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                      tf.TensorSpec([None, max_length], tf.int32, name="token_ids"),
                                      tf.TensorSpec([None, max_length], tf.bool, name="padding_mask")])
        def score_tokens(self, image_bytes, token_ids, padding_mask):
            return self._pair(self._images(image_bytes), self.model.encode_text(token_ids, padding_mask))

    return ServingModule()


def save_serving_model(module, path: Path) -> None:
    import tensorflow as tf

    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.serve, "embed_image": module.embed_image, "embed_text": module.embed_text,
        "match_embeddings": module.match_embeddings, "score_tokens": module.score_tokens,
        "model_text": module.model_text,
    })


def _model_card(name: str, version: int, run_info: dict[str, Any], config, checks: dict[str, Any],
                text_config: TextConfig) -> str:
    v = checks["validation"]
    m = config.model
    text = {"small_bert": f"small BERT from scratch ({m.text_layers} layers, hidden {m.text_hidden}, learned WordPiece "
                          "vocabulary)",
            "minilm": "pretrained all-MiniLM-L6-v2 (6 layers, hidden 384, its own vocabulary)",
            "bert_preset": "pretrained BERT from a local checkpoint folder",
            "checkpoint": f"pretrained from the checkpoint folder {m.dual_checkpoint or m.text_checkpoint} "
                          "(its own tokenizer)"}.get(m.text_tower, m.text_tower)
    image = f"`{m.image_tower}`" + (" from a local weights file" if m.image_weights else " trained from scratch")
    if m.image_tower == "checkpoint":
        image = f"`checkpoint` pretrained from {m.dual_checkpoint or m.image_checkpoint} (its own normalisation)"
    return f"""# Model card: {name} version {version}

- Exported: {dt.date.today().isoformat()} by `mmclinic export`
- Config hash: `{config.hash()}`; experiment `{config.name}`: {config.description}
- Training data: dataset version `{run_info.get('dataset_version')}` (see its data card)
- Architecture: image tower {image} ({config.data.image_size} px grayscale),
  text tower `{m.text_tower}`: {text} ({m.text_pooling} pooling),
  embedding {config.model.embed_dim}; trained {run_info.get('step')} steps with the `{config.train.loss}` loss
  and a match head.

## Intended use
Research: image-report retrieval and flagging image-report mismatches for human review.
Not a diagnostic device; every flag needs a person's review.

## Validation (the run's validation split)
| figure | value |
|---|---|
| image-to-text R@5 | {v['image_to_text_R@5']:.3f} (chance {v['chance_R@5']:.3f}) |
| text-to-image R@5 | {v['text_to_image_R@5']:.3f} |
| mismatch AUROC | {v['mismatch_auroc']:.3f} |
| mismatch flag threshold (sensitivity {config.eval.target_sensitivity:.2f}) | {checks['threshold']:.4f} |

## Vetting checks
{chr(10).join(f"- {k}: {'passed' if c['passed'] else 'FAILED'} ({c['detail']})" for k, c in checks['checks'].items())}

## Serving
TensorFlow Serving layout (`{name}/{version}/`). Inputs: encoded PNG/JPEG bytes of the display-ready
image (as `mmclinic.read_image` produces) and the raw report text. Loading needs TF-Text ops.

## Report text
The graph makes the text the model sees from the raw report with the same function training used
(`mmclinic.text.model_text`, definition version {text_config.version}): text policy
`{text_config.policy}`, section headers, whitespace and `XXXX` runs normalised, and these
de-identification rules: {', '.join(r[0] for r in GRAPH_RULES)}. The `model_text` signature returns
that text for a report.

Not applied in the graph (training text had them removed at ingest; remove them before sending a
report, e.g. with `mmclinic.phi.text_deid.deidentify_text`; see docs/SERVING_CLIENTS.md):
{chr(10).join(f"- {x}" for x in OUT_OF_GRAPH)}

## Limitations
The image tower is trained from scratch unless a weights file was given; results on the
training distribution do not transfer to other sites, modalities or report styles without evaluation.
"""


def export(run: str | Path, model_base: str | Path, name: str | None = None,
           tflite: tuple[str, ...] | None = None) -> ExportResult:
    """Vet ``run`` and, when every check passes, write ``MODEL_BASE/NAME/VERSION/``.

    Everything a version holds is written into a staged folder first (SavedModel, metadata, model
    card, TensorFlow Serving's warm-up requests, the TFLite image towers of ``tflite``, default
    ``export.tflite``), then the folder is installed in one rename: a server polling
    ``MODEL_BASE`` never sees a version without its files."""
    import tensorflow as tf

    from mmclinic.eval.embedding import load_split
    from mmclinic.eval.evaluate import compute_report
    from mmclinic.eval.scorers import RunScorer, load_run_model, run_text_config
    from mmclinic.phi.guard import DEFAULT_GUARD

    from mmclinic.config import TFLITE_MODES

    bad = [m for m in tflite or () if m not in TFLITE_MODES]
    if bad:
        raise UsageError(f"--tflite: unknown mode(s) {', '.join(bad)} (allowed: {', '.join(TFLITE_MODES)})")
    run_dir, model_base = RunDir.open(run, "RUN"), Path(model_base)
    model, tokenizer, config = load_run_model(run_dir)
    tflite = tuple(config.export.tflite if tflite is None else tflite)
    run_info = run_dir.info()
    name = name or config.export.name
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"--name must be letters, digits, '-' or '_', got {name!r}")
    data = run_dir.dataset_path
    checks: dict[str, dict[str, Any]] = {}

    def check(key: str, passed: bool, detail: str) -> None:
        checks[key] = {"passed": bool(passed), "detail": detail}

    check("training_complete", run_info.get("step", 0) >= config.train.steps,
          f"step {run_info.get('step', 0)} of {config.train.steps}")
    if not data.is_dir():
        raise VettingFailed(f"vetting failed: the run's dataset {data} is missing (check dataset_available)")
    val = load_split(DatasetDir.open(data, "the run's dataset"), "val")
    if len(val.png) < 3:
        raise VettingFailed(f"vetting failed: validation split of {data} has {len(val.png)} images, need >= 3")
    text_config = run_text_config(run_dir)
    scorer = RunScorer(run_dir.path, model, tokenizer, config, text_config)
    rep = compute_report(scorer, val, boot=0, seed=config.eval.seed,
                         target_sensitivity=config.eval.target_sensitivity)
    r5 = rep["retrieval"]["image_to_text"]["R@5"]
    auroc = rep["mismatch"]["auroc"]["value"] or 0.0
    need = config.export.min_recall5_over_chance * r5["chance"]
    check("retrieval_above_chance", r5["value"] >= need,
          f"val image-to-text R@5 {r5['value']:.3f} vs required {need:.3f}")
    check("mismatch_auroc", auroc >= config.export.min_mismatch_auroc,
          f"val mismatch AUROC {auroc:.3f} vs required {config.export.min_mismatch_auroc:.3f}")
    vocab = tokenizer.vocab
    phi_tokens = [t for t in vocab if DEFAULT_GUARD.findings(t)]
    check("vocabulary_phi_scan", not phi_tokens, f"{len(phi_tokens)} vocabulary tokens match PHI rules")
    threshold = rep["mismatch"]["threshold_at_target_sensitivity"]["threshold"]
    check("operating_threshold", threshold is not None,
          f"mismatch threshold for sensitivity {config.eval.target_sensitivity} on validation pairs")
    if config.export.champion_gates:  # not worse than the registered champion (paired patient bootstrap)
        from mmclinic.serve.registry import champion_check

        check("not_worse_than_champion", *champion_check(run_dir, config, val))

    tmp = Path(tempfile.mkdtemp(prefix="mmclinic-export-"))
    try:
        staged = tmp / "model"
        module = build_serving_module(model, tokenizer, config.data.image_size, config.data.max_length, text_config)
        save_serving_model(module, staged)
        import tensorflow_text  # noqa: F401

        reloaded = tf.saved_model.load(str(staged))
        k = min(8, len(val.png))
        got = reloaded.signatures["serving_default"](image_bytes=tf.constant(val.png[:k]),
                                                     report_text=tf.constant(val.texts[:k]))
        img = scorer.embed_images(val.png[:k])
        txt = scorer.embed_texts(val.texts[:k])
        want = 1 / (1 + np.exp(-scorer.match_logits(img, txt)))
        diff = float(np.max(np.abs(got["match_score"].numpy() - want)))
        check("reload_parity", diff <= config.export.max_reload_difference,
              f"max |SavedModel - Keras| match score difference {diff:.2e} on {k} validation pairs")
        failed = [k for k, c in checks.items() if not c["passed"]]
        result = {"checks": checks, "threshold": threshold,
                  "validation": {"image_to_text_R@5": r5["value"], "chance_R@5": r5["chance"],
                                 "text_to_image_R@5": rep["retrieval"]["text_to_image"]["R@5"]["value"],
                                 "mismatch_auroc": auroc}}
        run_dir.write_vetting(result)
        if failed:
            raise VettingFailed("vetting failed: " + "; ".join(f"{k} ({checks[k]['detail']})" for k in failed))
        folder = ModelFolder(model_base / name)
        folder.path.mkdir(parents=True, exist_ok=True)
        version = folder.next_version()
        card = _model_card(name, version, run_info, config, result, text_config)
        DEFAULT_GUARD.check(card, "model card")
        ExportedModel.write_model_card(staged, card)
        ExportedModel.write_metadata(staged, {
            "name": name, "version": version, "config_hash": config.hash(), "config": config.to_dict(),
            "dataset_version": run_info.get("dataset_version"), "mismatch_threshold": result["threshold"],
            "mismatch_score": "negated match logit; flag when >= mismatch_threshold",
            "image_size": config.data.image_size, "max_length": config.data.max_length, "vetting": result,
            "text": text_config.to_dict(), "text_out_of_graph": list(OUT_OF_GRAPH),
        })
        from mmclinic.serve.tfserving import write_tfserving_files, write_warmup

        write_warmup(staged, name)  # TensorFlow Serving replays these when it loads the version
        quantized = None
        if tflite:
            from mmclinic.serve.tflite import quantize

            quantized = quantize(staged, run_dir.path, data, modes=tflite, model=model, config=config)
        dest = folder.install(staged, version).path
        write_tfserving_files(model_base, name, warmup=False)  # models.config, batching, monitoring
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from mmclinic.serve.registry import mark_challenger  # MLflow alias challenger, serving label canary

    mark_challenger(run_dir, config, name, dest, version)
    return ExportResult(path=dest, version=version, checks=checks, tflite=quantized)
