"""Before a sweep, worker or prepare writes anything: every local folder it will write is writable and has room.

A read-only or full mlruns/ would otherwise surface as a traceback from sqlite or MLflow, after the
ledger or a parent run was half created. Checked here, it is one line naming the folder, exit 2.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from orchestrator.sweep.plan import default_trial
from orchestrator.sweep.spec import SweepSpec
from trainers.config import DataConfig
from trainers.process.side_files import STORE_DIR
from trainers.errors import UserError

# A tiny sweep writes a few MB (stores, cache, checkpoints); 200 MB leaves room for a real one to start.
# FER_MIN_FREE_MB changes it (a test sets it above the free space to stand in for a full disk).
MIN_FREE_MB = 200


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
    folders = [OutputFolder(STORE_DIR, "the local store and work folder",
                            f"make it writable (chmod -R u+w {STORE_DIR}) or run from a folder you can write",
                            "free some space, or run from a folder on a disk with room")]
    for url, option in ((storage, "--storage"), (_tracking(tracking), "--tracking-uri")):
        folder = _local_folder(url)
        if folder is not None:
            folders.append(OutputFolder(folder, f"the folder of {option} {url}",
                                        f"pass a {option} in a folder you can write",
                                        f"free some space, or pass a {option} on a disk with room"))
    for cfg in (default_trial(spec), *(t.config for t in spec.plan)):    # a TPE sample starts from the defaults
        folders.append(_config_folder(cfg.data.cache_dir, "data.cache_dir"))
        folders.append(_config_folder(cfg.train.checkpoint_dir, "train.checkpoint_dir"))
    check_folders(folders)


def check_prepare_folders(data_configs: list[DataConfig]) -> None:
    """prepare: each data cache it will fill (training and production data)."""
    check_folders([_config_folder(cfg.cache_dir, "data.cache_dir") for cfg in data_configs])


def _config_folder(path: str, field: str) -> OutputFolder:
    return OutputFolder(Path(path), field, f"set {field} to a folder you can write",
                        f"free some space, or set {field} to a folder on a disk with room")


def check_folders(folders: list[OutputFolder]) -> None:
    """Raise OutputFolderError for the first folder that cannot be written or has too little room."""
    need_mb = min_free_mb()
    seen = set()
    for folder in folders:
        key = folder.path.resolve()
        if key not in seen:
            seen.add(key)
            problem = _problem(folder, need_mb)
            if problem:
                raise OutputFolderError(f"{folder.what} {_shown(folder.path)} {problem}")


def min_free_mb() -> int:
    """MIN_FREE_MB, or FER_MIN_FREE_MB when set."""
    text = os.environ.get("FER_MIN_FREE_MB", "").strip()
    if not text:
        return MIN_FREE_MB
    try:
        return int(text)
    except ValueError:
        raise OutputFolderError(f"FER_MIN_FREE_MB must be a whole number of MB; got '{text}'") from None


def _problem(folder: OutputFolder, need_mb: int) -> str | None:
    """What stops writing under the folder (judged at its nearest existing parent: it may not exist yet)."""
    existing = folder.path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    blocked = "is" if existing == folder.path else f"cannot be created: {_shown(existing)} is"
    if not existing.is_dir():
        return f"{blocked} a file, not a folder; move or rename {'it' if existing == folder.path else 'that file'}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{blocked} not writable by this user (read-only, or owned by another user); {folder.fix_rights}"
    free_mb = shutil.disk_usage(existing).free // 2**20
    if free_mb < need_mb:
        return (f"has only {free_mb} MB free on its disk, under the {need_mb} MB a run needs to start "
                f"(FER_MIN_FREE_MB sets that minimum); {folder.fix_space}")
    return None


def _shown(path: Path) -> str:
    """The path as given, and where it is when relative: 'mlruns (/home/me/fer/mlruns)'."""
    return str(path) if path.is_absolute() else f"{path} ({path.resolve()})"


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

