"""Parallel, time-boxed image decoding for ingest.

Each worker process decodes one file at a time and writes its display-ready PNG
straight to disk, so the parent holds only small metadata per image and memory
stays flat however large the archive is. The parent knows which file every
worker is on: a worker that exceeds the time box (a decoder stuck on a hostile
file) or dies (a decoder crash) is killed and replaced, and that one file is
quarantined with its reason while the run goes on.

Workers are started with the ``spawn`` method: the parent may already hold
TensorFlow's threads, which do not survive ``fork``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import queue
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mmclinic import errors

IDENTITY_TAGS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "PatientAddress", "PatientTelephoneNumbers",
                 "InstitutionName", "InstitutionAddress", "StudyID")
NAME_TAGS = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    out_dir: str
    """Folder the PNGs are written to, named ``{job index}-{frame}.png``."""
    max_side: int = 512
    frame_policy: str = "first"
    pixel_budget: int = 1 << 30
    burned_in: str = "keep"
    """``keep`` (flag it in the manifest) or ``quarantine`` files declaring burned-in annotation."""
    dicom_out_dir: str | None = None
    """When set, a de-identified DICOM copy (PS3.15 Annex E) of every accepted DICOM file goes here."""
    deid_key_hex: str | None = None
    decoder: str = ""
    """``module:function`` to decode with instead of :func:`decode_job` (same signature); for custom readers."""


def perceptual_hash(pixels: np.ndarray) -> str:
    """256-bit difference hash (dHash on a 17x16 grid), as 64 hex digits.

    Robust to resizing, re-encoding and windowing changes, and discriminative enough for
    radiographs, which all look alike at the 8x8 resolution of the classic 64-bit hashes.
    """
    from PIL import Image

    gray = pixels if pixels.ndim == 2 else pixels.mean(axis=-1)
    small = np.asarray(Image.fromarray(gray.astype(np.float32), mode="F").resize((17, 16), Image.Resampling.BOX))
    return np.packbits((small[:, 1:] > small[:, :-1]).ravel()).tobytes().hex()


def _identity(ds: Any) -> dict[str, Any]:
    ident = {k: str(ds.get(k, "") or "") for k in (*IDENTITY_TAGS, *NAME_TAGS, "StudyInstanceUID",
                                                     "SOPInstanceUID")}
    return ident


def decode_job(job: dict[str, Any], settings: DecodeSettings) -> dict[str, Any]:
    """Decode one input file into one PNG per kept frame. Never raises: errors become a result."""
    from mmclinic.data.images import (ImageRecord, _is_dicom, decode_dicom, open_dicom, read_image,
                                      to_png_bytes)

    path, index = Path(job["path"]), job["index"]
    try:
        ident: dict[str, Any] = {}
        records: list[ImageRecord]
        if path.is_file() and _is_dicom(path):
            ds = open_dicom(path)
            ident = _identity(ds)
            if not ident["SOPInstanceUID"]:
                raise errors.UnsupportedPixelFormat(f"{path.name}: missing tag SOPInstanceUID (0008,0018)")
            burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
            if burned == "YES" and settings.burned_in == "quarantine":
                raise errors.BurnedInAnnotation(
                    f"{path.name}: tag BurnedInAnnotation (0028,0301) declares burned-in text; policy is quarantine")
            if settings.frame_policy == "all":
                from mmclinic.data import images as images_mod

                records = images_mod.decode_dicom_frames(ds, path, pixel_budget=settings.pixel_budget)
            else:
                records = [decode_dicom(ds, path, frame_policy=settings.frame_policy,
                                        pixel_budget=settings.pixel_budget)]
            if settings.dicom_out_dir:
                from mmclinic.phi.annex_e import deidentify_dataset
                from mmclinic.phi.dicom_deid import Pseudonymizer

                pseudo = Pseudonymizer(bytes.fromhex(settings.deid_key_hex or ""))
                clean, _ = deidentify_dataset(ds, pseudo, burned_in="keep")
                dest = Path(settings.dicom_out_dir) / f"{pseudo.image(ident['SOPInstanceUID'])}.dcm"
                clean.save_as(dest, enforce_file_format=True)
        else:
            records = [read_image(path, pixel_budget=settings.pixel_budget)]
        images = []
        for f, rec in enumerate(records):
            png = to_png_bytes(rec.pixels, settings.max_side)
            name = f"{index}-{f}.png"
            (Path(settings.out_dir) / name).write_bytes(png)
            meta = dict(rec.meta)
            images.append({"png": name, "sha256": hashlib.sha256(png).hexdigest(),
                           "phash": perceptual_hash(rec.pixels), "meta": meta})
        return {"ok": True, "index": index, "ident": ident, "images": images}
    except errors.InputError as exc:
        return {"ok": False, "index": index, "reason": exc.reason_code, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one quarantined file
        return {"ok": False, "index": index, "reason": "corrupt_image",
                "message": f"{path.name}: cannot be read ({type(exc).__name__})"}


def _worker(tasks: Any, results: Any, settings: DecodeSettings) -> None:
    fn = decode_job
    if settings.decoder:
        import importlib

        module, _, name = settings.decoder.partition(":")
        fn = getattr(importlib.import_module(module), name)
    while True:
        job = tasks.get()
        if job is None:
            return
        results.put({"started": job["index"]})  # the time box counts from here, not from start-up
        results.put(fn(job, settings))


class _Slot:
    def __init__(self, ctx: Any, results: Any, settings: DecodeSettings) -> None:
        self.tasks = ctx.Queue()
        self.proc = ctx.Process(target=_worker, args=(self.tasks, results, settings), daemon=True)
        self.proc.start()
        self.job: dict[str, Any] | None = None
        self.started: float | None = None

    def give(self, job: dict[str, Any]) -> None:
        self.job, self.started = job, None
        self.tasks.put(job)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)


def decode_all(jobs: list[dict[str, Any]], settings: DecodeSettings, workers: int,
               timeout: float | None = 120.0) -> Iterator[dict[str, Any]]:
    """Decode ``jobs`` (dicts with ``index`` and ``path``) in ``workers`` processes; yield results as they come.

    A file that takes longer than ``timeout`` seconds yields reason ``decode_timeout``;
    one whose worker dies yields ``decoder_crash``. Every job yields exactly one result.
    """
    if not jobs:
        return
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    slots = [_Slot(ctx, results, settings) for _ in range(max(1, min(workers, len(jobs))))]
    pending = list(reversed(jobs))
    outstanding = 0
    try:
        for slot in slots:
            if pending:
                slot.give(pending.pop())
                outstanding += 1
        while outstanding:
            try:
                res = results.get(timeout=0.5)
            except queue.Empty:
                res = None
            if res is not None and "started" in res:
                for s in slots:
                    if s.job is not None and s.job["index"] == res["started"]:
                        s.started = time.monotonic()
                continue
            if res is not None:
                owner = [s for s in slots if s.job is not None and s.job["index"] == res["index"]]
                if not owner:  # a result that raced its worker's time-out: already reported
                    continue
                outstanding -= 1
                slot = owner[0]
                slot.job = None
                if pending:
                    slot.give(pending.pop())
                    outstanding += 1
                yield res
                continue
            now = time.monotonic()
            for i, slot in enumerate(slots):
                if slot.job is None:
                    continue
                late = timeout is not None and slot.started is not None and now - slot.started > timeout
                dead = not slot.proc.is_alive()
                if not (late or dead):
                    continue
                job = slot.job
                name = Path(job["path"]).name
                slot.kill()
                outstanding -= 1
                slots[i] = slot = _Slot(ctx, results, settings)
                if pending:
                    slot.give(pending.pop())
                    outstanding += 1
                if late:
                    yield {"ok": False, "index": job["index"], "reason": "decode_timeout",
                           "message": f"{name}: decoding exceeded the time box of {timeout:g} s"}
                else:
                    yield {"ok": False, "index": job["index"], "reason": "decoder_crash",
                           "message": f"{name}: the decoder process died"}
    finally:
        for slot in slots:
            if slot.proc.is_alive():
                slot.tasks.put(None)
        for slot in slots:
            slot.proc.join(5)
            if slot.proc.is_alive():
                slot.kill()
