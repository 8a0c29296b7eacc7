"""Keep the side files of a run under mlruns/: library caches there, MLflow's telemetry off.

The command-line entry points call this first; a value the user has already set wins. Trainer
processes inherit the environment, so a sweep's trials follow the sweep.
"""
from __future__ import annotations

import os
from pathlib import Path

STORE_DIR = Path("mlruns")     # the local stores and every side file, relative to where a command runs

# Library caches that would otherwise go to ~/.cache (matplotlib's font list) or $TMPDIR (torch creates
# torchinductor_<user>/ on import, and fills it when model.compile is on; here it also outlives a reboot).
SIDE_CACHES = {"MPLCONFIGDIR": STORE_DIR / "cache" / "matplotlib",
               "TORCHINDUCTOR_CACHE_DIR": STORE_DIR / "cache" / "torchinductor"}


def keep_side_files_local() -> None:
    """Library caches under mlruns/cache and MLflow's usage telemetry off, unless the user set them."""
    for variable, folder in SIDE_CACHES.items():
        os.environ.setdefault(variable, str(folder.resolve()))   # absolute: children may run elsewhere
    # MLflow 3 would write an installation id to ~/.config/mlflow and send usage events to its servers.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
