"""Content-addressed cache of decoded, aligned images as uint8 arrays.

Layout under ``cache_dir``:
  digests/<root>.json                  path -> (size, mtime_ns, sha256): unchanged files are not re-read
  aligned/<settings>/objects/ab/<sha>.npy   one aligned image (or ``.skip`` holding why it is unusable);
                                            a ``.fallback`` beside it: no face found, a centre crop
  aligned/<settings>/sets/<key>.npy    a whole dataset stacked, for a load that decodes nothing
Keys hash the image bytes plus the aligner settings, so every trial of every sweep reuses them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

CACHE_VERSION = 1


def short_hash(obj) -> str:
    """12 hex digits of the SHA-256 of a JSON-serialisable object."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


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


class DigestIndex:
    """SHA-256 of files under one root, recomputed only when size or mtime changes."""

    def __init__(self, cache_dir: Path, root: Path):
        self.path = cache_dir / "digests" / f"{short_hash(str(root.resolve()))}.json"
        self.root = root
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.entries = {}
        self.dirty = False

    def digest(self, path: Path) -> str | None:
        """The file's content hash, or None when it cannot be read."""
        key = relative_posix(path, self.root) or str(path)
        try:
            st = path.stat()
        except OSError:
            return None
        known = self.entries.get(key)
        if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            return known[2]
        try:
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None
        self.entries[key] = [st.st_size, st.st_mtime_ns, sha]
        self.dirty = True
        return sha

    def save(self) -> None:
        """Persist new digests."""
        if self.dirty:
            atomic_write_bytes(self.path, json.dumps(self.entries).encode())
            self.dirty = False


class AlignedStore:
    """Aligned uint8 images keyed by content digest, for one set of aligner settings."""

    def __init__(self, cache_dir: Path, settings: dict):
        self.settings = {**settings, "cache_version": CACHE_VERSION}
        self.root = cache_dir / "aligned" / short_hash(self.settings)

    def _object(self, digest: str, suffix: str) -> Path:
        return self.root / "objects" / digest[:2] / f"{digest}{suffix}"

    def get(self, digest: str) -> np.ndarray | str | None:
        """The cached array, the recorded skip reason, or None when not cached."""
        try:
            return np.load(self._object(digest, ".npy"), allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            pass
        try:
            return self._object(digest, ".skip").read_text().strip() or None
        except OSError:
            return None

    def put(self, digest: str, array: np.ndarray, fallback: bool = False) -> None:
        """Store one aligned image; ``fallback``: the aligner found no face and centre-cropped."""
        if fallback:   # the flag first: whoever sees the array also sees its flag
            atomic_write_bytes(self._object(digest, ".fallback"), b"")
        save_array(self._object(digest, ".npy"), array)

    def fell_back(self, digest: str) -> bool:
        """Whether the stored image is a centre crop because no face was found."""
        return self._object(digest, ".fallback").exists()

    def put_skip(self, digest: str, reason: str) -> None:
        """Remember that these bytes are unusable, so they are not decoded again."""
        atomic_write_bytes(self._object(digest, ".skip"), reason.encode())

    def set_paths(self, key: str) -> tuple[Path, Path]:
        """Where a stacked dataset and its manifest live."""
        return self.root / "sets" / f"{key}.npy", self.root / "sets" / f"{key}.json"
