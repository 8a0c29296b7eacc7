"""Preparing data survives what real disks and folders do: a file that vanishes or cannot be read while it is
prepared is never cached as a bad image, special files (a device, a FIFO) are never read, and a set that
cannot fit on the cache's disk is refused before anything is aligned."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.sweep.runner import data_line
from trainers.config import from_dict
from trainers.data import aligning, images
from trainers.data.dataset import DataError, prepare_data
from trainers.data.images import centre_square, decode_image, decode_side
from trainers.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["anger", "happiness"]
SIZE = 16
SPEC_SIZE = 32          # the input size of write_spec's model, which the prepare verb prepares at
MAX_PIXELS = images.MAX_PIXELS


def write_noise(folder: Path, n: int, seed: int, side: int = 40) -> list[Path]:
    """n noise PNGs (no two alike, so no near-duplicates) in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{seed}-{i}.png" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return paths


def data_cfg(tmp_path: Path, root: Path):
    return from_dict({"data": {"source": "imagefolder", "root": str(root), "classes": CLASSES,
                               "cache_dir": str(tmp_path / "cache")}}).data


def set_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache").glob("aligned/*/sets/*.npy") if not p.name.startswith(".")]


def test_a_folder_moved_while_it_is_prepared_is_not_cached_as_bad_and_the_next_prepare_uses_it(tmp_path,
                                                                                                 monkeypatch):
    root = tmp_path / "faces"
    write_noise(root / "anger", 6, seed=1)
    write_noise(root / "happy", 3, seed=2)
    real_align_items = aligning.align_items

    def move_happy_away_then_align(*args, **kwargs):
        # Listed and digested, then gone before being read: a folder moved, a network mount dropping out.
        if (root / "happy").exists():
            shutil.move(root / "happy", tmp_path / "elsewhere")
        return real_align_items(*args, **kwargs)

    monkeypatch.setattr(aligning, "align_items", move_happy_away_then_align)
    with pytest.raises(DataError) as refused:
        prepare_data(data_cfg(tmp_path, root), SIZE)
    message = str(refused.value)
    assert "class 'happiness' has no usable image" in message and "vanished 3" in message
    assert "add images for it" not in message          # its 3 images are there: nothing to add

    monkeypatch.setattr(aligning, "align_items", real_align_items)
    shutil.move(tmp_path / "elsewhere", root / "happy")
    again = prepare_data(data_cfg(tmp_path, root), SIZE)
    assert again.report.usable == 9 and again.report.skipped == {}
    assert again.report.decoded == 3                  # the anger rows aligned before are reused


def test_a_file_replaced_while_it_is_prepared_never_caches_the_new_bytes_under_the_old_ones(tmp_path, monkeypatch):
    root = tmp_path / "faces"
    write_noise(root / "anger", 6, seed=12)
    photo = write_noise(root / "happiness", 6, seed=13)[0]
    original, other = photo.read_bytes(), write_noise(tmp_path / "other", 1, seed=14)[0].read_bytes()
    real_align_items = aligning.align_items

    def replace_then_align(*args, **kwargs):
        photo.write_bytes(other)            # digested as one image, read as another (a sync tool at work)
        return real_align_items(*args, **kwargs)

    monkeypatch.setattr(aligning, "align_items", replace_then_align)
    first = prepare_data(data_cfg(tmp_path, root), SIZE)
    assert first.report.skipped == {"vanished": 1} and first.report.usable == 11
    assert "skipped 1 (vanished 1)" in data_line(first.report, SIZE)

    monkeypatch.setattr(aligning, "align_items", real_align_items)
    photo.write_bytes(original)             # back as it was: the same digest as when it was listed
    again = prepare_data(data_cfg(tmp_path, root), SIZE)
    row = again.paths.index(f"happiness/{photo.name}")
    assert np.array_equal(again.images[row], centre_square(decode_image(photo, decode_side(SIZE)), SIZE))


def test_prepare_refresh_re_examines_a_cached_decode_failure(in_tmp, monkeypatch, write_spec, capsys):
    from orchestrator.__main__ import main

    tmp_path = in_tmp
    root = tmp_path / "faces"
    write_noise(root / "anger", 6, seed=3)
    write_noise(root / "happiness", 5, seed=4)
    write_noise(root / "happiness", 1, seed=5, side=120)       # 14,400 px
    cfg = data_cfg(tmp_path, root)
    # A decoder that refused this image (here: an earlier, lower pixel limit) left its failure in the cache.
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    assert prepare_data(cfg, SPEC_SIZE).report.skipped == {"too_large": 1}
    monkeypatch.setattr(images, "MAX_PIXELS", MAX_PIXELS)
    assert prepare_data(cfg, SPEC_SIZE).report.skipped == {"too_large": 1}     # the same bytes: cached

    spec = write_spec(tmp_path, "refresh", {"once": {"grid": {"optim.lr": [1e-3]}}},
                      data={"source": "imagefolder", "root": str(root), "classes": CLASSES,
                            "cache_dir": str(tmp_path / "cache")})
    assert main(["prepare", str(spec), "--refresh"]) == 0
    assert "too_large" not in capsys.readouterr().out
    after = prepare_data(cfg, SPEC_SIZE)
    assert after.report.skipped == {} and after.report.usable == 12 and after.report.decoded == 0


SPECIAL_FILES_CHILD = textwrap.dedent('''
    import sys
    from trainers.config import from_dict
    from trainers.data.dataset import prepare_data
    from orchestrator.sweep.runner import data_line

    cfg = from_dict({"data": {"source": "imagefolder", "root": sys.argv[1], "cache_dir": sys.argv[2],
                              "classes": ["anger", "happiness"]}}).data
    data = prepare_data(cfg, 16)
    print(data_line(data.report, 16))
''')


def test_a_device_link_a_fifo_and_an_oversized_file_named_jpg_are_skipped_quickly_and_counted(tmp_path):
    root = tmp_path / "faces"
    write_noise(root / "anger", 6, seed=6)
    write_noise(root / "happiness", 5, seed=7)
    outside = write_noise(tmp_path / "outside", 1, seed=8)[0]
    os.symlink(outside, root / "happiness" / "linked.png")           # a link to a regular file: used
    os.symlink("/dev/zero", root / "anger" / "zero.jpg")              # endless bytes: read whole, memory runs out
    os.mkfifo(root / "happiness" / "pipe.jpg")                        # opened for reading: waits forever
    big = root / "anger" / "scan.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 2**20                                # over the 1 MB limit set below
    script = tmp_path / "child.py"
    script.write_text(SPECIAL_FILES_CHILD)
    env = {**os.environ, "FER_MAX_IMAGE_MB": "1", "PYTHONPATH": str(REPO)}
    # A child with a memory cap and a deadline: a regression fails here instead of hanging or exhausting memory.
    done = subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "cache")], env=env,
                          capture_output=True, text=True, timeout=120, preexec_fn=cap_memory)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert line.startswith("data: 12 images") and "skipped 3 (not_a_file 2, too_large 1)" in line, line


def cap_memory() -> None:
    """At most 2 GB of data memory: reading an endless device whole fails fast instead of exhausting the host."""
    import resource
    resource.setrlimit(resource.RLIMIT_DATA, (2 * 2**30, 2 * 2**30))


def test_a_set_that_does_not_fit_on_the_cache_disk_is_refused_before_aligning_and_a_cache_hit_needs_no_room(
        tmp_path, monkeypatch):
    root = tmp_path / "faces"
    write_noise(root / "anger", 6, seed=10)
    write_noise(root / "happiness", 6, seed=11)
    cfg = data_cfg(tmp_path, root)
    monkeypatch.setenv("FER_MIN_FREE_MB", str(10**9))      # 1 PB must stay free: no disk has that
    with pytest.raises(UserError) as refused:
        prepare_data(cfg, 64)
    message = str(refused.value)
    assert str(tmp_path / "cache") in message and "12 images at 64 px" in message, message
    assert "MB free" in message and "FER_MIN_FREE_MB" in message and "\n" not in message, message
    assert not set_files(tmp_path)                         # nothing aligned, nothing half written

    monkeypatch.delenv("FER_MIN_FREE_MB")
    first = prepare_data(cfg, 64)
    monkeypatch.setenv("FER_MIN_FREE_MB", str(10**9))
    again = prepare_data(cfg, 64)                          # a cache hit writes nothing: no room needed
    assert again.report.decoded == 0 and again.digest == first.digest
    assert data_line(again.report, 64).startswith("data: 12 images")


def write_same_size_pngs(folder: Path, names: list[str], seed: int) -> list[Path]:
    """Noise PNGs stored uncompressed: any two of the same side have the same size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / name for name in names]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path, compress_level=0)
    return paths


def test_a_file_replaced_by_one_of_the_same_size_with_its_mtime_kept_is_prepared_from_its_new_bytes(tmp_path):
    root = tmp_path / "faces"
    write_noise(root / "anger", 6, seed=15)
    photo = write_same_size_pngs(root / "happiness", [f"{i}.png" for i in range(6)], seed=16)[0]
    cfg = data_cfg(tmp_path, root)
    prepare_data(cfg, SIZE)
    # A copy or sync that keeps times: new bytes in the same place, of the same size, with the old mtime.
    before = photo.stat()
    replacement = write_same_size_pngs(tmp_path / "other", ["new.png"], seed=17)[0].read_bytes()
    assert len(replacement) == before.st_size and replacement != photo.read_bytes()
    photo.write_bytes(replacement)
    os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert photo.stat().st_mtime_ns == before.st_mtime_ns

    again = prepare_data(cfg, SIZE)
    assert again.report.skipped == {} and again.report.usable == 12
    row = again.paths.index(f"happiness/{photo.name}")
    assert np.array_equal(again.images[row], centre_square(decode_image(photo, decode_side(SIZE)), SIZE))


def test_a_set_with_a_file_that_stays_unreadable_is_reused_and_rebuilt_once_the_file_reads(tmp_path, monkeypatch):
    root = tmp_path / "faces"
    write_noise(root / "anger", 6, seed=18)
    photo = write_noise(root / "happiness", 6, seed=19)[0]
    cfg = data_cfg(tmp_path, root)
    real_open, real_align_items = os.open, aligning.align_items
    failing: set[str] = set()

    def open_or_fail(path, *args, **kwargs):
        # A bad sector or a failing network mount: stat answers as before, reading the file fails.
        if os.fspath(path) in failing:
            raise OSError(errno.EIO, "Input/output error", os.fspath(path))
        return real_open(path, *args, **kwargs)

    def fail_from_now_then_align(*args, **kwargs):
        failing.add(str(photo))             # digested (the index now knows it), then never read again
        return real_align_items(*args, **kwargs)

    monkeypatch.setattr(os, "open", open_or_fail)
    monkeypatch.setattr(aligning, "align_items", fail_from_now_then_align)
    first = prepare_data(cfg, SIZE)
    assert first.report.skipped == {"io_error": 1} and first.report.usable == 11
    monkeypatch.setattr(aligning, "align_items", real_align_items)
    (stored,) = [p for p in set_files(tmp_path) if p.name.count(".") == 1]   # not its hashes beside it
    written = stored.stat()

    again = prepare_data(cfg, SIZE)         # the file still fails: the set is the one stored, not rewritten
    assert again.report.skipped == {"io_error": 1} and again.report.decoded == 0 and again.digest == first.digest
    assert (stored.stat().st_ino, stored.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)

    failing.clear()                         # the disk or mount is back
    healed = prepare_data(cfg, SIZE)
    assert healed.report.skipped == {} and healed.report.usable == 12 and healed.report.decoded == 1
    row = healed.paths.index(f"happiness/{photo.name}")
    assert np.array_equal(healed.images[row], centre_square(decode_image(photo, decode_side(SIZE)), SIZE))
