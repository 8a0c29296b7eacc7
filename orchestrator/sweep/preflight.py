"""Before a sweep, worker or prepare writes anything: every local folder it will write is writable and has room;
while a sweep runs, the same folders keep the reserve (free_space.MIN_FREE_MB) before each trial is claimed.

A read-only or full mlruns/ would otherwise surface as a traceback from sqlite or MLflow, after the
ledger or a parent run was half created. Checked here, it is one line naming the folder, exit 2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.sweep.plan import default_trial
from orchestrator.sweep.spec import SweepSpec
from trainers.config import DataConfig
from trainers.errors import UserError
from trainers.process.free_space import DiskFullError, existing_part, free_mb, min_free_mb, short_of_room, shown
from trainers.process.side_files import STORE_DIR


class OutputFolderError(UserError, RuntimeError):
    """A folder the command must write is missing rights or space; the message names it and what to do."""


@dataclass(frozen=True)
class OutputFolder:
    path: Path
    what: str             # e.g. "the local store and work folder", "data.cache_dir"
    fix_rights: str       # what to do when it cannot be written
    fix_space: str        # what to do when its disk is nearly full


def check_sweep_folders(spec: SweepSpec, storage: str | None, tracking: str | None) -> None:
    """sweep and worker: mlruns/ (stores, trial work files), the stores' folders, the data cache, checkpoints."""
    check_folders(sweep_folders(spec, storage, tracking))


def sweep_folders(spec: SweepSpec, storage: str | None, tracking: str | None) -> list[OutputFolder]:
    """Every local folder a sweep writes, each once: mlruns/, the stores' folders, data caches, checkpoints."""
    folders = [OutputFolder(STORE_DIR, "the local store and work folder",
                            f"make it writable (chmod -R u+w {STORE_DIR}) or run from a folder you can write",
                            "free some space, or run from a folder on a disk with room")]
    for url, option in ((storage, "--storage"), (_tracking(tracking), "--tracking-uri")):
        folder = _local_folder(url)
        if folder is not None:
            folders.append(OutputFolder(folder, f"the folder of {option} {url}",
                                        f"pass a {option} in a folder you can write",
                                        f"free some space, or pass a {option} on a disk with room"))
    # A TPE sample starts from the defaults. Plans of 10^5 trials share a few folders: paths are resolved once.
    named = dict.fromkeys((path, field) for cfg in (default_trial(spec), *(t.config for t in spec.plan))
                          for path, field in ((cfg.data.cache_dir, "data.cache_dir"),
                                              (cfg.train.checkpoint_dir, "train.checkpoint_dir")))
    folders += [_config_folder(path, field) for path, field in named]
    unique: dict[Path, OutputFolder] = {}
    for folder in folders:
        unique.setdefault(folder.path.resolve(), folder)
    return list(unique.values())


def check_sweep_room(folders: list[OutputFolder]) -> None:
    """While a sweep runs, before each claim: DiskFullError when one of its folders is under the reserve, so
    the sweep stops while closing its runs and trials still fits."""
    need_mb = min_free_mb()
    for folder in folders:
        problem = short_of_room(folder.path, folder.what, need_mb)
        if problem:
            raise DiskFullError(f"sweep stopped: {problem}; {folder.fix_space}, then run the same command again "
                                "to resume (finished trials are kept)")


def disk_full_error(folders: list[OutputFolder], err: BaseException) -> DiskFullError:
    """The one line for a sweep that met a full disk (err: ENOSPC or sqlite's "database or disk is full"):
    the folder with the least room and what it has left."""
    if isinstance(err, DiskFullError):
        return err
    fullest = min(folders, key=lambda folder: free_mb(folder.path))
    return DiskFullError(f"the disk filled up: {fullest.what} {shown(fullest.path)} has {free_mb(fullest.path)} "
                         f"MB free; {fullest.fix_space}, then run the same command again to resume")


def store_write_problem(uri: str) -> str | None:
    """What stops this process writing to a local sqlite MLflow store: its database file, its folder (sqlite's
    journal goes there) or the artifacts folder beside it read-only; None when it can, or for a server."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    for path in (database, database.parent, database.parent / "artifacts"):
        existing = existing_part(path)
        if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
            return f"{shown(existing)} is read-only (or owned by another user)"
    return None


def check_store_writable(uri: str, writes: str) -> None:
    """promote and production, before they work: the local store they write (writes: what, e.g. 'the registry
    alias') can be written and has the free-space reserve; else one line saying so."""
    if not uri.startswith("sqlite:///"):
        return          # a server answers for itself
    database = Path(uri.removeprefix("sqlite:///"))
    problem = store_write_problem(uri)
    if problem:
        raise OutputFolderError(f"cannot write {writes} to the MLflow store {database}: {problem}; make it "
                                f"writable (chmod -R u+w {database.parent}), or pass --tracking-uri a store you "
                                "can write")
    problem = short_of_room(database.parent, "the MLflow store's folder")
    if problem:
        raise DiskFullError(f"cannot write {writes}: {problem}; free some space, then run it again")


def check_prepare_folders(data_configs: list[DataConfig]) -> None:
    """prepare: each data cache it will fill (training and production data)."""
    check_folders([_config_folder(cfg.cache_dir, "data.cache_dir") for cfg in data_configs])


def _config_folder(path: str, field: str) -> OutputFolder:
    return OutputFolder(Path(path), field, f"set {field} to a folder you can write",
                        f"free some space, or set {field} to a folder on a disk with room")


def check_folders(folders: list[OutputFolder], need_mb: int | None = None) -> None:
    """Raise OutputFolderError for the first folder that cannot be written or has less than need_mb free
    (default: the reserve, min_free_mb())."""
    need_mb = min_free_mb() if need_mb is None else need_mb
    seen = set()
    for folder in folders:
        key = folder.path.resolve()
        if key not in seen:
            seen.add(key)
            problem = _problem(folder, need_mb)
            if problem:
                raise OutputFolderError(f"{folder.what} {shown(folder.path)} {problem}")


def _problem(folder: OutputFolder, need_mb: int) -> str | None:
    """What stops writing under the folder (judged at its nearest existing parent: it may not exist yet)."""
    existing = existing_part(folder.path)
    blocked = "is" if existing == folder.path else f"cannot be created: {shown(existing)} is"
    if not existing.is_dir():
        return f"{blocked} a file, not a folder; move or rename {'it' if existing == folder.path else 'that file'}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{blocked} not writable by this user (read-only, or owned by another user); {folder.fix_rights}"
    free = free_mb(existing)
    if free < need_mb:
        return (f"has only {free} MB free on its disk, under the {need_mb} MB a run needs to start "
                f"(FER_MIN_FREE_MB sets that minimum); {folder.fix_space}")
    return None


def _tracking(uri: str | None) -> str | None:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _local_folder(url: str | None) -> Path | None:
    """The folder a local store URL writes in (sqlite database, file store); None for servers and defaults."""
    if not url:
        return None
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).parent
    if url.startswith("file:"):
        return Path(url.removeprefix("file://").removeprefix("file:"))
    return None if "://" in url else Path(url)

