"""Detection and false-positive rates of the burned-in text detector (``mmclinic.phi.pixel_text``), and its cost.

    .venv/bin/python bench/pixel_text.py [--text 200] [--clean 200] [--size 512] [--seed 0]

Synthetic images at the stored size (``--size``, ingest's default ``--max-side`` 512):

- backgrounds: frontal and lateral chest radiographs from ``mmclinic.data.synth`` (with random
  findings, tubes and pacemakers included), an ultrasound-like speckled sector on black, smooth
  noise and gradients;
- text images: one background with 1-3 lines of fake identities (names as ``LAST^FIRST`` or
  ``LAST, FIRST``, record numbers, accession numbers, dates, times) rendered with Pillow's bundled
  scalable font at 10-28 px, white on the image (overlay style) or dark on a light label, in a
  corner or along the top edge;
- clean images: the same backgrounds without text.

Detected = some returned box overlaps a rendered line; false positive = a clean image with any
box. Also: text left after redaction (``redact_text``, what ``--burned-in redact`` runs, then the
detector again on its output), the share of
clean images that needed an OCR call at all, and the time per image, wall clock and CPU (this
process plus the Tesseract processes; ingest runs one decoding worker per core, Tesseract held to
one thread there, as here).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import time

import numpy as np

os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # as in ingest's decoding workers

BACKGROUNDS = ("frontal", "lateral", "ultrasound", "noise", "gradient")
FONT_SIZES = (10, 12, 14, 16, 20, 24, 28)


@dataclasses.dataclass
class Sample:
    pixels: np.ndarray
    """uint8 grayscale."""
    lines: list[tuple[int, int, int, int]]
    """Boxes (x0, y0, x1, y1) of the rendered text lines; empty for a clean image."""
    kind: str


def background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A text-free uint8 image of ``kind`` (one of ``BACKGROUNDS``)."""
    from scipy import ndimage

    from mmclinic.data import synth

    if kind in ("frontal", "lateral"):
        findings = synth._sample_findings(rng, inpatient=bool(rng.random() < 0.5))
        img = (synth.render_frontal if kind == "frontal" else synth.render_lateral)(findings, rng, size)
        return np.round(img * 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "ultrasound":
        r, a = np.hypot(yy + 0.1, xx - 0.5), np.arctan2(xx - 0.5, yy + 0.1)
        fan = (r > 0.15) & (r < 1.0) & (np.abs(a) < 0.6)
        speckle = ndimage.gaussian_filter(rng.rayleigh(1.0, (size, size)), 1.2)
        tissue = 0.35 + 0.25 * np.sin(6 * r + rng.uniform(0, 6)) * np.exp(-2 * r)
        img = np.where(fan, np.clip(tissue * speckle, 0, 1), 0.0)
    elif kind == "noise":
        img = ndimage.gaussian_filter(rng.random((size, size)), rng.uniform(1, 6))
        img = (img - img.min()) / max(float(np.ptp(img)), 1e-6)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        img = 0.5 + 0.5 * np.cos(angle) * (xx - 0.5) + 0.5 * np.sin(angle) * (yy - 0.5)
        img = img + 0.02 * rng.standard_normal((size, size))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def fake_line(rng: np.random.Generator) -> str:
    """One line of a fake identity overlay."""
    from mmclinic.data import synth

    first = str(rng.choice(synth._FIRST_M + synth._FIRST_F))
    last = str(rng.choice(synth._LAST))
    d = f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1930, 2024)}"
    shapes = [f"{last.upper()}^{first.upper()}", f"{last}, {first}", f"{first} {last}",
              f"MRN {rng.integers(10**6, 10**8)}", f"ID: {rng.integers(10**5, 10**9)}",
              f"ACC {rng.integers(10**7, 10**9)}", f"DOB {d}", d,
              f"{rng.integers(2015, 2025)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d} "
              f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}",
              f"{last.upper()}^{first.upper()} {rng.integers(10**6, 10**8)}"]
    return shapes[int(rng.integers(len(shapes)))]


def render_text(img: np.ndarray, rng: np.random.Generator, lines: int = 1,
                font_size: int | None = None, dark: bool | None = None) -> tuple[np.ndarray, list]:
    """``img`` with ``lines`` fake identity lines drawn in a corner or along the top; the line boxes."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(font_size or rng.choice(FONT_SIZES))
    dark = bool(rng.random() < 0.5) if dark is None else dark
    font = ImageFont.load_default(size=size)
    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    texts = [fake_line(rng) for _ in range(lines)]
    extents = [draw.textbbox((0, 0), t, font=font) for t in texts]
    width = max(e[2] for e in extents)
    step = int(size * 1.3)
    block_h = step * (lines - 1) + extents[-1][3]
    h, w = img.shape
    m = int(rng.integers(6, 20))
    corner = str(rng.choice(["tl", "tr", "bl", "br", "top"]))
    x = {"tl": m, "bl": m, "tr": w - width - m, "br": w - width - m, "top": (w - width) // 2}[corner]
    y = m if corner in ("tl", "tr", "top") else h - block_h - m
    x, y = max(0, x), max(0, y)
    if dark:  # a light label with dark text
        draw.rectangle([x - 4, y - 4, x + width + 4, y + block_h + 4], fill=int(rng.integers(200, 256)))
        fill = int(rng.integers(0, 50))
    else:
        fill = int(rng.integers(200, 256))
    boxes = []
    for k, t in enumerate(texts):
        draw.text((x, y + k * step), t, fill=fill, font=font)
        x0, y0, x1, y1 = draw.textbbox((x, y + k * step), t, font=font)
        boxes.append((x0, y0, x1, y1))
    return np.asarray(im), boxes


def samples(n_text: int, n_clean: int, seed: int = 0, size: int = 512,
            text_kinds: tuple[str, ...] = BACKGROUNDS) -> tuple[list[Sample], list[Sample]]:
    """``n_text`` images with rendered identities (on ``text_kinds`` backgrounds, in turn) and ``n_clean``
    without (every background in turn), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    text, clean = [], []
    for i in range(n_text):
        kind = text_kinds[i % len(text_kinds)]
        pixels, lines = render_text(background(kind, rng, size), rng, lines=int(rng.integers(1, 4)))
        text.append(Sample(pixels, lines, kind))
    for i in range(n_clean):
        kind = BACKGROUNDS[i % len(BACKGROUNDS)]
        clean.append(Sample(background(kind, rng, size), [], kind))
    return text, clean


def overlaps(box, line) -> bool:
    return box.x0 < line[2] and line[0] < box.x1 and box.y0 < line[3] and line[1] < box.y1


@dataclasses.dataclass
class Rates:
    detected: int
    n_text: int
    false_positives: int
    n_clean: int
    left_after_redaction: int
    clean_ocr_calls: int
    cpu_ms_redact: float
    """CPU per redacted image of ``redact_text`` (detect, black out, repeat until clean)."""
    ms_text: float
    ms_clean: float
    cpu_ms_text: float
    cpu_ms_clean: float

    @property
    def detection_rate(self) -> float:
        return self.detected / max(1, self.n_text)

    @property
    def false_positive_rate(self) -> float:
        return self.false_positives / max(1, self.n_clean)


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def evaluate(text: list[Sample], clean: list[Sample], check_redaction: bool = True) -> Rates:
    from mmclinic.phi.pixel_text import detect_text, redact_text

    detected = left = redacted = 0
    wall = cpu = cpu_redact = 0.0
    for s in text:
        t, c = time.perf_counter(), _cpu()
        found = detect_text(s.pixels)
        wall, cpu = wall + time.perf_counter() - t, cpu + _cpu() - c
        detected += any(overlaps(b, line) for b in found.boxes for line in s.lines)
        if check_redaction and found:
            c = _cpu()
            out, _ = redact_text(s.pixels)
            cpu_redact += _cpu() - c
            redacted += 1
            left += bool(detect_text(out))
    fp = calls = 0
    wall_c = cpu_c = 0.0
    for s in clean:
        t, c = time.perf_counter(), _cpu()
        found = detect_text(s.pixels)
        wall_c, cpu_c = wall_c + time.perf_counter() - t, cpu_c + _cpu() - c
        fp += bool(found)
        calls += found.candidates > 0
    return Rates(detected, len(text), fp, len(clean), left, calls, 1000 * cpu_redact / max(1, redacted),
                 1000 * wall / max(1, len(text)),
                 1000 * wall_c / max(1, len(clean)), 1000 * cpu / max(1, len(text)),
                 1000 * cpu_c / max(1, len(clean)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=int, default=200, help="images with rendered identities")
    ap.add_argument("--clean", type=int, default=200, help="images without text")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--by-kind", action="store_true", help="also print the rates per background")
    args = ap.parse_args()
    from mmclinic.phi.pixel_text import require_tesseract

    version = require_tesseract("bench/pixel_text.py")
    text, clean = samples(args.text, args.clean, args.seed, args.size)
    r = evaluate(text, clean)
    print(f"tesseract {version}; {args.size}-px images, seed {args.seed}")
    print(f"detection rate      {r.detection_rate:.3f}  ({r.detected}/{r.n_text} images with rendered identities)")
    print(f"false-positive rate {r.false_positive_rate:.3f}  ({r.false_positives}/{r.n_clean} clean images)")
    print(f"text left after redaction (redact_text, then detect_text): {r.left_after_redaction} images; "
          f"redaction {r.cpu_ms_redact:.0f} ms CPU per image with text")
    print(f"clean images needing an OCR call: {r.clean_ocr_calls}/{r.n_clean}")
    print(f"time per image: text {r.ms_text:.0f} ms wall, {r.cpu_ms_text:.0f} ms CPU; "
          f"clean {r.ms_clean:.0f} ms wall, {r.cpu_ms_clean:.0f} ms CPU")
    if args.by_kind:
        for kind in BACKGROUNDS:
            k = evaluate([s for s in text if s.kind == kind], [s for s in clean if s.kind == kind], False)
            print(f"  {kind:<10} detection {k.detection_rate:.3f} ({k.detected}/{k.n_text})  "
                  f"false positives {k.false_positive_rate:.3f} ({k.false_positives}/{k.n_clean})  "
                  f"CPU ms per image: text {k.cpu_ms_text:.0f}, clean {k.cpu_ms_clean:.0f}")


if __name__ == "__main__":
    main()
