"""Deterministic train / val / test splits: stratified by class, group-aware by subject.

How a split was made is its mode: ``group`` (whole subjects in one split), ``stratified`` (by class,
image by image: frames of one subject may sit in two splits) or ``dataset`` (the dataset's own split).
"""
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


def split_mode(subjects: list[str | None]) -> str:
    """'group' when every sample has a subject, else 'stratified' (assign_splits follows the same rule)."""
    return "group" if subjects and all(s for s in subjects) else "stratified"


def assign_splits(labels: np.ndarray, subjects: list[str | None], ratios: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """Group-aware when every sample has a subject, otherwise stratified by class."""
    if split_mode(subjects) == "group":
        return group_split(labels, list(subjects), ratios, seed)
    return stratified_split(labels, ratios, seed)


def partial_subjects_warning(subjects: list[str | None]) -> str | None:
    """The warning for a dataset with subjects for some images only (its split falls back to stratified)."""
    known = sum(1 for s in subjects if s)
    if known == 0 or known == len(subjects):
        return None
    return (f"subjects for {known:,} of {len(subjects):,} images: split stratified by class, not by subject; "
            "frames of one subject may sit in two splits (give every image a subject in metadata.csv)")


def missing_class_warnings(labels: np.ndarray, splits: np.ndarray, classes: tuple[str, ...],
                           mode: str) -> list[str]:
    """One warning per split that has no image of some class: that class's metrics there will be n/a."""
    hint = ("the dataset's own split has none" if mode == "dataset"
            else "add images (or subjects) of it, or try another data.split_seed")
    out = []
    for s, name in enumerate(SPLIT_NAMES):
        present = set(np.unique(labels[splits == s]).tolist())
        missing = [c for k, c in enumerate(classes) if k not in present]
        if missing:
            effect = ("the model never learns it" if s == TRAIN
                      else f"{'its' if len(missing) == 1 else 'their'} {name} metrics are n/a")
            out.append(f"the {mode} split left {', '.join(missing)} out of {name}: {effect}; {hint}")
    return out


def distinct_per_split(values: list[str | None], splits: np.ndarray) -> dict[str, int]:
    """Distinct non-empty values (e.g. subjects) in each split."""
    return {name: len({v for v, k in zip(values, splits.tolist()) if k == s and v})
            for s, name in enumerate(SPLIT_NAMES)}


def count_per_split(flags: np.ndarray, splits: np.ndarray) -> dict[str, int]:
    """How many flagged samples (e.g. alignment failures) each split holds."""
    return {name: int(np.asarray(flags, dtype=bool)[splits == s].sum()) for s, name in enumerate(SPLIT_NAMES)}
