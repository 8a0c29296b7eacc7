"""The data-wait share of a training epoch on a set larger than the memory it may use (CPU).

  data wait beyond RAM = time inside the batch iterator's next() / the epoch's wall time, with the set
                         dropped from the page cache every EVICT_EVERY batches, so that batches read from
                         disk as they do from a set larger than RAM (AffectNet at 224 px is ~43 GB)

Measured as a trial runs (batches read ahead by a background thread, PREFETCH_BATCHES) and, for comparison
in the same run, with PREFETCH_BATCHES = 0 (each batch gathered in the training thread when it is needed);
epochs of the two alternate, and each side's fastest of three is kept (the least disturbed by other work).
The model is small (a 2-layer ViT at 64 px on one core, ~30 ms a step) so that reading a batch is a
sizeable part of a step, as it is for a GPU step reading from disk.
Dropping the cache: madvise(MADV_DONTNEED) unmaps the set's pages from this process (the page cache keeps
a page some process maps), then posix_fadvise(POSIX_FADV_DONTNEED) drops the clean pages of the file; no
root is needed for a file one owns. mincore says how much of the set is cached; where the OS lacks these
calls, or the file cannot leave memory (a tmpfs), the bench is skipped.
"""
import ctypes
import itertools
import mmap
import os
import time

import numpy as np
import pytest
import torch

from trainers import train
from trainers.config import from_dict
from trainers.data.dataset import DataReport, PreparedData
from trainers.data.split import TRAIN, VAL
from trainers.models import build_model
from trainers.train import build_loop, train_one_epoch

SIZE = 64
ROWS = 24_000              # 24,000 x 64 x 64 x 3 bytes = 295 MB on disk
TRAIN_ROWS = 1_920         # an epoch: 60 batches of 32, drawn from the whole file
EVICT_EVERY = 4            # batches between two drops of the page cache
CLASSES = 6
LIBC = ctypes.CDLL(None, use_errno=True)


def evictable() -> bool:
    return all((hasattr(os, "posix_fadvise"), hasattr(mmap, "MADV_DONTNEED"), hasattr(LIBC, "madvise"),
                hasattr(LIBC, "mincore")))


class MappedSet:
    """A .npy image set mapped read-only as prepare_data maps one, with the page cache it holds measured and dropped."""

    def __init__(self, path):
        self.images = np.load(path, mmap_mode="r")
        self.fd = os.open(path, os.O_RDONLY)
        lead = self.images.offset % mmap.ALLOCATIONGRANULARITY      # numpy maps from a page boundary
        self.start, self.length = self.images.ctypes.data - lead, self.images.nbytes + lead
        self.most_cached = 0           # bytes, the most seen before a drop

    def cached_bytes(self) -> int:
        resident = (ctypes.c_ubyte * -(-self.length // mmap.PAGESIZE))()
        if LIBC.mincore(ctypes.c_void_p(self.start), ctypes.c_size_t(self.length), resident):
            raise OSError(ctypes.get_errno(), "mincore failed")
        return int((np.frombuffer(resident, np.uint8) & 1).sum()) * mmap.PAGESIZE

    def drop(self) -> None:
        self.most_cached = max(self.most_cached, self.cached_bytes())
        if LIBC.madvise(ctypes.c_void_p(self.start), ctypes.c_size_t(self.length), mmap.MADV_DONTNEED):
            raise OSError(ctypes.get_errno(), "madvise failed")
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def write_set(path) -> None:
    """Random pixels in a .npy file, written 1,000 rows (12 MB) at a time."""
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(ROWS, SIZE, SIZE, 3))
    for start in range(0, ROWS, 1000):
        images[start:start + 1000] = np.frombuffer(rng.bytes(1000 * SIZE * SIZE * 3), np.uint8).reshape(-1, SIZE,
                                                                                                        SIZE, 3)
    images.flush()
    del images
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def prepared(images: np.ndarray) -> PreparedData:
    rng = np.random.default_rng(1)
    splits = np.full(ROWS, VAL, np.int8)
    splits[rng.choice(ROWS, TRAIN_ROWS, replace=False)] = TRAIN
    return PreparedData(images=images, labels=rng.integers(0, CLASSES, ROWS), splits=splits,
                        classes=tuple(f"c{i}" for i in range(CLASSES)), paths=[""] * ROWS, subjects=[None] * ROWS,
                        attrs=[{}] * ROWS, digest="bench", root="", report=DataReport())


def timed_batches(waits: list[float]):
    """train.batches, with the time spent in each next() appended to waits."""
    real = train.batches

    def batches(*args, **kwargs):
        stream = real(*args, **kwargs)
        while True:
            t0 = time.perf_counter()
            item = next(stream, None)
            waits.append(time.perf_counter() - t0)
            if item is None:
                return
            yield item
    return batches


def dropping_gather(mapped: MappedSet, drops: list[float]):
    """train.gather_rows, with the page cache dropped before every EVICT_EVERY-th batch and each drop timed.

    The drop runs in the thread that gathers, so it never falls between a batch's read-ahead hint and its read.
    """
    real, calls = train.gather_rows, itertools.count(1)

    def gather_rows(images, rows, fd=None):
        if next(calls) % EVICT_EVERY == 0:
            t0 = time.perf_counter()
            mapped.drop()
            drops.append(time.perf_counter() - t0)
        return real(images, rows, fd)
    return gather_rows


def timed_epoch(loop, mapped: MappedSet, waits: list[float], drops: list[float]) -> tuple[float, float]:
    """(wall, data wait) seconds of one epoch started with nothing cached, less the drops' own time (~5 ms each).

    A drop takes CPU from the step (2 cores) and, without the reader thread, happens inside next().
    """
    mapped.drop()
    waits.clear()
    drops.clear()
    t0 = time.perf_counter()
    train_one_epoch(loop, 1)
    wall = time.perf_counter() - t0 - sum(drops)
    return wall, sum(waits) - (sum(drops) if train.PREFETCH_BATCHES == 0 else 0.0)


def test_data_wait_share_when_the_set_does_not_fit_in_memory(tmp_path, monkeypatch):
    if not evictable():
        pytest.skip("needs posix_fadvise, madvise(MADV_DONTNEED) and mincore (Linux) to drop the page cache")
    write_set(tmp_path / "images.npy")
    mapped = MappedSet(tmp_path / "images.npy")
    mapped.drop()
    if mapped.cached_bytes() > mapped.length // 100:
        pytest.skip(f"{tmp_path} cannot leave memory (a tmpfs?): the page cache was not dropped")
    mapped.most_cached = 0          # from here on: what the training epochs leave cached

    cfg = from_dict({"model": {"name": "vit", "image_size": SIZE,
                               "vit": {"patch_size": 8, "hidden_size": 48, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "intermediate_size": 96}},
                     # One core computes and one is left to the reader, as a GPU's host has cores to spare.
                     "data": {"balance": False}, "train": {"batch_size": 32, "device": "cpu", "num_threads": 1}})
    loop = build_loop(cfg, prepared(mapped.images), build_model(cfg.model, CLASSES))
    waits: list[float] = []
    drops: list[float] = []
    monkeypatch.setattr(train, "batches", timed_batches(waits))
    monkeypatch.setattr(train, "gather_rows", dropping_gather(mapped, drops))

    timed_epoch(loop, mapped, waits, drops)     # warm-up: first calls, allocator
    ahead, inline = train.PREFETCH_BATCHES, 0
    epochs = {ahead: [], inline: []}            # (wall, wait) of each epoch
    for _ in range(3):
        for depth in (ahead, inline):           # the same epoch (rows, order) each time
            monkeypatch.setattr(train, "PREFETCH_BATCHES", depth)
            epochs[depth].append(timed_epoch(loop, mapped, waits, drops))
    (wall, wait), (wall0, wait0) = min(epochs[ahead]), min(epochs[inline])
    steps = TRAIN_ROWS // 32
    print(f"\ndata wait beyond RAM   {wait / wall:.1%} of the epoch (goal <= 5%), page cache dropped every "
          f"{EVICT_EVERY} batches, set {mapped.length / 1e6:.0f} MB, at most {mapped.most_cached / 1e6:.0f} MB "
          f"of it cached; {wait * 1e3 / steps:.1f} ms of {wall * 1e3 / steps:.0f} ms a step")
    print(f"  without read-ahead   {wait0 / wall0:.1%} of the epoch ({wait0 * 1e3 / steps:.1f} ms of "
          f"{wall0 * 1e3 / steps:.0f} ms a step; PREFETCH_BATCHES = 0)")
    assert wait / wall <= 0.05
