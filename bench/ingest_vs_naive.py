"""`mmclinic ingest` throughput vs a naive serial loop, and ingest's peak memory as the archive grows.

    .venv/bin/python bench/ingest_vs_naive.py [--files 1200] [--size 1024] [--memory-sizes 1000,4000]

The archive: synthetic radiographs (1024 px, 12-bit) cloned under new identities up to the
wanted number of files. Throughput: the same files through (a) the naive loop a researcher would write
first (dcmread -> pixel_array -> resize -> write PNG, one file after another) and (b)
`mmclinic ingest` with its defaults (one decoding process per core; it also de-identifies,
windows, hashes, pairs, splits, and writes shards and a data card). Each runs in a fresh
process, alternated over rounds so machine noise hits both alike; the ratio of the medians is
printed (target >= 1.7 on 2 cores). A third arm runs the naive loop with the glibc allocator
settings ingest gives its workers (``decode_pool.MALLOC_ENV``), to show how much of the gap is
that setting rather than parallel decoding and leaner per-file work.

Memory: peak resident memory of the ingest parent process and of its largest worker for
archives of increasing size (target: the largest at most 1.2x the smallest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAIVE = r"""
import sys, time
from pathlib import Path
import numpy as np, pydicom
from PIL import Image
src, out, side = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
n = 0
for f in sorted(src.rglob("*.dcm")):
    ds = pydicom.dcmread(f)
    arr = ds.pixel_array.astype(np.float32)
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)
    h, w = arr.shape
    s = side / max(h, w)
    im = Image.fromarray(arr, mode="F").resize((max(1, round(w * s)), max(1, round(h * s))))
    Image.fromarray((np.asarray(im) * 65535).astype(np.uint16)).save(out / f"{n}.png")
    n += 1
print(n, time.perf_counter() - t0)
"""

INGEST = r"""
import resource, sys, time
t0 = time.perf_counter()
from mmclinic.data.ingest import IngestOptions, ingest
s = ingest(sys.argv[1], sys.argv[2], "dicom", sys.argv[3], IngestOptions(max_side=int(sys.argv[4])))
dt = time.perf_counter() - t0
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print(s.accepted, dt, own, kids.ru_maxrss / 1024, kids.ru_minflt / max(s.accepted, 1))
"""


def clone_archive(src: Path, dest: Path, copies: int) -> int:
    """Grow a synthetic archive by cloning its studies under new identities (new patient, accession, UIDs)."""
    import csv

    import pydicom

    dest.mkdir(parents=True)
    rows = list(csv.DictReader(open(src / "reports.csv", encoding="utf-8")))
    n = 0
    with open(dest / "reports.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for c in range(copies):
            for r in rows:
                w.writerow(dict(r, patient_id=f"{r['patient_id']}C{c}", accession_number=f"{r['accession_number']}C{c}",
                                study_instance_uid=f"{r['study_instance_uid']}.{c + 1}"))
    files = sorted((src / "dicom").rglob("*.dcm"))
    for c in range(copies):
        out = dest / "dicom" / f"c{c:03d}"
        out.mkdir(parents=True)
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.PatientID = f"{ds.PatientID}C{c}"
            ds.AccessionNumber = f"{ds.AccessionNumber}C{c}"
            for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                setattr(ds, kw, f"{getattr(ds, kw)}.{c + 1}")
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(out / f"{i:05d}.dcm")
            n += 1
    return n


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})), cwd=tempfile.gettempdir())
    return [float(x) for x in out.stdout.split()[-(5 if code is INGEST else 2):]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=40, help="synthetic patients, cloned up to --files")
    ap.add_argument("--files", type=int, default=1200, help="archive size for the throughput comparison")
    ap.add_argument("--size", type=int, default=1024, help="side of the synthetic radiographs")
    ap.add_argument("--max-side", type=int, default=256, help="stored image side (both loops)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory-sizes", default="1000,4000", help="archive sizes (files) for the memory check")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()

    from mmclinic.data.synth import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="mmclinic-bench-ingest-"))
    synthesize(tmp / "base", patients=args.patients, seed=0, size=args.size)
    base_files = sum(1 for _ in (tmp / "base").rglob("*.dcm"))
    copies = max(1, -(-args.files // base_files))
    n_files = clone_archive(tmp / "base", tmp / "src", copies)
    from mmclinic.data.decode_pool import MALLOC_ENV

    naive, tuned, ours = [], [], []
    for r in range(0 if args.skip_throughput else args.rounds):
        n, t = _run(NAIVE, tmp / "src", tmp / f"naive{r}", args.max_side)
        naive.append(n / t)
        n2, t2, _, _, faults = _run(INGEST, tmp / "src", tmp / f"ds{r}", tmp / "key", args.max_side)
        ours.append(n2 / t2)
        n3, t3 = _run(NAIVE, tmp / "src", tmp / f"tuned{r}", args.max_side, env=MALLOC_ENV)
        tuned.append(n3 / t3)
        print(f"round {r + 1}: naive {naive[-1]:.1f} files/s, mmclinic ingest {ours[-1]:.1f} files/s, "
              f"naive with ingest's allocator settings {tuned[-1]:.1f} files/s; ingest workers' page faults "
              f"{faults:.0f} per file", flush=True)
    if args.skip_throughput:
        naive, tuned, ours = [1.0], [1.0], [0.0]
    result = {"files": n_files, "image_size": args.size, "cores": os.cpu_count(),
              "naive_files_per_s": round(statistics.median(naive), 2),
              "naive_tuned_allocator_files_per_s": round(statistics.median(tuned), 2),
              "ingest_files_per_s": round(statistics.median(ours), 2)}
    result["ratio"] = round(result["ingest_files_per_s"] / result["naive_files_per_s"], 2)
    result["ratio_vs_tuned_naive"] = round(result["ingest_files_per_s"] / result["naive_tuned_allocator_files_per_s"],
                                           2)
    print(json.dumps(result))

    if args.skip_memory:
        return
    mem = {}
    synthesize(tmp / "membase", patients=args.patients, seed=1, size=256)
    per_copy = sum(1 for _ in (tmp / "membase").rglob("*.dcm"))
    for size in [int(x) for x in args.memory_sizes.split(",")]:
        src = tmp / f"mem{size}"
        files = clone_archive(tmp / "membase", src, max(1, round(size / per_copy)))
        n, t, own, kids, _ = _run(INGEST, src, tmp / f"memds{size}", tmp / "key", 128)
        mem[files] = {"parent_peak_mib": round(own, 1), "worker_peak_mib": round(kids, 1), "seconds": round(t, 1)}
        print(f"{files} files: parent peak {own:.0f} MiB, largest worker {kids:.0f} MiB, {t:.0f} s", flush=True)
    sizes = sorted(mem)
    print(json.dumps({"memory": mem, "parent_ratio": round(mem[sizes[-1]]["parent_peak_mib"] /
                                                            mem[sizes[0]]["parent_peak_mib"], 3),
                      "worker_ratio": round(mem[sizes[-1]]["worker_peak_mib"] / mem[sizes[0]]["worker_peak_mib"],
                                            3)}))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f} s")
