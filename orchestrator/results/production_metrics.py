"""The champion on the production data, as numbers: inference, metrics, slices, degradation rows; no logging.

Metric names (logged by orchestrator.results.production):

  production_accuracy, production_macro_f1, production_{precision,recall,f1}_<class>
  production_{accuracy,macro_f1}_ci_{low,high}   95% bootstrap interval over the production images
  production_align_failure_rate        images the aligner fell back on / usable images
  slice_<attr>_<value>_{count,accuracy,macro_f1}   per metadata attribute value (group, occluded, ...)
  slice_<attr>_<value>_{accuracy,macro_f1}_ci_{low,high}   95% bootstrap interval over the slice's images
                                       (trainers.stats); per-class recall intervals (Wilson) and the recall
                                       change against the test slice (Newcombe) are in slices.json
  slice_<attr>_<value>_{precision,recall,f1}_<class>      NaN where undefined (no images of the class)
  test_slice_<attr>_<value>_*          the same names for the champion's test images with that value
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.results.production_tables import SliceRow, SliceSide
from trainers import metrics as cls_metrics
from trainers import stats
from trainers.data.dataset import PreparedData, metric_key
from trainers.predictions import Predictions

BATCH_SIZE = 256
MAX_SLICE_VALUES = 20         # an attribute with more values (e.g. an id) is not sliced


@dataclass
class ProductionScores:
    """What the predictions score on the production data, against the test metrics of the model's run."""
    confusion: np.ndarray         # counts[true class, predicted class]
    metrics: dict[str, float]     # the production_* and slice_* metrics
    degradation: list[dict]       # per class, then "overall": test vs production, Tables 12-13
    slices: list[SliceRow]        # per attribute value, production beside test


def predict(model, images: np.ndarray, rows: np.ndarray, device) -> np.ndarray:
    """Logits (float32, len(rows) x classes) for the given rows, in batches of uint8 from the cache."""
    import torch

    from trainers.train import batches, to_float_images

    out = np.zeros((len(rows), 0), np.float32)
    parts = []
    with torch.no_grad():
        for _, x_u8 in batches(images, rows, BATCH_SIZE, device):
            parts.append(model(to_float_images(x_u8).contiguous()).float().cpu().numpy())
    return np.concatenate(parts) if parts else out


def score_production(data: PreparedData, logits: np.ndarray, test: dict[str, float],
                     test_images: Labelled | None = None) -> ProductionScores:
    """Metrics, slices and degradation rows of the logits on data; test: the model's run's metrics;
    test_images: its test images with their attributes, for the test side of each slice (None: unknown)."""
    predicted = logits.argmax(1)
    cm = cls_metrics.confusion_matrix(data.labels, predicted, len(data.classes))
    slices = slice_rows(Labelled(data.labels, predicted, data.attrs), test_images, len(data.classes))
    metric_classes = tuple(metric_key(name) for name in data.classes)
    intervals = stats.bootstrap_ci(data.labels, predicted, len(data.classes))
    values = {**cls_metrics.flat("production", cm, metric_classes), **align_failure(data),
              **{f"production_{name}_ci_{end}": value for name, ends in intervals.items()
                 for end, value in zip(("low", "high"), ends)},
              **slice_metrics(slices, data.classes)}
    return ProductionScores(confusion=cm, metrics=values, degradation=degradation_rows(test, cm, data.classes),
                            slices=slices)


def production_predictions(data: PreparedData, logits: np.ndarray) -> Predictions:
    """Every production image's prediction with its metadata attributes ("" where an image lacks one),
    so its slices can be recomputed from the file alone."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))   # softmax without overflow
    names = sorted({name for attrs in data.attrs for name in attrs})
    return Predictions(keys=np.asarray(data.paths, dtype=object), labels=data.labels, predicted=logits.argmax(1),
                       probs=(shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32), classes=data.classes,
                       attrs={name: np.asarray([attrs.get(name) or "" for attrs in data.attrs], dtype=object)
                              for name in names})


def align_failure(data: PreparedData) -> dict[str, float]:
    """Share of usable images the aligner could not align (0 when the data reports no alignment)."""
    failures = data.report.metrics().get("data_align_failures", 0.0)
    return {"production_align_failure_rate": failures / max(data.report.usable, 1)}


@dataclass(frozen=True)
class Labelled:
    """Images with their true and predicted class and metadata attributes: the production set or the test split."""
    labels: np.ndarray            # N int64
    predicted: np.ndarray         # N int64
    attrs: list[dict[str, str]]


def slice_values(attrs: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(attribute, value) pairs to slice by; an attribute with over MAX_SLICE_VALUES values is left out."""
    pairs = []
    for attr in sorted({k for a in attrs for k in a}):
        values = sorted({a.get(attr) or "" for a in attrs} - {""})
        if len(values) <= MAX_SLICE_VALUES:
            pairs += [(attr, value) for value in values]
    return pairs


def _subset(side: Labelled, attr: str, value: str) -> tuple[np.ndarray, np.ndarray]:
    mask = np.array([a.get(attr) == value for a in side.attrs], bool)
    return side.labels[mask], side.predicted[mask]


def slice_rows(production: Labelled, test: Labelled | None, n_classes: int) -> list[SliceRow]:
    """Per attribute value of the production set: its scores with intervals, and the same value on test."""
    rows = []
    for attr, value in slice_values(production.attrs):
        p_side = slice_side(*_subset(production, attr, value), n_classes)
        t_side = None if test is None else slice_side(*_subset(test, attr, value), n_classes)
        if t_side is None or t_side.count == 0:
            rows.append(SliceRow(attr, value, p_side, None, [(np.nan, np.nan, np.nan)] * n_classes))
        else:
            rows.append(SliceRow(attr, value, p_side, t_side, recall_changes(p_side.confusion, t_side.confusion)))
    return rows


def slice_side(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> SliceSide:
    """Count, accuracy and macro F1 with bootstrap intervals, per-class recall (Wilson interval) and F1."""
    cm = cls_metrics.confusion_matrix(y_true, y_pred, n_classes)
    summary, per_class = cls_metrics.summary(cm), cls_metrics.per_class(cm)
    ci = stats.bootstrap_ci(y_true, y_pred, n_classes)
    low, high = wilson(np.diagonal(cm), cm.sum(axis=1))
    return SliceSide(count=len(y_true), accuracy=summary["accuracy"], accuracy_ci=ci["accuracy"],
                     macro_f1=float(summary["macro_f1"]), macro_f1_ci=ci["macro_f1"],
                     recall=[float(v) for v in per_class["recall"]], recall_ci=list(zip(low.tolist(), high.tolist())),
                     f1=[float(v) for v in per_class["f1"]], confusion=cm.tolist())


def wilson(successes: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (stats.CONFIDENCE) of each proportion successes / n; NaN where n is 0.

    Recall is the share of a class's images predicted right. Unlike a bootstrap, the Wilson interval
    stays honest for a class with a handful of images in a slice, all right (5/5 gives [57%, 100%]).
    """
    z = stats.Z
    n = np.asarray(n, np.float64)
    size = np.maximum(n, 1)
    p = np.asarray(successes, np.float64) / size
    centre = (p + z * z / (2 * size)) / (1 + z * z / size)
    half = z * np.sqrt(p * (1 - p) / size + z * z / (4 * size * size)) / (1 + z * z / size)
    empty = n == 0
    return np.where(empty, np.nan, centre - half), np.where(empty, np.nan, centre + half)


def recall_changes(production: list[list[int]], test: list[list[int]]) -> list[tuple[float, float, float]]:
    """Per class: production recall minus test recall, and its 95% interval (Newcombe's hybrid score
    interval for a difference of two independent proportions, from the Wilson intervals); NaN when
    either side has no image of the class."""
    p_cm, t_cm = np.asarray(production), np.asarray(test)
    p_n, t_n = p_cm.sum(axis=1), t_cm.sum(axis=1)
    p1 = np.diagonal(p_cm) / np.maximum(p_n, 1)
    p2 = np.diagonal(t_cm) / np.maximum(t_n, 1)
    (l1, u1), (l2, u2) = wilson(np.diagonal(p_cm), p_n), wilson(np.diagonal(t_cm), t_n)
    d = np.where((p_n > 0) & (t_n > 0), p1 - p2, np.nan)
    low = d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return [(float(a), float(b), float(c)) for a, b, c in zip(d, low, high)]


def slice_metrics(rows: list[SliceRow], classes: tuple[str, ...]) -> dict[str, float]:
    """slice_<attr>_<value>_* for the production side and test_slice_<attr>_<value>_* for the test side.

    Each: _count, _accuracy, _macro_f1, their _ci_low / _ci_high, and _{precision,recall,f1}_<class>.
    """
    keys = tuple(metric_key(name) for name in classes)
    out = {}
    for row in rows:
        for prefix, side in (("slice", row.production), ("test_slice", row.test)):
            if side is None:
                continue
            name = metric_key(f"{prefix}_{row.attribute}_{row.value}")
            out.update(cls_metrics.flat(name, np.asarray(side.confusion), keys))
            out[f"{name}_count"] = side.count
            for metric in ("accuracy", "macro_f1"):
                low, high = getattr(side, f"{metric}_ci")
                out.update({f"{name}_{metric}_ci_low": low, f"{name}_{metric}_ci_high": high})
    return out


def labelled_test_images(predictions: Predictions,
                         attrs_by_key: dict[str, dict[str, str]]) -> tuple[Labelled | None, str]:
    """The champion's test predictions with each image's attributes (matched by path key), and a note
    when some or all test images have none ("" when all do)."""
    known = [i for i, key in enumerate(predictions.keys) if attrs_by_key.get(key)]
    total = len(predictions.keys)
    if not known:
        return None, (f"test slices unavailable: none of the {total} test images has metadata attributes "
                      "in the champion's training data (as prepared now)")
    rows = np.asarray(known, np.int64)
    test = Labelled(predictions.labels[rows], predictions.predicted[rows],
                    [attrs_by_key[predictions.keys[i]] for i in known])
    missing = total - len(known)
    return test, (f"{missing} of {total} test images have no attributes in the champion's training data "
                  "(as prepared now); the test slices leave them out" if missing else "")


def degradation_rows(test: dict[str, float], cm: np.ndarray, classes: tuple[str, ...]) -> list[dict]:
    """Test (from the source run) vs production per class, then overall: the study's Tables 13 and 12.

    Per class, "accuracy" is recall, as in the study's per-class tables; overall it is accuracy,
    and F1 is macro F1. Changes are production minus test.
    """
    summary, per_class = cls_metrics.summary(cm), cls_metrics.per_class(cm)
    rows = [{"class": name, "test_accuracy": test.get(f"test_recall_{name}"),
             "production_accuracy": float(per_class["recall"][i]), "test_f1": test.get(f"test_f1_{name}"),
             "production_f1": float(per_class["f1"][i])} for i, name in enumerate(classes)]
    rows.append({"class": "overall", "test_accuracy": test.get("test_accuracy"),
                 "production_accuracy": summary["accuracy"], "test_f1": test.get("test_macro_f1"),
                 "production_f1": summary["macro_f1"]})
    for row in rows:
        for key in ("accuracy", "f1"):
            before = row[f"test_{key}"]
            row[f"{key}_change"] = None if before is None else row[f"production_{key}"] - before
    return rows
