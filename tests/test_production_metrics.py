"""The production evaluation's pure parts on small arrays: slices, degradation rows, drift scores."""
import numpy as np
import pytest

from orchestrator.results.drift import DriftSide, drift_auc, drift_features, drift_scores, drift_verdict
from orchestrator.results.production_metrics import degradation_rows, score_production, slice_metrics, slice_rows
from orchestrator.results.production_tables import DEGRADATION_COLUMNS, table_csv
from trainers import metrics
from trainers.data.dataset import DataReport, PreparedData

CLASSES = ("anger", "happiness")


def small_data(labels, attrs, classes=CLASSES) -> PreparedData:
    n = len(labels)
    return PreparedData(images=np.zeros((n, 8, 8, 3), np.uint8), labels=np.array(labels), splits=np.zeros(n, np.int8),
                        classes=classes, paths=[f"{i}.png" for i in range(n)], subjects=[None] * n, attrs=attrs,
                        digest="d", root=".", report=DataReport(listed=n, usable=n))


def test_slices_score_each_attribute_value_and_skip_missing_values():
    data = small_data([0, 0, 1, 1, 1], [{"group": "a"}, {"group": "a"}, {"group": "b"}, {"group": "b"}, {}])
    predicted = np.array([0, 1, 1, 1, 0])
    rows = slice_rows(data, predicted)
    assert [(r["attribute"], r["value"], r["count"]) for r in rows] == [("group", "a", 2), ("group", "b", 2)]
    assert rows[0]["accuracy"] == 0.5 and rows[1]["accuracy"] == 1.0
    assert rows[1]["macro_f1"] == 1.0          # only class 1 appears in slice b
    assert slice_metrics(rows) == {"slice_group_a_count": 2, "slice_group_a_accuracy": 0.5,
                                   "slice_group_a_macro_f1": rows[0]["macro_f1"], "slice_group_b_count": 2,
                                   "slice_group_b_accuracy": 1.0, "slice_group_b_macro_f1": 1.0}


def test_an_attribute_with_too_many_values_is_not_sliced():
    data = small_data([0] * 25, [{"id": str(i)} for i in range(25)])
    assert slice_rows(data, np.zeros(25, np.int64)) == []


def test_degradation_rows_compare_the_source_runs_test_metrics_with_production():
    cm = metrics.confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2)
    test = {"test_recall_anger": 1.0, "test_f1_anger": 0.9, "test_accuracy": 0.95, "test_macro_f1": 0.9}
    rows = degradation_rows(test, cm, CLASSES)
    assert [r["class"] for r in rows] == [*CLASSES, "overall"]
    assert rows[0]["production_accuracy"] == 0.5 and rows[0]["accuracy_change"] == pytest.approx(-0.5)
    assert rows[1]["test_accuracy"] is None and rows[1]["accuracy_change"] is None   # not in the source run
    assert rows[2]["production_accuracy"] == 0.75 and rows[2]["accuracy_change"] == pytest.approx(-0.2)
    csv = table_csv(rows, DEGRADATION_COLUMNS).splitlines()
    assert csv[0] == ",".join(DEGRADATION_COLUMNS)
    assert csv[2] == "happiness,,1.0000,,,0.8000,"


def test_production_scores_are_named_as_logged_with_safe_class_keys():
    data = small_data([0, 1, 1], [{}, {}, {}], classes=("anger", "very happy"))
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]], np.float32)
    scores = score_production(data, logits, {})
    assert scores.confusion.tolist() == [[1, 0], [1, 1]]
    assert set(scores.metrics) == {"production_accuracy", "production_macro_f1", "production_align_failure_rate",
                                   *(f"production_{k}_{c}" for k in ("precision", "recall", "f1")
                                     for c in ("anger", "very_happy"))}
    assert scores.degradation[1]["class"] == "very happy" and scores.slices == []


def test_drift_auc_separates_shifted_rows_and_not_rows_from_the_same_distribution():
    rng = np.random.default_rng(0)
    reference = DriftSide(rng.normal(size=(200, 3)))
    same = DriftSide(rng.normal(size=(200, 3)))
    shifted = DriftSide(rng.normal(size=(200, 3)) + [2.0, 0, 0])
    assert drift_auc(reference, shifted) > 0.85
    assert drift_auc(reference, same) < 0.6
    scores = drift_scores(reference, same, shifted, n_logits=1)
    assert scores["drift_auc_logits"] > 0.85 and scores["drift_auc_pixels"] < 0.6   # the shift is in column 0
    assert drift_verdict(scores["drift_auc"]) == "strong" and drift_verdict(scores["drift_auc_control"]) == "none"


def test_drift_auc_keeps_each_group_in_one_fold_and_needs_two_groups_a_side():
    rng = np.random.default_rng(1)
    one_group = DriftSide(rng.normal(size=(20, 2)), ["s1"] * 20)
    assert np.isnan(drift_auc(one_group, DriftSide(rng.normal(size=(20, 2)))))
    assert drift_verdict(float("nan")) == "unknown"


def test_drift_features_are_the_logits_then_the_mean_colour_grid():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    images[1, :2, :2] = 255                      # the top-left cell of the 4 x 4 grid, white
    x = drift_features(images, np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
    assert x.shape == (2, 2 + 48)
    assert x[1, :2].tolist() == [3.0, 4.0] and x[1, 2:5].tolist() == [1.0, 1.0, 1.0] and x[1, 5:].max() == 0
