"""Classification metrics computed from a confusion matrix, and flattened to metric names; pure numpy, no logging."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts[i, j] = samples of true class i predicted as j."""
    index = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # scikit-learn's zero_division=0: a class never predicted (or absent) scores 0, not NaN.
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall (the study's per-class 'accuracy'), F1 and support."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def summary(cm: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 (the mean over classes that appear in truth or predictions)."""
    total = cm.sum()
    accuracy = float(np.trace(cm) / total) if total else 0.0
    pc = per_class(cm)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    macro_f1 = float(pc["f1"][present].mean()) if present.any() else 0.0
    return {"accuracy": accuracy, "macro_f1": macro_f1}


def flat(prefix: str, confusion: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """<prefix>_accuracy, <prefix>_macro_f1 and <prefix>_{precision,recall,f1}_<class>, named as logged.

    Class names are used as given (a caller that needs MLflow-safe keys passes them sanitised).
    """
    scores, pc = summary(confusion), per_class(confusion)
    out = {f"{prefix}_accuracy": scores["accuracy"], f"{prefix}_macro_f1": scores["macro_f1"]}
    for key in ("precision", "recall", "f1"):
        out.update({f"{prefix}_{key}_{name}": float(value) for name, value in zip(classes, pc[key])})
    return out
