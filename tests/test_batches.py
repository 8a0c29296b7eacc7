"""Batches from a memory-mapped set: the reader thread changes when rows are read, never what a batch holds."""
import os
import threading

import numpy as np
import pytest
import torch

from trainers import train
from trainers.train import batches, rows_file

CPU = torch.device("cpu")


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batch-reader"]


def open_files() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.fixture
def memmapped(tmp_path) -> np.ndarray:
    """50 random 8 x 8 RGB images in a .npy file, memory-mapped read-only as a prepared set is."""
    np.save(tmp_path / "images.npy", np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8))
    return np.load(tmp_path / "images.npy", mmap_mode="r")


def test_prefetched_batches_hold_the_same_positions_and_bytes_in_the_same_order(memmapped, monkeypatch):
    # Repeated rows, as a balanced plan has them; 71 rows in batches of 7 leave a lone last row for training to skip.
    order = np.random.default_rng(1).integers(0, len(memmapped), 71)
    ahead = [(pos, x.numpy().copy()) for pos, x in batches(memmapped, order, 7, CPU, training=True)]
    monkeypatch.setattr(train, "PREFETCH_BATCHES", 0)
    inline = [(pos, x.numpy().copy()) for pos, x in batches(memmapped, order, 7, CPU, training=True)]
    assert len(ahead) == len(inline) == 10
    for (pos, x), (pos0, x0) in zip(ahead, inline):
        assert np.array_equal(pos, pos0) and np.array_equal(x, x0)
        assert np.array_equal(x, memmapped[order[pos]])
    assert np.array_equal(np.concatenate([pos for pos, _ in ahead]), np.arange(70))


def test_leaving_the_loop_early_stops_the_reader_thread_and_closes_the_file(memmapped):
    order = np.arange(len(memmapped))
    files = open_files()
    for _ in batches(memmapped, order, 4, CPU):
        assert reader_threads()
        break
    assert not reader_threads()
    with pytest.raises(ZeroDivisionError):
        for _ in batches(memmapped, order, 4, CPU):
            1 / 0
    assert not reader_threads() and open_files() == files


def test_rows_are_announced_to_the_kernel_only_for_a_whole_mapped_file(memmapped):
    with rows_file(memmapped) as fd:
        assert fd is not None
    # In memory; a view whose offset is not the file's; a reversed view (its rows' offsets would be negative).
    for other in (np.array(memmapped), memmapped[10:], memmapped[::-1]):
        with rows_file(other) as fd:
            assert fd is None
    os.remove(memmapped.filename)           # moved away since it was mapped: the mapping still reads, no hint
    with rows_file(memmapped) as fd:
        assert fd is None
    assert len(list(batches(memmapped, np.arange(50), 8, CPU))) == 7


class FailingImages:
    """A set whose third read fails, as a disk error would."""

    def __init__(self, images: np.ndarray):
        self.images, self.shape, self.reads = images, images.shape, 0

    def __getitem__(self, rows):
        self.reads += 1
        if self.reads == 3:
            raise OSError("read error")
        return self.images[rows]


def test_a_failed_read_in_the_reader_is_raised_in_the_training_loop(memmapped):
    failing = FailingImages(memmapped)
    seen = []
    with pytest.raises(OSError, match="read error"):
        for rows in train.prefetched((failing[np.arange(i, i + 4)] for i in range(0, 40, 4)), 2):
            seen.append(rows)
    assert len(seen) == 2 and not reader_threads()
    # An array in memory on CPU is gathered in the loop's own thread: nothing to wait for, no core taken.
    seen = []
    with pytest.raises(OSError, match="read error"):
        for pos, _ in batches(FailingImages(np.array(memmapped)), np.arange(len(memmapped)), 4, CPU):
            seen.append(pos)
            assert not reader_threads()
    assert len(seen) == 2
