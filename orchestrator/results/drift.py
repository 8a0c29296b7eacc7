"""Drift between the champion's training data and the production data: pure numpy and scikit-learn.

A domain classifier (logistic regression, cross-validated with each subject in one fold) tells
production rows from training rows; its ROC AUC is the drift score:

  drift_auc                            training split vs production (0.5: no drift)
  drift_auc_control                    training split vs the held-out splits of the same data
                                       (what "no drift" scores with this model and data)
  drift_auc_logits, drift_auc_pixels   the two halves of the features on their own

Features: the logged pt2 model exposes only its forward pass, so the "embedding" is the logits
(6 numbers) plus each image's mean colour on a 4 x 4 grid (48 numbers): the logits see what the
model reacts to, the grid sees shifts the model ignores (hair, hands, captions).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainers.data.dataset import PreparedData
from trainers.data.split import TEST, TRAIN, VAL

DRIFT_SAMPLE = 2000           # images per side of the domain classifier: 4000 x 54 features fit in a second
DRIFT_GRID = 4                # mean colour on a 4 x 4 grid: 48 features
DRIFT_FOLDS = 5
VERDICTS = ((0.6, "none"), (0.75, "moderate"))   # below each bound; "strong" above the last

Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]   # (images, rows) -> logits of those rows


@dataclass(frozen=True)
class DriftSide:
    """One side of the domain classifier: feature rows and each row's group (subject), if known."""
    features: np.ndarray
    groups: list[str] | None = None

    def columns(self, columns: slice) -> DriftSide:
        """The same rows and groups with only some feature columns."""
        return DriftSide(self.features[:, columns], self.groups)


def drift_features(images: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Logits plus mean colour on a DRIFT_GRID x DRIFT_GRID grid, in [0, 1]."""
    n, side = len(images), images.shape[1] // DRIFT_GRID * DRIFT_GRID
    cells = np.asarray(images[:, :side, :side], np.float32).reshape(
        n, DRIFT_GRID, side // DRIFT_GRID, DRIFT_GRID, side // DRIFT_GRID, 3).mean(axis=(2, 4)) / 255
    return np.concatenate([logits, cells.reshape(n, -1)], axis=1)


def drift_auc(reference: DriftSide, candidate: DriftSide, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling candidate rows from reference rows.

    0.5: indistinguishable; 1.0: fully separable. Folds keep each group (subject) on one side,
    so the classifier cannot score by recognising people it saw in training folds; with no
    signal a cross-validated AUC lands a little below 0.5, not exactly on it. NaN when either
    side has fewer than two groups.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([reference.features, candidate.features])
    y = np.r_[np.zeros(len(reference.features)), np.ones(len(candidate.features))]
    groups = np.array(_groups("reference", reference) + _groups("candidate", candidate))
    folds = min(DRIFT_FOLDS, len(set(groups[y == 0])), len(set(groups[y == 1])))
    if folds < 2:
        return float("nan")
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(classifier, x, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def _groups(name: str, side: DriftSide) -> list[str]:
    """Group labels prefixed by the side; a row without a group is a group of its own."""
    if side.groups is None:
        return [f"{name}#{i}" for i in range(len(side.features))]
    return [f"{name}:{g}" if g else f"{name}#{i}" for i, g in enumerate(side.groups)]


def drift_verdict(auc: float) -> str:
    """Plain words for a drift AUC."""
    if not np.isfinite(auc):
        return "unknown"
    return next((word for bound, word in VERDICTS if auc < bound), "strong")


def drift_scores(reference: DriftSide, held_out: DriftSide, production: DriftSide, n_logits: int) -> dict[str, float]:
    """drift_auc, its control (held-out training data) and the logits and pixel halves on their own."""
    logits, pixels = slice(None, n_logits), slice(n_logits, None)
    return {"drift_auc": drift_auc(reference, production),
            "drift_auc_control": drift_auc(reference, held_out),
            "drift_auc_logits": drift_auc(reference.columns(logits), production.columns(logits)),
            "drift_auc_pixels": drift_auc(reference.columns(pixels), production.columns(pixels))}


def measure_drift(train: PreparedData, production: PreparedData, logits: np.ndarray,
                  predict: Predict) -> tuple[dict[str, float], str]:
    """The drift scores and verdict of production data (with its logits) against the model's training data."""
    rng = np.random.default_rng(0)
    ref = sample_rows(train.indices(TRAIN), rng)
    held = sample_rows(np.r_[train.indices(VAL), train.indices(TEST)], rng)
    prod = sample_rows(np.arange(len(production.labels)), rng)

    def side(data: PreparedData, rows: np.ndarray, row_logits: np.ndarray) -> DriftSide:
        return DriftSide(drift_features(np.asarray(data.images[rows]), row_logits), [data.subjects[i] for i in rows])

    scores = drift_scores(side(train, ref, predict(train.images, ref)),
                          side(train, held, predict(train.images, held)),
                          side(production, prod, logits[prod]), logits.shape[1])
    return scores, drift_verdict(scores["drift_auc"])


def sample_rows(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """At most DRIFT_SAMPLE rows, sorted (sequential reads from the memory-mapped cache)."""
    return np.sort(rng.choice(rows, DRIFT_SAMPLE, replace=False)) if len(rows) > DRIFT_SAMPLE else rows
