"""The one image reader: DICOM, PNG and JPEG to display-ready float pixels.

Training, evaluation, export and scoring all read through :func:`read_image`, so
the pixels a model sees are the same everywhere. For DICOM the order is the
standard's: stored values -> modality LUT (rescale slope/intercept) -> VOI LUT
or the file's first window (a percentile window when the file has none) ->
MONOCHROME1 inverted, so that a higher value is always brighter.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic import errors

DEFAULT_PIXEL_BUDGET = 1 << 30  # bytes of decoded pixel data per file

# Transfer syntaxes we decode. Anything else is rejected with its UID named.
ALLOWED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
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

FRAME_POLICIES = ("first", "middle", "reject")


@dataclasses.dataclass
class ImageRecord:
    """Display-ready pixels and de-identified metadata of one image."""

    pixels: np.ndarray
    """float32, (H, W) grayscale or (H, W, 3) colour, in [0, 1], higher is brighter."""
    meta: dict[str, Any]


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image(path: str | Path, frame: int | None = None, *, frame_policy: str = "first",
               pixel_budget: int = DEFAULT_PIXEL_BUDGET) -> ImageRecord:
    """Read a DICOM, PNG or JPEG file into an :class:`ImageRecord`.

    ``frame`` picks one frame of a multi-frame DICOM; otherwise ``frame_policy``
    (``first``, ``middle`` or ``reject``) decides. Bad input raises a subclass of
    :class:`mmclinic.errors.InputError` whose message names the tag or field.
    """
    path = Path(path)
    if not path.is_file():
        raise errors.MissingImage(f"image file not found: {path.name}")
    if _is_dicom(path):
        return decode_dicom(open_dicom(path), path, frame, frame_policy, pixel_budget)
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic.startswith(b"\x89PNG") or magic.startswith(b"\xff\xd8\xff"):
        return _read_raster(path, pixel_budget)
    raise errors.NotDicom(
        f"{path.name}: not a DICOM file (no 'DICM' marker at byte 128) and not PNG or JPEG"
    )


# --------------------------------------------------------------------------- DICOM


def _header_int(ds: Any, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise errors.UnsupportedPixelFormat(f"missing required tag {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise errors.UnsupportedPixelFormat(f"tag {keyword} is not an integer") from None


def _first(value: Any) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


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
        out = (values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def percentile_window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    """Robust fallback when a file carries no window: map [p_lo, p_hi] to [0, 1]."""
    a, b = np.percentile(values, [lo, hi])
    if b <= a:
        a, b = float(values.min()), float(values.max())
    if b <= a:
        return np.zeros(values.shape, np.float32)
    return np.clip((values - a) / (b - a), 0.0, 1.0).astype(np.float32)


def open_dicom(path: str | Path) -> Any:
    """Parse a DICOM file's header, deferring large values (the pixel data) until needed.

    Refuses files without the 'DICM' marker instead of forcing a read of arbitrary bytes.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not _is_dicom(path):
        raise errors.NotDicom(f"{path.name}: not a DICOM file (no 'DICM' marker at byte 128)")
    try:
        return pydicom.dcmread(path, defer_size="256 KB")
    except InvalidDicomError:
        raise errors.NotDicom(f"{path.name}: not a valid DICOM file") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise errors.TruncatedFile(f"{path.name}: DICOM header cannot be parsed ({type(exc).__name__})") from None


def decode_dicom(ds: Any, path: str | Path, frame: int | None = None, frame_policy: str = "first",
                 pixel_budget: int = DEFAULT_PIXEL_BUDGET) -> ImageRecord:
    """Display-ready pixels of a dataset from :func:`open_dicom`; the header is checked first."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    if frame_policy not in FRAME_POLICIES:
        raise errors.UsageError(f"frame_policy must be one of {FRAME_POLICIES}, got {frame_policy!r}")
    tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if not tsyntax:
        raise errors.UnsupportedTransferSyntax(f"{path.name}: missing tag TransferSyntaxUID (0002,0010)")
    if tsyntax not in ALLOWED_TRANSFER_SYNTAXES:
        raise errors.UnsupportedTransferSyntax(
            f"{path.name}: transfer syntax {tsyntax} (tag TransferSyntaxUID) is not supported"
        )
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise errors.NoPixelData(f"{path.name}: no PixelData (7FE0,0010) element")

    rows = _header_int(ds, "Rows")
    cols = _header_int(ds, "Columns")
    frames = _header_int(ds, "NumberOfFrames", 1)
    samples = _header_int(ds, "SamplesPerPixel", 1)
    bits_alloc = _header_int(ds, "BitsAllocated")
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise errors.PixelBudgetExceeded(f"{path.name}: tags Rows/Columns/NumberOfFrames must be > 0")
    needed = rows * cols * frames * samples * max(bits_alloc // 8, 1)
    if needed > pixel_budget:
        raise errors.PixelBudgetExceeded(
            f"{path.name}: Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated/8 = "
            f"{needed} bytes exceeds the pixel budget of {pixel_budget} bytes"
        )
    if samples not in (1, 3):
        raise errors.UnsupportedPixelFormat(f"{path.name}: tag SamplesPerPixel must be 1 or 3, got {samples}")

    if frames > 1:
        if frame is None:
            if frame_policy == "reject":
                raise errors.UnsupportedPixelFormat(
                    f"{path.name}: multi-frame file (NumberOfFrames={frames}) rejected by frame policy"
                )
            frame = 0 if frame_policy == "first" else frames // 2
        if not 0 <= frame < frames:
            raise errors.UsageError(f"frame must be in [0, {frames - 1}], got {frame}")
    else:
        if frame not in (None, 0):
            raise errors.UsageError(f"frame must be 0 for a single-frame file, got {frame}")
        frame = None

    try:
        if frame is None:
            arr = ds.pixel_array
        else:
            from pydicom.pixels import pixel_array

            arr = pixel_array(path, index=frame)
    except (RuntimeError, NotImplementedError) as exc:
        text = str(exc)
        if "plugin" in text.lower() or "decod" in text.lower():
            raise errors.UnsupportedTransferSyntax(
                f"{path.name}: no decoder available for transfer syntax {tsyntax} "
                "(install the dicom-codecs extra)"
            ) from None
        raise errors.CorruptImage(f"{path.name}: PixelData cannot be decoded ({type(exc).__name__})") from None
    except (ValueError, EOFError, OSError, KeyError, AttributeError, TypeError) as exc:
        raise errors.TruncatedFile(f"{path.name}: PixelData cannot be decoded ({type(exc).__name__})") from None

    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples == 3:
        # pydicom returns RGB for RGB and converts YBR to RGB.
        bits = _header_int(ds, "BitsStored", bits_alloc)
        pixels = (arr.astype(np.float32) / float((1 << bits) - 1)).clip(0, 1)
    else:
        values = apply_modality_lut(arr, ds).astype(np.float64)
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            lut = apply_voi_lut(arr if "ModalityLUTSequence" in ds else values, ds, index=0, prefer_lut=True)
            lut_item = ds.VOILUTSequence[0]
            lut_bits = int(lut_item.LUTDescriptor[2]) if "LUTDescriptor" in lut_item else 16
            pixels = np.clip(lut.astype(np.float32) / float((1 << lut_bits) - 1), 0, 1)
        else:
            try:
                center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            except (AttributeError, TypeError, ValueError, IndexError):
                center = width = None  # absent or unparsable: fall back to a percentile window
            if center is None or width is None or not np.isfinite(center) or not width > 0:
                pixels = percentile_window(values)
            else:
                pixels = window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")))
        if photometric == "MONOCHROME1":
            pixels = 1.0 - pixels
    meta = dicom_metadata(ds)
    meta.update(
        rows=rows, columns=cols, frames=frames, frame=frame or 0, transfer_syntax=tsyntax,
        source_format="dicom",
    )
    return ImageRecord(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=meta)


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


def dicom_metadata(ds: Any) -> dict[str, Any]:
    """Metadata that is safe to keep: no names, identifiers, dates or free text."""
    def text(keyword: str) -> str:
        value = ds.get(keyword, "")
        return str(value).strip() if value is not None else ""

    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    view = text("ViewPosition").upper()
    return {
        "modality": text("Modality") or "OT",
        "view": view or "UNKNOWN",
        "laterality": (text("ImageLaterality") or text("Laterality") or "U").upper(),
        "body_part": text("BodyPartExamined").upper(),
        "manufacturer": text("Manufacturer"),
        "photometric": text("PhotometricInterpretation").upper(),
        "pixel_spacing": float(spacing[0]) if spacing else None,
        "sex": text("PatientSex").upper() or "U",
        "age_band": age_band(text("PatientAge")),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "burned_in_annotation": text("BurnedInAnnotation").upper() or "UNKNOWN",
    }


# --------------------------------------------------------------------------- PNG / JPEG


def _read_raster(path: Path, pixel_budget: int) -> ImageRecord:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height * 8 > pixel_budget:
                raise errors.PixelBudgetExceeded(
                    f"{path.name}: {width}x{height} pixels exceeds the pixel budget of {pixel_budget} bytes"
                )
            fmt = (im.format or "").lower()
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                peak = 65535.0 if arr.max() > 255 or mode.startswith("I;16") else 255.0
                pixels = arr / peak
            elif mode == "L":
                pixels = np.asarray(im, dtype=np.float32) / 255.0
            elif mode == "F":
                pixels = percentile_window(np.asarray(im, dtype=np.float32))
            else:
                pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
                if np.allclose(pixels[..., 0], pixels[..., 1]) and np.allclose(pixels[..., 1], pixels[..., 2]):
                    pixels = pixels[..., 0]
    except errors.InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise errors.CorruptImage(f"{path.name}: image cannot be decoded ({type(exc).__name__})") from None
    meta = {
        "modality": "OT", "view": "UNKNOWN", "laterality": "U", "body_part": "", "manufacturer": "",
        "photometric": "RGB" if pixels.ndim == 3 else "MONOCHROME2", "pixel_spacing": None,
        "sex": "U", "age_band": "unknown", "bits_stored": 16 if mode.startswith("I") else 8,
        "burned_in_annotation": "UNKNOWN", "rows": height, "columns": width, "frames": 1, "frame": 0,
        "transfer_syntax": "", "source_format": "jpeg" if fmt in ("jpeg", "jpg") else "png",
    }
    return ImageRecord(pixels=np.clip(pixels, 0, 1).astype(np.float32), meta=meta)


def to_png_bytes(pixels: np.ndarray, max_side: int | None = None) -> bytes:
    """Encode display-ready pixels as a 16-bit grayscale (or 8-bit RGB) PNG."""
    from PIL import Image

    h, w = pixels.shape[:2]
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        chans = [pixels] if pixels.ndim == 2 else [pixels[..., c] for c in range(pixels.shape[-1])]
        resized = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize(size, Image.Resampling.BOX))
                   for c in chans]
        pixels = resized[0] if pixels.ndim == 2 else np.stack(resized, -1)
    pixels = np.clip(pixels, 0, 1)
    if pixels.ndim == 3:
        im = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="RGB")
    else:
        im = Image.fromarray(np.round(pixels * 65535).astype(np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
