"""Shared fixtures: every test works in its own folder, offline, with tiny models.

Helpers that several test files use are handed out as fixtures (a fixture returning the function),
so that no test module imports another one or this file.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = {"name": "vit", "image_size": 32,
            "vit": {"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64}}


def build_tiny_trial(tmp_path, **sections) -> dict:
    """A plain trial config small enough to train in seconds on a CPU, stored under tmp_path."""
    raw = {
        "data": {"source": "synthetic", "synthetic": {"n_images": 240, "draw_size": 32},
                 "cache_dir": str(tmp_path / "cache")},
        "model": copy.deepcopy(TINY_VIT),
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 2, "batch_size": 32, "checkpoint_dir": str(tmp_path / "checkpoints"),
                  "num_threads": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def write_sweep_spec(folder: Path, name: str, experiments: dict, **extra) -> Path:
    """A one-epoch tiny-ViT sweep on 120 synthetic images, two jobs, one retry; extra replaces sections."""
    spec = {"name": name, "data": {"source": "synthetic", "synthetic": {"n_images": 120, "draw_size": 32}},
            "models": {"vit": TINY_VIT}, "defaults": {"model": "vit", "optim": {"name": "adam", "lr": 1e-3},
                                                      "train": {"epochs": 1, "batch_size": 32}},
            "experiments": experiments, "execution": {"jobs": 2, "max_retries": 1}, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_grid_spec(folder: Path, lrs: int, batch_sizes: int, epochs: int) -> Path:
    """demo.yaml's data (synthetic), models and defaults with one experiment, a grid of lrs learning rates x
    batch_sizes batch sizes x epochs epoch counts: (100, 10, 10) makes 10^4 points, each its own trial."""
    demo = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    grid = {"optim.lr": [1e-5 * (i + 1) for i in range(lrs)],        # 1e-5 ... 1e-3 for 100
            "train.batch_size": [8 * (i + 1) for i in range(batch_sizes)],
            "train.epochs": [i + 1 for i in range(epochs)]}
    spec = {"name": "grid", "data": demo["data"], "models": demo["models"], "defaults": demo["defaults"],
            "experiments": {"grid": {"grid": grid}}}
    path = folder / f"grid{lrs * batch_sizes * epochs}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def child_env() -> dict:
    """The environment for a child sweep: this repo importable, no tracking URI left by other tests."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(REPO)}


def run_orchestrator(folder: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """`python -m orchestrator ARGS` run in folder, its output captured."""
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=folder, capture_output=True,
                          text=True, timeout=timeout, env=child_env())


def local_store(folder: Path):
    """The MLflow store a command run in folder writes by default (mlruns/mlflow.db)."""
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")


def find_trainer_processes(folder: Path) -> list[int]:
    """PIDs of `python -m trainers serve` children working in this folder, and of their figure helpers."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            ours = (b"trainers" in cmd and b"serve" in cmd) or b"trainers.process.figure_helper" in cmd
            if ours and (entry / "cwd").resolve() == folder.resolve():
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test from tmp_path, so default paths (mlruns/) land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_vit() -> dict:
    """The model section of a ViT small enough to train in seconds on a CPU (32 px, 2 layers)."""
    return copy.deepcopy(TINY_VIT)


@pytest.fixture(scope="session")
def tiny_trial():
    """build_tiny_trial(tmp_path, **sections): a tiny trial config, sections merged over its defaults."""
    return build_tiny_trial


@pytest.fixture(scope="session")
def write_spec():
    """write_sweep_spec(folder, name, experiments, **extra): a tiny sweep spec written to folder/name.yaml."""
    return write_sweep_spec


@pytest.fixture(scope="session")
def grid_spec():
    """write_grid_spec(folder, lrs, batch_sizes, epochs): a spec of one lr x batch size x epochs grid."""
    return write_grid_spec


@pytest.fixture(scope="session")
def clean_env():
    """child_env(): the environment for a child process of a test."""
    return child_env


@pytest.fixture(scope="session")
def orchestrate():
    """run_orchestrator(folder, *args, timeout=400): the CLI run in folder."""
    return run_orchestrator


@pytest.fixture(scope="session")
def store():
    """local_store(folder): the MLflow client of folder's default store."""
    return local_store


@pytest.fixture(scope="session")
def trainer_processes():
    """find_trainer_processes(folder): the trainer and figure-helper PIDs working in folder."""
    return find_trainer_processes


def _writable(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


@contextlib.contextmanager
def _read_only(folder: Path):
    """The folder and everything in it read-only: chmod a-w, and as root (whom chmod does not stop) the
    immutable attribute too, where chattr may set it; skips the test where neither holds."""
    subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
    immutable = False
    try:
        if _writable(folder) and shutil.which("chattr"):
            immutable = subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True).returncode == 0
        if _writable(folder):
            pytest.skip("running as root where chattr +i is unavailable: a read-only folder cannot be staged")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)
        subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)


@pytest.fixture
def read_only():
    """`with read_only(folder):` the folder and its contents read-only, even as root (or the test skips)."""
    return _read_only
