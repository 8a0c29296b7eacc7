"""Classification metrics computed from a confusion matrix, and flattened to metric names; pure numpy, no logging."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts[i, j] = samples of true class i predicted as j."""
    index = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # An undefined ratio (0/0) is NaN, not 0: a class with no images has no recall, a class never
    # predicted has no precision. scikit-learn's zero_division=np.nan gives the same numbers.
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall (the study's per-class 'accuracy'), F1 and support; NaN where undefined.

    F1 is 2·TP / (2·TP + FP + FN): 0 for a class with images that is never predicted right, or one
    predicted but without images; NaN only for a class with neither images nor predictions.
    """
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    predicted = cm.sum(axis=-2).astype(np.float64)
    support = cm.sum(axis=-1).astype(np.float64)
    return {"precision": _ratio(tp, predicted), "recall": _ratio(tp, support),
            "f1": _ratio(2 * tp, predicted + support), "support": support}


def macro_f1(cm: np.ndarray) -> np.ndarray | float:
    """The mean per-class F1 over the spec's classes, leaving out a class whose F1 is undefined (no images,
    no predictions): sklearn's f1_score(labels=range(K), average="macro", zero_division=np.nan).
    Works on one K x K matrix or a stack (..., K, K); NaN when no class is defined (no images at all)."""
    f1 = per_class(cm)["f1"]
    defined = np.isfinite(f1)
    count = defined.sum(axis=-1)
    total = np.where(defined, f1, 0.0).sum(axis=-1)
    out = np.divide(total, count, out=np.full(np.shape(count), np.nan), where=count > 0)
    return float(out) if np.ndim(out) == 0 else out


def summary(cm: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 (NaN for an empty confusion matrix)."""
    total = cm.sum()
    accuracy = float(np.trace(cm) / total) if total else float("nan")
    return {"accuracy": accuracy, "macro_f1": macro_f1(cm)}


def flat(prefix: str, confusion: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """<prefix>_accuracy, <prefix>_macro_f1 and <prefix>_{precision,recall,f1}_<class>, named as logged.

    Class names are used as given (a caller that needs MLflow-safe keys passes them sanitised).
    """
    scores, pc = summary(confusion), per_class(confusion)
    out = {f"{prefix}_accuracy": scores["accuracy"], f"{prefix}_macro_f1": scores["macro_f1"]}
    for key in ("precision", "recall", "f1"):
        out.update({f"{prefix}_{key}_{name}": float(value) for name, value in zip(classes, pc[key])})
    return out
