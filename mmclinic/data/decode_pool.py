"""Time-boxed decoding in worker processes: the one time box for reading images.

Ingest decodes a whole archive with :func:`decode_all`: each worker process decodes one
file at a time and writes its display-ready PNG straight to disk, so the parent holds
only small metadata per image and memory stays flat however large the archive is. The
parent knows which file every worker is on: a worker that exceeds the time box (a
decoder stuck on a hostile file) or dies (a decoder crash) is killed and replaced, and
that one file is quarantined with its reason while the run goes on.

One-off reads (``read_image(path, decode_timeout=...)``) go through :func:`call_in_worker`,
the same workers and the same time box for a single call; an idle worker is kept for the
next call, so a time-boxed read costs a round trip through a pipe, not a process start.

Workers are fresh ``python -m mmclinic.data.decode_pool`` processes talking over pipes: the
parent may already hold TensorFlow's threads, which do not survive ``fork``, and unlike
multiprocessing's ``spawn`` they never re-import the caller's main script.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import importlib
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmclinic import errors
from mmclinic.data.images import DEFAULT_PIXEL_BUDGET
from mmclinic.phi.pixel_text import PixelTextError

IDENTITY_TAGS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "PatientAddress", "PatientTelephoneNumbers",
                 "InstitutionName", "InstitutionAddress", "StudyID")
MANIFEST_META = ("modality", "view", "laterality", "source_format", "photometric", "sex", "age_band", "manufacturer",
                 "body_part", "rows", "columns", "burned_in_annotation", "frame", "pixel_spacing")
"""The metadata ingest keeps per image (everything else stays in the worker)."""
PIXEL_TEXT_POLICIES = ("quarantine", "redact")
"""``burned_in`` policies under which every stored frame is searched for text (:mod:`mmclinic.phi.pixel_text`)."""
NAME_TAGS = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20),
              "MALLOC_TOP_PAD_": str(16 << 20)}
"""glibc allocator settings for the workers. Each file allocates a few arrays of several MiB;
with glibc's defaults the freed memory went back to the kernel between files and came back as
fresh pages, ~2,700 page faults per 1024-px film here (see the README for the measured effect).
With these, buffers below 64 MiB are reused from the heap, which keeps up to 128 MiB of free
memory (peak memory measured unchanged); larger ones are still mapped and returned at once.
A user's own MALLOC_* variables win; other allocators ignore these."""


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    out_dir: str
    """Folder the PNGs are written to, named ``{job index}-{frame}.png``."""
    max_side: int = 512
    frame_policy: str = "first"
    pixel_budget: int = DEFAULT_PIXEL_BUDGET
    burned_in: str = "keep"
    """``keep`` (flag files declaring burned-in annotation in the manifest), ``quarantine`` (those, and files
    with text found in their pixels) or ``redact`` (black out text found in the pixels; keep and flag)."""
    dicom_out_dir: str | None = None
    """When set, a de-identified DICOM copy (PS3.15 Annex E) of every accepted DICOM file goes here."""
    deid_key_hex: str | None = None
    decoder: str = ""
    """``module:function`` to decode with instead of :func:`decode_job` (same signature); for custom readers."""
    preload: tuple[str, ...] = ()
    """Modules a worker imports when it starts, before its first job and so outside the time box."""


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
                                                     "SOPInstanceUID", "StudyDate")}
    return ident


def decode_job(job: dict[str, Any], settings: DecodeSettings) -> dict[str, Any]:
    """Decode one input file into one PNG per kept frame. Never raises: errors become a result."""
    from mmclinic.data.images import (ImageRecord, is_dicom, decode_dicom, instance_uid, open_dicom, read_image,
                                      resize_pixels, to_png_bytes)

    path, index = Path(job["path"]), job["index"]
    scanned = {"frames": 0, "with_text": 0, "regions": 0}  # pixel text (quarantine / redact): counts only
    uid_source = ""  # DICOM: where the image's identifier came from (images.instance_uid); empty otherwise
    try:
        ident: dict[str, Any] = {}
        burned = ""
        records: list[ImageRecord]
        if path.is_file() and is_dicom(path):
            ds = open_dicom(path)
            ident = _identity(ds)
            # Without the tag the image is still read: its identifier comes from the file meta or the
            # file's bytes, and the result says so (``uid_source``).
            ident["SOPInstanceUID"], uid_source = instance_uid(ds, path)
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
        else:
            records = [read_image(path, pixel_budget=settings.pixel_budget)]
        images = []
        for f, rec in enumerate(records):
            small = resize_pixels(rec.pixels, settings.max_side)  # hashed and stored at the stored size
            meta = {k: rec.meta.get(k) for k in MANIFEST_META if k in rec.meta}
            if settings.burned_in in PIXEL_TEXT_POLICIES:
                small, meta["pixel_text_regions"] = _pixel_text(small, settings.burned_in, path.name, f, scanned,
                                                                settings.out_dir)
            png = to_png_bytes(small)
            name = f"{index}-{f}.png"
            (Path(settings.out_dir) / name).write_bytes(png)
            images.append({"png": name, "sha256": hashlib.sha256(png).hexdigest(),
                           "phash": perceptual_hash(small), "meta": meta})
        if ident and settings.dicom_out_dir and not scanned["with_text"] and not (burned == "YES" and settings.burned_in == "redact"):  # no copy of a redacted file: its
            from mmclinic.phi.annex_e import deidentify_dataset            # original pixels hold the text
            from mmclinic.phi.dicom_deid import Pseudonymizer

            pseudo = Pseudonymizer(bytes.fromhex(settings.deid_key_hex or ""))
            if uid_source != "SOPInstanceUID":  # the copy carries the identifier (keyed, like every UID)
                ds.SOPInstanceUID = ident["SOPInstanceUID"]
            clean, _ = deidentify_dataset(ds, pseudo, burned_in="keep")
            dest = Path(settings.dicom_out_dir) / f"{pseudo.image(ident['SOPInstanceUID'])}.dcm"
            clean.save_as(dest, enforce_file_format=True)
        return {"ok": True, "index": index, "ident": ident, "images": images, "pixel_text": scanned,
                "uid_source": uid_source}
    except errors.InputError as exc:
        message = str(exc)
        if uid_source not in ("", "SOPInstanceUID"):  # both problems named: the refusal is the image's, not the UID's
            message += "; tag SOPInstanceUID (0008,0018) is missing as well"
        # A refused file's header identities go back too (never into the message): ingest redacts
        # them from the paths and messages of quarantine.csv.
        return {"ok": False, "index": index, "reason": exc.reason_code, "message": message, "pixel_text": scanned,
                "ident": ident}
    except PixelTextError as exc:  # OCR could not run on this file: text cannot be ruled out
        return {"ok": False, "index": index, "reason": "burned_in_text", "pixel_text": scanned, "ident": ident,
                "message": f"{path.name}: could not be checked for text in its pixels ({exc}); "
                           f"policy is {settings.burned_in}"}
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one quarantined file
        return {"ok": False, "index": index, "reason": "corrupt_image", "ident": ident,
                "message": f"{path.name}: cannot be read ({type(exc).__name__})"}


def _pixel_text(small: np.ndarray, policy: str, name: str, frame: int, scanned: dict[str, int],
                out_dir: str) -> tuple[np.ndarray, int]:
    """Text in one stored frame under ``policy`` (``quarantine`` or ``redact``): the frame, redacted, and how
    many text regions it had. Tallies ``scanned``.

    ``quarantine`` raises :class:`errors.BurnedInAnnotation` (reason ``burned_in_text``) naming the file,
    the frame and how many regions: never what they say.
    """
    from mmclinic.phi.pixel_text import detect_text, redact_text

    tempfile.tempdir = out_dir  # Tesseract's scratch files (the image, the text it read) stay in the workspace
    small, found = (small, detect_text(small)) if policy == "quarantine" else redact_text(small)
    scanned["frames"] += 1
    scanned["with_text"] += bool(found)
    scanned["regions"] += found.count
    if found and policy == "quarantine":
        raise errors.BurnedInAnnotation(
            f"{name}: text found in the pixels of frame {frame} ({found.count} region(s), {found.words} word(s)); "
            "policy is quarantine", reason_code="burned_in_text")
    return small, found.count


def _send(stream: Any, obj: Any) -> None:
    _send_blob(stream, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _send_blob(stream: Any, blob: bytes) -> None:
    stream.write(struct.pack("<I", len(blob)) + blob)
    stream.flush()


def _recv_exact(stream: Any, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _recv(stream: Any) -> Any:
    head = _recv_exact(stream, 4)
    if head is None:
        return None
    blob = _recv_exact(stream, struct.unpack("<I", head)[0])
    return None if blob is None else pickle.loads(blob)


def _resolve(ref: str) -> Any:
    """The object named ``module:qualified.name``."""
    module, _, name = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def call_job(job: dict[str, Any], settings: DecodeSettings) -> dict[str, Any]:
    """The decoder of :func:`call_in_worker`: ``job["fn"]`` (``module:name``) called with ``job["args"]``.

    Its value comes back as ``value``; an exception it raises comes back as ``error``, to be
    raised in the caller (replaced by :class:`errors.CorruptImage` if it cannot be sent).
    """
    try:
        return {"ok": True, "index": job["index"], "value": _resolve(job["fn"])(*job["args"])}
    except Exception as exc:  # noqa: BLE001 - everything goes back to the caller
        error: Exception = exc
        try:
            pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception:  # noqa: BLE001 - an exception that does not survive the pipe
            error = errors.CorruptImage(f"{Path(job['path']).name}: the decoding process could not return its "
                                        f"error ({type(exc).__name__})")
        return {"ok": False, "index": job["index"], "reason": getattr(error, "reason_code", "error"),
                "message": str(error), "error": error}


def worker_main() -> None:
    """A decoding worker: settings, then jobs, on stdin; ``started`` and result messages on stdout."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but messages on the pipe
    settings: DecodeSettings = _recv(stdin)
    fn = _resolve(settings.decoder) if settings.decoder else decode_job
    for module in settings.preload:
        importlib.import_module(module)
    while True:
        job = _recv(stdin)
        if job is None:
            return
        _send(stdout, {"started": job["index"]})  # the time box counts from here, not from start-up
        result = fn(job, settings)
        try:
            blob = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - a result that cannot be sent is one failed file
            blob = pickle.dumps({"ok": False, "index": job["index"], "reason": "corrupt_image",
                                 "message": f"{Path(job['path']).name}: the decoding process could not return "
                                            f"its result ({type(exc).__name__})"})
        _send_blob(stdout, blob)


class _Slot:
    """One worker process, running one job at a time.

    A plain ``python -m mmclinic.data.decode_pool`` child: unlike multiprocessing's spawn, it
    never re-imports the caller's main script, and its stderr is discarded because decoder
    warnings can quote header values.
    """

    def __init__(self, settings: DecodeSettings) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        env.update({k: v for k, v in MALLOC_ENV.items() if k not in os.environ})
        env.setdefault("OMP_THREAD_LIMIT", "1")  # Tesseract (pixel text): one thread, as there is a worker per core
        self.proc = subprocess.Popen([sys.executable, "-m", "mmclinic.data.decode_pool"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, env=env)
        try:
            _send(self.proc.stdin, settings)
        except OSError:  # it could not start: seen as an exit before its first file
            pass
        self.job: dict[str, Any] | None = None
        self.started: float | None = None

    def give(self, job: dict[str, Any]) -> None:
        self.job, self.started = job, None
        try:
            _send(self.proc.stdin, job)
        except OSError:  # it already exited: decode_all sees that and re-queues or quarantines the job
            pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


START_ATTEMPTS = 3
"""Workers in a row that may exit before starting any file before the run stops with an error."""


def _extras(settings: DecodeSettings) -> str:
    """What else a worker imports before its first file, for the start-up error."""
    return "".join(f" and {what} {name}" for what, name in
                   [("the decoder", settings.decoder)] * bool(settings.decoder) +
                   [("the module", m) for m in settings.preload])


class DecodePool:
    """Up to ``workers`` decoding processes with ``settings``, kept between :meth:`run` calls until :meth:`close`."""

    def __init__(self, settings: DecodeSettings, workers: int) -> None:
        self.settings = settings
        self.workers = max(1, workers)
        self.slots: list[_Slot] = []

    def run(self, jobs: list[dict[str, Any]], timeout: float | None) -> Iterator[dict[str, Any]]:
        """Decode ``jobs``; yield one result per job as they come (see :func:`decode_all`).

        After an exception, or when the caller stops early, some workers may still be busy:
        :meth:`close` the pool then rather than running it again.
        """
        settings, slots = self.settings, self.slots
        pending = list(reversed(jobs))
        failed_starts = 0
        while len(slots) < min(self.workers, len(jobs)):
            slots.append(_Slot(settings))
        for slot in slots:
            if pending:
                slot.give(pending.pop())
        while any(slot.job is not None for slot in slots):
            busy = {slot.proc.stdout.fileno(): slot for slot in slots if slot.job is not None}
            ready, _, _ = select.select(list(busy), [], [], 0.5)
            for fd in ready:
                slot = busy[fd]
                if slot.proc.poll() is not None:
                    continue  # exited: its last messages are read below
                msg = _recv(slot.proc.stdout)
                if msg is None:  # the worker died: handled below
                    continue
                if "started" in msg:
                    slot.started, failed_starts = time.monotonic(), 0
                    continue
                slot.job = None
                if pending:
                    slot.give(pending.pop())
                yield msg
            now = time.monotonic()
            for i, slot in enumerate(slots):
                if slot.job is None:
                    continue
                late = timeout is not None and slot.started is not None and now - slot.started > timeout
                code = slot.proc.poll()
                if not late and code is None:
                    continue
                job, name = slot.job, Path(slot.job["path"]).name
                result = None
                if code is not None:  # read what it said before it went (never waiting on a silent pipe)
                    while select.select([slot.proc.stdout], [], [], 1.0)[0] and \
                            (msg := _recv(slot.proc.stdout)) is not None:
                        if "started" in msg:
                            slot.started, failed_starts = time.monotonic(), 0
                        else:
                            result = msg
                slot.kill()
                never_started = code is not None and slot.started is None and result is None
                if never_started:
                    failed_starts += 1
                    if failed_starts >= START_ATTEMPTS:
                        raise errors.MmclinicError(
                            f"the decoding worker ({sys.executable} -m mmclinic.data.decode_pool) exited with code "
                            f"{code} {failed_starts} times in a row before starting a file; check that the "
                            f"environment imports mmclinic{_extras(settings)}")
                    pending.append(job)  # it never started this file: the next worker takes it
                slots[i] = slot = _Slot(settings)
                if pending:
                    slot.give(pending.pop())
                if result is not None:
                    yield result
                elif late:
                    yield {"ok": False, "index": job["index"], "reason": "decode_timeout",
                           "message": f"{name}: decoding exceeded the time box of {timeout:g} s"}
                elif not never_started:
                    yield {"ok": False, "index": job["index"], "reason": "decoder_crash",
                           "message": f"{name}: the decoder process died while decoding it (exit code {code})"}

    def close(self) -> None:
        """Stop every worker (a busy one is killed after a short wait)."""
        for slot in self.slots:  # close all first, then wait: the workers shut down side by side
            if slot.proc.poll() is None:
                try:
                    slot.proc.stdin.close()
                except OSError:
                    pass
        for slot in self.slots:
            if slot.proc.poll() is None:
                slot.close()
        self.slots = []


def decode_all(jobs: list[dict[str, Any]], settings: DecodeSettings, workers: int,
               timeout: float | None) -> Iterator[dict[str, Any]]:
    """Decode ``jobs`` (dicts with ``index`` and ``path``) in ``workers`` processes; yield results as they come.

    A file that takes longer than ``timeout`` seconds (``None``: no time box) yields reason
    ``decode_timeout``; one whose worker dies while decoding it yields ``decoder_crash``. Every
    job yields exactly one result. A worker that exits before it starts its file (the
    interpreter or the decoder cannot be loaded) costs no file: the file goes to the next
    worker, and after ``START_ATTEMPTS`` such exits in a row the run stops with
    :class:`errors.MmclinicError`.
    """
    if not jobs:
        return
    pool = DecodePool(settings, min(workers, len(jobs)))
    try:
        yield from pool.run(jobs, timeout)
    finally:
        pool.close()


IDLE_WORKERS = 4
"""Workers :func:`call_in_worker` keeps warm per kind of call (one per thread calling at once)."""


class _IdlePools:
    """Single-worker pools waiting for the next :func:`call_in_worker`; closed at exit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.pools: dict[DecodeSettings, list[DecodePool]] = {}

    def take(self, settings: DecodeSettings) -> DecodePool:
        with self.lock:
            if self.pid != os.getpid():  # a forked child: those workers belong to the parent
                self.pools, self.pid = {}, os.getpid()
            idle = self.pools.get(settings)
            if idle:
                return idle.pop()
        return DecodePool(settings, 1)

    def give_back(self, pool: DecodePool) -> None:
        with self.lock:
            idle = self.pools.setdefault(pool.settings, [])
            if self.pid == os.getpid() and len(idle) < IDLE_WORKERS:
                idle.append(pool)
                return
        pool.close()

    def close(self) -> None:
        with self.lock:
            pools = [p for idle in self.pools.values() for p in idle] if self.pid == os.getpid() else []
            self.pools = {}
        for pool in pools:
            pool.close()


_IDLE = _IdlePools()
atexit.register(_IDLE.close)


def call_in_worker(fn: Callable[..., Any], args: Sequence[Any], timeout: float, name: str) -> Any:
    """``fn(*args)`` in a decoding worker under the time box; its value, or the exception it raised.

    ``fn`` must be importable by name (a module-level function of an importable module), and
    ``args`` and its value picklable. Past ``timeout`` seconds the worker is killed and
    :class:`errors.DecodeTimeout` (reason ``decode_timeout``) is raised; a worker that dies
    raises :class:`errors.CorruptImage` with reason ``decoder_crash``; both name ``name``
    (a file name) and never an argument's value. The worker is kept for the next call.
    """
    if not timeout > 0:
        raise errors.UsageError(f"decode_timeout must be > 0 seconds or None, got {timeout!r}")
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise errors.UsageError(f"a time-boxed call needs a module-level function of an importable module, "
                                f"got {qualname or fn!r} from {module!r}")
    settings = DecodeSettings(out_dir="", decoder=f"{__name__}:call_job",
                              preload=(module,))
    job = {"index": 0, "path": name, "fn": f"{module}:{qualname}", "args": tuple(args)}
    pool = _IDLE.take(settings)
    try:
        (result,) = pool.run([job], timeout)
    except BaseException:
        pool.close()
        raise
    _IDLE.give_back(pool)
    if result["ok"]:
        return result["value"]
    if "error" in result:
        raise result["error"]
    kind = errors.DecodeTimeout if result["reason"] == "decode_timeout" else errors.CorruptImage
    raise kind(result["message"], reason_code=result["reason"])


if __name__ == "__main__":
    worker_main()
