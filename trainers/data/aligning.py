"""Building a dataset's aligned set file: rows streamed to disk chunk by chunk, never all in memory.

Each chunk of samples takes what the cache already holds (a row of another set, a row a killed preparation
journalled, an object of the per-image layout) and aligns the rest: in this process (a GPU's batched
detection, or align: none), or in one worker process per core on CPU, each with its own detector.
Chunks reach the file in sample order whichever worker finishes first, so the rows are the same whatever
the number of workers (a worker's MTCNN runs on one thread: a pixel may differ by one level from a run on
several, as float sums change order); the rows' perceptual hashes (the leakage audit's) are computed on
the way, so the set is never read back whole.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from trainers.data.align import Aligner, build_aligner, detector_device
from trainers.data.audit import perceptual_hashes
from trainers.data.cache import AlignedStore, RowIndex, RowReader, SetWriter, remove_stale_partials, save_array
from trainers.data.images import (DECODE_REASONS, ImageSkipped, Unread, decode_image_bytes, decode_side,
                                  read_image_file)
from trainers.data.sources import Sample
from trainers.errors import UserError
from trainers.process.children import PR_SET_PDEATHSIG
from trainers.progress import progress

# Images decoded and aligned per step; MTCNN batches equal-sized ones within it.
# At most 64 x 896 x 896 x 3 bytes (~150 MB) of decoded pixels are held at once per worker.
ALIGN_CHUNK = 64
# Chunks handed to each worker before the oldest is waited for: keeps every worker busy while the
# file is written in order, and bounds what waits in memory to a few chunks per worker.
CHUNKS_AHEAD = 2
# FER_ALIGN_WORKERS=N sets how many worker processes align on CPU (default: one per core this process may
# use; 0 aligns in this process, as on a GPU or a single core).
WORKERS_ENV = "FER_ALIGN_WORKERS"

# Fewer images than this to align are aligned in this process: starting the workers (each imports torch and
# builds MTCNN, ~5 s on 2 cores) costs about what they would gain on ~100 images. Measured on 2 cores,
# 640 photos of 256 px: this process 16.9 images/s, one worker 12.6, two workers 19.8.
WORKERS_FROM = 512

# What one worker's MTCNN holds at its peak: ~1.2 GB measured for batches of 32 at 448 px (a 224-px model's
# detection size), with room to spare. Workers are capped by the memory available, not only the cores.
WORKER_MEMORY = 3 * 2**29

# One result per sample: (sample position, image or skip reason, fell back, where it came from).
ALIGNED, CACHED, LEGACY = "aligned", "cached", "legacy"


@dataclass
class AlignJob:
    """The readable samples to align and the store their results go to: what every alignment step shares."""
    store: AlignedStore
    aligner: Aligner
    samples: list[Sample]
    keys: list[str]             # per sample: its cache key
    digests: list[str]          # per sample: the SHA-256 of its file, which the bytes decoded must have
    image_size: int
    refresh: bool = False       # decode again what the cache holds as unusable


@dataclass
class AlignedSet:
    """Aligned images of the kept samples, which samples were kept, and why others were not."""
    images: np.ndarray          # K x S x S x 3 uint8, memory-mapped from the set file
    keep: list[bool]            # per listed-and-readable sample
    fallback: list[bool]        # per kept image: the aligner found no face
    decoded: int                # images decoded (and aligned) this time
    reasons: Counter            # skip reason -> images


@dataclass
class _Written:
    """What the set file holds so far, for its manifest."""
    keep: list[bool] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)           # per row
    fallback: list[bool] = field(default_factory=list)      # per row
    skips: dict[str, str] = field(default_factory=dict)     # unusable key -> reason
    reasons: Counter = field(default_factory=Counter)
    decoded: int = 0
    hashes: list[np.ndarray] = field(default_factory=list)  # per chunk of rows: their perceptual hashes
    legacy: list[str] = field(default_factory=list)         # keys taken from per-image objects


def align_workers(aligner: Aligner) -> int:
    """Worker processes that align: one per usable core for MTCNN on CPU (FER_ALIGN_WORKERS overrides);
    0, this process, for align: none, on a GPU and on one core."""
    if aligner.settings["align"] == "none":
        return 0            # decoding and a resize: threads in this process already use every core
    configured = configured_workers()
    if configured is not None:
        return configured
    if detector_device() != "cpu":
        return 0            # this process feeds the GPU batched detections
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(cores, _available_memory() // WORKER_MEMORY)
    return workers if workers > 1 else 0    # one worker would only give up this process's threads


def configured_workers() -> int | None:
    """FER_ALIGN_WORKERS as a number, None when unset; a value that is not a whole number is refused."""
    configured = os.environ.get(WORKERS_ENV, "").strip()
    if not configured:
        return None
    if not configured.isdigit():
        raise UserError(f"{WORKERS_ENV}={configured[:40]!r}: set it to a whole number of worker processes "
                        "(0: align in this process), or unset it to use one per core")
    return int(configured)


def _available_memory() -> int:
    """Bytes the kernel says can be used without swapping (MemAvailable); unknown: as if plenty."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, ValueError, KeyError, IndexError):
        return 1 << 62      # not Linux: the cores alone decide


def build_set(job: AlignJob, set_key: str, workers: int | None) -> AlignedSet:
    """Write the set file of job's samples, reusing cached rows, aligning the rest; return it mapped.
    workers: worker processes that align, 0 for this process; None: align_workers decides."""
    job.store.check_room(len(job.samples))
    configured_workers()        # a bad FER_ALIGN_WORKERS is refused on small sets too, not first at 512 images
    index = RowIndex.load(job.store)
    if job.refresh:
        index.skips.clear()
    reader = RowReader(job.store.row_shape)
    writer = SetWriter(job.store, set_key)
    written = _Written()
    label = "aligning faces" if job.aligner.settings["align"] != "none" else "decoding images"
    try:
        uncached = sum(k not in index.rows and k not in index.skips for k in job.keys)
        if uncached < WORKERS_FROM:
            workers = 0
        elif workers is None:
            workers = align_workers(job.aligner)
        with _aligner_pool(job, workers) as submit:
            results = _results(job, index, reader, submit, CHUNKS_AHEAD * workers)
            chunk: list[tuple] = []
            for result in progress(results, len(job.samples), label):
                chunk.append(result)
                if len(chunk) == ALIGN_CHUNK:
                    _append(writer, written, chunk)
                    chunk = []
            _append(writer, written, chunk)
        writer.finish({"keep": written.keep, "reasons": written.reasons, "fallback": written.fallback,
                       "keys": written.keys, "skips": written.skips})
    except BaseException:
        writer.close()
        raise
    finally:
        reader.close()
    return _finished(job.store, set_key, written)


def reads_again(job: AlignJob, manifest: dict) -> bool:
    """Whether a sample a stored set of job's samples left out for something other than its bytes failing to
    decode (a read failure, or bytes other than its digest's) now reads, as the bytes its digest names: only
    then would writing the set again change it. Reading those few files is cheap; rewriting every row of
    the set at every preparation, while a file stays unreadable, is not."""
    decode_skips = manifest.get("skips", {})
    for i, kept in enumerate(manifest["keep"][:len(job.keys)]):
        if kept or decode_skips.get(job.keys[i]) in DECODE_REASONS:
            continue
        try:
            data = read_image_file(job.samples[i].path)
        except ImageSkipped:
            continue
        if hashlib.sha256(data).hexdigest() == job.digests[i]:
            return True
    return False


def _finished(store: AlignedStore, set_key: str, written: _Written) -> AlignedSet:
    """The set just written, mapped; its hashes kept beside it; what it made redundant removed."""
    set_array = store.set_paths(set_key)[0]
    hashes = np.concatenate(written.hashes) if written.hashes else np.zeros((0, 32), np.uint8)
    save_array(set_array.with_suffix(".phash256.npy"), hashes)
    if written.legacy:
        store.forget_legacy(written.legacy)
        print(f"cache: {len(written.legacy)} aligned images moved from one file each into {set_array.name} "
              f"({store.root})", file=sys.stderr)
    remove_stale_partials(store, set_key, set(written.keys))
    images = np.load(set_array, mmap_mode="r", allow_pickle=False)
    return AlignedSet(images, written.keep, written.fallback, written.decoded, written.reasons)


def _append(writer: SetWriter, written: _Written, chunk: list[tuple]) -> None:
    """One chunk of results, in sample order: kept images to the file, the rest counted with their reason
    (and cached with it when decoding the bytes failed, not reading the file)."""
    images, keys, fallback, skips = [], [], [], {}
    for i, value, fell_back, source, key in chunk:
        written.decoded += source == ALIGNED
        if source == LEGACY:
            written.legacy.append(key)
        if isinstance(value, str):
            written.keep.append(False)
            written.reasons[str(value)] += 1
            if not isinstance(value, Unread):
                skips[key] = value
            continue
        written.keep.append(True)
        images.append(value)
        keys.append(key)
        fallback.append(bool(fell_back))
    if not images and not skips:
        return
    writer.append(images, keys, fallback, skips)
    written.keys += keys
    written.fallback += fallback
    written.skips.update(skips)
    if images:
        written.hashes.append(perceptual_hashes(np.stack(images)))


def _results(job: AlignJob, index: RowIndex, reader: RowReader, submit: Callable, ahead: int) -> Iterator[tuple]:
    """(position, image or reason, fell back, source, key) per sample, in sample order.

    Up to ``ahead`` chunks are being aligned while the oldest is written out."""
    waiting: deque = deque()
    for start in range(0, len(job.samples), ALIGN_CHUNK):
        positions = range(start, min(start + ALIGN_CHUNK, len(job.samples)))
        found = {i: _cached(job, index, reader, i) for i in positions}
        pending = [i for i in positions if found[i] is None]
        items = [(str(job.samples[i].path), job.samples[i].box, job.digests[i]) for i in pending]
        todo = submit(items) if pending else None
        waiting.append((positions, found, pending, todo))
        while len(waiting) > ahead:
            yield from _merged(job, *waiting.popleft())
    while waiting:
        yield from _merged(job, *waiting.popleft())


def _merged(job: AlignJob, positions: range, found: dict, pending: list[int], todo) -> Iterator[tuple]:
    aligned = dict(zip(pending, todo.result())) if todo is not None else {}
    for i in positions:
        key = job.keys[i]
        if i in aligned:
            value, fell_back = aligned[i]
            yield i, value, fell_back, ALIGNED, key
        else:
            value, fell_back, source = found[i]
            yield i, value, fell_back, source, key


def _cached(job: AlignJob, index: RowIndex, reader: RowReader, i: int) -> tuple | None:
    """(image or reason, fell back, source) for a sample the cache holds; None when it must be aligned."""
    key = job.keys[i]
    row = index.rows.get(key)
    if row is not None:
        image = reader.read(row)
        if image is not None:
            return image, row.fallback, CACHED
    if key in index.skips:
        return index.skips[key], False, CACHED
    legacy = job.store.legacy_get(key)
    if legacy is None or (isinstance(legacy[0], str) and (job.refresh or legacy[0] not in DECODE_REASONS)):
        return None
    return (*legacy, LEGACY)


class _Now:
    """A result computed when asked for: this process's alignment, in the order results are written."""

    def __init__(self, fn: Callable, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


@contextmanager
def _aligner_pool(job: AlignJob, workers: int) -> Iterator[Callable]:
    """submit(items) -> an object whose result() is align_items' list: in worker processes, or here (0)."""
    settings, size, context = job.aligner.settings, job.image_size, job.aligner.box_context
    if workers < 1:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as threads:
            yield lambda items: _Now(align_items, items, size, context, job.aligner, threads)
        return
    # spawn: a fork of a process whose torch threads are running can deadlock in the child.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_start, initargs=(os.getpid(),))
    try:
        yield lambda items: pool.submit(align_items, items, size, context, settings)
    except BrokenProcessPool:
        pool.shutdown(wait=False, cancel_futures=True)
        raise UserError(f"an alignment worker process died (out of memory?); set {WORKERS_ENV} to fewer than "
                        f"{workers} worker processes (0: align in this process) and prepare again: what was "
                        "aligned is kept") from None
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)    # Ctrl-C, an error: do not align what is queued
        raise
    pool.shutdown(wait=True)


def _worker_start(parent: int) -> None:
    """Die with the preparing process, even when it is SIGKILLed; one torch thread per worker process (the
    processes, not threads, share out the cores)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
    # Ctrl-C reaches the whole process group: the preparing process stops the pool, so a worker ignores it
    # rather than print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch
    torch.set_num_threads(1)


_WORKER_ALIGNERS: dict[str, Aligner] = {}


def align_items(items: list[tuple[str, tuple | None, str]], image_size: int, box_context: float,
                aligner: Aligner | dict, threads: Executor | None = None) -> list[tuple[np.ndarray | str, bool]]:
    """(aligned image or skip reason, fell back) per (path, face box, digest) item. ``aligner`` is an Aligner,
    or in a worker process its settings (the worker builds it once)."""
    if isinstance(aligner, dict):
        name = repr(sorted(aligner.items()))
        if name not in _WORKER_ALIGNERS:
            _WORKER_ALIGNERS[name] = build_aligner(aligner["align"], int(aligner["size"]),
                                                   float(aligner.get("margin", 0.0)))
        aligner = _WORKER_ALIGNERS[name]
    decode = lambda item: decode_region(Path(item[0]), item[1], item[2], image_size, box_context)   # noqa: E731
    decoded = list(threads.map(decode, items) if threads is not None else map(decode, items))
    good = [rgb for rgb in decoded if not isinstance(rgb, str)]
    faces = iter(aligner.align(good))
    out: list[tuple[np.ndarray | str, bool]] = []
    for rgb in decoded:
        if isinstance(rgb, str):
            out.append((rgb, False))
        else:
            face = next(faces)
            out.append((face.image, face.fallback))
    return out


def decode_region(path: Path, box: tuple | None, digest: str, image_size: int, box_context: float
                  ) -> np.ndarray | str:
    """The decoded image (cropped to its face box, widened by box_context), or why it is unusable: an Unread
    reason when the file could not be read, or was replaced after its digest was taken (the bytes are not the
    ones its cache key names)."""
    try:
        data = read_image_file(path)
    except ImageSkipped as skip:
        return Unread(skip.reason)
    if hashlib.sha256(data).hexdigest() != digest:
        return Unread("vanished")
    try:
        rgb = decode_image_bytes(data, max_side=decode_side(image_size))[0]
    except ImageSkipped as skip:
        return skip.reason
    if box is None:
        return rgb
    return crop_to_box(rgb, box, _stored_size(data), box_context)


def crop_to_box(rgb: np.ndarray, box: tuple[int, int, int, int], stored_size: tuple[int, int],
                context: float) -> np.ndarray:
    """The part of rgb inside box (x, y, w, h in the file's pixels, rgb possibly shrunk), widened by context."""
    sx, sy = rgb.shape[1] / stored_size[0], rgb.shape[0] / stored_size[1]
    x, y, w, h = box
    x0, x1 = max(0, round((x - context * w) * sx)), min(rgb.shape[1], round((x + w + context * w) * sx))
    y0, y1 = max(0, round((y - context * h) * sy)), min(rgb.shape[0], round((y + h + context * h) * sy))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return rgb        # a box outside the picture: align the whole image rather than lose it
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def _stored_size(data: bytes) -> tuple[int, int]:
    """Width and height as decode_image sees them (after the EXIF rotation), from the header alone."""
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)   # orientations that swap the axes
    return (height, width) if rotated else (width, height)
