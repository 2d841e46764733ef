"""Text burned into pixels: find it with Tesseract OCR, black it out.

Ultrasound, secondary-capture and scanned images often carry names, IDs and dates in
their pixels without declaring ``BurnedInAnnotation``. :func:`detect_text` finds such
text in a display-ready image and returns only where it is and how much of it there
is, never what it says (the text *is* the identifying information): no function here
returns, logs or raises with recognised text.

Two stages, so that an image with nothing text-like costs ~20 ms of CPU and no OCR call
(bench/pixel_text.py measures rates and cost):

1. Candidates. Overlay text is thin strokes of high contrast against the local
   background. A morphological top-hat (the image minus its grey opening; for dark
   text, the closing minus the image) with a window wider than a stroke keeps strokes
   and flattens anatomy, gradients and labels' backgrounds. Its connected components of
   character size (:data:`MIN_CHAR_HEIGHT` .. :data:`MAX_CHAR_HEIGHT` pixels high) are
   chained into lines (similar heights, tops or bottoms aligned, gaps under about a
   character height); components with strokes too thick for their height (blobs of
   texture) are left out. A line of ``MIN_CHARS`` or more characters, or one merged run
   wider than it is tall, is a candidate. Bright and dark text are searched separately
   (white-on-black overlays are the rule in ultrasound and CT, black-on-white labels in
   scans).
2. Verification. Every candidate line is cut out of the top-hat response (dark text on
   white, background gone), enlarged to a character height Tesseract reads well, and all
   of them go to Tesseract together (``image_to_data``, sparse-text page segmentation)
   in one montage. A line is text when it holds a word of at least ``MIN_CHARS``
   alphanumeric characters read with confidence ``MIN_CONFIDENCE`` or more (two-letter
   words are what Tesseract hallucinates on texture).

:func:`redact` blacks out boxes (each line's box with a margin); :func:`redact_text`
detects and redacts until no text is found. Needs the ``tesseract`` program
(Debian/Ubuntu: ``apt-get install tesseract-ocr``) and the ``pytesseract`` package;
:func:`require_tesseract` says so. pytesseract passes the image and reads Tesseract's
output through temporary files (removed after each call): the decoding workers point
them into the dataset's scratch folder.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any

import numpy as np

from mmclinic import errors

MIN_CONFIDENCE = 70.0
"""Tesseract word confidence (0-100) from which a word counts as read."""
MIN_CHARS = 3
"""Alphanumeric characters a word needs to count (single letters such as L/R markers do not)."""
MIN_CONTRAST = 40
"""Top-hat response (grey levels of 255) a stroke pixel needs."""
STROKE_WINDOW = 15
"""Side of the top-hat's square window: strokes narrower than this are kept (text up to ~50 px high)."""
MAX_STROKE = 0.4
"""Widest stroke, as a fraction of its character's height (thicker components are texture, not letters)."""
MIN_CHAR_HEIGHT = 5
MAX_CHAR_HEIGHT = 64
"""Character heights (pixels) searched; the upper bound shrinks to a quarter of a small image's height."""
OCR_CHAR_HEIGHT = 28
"""Candidate lines are enlarged so that their characters are about this high (pixels) before OCR ..."""
MAX_SCALE = 4.0
"""... by at most this factor."""
MAX_CANDIDATES = 400
"""Candidate lines per OCR call; more are sent in further calls."""
OCR_TIMEOUT = 60.0
"""Seconds one Tesseract call may take before it is stopped (a :class:`PixelTextError`)."""
INSTALL_HINT = ("install the Tesseract OCR engine (Debian/Ubuntu: `apt-get install tesseract-ocr`) "
                "and the pytesseract package (`pip install pytesseract`, pinned in requirements.lock)")


class PixelTextError(errors.MmclinicError):
    """Tesseract is missing or an OCR call failed (the message never holds recognised text)."""

    reason_code = "pixel_text"


@dataclasses.dataclass(frozen=True)
class TextBox:
    """A region of text: rows ``y0:y1`` and columns ``x0:x1`` of the image (end exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int
    words: int
    """Words read in it (counted, never kept)."""


@dataclasses.dataclass(frozen=True)
class TextDetection:
    """Where an image holds text, and how much; never what it says."""

    boxes: tuple[TextBox, ...]
    candidates: int
    """Candidate lines sent to OCR (0: the image had nothing text-like and OCR was not called)."""

    @property
    def count(self) -> int:
        """Regions of text found."""
        return len(self.boxes)

    @property
    def words(self) -> int:
        return sum(b.words for b in self.boxes)

    def __bool__(self) -> bool:
        return bool(self.boxes)


# --------------------------------------------------------------------------- engine


def tesseract_version() -> str | None:
    """The installed Tesseract's version, or ``None`` when it or pytesseract is missing."""
    try:
        import pytesseract
    except ImportError:
        return None
    if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
        return None
    try:
        return str(pytesseract.get_tesseract_version())
    except Exception:  # noqa: BLE001 - present but not runnable
        return None


def require_tesseract(what: str) -> str:
    """Tesseract's version, or a :class:`PixelTextError` saying that ``what`` needs it and how to install it."""
    version = tesseract_version()
    if version is None:
        raise PixelTextError(f"{what} needs OCR to find text in pixels: {INSTALL_HINT}")
    return version


def _ocr_rows(image: np.ndarray) -> list[float]:
    """The vertical centres of the words Tesseract reads in ``image`` (uint8, dark text on white) with at least
    ``MIN_CHARS`` alphanumeric characters and confidence ``MIN_CONFIDENCE``; their text is dropped here."""
    try:
        import pytesseract
        from PIL import Image
    except ImportError as exc:
        raise PixelTextError(f"the pytesseract package is missing: {INSTALL_HINT}") from exc
    try:
        data = pytesseract.image_to_data(Image.fromarray(image), config="--psm 11",
                                         output_type=pytesseract.Output.DICT, timeout=OCR_TIMEOUT)
    except pytesseract.TesseractNotFoundError as exc:
        raise PixelTextError(f"the tesseract program is not on PATH: {INSTALL_HINT}") from exc
    except (RuntimeError, pytesseract.TesseractError, OSError) as exc:  # its message could echo output: not kept
        raise PixelTextError(f"Tesseract failed ({type(exc).__name__})") from None
    return [top + height / 2 for text, conf, top, height in zip(data["text"], data["conf"], data["top"],
                                                                  data["height"])
            if float(conf) >= MIN_CONFIDENCE and sum(ch.isalnum() for ch in str(text)) >= MIN_CHARS]


# --------------------------------------------------------------------------- candidates


def to_gray_uint8(pixels: np.ndarray) -> np.ndarray:
    """Display-ready pixels (float in [0, 1], or uint8; grayscale or RGB) as 8-bit grayscale."""
    arr = np.asarray(pixels)
    if arr.ndim == 3:  # the channels' mean, on the [0, 1] scale
        arr = arr[..., :3].mean(axis=-1) / (255.0 if arr.dtype == np.uint8 else 1.0)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D or HxWx3 image, got shape {np.shape(pixels)}")
    if arr.dtype == np.uint8:
        return arr
    return np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)


def _stroke_response(gray: np.ndarray, bright: bool) -> np.ndarray:
    """Top-hat: how far each pixel stands out from its background towards ``bright`` (or dark) strokes."""
    from scipy import ndimage

    g = gray.astype(np.int16)
    size = (STROKE_WINDOW, STROKE_WINDOW)
    resp = g - ndimage.grey_opening(g, size=size) if bright else ndimage.grey_closing(g, size=size) - g
    return np.clip(resp, 0, 255).astype(np.uint8)


def _lines(mask: np.ndarray) -> list[tuple[tuple[int, int, int, int], int]]:
    """Candidate text lines among the character-sized components of ``mask``: ``((x0, y0, x1, y1), character
    height)``, the height being the median of the line's components."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if not n:
        return []
    max_h = min(MAX_CHAR_HEIGHT, max(MIN_CHAR_HEIGHT, mask.shape[0] // 4))
    slices = ndimage.find_objects(labels)
    boxes = np.array([(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices])
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    keep = (h >= MIN_CHAR_HEIGHT) & (h <= max_h) & (w <= 12 * h)
    if keep.any():  # strokes are thin for their height; blobs of texture are not
        depth = ndimage.distance_transform_cdt(mask, metric="chessboard")
        for i in np.flatnonzero(keep):
            half_width = int(depth[slices[i]][labels[slices[i]] == i + 1].max())
            keep[i] = 2 * half_width - 1 <= MAX_STROKE * h[i]
    boxes, h, w = boxes[keep], h[keep], w[keep]
    if not len(boxes):
        return []
    order = np.argsort(boxes[:, 0], kind="stable")
    boxes, h, w = boxes[order], h[order], w[order]
    parent = np.arange(len(boxes))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    x0s = boxes[:, 0]
    for i in range(len(boxes)):
        reach = boxes[i, 2] + int(0.8 * max_h)
        js = np.arange(i + 1, int(np.searchsorted(x0s, reach, side="right")))
        if not len(js):
            continue
        hmax = np.maximum(h[i], h[js])
        hmin = np.minimum(h[i], h[js])
        aligned = np.minimum(np.abs(boxes[js, 1] - boxes[i, 1]), np.abs(boxes[js, 3] - boxes[i, 3])) <= 0.2 * hmax
        gap = boxes[js, 0] - boxes[i, 2]
        linked = js[aligned & (hmax <= 2.5 * hmin) & (gap <= 0.8 * hmax)]
        for j in linked:
            parent[root(int(j))] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        groups.setdefault(root(i), []).append(i)
    lines = []
    for members in groups.values():
        b = boxes[members]
        x0, y0, x1, y1 = int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())
        if len(members) >= MIN_CHARS or (x1 - x0) >= 1.5 * (y1 - y0):
            lines.append(((x0, y0, x1, y1), int(np.median(h[members]))))
    return lines


def _pad(box: tuple[int, int, int, int], shape: tuple[int, ...], frac: float = 0.35) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    p = max(2, int(round(frac * (y1 - y0))))
    return max(0, x0 - p), max(0, y0 - p), min(shape[1], x1 + p), min(shape[0], y1 + p)


# --------------------------------------------------------------------------- verification


def _montage(crops: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Crops (uint8, dark text on white, each with its character height) stacked on a white page, each enlarged
    towards ``OCR_CHAR_HEIGHT``; per crop the rows ``(top, bottom)`` it covers there."""
    from PIL import Image

    margin = 24
    scaled = []
    for crop, char_h in crops:
        scale = float(np.clip(OCR_CHAR_HEIGHT / max(1, char_h), 1.0, MAX_SCALE))
        if scale > 1.0:
            size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
            crop = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BICUBIC))
        scaled.append(crop)
    page = np.full((sum(c.shape[0] + margin for c in scaled) + margin, max(c.shape[1] for c in scaled) + 2 * margin),
                   255, np.uint8)
    rows, top = [], margin
    for crop in scaled:
        page[top:top + crop.shape[0], margin:margin + crop.shape[1]] = crop
        rows.append((top, top + crop.shape[0]))
        top += crop.shape[0] + margin
    return page, rows


def detect_text(image: np.ndarray) -> TextDetection:
    """Regions of text in a display-ready image (float in [0, 1] or uint8, grayscale or RGB).

    Returns boxes in the image's own pixel coordinates and counts, never the text. Raises
    :class:`PixelTextError` when Tesseract is missing or fails (only when the image has
    candidate lines: an image with nothing text-like never calls it).
    """
    gray = to_gray_uint8(image)
    candidates: list[tuple[tuple[int, int, int, int], tuple[np.ndarray, int]]] = []
    for bright in (True, False):
        resp = _stroke_response(gray, bright)
        for line, char_h in _lines(resp >= MIN_CONTRAST):
            x0, y0, x1, y1 = box = _pad(line, gray.shape)
            crop = resp[y0:y1, x0:x1].astype(np.float32)
            crop = 255 - np.clip(crop * (255.0 / max(float(crop.max()), 1.0)), 0, 255)
            candidates.append((box, (crop.astype(np.uint8), char_h)))
    found: list[TextBox] = []
    for start in range(0, len(candidates), MAX_CANDIDATES):
        chunk = candidates[start:start + MAX_CANDIDATES]
        page, rows = _montage([crop for _, crop in chunk])
        tops = np.array([top for top, _ in rows])
        words = np.zeros(len(chunk), int)
        for centre in _ocr_rows(page):
            k = int(np.searchsorted(tops, centre, side="right")) - 1
            if k >= 0 and centre < rows[k][1]:
                words[k] += 1
        found += [TextBox(*box, words=int(n)) for (box, _), n in zip(chunk, words) if n]
    return TextDetection(boxes=tuple(_merge(found)), candidates=len(candidates))


def _merge(boxes: list[TextBox]) -> list[TextBox]:
    """Overlapping boxes (bright and dark passes over the same text) as one."""
    merged: list[TextBox] = []
    for b in sorted(boxes, key=lambda b: (b.y0, b.x0)):
        for i, m in enumerate(merged):
            if b.x0 < m.x1 and m.x0 < b.x1 and b.y0 < m.y1 and m.y0 < b.y1:
                merged[i] = TextBox(min(b.x0, m.x0), min(b.y0, m.y0), max(b.x1, m.x1), max(b.y1, m.y1),
                                    m.words + b.words)
                break
        else:
            merged.append(b)
    return merged if len(merged) == len(boxes) else _merge(merged)


def redact(image: np.ndarray, boxes: Any, value: float = 0.0) -> np.ndarray:
    """A copy of ``image`` with every box (``TextBox`` or ``(x0, y0, x1, y1)``) set to ``value`` (black)."""
    out = np.array(image, copy=True)
    for b in boxes:
        x0, y0, x1, y1 = (b.x0, b.y0, b.x1, b.y1) if isinstance(b, TextBox) else b
        out[y0:y1, x0:x1, ...] = value
    return out


REDACT_PASSES = 3
"""Detect-and-redact rounds :func:`redact_text` runs at most (a line OCR missed beside one it read is found
once its neighbour is blacked out)."""


def redact_text(image: np.ndarray, value: float = 0.0) -> tuple[np.ndarray, TextDetection]:
    """``image`` with its text blacked out, and every box blacked out (over up to ``REDACT_PASSES`` rounds,
    until a round finds no more text). The image comes back unchanged when none is found."""
    boxes: list[TextBox] = []
    candidates = 0
    for _ in range(REDACT_PASSES):
        found = detect_text(image)
        candidates += found.candidates
        if not found:
            break
        boxes.extend(found.boxes)
        image = redact(image, found.boxes, value)
    return image, TextDetection(boxes=tuple(boxes), candidates=candidates)

