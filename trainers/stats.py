"""Intervals from saved predictions, without re-running a model: bootstrap over test images (one run's
interval, and the paired difference of two runs on the same images). Pure numpy, seeded, no logging.

A resample draws n images with replacement from the n test images; the interval is the 2.5th and 97.5th
percentile of the metric over the resamples (the percentile bootstrap). 1,000 resamples put each end of
a 95% interval on ~25 resamples, enough for the one decimal the report prints.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from trainers import metrics

N_RESAMPLES = 1000
CONFIDENCE = 0.95
Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)   # 1.96: the normal quantile of a two-sided 95% interval
SEED = 0          # fixed: the same predictions always give the same interval
CHUNK = 100       # resamples per batch: 100 x n positions (80 MB at 100k test images)


@dataclass(frozen=True)
class Resampling:
    """How an interval is drawn: resamples, the generator's seed, the interval's coverage."""
    n_resamples: int = N_RESAMPLES
    seed: int = SEED
    confidence: float = CONFIDENCE


DEFAULT = Resampling()

Metric = Callable[[np.ndarray], np.ndarray]     # (R, K, K) confusion counts -> (R,) values


def accuracy(cms: np.ndarray) -> np.ndarray:
    """Accuracy of each confusion matrix in a stack (NaN for an empty one)."""
    total = cms.sum(axis=(1, 2)).astype(np.float64)
    correct = np.trace(cms, axis1=1, axis2=2).astype(np.float64)
    return np.divide(correct, total, out=np.full(len(cms), np.nan), where=total > 0)


METRICS: dict[str, Metric] = {"accuracy": accuracy, "macro_f1": metrics.macro_f1}


def resample_rows(n: int, n_resamples: int = N_RESAMPLES, seed: int = SEED):
    """Yields (r, n) arrays of item positions drawn with replacement, one row per resample, in chunks."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, CHUNK):
        yield rng.integers(0, n, (min(CHUNK, n_resamples - start), n)) if n else np.zeros((0, 0), np.int64)


def _confusions(rows: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(r, K, K) confusion matrices of r resamples given as rows of drawn item positions."""
    cells = n_classes * n_classes
    cell = np.asarray(y_true, np.int64) * n_classes + np.asarray(y_pred, np.int64)
    # One bincount for the whole chunk: resample i's cells are offset by i * K^2.
    offset = (np.arange(len(rows), dtype=np.int64) * cells)[:, None]
    counts = np.bincount((cell[rows] + offset).ravel(), minlength=len(rows) * cells)
    return counts.reshape(len(rows), n_classes, n_classes)


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of resampled values (NaN resamples left out; NaN, NaN when none is finite)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
                 resampling: Resampling = DEFAULT) -> dict[str, tuple[float, float]]:
    """{'accuracy': (low, high), 'macro_f1': (low, high)}: percentile bootstrap over the items."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    values = {name: [] for name in METRICS}
    for rows in resample_rows(len(y_true), resampling.n_resamples, resampling.seed):
        cms = _confusions(rows, y_true, y_pred, n_classes)
        for name, fn in METRICS.items():
            values[name].append(fn(cms))
    return {name: percentile_interval(np.concatenate(v), resampling.confidence) for name, v in values.items()}


def paired_differences(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_classes: int,
                       resampling: Resampling = DEFAULT) -> dict[str, tuple[float, float, float]]:
    """{metric: (difference, low, high)} of metric(a) - metric(b) on the same items for every metric in
    METRICS, each resample shared by both runs and by all metrics (one pass over the draws).

    Pairing removes the variance the two runs share (the same hard images), so the interval is far
    narrower than two separate intervals suggest; a run against itself gives exactly (0, 0, 0).
    """
    y_true, pred_a, pred_b = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    whole = [metrics.confusion_matrix(y_true, pred, n_classes)[None] for pred in (pred_a, pred_b)]
    diffs = {name: [] for name in METRICS}
    for rows in resample_rows(len(y_true), resampling.n_resamples, resampling.seed):
        a, b = (_confusions(rows, y_true, pred, n_classes) for pred in (pred_a, pred_b))
        for name, fn in METRICS.items():
            diffs[name].append(fn(a) - fn(b))
    return {name: (float(fn(whole[0])[0] - fn(whole[1])[0]),
                   *percentile_interval(np.concatenate(diffs[name]), resampling.confidence))
            for name, fn in METRICS.items()}


def paired_difference(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_classes: int,
                      metric: str = "macro_f1", resampling: Resampling = DEFAULT) -> tuple[float, float, float]:
    """(difference, low, high) of one metric: paired_differences' entry for it."""
    return paired_differences(y_true, pred_a, pred_b, n_classes, resampling)[metric]


def grouped_confusions(rows: np.ndarray, groups: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray,
                       shape: tuple[int, int]) -> np.ndarray:
    """(r, G, K, K) confusion matrices per group of r resamples given as rows of drawn item positions;
    shape is (G, K); groups holds each item's group in 0..G-1, and an item in group G (e.g. an unknown
    attribute value, or a slice too small to judge) counts in none."""
    n_groups, n_classes = shape
    cells = n_groups * n_classes * n_classes
    cell = (np.asarray(groups, np.int64) * n_classes + np.asarray(y_true, np.int64)) * n_classes \
        + np.asarray(y_pred, np.int64)
    cell = np.minimum(cell, cells)          # group G and beyond: one bin past the last, dropped below
    offset = (np.arange(len(rows), dtype=np.int64) * (cells + 1))[:, None]
    counts = np.bincount((cell[rows] + offset).ravel(), minlength=len(rows) * (cells + 1))
    return counts.reshape(len(rows), cells + 1)[:, :cells].reshape(len(rows), n_groups, n_classes, n_classes)


def bootstrap_draws(n: int, statistic: Callable[[np.ndarray], np.ndarray],
                    resampling: Resampling = DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """statistic's M values on the n items themselves (M,) and on every resample (n_resamples, M).

    statistic takes (r, n) drawn item positions and returns (r, M): every quantity is computed on the
    same draws, so differences of two runs on the same items stay paired."""
    whole = statistic(np.arange(n, dtype=np.int64)[None])[0]
    draws = [statistic(rows) for rows in resample_rows(n, resampling.n_resamples, resampling.seed)]
    return whole, np.concatenate(draws) if draws else np.zeros((0, len(whole)))


def excludes_zero(low: float, high: float) -> bool:
    """True when an interval of a difference lies wholly on one side of 0 (the two are distinguishable)."""
    return bool(np.isfinite(low) and np.isfinite(high) and (low > 0 or high < 0))
