"""Content-addressed cache of decoded, aligned images as uint8 arrays: each image stored once.

Layout under ``cache_dir``:
  digests/<root>.npy                   per file under the dataset root: a hash of its path, size, mtime_ns,
                                       inode, ctime_ns and its SHA-256 (64 bytes): unchanged files are not read
                                       again (digests/<root>.json, the index before, is read once and replaced)
  aligned/<settings>/sets/<key>.npy    a dataset's aligned images, one row each: the storage itself
  aligned/<settings>/sets/<key>.json   its manifest: per row the image's cache key and whether the aligner
                                       fell back (no face, a centre crop); the unusable keys and why
  aligned/<settings>/sets/.partial-<pid>-<token>-<key>.npy|.jsonl   a set being written: rows appended chunk by
                                       chunk, each chunk journalled once its rows are on disk, so a
                                       preparation killed half way leaves every finished chunk reusable
Keys hash the image bytes plus the aligner settings, so every trial of every sweep reuses them. A set
missing from the cache is built from the rows of every other set (and of an unfinished one) that hold
its images, aligning only the rest: an image is aligned once, and stored in one file.
Caches written before sets held the images (objects/ab/<key>.npy, .skip, .fallback per image) are still
read; the objects a new set takes in are then removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from trainers.data.images import DECODE_REASONS, checked_stat, read_image_file
from trainers.process.free_space import MIN_FREE_ENV, DiskFullError, free_mb, min_free_mb, shown

CACHE_VERSION = 1


def short_hash(obj) -> str:
    """12 hex digits of the SHA-256 of a JSON-serialisable object."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def short_hash_of_list(items: list) -> str:
    """short_hash(items), its JSON text hashed a few thousand items at a time (a set's 32,000 keys took ~4 MB
    of text and bytes at once)."""
    sha = hashlib.sha256(b"[")
    for start in range(0, len(items), 4096):
        text = json.dumps(items[start:start + 4096], sort_keys=True, separators=(",", ":"))[1:-1]
        sha.update((text if start == 0 else "," + text).encode())
    sha.update(b"]")
    return sha.hexdigest()[:12]


def relative_posix(path: Path, base: Path) -> str | None:
    """path below base, as a posix string; None when it is not below it. Both absolute and normalised
    (as os.walk and abspath give them): a string comparison, for listings of many thousand files."""
    prefix = str(base).rstrip("/") + "/"
    text = str(path)
    return text[len(prefix):] if text.startswith(prefix) else None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """json.dump via a temporary file and rename: written as it is encoded, never whole in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# One entry of the digest index: 64 bytes, where a dict of lists of Python ints and hex strings took ~450.
DIGEST_ENTRY = np.dtype([("key", "<u8"), ("size", "<u8"), ("mtime", "<i8"), ("ino", "<u8"), ("ctime", "<i8"),
                         ("sha", "u1", (32,))])     # bytes, not "S32": numpy strips an S field's trailing NULs


class DigestIndex:
    """SHA-256 of files under one root, recomputed whenever the file's stat changes.

    Size and mtime alone miss a file replaced by one of the same size with its mtime restored (a copy or
    sync that keeps times): its old digest would name bytes it no longer holds, for ever. Its inode (a file
    renamed over it) or change time (any write; no user can set it) tells. An entry of an index written
    before these were kept lacks them, so its file is hashed once more.

    Entries are a sorted numpy table keyed by 8 bytes of a hash of the file's path (relative to the root),
    so 290,000 files take 18 MB, not 130 MB of Python objects. Two paths sharing a key could only swap
    digests if size, mtime, inode and change time all matched too, i.e. for the same file."""

    def __init__(self, cache_dir: Path, root: Path):
        self.path = cache_dir / "digests" / f"{short_hash(str(root.resolve()))}.npy"
        self.root = root
        self.table = self._read()
        self.added = np.zeros(0, dtype=DIGEST_ENTRY)
        self.count = 0                # rows of `added` in use (it grows by doubling)

    def _read(self) -> np.ndarray:
        try:
            table = np.load(self.path, allow_pickle=False)
            if table.dtype == DIGEST_ENTRY and table.ndim == 1:
                return table
        except (OSError, ValueError):
            pass
        return _index_from_json(self.path.with_suffix(".json"))

    def digest(self, path: Path | str) -> str:
        """The file's content hash; ImageSkipped (a read reason, never recorded) when it is not a regular file
        within the size limit or cannot be read."""
        key = _path_key(relative_posix(path, self.root) or str(path))
        st = checked_stat(path)
        at = int(np.searchsorted(self.table["key"], key))
        if at < len(self.table) and self.table["key"][at] == key:
            known = self.table[at]
            if (int(known["size"]), int(known["mtime"]), int(known["ino"]), int(known["ctime"])) == \
                    (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns):
                return known["sha"].tobytes().hex()
        sha = hashlib.sha256(read_image_file(path)).digest()
        if self.count == len(self.added):
            self.added = np.resize(self.added, max(1024, 2 * self.count))
        self.added[self.count] = (key, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, np.frombuffer(sha, np.uint8))
        self.count += 1
        return sha.hex()

    def save(self) -> None:
        """Persist new digests (a newer entry replaces the one it re-hashed)."""
        if not self.count:
            return
        both = np.concatenate([self.added[:self.count][::-1], self.table])   # newest first
        order = np.argsort(both["key"], kind="stable")
        both = both[order]
        first = np.ones(len(both), dtype=bool)
        first[1:] = both["key"][1:] != both["key"][:-1]
        self.table, self.added, self.count = both[first], np.zeros(0, dtype=DIGEST_ENTRY), 0
        save_array(self.path, self.table)
        self.path.with_suffix(".json").unlink(missing_ok=True)


def _path_key(relative: str) -> int:
    return int.from_bytes(hashlib.blake2b(relative.encode(errors="surrogateescape"), digest_size=8).digest(), "little")


def _index_from_json(path: Path) -> np.ndarray:
    """The entries of a digest index written as JSON (before the table), read once; an empty table without one.
    Its entries that lack the inode and change time get ones no file has, so their files are hashed again."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return np.zeros(0, dtype=DIGEST_ENTRY)
    table = np.zeros(len(entries), dtype=DIGEST_ENTRY)
    try:
        for row, (key, known) in enumerate(entries.items()):
            ino, ctime = (known[3], known[4]) if len(known) >= 5 else (0, -1)
            table[row] = (_path_key(key), known[0], known[1], ino, ctime, np.frombuffer(bytes.fromhex(known[2]), np.uint8))
    except (AttributeError, IndexError, TypeError, ValueError, OverflowError):   # damaged: every file is read again
        return np.zeros(0, dtype=DIGEST_ENTRY)
    return np.sort(table, order="key")


# Bytes before a set file's first row: numpy's format-1.0 header, which pads to 128 for any shape we write.
NPY_HEADER = 128
PARTIAL = ".partial-"


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy header of a C-ordered uint8 array of ``shape``, always NPY_HEADER bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    if len(buf.getvalue()) != NPY_HEADER:
        raise ValueError(f"an .npy header of {len(buf.getvalue())} bytes for shape {shape}; expected {NPY_HEADER}")
    return buf.getvalue()


class AlignedStore:
    """Aligned uint8 images keyed by content digest, for one set of aligner settings."""

    def __init__(self, cache_dir: Path, settings: dict):
        self.settings = {**settings, "cache_version": CACHE_VERSION}
        self.cache_dir = cache_dir
        self.root = cache_dir / "aligned" / short_hash(self.settings)
        self.sets = self.root / "sets"
        size = int(settings["size"])
        self.row_shape = (size, size, 3)

    def set_paths(self, key: str) -> tuple[Path, Path]:
        """Where a stacked dataset and its manifest live."""
        return self.sets / f"{key}.npy", self.sets / f"{key}.json"

    def check_room(self, rows: int) -> None:
        """Refuse a set of ``rows`` images before any is written when it would leave its disk under the
        free-space reserve: filling the disk half way would end the preparation with a raw error instead."""
        need_mb = (NPY_HEADER + rows * int(np.prod(self.row_shape))) / 2**20
        free, reserve = free_mb(self.sets), min_free_mb()
        if free - need_mb >= reserve:
            return
        size = self.row_shape[0]
        raise DiskFullError(
            f"data.cache_dir {shown(self.cache_dir)}: the set of {rows} images at {size} px needs {need_mb:,.1f} MB "
            f"({rows} x {size} x {size} x 3 bytes) and {reserve} MB is kept free ({MIN_FREE_ENV} sets that "
            f"reserve), but its disk has only {free:,} MB free; free some space, or set data.cache_dir to a "
            "folder on a disk with room")

    def legacy_object(self, digest: str, suffix: str) -> Path:
        """Where a cache of the per-image layout kept one image (.npy), its skip reason or its fallback flag."""
        return self.root / "objects" / digest[:2] / f"{digest}{suffix}"

    def legacy_get(self, digest: str) -> tuple[np.ndarray | str, bool] | None:
        """An image of the per-image layout and its fallback flag, or its skip reason; None when not there."""
        try:
            image = np.load(self.legacy_object(digest, ".npy"), allow_pickle=False)
            if image.shape == self.row_shape and image.dtype == np.uint8:
                return image, self.legacy_object(digest, ".fallback").exists()
        except (FileNotFoundError, ValueError, OSError):
            pass
        try:
            reason = self.legacy_object(digest, ".skip").read_text().strip()
        except OSError:
            return None
        return (reason, False) if reason else None

    def forget_legacy(self, digests: list[str]) -> None:
        """Remove per-image objects now held by a set file, and their folders once empty."""
        folders = set()
        for digest in digests:
            for suffix in (".npy", ".fallback", ".skip"):
                self.legacy_object(digest, suffix).unlink(missing_ok=True)
            folders.add(self.legacy_object(digest, ".npy").parent)
        for folder in sorted(folders) + [self.root / "objects"]:
            try:
                folder.rmdir()
            except OSError:
                pass        # not empty: other objects are still there


@dataclass(frozen=True)
class CachedRow:
    """Where one aligned image is stored: a set file (finished or being written) and its row."""
    path: Path
    row: int
    fallback: bool


@dataclass
class RowIndex:
    """Every cached image's row and every key known to be unusable, read from the sets' manifests."""
    rows: dict[str, CachedRow] = field(default_factory=dict)
    skips: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, store: AlignedStore) -> "RowIndex":
        """Finished sets first, then the journals of unfinished ones (a killed preparation's chunks)."""
        index = cls()
        try:
            names = sorted(os.listdir(store.sets))
        except OSError:
            return index
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                index._add_manifest(store.sets / name)
        for name in names:
            if name.startswith(PARTIAL) and name.endswith(".jsonl"):
                index._add_journal(store.sets / name)
        return index

    def _add_manifest(self, path: Path) -> None:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(manifest, dict) or "keys" not in manifest or not path.with_suffix(".npy").exists():
            return          # a set of the per-image layout (its images are in its objects), or one being renamed
        keys = manifest["keys"]
        self._add_rows(path.with_suffix(".npy"), 0, keys, manifest.get("fallback", [False] * len(keys)),
                       manifest.get("skips", {}))

    def _add_journal(self, path: Path) -> None:
        row = 0
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                chunk = json.loads(line)
            except ValueError:
                break       # the line a kill cut short: its rows may be incomplete
            self._add_rows(path.with_suffix(".npy"), row, chunk["keys"], chunk["fallback"], chunk["skips"])
            row += len(chunk["keys"])

    def _add_rows(self, data: Path, first: int, keys: list, fallback: list, skips: dict) -> None:
        for i, (key, fell_back) in enumerate(zip(keys, fallback)):
            self.rows.setdefault(key, CachedRow(data, first + i, bool(fell_back)))
        for key, reason in skips.items():
            # Only what decoding the bytes gave is trusted: earlier versions also recorded a file that could
            # not be read ('unreadable') under its content's key, which the next preparation reads again.
            if reason in DECODE_REASONS:
                self.skips.setdefault(key, reason)


class RowReader:
    """Reads single rows of set files with pread: nothing is memory-mapped, so resident memory stays flat."""

    def __init__(self, row_shape: tuple[int, ...]):
        self.row_shape = row_shape
        self.row_bytes = int(np.prod(row_shape))
        self._files: dict[Path, int | None] = {}

    def read(self, cached: CachedRow) -> np.ndarray | None:
        """The row's image, or None when its file is gone or shorter than the row (then it is aligned again)."""
        fd = self._files.get(cached.path, -1)
        if fd == -1:
            fd = _open_rows(cached.path)
            self._files[cached.path] = fd
        if fd is None:
            return None
        data = os.pread(fd, self.row_bytes, NPY_HEADER + cached.row * self.row_bytes)
        if len(data) != self.row_bytes:
            return None
        return np.frombuffer(data, dtype=np.uint8).reshape(self.row_shape).copy()

    def close(self) -> None:
        for fd in self._files.values():
            if fd is not None:
                os.close(fd)
        self._files.clear()


def _open_rows(path: Path) -> int | None:
    """A descriptor on a set file; a partial one its writer has since renamed is read under its final name
    (the rename keeps the rows where they were)."""
    for candidate in (path, path.with_name(path.name.rpartition("-")[2])) if path.name.startswith(PARTIAL) \
            else (path,):
        try:
            return os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
    return None


def read_row_chunks(path: Path, rows: int, row_shape: tuple[int, ...], chunk: int,
                    offset: int = NPY_HEADER) -> Iterator[np.ndarray]:
    """A set file's rows, ``chunk`` at a time, read (not mapped), so a pass over it keeps memory flat."""
    row_bytes = int(np.prod(row_shape))
    with open(path, "rb") as handle:
        handle.seek(offset)
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            data = handle.read(n * row_bytes)
            if len(data) != n * row_bytes:
                raise OSError(f"{path} ends at row {start + len(data) // row_bytes} of {rows}")
            yield np.frombuffer(data, dtype=np.uint8).reshape((n, *row_shape))


# How long rows wait for their journal line: one data sync per interval, not one per chunk of 64 images; a
# preparation killed loses at most this much of its work.
JOURNAL_SECONDS = 1.0


class SetWriter:
    """A set file written row chunk by row chunk under a partial name, journalled, then renamed into place.

    Each chunk's rows are synced to the disk before its journal line is written, so whatever the journal lists
    is on disk whenever the process or the machine dies; a torn last line is ignored by RowIndex. Two
    processes writing the same set use different partial names and the same final one: the later rename
    replaces identical content.
    """

    def __init__(self, store: AlignedStore, key: str):
        self.store, self.key, self.rows = store, key, 0
        store.sets.mkdir(parents=True, exist_ok=True)
        # A name no other writer has (pids repeat across containers and hosts sharing a cache), made
        # exclusively; the journal stays locked while this writer lives, which is how others tell it is.
        stem = store.sets / f"{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}-{key}"
        self.data, self.journal = stem.with_suffix(".npy"), stem.with_suffix(".jsonl")
        self._journal = open(self.journal, "x", encoding="utf-8")
        fcntl.flock(self._journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._data = open(self.data, "xb")
        self._data.write(npy_header((0, *store.row_shape)))
        self._pending: list[str] = []        # journal lines of rows not yet synced
        self._synced = time.monotonic()

    def append(self, images: list[np.ndarray], keys: list[str], fallback: list[bool], skips: dict[str, str]) -> None:
        """Rows for ``keys`` (in order); the journal line that makes them reusable follows once they are synced
        to the disk (at most JOURNAL_SECONDS later), so a crash of the machine cannot leave a journalled row
        that the disk never got."""
        for image in images:
            self._data.write(np.ascontiguousarray(image, dtype=np.uint8).data)
        self._pending.append(json.dumps({"keys": keys, "fallback": fallback, "skips": skips}) + "\n")
        self.rows += len(images)
        if time.monotonic() - self._synced >= JOURNAL_SECONDS:
            self._commit()

    def _commit(self) -> None:
        """The rows written so far onto the disk, then their journal lines."""
        self._data.flush()
        os.fdatasync(self._data.fileno())
        self._synced = time.monotonic()
        if self._pending:
            self._journal.write("".join(self._pending))
            self._journal.flush()
            self._pending = []

    def finish(self, manifest: dict) -> None:
        """The header gets the row count; manifest first, then the data (synced) under its final name, journal
        last."""
        self._data.seek(0)
        self._data.write(npy_header((self.rows, *self.store.row_shape)))
        self._data.flush()
        os.fdatasync(self._data.fileno())
        self._data.close()
        final, manifest_path = self.store.set_paths(self.key)
        atomic_write_json(manifest_path, manifest)
        os.replace(self.data, final)
        self._journal.close()
        self.journal.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop without finishing: the partial files stay, their synced rows journalled for the next preparation
        to reuse."""
        with contextlib.suppress(OSError, ValueError):      # a full disk: the error being raised says more
            self._commit()
        for handle in (self._data, self._journal):
            try:
                handle.close()
            except OSError:
                pass        # e.g. a full disk refusing the last flush: the error being raised says more


# A temporary file (.tmp-*) untouched for this long is a killed writer's: every writer renames or removes its
# own within seconds, as it goes on writing it updates its mtime, and another host sharing the cache cannot
# be asked whether its process is alive.
STALE_TEMPORARY_SECONDS = 3600


def remove_stale_partials(store: AlignedStore, finished: str, held: set[str]) -> None:
    """Remove the partial sets no writer holds any more whose rows the set just ``finished`` holds: its own
    (a killed preparation of the same data), or one whose every journalled key is in ``held``; and the
    temporary files killed writers left (STALE_TEMPORARY_SECONDS)."""
    try:
        names = os.listdir(store.sets)
    except OSError:
        return
    remove_stale_temporaries(store.sets, names)
    for name in names:
        if not (name.startswith(PARTIAL) and name.endswith(".jsonl")):
            continue
        journal = store.sets / name
        key = name[:-len(".jsonl")].rpartition("-")[2]
        if key != finished and not _journal_keys(journal) <= held:
            continue
        try:
            with open(journal, "rb") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)   # held: its writer is alive
                journal.with_suffix(".npy").unlink(missing_ok=True)
                journal.unlink(missing_ok=True)
        except OSError:
            continue


def remove_stale_temporaries(folder: Path, names: list[str]) -> None:
    """The .tmp-* files among names in folder that no writer has touched for STALE_TEMPORARY_SECONDS."""
    now = time.time()
    for name in names:
        if name.startswith(".tmp-"):
            with contextlib.suppress(OSError):      # renamed or removed by its writer meanwhile
                path = folder / name
                if now - path.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                    path.unlink()


def _journal_keys(journal: Path) -> set[str]:
    index = RowIndex()
    index._add_journal(journal)
    return set(index.rows)
