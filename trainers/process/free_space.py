"""Room on disk: the free space a sweep keeps, so that a disk filling up stops it cleanly.

`sweep`, `worker` and `prepare` do not start with less than the reserve free; while a sweep runs, no trial
is claimed and no trial writes an epoch, its results or its model with less. The writes that close runs
and trials (a few KB each) then still fit, and a full disk ends as one line naming the folder instead of
a "database or disk is full" traceback with runs left RUNNING.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from trainers.errors import UserError

# A tiny sweep writes a few MB (stores, cache, checkpoints); 200 MB leaves room for a real one to start and
# for a stopped one to close its runs. FER_MIN_FREE_MB changes it (tests set it above the free space to
# stand in for a full disk).
MIN_FREE_MB = 200
MIN_FREE_ENV = "FER_MIN_FREE_MB"


class DiskFullError(UserError, RuntimeError):
    """A folder to be written has less free space than the reserve; the message names it, its free space
    and what to do."""


def min_free_mb() -> int:
    """MIN_FREE_MB, or FER_MIN_FREE_MB when set."""
    text = os.environ.get(MIN_FREE_ENV, "").strip()
    if not text:
        return MIN_FREE_MB
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:   # a typo is not a full disk: a plain UserError, which is_disk_full does not take for one
        raise UserError(f"{MIN_FREE_ENV} must be a whole number of MB, 0 or more; got '{text[:40]}'")
    return value


def existing_part(path: Path) -> Path:
    """The path, or its nearest parent that exists (a folder is judged before it is made)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_mb(path: Path) -> int:
    """MB free on the disk that holds path (or the nearest parent that exists)."""
    return shutil.disk_usage(existing_part(path)).free // 2**20


def shown(path: Path) -> str:
    """The path as given, and where it is when relative: 'mlruns (/home/me/fer/mlruns)'."""
    return str(path) if path.is_absolute() else f"{path} ({path.resolve()})"


def short_of_room(path: Path, what: str, need_mb: int | None = None, writing_mb: int = 0) -> str | None:
    """'<what> <path> has only N MB free on its disk, under the M MB kept free (FER_MIN_FREE_MB)', or None
    when it has the reserve (need_mb, default min_free_mb()) and writing_mb more for a write about to start."""
    need_mb = min_free_mb() if need_mb is None else need_mb
    free = free_mb(path)
    if free >= need_mb + writing_mb:
        return None
    write = f"the {writing_mb} MB it is about to write and " if writing_mb else ""
    return f"{what} {shown(path)} has only {free} MB free on its disk, under {write}the {need_mb} MB kept free " \
           f"({MIN_FREE_ENV} sets that reserve)"


def require_room(folders: list[tuple[Path, str]], writing_mb: int = 0) -> None:
    """Raise DiskFullError for the first (folder, what) whose disk is under the reserve (plus writing_mb)."""
    need_mb = min_free_mb()
    for path, what in folders:
        problem = short_of_room(path, what, need_mb, writing_mb)
        if problem:
            raise DiskFullError(f"{problem}; free some space, then run the same command again to resume")


def is_disk_full(err: BaseException | None) -> bool:
    """Whether the error, or one it was raised from, is the disk being full: ENOSPC (or a quota), sqlite's
    "database or disk is full", or a DiskFullError."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFullError):
            return True
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(err) or "No space left on device" in str(err):
            return True     # sqlite's words, or ENOSPC wrapped by a library (SQLAlchemy, MLflow) in its own type
        err = err.__cause__ or err.__context__
    return False
