"""Property-based fuzzing of the readers with hypothesis.

Targets and properties:

- ``dicom``: small real DICOM files (every encoding the reader takes, a file without preamble, a
  gzip-compressed one) with bytes flipped, overwritten, inserted, deleted, duplicated or cut, at
  random offsets and at element boundaries, read by ``read_image``;
- ``raster``: PNG (8- and 16-bit, grey, RGB, palette) and JPEG (baseline, progressive) files mutated
  the same way;
- ``csv``: arbitrary CSV tables (random bytes, quoting, encodings, hostile image paths) through the
  csv source adapter;
- ``jsonl``: arbitrary MedPix JSONL lines (random bytes, JSON of any shape, hostile image names)
  through the medpix2 source adapter;
- ``paths``: any string as a table's image path: accepted only if it stays inside the source.

An image read ends as an :class:`~mmclinic.data.images.ImageRecord` (float32 pixels in [0, 1],
finite) or an :class:`mmclinic.errors.InputError` with a known reason code that names the file. A
table ends as rows, image jobs and quarantine rows with known reason codes, every row accounted
for and every image path inside the source, or is refused whole with a
:class:`mmclinic.errors.UsageError`. Anything else fails the property, and hypothesis shrinks it
to a minimal input. Each example runs in this process under a watchdog that dumps the stacks and
exits if one example runs longer than ``--example-timeout`` (a hang).

Usage: ``python reliability/fuzz.py [--examples N] [--seed N] [--targets dicom,raster,csv,jsonl,paths]``;
prints the number of examples and the outcome counts per target; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import collections
import csv
import faulthandler
import gzip
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from reliability import corpus  # noqa: E402

FUZZ_PIXEL_BUDGET = 64 << 20
"""Bytes a fuzzed file may ask for: a mutated Rows or Columns stays cheap to decode."""
EXAMPLE_TIMEOUT = 60.0
OUTCOMES: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
"""Outcome counts per target, filled as the properties run."""
EXAMPLES: collections.Counter[str] = collections.Counter()
"""Examples run per target (shrinking included)."""

DICOM_SEEDS = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
               "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_small_odd.dcm", "JPEG2000.dcm",
               "image_dfl.dcm", "SC_rgb_jpeg_gdcm.dcm", "emri_small_RLE.dcm", "rtplan.dcm"]


# --------------------------------------------------------------------------- seeds


def _bare(data: bytes) -> bytes:
    """A Part 10 file written again as a dataset without preamble and file meta (implicit VR)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.preamble = None
    del ds.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def dicom_seeds() -> list[tuple[str, bytes, list[int]]]:
    """(name, bytes, element boundaries) of each seed file."""
    out = []
    for name in DICOM_SEEDS:
        data = corpus.testdata(name)
        out.append((name, data, sorted({el.start for el in corpus.elements(data)} | {el.value_start for el in
                                                                                      corpus.elements(data)})))
    mr = corpus.testdata("MR_small.dcm")
    out.append(("MR_small_bare", _bare(mr), list(range(0, 400, 8))))
    out.append(("MR_small.dcm.gz", gzip.compress(mr), list(range(0, 40))))
    return out


def raster_seeds() -> list[tuple[str, bytes, list[int]]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {
        "grey8.png": (Image.fromarray((rng.random((24, 20)) * 255).astype(np.uint8)), "PNG", {}),
        "grey16.png": (Image.fromarray((rng.random((24, 20)) * 65535).astype(np.uint16)), "PNG", {}),
        "rgb.png": (Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)), "PNG", {}),
        "palette.png": (Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).convert("P"), "PNG", {}),
        "baseline.jpg": (Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)), "JPEG", {"quality": 70}),
        "progressive.jpg": (Image.fromarray((rng.random((24, 24)) * 255).astype(np.uint8)), "JPEG",
                            {"progressive": True}),
    }
    out = []
    for name, (im, fmt, opts) in images.items():
        buf = io.BytesIO()
        im.save(buf, format=fmt, **opts)
        data = buf.getvalue()
        marks = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] not in (0, 0xFF)] if fmt == "JPEG" \
            else [8 + i for i in range(0, 40, 4)]
        out.append((name, data, marks))
    return out


# --------------------------------------------------------------------------- mutations


OPS = ("flip", "set", "insert", "delete", "truncate", "duplicate", "zero", "ff")


@st.composite
def mutated(draw: st.DrawFn, seeds: list[tuple[str, bytes, list[int]]]) -> tuple[str, bytes]:
    """A seed file with 1-6 mutations, each at a random offset or at a structural boundary."""
    name, data, marks = draw(st.sampled_from(seeds))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        if not out:
            break
        op = draw(st.sampled_from(OPS))
        if marks and draw(st.booleans()):
            pos = draw(st.sampled_from(marks)) + draw(st.integers(0, 11))
        else:
            pos = draw(st.integers(0, len(out) - 1))
        pos = min(pos, len(out) - 1)
        size = draw(st.integers(1, 64))
        if op == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=size))
        elif op == "delete":
            del out[pos:pos + size]
        elif op == "truncate":
            del out[pos:]
        elif op == "duplicate":
            out[pos:pos] = out[pos:pos + size]
        else:
            out[pos:pos + 4] = (b"\0" if op == "zero" else b"\xff") * len(out[pos:pos + 4])
    return name, bytes(out)


# --------------------------------------------------------------------------- properties


def known_reasons() -> set[str]:
    return corpus.known_reasons() - set(corpus.FAILURES)


def _watchdog(timeout: float) -> None:
    faulthandler.dump_traceback_later(timeout, exit=True)


def check_image(path: Path, target: str) -> None:
    """The image property for one file (see the module docstring)."""
    import numpy as np

    from mmclinic import errors, read_image

    _watchdog(EXAMPLE_TIMEOUT)
    try:
        record = read_image(path, pixel_budget=FUZZ_PIXEL_BUDGET)
    except errors.InputError as exc:
        assert exc.reason_code in known_reasons(), f"unknown reason code {exc.reason_code!r}"
        assert path.name in str(exc), f"the message does not name the file: {exc}"
        OUTCOMES[target][exc.reason_code] += 1
        return
    finally:
        faulthandler.cancel_dump_traceback_later()
    pixels = record.pixels
    assert pixels.dtype == np.float32 and pixels.ndim in (2, 3) and pixels.size > 0, (pixels.dtype, pixels.shape)
    assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1
    OUTCOMES[target]["image"] += 1


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / ("case" + "".join(Path(name).suffixes[-2:]))
    path.write_bytes(data)
    return path


PATHS = st.one_of(
    st.sampled_from(["img/ok.png", "img/link.png", "img/../img/ok.png", "./img/ok.png", "../outside.png", "/etc/passwd",
                     "img/../../outside.png", "C:\\x.png", "\\\\host\\share\\x.png", "img\\..\\..\\x.png",
                     "img/linked_dir/secret.png", "", " ", "img/ok.png\0", "..", ".", "img/" + "a" * 300]),
    st.text(alphabet=st.sampled_from("./\\a\0:~ C"), max_size=24),
    st.text(max_size=24),
)
"""Image paths a hostile table may hold (the source folder has img/ok.png and links leading out)."""


def _source(folder: Path) -> Path:
    """A source folder with one image, a link to a file outside and a link to a folder outside."""
    src = folder / "src"
    (src / "img").mkdir(parents=True)
    (folder / "outside.png").write_bytes(corpus._png_bytes())
    (folder / "secrets").mkdir()
    (folder / "secrets" / "secret.png").write_bytes(corpus._png_bytes())
    (src / "img" / "ok.png").write_bytes(corpus._png_bytes())
    (src / "img" / "link.png").symlink_to(folder / "outside.png")
    (src / "img" / "linked_dir").symlink_to(folder / "secrets", target_is_directory=True)
    return src


def _inside(path: Path, src: Path) -> bool:
    try:
        real = path.resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return real.is_relative_to(src.resolve())


TABLE_REASONS = {"bad_input", "bad_text", "conflicting_report", "duplicate", "empty_report", "missing_image",
                 "missing_patient", "missing_report", "unsafe_path"}
"""Reason codes the source adapters give while listing (documented in the README and errors.py)."""


def _table_reasons(quarantine: list[dict[str, str]]) -> None:
    for q in quarantine:
        assert q["reason_code"] in TABLE_REASONS, q["reason_code"]
        assert q["kind"] in ("image", "report"), q["kind"]


CSV_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["FINDINGS: a. IMPRESSION: b.", "", "  ", "\"", "\r\n"]))
CSV_ROW = st.tuples(PATHS, CSV_TEXT, st.one_of(st.sampled_from(["p1", "p2", ""]), st.text(max_size=6)),
                    st.one_of(st.sampled_from(["s1", "s2", ""]), st.text(max_size=6)))


@st.composite
def csv_tables(draw: st.DrawFn) -> bytes:
    """A CSV table: well-formed rows with hostile values, or bytes that are barely CSV."""
    kind = draw(st.sampled_from(["rows", "rows", "rows", "bytes", "mixed"]))
    standard = ["image_path", "report_text", "patient_id", "study_id"]
    header = draw(st.one_of(st.just(standard), st.just(standard), st.just(standard),
                            st.lists(st.sampled_from([*standard, "x", ""]), max_size=5)))
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC])))
    writer.writerow(header)
    for row in draw(st.lists(CSV_ROW, max_size=12)):
        writer.writerow(list(row)[: draw(st.integers(0, 5))] if draw(st.booleans()) else row)
    text = buf.getvalue().encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])), errors="replace")
    if kind == "rows":
        return text
    noise = draw(st.binary(max_size=200))
    if kind == "bytes":
        return noise
    at = draw(st.integers(0, len(text)))
    return text[:at] + noise + text[at:]


def check_csv(table: bytes, folder: Path) -> None:
    from mmclinic import errors
    from mmclinic.data.sources import scan_csv

    src = _source(folder)
    (src / "pairs.csv").write_bytes(table)
    try:
        scan = scan_csv(src)
    except errors.UsageError:
        OUTCOMES["csv"]["table refused (usage)"] += 1
        return
    _table_reasons(scan.quarantine)
    text = table.decode("utf-8-sig", errors="surrogateescape")
    rows = [r for r in csv.reader(io.StringIO(text, newline=""), strict=True)][1:]
    n_rows = sum(1 for r in rows if r)
    assert len(scan.images) + len(scan.quarantine) == n_rows, (len(scan.images), len(scan.quarantine), n_rows)
    for job in scan.images:
        assert _inside(job.path, src), "an image path outside the source was listed"
    for q in scan.quarantine:
        assert not re.search("[\udc80-\udcff]", q["message"]), "a message quotes bytes that are not UTF-8"
    OUTCOMES["csv"]["rows"] += n_rows
    for q in scan.quarantine:
        OUTCOMES["csv"][q["reason_code"]] += 1
    OUTCOMES["csv"]["image job"] += len(scan.images)


JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                    st.text(max_size=10)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=8)


@st.composite
def description_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["object", "object", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    if kind == "json":
        return json.dumps(draw(JSON_VALUE)).encode()
    obj = {"image": draw(st.one_of(PATHS, JSON_VALUE)), "U_id": draw(st.one_of(st.sampled_from(["c1", "c2"]),
                                                                              JSON_VALUE)),
           "Type": draw(st.one_of(st.sampled_from(["CT", "MRI"]), JSON_VALUE)),
           "Description": draw(st.one_of(st.fixed_dictionaries({"Caption": CSV_TEXT, "Plane": CSV_TEXT}),
                                         JSON_VALUE)),
           "Location Category": draw(JSON_VALUE)}
    if draw(st.booleans()):
        del obj[draw(st.sampled_from(sorted(obj)))]
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def case_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["object", "bytes", "json"]))
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    if kind == "json":
        return json.dumps(draw(JSON_VALUE)).encode()
    return json.dumps({"U_id": draw(st.one_of(st.sampled_from(["c1", "c2"]), JSON_VALUE)),
                       "Case": draw(st.one_of(st.fixed_dictionaries({"Findings": CSV_TEXT}), JSON_VALUE))}).encode()


def check_jsonl(descriptions: list[bytes], cases: list[bytes], newline: bytes, folder: Path) -> None:
    from mmclinic import errors
    from mmclinic.data.sources import scan_medpix2

    src = _source(folder)
    (src / "img").rename(src / "images")
    (src / "splitted_dataset").mkdir()
    desc = newline.join(descriptions)
    (src / "splitted_dataset" / "descriptions_train.jsonl").write_bytes(desc)
    (src / "splitted_dataset" / "data_train.jsonl").write_bytes(newline.join(cases))
    try:
        scan = scan_medpix2(src)
    except errors.UsageError:
        OUTCOMES["jsonl"]["table refused (usage)"] += 1
        return
    _table_reasons(scan.quarantine)
    lines = sum(1 for line in desc.removeprefix(b"\xef\xbb\xbf").splitlines() if line.strip())
    from_lines = sum(1 for q in scan.quarantine if q["kind"] == "image" and q["source_path"].startswith("descr"))
    assert len(scan.images) + from_lines == lines, (len(scan.images), from_lines, lines)
    assert len(scan.reports) == len(scan.images)
    for job in scan.images:
        assert _inside(job.path, src), "an image path outside the source was listed"
    OUTCOMES["jsonl"]["lines"] += lines
    OUTCOMES["jsonl"]["image job"] += len(scan.images)
    for q in scan.quarantine:
        OUTCOMES["jsonl"][q["reason_code"]] += 1


def check_path(value: str, folder: Path) -> None:
    from mmclinic.data.sources import unsafe_path

    src = folder / "src"
    if not src.exists():
        _source(folder)
    why = unsafe_path(value, src, src)
    if why is None:
        assert _inside(src / value, src), "accepted a path that leads outside the source"
        OUTCOMES["paths"]["accepted"] += 1
    else:
        OUTCOMES["paths"]["refused"] += 1


# --------------------------------------------------------------------------- running


def _settings(examples: int, deadline_s: float | None) -> settings:
    import datetime as dt

    return settings(max_examples=examples, deadline=None if deadline_s is None else dt.timedelta(seconds=deadline_s),
                    database=None, phases=[Phase.generate, Phase.target, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
                    print_blob=True)


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def properties(folder: Path, examples: int, deadline_s: float | None, seed_value: int) -> dict[str, Callable[[], None]]:
    """The hypothesis tests, one per target, each writing its files under ``folder``."""
    conf = _settings(examples, deadline_s)
    dicom_files, raster_files = dicom_seeds(), raster_seeds()

    @seed(seed_value)
    @conf
    @given(mutated(dicom_files))
    def dicom(case: tuple[str, bytes]) -> None:
        EXAMPLES["dicom"] += 1
        check_image(_write(_fresh(folder / "dicom"), *case), "dicom")

    @seed(seed_value)
    @conf
    @given(mutated(raster_files))
    def raster(case: tuple[str, bytes]) -> None:
        EXAMPLES["raster"] += 1
        check_image(_write(_fresh(folder / "raster"), *case), "raster")

    @seed(seed_value)
    @conf
    @given(csv_tables())
    def csv_table(table: bytes) -> None:
        EXAMPLES["csv"] += 1
        check_csv(table, _fresh(folder / "csv"))

    @seed(seed_value)
    @conf
    @given(st.lists(description_line(), max_size=8), st.lists(case_line(), max_size=4),
           st.sampled_from([b"\n", b"\r\n", b"\r"]))
    def jsonl(descriptions: list[bytes], cases: list[bytes], newline: bytes) -> None:
        EXAMPLES["jsonl"] += 1
        check_jsonl(descriptions, cases, newline, _fresh(folder / "jsonl"))

    paths_folder = _fresh(folder / "paths")

    @seed(seed_value)
    @conf
    @given(PATHS)
    def paths(value: str) -> None:
        EXAMPLES["paths"] += 1
        check_path(value, paths_folder)

    return {"dicom": dicom, "raster": raster, "csv": csv_table, "jsonl": jsonl, "paths": paths}


def main(argv: list[str] | None = None) -> int:
    global EXAMPLE_TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=3000, help="examples per target (default 3000)")
    parser.add_argument("--targets", default="dicom,raster,csv,jsonl,paths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--example-timeout", type=float, default=EXAMPLE_TIMEOUT,
                        help="seconds one example may run before the run stops as hung (default 60)")
    parser.add_argument("--memory-gib", type=float, default=8.0, help="address-space limit (default 8 GiB)")
    args = parser.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")  # pydicom warns about every odd value it reads
    EXAMPLE_TIMEOUT = args.example_timeout
    corpus.limit_memory(args.memory_gib)
    failed = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mmclinic-fuzz-") as tmp:
        props = properties(Path(tmp), args.examples, None, args.seed)
        for target in args.targets.split(","):
            t0 = time.monotonic()
            try:
                props[target]()
            except Exception as exc:  # noqa: BLE001 - report every target's failure, then exit 1
                failed.append(target)
                print(f"{target}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            print(f"{target}: {EXAMPLES[target]} examples in {time.monotonic() - t0:.0f} s: " +
                  ", ".join(f"{k} {v}" for k, v in OUTCOMES[target].most_common()), flush=True)
    print(f"examples: {sum(EXAMPLES.values())} in {time.monotonic() - start:.0f} s; failures: {len(failed)} "
          f"{' '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())
