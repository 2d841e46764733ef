"""The one image reader: DICOM, PNG and JPEG to display-ready float pixels.

Training, evaluation, export and scoring all read through :func:`read_image`, so
the pixels a model sees are the same everywhere. For DICOM the order is the
standard's: stored values (BitsStored, PixelRepresentation) -> modality LUT
(ModalityLUTSequence, or rescale slope/intercept) -> VOI LUT or the file's first
window (a 0.5-99.5 percentile window when the file has neither) -> MONOCHROME1
inverted, so that a higher value is always brighter. Colour (RGB, YBR_FULL,
YBR_FULL_422, YBR_ICT/RCT, PALETTE COLOR) becomes RGB scaled by its bit depth.
Enhanced multi-frame files take rescale and window from their functional groups.

DICOM files are Part 10 files (128-byte preamble and 'DICM'), datasets without them
(older exports and ACR-NEMA files; without file meta the transfer syntax is the
encoding the dataset parses in), or either compressed with gzip. A DICOMDIR and
objects whose SOP class is not an image (structured reports, presentation states, RT
structures, plans and doses, segmentations, waveforms, documents) are refused with
their own reason codes (``dicomdir``, ``non_image_object``).

PNG and JPEG: 8-bit samples are divided by 255; 16-bit grayscale keeps its precision
and is scaled min-max (the file carries no window, and 12-bit data in a 16-bit
container is common, so dividing by 65535 would give a nearly black image). Alpha is
dropped; a colour image whose three channels are equal becomes grayscale.

Safety: the pixel budget is checked from the header before anything is decoded
(rows x columns x frames x samples x bytes), and each JPEG, JPEG-LS or JPEG 2000
frame must declare the header's size before a decoder sees it (decoders allocate what
the codestream says); a gzip file and a deflated dataset are inflated under the same
bound; bytes that do not parse as a dataset are never force-read, and only the
transfer syntaxes in :data:`ALLOWED_TRANSFER_SYNTAXES` are decoded. A decoder cannot
be interrupted inside one process; :func:`run_with_timeout` runs a read in a decoding
worker process (:mod:`mmclinic.data.decode_pool`, the same workers and time box as
ingest) and stops it after the time box (``decode_timeout=`` of the readers).
``reliability/corpus.py`` and ``reliability/fuzz.py`` run the reader on generated
hostile files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic import errors

DEFAULT_PIXEL_BUDGET = 1 << 30  # bytes of decoded pixel data per file
DEFAULT_DECODE_TIMEOUT = 60.0  # seconds per file, for callers that time-box decoding
_HEADER_ALLOWANCE = 64 << 20  # non-pixel bytes a deflated dataset may inflate to, beyond the budget

DEFLATED = "1.2.840.10008.1.2.1.99"

# Transfer syntaxes we decode. Anything else is rejected with its UID named.
ALLOWED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    DEFLATED: "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 and 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1 (Process 14, selection value 1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}

FRAME_POLICIES = ("first", "middle", "all", "reject")

_GRAY_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
_COLOUR_PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


@dataclasses.dataclass
class ImageRecord:
    """Display-ready pixels and de-identified metadata of one image."""

    pixels: np.ndarray
    """float32, (H, W) grayscale or (H, W, 3) colour, in [0, 1], higher is brighter."""
    meta: dict[str, Any]


def _tag(keyword: str) -> str:
    """'Rows (0028,0010)': how messages name a DICOM element (never its value)."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return keyword if tag is None else f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _check_policy(frame_policy: str, *, single: bool = False) -> None:
    if frame_policy not in FRAME_POLICIES:
        raise errors.UsageError(f"frame_policy must be one of {FRAME_POLICIES}, got {frame_policy!r}")
    if single and frame_policy == "all":
        raise errors.UsageError(
            "frame_policy 'all' gives one image per frame: call "
            "mmclinic.data.images.read_frames(path) (or decode_dicom_frames) instead"
        )


_GZIP_MAGIC = b"\x1f\x8b"
_HEAD = 1024 + 132  # bytes looked at to recognise a dataset
_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
                 b"US UT UV".split())
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_FIRST_GROUPS = (0x0002, 0x0008)  # a dataset without a preamble starts with its file meta or group 0008


def _looks_like_dataset(head: bytes) -> bool:
    """A DICOM dataset without the 128-byte preamble and 'DICM' marker (older exports, ACR-NEMA).

    The first two elements must parse, in either byte order and explicit or implicit VR: the
    first in group 0002 or 0008 with a length that ends inside ``head``, the second with a
    larger tag. Text, PDF, ZIP and other bytes fail this at the first element.
    """
    for endian, vr_choices in (("<", (True, False)), (">", (True,))):
        for explicit in vr_choices:
            pos, last = 0, -1
            for n in range(2):
                if pos == len(head) and n == 1:
                    return True  # a one-element dataset
                if pos + 8 > len(head):
                    break
                group, elem = struct.unpack(endian + "HH", head[pos:pos + 4])
                tag = group << 16 | elem
                vr = head[pos + 4:pos + 6]
                if explicit:
                    if vr not in _VRS:
                        break
                    if vr in _LONG_VRS:
                        if head[pos + 6:pos + 8] != b"\0\0" or pos + 12 > len(head):
                            break
                        length, size = struct.unpack(endian + "I", head[pos + 8:pos + 12])[0], 12
                    else:
                        length, size = struct.unpack(endian + "H", head[pos + 6:pos + 8])[0], 8
                else:
                    length, size = struct.unpack(endian + "I", head[pos + 4:pos + 8])[0], 8
                if n == 0 and (group not in _FIRST_GROUPS or pos + size + length > len(head)):
                    break
                if n == 1:
                    return tag > last
                last, pos = tag, pos + size + length
    return False


def _gunzip(path: Path, limit: int, *, head: bool = False) -> bytes:
    """The decompressed content of a gzip file, refused past ``limit`` bytes (gzip bombs).

    ``head=True`` returns the first ``limit`` bytes instead, without error at the limit or at a
    cut-off stream. Inflates in steps of at most 16 MiB and holds at most ``limit`` bytes.
    """
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = io.BytesIO()
    with open(path, "rb") as fh:
        while not inflater.eof and (chunk := fh.read(1 << 20)):
            data = chunk
            while data and not inflater.eof:
                out.write(inflater.decompress(data, min(1 << 24, limit + 1 - out.tell())))
                if out.tell() > limit:
                    if head:
                        return out.getvalue()[:limit]
                    raise errors.PixelBudgetExceeded(
                        f"{path.name}: gzip-compressed file decompresses to more than {limit} bytes (the pixel "
                        f"budget plus {_HEADER_ALLOWANCE} bytes of header)"
                    )
                data = inflater.unconsumed_tail
    if not inflater.eof and not head:
        raise errors.TruncatedFile(f"{path.name}: the gzip stream ends before its end marker (truncated)")
    return out.getvalue()


def _head(path: Path) -> tuple[bytes, bool]:
    """(the first bytes of the content, whether the file is gzip-compressed); decompresses a head only."""
    with open(path, "rb") as fh:
        head = fh.read(_HEAD)
    if not head.startswith(_GZIP_MAGIC):
        return head, False
    try:
        return _gunzip(path, _HEAD, head=True), True
    except (zlib.error, OSError):
        return b"", True


def _dicom_kind(head: bytes) -> str | None:
    """'part10' (preamble and 'DICM'), 'bare' (a dataset without them) or None (not DICOM)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    return "bare" if _looks_like_dataset(head) else None


def is_dicom(path: Path) -> bool:
    """Whether ``path`` holds DICOM: a Part 10 file (128-byte preamble and 'DICM'), a dataset without
    them (older exports, ACR-NEMA), or either of these compressed with gzip."""
    return _dicom_kind(_head(path)[0]) is not None


def _sniff(path: Path) -> str:
    """'dicom' or 'raster'; typed errors for a missing file or unknown bytes."""
    if not path.is_file():
        raise errors.MissingImage(f"image file not found: {path.name}")
    head, gzipped = _head(path)
    if _dicom_kind(head):
        return "dicom"
    if gzipped:
        if not head:
            raise errors.CorruptImage(f"{path.name}: gzip-compressed file that cannot be decompressed")
        raise errors.NotDicom(f"{path.name}: gzip-compressed file that does not hold DICOM")
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff")):
        return "raster"
    raise errors.NotDicom(
        f"{path.name}: not a DICOM file (no 'DICM' marker at byte 128, no dataset at byte 0) and not PNG or JPEG"
    )


def read_image(path: str | Path, frame: int | None = None, *, frame_policy: str = "first",
               pixel_budget: int = DEFAULT_PIXEL_BUDGET,
               decode_timeout: float | None = None) -> ImageRecord:
    """Read a DICOM, PNG or JPEG file into one :class:`ImageRecord`.

    ``frame`` picks one frame of a multi-frame DICOM; otherwise ``frame_policy``
    (``first``, ``middle`` or ``reject``) decides; for every frame use
    :func:`read_frames`. ``decode_timeout`` (seconds) reads in a decoding worker
    process stopped after that long (:func:`run_with_timeout`); ``None`` reads in-process.
    Bad input raises a subclass of :class:`mmclinic.errors.InputError` whose
    message names the file and the tag or field.
    """
    _check_policy(frame_policy, single=True)
    path = Path(path)
    return run_with_timeout(_read_image, (path, frame, frame_policy, pixel_budget), decode_timeout, name=path.name)


def _read_image(path: Path, frame: int | None, frame_policy: str, pixel_budget: int) -> ImageRecord:
    if _sniff(path) == "dicom":
        return decode_dicom(open_dicom(path, pixel_budget=pixel_budget), path, frame, frame_policy, pixel_budget)
    if frame not in (None, 0):
        raise errors.UsageError(f"frame must be 0 for a PNG or JPEG file, got {frame}")
    return _read_raster(path, pixel_budget)


def read_frames(path: str | Path, *, frame_policy: str = "all", pixel_budget: int = DEFAULT_PIXEL_BUDGET,
                decode_timeout: float | None = None) -> list[ImageRecord]:
    """One :class:`ImageRecord` per frame kept by ``frame_policy`` (default: every frame).

    Each record's ``meta["frame"]`` is its 0-based index and ``meta["n_frames"]`` the
    file's frame count. PNG and JPEG files give one record. ``first``, ``middle`` and
    ``reject`` behave as in :func:`read_image` and give at most one record.
    """
    _check_policy(frame_policy)
    path = Path(path)
    return run_with_timeout(_read_frames, (path, frame_policy, pixel_budget), decode_timeout, name=path.name)


def _read_frames(path: Path, frame_policy: str, pixel_budget: int) -> list[ImageRecord]:
    if _sniff(path) == "dicom":
        return decode_dicom_frames(open_dicom(path, pixel_budget=pixel_budget), path,
                                   frame_policy=frame_policy, pixel_budget=pixel_budget)
    return [_read_raster(path, pixel_budget)]


# --------------------------------------------------------------------------- time box


def run_with_timeout(fn: Callable[..., Any], args: Sequence[Any] = (), timeout: float | None = DEFAULT_DECODE_TIMEOUT,
                     *, name: str | None = None) -> Any:
    """Run ``fn(*args)`` under a time box and return its result, or raise what it raised.

    A decoder stuck in native code cannot be interrupted from another thread, so the call
    runs in a decoding worker process (:func:`mmclinic.data.decode_pool.call_in_worker`),
    which is killed when it takes longer than ``timeout`` seconds: that raises
    :class:`mmclinic.errors.DecodeTimeout` naming the file (``name``, else the basename of
    the first argument). A worker that dies (a crash in a codec) raises
    :class:`mmclinic.errors.CorruptImage` with reason ``decoder_crash``. ``timeout=None``
    calls ``fn`` in this process. ``fn`` must be a module-level function of an importable
    module, and its arguments and result picklable. An idle worker is kept for the next
    call, so repeated calls do not start a process each.
    """
    if timeout is None:
        return fn(*args)
    from mmclinic.data.decode_pool import call_in_worker

    first = args[0] if args else None
    label = name or (Path(first).name if isinstance(first, (str, Path)) else "input")
    return call_in_worker(fn, args, timeout, label)


# --------------------------------------------------------------------------- DICOM


def _header_int(ds: Any, keyword: str, path: Path, default: int | None = None) -> int:
    try:
        value = ds.get(keyword, default)
    except Exception:  # noqa: BLE001 - a value pydicom cannot parse
        value = "?"
    if value is None or value == "":
        if default is not None:
            return default
        raise errors.UnsupportedPixelFormat(f"{path.name}: missing required tag {_tag(keyword)}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise errors.UnsupportedPixelFormat(f"{path.name}: tag {_tag(keyword)} is not an integer") from None


def _first(value: Any) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _number(value: Any, default: float) -> float:
    try:
        out = _first(value)
    except (TypeError, ValueError, IndexError):
        return default
    return out if np.isfinite(out) else default


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1] (LINEAR, LINEAR_EXACT, SIGMOID)."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        out = (values - (center - width / 2.0)) / width
    else:
        if width < 1:
            raise errors.UnsupportedPixelFormat("tag WindowWidth must be >= 1 for a LINEAR window")
        out = np.subtract(values, center - 0.5, dtype=np.float32)  # one float32 pass, then in place
        out *= np.float32(1.0 / max(width - 1.0, 1.0))
        out += np.float32(0.5)
        return np.clip(out, 0.0, 1.0, out=out)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def percentile_window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    """Robust fallback when a file carries no window: map [p_lo, p_hi] to [0, 1]."""
    a, b = np.percentile(values, [lo, hi])
    if b <= a:
        a, b = float(values.min()), float(values.max())
    if b <= a:
        return np.zeros(values.shape, np.float32)
    return np.clip((values - a) / (b - a), 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _DicomBytes:
    """A DICOM file's dataset bytes: the file itself, or the decompressed content of a gzip file."""

    path: Path
    kind: str
    """'part10' (preamble and 'DICM' marker) or 'bare' (the dataset from byte 0)."""
    data: bytes | None = None
    """The decompressed content of a gzip file; None when the bytes are the file's."""

    def open(self) -> Any:
        return io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size

    @property
    def meta_offset(self) -> int:
        return 132 if self.kind == "part10" else 0


def _dicom_bytes(path: Path, limit: int) -> _DicomBytes:
    """Where the dataset of ``path`` is; NotDicom for bytes that are not DICOM (never force-read)."""
    head, gzipped = _head(path)
    data = None
    if gzipped:
        try:
            data = _gunzip(path, limit)
        except (zlib.error, OSError):
            raise errors.CorruptImage(f"{path.name}: gzip-compressed file that cannot be decompressed") from None
        head = data[:_HEAD]
    kind = _dicom_kind(head)
    if kind is None:
        what = "gzip-compressed file that does not hold DICOM" if gzipped else \
            "not a DICOM file (no 'DICM' marker at byte 128, no dataset at byte 0)"
        raise errors.NotDicom(f"{path.name}: {what}")
    return _DicomBytes(path, kind, data)


def _check_inflated_size(source: _DicomBytes, limit: int) -> None:
    """A deflated dataset is inflated whole by the parser: bound its size first (zip bombs)."""
    from pydicom.filereader import _read_file_meta_info

    with source.open() as fh:
        fh.seek(source.meta_offset)
        meta = _read_file_meta_info(fh)
        if str(meta.get("TransferSyntaxUID", "") or "") != DEFLATED:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total, step = 0, 1 << 24
        while chunk := fh.read(1 << 20):
            data = chunk
            while True:
                total += len(inflater.decompress(data, step))
                if total > limit:
                    raise errors.PixelBudgetExceeded(
                        f"{source.path.name}: deflated dataset (TransferSyntaxUID {DEFLATED}) inflates to more "
                        f"than {limit} bytes (the pixel budget plus {_HEADER_ALLOWANCE} bytes of header)"
                    )
                data = inflater.unconsumed_tail
                if not data:
                    break
            if inflater.eof:
                break


UID_SOURCES = ("SOPInstanceUID", "MediaStorageSOPInstanceUID", "content_sha256")
"""Where :func:`instance_uid` found (or how it made) an image's identifier."""


def instance_uid(ds: Any, path: str | Path) -> tuple[str, str]:
    """The image's instance identifier and its source (one of :data:`UID_SOURCES`).

    The tag SOPInstanceUID (0008,0018); without it, the file meta's MediaStorageSOPInstanceUID
    (0002,0003); without either, a UID derived from the file's bytes: ``2.25.`` and the first 128
    bits of their SHA-256 as a decimal number (the UUID-derived form of PS3.5 B.2). The same file
    always gets the same identifier, wherever it lies, and an identical copy repeats it.
    """
    import hashlib

    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if uid:
        return uid, "SOPInstanceUID"
    meta = getattr(ds, "file_meta", None)
    uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip() if meta is not None else ""
    if uid:
        return uid, "MediaStorageSOPInstanceUID"
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return f"2.25.{int(digest.hexdigest()[:32], 16)}", "content_sha256"


_IMPLICIT_LE, _EXPLICIT_LE, _EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"


def open_dicom(path: str | Path, *, pixel_budget: int = DEFAULT_PIXEL_BUDGET) -> Any:
    """Parse a DICOM file's header, deferring large values (the pixel data) until needed.

    Reads Part 10 files, datasets without the preamble and 'DICM' marker (older exports and
    ACR-NEMA files: without file meta, the transfer syntax is the encoding the dataset was read
    in), and either compressed with gzip. Bytes that do not parse as a dataset are refused
    (``not_dicom``), never force-read. A gzip file must decompress, and a deflated dataset
    inflate, to less than ``pixel_budget`` plus 64 MiB. A DICOMDIR (``dicomdir``) and objects
    that are not images (``non_image_object``: structured reports, presentation states, RT
    structures and plans, segmentations, waveforms, encapsulated documents) are refused here.
    """
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError

    path = Path(path)
    if not path.is_file():
        raise errors.MissingImage(f"image file not found: {path.name}")
    limit = pixel_budget + _HEADER_ALLOWANCE
    source = _dicom_bytes(path, limit)
    try:
        _check_inflated_size(source, limit)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if source.data is None:
                ds = pydicom.dcmread(path, defer_size="256 KB", force=source.kind == "bare")
            else:
                ds = pydicom.dcmread(io.BytesIO(source.data), force=source.kind == "bare")
    except errors.InputError:
        raise
    except InvalidDicomError:
        raise errors.NotDicom(f"{path.name}: not a valid DICOM file") from None
    except RecursionError:
        raise errors.CorruptImage(f"{path.name}: DICOM sequences nested too deeply to parse") from None
    except BytesLengthException:
        raise errors.CorruptImage(f"{path.name}: {_WRONG_LENGTH}") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, NotImplementedError,
            OverflowError, struct.error, zlib.error) as exc:
        raise errors.TruncatedFile(f"{path.name}: DICOM header cannot be parsed ({type(exc).__name__})") from None
    for warning in caught:
        # pydicom drops an element cut off by the end of the file with only a warning.
        if "End of file" in str(warning.message):
            raise errors.TruncatedFile(f"{path.name}: the file ends inside a data element (truncated)")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not ds.keys():
        if source.kind == "bare":
            raise errors.NotDicom(f"{path.name}: not a valid DICOM file (no data elements)")
        meta_length = getattr(ds.file_meta, "FileMetaInformationGroupLength", None)
        if not isinstance(meta_length, int) or 144 + meta_length >= source.size:
            raise errors.TruncatedFile(f"{path.name}: the file ends in or right after its file meta group (truncated)")
    with _element_errors(path):
        if source.kind == "bare" and not getattr(ds.file_meta, "TransferSyntaxUID", None):
            implicit, little = ds.original_encoding  # ACR-NEMA: no file meta; the encoding pydicom read it in
            ds.file_meta.TransferSyntaxUID = _IMPLICIT_LE if implicit else _EXPLICIT_LE if little else _EXPLICIT_BE
        _check_lengths(ds, source)
        _check_image_object(ds, path)
    return ds


_WRONG_LENGTH = "a DICOM element's length does not fit its value representation"


@contextlib.contextmanager
def _element_errors(path: Path) -> Iterator[None]:
    """pydicom converts an element's value when it is first used: a value whose length does not fit
    its VR (or a sequence nested past the recursion limit) then raises wherever that happens."""
    from pydicom.errors import BytesLengthException

    try:
        yield
    except BytesLengthException:
        raise errors.CorruptImage(f"{path.name}: {_WRONG_LENGTH}") from None
    except RecursionError:
        raise errors.CorruptImage(f"{path.name}: DICOM sequences nested too deeply to parse") from None


_NON_IMAGE_CLASSES = (
    # (SOP Class UID, or a prefix ending in '.', and what it is): PS3.4 Annex B.5, PS3.6 Annex A.
    ("1.2.840.10008.5.1.4.1.1.88.59", "a key object selection"),
    ("1.2.840.10008.5.1.4.1.1.88.", "a structured report"),
    ("1.2.840.10008.5.1.4.1.1.11.", "a presentation state"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "an RT dose grid"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "an RT structure set"),
    ("1.2.840.10008.5.1.4.1.1.481.", "a radiotherapy plan or record"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data"),
    ("1.2.840.10008.5.1.4.1.1.66.1", "a spatial registration"),
    ("1.2.840.10008.5.1.4.1.1.66.2", "spatial fiducials"),
    ("1.2.840.10008.5.1.4.1.1.66.3", "a deformable spatial registration"),
    ("1.2.840.10008.5.1.4.1.1.66.", "a segmentation"),
    ("1.2.840.10008.5.1.4.1.1.67", "a real world value mapping"),
    ("1.2.840.10008.5.1.4.1.1.68.", "a surface scan"),
    ("1.2.840.10008.5.1.4.1.1.9.", "a waveform"),
    ("1.2.840.10008.5.1.4.1.1.104.", "an encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.78.", "an ophthalmic measurement"),
    ("1.2.840.10008.5.1.4.1.1.79.", "an ophthalmic measurement"),
    ("1.2.840.10008.5.1.4.1.1.80.", "an ophthalmic measurement"),
    ("1.2.840.10008.5.1.4.1.1.81.", "an ophthalmic measurement"),
    ("1.2.840.10008.5.1.4.1.1.82.", "an ophthalmic measurement"),
    ("1.2.840.10008.5.1.4.1.1.90.", "an assessment"),
    ("1.2.840.10008.5.1.4.1.1.91.", "an annotation"),
    ("1.2.840.10008.5.1.4.1.1.200.", "a protocol"),
    ("1.2.840.10008.5.1.4.38.", "a hanging protocol"),
    ("1.2.840.10008.5.1.4.39.", "a colour palette"),
    ("1.2.840.10008.5.1.4.43.", "an implant template"),
    ("1.2.840.10008.5.1.4.44.", "an implant template"),
    ("1.2.840.10008.5.1.4.45.", "an implant template"),
)
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_IMAGE_CLASSES_AMONG_THEM = {"1.2.840.10008.5.1.4.1.1.481.1"}  # RT Image Storage


def _sop_class(ds: Any) -> str:
    for value in (ds.get("SOPClassUID"), getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)):
        text = str(value or "").strip().rstrip("\0")
        if text:
            return text
    return ""


def _check_image_object(ds: Any, path: Path) -> None:
    """Refuse a DICOMDIR and objects whose SOP class is not an image (PS3.4 Annex B.5)."""
    try:
        sop = _sop_class(ds)
        directory = sop == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds
    except Exception:  # noqa: BLE001 - an unparsable SOP class: the pixel checks decide
        return
    if directory:
        raise errors.DicomDirectory(
            f"{path.name}: a DICOMDIR (SOPClassUID {_DICOMDIR_CLASS}, Media Storage Directory Storage) lists other "
            "files and holds no image; the files it lists are read only where they are part of the source"
        )
    if sop in _IMAGE_CLASSES_AMONG_THEM or not re.fullmatch(r"[0-9][0-9.]{0,63}", sop):
        return
    for prefix, what in _NON_IMAGE_CLASSES:
        if sop == prefix or (prefix.endswith(".") and sop.startswith(prefix)):
            from pydicom.uid import UID

            name = UID(sop).name
            named = f" ({name})" if name and name != sop else ""
            raise errors.NonImageObject(
                f"{path.name}: tag {_tag('SOPClassUID')} is {sop}{named}, {what}, not an image"
            )


def _check_lengths(ds: Any, source: _DicomBytes) -> None:
    """The pixel data or the last element running past the end of the file: truncated.

    pydicom accepts a short read of a value, or a cut element header, at the end of a file
    without a word.
    """
    from pydicom.datadict import keyword_for_tag

    path = source.path
    if str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")) == DEFLATED:
        return  # offsets refer to the inflated stream
    size = source.size
    tags = list(ds.keys())
    candidates = [t for t in (0x7FE00010, 0x7FE00008, 0x7FE00009) if t in ds] + tags[-1:]
    for tag in candidates:
        raw = ds.get_item(tag, keep_deferred=True)  # offsets only: never read or convert the value
        tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
        if tell is not None and length is not None and length != 0xFFFFFFFF and tell + length > size:
            keyword = keyword_for_tag(tag)
            name = _tag(keyword) if keyword else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
            raise errors.TruncatedFile(f"{path.name}: element {name} is longer than the rest of the file (truncated)")
    last = ds.get_item(tags[-1], keep_deferred=True) if tags else None
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is not None and length is not None and length != 0xFFFFFFFF and 0 < size - (tell + length) < 8:
        with source.open() as fh:  # fewer bytes than an element header left over: a cut header
            fh.seek(tell + length)
            if fh.read().strip(b"\x00"):
                raise errors.TruncatedFile(f"{path.name}: the file ends inside a data element header (truncated)")


@dataclasses.dataclass(frozen=True)
class _Header:
    tsyntax: str
    rows: int
    cols: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    photometric: str


def _transfer_syntax_text(uid: str) -> str:
    from pydicom.uid import UID

    if not re.fullmatch(r"[0-9][0-9.]{0,63}", uid):
        return "(not a valid UID)"
    name = ALLOWED_TRANSFER_SYNTAXES.get(uid) or UID(uid).name
    return f"{uid} ({name if name != uid else 'unknown transfer syntax'})"


def _check_header(ds: Any, path: Path, pixel_budget: int) -> _Header:
    """Everything decidable from the header, checked before any pixel is decoded."""
    _check_image_object(ds, path)
    tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if not tsyntax:
        raise errors.UnsupportedTransferSyntax(f"{path.name}: missing tag {_tag('TransferSyntaxUID')}")
    if tsyntax not in ALLOWED_TRANSFER_SYNTAXES:
        raise errors.UnsupportedTransferSyntax(
            f"{path.name}: transfer syntax {_transfer_syntax_text(tsyntax)} in tag {_tag('TransferSyntaxUID')} "
            "is not supported (supported: uncompressed, deflated, JPEG Baseline/Extended, JPEG Lossless, "
            "JPEG-LS, JPEG 2000, RLE Lossless)"
        )
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise errors.NoPixelData(f"{path.name}: no {_tag('PixelData')} element")

    rows = _header_int(ds, "Rows", path)
    cols = _header_int(ds, "Columns", path)
    frames = _header_int(ds, "NumberOfFrames", path, 1)
    samples = _header_int(ds, "SamplesPerPixel", path, 1)
    bits_alloc = _header_int(ds, "BitsAllocated", path)
    for keyword, value in (("Rows", rows), ("Columns", cols), ("NumberOfFrames", frames),
                           ("SamplesPerPixel", samples), ("BitsAllocated", bits_alloc)):
        if value <= 0:
            raise errors.UnsupportedPixelFormat(f"{path.name}: tag {_tag(keyword)} must be > 0")
    needed = rows * cols * frames * samples * max(bits_alloc // 8, 1)
    if needed > pixel_budget:
        raise errors.PixelBudgetExceeded(
            f"{path.name}: Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated/8 = "
            f"{needed} bytes exceeds the pixel budget of {pixel_budget} bytes"
        )
    if samples not in (1, 3):
        raise errors.UnsupportedPixelFormat(f"{path.name}: tag {_tag('SamplesPerPixel')} must be 1 or 3")
    if bits_alloc not in (1, 8, 16, 32, 64):
        raise errors.UnsupportedPixelFormat(f"{path.name}: tag {_tag('BitsAllocated')} must be 1, 8, 16, 32 or 64")
    bits_stored = _header_int(ds, "BitsStored", path, bits_alloc)
    if not 1 <= bits_stored <= bits_alloc:
        raise errors.UnsupportedPixelFormat(
            f"{path.name}: tag {_tag('BitsStored')} must be between 1 and {_tag('BitsAllocated')}"
        )
    if _header_int(ds, "PixelRepresentation", path, 0) not in (0, 1):
        raise errors.UnsupportedPixelFormat(f"{path.name}: tag {_tag('PixelRepresentation')} must be 0 or 1")
    if samples == 3 and _header_int(ds, "PlanarConfiguration", path, 0) not in (0, 1):
        raise errors.UnsupportedPixelFormat(f"{path.name}: tag {_tag('PlanarConfiguration')} must be 0 or 1")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    allowed = _GRAY_PHOTOMETRIC if samples == 1 else _COLOUR_PHOTOMETRIC
    if photometric not in allowed:
        raise errors.UnsupportedPixelFormat(
            f"{path.name}: tag {_tag('PhotometricInterpretation')} must be one of {', '.join(allowed)} "
            f"for SamplesPerPixel {samples}"
        )
    return _Header(tsyntax, rows, cols, frames, samples, bits_alloc, bits_stored, photometric)


def _pick_frame(header: _Header, path: Path, frame: int | None, frame_policy: str) -> int:
    frames = header.frames
    if frames > 1:
        if frame is None:
            if frame_policy == "reject":
                raise errors.UnsupportedPixelFormat(
                    f"{path.name}: multi-frame file (NumberOfFrames={frames}) rejected by frame policy 'reject'"
                )
            frame = 0 if frame_policy == "first" else frames // 2
        if not 0 <= frame < frames:
            raise errors.UsageError(f"frame must be in [0, {frames - 1}], got {frame}")
        return frame
    if frame not in (None, 0):
        raise errors.UsageError(f"frame must be 0 for a single-frame file, got {frame}")
    return 0


def _decode_error(exc: Exception, path: Path) -> errors.InputError:
    kind = type(exc).__name__
    if isinstance(exc, (EOFError, OSError)) or "less than expected" in str(exc):
        return errors.TruncatedFile(f"{path.name}: {_tag('PixelData')} is shorter than the header says ({kind})")
    if isinstance(exc, (AttributeError, KeyError, TypeError)):
        return errors.UnsupportedPixelFormat(f"{path.name}: Image Pixel module elements are missing or invalid "
                                             f"({kind})")
    return errors.CorruptImage(f"{path.name}: {_tag('PixelData')} cannot be decoded ({kind})")


_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                  "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
_JPEG_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
"""Start-of-frame markers: JPEG processes 0-15 (not DHT, JPG, DAC) and JPEG-LS (SOF55)."""


def _codestream_size(frame: bytes, tsyntax: str) -> tuple[int, int] | None:
    """(width, height) a JPEG, JPEG-LS or JPEG 2000 codestream declares, or None where it cannot be read.

    JPEG and JPEG-LS: the first start-of-frame segment (T.81 B.2.2, T.87 C.2.2); JPEG 2000: the SIZ
    segment after SOC (T.800 A.5.1), as Xsiz - XOsiz by Ysiz - YOsiz.
    """
    if tsyntax in _J2K_SYNTAXES:
        at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC, SIZ (after any JP2 boxes)
        if at < 0 or len(frame) < at + 24:
            return None
        x, y, x0, y0 = struct.unpack(">IIII", frame[at + 8:at + 24])
        return x - x0, y - y0
    if not frame.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _JPEG_SOF:
            if pos + 9 > len(frame):
                return None
            height, width = struct.unpack(">HH", frame[pos + 5:pos + 9])
            return width, height
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
        elif marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            return None
        else:
            pos += 2 + struct.unpack(">H", frame[pos + 2:pos + 4])[0]
    return None


def _check_codestreams(ds: Any, path: Path, header: _Header, indices: Sequence[int]) -> None:
    """Each encapsulated frame to decode must declare the header's Columns x Rows.

    A decoder allocates what its codestream declares, not what the DICOM header says: a
    64 x 64 image whose JPEG says 60000 x 60000 would need gigabytes before failing.
    """
    if header.tsyntax not in _JPEG_SYNTAXES | _J2K_SYNTAXES:
        return
    from pydicom.encaps import generate_frames

    wanted = set(indices)
    for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=header.frames)):
        if i in wanted:
            size = _codestream_size(frame, header.tsyntax)
            if size is not None and size != (header.cols, header.rows):
                raise errors.CorruptImage(
                    f"{path.name}: frame {i} of {_tag('PixelData')} is a codestream of {size[0]} x {size[1]} pixels, "
                    f"not the {_tag('Columns')} x {_tag('Rows')} of the header ({header.cols} x {header.rows})"
                )
            wanted.discard(i)
        if not wanted:
            return


def _decode(ds: Any, path: Path, header: _Header, indices: Sequence[int]) -> Iterator[tuple[np.ndarray, dict]]:
    """Decoded frames (raw stored values; YBR already converted to RGB by pydicom, once)."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(header.tsyntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise errors.UnsupportedTransferSyntax(
            f"{path.name}: no decoder installed for transfer syntax {_transfer_syntax_text(header.tsyntax)} "
            "(install pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg)"
        )
    # allow_excess_frames=False: never decode more frames than NumberOfFrames (the budget's count).
    opts: dict[str, Any] = {"as_rgb": True, "allow_excess_frames": False}
    try:
        _check_codestreams(ds, path, header, indices)
        if len(indices) == 1:
            yield decoder.as_array(ds, index=indices[0], **opts)
        else:
            yield from decoder.iter_array(ds, indices=indices, **opts)
    except errors.InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - codecs raise many types; one bad file, one typed error
        raise _decode_error(exc, path) from None


def _frame_attr(ds: Any, keyword: str, group: str, index: int) -> Any:
    """An attribute of frame ``index``: per-frame, then shared functional groups, then top level."""
    for fg, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        try:
            item = ds[fg].value[i][group].value[0]
            value = item.get(keyword)
        except (KeyError, IndexError, AttributeError, TypeError):
            continue
        if value is not None and value != "":
            return value
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - an unparsable value counts as absent
        return None


_RESCALE_LIMIT = 1e30
"""Largest |RescaleSlope| and |RescaleIntercept| taken: 16-bit values rescaled stay finite in float32."""


def _modality_lut(arr: np.ndarray, ds: Any, index: int, path: Path) -> np.ndarray:
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        try:
            return apply_modality_lut(arr, ds).astype(np.float64)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, NotImplementedError, struct.error):
            raise errors.UnsupportedPixelFormat(
                f"{path.name}: the LUT in {_tag('ModalityLUTSequence')} cannot be applied (its LUTDescriptor "
                "does not match its LUTData)"
            ) from None
    slope = _number(_frame_attr(ds, "RescaleSlope", "PixelValueTransformationSequence", index), 1.0)
    intercept = _number(_frame_attr(ds, "RescaleIntercept", "PixelValueTransformationSequence", index), 0.0)
    if not (abs(slope) <= _RESCALE_LIMIT and abs(intercept) <= _RESCALE_LIMIT):
        raise errors.UnsupportedPixelFormat(
            f"{path.name}: tag {_tag('RescaleSlope')} or {_tag('RescaleIntercept')} is beyond +/-{_RESCALE_LIMIT:g}"
        )
    if arr.dtype.itemsize <= 2:  # 8/16-bit stored values: float32 holds them and their rescale exactly enough
        out = arr.astype(np.float32)
        if slope != 1.0:
            out *= np.float32(slope)
        if intercept != 0.0:
            out += np.float32(intercept)
        return out
    return arr.astype(np.float64) * slope + intercept


def _display_lut(arr: np.ndarray, ds: Any, index: int, photometric: str, path: Path) -> np.ndarray | None:
    """The whole display transform as a table over every possible stored value, or None.

    For 8/16-bit integer pixels with a rescale (no Modality LUT) and a window (no VOI LUT),
    rescale -> window -> MONOCHROME1 inversion is a function of the stored value alone; the
    table gives exactly the per-pixel result at the cost of one lookup per pixel.
    """
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize > 2 or ds.get("ModalityLUTSequence") \
            or ds.get("VOILUTSequence"):
        return None
    center = _number(_frame_attr(ds, "WindowCenter", "FrameVOILUTSequence", index), np.nan)
    width = _number(_frame_attr(ds, "WindowWidth", "FrameVOILUTSequence", index), np.nan)
    function = str(_frame_attr(ds, "VOILUTFunction", "FrameVOILUTSequence", index) or "LINEAR").upper()
    if not (np.isfinite(center) and np.isfinite(width) and (width >= 1 or (width > 0 and function != "LINEAR"))):
        return None
    unsigned = np.uint8 if arr.dtype.itemsize == 1 else np.uint16
    domain = np.arange(1 << (8 * arr.dtype.itemsize), dtype=unsigned).view(arr.dtype)  # index order = bit pattern
    lut = window(_modality_lut(domain, ds, index, path), center, width, function)
    if photometric == "MONOCHROME1":
        lut = np.subtract(np.float32(1.0), lut, dtype=np.float32)
    return np.ascontiguousarray(lut, dtype=np.float32)


def _voi(values: np.ndarray, ds: Any, index: int) -> tuple[np.ndarray, str]:
    """VOI LUT, else the first window, else a percentile window; returns (pixels, which)."""
    if ds.get("VOILUTSequence"):
        from pydicom.pixels import apply_voi

        try:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            out = apply_voi(np.rint(values).astype(np.int64), ds, index=0)
            return np.clip(out.astype(np.float32) / float((1 << bits) - 1), 0, 1), "voi_lut"
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, NotImplementedError, struct.error):
            pass  # an unusable LUT: fall back to the window
    center = _number(_frame_attr(ds, "WindowCenter", "FrameVOILUTSequence", index), np.nan)
    width = _number(_frame_attr(ds, "WindowWidth", "FrameVOILUTSequence", index), np.nan)
    function = str(_frame_attr(ds, "VOILUTFunction", "FrameVOILUTSequence", index) or "LINEAR").upper()
    if np.isfinite(center) and np.isfinite(width) and (width >= 1 or (width > 0 and function != "LINEAR")):
        return window(values, center, width, function), "window"
    return percentile_window(values), "percentile"


def _palette(arr: np.ndarray, ds: Any, path: Path) -> np.ndarray:
    """PALETTE COLOR to RGB in [0, 1], scaled by the LUT's nominal bit depth."""
    from pydicom.pixels import apply_color_lut

    try:
        n_entries, first_mapped, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
        if "RedPaletteColorLookupTableData" in ds:
            # pydicom 3.0 reads 16-bit LUT data as little endian even in a big-endian dataset.
            little = str(ds.file_meta.TransferSyntaxUID) != "1.2.840.10008.1.2.2"
            n_entries = n_entries or 1 << 16
            luts = []
            for colour in ("Red", "Green", "Blue"):
                raw = ds[f"{colour}PaletteColorLookupTableData"].value
                if isinstance(raw, (bytes, bytearray)):
                    size = 2 if len(raw) >= 2 * n_entries else 1
                    luts.append(np.frombuffer(raw[: size * n_entries], dtype=f"{'<' if little else '>'}u{size}"))
                else:
                    luts.append(np.asarray(raw, dtype=np.int64))
            index = np.clip(arr.astype(np.int64) - first_mapped, 0, min(len(lut) for lut in luts) - 1)
            rgb = np.stack([lut[index] for lut in luts], axis=-1)
        else:  # segmented palettes
            rgb = apply_color_lut(arr, ds)[..., :3]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, struct.error):
        raise errors.UnsupportedPixelFormat(
            f"{path.name}: PALETTE COLOR image without a usable {_tag('RedPaletteColorLookupTableDescriptor')} "
            "or palette data"
        ) from None
    return np.clip(rgb.astype(np.float32) / float((1 << bits) - 1), 0, 1)


def _record(ds: Any, path: Path, header: _Header, arr: np.ndarray, props: dict, index: int) -> ImageRecord:
    photometric = str(props.get("photometric_interpretation", header.photometric)).upper()
    if header.samples == 3:
        if photometric != "RGB":
            raise errors.UnsupportedPixelFormat(
                f"{path.name}: the colour space in tag {_tag('PhotometricInterpretation')} cannot be converted to RGB"
            )
        pixels = np.clip(arr.astype(np.float32) / float((1 << header.bits_stored) - 1), 0, 1)
        voi = "bit_depth"
    elif photometric == "PALETTE COLOR":
        pixels, voi = _palette(arr, ds, path), "palette"
    else:
        lut = _display_lut(arr, ds, index, photometric, path)
        if lut is not None:  # one gather instead of rescale, window and inversion over every pixel
            unsigned = arr.view(np.uint8 if arr.dtype.itemsize == 1 else np.uint16)
            pixels, voi = lut[unsigned], "window"
        else:
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise errors.UnsupportedPixelFormat(f"{path.name}: float pixel data holds NaN or infinite values")
            pixels, voi = _voi(_modality_lut(arr, ds, index, path), ds, index)
            if photometric == "MONOCHROME1":
                pixels = np.subtract(np.float32(1.0), pixels, dtype=np.float32)
    meta = dicom_metadata(ds)
    meta.update(
        rows=header.rows, columns=header.cols, frames=header.frames, n_frames=header.frames, frame=index,
        transfer_syntax=header.tsyntax, source_format="dicom", voi_source=voi,
    )
    return ImageRecord(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=meta)


def decode_dicom(ds: Any, path: str | Path, frame: int | None = None, frame_policy: str = "first",
                 pixel_budget: int = DEFAULT_PIXEL_BUDGET) -> ImageRecord:
    """Display-ready pixels of one frame of a dataset from :func:`open_dicom`; the header is checked first."""
    path = Path(path)
    _check_policy(frame_policy, single=True)
    with _element_errors(path):
        header = _check_header(ds, path, pixel_budget)
        index = _pick_frame(header, path, frame, frame_policy)
        ((arr, props),) = _decode(ds, path, header, [index])
        return _record(ds, path, header, arr, props, index)


def decode_dicom_frames(ds: Any, path: str | Path, *, frame_policy: str = "all",
                        pixel_budget: int = DEFAULT_PIXEL_BUDGET) -> list[ImageRecord]:
    """One record per frame kept by ``frame_policy`` (``all``: every frame, in order)."""
    path = Path(path)
    _check_policy(frame_policy)
    with _element_errors(path):
        header = _check_header(ds, path, pixel_budget)
        if frame_policy == "all":
            indices = list(range(header.frames))
        else:
            indices = [_pick_frame(header, path, None, frame_policy)]
        return [_record(ds, path, header, arr, props, index)
                for index, (arr, props) in zip(indices, _decode(ds, path, header, indices), strict=True)]


def age_band(patient_age: str | None) -> str:
    """DICOM AS ('065Y') to a decade band; 90 and over grouped (HIPAA Safe Harbor)."""
    if not patient_age:
        return "unknown"
    text = str(patient_age).strip().upper()
    try:
        n, unit = int(text[:-1]), text[-1]
    except ValueError:
        return "unknown"
    years = {"Y": n, "M": n / 12, "W": n / 52, "D": n / 365}.get(unit)
    if years is None:
        return "unknown"
    if years >= 90:
        return "90+"
    lo = int(years // 10) * 10
    return f"{lo}-{lo + 9}"


def _pixel_spacing(ds: Any) -> list[float] | None:
    """[row, column] spacing in mm from PixelSpacing (or the functional groups) or ImagerPixelSpacing."""
    for value in (_frame_attr(ds, "PixelSpacing", "PixelMeasuresSequence", 0),
                  _frame_attr(ds, "ImagerPixelSpacing", "", 0)):
        if value is None or value == "":
            continue
        try:
            parts = [float(v) for v in value] if not isinstance(value, (str, bytes, float, int)) else [float(value)]
        except (TypeError, ValueError):
            continue
        parts = parts * 2 if len(parts) == 1 else parts[:2]
        if len(parts) == 2 and all(np.isfinite(v) and v > 0 for v in parts):
            return parts
    return None


def dicom_metadata(ds: Any) -> dict[str, Any]:
    """Metadata that is safe to keep: no names, identifiers, dates or free text.

    ``pixel_spacing`` is ``[row, column]`` in mm or ``None``; ``burned_in_annotation``
    is ``"YES"``, ``"NO"`` or ``""`` (tag BurnedInAnnotation (0028,0301) absent or other).
    """
    def text(keyword: str) -> str:
        try:
            value = ds.get(keyword, "")
        except Exception:  # noqa: BLE001 - an unparsable value counts as absent
            return ""
        return str(value).strip() if value is not None else ""

    view = text("ViewPosition").upper()
    burned = text("BurnedInAnnotation").upper()
    try:
        bits_stored = int(ds.get("BitsStored", 0) or 0)
    except (TypeError, ValueError):
        bits_stored = 0
    return {
        "modality": text("Modality") or "OT",
        "view": view or "UNKNOWN",
        "laterality": (text("ImageLaterality") or text("Laterality") or "U").upper(),
        "body_part": text("BodyPartExamined").upper(),
        "manufacturer": text("Manufacturer"),
        "photometric": text("PhotometricInterpretation").upper(),
        "pixel_spacing": _pixel_spacing(ds),
        "sex": text("PatientSex").upper() or "U",
        "age_band": age_band(text("PatientAge")),
        "bits_stored": bits_stored,
        "burned_in_annotation": burned if burned in ("YES", "NO") else "",
    }


# --------------------------------------------------------------------------- PNG / JPEG


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _raster_bytes_per_pixel(im: Any) -> int:
    per_band = 2 if im.mode.startswith("I;16") else 4 if im.mode in ("I", "F") else 1
    return len(im.getbands()) * per_band


def _raster_pixels(im: Any) -> tuple[np.ndarray, int, str]:
    """(pixels, bits per sample, how they were scaled) of a loaded Pillow image."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        arr = np.asarray(im).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        pixels = (arr - lo) / (hi - lo) if hi > lo else np.zeros(arr.shape)
        return pixels, 16, "min_max"
    if mode in ("L", "1"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0, 8, "bit_depth"
    if mode in ("LA", "La"):
        return np.asarray(im.getchannel("L"), dtype=np.float32) / 255.0, 8, "bit_depth"
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)  # drops alpha; palettes, CMYK, YCbCr to RGB
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return rgb[..., 0].astype(np.float32) / 255.0, 8, "bit_depth"
    return rgb.astype(np.float32) / 255.0, 8, "bit_depth"


def _read_raster(path: Path, pixel_budget: int) -> ImageRecord:
    """PNG or JPEG; the budget is checked from the header, before the pixels are decoded."""
    from PIL import Image

    try:
        with Image.open(path, formats=("PNG", "JPEG")) as im:
            width, height = im.size
            fmt = (im.format or "").lower()
            needed = width * height * _raster_bytes_per_pixel(im)
            if needed > pixel_budget:
                raise errors.PixelBudgetExceeded(
                    f"{path.name}: {width} x {height} pixels ({needed} bytes) exceeds the pixel budget of "
                    f"{pixel_budget} bytes"
                )
            im.load()
            pixels, bits, scaling = _raster_pixels(im)
    except errors.InputError:
        raise
    except Image.DecompressionBombError:
        raise errors.PixelBudgetExceeded(f"{path.name}: image size exceeds Pillow's decompression-bomb limit") \
            from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad bytes; one typed error
        raise errors.CorruptImage(f"{path.name}: image cannot be decoded ({type(exc).__name__})") from None
    meta = {
        "modality": "OT", "view": "UNKNOWN", "laterality": "U", "body_part": "", "manufacturer": "",
        "photometric": "RGB" if pixels.ndim == 3 else "MONOCHROME2", "pixel_spacing": None,
        "sex": "U", "age_band": "unknown", "bits_stored": bits, "burned_in_annotation": "",
        "rows": height, "columns": width, "frames": 1, "n_frames": 1, "frame": 0, "transfer_syntax": "",
        "source_format": "jpeg" if fmt in ("jpeg", "jpg", "mpo") else "png", "voi_source": scaling,
    }
    return ImageRecord(pixels=np.clip(pixels, 0, 1).astype(np.float32), meta=meta)


def resize_pixels(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrink (never enlarge) so that the longest side is at most ``max_side``, by area averaging.

    When both sides shrink by the same whole factor (1024 -> 256), the block mean is computed
    by ``Image.reduce``, which gives the BOX filter's result at about half its cost.
    """
    from PIL import Image

    h, w = pixels.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return pixels
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    factor = w // size[0]
    whole = factor > 1 and w == size[0] * factor and h == size[1] * factor

    def shrink(channel: np.ndarray) -> np.ndarray:
        im = Image.fromarray(np.asarray(channel, dtype=np.float32), mode="F")
        return np.asarray(im.reduce(factor) if whole else im.resize(size, Image.Resampling.BOX))

    if pixels.ndim == 2:
        return shrink(pixels)
    return np.stack([shrink(pixels[..., c]) for c in range(pixels.shape[-1])], -1)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray) -> bytes:
    """A PNG of a uint16 (H, W), uint8 (H, W) or uint8 (H, W, 3) array: no filter, run-length deflate.

    On 16-bit radiographs, whose noise defeats LZ77 matching, run-length deflate is about as
    small as the default compression; the rows are written directly, without Pillow's per-mode
    conversions (bench/ingest_vs_naive.py measures ingest as a whole).
    """
    if pixels.size == 0:
        raise ValueError(f"encode_png: empty image of shape {pixels.shape}")
    if pixels.dtype == np.uint16 and pixels.ndim == 2:
        depth, colour, row = 16, 0, np.ascontiguousarray(pixels, dtype=">u2").view(np.uint8)
    elif pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[-1] == 3:
        depth, colour, row = 8, 2, np.ascontiguousarray(pixels)
    elif pixels.dtype == np.uint8 and pixels.ndim == 2:
        depth, colour, row = 8, 0, np.ascontiguousarray(pixels)
    else:
        raise ValueError(f"encode_png takes uint16 (H, W) or uint8 (H, W[, 3]) pixels, got {pixels.dtype} "
                         f"{pixels.shape}")
    h, w = pixels.shape[:2]
    raw = np.zeros((h, 1 + row.size // h), np.uint8)  # column 0: filter type None
    raw[:, 1:] = row.reshape(h, -1)
    deflate = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
    data = deflate.compress(raw.data) + deflate.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
            + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))


def to_png_bytes(pixels: np.ndarray, max_side: int | None = None) -> bytes:
    """Encode display-ready pixels (shrunk to ``max_side``) as a 16-bit grayscale (or 8-bit RGB) PNG."""
    pixels = np.clip(resize_pixels(pixels, max_side), 0, 1)
    if pixels.ndim == 3:
        return encode_png(np.round(pixels[..., :3] * 255).astype(np.uint8))
    return encode_png(np.round(pixels * 65535).astype(np.uint16))
