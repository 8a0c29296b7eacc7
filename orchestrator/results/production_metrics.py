"""The champion on the production data, as numbers: inference, metrics, slices, degradation rows; no logging.

Metric names (logged by orchestrator.results.production):

  production_accuracy, production_macro_f1, production_{precision,recall,f1}_<class>
  production_align_failure_rate        images the aligner fell back on / usable images
  slice_<attr>_<value>_{count,accuracy,macro_f1}   per metadata attribute (group, occluded, ...)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainers import metrics as cls_metrics
from trainers.data.dataset import PreparedData, metric_key

BATCH_SIZE = 256
MAX_SLICE_VALUES = 20         # an attribute with more values (e.g. an id) is not sliced


@dataclass
class ProductionScores:
    """What the predictions score on the production data, against the test metrics of the model's run."""
    confusion: np.ndarray         # counts[true class, predicted class]
    metrics: dict[str, float]     # the production_* and slice_* metrics
    degradation: list[dict]       # per class, then "overall": test vs production, Tables 12-13
    slices: list[dict]            # attribute, value, count, accuracy, macro_f1


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


def score_production(data: PreparedData, logits: np.ndarray, test: dict[str, float]) -> ProductionScores:
    """Metrics, slices and degradation rows of the logits on data; test: the model's run's metrics."""
    predicted = logits.argmax(1)
    cm = cls_metrics.confusion_matrix(data.labels, predicted, len(data.classes))
    slices = slice_rows(data, predicted)
    metric_classes = tuple(metric_key(name) for name in data.classes)
    values = {**cls_metrics.flat("production", cm, metric_classes), **align_failure(data), **slice_metrics(slices)}
    return ProductionScores(confusion=cm, metrics=values, degradation=degradation_rows(test, cm, data.classes),
                            slices=slices)


def align_failure(data: PreparedData) -> dict[str, float]:
    """Share of usable images the aligner could not align (0 when the data reports no alignment)."""
    failures = data.report.metrics().get("data_align_failures", 0.0)
    return {"production_align_failure_rate": failures / max(data.report.usable, 1)}


def slice_rows(data: PreparedData, predicted: np.ndarray) -> list[dict]:
    """Accuracy and macro F1 per value of each metadata attribute (e.g. group a/b, occluded 0/1)."""
    rows = []
    n_classes = len(data.classes)
    for attr in sorted({k for a in data.attrs for k in a}):
        column = np.array([a.get(attr) or "" for a in data.attrs])
        values = sorted(set(column) - {""})
        if len(values) > MAX_SLICE_VALUES:
            continue
        for value in values:
            mask = column == value
            summary = cls_metrics.summary(cls_metrics.confusion_matrix(data.labels[mask], predicted[mask], n_classes))
            rows.append({"attribute": attr, "value": value, "count": int(mask.sum()), **summary})
    return rows


def slice_metrics(rows: list[dict]) -> dict[str, float]:
    """slice_<attr>_<value>_{count,accuracy,macro_f1} for each slice row."""
    out = {}
    for row in rows:
        prefix = metric_key(f"slice_{row['attribute']}_{row['value']}")
        out.update({f"{prefix}_count": row["count"], f"{prefix}_accuracy": row["accuracy"],
                    f"{prefix}_macro_f1": row["macro_f1"]})
    return out


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
