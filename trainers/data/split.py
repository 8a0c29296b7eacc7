"""Deterministic train / val / test splits: stratified by class, group-aware by subject."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")


def stratified_split(labels: np.ndarray, ratios: tuple[float, float, float], seed: int) -> np.ndarray:
    """Split each class by the ratios (e.g. 70/20/10); returns a split id (0, 1, 2) per sample."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int8)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val = _split_sizes(len(idx), ratios)
        out[idx[:n_train]] = TRAIN
        out[idx[n_train:n_train + n_val]] = VAL
        out[idx[n_train + n_val:]] = TEST
    return out


def _split_sizes(n: int, ratios: tuple[float, float, float]) -> tuple[int, int]:
    """Train and val sizes for n samples; val and test keep one sample each when n allows."""
    n_val = int(round(n * ratios[1]))
    n_test = int(round(n * ratios[2]))
    if n >= 3:
        n_val = max(n_val, 1)
        n_test = max(n_test, 1) if ratios[2] > 0 else 0
    n_train = max(n - n_val - n_test, 0)
    return n_train, n - n_train - n_test


def group_split(labels: np.ndarray, groups: list[str], ratios: tuple[float, float, float],
                seed: int) -> np.ndarray:
    """Assign whole subjects to splits, greedily keeping each class near the target ratios."""
    n_classes = int(labels.max()) + 1
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    rng = np.random.default_rng(seed)
    order = sorted(members)
    rng.shuffle(order)
    # Biggest subjects first: small ones then fill the remaining gaps precisely.
    order.sort(key=lambda g: -len(members[g]))
    target = np.asarray(ratios, dtype=np.float64)[:, None]
    counts = np.zeros((3, n_classes))
    out = np.empty(len(labels), dtype=np.int8)
    for g in order:
        hist = np.bincount(labels[members[g]], minlength=n_classes)
        totals = counts.sum(axis=0) + hist
        costs = []
        for s in range(3):
            trial = counts.copy()
            trial[s] += hist
            costs.append(((trial - target * totals) ** 2).sum())
        best = int(np.argmin(costs))
        counts[best] += hist
        out[members[g]] = best
    return out


def assign_splits(labels: np.ndarray, subjects: list[str | None], ratios: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """Group-aware when every sample has a subject, otherwise stratified by class."""
    if subjects and all(s for s in subjects):
        return group_split(labels, list(subjects), ratios, seed)
    return stratified_split(labels, ratios, seed)
