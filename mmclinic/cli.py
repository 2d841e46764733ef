"""Command line: parse, call the library, print. Exit 0 ok, 1 the work failed, 2 bad input."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmclinic", description="Clinical image-report learning workbench.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write a synthetic clinical dataset (DICOM + reports + labels)")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--patients", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")

    # Defaults and choices come from the library (IngestOptions and its policy tuples): one definition.
    from mmclinic.data.images import FRAME_POLICIES
    from mmclinic.data.ingest import (BURNED_IN_POLICIES, FORMATS, SPLIT_POLICIES, TEXT_POLICIES, UNPAIRED_POLICIES,
                                      IngestOptions)
    from mmclinic.data.sources import CsvColumns

    d, cols = IngestOptions(), CsvColumns()
    s = sub.add_parser("ingest", help="de-identify, pair, split and shard a source into a dataset folder")
    s.add_argument("source", metavar="SOURCE")
    s.add_argument("--out", required=True, metavar="DATASET")
    s.add_argument("--format", default="auto", choices=list(FORMATS))
    s.add_argument("--deid-key-file", metavar="F",
                   help="hex key for pseudonyms (created if absent; default DATASET.deid-key beside DATASET)")
    s.add_argument("--max-side", type=int, default=d.max_side, help=f"longest side of stored images ({d.max_side})")
    s.add_argument("--workers", type=int, default=d.workers, help="decoding processes (0: one per core)")
    s.add_argument("--split-ratios", default=",".join(f"{r:g}" for r in d.split_ratios), help="train,val,test fractions")
    s.add_argument("--split-policy", default=d.split_policy, choices=list(SPLIT_POLICIES),
                   help="hash: keyed hash of the patient; source: the source's own split where it has one")
    s.add_argument("--stratify-by", metavar="COLUMN", help="manifest column each split should share "
                   "in the split ratios (e.g. modality, view)")
    s.add_argument("--text-policy", choices=list(TEXT_POLICIES),
                   help="report text the model sees (default: the source's own: both; caption for medpix2)")
    s.add_argument("--frame-policy", default=d.frame_policy, choices=list(FRAME_POLICIES),
                   help="multi-frame DICOM handling")
    s.add_argument("--burned-in", default=d.burned_in, choices=list(BURNED_IN_POLICIES),
                   help="keep: flag files declaring BurnedInAnnotation YES; quarantine: those and files with text "
                        "found in their pixels (OCR); redact: black out text found in the pixels, keep and flag "
                        "(quarantine and redact need Tesseract: apt-get install tesseract-ocr)")
    s.add_argument("--unpaired", default=d.unpaired, choices=list(UNPAIRED_POLICIES),
                   help="reports without images and images without reports")
    s.add_argument("--decode-timeout", type=float, default=d.decode_timeout, metavar="SECONDS",
                   help=f"time box for decoding one file ({d.decode_timeout:g})")
    s.add_argument("--near-duplicate-bits", type=int, default=d.near_duplicate_bits, metavar="N",
                   help="256-bit perceptual-hash distance within which images are near-duplicates (-1: off)")
    s.add_argument("--write-dicom", action="store_true",
                   help="also write de-identified DICOM copies (PS3.15 Annex E) to DATASET/dicom/")
    s.add_argument("--csv-columns", metavar="IMAGE,TEXT,PATIENT[,STUDY[,SPLIT]]",
                   help=f"column names for --format csv (default {cols.image},{cols.text},{cols.patient},{cols.study})")
    s.add_argument("--image-dir", metavar="DIR", help="iu-xray: image folder inside SOURCE")

    s = sub.add_parser("train", help="train the dual-tower model (same workdir resumes)")
    s.add_argument("experiment", metavar="EXPERIMENT.yaml")
    s.add_argument("--data", required=True, metavar="DATASET")
    s.add_argument("--workdir", metavar="RUN")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--reviews", metavar="DB|CSV", help="reviewers' decisions (scores database or decisions CSV): "
                   "confirmed mismatches become the 'reviewed' negatives (train.reviews)")
    s.add_argument("--init-from", metavar="RUN|models:/NAME@ALIAS", help="start from these weights "
                   "(train.init_from), e.g. models:/NAME@champion")

    s = sub.add_parser("evaluate", help="score a run or exported model; write REPORT.json")
    s.add_argument("target", metavar="RUN|MODEL_DIR")
    s.add_argument("--data", required=True, metavar="DATASET")
    s.add_argument("--split", default="test")
    s.add_argument("--out", required=True, metavar="REPORT.json")
    s.add_argument("--tags", metavar="CSV", help="reviewer tags (image_id, tag): each tag becomes a slice")

    s = sub.add_parser("compare", help="runs side by side: configs, metrics, plots; paired bootstrap with --data")
    s.add_argument("runs", nargs="+", metavar="RUN_OR_MLFLOW_RUN_ID")
    s.add_argument("--out", metavar="DIR", help="write CSV, Markdown, PNG and HTML tables here")
    s.add_argument("--data", metavar="DATASET", help="score checkpointed runs on this dataset (paired bootstrap)")
    s.add_argument("--split", default="test")
    s.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the paired comparison")

    s = sub.add_parser("export", help="vet a run and export a SavedModel (TensorFlow Serving layout)")
    s.add_argument("run", metavar="RUN")
    s.add_argument("--out", required=True, metavar="MODEL_BASE")
    s.add_argument("--name")
    s.add_argument("--tflite", metavar="MODES", help="also write TFLite image towers (comma-separated: float16,int8; "
                   "default export.tflite), each refused beyond export.max_quantization_drop")

    s = sub.add_parser("serve", help="serve exported models over TensorFlow Serving's REST API")
    s.add_argument("model_base", metavar="MODEL_BASE")
    s.add_argument("--port", type=int, default=8501, help="0 picks a free port (default 8501, TF Serving's)")
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    s.add_argument("--max-batch", type=int, default=1024, help="instances per request")
    s.add_argument("--max-body-mb", type=float, default=64.0, help="request body size limit")
    s.add_argument("--max-batch-size", type=int, default=32,
                   help="dynamic batching: instances merged into one model call (1 turns batching off)")
    s.add_argument("--batch-timeout-ms", type=float, default=2.0,
                   help="dynamic batching: how long a batch waits for requests already arriving")
    s.add_argument("--no-batching", action="store_true", help="one model call per request")
    s.add_argument("--poll-seconds", type=float, default=2.0,
                   help="how often the model folders are scanned for new versions (0: never)")

    s = sub.add_parser("score", help="batch-score image-report pairs into a SQL database")
    s.add_argument("model_dir", metavar="MODEL_DIR")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", metavar="DATASET")
    g.add_argument("--input", metavar="CSV", help="columns image_path, report_text[, pair_id]")
    s.add_argument("--db", default="sqlite:///scores.db", metavar="URL")
    s.add_argument("--split", default="test", help="train, val, test or all (with --data)")

    s = sub.add_parser("review", help="a page for the review queue score fills; CSV export/import of decisions")
    s.add_argument("db", metavar="DB", help="the scores database: an SQLAlchemy URL or an SQLite file")
    s.add_argument("--port", type=int, default=8502)
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    s.add_argument("--reviewer", default="", help="name recorded with the decisions (the page asks otherwise)")
    s.add_argument("--export", metavar="CSV", help="write the decisions (pair_id, status, reviewer, note) and exit")
    s.add_argument("--import", dest="import_csv", metavar="CSV", help="record the decisions of a CSV and exit")

    s = sub.add_parser("promote", help="move MLflow alias champion and serving label stable to the vetted challenger")
    s.add_argument("name", metavar="NAME", help="the registered model (export.name)")
    s.add_argument("--version", help="a vetted registered version instead of the challenger")

    s = sub.add_parser("rollback", help="move champion and stable back to the previous champion")
    s.add_argument("name", metavar="NAME")

    s = sub.add_parser("demo", help="synth -> ingest -> train -> evaluate -> export -> score")
    s.add_argument("--workdir", default="demo_run", metavar="DIR")
    s.add_argument("--patients", type=int, default=80)
    s.add_argument("--experiment", metavar="EXPERIMENT.yaml")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _run(args: argparse.Namespace) -> int:
    from mmclinic.errors import UsageError

    if args.command == "synth":
        from mmclinic.data.synth import synthesize

        r = synthesize(args.out, patients=args.patients, seed=args.seed, size=args.size)
        print(f"wrote {r.images} DICOM files of {r.studies} studies ({r.patients} patients) to {r.out}")
    elif args.command == "ingest":
        from mmclinic.data.ingest import IngestOptions, ingest

        try:
            ratios = tuple(float(x) for x in args.split_ratios.split(","))
        except ValueError:
            raise UsageError(f"--split-ratios expects three numbers, got {args.split_ratios!r}") from None
        if len(ratios) != 3:
            raise UsageError(f"--split-ratios expects three numbers, got {args.split_ratios!r}")
        from mmclinic.data.sources import CsvColumns

        columns = CsvColumns()
        if args.csv_columns:
            names = [x.strip() for x in args.csv_columns.split(",")]
            if not 3 <= len(names) <= 5 or not all(names[:3]):
                raise UsageError(f"--csv-columns expects IMAGE,TEXT,PATIENT[,STUDY[,SPLIT]], got {args.csv_columns!r}")
            columns = CsvColumns(*names)
        r = ingest(args.source, args.out, args.format, args.deid_key_file,
                   IngestOptions(split_ratios=ratios, max_side=args.max_side, workers=args.workers,
                                 split_policy=args.split_policy, text_policy=args.text_policy,
                                 stratify_by=args.stratify_by,
                                 frame_policy=args.frame_policy, burned_in=args.burned_in, unpaired=args.unpaired,
                                 decode_timeout=args.decode_timeout, near_duplicate_bits=args.near_duplicate_bits,
                                 write_dicom=args.write_dicom, csv_columns=columns, image_dir=args.image_dir))
        print(f"dataset {r.dataset} (version {r.version}): {r.accepted} images accepted, {r.quarantined} "
              f"quarantined, {r.reports} reports; splits {r.splits}")
    elif args.command == "train":
        from mmclinic.training.loop import train_from_file

        r = train_from_file(args.experiment, args.data, args.workdir, args.overrides, reviews=args.reviews,
                            init_from=args.init_from)
        print(f"run {r.workdir}: step {r.step}, MLflow run {r.mlflow_run_id}")
    elif args.command == "evaluate":
        from mmclinic.eval.evaluate import evaluate, headline

        report = evaluate(args.target, args.data, args.split, args.out, tags=args.tags)
        print(json.dumps(headline(report), indent=2))
        print(f"report written to {args.out}")
    elif args.command == "compare":
        from mmclinic.eval.compare import compare, summary_text

        r = compare(args.runs, args.out, args.data, args.split, args.boot)
        print(summary_text(r))
        if args.out:
            print(f"tables and plots written to {args.out}")
    elif args.command == "export":
        from mmclinic.serve.export import export

        modes = None if args.tflite is None else tuple(m.strip() for m in args.tflite.split(",") if m.strip())
        r = export(args.run, args.out, args.name, tflite=modes)
        print(f"exported version {r.version} to {r.path}")
        for mode, m in ((r.tflite or {}).get("image_tower") or {}).items():
            if mode != "float32":
                drop = ", ".join(f"{k} {-v:+.3f}" for k, v in m["drop"].items())
                print(f"TFLite {mode} image tower: {'written' if m['accepted'] else 'refused'} ({drop} on the test "
                      f"split; allowed drop {r.tflite['max_quantization_drop']})")
    elif args.command == "serve":
        from mmclinic.serve.server import serve

        serve(args.model_base, args.host, args.port, max_batch=args.max_batch, max_body_mb=args.max_body_mb,
              max_batch_size=1 if args.no_batching else args.max_batch_size,
              batch_timeout_ms=args.batch_timeout_ms, poll_seconds=args.poll_seconds)
    elif args.command == "score":
        from mmclinic.serve.scoring import score

        r = score(args.model_dir, data=args.data, input_csv=args.input, db=args.db, split=args.split)
        print(f"scored {r.pairs} pairs ({r.failed} unreadable), {r.flagged} flagged; run {r.scoring_run_id} in {r.db}")
    elif args.command == "review":
        from mmclinic.data import review_queue

        if args.export or args.import_csv:
            if args.import_csv:
                n = review_queue.import_csv(args.db, args.import_csv)
                print(f"recorded {n} decisions from {args.import_csv}")
            if args.export:
                n = review_queue.export_csv(args.db, args.export)
                print(f"wrote {n} decisions to {args.export}")
        else:
            from mmclinic.serve.review import serve_review

            serve_review(args.db, args.host, args.port, args.reviewer)
    elif args.command in ("promote", "rollback"):
        from mmclinic.serve import registry

        if args.command == "promote":
            e = registry.promote(args.name, args.version)
        else:
            e = registry.rollback(args.name)
        print(f"{args.name}: version {e['version']} is now champion (serving label stable"
              + (f" -> {e['labels'].get('stable')}" if e.get("labels") else "") + "); previous champion: "
              + (f"version {e['previous']}" if e.get("previous") else "none") + f"; recorded as {e['who']} at {e['when']}")
    elif args.command == "demo":
        from mmclinic.demo import run_demo

        run_demo(args.workdir, args.patients, args.experiment, args.overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mmclinic.errors import MmclinicError

    try:
        return _run(args)
    except MmclinicError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"mmclinic {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - never dump a message that may carry input data
        if args.debug:
            traceback.print_exc()
        print(f"mmclinic {args.command}: unexpected {type(exc).__name__}; rerun with --debug for the "
              "traceback (it may show input data)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
