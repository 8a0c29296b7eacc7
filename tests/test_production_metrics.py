"""The production evaluation's pure parts on small arrays: slices, degradation rows, drift scores and verdict."""
import dataclasses

import numpy as np
import pytest

from orchestrator.results.drift import (DriftSide, class_mix_weights, drift_auc, drift_features, drift_rows,
                                        drift_scores, drift_verdict, weighted_auc)
from orchestrator.results.production_metrics import degradation_rows, score_production, slice_metrics, slice_rows
from orchestrator.results.production_tables import DEGRADATION_COLUMNS, table_csv
from trainers import metrics
from trainers.data.dataset import DataReport, PreparedData
from trainers.data.split import TEST, TRAIN, VAL

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


def gaussian_side(rng, n, shift=0.0, mix=None, subjects=18) -> DriftSide:
    """n rows of 3 + 6 features whose means depend on the row's class (drawn from mix) and its subject."""
    classes = rng.choice(6, n, p=mix)
    subject = rng.integers(0, subjects, n)
    offsets = rng.normal(0, 0.3, (subjects, 9))                  # each subject looks a little different
    class_means = np.eye(6, 9, 3) * 3.0                          # columns 3-8 say the class
    x = rng.normal(size=(n, 9)) + offsets[subject] + class_means[classes] + [shift, 0, 0, 0, 0, 0, 0, 0, 0]
    return DriftSide(x, [f"{rng.integers(1 << 30)}-{s}" for s in subject], classes)


def test_weighted_auc_is_scikit_learns_auc_with_unit_weights_and_counts_repeated_rows():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 300), np.round(rng.normal(size=300), 1)     # rounded: many ties
    assert weighted_auc(labels, scores, np.ones(300)) == pytest.approx(roc_auc_score(labels, scores))
    twice = np.r_[np.arange(300), np.arange(100)]
    assert weighted_auc(labels, scores, np.bincount(twice, minlength=300)) == pytest.approx(
        roc_auc_score(labels[twice], scores[twice]))


def test_the_control_of_two_samples_of_one_distribution_scores_near_one_half_and_inside_its_interval():
    rng = np.random.default_rng(0)
    reference, control, production = (gaussian_side(rng, 300) for _ in range(3))
    scores = drift_scores(reference, control, production, n_logits=3)
    # Two samples of 300 rows in 18 subjects: the null s.d. of the AUC is ~0.04, so 0.5 +- 0.1 is 2.5 s.d.
    assert abs(scores["drift_auc_control"] - 0.5) < 0.1 and abs(scores["drift_auc"] - 0.5) < 0.1
    for name in ("drift_auc", "drift_auc_label_robust"):
        assert scores[f"{name}_ci_low"] < scores[name] < scores[f"{name}_ci_high"]
        assert scores[f"{name}_excess_ci_low"] < scores[f"{name}_excess"] < scores[f"{name}_excess_ci_high"]
        assert scores[f"{name}_excess_ci_low"] < 0 < scores[f"{name}_excess_ci_high"]
        assert scores[f"{name}_excess"] == pytest.approx(scores[name] - scores[f"{name}_control"])
    assert drift_verdict(scores) == "none"


def test_a_shifted_production_set_has_a_clearly_positive_excess_in_the_features_that_moved():
    rng = np.random.default_rng(1)
    reference, control = gaussian_side(rng, 300), gaussian_side(rng, 300)
    shifted = gaussian_side(rng, 300, shift=1.5)
    scores = drift_scores(reference, control, shifted, n_logits=3)      # the shift is in column 0, a "logit"
    assert scores["drift_auc_excess_ci_low"] > 0.2 and scores["drift_auc_label_robust_excess_ci_low"] > 0.2
    assert scores["drift_auc_logits_excess"] > 0.3 and abs(scores["drift_auc_pixels_excess"]) < 0.1
    assert drift_verdict(scores) == "strong"


def test_a_change_of_class_mix_alone_is_not_called_drift_by_the_label_robust_score():
    rng = np.random.default_rng(3)
    reference, control = gaussian_side(rng, 400), gaussian_side(rng, 400)
    # The same class-conditional rows, 90% classes 4 and 5 instead of one sixth each.
    skewed = gaussian_side(rng, 400, mix=[0.02, 0.02, 0.02, 0.04, 0.45, 0.45])
    scores = drift_scores(reference, control, skewed, n_logits=3)
    assert scores["drift_auc_excess_ci_low"] > 0             # the plain score sees the new class mix (+0.21)
    # Reweighted to the skewed mix, the reference rows follow the production rows' distribution, so the
    # robust excess is one draw of the null: s.d. ~0.05 here (the interval's half-width / 1.96), so
    # |excess| < 0.1 is two s.d. (seeds 2, 3, 4 give -0.09, +0.01, +0.03; the plain excess +0.17 to +0.24).
    assert abs(scores["drift_auc_label_robust_excess"]) < 0.1
    assert scores["drift_auc_label_robust_excess_ci_low"] < 0 < scores["drift_auc_label_robust_excess_ci_high"]
    assert drift_verdict(scores) == "class mix only"


def test_class_mix_weights_give_the_reference_the_candidates_mix_of_predicted_classes():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    predicted = np.array([0, 0, 0, 1, 0, 1, 1, 2])
    weights = class_mix_weights(y, predicted)
    mix = np.bincount(predicted[y == 0], weights[y == 0], minlength=3)
    assert mix.tolist() == pytest.approx([1, 2, 0])                 # candidate: 1 of class 0, 2 of class 1
    assert weights[y == 1].tolist() == [1, 1, 1, 1]                  # class 2 has no reference row to match


def test_drift_auc_keeps_each_group_in_one_fold_and_needs_two_groups_a_side():
    rng = np.random.default_rng(1)
    one_group = DriftSide(rng.normal(size=(20, 2)), ["s1"] * 20)
    assert np.isnan(drift_auc(one_group, DriftSide(rng.normal(size=(20, 2)))))
    assert drift_verdict({}) == "unknown"


def test_drift_rows_are_held_out_images_split_by_subject_with_production_sized_like_the_control():
    n = 60
    subjects = [f"s{i // 4}" for i in range(n)]
    train = dataclasses.replace(small_data([0] * n, [{}] * n), subjects=subjects,
                                splits=np.array([TRAIN, VAL, TEST] * (n // 3), np.int8))
    half_a, half_b, production = drift_rows(train, small_data([0] * 100, [{}] * 100))
    held = np.flatnonzero(train.splits != TRAIN)
    assert set(half_a) | set(half_b) <= set(held) and not set(half_a) & set(half_b)
    assert not {subjects[i] for i in half_a} & {subjects[i] for i in half_b}       # each subject in one half
    assert len(production) == len(half_b) and len(half_a) + len(half_b) >= len(held) * 3 // 4


def test_drift_features_are_the_logits_then_the_mean_colour_grid():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    images[1, :2, :2] = 255                      # the top-left cell of the 4 x 4 grid, white
    x = drift_features(images, np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
    assert x.shape == (2, 2 + 48)
    assert x[1, :2].tolist() == [3.0, 4.0] and x[1, 2:5].tolist() == [1.0, 1.0, 1.0] and x[1, 5:].max() == 0


@pytest.mark.parametrize("robust_low, robust_excess, plain_low, verdict", [
    (0.01, 0.05, 0.02, "slight"), (0.05, 0.2, 0.1, "moderate"), (0.2, 0.3, 0.2, "strong"),
    (-0.01, 0.08, 0.05, "class mix only"), (-0.05, 0.02, -0.03, "none"), (float("nan"), 0.0, 0.1, "unknown")])
def test_the_verdict_is_drift_only_when_the_label_robust_excess_interval_lies_above_zero(
        robust_low, robust_excess, plain_low, verdict):
    scores = {"drift_auc_label_robust_excess_ci_low": robust_low, "drift_auc_label_robust_excess": robust_excess,
              "drift_auc_excess_ci_low": plain_low}
    assert drift_verdict(scores) == verdict
