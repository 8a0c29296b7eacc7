"""Class balance for the training split: per-class augmentation towards a target, and loss weights."""
from __future__ import annotations

import numpy as np


def balance_plan(train_idx: np.ndarray, labels: np.ndarray, max_factor: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training indices with augmented copies added, and a mask of which entries are copies.

    Each class grows towards the largest class, but to at most ``max_factor`` times its own
    size, so a rare class (the study's disgust: 1,721 vs sadness 9,128) stays somewhat rare.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels[train_idx])
    target = counts.max()
    extra = []
    for c, n in enumerate(counts):
        if n == 0:
            continue
        want = min(target, int(n * max_factor)) - n
        if want > 0:
            extra.append(rng.choice(train_idx[labels[train_idx] == c], size=want, replace=True))
    copies = np.concatenate(extra) if extra else np.empty(0, dtype=train_idx.dtype)
    indices = np.concatenate([train_idx, copies])
    augmented = np.concatenate([np.zeros(len(train_idx), bool), np.ones(len(copies), bool)])
    return indices, augmented


def class_weights(effective_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Weights N / (K * n_c) over the effective (augmented) training distribution; 0 for absent classes."""
    counts = np.bincount(effective_labels, minlength=n_classes).astype(np.float64)
    weights = np.divide(len(effective_labels), n_classes * counts,
                        out=np.zeros(n_classes), where=counts > 0)
    return weights.astype(np.float32)
