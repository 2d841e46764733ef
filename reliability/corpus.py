"""A generated corpus of broken and hostile image files, each read by ``read_image`` under a time box.

Every case must end as an image or a typed :class:`mmclinic.errors.InputError` (its reason
code) within the time box and the memory limit: a case that raises anything else is a crash,
one that runs past the time box (``decode_timeout``) a hang, and one whose decoding process
dies (``decoder_crash``) a crash of a decoder. The cases are generated from pydicom's small
test files and from PNG/JPEG files made here, deterministically for a seed:

- ``truncate``: DICOM cut at every structural boundary: the preamble, the 'DICM' marker, and the
  header, the length field and the value of every element, nested ones included;
- ``length``: each element's length field set to 0, odd, doubled, past the end, undefined, huge;
- ``header``: absurd Rows, Columns, BitsAllocated, BitsStored, NumberOfFrames, SamplesPerPixel,
  PixelRepresentation, PhotometricInterpretation, rescale and window values, missing pixel tags,
  broken LUT sequences;
- ``syntax``: the transfer syntax in the file meta changed (compressed declared for raw data and
  the other way round, unknown and malformed UIDs);
- ``deflate``: deflate bombs (Deflated Explicit VR Little Endian inflating to gigabytes) and broken
  deflate streams; ``gzip``: gzip bombs, cut and garbled gzip files;
- ``nesting``: sequences nested 10 to 100,000 deep, with undefined and defined lengths;
- ``codestream``: encapsulated JPEG, JPEG-LS and JPEG 2000 codestreams whose own header declares
  huge or zero dimensions;
- ``notdicom``: text, random bytes, other formats and garbage after a 'DICM' marker, named .dcm;
- ``raster``: PNG and JPEG bombs (huge declared dimensions), chunk and marker truncations, bad CRCs,
  text and ICC profile bombs; ``empty``: zero-byte files.

Usage: ``python reliability/corpus.py [--quick] [--timeout S] [--seed N] [--families F,...]``. It prints
the number of cases, the outcome counts by reason and family, the slowest cases and any failure,
and exits 1 if any case crashed or hung. ``--quick`` runs a deterministic subset (the test suite's).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import io
import os
import random
import resource
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFLATED = "1.2.840.10008.1.2.1.99"
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", DEFLATED, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.201", "1.2.3.4", "", "1.2.840.10008.1.2.1\0garbage",
]
DICOM_BASES = ["MR_small.dcm", "CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
               "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm",
               "JPEG2000.dcm", "emri_small.dcm", "SC_rgb_small_odd.dcm", "JPGExtended.dcm"]
"""Small real files of every encoding the reader takes (pydicom's test files)."""
RAW_BASES = ["MR_small.dcm", "CT_small.dcm", "SC_rgb_small_odd.dcm", "emri_small.dcm"]
COMPRESSED_BASES = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_gdcm.dcm",
                    "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm", "JPEG2000.dcm"]
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
OK_OUTCOME = "image"
FAILURES = ("decode_timeout", "decoder_crash")
"""Reason codes that mean the time box or the decoding process caught what the reader did not."""


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    name: str
    data: bytes


def testdata(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise SystemExit(f"pydicom test file {name} is not installed (pydicom and pydicom-data are in the lock)")
    return Path(path).read_bytes()


# --------------------------------------------------------------------------- DICOM structure


@dataclasses.dataclass(frozen=True)
class Element:
    start: int
    """Offset of the tag."""
    length_at: int
    length_size: int
    value_start: int
    value_end: int
    tag: int


def _syntax(data: bytes) -> tuple[str, int]:
    """(transfer syntax, offset of the dataset after the file meta) of a Part 10 file."""
    from pydicom.filereader import _read_file_meta_info

    fh = io.BytesIO(data)
    fh.seek(132)
    meta = _read_file_meta_info(fh)
    return str(meta.get("TransferSyntaxUID", "")), fh.tell()


def _walk(data: bytes, pos: int, end: int, implicit: bool, little: bool, out: list[Element], depth: int = 0) -> int:
    """Record every element from ``pos`` (items and nested sequences too); returns where it stopped."""
    e = "<" if little else ">"
    while pos + 8 <= end and depth < 64:
        group, elem = struct.unpack(e + "HH", data[pos:pos + 4])
        start = pos
        if group == 0xFFFE:  # item or delimiter: always a 4-byte length
            length = struct.unpack(e + "I", data[pos + 4:pos + 8])[0]
            value = pos + 8
            if elem in (0xE00D, 0xE0DD):
                out.append(Element(start, pos + 4, 4, value, value, group << 16 | elem))
                return value
            if length == 0xFFFFFFFF:
                stop = _walk(data, value, end, implicit, little, out, depth + 1)
                out.append(Element(start, pos + 4, 4, value, stop, group << 16 | elem))
                pos = stop
                continue
            out.append(Element(start, pos + 4, 4, value, min(value + length, end), group << 16 | elem))
            if length >= 8 and data[value:value + 2] not in (b"\xff\xd8", b"\xff\x4f"):  # not a codestream
                _walk(data, value, min(value + length, end), implicit, little, out, depth + 1)
            pos = value + length
            continue
        explicit = not implicit or group == 2
        vr = data[pos + 4:pos + 6] if explicit else b""
        if explicit and vr in LONG_VRS:
            length_at, size = pos + 8, 4
            length = struct.unpack(e + "I", data[pos + 8:pos + 12])[0] if pos + 12 <= end else 0
            value = pos + 12
        elif explicit:
            length_at, size = pos + 6, 2
            length = struct.unpack(e + "H", data[pos + 6:pos + 8])[0]
            value = pos + 8
        else:
            length_at, size = pos + 4, 4
            length = struct.unpack(e + "I", data[pos + 4:pos + 8])[0]
            value = pos + 8
        tag = group << 16 | elem
        if length == 0xFFFFFFFF:
            stop = _walk(data, value, end, implicit, little, out, depth + 1)
            out.append(Element(start, length_at, size, value, stop, tag))
            pos = stop
            continue
        out.append(Element(start, length_at, size, value, min(value + length, end), tag))
        if vr == b"SQ" and length:
            _walk(data, value, min(value + length, end), implicit, little, out, depth + 1)
        pos = value + length
    return pos


def elements(data: bytes) -> list[Element]:
    """Every element of a Part 10 file (file meta first), in file order; a deflated dataset's meta only."""
    tsyntax, body = _syntax(data)
    out: list[Element] = []
    _walk(data, 132, body, False, True, out)
    if tsyntax != DEFLATED:
        _walk(data, body, len(data), tsyntax == "1.2.840.10008.1.2", tsyntax != "1.2.840.10008.1.2.2", out)
    return sorted(out, key=lambda el: el.start)


# --------------------------------------------------------------------------- families


def truncations(name: str, data: bytes) -> Iterator[Case]:
    cuts = {0, 1, 4, 64, 127, 128, 129, 131, 132, 133, 136}
    for el in elements(data):
        length_end = el.length_at + el.length_size
        mid = (el.value_start + el.value_end) // 2
        cuts.update({el.start, el.start + 2, el.start + 4, el.length_at, length_end - 1, el.value_start,
                     el.value_start + 1, mid, el.value_end - 1})
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        yield Case("truncate", f"{name}@{cut}", data[:cut])


def wrong_lengths(name: str, data: bytes) -> Iterator[Case]:
    tsyntax, body = _syntax(data)
    for el in elements(data):
        e = ">" if tsyntax == "1.2.840.10008.1.2.2" and el.start >= body else "<"
        size_fmt = "H" if el.length_size == 2 else "I"
        top = 0xFFFF if el.length_size == 2 else 0xFFFFFFFF
        current = el.value_end - el.value_start
        values = {0, current + 1, min(2 * current + 2, top), min(len(data) - el.value_start + 2, top), top,
                  top - 15}
        for value in sorted(values):
            if value == current:
                continue
            patched = bytearray(data)
            patched[el.length_at:el.length_at + el.length_size] = struct.pack(e + size_fmt, value)
            yield Case("length", f"{name}@{el.start:x}={value:x}", bytes(patched))


def _save(ds, *, syntax: str | None = None) -> bytes:
    buf = io.BytesIO()
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def header_values(name: str, data: bytes) -> Iterator[Case]:
    import pydicom
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    changes: list[tuple[str, Callable[[pydicom.Dataset], None]]] = []

    def set_value(keyword: str, vr: str, value) -> None:
        def apply(ds) -> None:
            ds.add_new(tag_for_keyword(keyword), vr, value)
        changes.append((f"{keyword}={value!r}"[:60], apply))

    for keyword in ("Rows", "Columns"):
        for value in (0, 1, 3, 4097, 65535):
            set_value(keyword, "US", value)
    for value in (0, 1, 7, 12, 15, 24, 32, 64, 65535):
        set_value("BitsAllocated", "US", value)
    for value in (0, 1, 17, 33, 65535):
        set_value("BitsStored", "US", value)
    for value in (0, 65535):
        set_value("HighBit", "US", value)
    for value in ("0", "-1", "2", "1000", "2147483647", "99999999999", "abc", "1.5", "", "1e9"):
        set_value("NumberOfFrames", "IS", value)
    for value in (0, 2, 3, 4, 65535):
        set_value("SamplesPerPixel", "US", value)
    for value in (2, 65535):
        set_value("PixelRepresentation", "US", value)
        set_value("PlanarConfiguration", "US", value)
    for value in ("", "MONOCHROME3", "RGB", "YBR_FULL_422", "PALETTE COLOR", "YBR_PARTIAL_420", "\x00\x00"):
        set_value("PhotometricInterpretation", "CS", value)
    for value in ("0", "nan", "inf", "-1e308", "1e308", "abc"):
        set_value("RescaleSlope", "DS", value)
        set_value("RescaleIntercept", "DS", value)
        set_value("WindowWidth", "DS", value)
        set_value("WindowCenter", "DS", value)
    for value in ("SIGMOID", "LINEAR_EXACT", "BOGUS"):
        set_value("VOILUTFunction", "CS", value)
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "PhotometricInterpretation",
                    "PixelRepresentation", "PixelData"):
        def drop(ds, keyword=keyword) -> None:
            if keyword in ds:
                delattr(ds, keyword)
        changes.append((f"no {keyword}", drop))

    def lut(kind: str, descriptor: list[int], lut_data: bytes) -> None:
        def apply(ds) -> None:
            item = Dataset()
            item.add_new(0x00283002, "US", descriptor)  # LUTDescriptor
            item.add_new(0x00283006, "OW", lut_data)  # LUTData
            if kind == "Modality":
                item.ModalityLUTType = "HU"
                ds.ModalityLUTSequence = Sequence([item])
            else:
                ds.VOILUTSequence = Sequence([item])
        changes.append((f"{kind} LUT {descriptor} {len(lut_data)}", apply))

    for kind in ("Modality", "VOI"):
        lut(kind, [0, 0, 0], b"")
        lut(kind, [4096, 0, 16], b"\x00\x01" * 3)
        lut(kind, [2, 0, 99], b"\x00\x01" * 2)
        lut(kind, [65535, 65535, 16], b"\xff" * 10)

    def palette(descriptor: list[int], size: int) -> None:
        def apply(ds) -> None:
            ds.PhotometricInterpretation = "PALETTE COLOR"
            for colour in ("Red", "Green", "Blue"):
                ds.add_new(tag_for_keyword(f"{colour}PaletteColorLookupTableDescriptor"), "US", descriptor)
                ds.add_new(tag_for_keyword(f"{colour}PaletteColorLookupTableData"), "OW", b"\x01\x00" * size)
        changes.append((f"palette {descriptor} {size}", apply))

    palette([256, 0, 8], 256)
    palette([0, 0, 16], 3)
    palette([4, 65535, 16], 0)
    palette([256, 0, 0], 256)

    def empty_groups(ds) -> None:
        ds.PerFrameFunctionalGroupsSequence = Sequence([])
        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    changes.append(("empty functional groups", empty_groups))

    for label, change in changes:
        ds = pydicom.dcmread(io.BytesIO(data))
        try:
            change(ds)
            out = _save(ds)
        except Exception:  # noqa: BLE001 - a change pydicom cannot write is not a case
            continue
        yield Case("header", f"{name}:{label}", out)


def with_syntax(data: bytes, uid: str) -> bytes:
    """``data`` with only the TransferSyntaxUID of its file meta replaced (dataset bytes untouched)."""
    from pydicom.filereader import _read_file_meta_info
    from pydicom.filewriter import write_file_meta_info

    fh = io.BytesIO(data)
    fh.seek(132)
    meta = _read_file_meta_info(fh)
    rest = data[fh.tell():]
    meta.TransferSyntaxUID = uid
    out = io.BytesIO()
    out.write(data[:132])
    write_file_meta_info(out, meta, enforce_standard=False)
    return out.getvalue() + rest


def syntaxes(name: str, data: bytes) -> Iterator[Case]:
    current = _syntax(data)[0]
    for uid in TRANSFER_SYNTAXES:
        if uid != current:
            yield Case("syntax", f"{name}:{uid!r}", with_syntax(data, uid))


def _deflate_repeat(block: int, count: int) -> bytes:
    """A raw deflate stream of ``block * count`` zero bytes, built from one fully flushed chunk."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = comp.compress(bytes(block)) + comp.flush(zlib.Z_FULL_FLUSH)
    return chunk * count + b"\x03\x00"  # then an empty final block


def deflate_cases() -> Iterator[Case]:
    import pydicom

    base = pydicom.dcmread(io.BytesIO(testdata("MR_small.dcm")))
    meta = io.BytesIO()
    from pydicom.filewriter import write_file_meta_info

    base.file_meta.TransferSyntaxUID = DEFLATED
    write_file_meta_info(meta, base.file_meta, enforce_standard=False)
    head = b"\0" * 128 + b"DICM" + meta.getvalue()
    body = _save(pydicom.dcmread(io.BytesIO(testdata("MR_small.dcm"))))[len(head):]
    for gib in (1, 2, 4):  # zeros after a real dataset: inflates to 1-4 GiB
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        start = comp.compress(body) + comp.flush(zlib.Z_FULL_FLUSH)
        yield Case("deflate", f"zeros_{gib}GiB", head + start + _deflate_repeat(1 << 20, gib << 10))
    # one element whose value inflates to 3 GiB
    element = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, 3 << 30)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    yield Case("deflate", "one_huge_element", head + comp.compress(element) + comp.flush(zlib.Z_FULL_FLUSH)
               + _deflate_repeat(1 << 20, 3 << 10))
    real = testdata("image_dfl.dcm")
    _, at = _syntax(real)
    for cut in (at, at + 1, at + 10, (at + len(real)) // 2, len(real) - 1):
        yield Case("deflate", f"image_dfl_cut@{cut}", real[:cut])
    rng = random.Random(1)
    for i in range(8):
        garbled = bytearray(real)
        for _ in range(4):
            garbled[rng.randrange(at, len(real))] = rng.randrange(256)
        yield Case("deflate", f"image_dfl_garbled{i}", bytes(garbled))
    yield Case("deflate", "not_deflated", with_syntax(testdata("MR_small.dcm"), DEFLATED))
    yield Case("deflate", "deflated_declared_raw", with_syntax(real, "1.2.840.10008.1.2.1"))


def _gzip_bomb(prefix: bytes, gib: int) -> bytes:
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = comp.compress(prefix) + comp.flush(zlib.Z_FULL_FLUSH)
    size = len(prefix) + (gib << 30)
    crc = zlib.crc32(prefix)
    block = bytes(1 << 20)
    for _ in range(gib << 10):
        crc = zlib.crc32(block, crc)
    return header + start + _deflate_repeat(1 << 20, gib << 10) + struct.pack("<II", crc, size & 0xFFFFFFFF)


def gzip_cases() -> Iterator[Case]:
    mr = testdata("MR_small.dcm")
    yield Case("gzip", "ok.dcm.gz", gzip.compress(mr))
    yield Case("gzip", "bomb_2GiB.dcm.gz", _gzip_bomb(mr, 2))
    yield Case("gzip", "bomb_zeros_1GiB.gz", _gzip_bomb(b"", 1))
    data = gzip.compress(mr)
    for cut in (1, 2, 10, 11, 20, len(data) // 2, len(data) - 8, len(data) - 1):
        yield Case("gzip", f"cut@{cut}.dcm.gz", data[:cut])
    rng = random.Random(2)
    for i in range(10):
        garbled = bytearray(data)
        for _ in range(3):
            garbled[rng.randrange(10, len(data))] = rng.randrange(256)
        yield Case("gzip", f"garbled{i}.dcm.gz", bytes(garbled))
    yield Case("gzip", "nested.dcm.gz", gzip.compress(data))
    yield Case("gzip", "text.dcm.gz", gzip.compress(b"hello " * 1000))
    yield Case("gzip", "png.gz", gzip.compress(_png_bytes()))
    yield Case("gzip", "magic_only.gz", b"\x1f\x8b")
    yield Case("gzip", "two_members.dcm.gz", data + gzip.compress(b"trailing member"))


def _sq_nest(depth: int, *, defined: bool, implicit: bool) -> bytes:
    """``depth`` nested ContentSequence (0040,A730) items, innermost holding one short element."""
    inner = struct.pack("<HH", 0x0040, 0xA160) + (struct.pack("<I", 4) if implicit else b"UT\0\0" +
                                                  struct.pack("<I", 4)) + b"text"
    seq_head = struct.pack("<HH", 0x0040, 0xA730) + (b"" if implicit else b"SQ\0\0")
    if not defined:
        open_ = (seq_head + struct.pack("<I", 0xFFFFFFFF) + b"\xfe\xff\x00\xe0" + struct.pack("<I", 0xFFFFFFFF))
        close = b"\xfe\xff\x0d\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0"
        return open_ * depth + inner + close * depth
    value = inner
    for _ in range(depth):
        item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(value)) + value
        value = seq_head + struct.pack("<I", len(item)) + item
    return value


def nesting_cases() -> Iterator[Case]:
    import pydicom

    for implicit in (False, True):
        syntax = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
        ds = pydicom.dcmread(io.BytesIO(testdata("MR_small_implicit.dcm" if implicit else "MR_small.dcm")))
        full = _save(ds)
        pixel = full.rindex(b"\xe0\x7f\x10\x00")
        for depth in (10, 100, 1000, 10_000, 100_000):
            for defined in (False, True):
                if defined and depth > 10_000:
                    continue
                nest = _sq_nest(depth, defined=defined, implicit=implicit)
                # the nested sequence goes before group 0040 elements would; (0040,A730) sorts after (0028,xxxx)
                yield Case("nesting", f"{syntax}:{'defined' if defined else 'undefined'}:{depth}",
                           full[:pixel] + nest + full[pixel:])


def _j2k_with_size(codestream: bytes, width: int, height: int) -> bytes:
    at = codestream.index(b"\xff\x51")  # SIZ: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, ...
    out = bytearray(codestream)
    out[at + 6:at + 14] = struct.pack(">II", width, height)
    return bytes(out)


def _jpeg_with_size(codestream: bytes, width: int, height: int) -> bytes:
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2", b"\xff\xc3", b"\xff\xf7"):
        at = codestream.find(marker)
        if at >= 0:
            out = bytearray(codestream)
            out[at + 5:at + 9] = struct.pack(">HH", height, width)
            return bytes(out)
    return codestream


def codestream_cases() -> Iterator[Case]:
    """Encapsulated frames whose codestream header disagrees with Rows and Columns."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    for name, resize in (("MR_small_jp2klossless.dcm", _j2k_with_size), ("JPEG2000.dcm", _j2k_with_size),
                         ("SC_rgb_jpeg_gdcm.dcm", _jpeg_with_size), ("JPGExtended.dcm", _jpeg_with_size),
                         ("MR_small_jpeg_ls_lossless.dcm", _jpeg_with_size)):
        data = testdata(name)
        ds = pydicom.dcmread(io.BytesIO(data))
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
        for width, height in ((60000, 60000), (65535, 1), (1, 65535), (0, 0), (ds.Columns * 2, ds.Rows * 2),
                              (ds.Columns // 2, ds.Rows // 2)):
            copy = pydicom.dcmread(io.BytesIO(data))
            copy.PixelData = encapsulate([resize(frame, width, height)])
            yield Case("codestream", f"{name}:{width}x{height}", _save(copy))
        for cut in (2, 16, len(frame) // 2, len(frame) - 2):
            copy = pydicom.dcmread(io.BytesIO(data))
            copy.PixelData = encapsulate([frame[:cut]])
            yield Case("codestream", f"{name}:cut@{cut}", _save(copy))
    rle = pydicom.dcmread(io.BytesIO(testdata("MR_small_RLE.dcm")))
    frame = next(generate_frames(rle.PixelData, number_of_frames=1))
    for label, header in (("15_segments", struct.pack("<16I", 15, *([64] * 15))),
                          ("offsets_past_end", struct.pack("<16I", 2, 64, 1 << 30, *([0] * 13))),
                          ("zero_segments", bytes(64)), ("descending", struct.pack("<16I", 2, 500, 64, *([0] * 13)))):
        copy = pydicom.dcmread(io.BytesIO(testdata("MR_small_RLE.dcm")))
        copy.PixelData = encapsulate([header + frame[64:]])
        yield Case("codestream", f"rle:{label}", _save(copy))


def not_dicom_cases(seed: int) -> Iterator[Case]:
    rng = random.Random(seed)
    fixed = {
        "text.dcm": b"not an image at all, " * 50, "pdf.dcm": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + b"0" * 500,
        "zip.dcm": b"PK\x03\x04" + bytes(500), "elf.dcm": b"\x7fELF\x02\x01\x01" + bytes(500),
        "html.dcm": b"<!DOCTYPE html><html><body>scan</body></html>" * 10, "json.dcm": b'{"Rows": 512}' * 30,
        "dicm_at_0.dcm": b"DICM" + bytes(500), "dicm_only.dcm": bytes(128) + b"DICM",
        "dicm_then_zeros.dcm": bytes(128) + b"DICM" + bytes(1000),
        "dicm_then_ff.dcm": bytes(128) + b"DICM" + b"\xff" * 1000,
        "group8_then_garbage.dcm": b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + b"\xff" * 64,
        "png_named_dcm.dcm": _png_bytes(), "one_byte.dcm": b"\x08",
    }
    for name, data in fixed.items():
        yield Case("notdicom", name, data)
    for i in range(40):
        size = rng.choice([3, 131, 132, 133, 500, 4096, 20000])
        yield Case("notdicom", f"random{i}_{size}.dcm", rng.randbytes(size))
    for i in range(40):
        yield Case("notdicom", f"dicm_random{i}.dcm", bytes(128) + b"DICM" + rng.randbytes(rng.choice([8, 64, 2000])))
    mr = testdata("MR_small.dcm")
    _, at = _syntax(mr)
    for i in range(20):  # a real meta group, then random bytes
        yield Case("notdicom", f"meta_random{i}.dcm", mr[:at] + rng.randbytes(rng.choice([8, 100, 3000])))


def _png_bytes(width: int = 16, height: int = 16, depth: int = 8, colour: int = 0, data: bytes | None = None,
               extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    if data is None:
        row = 1 + width * max(depth // 8, 1) * {0: 1, 2: 3, 4: 2, 6: 4}.get(colour, 1)
        data = zlib.compress(bytes(row * height))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    for kind, body in extra:
        out += chunk(kind, body)
    return out + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def raster_cases(seed: int) -> Iterator[Case]:
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    zeros = zlib.compress(bytes(1 << 20))
    for width, height in ((65535, 65535), (2**31 - 1, 1), (1, 2**31 - 1), (100_000, 100_000), (0, 0), (0, 16)):
        yield Case("raster", f"png_{width}x{height}.png", _png_bytes(width, height, data=zeros))
    # 16-bit grey within Pillow's bomb limit: 8000 x 8000 x 2 bytes from a small file (decoded, within budget)
    row = bytes(1 + 8000 * 2)
    comp = zlib.compressobj(9)
    big = b"".join(comp.compress(row) for _ in range(8000)) + comp.flush()
    yield Case("raster", "png_8000x8000_16bit.png", _png_bytes(8000, 8000, 16, 0, data=big))
    bomb_text = zlib.compress(bytes(64 << 20))
    yield Case("raster", "png_ztxt_bomb.png", _png_bytes(extra=[(b"zTXt", b"Comment\0\0" + bomb_text)]))
    yield Case("raster", "png_iccp_bomb.png", _png_bytes(extra=[(b"iCCP", b"icc\0\0" + bomb_text)]))
    yield Case("raster", "png_many_chunks.png", _png_bytes(extra=[(b"tEXt", b"k\0v")] * 5000))
    yield Case("raster", "png_bad_ihdr_depth.png", _png_bytes(depth=3))
    yield Case("raster", "png_bad_colour.png", _png_bytes(colour=7))
    good = _png_bytes(32, 32)
    bad_crc = bytearray(good)
    bad_crc[29] ^= 0xFF
    yield Case("raster", "png_bad_crc.png", bytes(bad_crc))
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(buf, format="PNG")
    png16 = buf.getvalue()
    for cut in sorted({8, 16, 29, 33, 37, 41, len(png16) // 2, len(png16) - 12, len(png16) - 1}):
        yield Case("raster", f"png16_cut@{cut}.png", png16[:cut])
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (10, 200, 30)).save(buf, format="JPEG", quality=80, progressive=True)
    jpeg = buf.getvalue()
    markers = [i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] not in (0x00, 0xFF)]
    for cut in sorted(set(markers + [len(jpeg) // 2, len(jpeg) - 1])):
        yield Case("raster", f"jpeg_cut@{cut}.jpg", jpeg[:cut])
    for width, height in ((65500, 65500), (0, 0), (65535, 1)):
        yield Case("raster", f"jpeg_{width}x{height}.jpg", _jpeg_with_size(jpeg, width, height))
    for i in range(30):
        garbled = bytearray(jpeg if i % 2 else png16)
        for _ in range(rng.choice([1, 4, 16])):
            garbled[rng.randrange(2, len(garbled))] = rng.randrange(256)
        yield Case("raster", f"garbled{i}.{'jpg' if i % 2 else 'png'}", bytes(garbled))
    yield Case("raster", "jpeg_magic_only.jpg", b"\xff\xd8\xff")
    yield Case("raster", "png_magic_only.png", b"\x89PNG")


def empty_cases() -> Iterator[Case]:
    for name in ("empty.dcm", "empty.png", "empty.jpg", "empty.jpeg", "empty.dcm.gz", "empty"):
        yield Case("empty", name, b"")


def generate(seed: int = 0) -> Iterator[Case]:
    """Every case, in a fixed order for a seed."""
    for name in DICOM_BASES:
        yield from truncations(name, testdata(name))
    for name in DICOM_BASES:
        if name != "image_dfl.dcm":
            yield from wrong_lengths(name, testdata(name))
    for name in RAW_BASES + COMPRESSED_BASES:
        yield from header_values(name, testdata(name))
    for name in RAW_BASES + COMPRESSED_BASES:
        yield from syntaxes(name, testdata(name))
    yield from deflate_cases()
    yield from gzip_cases()
    yield from nesting_cases()
    yield from codestream_cases()
    yield from not_dicom_cases(seed)
    yield from raster_cases(seed)
    yield from empty_cases()


QUICK_EVERY = {"truncate": 40, "length": 40, "header": 6, "syntax": 5, "notdicom": 4, "raster": 3, "codestream": 3,
               "gzip": 1, "deflate": 1, "nesting": 2, "empty": 1}
QUICK_PIXEL_BUDGET = 64 << 20
"""The quick subset's budget: bombs are refused after inflating 128 MiB instead of 1 GiB."""


def quick(cases: Iterator[Case]) -> Iterator[Case]:
    """A deterministic subset of about 800 cases: every n-th case of each family (``QUICK_EVERY``)."""
    seen: collections.Counter[str] = collections.Counter()
    for case in cases:
        seen[case.family] += 1
        if seen[case.family] % QUICK_EVERY[case.family] == 1 % QUICK_EVERY[case.family]:
            yield case


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class Outcome:
    case: Case
    outcome: str
    """``image``, a reason code, or ``crash:<exception type>``."""
    seconds: float
    message: str = ""


def known_reasons() -> set[str]:
    from mmclinic import errors

    codes = set()
    stack = [errors.InputError]
    while stack:
        cls = stack.pop()
        codes.add(cls.reason_code)
        stack.extend(cls.__subclasses__())
    return codes | {"decoder_crash"}


def probe(path: str, pixel_budget: int) -> tuple[str, str]:
    """``read_image`` of one file, checked where it ran: (``image`` or ``crash:bad_pixels``, details).

    Runs in a decoding worker (through :func:`mmclinic.data.images.run_with_timeout`, the time
    box of ``read_image(decode_timeout=...)``), so that only this summary, not the pixels, comes
    back through the pipe. InputErrors and other exceptions propagate to the caller.
    """
    import numpy as np

    from mmclinic import read_image

    pixels = read_image(path, pixel_budget=pixel_budget).pixels
    if pixels.dtype != np.float32 or pixels.ndim not in (2, 3) or not pixels.size or not np.isfinite(pixels).all() \
            or pixels.min() < 0 or pixels.max() > 1:
        return "crash:bad_pixels", f"{pixels.dtype} {pixels.shape}"
    return OK_OUTCOME, f"{pixels.shape}"


def run_case(path: Path, timeout: float, pixel_budget: int) -> tuple[str, str]:
    """(outcome, message) of reading ``path`` in a decoding worker under a ``timeout``-second time box."""
    from mmclinic import errors
    from mmclinic.data.images import run_with_timeout
    from reliability.corpus import probe as worker_probe  # by its importable name, also when run as a script

    try:
        return run_with_timeout(worker_probe, (str(path), pixel_budget), timeout, name=path.name)
    except errors.InputError as exc:
        return exc.reason_code, str(exc)
    except Exception as exc:  # noqa: BLE001 - what this corpus is looking for
        return f"crash:{type(exc).__name__}", str(exc)[:300]


def run(cases: Iterator[Case], folder: Path, *, timeout: float, pixel_budget: int,
        progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """Write each case to ``folder`` and read it with ``read_image`` in a decoding worker under a time box."""
    outcomes = []
    for i, case in enumerate(cases):
        suffix = "".join(s for s in Path(case.name).suffixes[-2:] if s in (".dcm", ".gz", ".png", ".jpg", ".jpeg"))
        path = folder / f"{i:05d}-{case.family}{suffix or '.dcm'}"
        path.write_bytes(case.data)
        start = time.monotonic()
        outcome, message = run_case(path, timeout, pixel_budget)
        outcomes.append(Outcome(case, outcome, time.monotonic() - start, message))
        path.unlink()
        if progress:
            progress(i + 1)
    return outcomes


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    """Crashes, hangs (``decode_timeout``) and decoder deaths."""
    known = known_reasons() - set(FAILURES)
    return [o for o in outcomes if o.outcome != OK_OUTCOME and o.outcome not in known]


def limit_memory(gib: float) -> None:
    """Cap this process's address space (decoding workers inherit it): a runaway allocation fails
    with MemoryError, reported as a crash, instead of taking the machine."""
    limit = int(gib * (1 << 30))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def summary(outcomes: list[Outcome], seconds: float) -> str:
    by_outcome = collections.Counter(o.outcome for o in outcomes)
    by_family: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_family[o.case.family][o.outcome] += 1
    lines = [f"cases: {len(outcomes)} in {seconds:.0f} s", "outcomes:"]
    lines += [f"  {k:32s} {v}" for k, v in by_outcome.most_common()]
    lines.append("by family:")
    for family, counts in sorted(by_family.items()):
        lines.append(f"  {family:12s} {sum(counts.values()):5d}  " +
                     ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    slow = sorted(outcomes, key=lambda o: -o.seconds)[:5]
    lines.append("slowest: " + ", ".join(f"{o.case.family}/{o.case.name} {o.seconds:.1f} s" for o in slow))
    bad = failures(outcomes)
    lines.append(f"failures (crash, hang, decoder death): {len(bad)}")
    lines += [f"  {o.case.family}/{o.case.name}: {o.outcome} {o.message}" for o in bad[:50]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the deterministic subset the test suite runs")
    parser.add_argument("--timeout", type=float, default=60.0, help="time box per case, seconds (default 60)")
    parser.add_argument("--memory-gib", type=float, default=8.0, help="address-space limit (default 8 GiB)")
    parser.add_argument("--pixel-budget", type=int, default=None,
                        help="bytes (default: the reader's, 1 GiB; with --quick 64 MiB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default="", help="comma-separated families to run (default: all)")
    args = parser.parse_args(argv)
    from mmclinic.data import decode_pool
    from mmclinic.data.images import DEFAULT_PIXEL_BUDGET

    limit_memory(args.memory_gib)
    cases = generate(args.seed)
    if args.quick:
        cases = quick(cases)
    if args.families:
        wanted = set(args.families.split(","))
        cases = (c for c in cases if c.family in wanted)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mmclinic-corpus-") as tmp:
        budget = args.pixel_budget or (QUICK_PIXEL_BUDGET if args.quick else DEFAULT_PIXEL_BUDGET)
        outcomes = run(cases, Path(tmp), timeout=args.timeout, pixel_budget=budget,
                       progress=lambda n: print(f"  {n} cases", file=sys.stderr, flush=True) if n % 500 == 0 else None)
    decode_pool._IDLE.close()  # reap the idle workers, so their peak memory is counted below
    seconds = time.monotonic() - start
    print(summary(outcomes, seconds))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak memory of a decoding worker: {peak:.0f} MiB (address-space limit {args.memory_gib:g} GiB)")
    return 1 if failures(outcomes) else 0


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())
