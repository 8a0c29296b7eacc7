"""Figures, written as PNG files: a trial's confusion matrix (seaborn) and training curves, and the
report's heatmap of test macro F1 per optimizer x learning rate."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402


def confusion_png(cm: np.ndarray, classes: tuple[str, ...], path: Path, title: str) -> Path:
    """Counts and row-normalised matrix side by side, as the study's Figures 4 and 7."""
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", xticklabels=classes, yticklabels=classes,
                ax=axes[0], cbar=False)
    sns.heatmap(norm, annot=True, fmt=".2f", cmap="Blues", vmin=0, vmax=1, xticklabels=classes,
                yticklabels=classes, ax=axes[1])
    for ax, sub in zip(axes, ("counts", "normalised by true class")):
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(sub)
        # Class names read horizontally on both axes (rotated, long ones ran into each other and the axis
        # label); with many classes, the columns' names are slanted so they do not overlap.
        ax.tick_params(axis="y", rotation=0)
        ax.tick_params(axis="x", rotation=0 if len(classes) <= 8 else 30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves_png(history: list[dict[str, float]], path: Path, title: str) -> Path:
    """Loss, accuracy and macro F1 per epoch for train and validation (Figures 3 and 6)."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key in zip(axes, ("loss", "accuracy", "macro_f1")):
        for split in ("train", "val"):
            ax.plot(epochs, [h.get(f"{split}_{key}", np.nan) for h in history], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_title(key.replace("_", " "))
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heatmap_png(matrix: np.ndarray, rows: list[str], cols: list[str], notes: dict, path: Path,
                title: str) -> Path:
    """Test macro F1 (%) per optimizer x learning rate, as the study's Figure 8; empty cells say why."""
    fig, ax = plt.subplots(figsize=(2.2 * len(cols) + 2, 0.9 * len(rows) + 1.8))
    sns.heatmap(matrix, annot=True, fmt=".1f", cmap="viridis", vmin=0, vmax=100, xticklabels=cols,
                yticklabels=rows, cbar_kws={"label": "test macro F1 (%)"}, ax=ax)
    for (i, j), note in notes.items():   # seaborn leaves NaN cells blank
        ax.text(j + 0.5, i + 0.5, note, ha="center", va="center", color="0.3")
    ax.tick_params(axis="y", rotation=0)
    ax.set_xlabel("optimizer")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
