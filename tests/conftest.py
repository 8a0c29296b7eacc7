"""Shared fixtures: every test works in its own folder, offline, with tiny models."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

TINY_VIT = {"name": "vit", "image_size": 32,
            "vit": {"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64}}


def tiny_trial(tmp_path, **sections) -> dict:
    """A plain trial config small enough to train in seconds on a CPU, stored under tmp_path."""
    raw = {
        "data": {"source": "synthetic", "synthetic": {"n_images": 240, "draw_size": 32},
                 "cache_dir": str(tmp_path / "cache")},
        "model": TINY_VIT,
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 2, "batch_size": 32, "checkpoint_dir": str(tmp_path / "checkpoints"),
                  "num_threads": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test from tmp_path, so default paths (mlruns/) land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
