"""Preparing data at scale: sets streamed to one file, each image stored once, a kill or a second process
costs nothing already aligned, and worker processes align exactly what one process does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.config import from_dict
from trainers.data import aligning
from trainers.data.cache import NPY_HEADER
from trainers.data.dataset import prepare_data
from trainers.data.images import centre_square, decode_image, decode_side
from trainers.errors import UserError

SIZE = 24


def noise_folder(root: Path, n: int, seed: int = 0) -> list[Path]:
    """n noise images of assorted sizes in two class folders, plus an unreadable one and a cut-off one."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / ("anger" if i % 2 else "happiness")
        folder.mkdir(parents=True, exist_ok=True)
        side = int(rng.integers(30, 90))
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(rng.integers(0, 256, (side, side + i % 7, 3), dtype=np.uint8)).save(paths[-1])
    (root / "anger" / "notes.jpg").write_text("not an image")
    (root / "happiness" / "cut.png").write_bytes(paths[0].read_bytes()[:40])
    return paths


def photo_folder(root: Path, n: int) -> Path:
    """n photos of a face (the astronaut, shifted and mirrored) at 256 px, in two class folders."""
    sys.path.insert(0, str(Path(__file__).parent / "bench"))
    from test_alignment_speed import shifted_faces
    for i, face in enumerate(shifted_faces(n, 256)):
        folder = root / ("anger" if i % 2 else "happiness")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(face).save(folder / f"{i:03d}.jpg", quality=92)
    return root


def data_cfg(root: Path, cache: Path, **data):
    return from_dict({"data": {"source": "imagefolder", "root": str(root), "classes": ["anger", "happiness"],
                               "cache_dir": str(cache), **data}}).data


def set_files(cache: Path) -> tuple[list[Path], list[Path]]:
    """(finished set files, partial files) of every aligned store under cache."""
    sets = [p for p in cache.glob("aligned/*/sets/*") if p.is_file()]
    finished = [p for p in sets if p.suffix == ".npy" and not p.name.startswith(".") and p.stem.isalnum()]
    return finished, [p for p in sets if p.name.startswith(".partial-")]


def test_the_streamed_set_holds_each_image_as_aligned_alone_and_stores_it_once(tmp_path):
    paths = noise_folder(tmp_path / "faces", 150)
    cache = tmp_path / "cache"
    data = prepare_data(data_cfg(tmp_path / "faces", cache), SIZE)

    # Byte for byte what aligning every usable file alone and stacking them gives (the former way).
    listed = sorted(paths, key=lambda p: (p.parent.name, p.name))
    expected = np.stack([centre_square(decode_image(p, max_side=decode_side(SIZE)), SIZE) for p in listed])
    order = [data.paths.index(f"{p.parent.name}/{p.name}") for p in listed]
    assert np.array_equal(np.asarray(data.images)[order], expected)
    assert data.report.skipped == {"not_an_image": 1, "truncated": 1}

    # One copy: the set file is the images plus its header; no per-image objects, nothing partial left.
    finished, partial = set_files(cache)
    assert len(finished) == 1 and not partial and not list(cache.glob("aligned/*/objects"))
    assert finished[0].stat().st_size == NPY_HEADER + expected.nbytes
    cache_bytes = sum(p.stat().st_size for p in cache.glob("aligned/**/*") if p.is_file())
    assert cache_bytes <= 1.1 * expected.nbytes

    # A dataset that gains images aligns only the new ones; the skipped files are not decoded again.
    noise_folder(tmp_path / "faces", 160, seed=0)
    grown = prepare_data(data_cfg(tmp_path / "faces", cache), SIZE)
    assert grown.report.decoded == 10 and grown.report.usable == 160
    # The former dataset, asked for again, is still a set of its own: nothing decoded.
    for extra in (tmp_path / "faces" / "anger").glob("015[1-9].png"):
        extra.unlink()
    for extra in (tmp_path / "faces" / "happiness").glob("01[56]?.png"):
        extra.unlink()
    former = prepare_data(data_cfg(tmp_path / "faces", cache), SIZE)
    assert former.report.decoded == 0 and np.array_equal(np.asarray(former.images), np.asarray(data.images))


CHILD = textwrap.dedent('''
    import sys, time, hashlib
    import numpy as np
    from trainers.config import from_dict
    from trainers.data import aligning
    from trainers.data.dataset import prepare_data

    def slow(align_items):
        def wrapped(*args, **kwargs):
            time.sleep(float(sys.argv[3]))      # a slow aligner, so that the test's kill lands half way
            return align_items(*args, **kwargs)
        return wrapped

    if __name__ == "__main__":
        aligning.ALIGN_CHUNK = 8
        aligning.align_items = slow(aligning.align_items)
        cfg = from_dict({"data": {"source": "imagefolder", "root": sys.argv[1], "cache_dir": sys.argv[2],
                                  "classes": ["anger", "happiness"]}}).data
        data = prepare_data(cfg, 24)
        print(data.report.decoded, hashlib.sha256(np.ascontiguousarray(data.images).tobytes()).hexdigest())
''')


def start_child(tmp_path: Path, root: Path, cache: Path, delay: float) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), str(root), str(cache), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def journalled(cache: Path) -> int:
    """Samples (aligned images and unusable files) the partial sets' journals list as done."""
    done = 0
    for journal in cache.glob("aligned/*/sets/.partial-*.jsonl"):
        for line in journal.read_text().splitlines():
            try:
                chunk = json.loads(line)
            except ValueError:
                break
            done += len(chunk["keys"]) + len(chunk["skips"])
    return done


def test_a_preparation_killed_half_way_leaves_no_set_and_the_rerun_aligns_only_the_rest(tmp_path):
    root, cache = tmp_path / "faces", tmp_path / "cache"
    noise_folder(root, 160)
    child = start_child(tmp_path, root, cache, 0.3)     # 20 chunks of 8, 0.3 s each
    deadline = time.monotonic() + 120
    while journalled(cache) < 40 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = journalled(cache)
    finished, partial = set_files(cache)
    assert 40 <= done < 162 and not finished and partial, "the kill must land half way"

    again = prepare_data(data_cfg(root, cache), SIZE)
    assert again.report.decoded == 162 - done          # 160 images and 2 unusable files
    clean = prepare_data(data_cfg(root, tmp_path / "clean"), SIZE)
    assert np.array_equal(np.asarray(again.images), np.asarray(clean.images))
    finished, partial = set_files(cache)
    assert len(finished) == 1 and not partial      # the dead process's rows are in the set: its files went


def test_temporary_files_a_killed_writer_left_are_removed_by_a_later_preparation_and_fresh_ones_kept(tmp_path):
    root, cache = tmp_path / "faces", tmp_path / "cache"
    noise_folder(root, 8)
    prepare_data(data_cfg(root, cache), SIZE)
    (sets,) = cache.glob("aligned/*/sets")
    stale, fresh = sets / ".tmp-4242-abc.npy", sets / ".tmp-4243-def.npy"    # a copy killed an hour ago; one
    for path in (stale, fresh):                                              # being written now
        path.write_bytes(b"\x93NUMPY" + bytes(1000))
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    noise_folder(root, 10, seed=1)      # other images: a new set is built
    prepare_data(data_cfg(root, cache), SIZE)
    assert not stale.exists() and fresh.exists()


def test_two_processes_preparing_the_same_data_at_once_both_finish_with_one_set(tmp_path):
    root, cache = tmp_path / "faces", tmp_path / "cache"
    noise_folder(root, 80)
    children = [start_child(tmp_path, root, cache, 0.2) for _ in range(2)]
    outputs = [child.communicate(timeout=300) for child in children]
    assert [c.returncode for c in children] == [0, 0], outputs
    digests = {out.split()[-1] for out, _ in outputs}
    assert len(digests) == 1
    finished, partial = set_files(cache)
    assert len(finished) == 1 and not partial
    third = prepare_data(data_cfg(root, cache), SIZE)
    assert third.report.decoded == 0 and third.report.usable == 80


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_worker_processes_align_what_one_process_does(tmp_path, monkeypatch):
    root = photo_folder(tmp_path / "faces", 12)
    monkeypatch.setattr(aligning, "ALIGN_CHUNK", 4)        # three chunks, so two workers share them
    monkeypatch.setattr(aligning, "WORKERS_FROM", 1)       # workers even for 12 images
    one = prepare_data(data_cfg(root, tmp_path / "one", align="mtcnn"), 48, workers=0)    # this process
    two = prepare_data(data_cfg(root, tmp_path / "two", align="mtcnn"), 48, workers=2)
    assert one.report.decoded == two.report.decoded == 12
    # Same rows in the same order. A worker runs MTCNN on one thread, this process on two: float sums in
    # another order move a landmark by a rounding error, and a few pixels by one level (measured: 6e-5).
    diff = np.abs(np.asarray(one.images, np.int16) - np.asarray(two.images, np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert one.fallback.tolist() == two.fallback.tolist() and not one.fallback.all()


ORPHAN_CHILD = textwrap.dedent('''
    import sys
    from trainers.config import from_dict
    from trainers.data import aligning
    from trainers.data.dataset import prepare_data

    if __name__ == "__main__":
        aligning.ALIGN_CHUNK = 2
        aligning.WORKERS_FROM = 1
        cfg = from_dict({"data": {"source": "imagefolder", "root": sys.argv[1], "cache_dir": sys.argv[2],
                                  "classes": ["anger", "happiness"], "align": "mtcnn"}}).data
        prepare_data(cfg, 48, workers=2)
''')


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with their parent on Linux")
def test_alignment_workers_die_with_a_killed_preparation(tmp_path):
    root = photo_folder(tmp_path / "faces", 400)
    script = tmp_path / "orphans.py"
    script.write_text(ORPHAN_CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(root), str(tmp_path / "cache")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while journalled(tmp_path / "cache") < 4 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [pid for pid in children_of(child.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert child.poll() is None and len(workers) == 2, "the workers must be aligning when the kill comes"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 20
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if running(pid)]


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an init that does not reap would leave one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_align_workers_reads_its_setting_and_refuses_a_bad_one(monkeypatch, tmp_path):
    mtcnn = aligning.build_aligner("mtcnn", 48, 0.1)
    monkeypatch.setenv(aligning.WORKERS_ENV, "3")
    assert aligning.align_workers(mtcnn) == 3
    assert aligning.align_workers(aligning.build_aligner("none", 48, 0.1)) == 0
    monkeypatch.setenv(aligning.WORKERS_ENV, "0")
    assert aligning.align_workers(mtcnn) == 0
    # Unset: one per core, as many as the memory available holds (a worker's MTCNN peaks at ~1.2 GB), and
    # none when only one would fit: this process's threads then use every core.
    monkeypatch.delenv(aligning.WORKERS_ENV)
    monkeypatch.setattr(aligning, "detector_device", lambda: "cpu")
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(aligning, "_available_memory", lambda: 64 * aligning.WORKER_MEMORY)
    assert aligning.align_workers(mtcnn) == (cores if cores > 1 else 0)
    monkeypatch.setattr(aligning, "_available_memory", lambda: 2 * aligning.WORKER_MEMORY + 1)
    assert aligning.align_workers(mtcnn) == (2 if cores > 1 else 0)
    monkeypatch.setattr(aligning, "_available_memory", lambda: aligning.WORKER_MEMORY)
    assert aligning.align_workers(mtcnn) == 0
    monkeypatch.setenv(aligning.WORKERS_ENV, "many")
    with pytest.raises(UserError, match="FER_ALIGN_WORKERS='many': set it to a whole number"):
        aligning.align_workers(mtcnn)
    # A set too small for workers refuses it too: the setting is wrong before the data grows to 512 images.
    noise_folder(tmp_path / "faces", 8)
    with pytest.raises(UserError, match="FER_ALIGN_WORKERS='many': set it to a whole number"):
        prepare_data(data_cfg(tmp_path / "faces", tmp_path / "cache"), SIZE)


def test_the_digest_index_reads_a_file_once_keeps_every_digest_exactly_and_takes_over_a_json_index(tmp_path,
                                                                                                monkeypatch):
    import hashlib
    from trainers.data import cache as cache_module
    from trainers.data.cache import DigestIndex

    root = tmp_path / "faces"
    root.mkdir()
    # A SHA-256 ending in a zero byte: a fixed-size bytes field would drop it and name other bytes.
    data = next(b for b in (f"img{i}".encode() for i in range(100_000)) if hashlib.sha256(b).digest()[-1] == 0)
    (root / "zero.png").write_bytes(data)
    (root / "b.png").write_bytes(b"b" * 10)
    expected = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in ("zero.png", "b.png")}
    first = DigestIndex(tmp_path / "cache", root)
    assert {name: first.digest(root / name) for name in expected} == expected
    first.save()

    reads = []
    real_read = cache_module.read_image_file
    monkeypatch.setattr(cache_module, "read_image_file", lambda path: reads.append(path) or real_read(path))
    again = DigestIndex(tmp_path / "cache", root)
    assert {name: again.digest(str(root / name)) for name in expected} == expected
    assert reads == []                                       # unchanged files are not read again
    os.utime(root / "b.png", ns=(1, 1))                      # a changed stat: read and hashed again
    assert again.digest(root / "b.png") == expected["b.png"] and len(reads) == 1

    # An index written as JSON before (path -> size, mtime, sha[, inode, ctime]) is read once and replaced;
    # an entry without inode and change time has its file hashed again, one with them is trusted.
    st = (root / "zero.png").stat()
    old = {"zero.png": [st.st_size, st.st_mtime_ns, "ab" * 32, st.st_ino, st.st_ctime_ns],
           "b.png": [10, 0, "cd" * 32]}
    legacy = tmp_path / "legacy"
    index = DigestIndex(legacy, root)
    index.path.parent.mkdir(parents=True)
    index.path.with_suffix(".json").write_text(json.dumps(old))
    taken = DigestIndex(legacy, root)
    assert taken.digest(root / "zero.png") == "ab" * 32 and taken.digest(root / "b.png") == expected["b.png"]
    taken.save()
    assert taken.path.exists() and not taken.path.with_suffix(".json").exists()


def test_the_data_digest_is_the_hash_it_always_was():
    # PreparedData.digest names a dataset in every run's params and in production's "once per data digest":
    # hashed piece by piece, it must stay the hash of the whole JSON text.
    from trainers.data.cache import short_hash
    from trainers.data.dataset import data_digest

    rng = np.random.default_rng(0)
    for n in (0, 1, 4096, 4097, 9000):
        paths = ["".join(rng.choice(list('ab/é"\\\n中 x'), size=rng.integers(0, 12))) for _ in range(n)]
        labels, splits = rng.integers(0, 300, n), rng.integers(0, 3, n).astype(np.int8)
        whole = short_hash({"content": 'c/x"é', "paths": paths, "labels": labels.tolist(), "split": splits.tolist()})
        assert data_digest('c/x"é', paths, labels, splits) == whole


def test_set_keys_are_the_hashes_they_always_were():
    # A set's key is the hash of its images' keys (subsets: of their rows); hashed piece by piece, every set
    # cached before is still found under its name.
    from trainers.data.cache import short_hash, short_hash_of_list

    rng = np.random.default_rng(1)
    for n in (0, 1, 4096, 4097, 9000):
        keys = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(n)]
        rows = sorted(rng.choice(20000, n, replace=False).tolist())
        assert short_hash_of_list(keys) == short_hash(keys)
        assert short_hash_of_list(rows) == short_hash(rows)
    assert short_hash_of_list(['é"\\', {"b": 1, "a": [2]}]) == short_hash(['é"\\', {"b": 1, "a": [2]}])
