"""Byte search of written artifacts for planted identities ("canaries").

The end-to-end proof that no identifier survives: an archive is planted with distinctive,
made-up identities, the pipeline runs on it, and every byte it wrote is searched for
every canary. :class:`CanaryScanner` takes the canaries and yields :class:`Hit` records
that name the file (or the archive member, or the file name itself), the canary's kind and
the form and encoding it was found in, never the value.

Each canary is searched in several forms: as written, and by its style
(``date``: ISO, ``YYYYMMDD``, ``MM/DD/YYYY``, ``DD.MM.YYYY``, month-name spellings;
``name``: a DICOM person name ``FAMILY^GIVEN`` also as ``GIVEN FAMILY`` and
``FAMILY, GIVEN``; ``digits``: also without its separators), each in UTF-8, UTF-16-LE
and base64, without regard to ASCII case. Forms made only of digits must stand alone
(no letter or digit next to them), so that they do not match inside longer numbers.
gzip streams, zip archives (``.keras`` files), Parquet tables (their values, whatever the
page compression) and the text chunks of PNG files are searched decompressed as well;
PNG pixel data is not (text rendered into pixels is :mod:`mmclinic.phi.pixel_text`'s
question).

The search is a prefilter on the first two bytes of every needle, then the first six,
then an exact comparison: a few seconds for hundreds of megabytes and thousands of needles.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import gzip
import io
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

STYLES = ("text", "date", "name", "digits")
MIN_LENGTH = 6
"""Shortest canary form searched: shorter strings are not distinctive enough for a byte search."""
MAX_DECOMPRESSED = 512 * 2**20
"""Bytes one compressed member may expand to before the rest of it is left unsearched."""
_PREFIX = 6
_CHUNK = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class Canary:
    """One planted identity: ``kind`` (what it stands for, e.g. ``patient_id``), ``value`` and ``style``.

    ``style`` ``date`` takes an ISO date (``1931-07-29``); ``name`` a DICOM person name
    (``FAMILY^GIVEN``); ``digits`` a number with separators (``617-201-4037``); ``text`` anything else.
    """

    kind: str
    value: str
    style: str = "text"

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"Canary style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.style == "date":
            dt.date.fromisoformat(self.value)  # raises ValueError naming the format
        elif len(self.value) < MIN_LENGTH:
            raise ValueError(f"canary of kind {self.kind}: shorter than {MIN_LENGTH} characters")


@dataclasses.dataclass(frozen=True)
class Form:
    """One spelling of a canary as bytes to search for."""

    kind: str
    form: str
    encoding: str
    needle: bytes
    """Lower-cased (ASCII) bytes."""
    bounded: bool
    """Only digits: must not touch a letter or digit on either side."""


@dataclasses.dataclass(frozen=True)
class Hit:
    """A canary found: where (a path relative to the scanned folder, with ``[member]`` for what was
    decompressed and ``[file name]`` for a path itself), its kind, form and encoding. No value."""

    where: str
    kind: str
    form: str
    encoding: str

    def __str__(self) -> str:
        return f"{self.where}: canary of kind {self.kind} ({self.form}, {self.encoding})"


@dataclasses.dataclass
class ScanSummary:
    """What a scan covered."""

    files: int = 0
    bytes: int = 0
    members: int = 0
    """Decompressed streams, archive members and table decodings searched besides the files."""
    names: int = 0
    """File and folder names searched."""
    hits: list[Hit] = dataclasses.field(default_factory=list)


def _spellings(c: Canary) -> list[tuple[str, str]]:
    """``(form label, text)`` for a canary's style."""
    v = c.value
    out = [("as written", v)]
    if c.style == "date":
        d = dt.date.fromisoformat(v)
        month, mon = d.strftime("%B"), d.strftime("%b")
        out = [("iso", d.isoformat()), ("digits", d.strftime("%Y%m%d")), ("mm/dd/yyyy", d.strftime("%m/%d/%Y")),
               ("m/d/yyyy", f"{d.month}/{d.day}/{d.year}"), ("dd.mm.yyyy", d.strftime("%d.%m.%Y")),
               ("yyyy/mm/dd", d.strftime("%Y/%m/%d")), ("month d, yyyy", f"{month} {d.day}, {d.year}"),
               ("d month yyyy", f"{d.day} {month} {d.year}"), ("dd-mon-yyyy", f"{d.day:02d}-{mon}-{d.year}")]
    elif c.style == "name":
        parts = [p for p in v.split("^") if p]
        if len(parts) >= 2:
            family, given = parts[0], parts[1]
            out += [("given family", f"{given} {family}"), ("family, given", f"{family}, {given}")]
    elif c.style == "digits":
        digits = re.sub(r"\D", "", v)
        if digits != v and len(digits) >= MIN_LENGTH:
            out.append(("digits", digits))
        if len(digits) == 10:  # a North American phone number, as reports write it
            out += [("(nnn) nnn-nnnn", f"({digits[:3]}) {digits[3:6]}-{digits[6:]}"),
                    ("nnn.nnn.nnnn", f"{digits[:3]}.{digits[3:6]}.{digits[6:]}")]
    return out


def _base64_cores(data: bytes) -> list[bytes]:
    """The base64 characters fixed by ``data`` alone, at each of the three byte alignments."""
    cores = []
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + data)
        first = -(-8 * k // 6)
        last = (8 * (k + len(data)) - 6) // 6
        core = enc[first:last + 1]
        if len(core) >= 8:
            cores.append(core)
    return cores


def forms(canary: Canary) -> list[Form]:
    """Every byte form of ``canary`` the scanner searches."""
    out: list[Form] = []
    for label, text in _spellings(canary):
        if len(text) < MIN_LENGTH:
            continue
        bounded = text.isdigit()
        raw = text.encode("utf-8")
        out.append(Form(canary.kind, label, "utf-8", raw.lower(), bounded))
        out.append(Form(canary.kind, label, "utf-16-le", text.encode("utf-16-le").lower(), bounded))
        if not bounded:  # a number's base64 matches too much by chance
            out += [Form(canary.kind, label, "base64", core.lower(), False) for core in _base64_cores(raw)]
    return out


def _is_word_byte(b: int) -> bool:
    return 48 <= b <= 57 or 97 <= b <= 122  # data is lower-cased


class CanaryScanner:
    """Searches bytes, files and folders for a fixed set of canaries."""

    def __init__(self, canaries: Iterable[Canary]) -> None:
        self.canaries = list(canaries)
        if not self.canaries:
            raise ValueError("CanaryScanner needs at least one canary")
        self.forms = [f for c in self.canaries for f in forms(c)]
        self._by_key: dict[int, list[Form]] = {}
        self._lut = np.zeros(1 << 16, bool)
        for f in self.forms:
            key = int.from_bytes(f.needle[:_PREFIX], "little")
            self._by_key.setdefault(key, []).append(f)
            self._lut[(f.needle[0] << 8) | f.needle[1]] = True
        self._keys = np.array(sorted(self._by_key), dtype=np.uint64)
        self._longest = max(len(f.needle) for f in self.forms)

    @property
    def kinds(self) -> set[str]:
        return {c.kind for c in self.canaries}

    def find(self, data: bytes) -> set[tuple[str, str, str]]:
        """``(kind, form, encoding)`` of every canary form in ``data``."""
        low = data.lower()
        found: set[tuple[str, str, str]] = set()
        n = len(low)
        step = _CHUNK
        for start in range(0, max(n - _PREFIX + 1, 0), step):
            stop = min(start + step + _PREFIX - 1, n)
            arr = np.frombuffer(low, np.uint8, count=stop - start, offset=start)
            if len(arr) < _PREFIX:
                break
            pair = (arr[:-1].astype(np.uint16) << 8) | arr[1:]
            cand = np.flatnonzero(self._lut[pair])
            cand = cand[cand <= len(arr) - _PREFIX]
            cand = cand[cand < step]  # positions of the next chunk are that chunk's
            if not len(cand):
                continue
            key = np.zeros(len(cand), np.uint64)
            for j in range(_PREFIX):
                key |= arr[cand + j].astype(np.uint64) << np.uint64(8 * j)
            idx = np.minimum(np.searchsorted(self._keys, key), len(self._keys) - 1)
            for pos, k in zip((cand[self._keys[idx] == key] + start).tolist(), key[self._keys[idx] == key].tolist()):
                for f in self._by_key[k]:
                    if (f.kind, f.form, f.encoding) in found or not low.startswith(f.needle, pos):
                        continue
                    if f.bounded:
                        unit = 2 if f.encoding == "utf-16-le" else 1
                        before = low[pos - unit] if pos >= unit else 0
                        end = pos + len(f.needle)
                        after = low[end] if end < n else 0
                        if _is_word_byte(before) or _is_word_byte(after):
                            continue
                    found.add((f.kind, f.form, f.encoding))
        return found

    def scan_bytes(self, data: bytes, where: str, summary: ScanSummary | None = None) -> list[Hit]:
        """Hits in ``data`` and in what it holds compressed (gzip, zip, Parquet values, PNG text)."""
        hits = [Hit(where, *k) for k in sorted(self.find(data))]
        for label, inner in _unpacked(data):
            if summary is not None:
                summary.members += 1
            hits += self.scan_bytes(inner, f"{where}[{label}]", summary)
        return hits

    def scan_tree(self, root: str | Path, summary: ScanSummary | None = None, prefix: str = "") -> Iterator[Hit]:
        """Every file under ``root`` (recursively, symbolic links not followed), its decompressed members,
        and every file and folder name, named ``prefix`` + the path relative to ``root``."""
        root = Path(root)
        summary = summary if summary is not None else ScanSummary()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            for name in [*dirnames, *sorted(filenames)]:
                rel = prefix + (base / name).relative_to(root).as_posix()
                summary.names += 1
                for kind, form, enc in sorted(self.find(name.encode("utf-8", "surrogateescape"))):
                    hit = Hit(f"{rel}[file name]", kind, form, enc)
                    summary.hits.append(hit)
                    yield hit
            for name in sorted(filenames):
                path = base / name
                if path.is_symlink() or not path.is_file():
                    continue
                rel = prefix + path.relative_to(root).as_posix()
                data = path.read_bytes()
                summary.files += 1
                summary.bytes += len(data)
                for hit in self.scan_bytes(data, rel, summary):
                    summary.hits.append(hit)
                    yield hit

    def scan_paths(self, paths: Iterable[str | Path], root: str | Path, summary: ScanSummary | None = None
                   ) -> Iterator[Hit]:
        """Each of ``paths`` (files or folders) as :meth:`scan_tree` would, named relative to ``root``."""
        summary = summary if summary is not None else ScanSummary()
        for p in paths:
            p = Path(p)
            if p.is_dir():
                yield from self.scan_tree(p, summary, f"{_relative(p, root)}/")
            elif p.is_file():
                data = p.read_bytes()
                summary.files += 1
                summary.bytes += len(data)
                for hit in self.scan_bytes(data, _relative(p, root), summary):
                    summary.hits.append(hit)
                    yield hit


def _relative(p: Path, root: str | Path) -> str:
    try:
        return p.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return p.name


def _bounded_gunzip(data: bytes) -> bytes:
    out = io.BytesIO()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
            while out.tell() < MAX_DECOMPRESSED:
                block = fh.read(2**20)
                if not block:
                    break
                out.write(block)
    except (OSError, EOFError, zlib.error):
        pass  # a truncated stream: what decompressed is still searched
    return out.getvalue()


def _zip_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if info.is_dir() or info.file_size > MAX_DECOMPRESSED:
                    continue
                with zf.open(info) as fh:
                    yield f"zip:{info.filename}", fh.read()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError):
        return


def _parquet_values(data: bytes) -> bytes | None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not a readable table: its raw bytes were searched
        return None
    parts = [" ".join(table.column_names)]
    for col in table.columns:
        parts += [str(v) for v in col.to_pylist()]
    return "\n".join(parts).encode("utf-8", "surrogateescape")


def _png_text(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The decompressed zTXt and iTXt chunks of a PNG (tEXt is plain and searched as it is)."""
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if ctype not in (b"zTXt", b"iTXt"):
            continue
        keyword, _, rest = body.partition(b"\0")
        try:
            if ctype == b"zTXt":
                yield f"png:{ctype.decode()}", zlib.decompress(rest[1:], bufsize=2**16)[:MAX_DECOMPRESSED]
            elif rest[:1] == b"\1":  # compressed iTXt: flag, method, language\0, translated keyword\0, text
                text = rest[2:].split(b"\0", 2)[-1]
                yield f"png:{ctype.decode()}", zlib.decompress(text)[:MAX_DECOMPRESSED]
        except zlib.error:
            continue


def _unpacked(data: bytes) -> Iterator[tuple[str, bytes]]:
    """``(label, bytes)`` for what ``data`` holds compressed or encoded."""
    if data[:2] == b"\x1f\x8b":
        yield "gunzip", _bounded_gunzip(data)
    elif data[:4] == b"PK\x03\x04":
        yield from _zip_members(data)
    elif data[:4] == b"PAR1" and data[-4:] == b"PAR1":
        values = _parquet_values(data)
        if values is not None:
            yield "parquet values", values
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        yield from _png_text(data)
