"""The production evaluation's pure parts on small arrays: slices (against scikit-learn), degradation rows,
drift scores."""
import csv
import json

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, f1_score, recall_score

from orchestrator.results.drift import DriftSide, drift_auc, drift_features, drift_scores, drift_verdict
from orchestrator.results.production_metrics import (Labelled, degradation_rows, labelled_test_images,
                                                     recall_changes, score_production, slice_metrics, slice_rows,
                                                     wilson)
from orchestrator.results.production_tables import (DEGRADATION_COLUMNS, MIN_SLICE_COUNT, most_confused, percent,
                                                    slice_cells, slice_file_stem, slice_finding, slice_record,
                                                    slices_from_json, slices_json, table_csv, unjudged_reason)
from orchestrator.results.report.champion import slice_class_record, slice_metrics_table
from orchestrator.results.report.tables import Report
from trainers import metrics
from trainers.data.dataset import DataReport, PreparedData
from trainers.predictions import Predictions

CLASSES = ("anger", "happiness")


def small_data(labels, attrs, classes=CLASSES) -> PreparedData:
    n = len(labels)
    return PreparedData(images=np.zeros((n, 8, 8, 3), np.uint8), labels=np.array(labels), splits=np.zeros(n, np.int8),
                        classes=classes, paths=[f"{i}.png" for i in range(n)], subjects=[None] * n, attrs=attrs,
                        digest="d", root=".", report=DataReport(listed=n, usable=n))


def test_slices_score_each_attribute_value_and_skip_missing_values():
    production = Labelled(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]),
                          [{"group": "a"}, {"group": "a"}, {"group": "b"}, {"group": "b"}, {}])
    rows = slice_rows(production, None, 2)
    assert [(r.attribute, r.value, r.production.count) for r in rows] == [("group", "a", 2), ("group", "b", 2)]
    assert rows[0].production.accuracy == 0.5 and rows[1].production.accuracy == 1.0
    assert rows[1].production.macro_f1 == 1.0          # only class 1 appears in slice b: anger is n/a, not 0
    assert rows[1].test is None and all(np.isnan(c).all() for c in rows[1].recall_change)
    m = slice_metrics(rows, CLASSES)
    assert {k: m[k] for k in ("slice_group_a_count", "slice_group_a_accuracy", "slice_group_b_macro_f1")} == {
        "slice_group_a_count": 2, "slice_group_a_accuracy": 0.5, "slice_group_b_macro_f1": 1.0}
    assert not any(k.startswith("test_slice_") for k in m)    # no test side known


def test_an_attribute_with_too_many_values_is_not_sliced():
    production = Labelled(np.zeros(25, np.int64), np.zeros(25, np.int64), [{"id": str(i)} for i in range(25)])
    assert slice_rows(production, None, 2) == []


def fixture_sets(seed=0):
    """Production and test images over 3 classes in groups a/b: group b's sadness is often taken for happiness
    in production only; class 'fear' has no image in group a (and is never predicted there)."""
    rng = np.random.default_rng(seed)

    def draw(n, group, confuse):
        labels = rng.integers(0, 2 if group == "a" else 3, n)
        predicted = np.where(rng.random(n) < 0.85, labels, (labels + 1) % 2)
        if confuse:
            predicted[(labels == 1) & (rng.random(n) < 0.5)] = 0
        return labels, predicted
    sides = []
    for confuse, sizes in ((True, {"a": 120, "b": 150}), (False, {"a": 80, "b": 100})):
        parts = [(*draw(n, g, confuse and g == "b"), [{"group": g}] * n) for g, n in sizes.items()]
        sides.append(Labelled(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                              [a for p in parts for a in p[2]]))
    return sides


SLICE_CLASSES = ("happiness", "sadness", "fear")


def test_the_slice_table_reproduces_scikit_learn_on_both_sides():
    production, test = fixture_sets()
    rows = slice_rows(production, test, 3)
    assert [r.name for r in rows] == ["group=a", "group=b"]
    for row in rows:
        for side, source in ((row.production, production), (row.test, test)):
            mask = np.array([a["group"] == row.value for a in source.attrs])
            y, p = source.labels[mask], source.predicted[mask]
            assert side.count == mask.sum() and side.accuracy == pytest.approx(accuracy_score(y, p))
            assert side.macro_f1 == pytest.approx(f1_score(y, p, labels=range(3), average="macro",
                                                           zero_division=np.nan))
            np.testing.assert_allclose(side.recall, recall_score(y, p, labels=range(3), average=None,
                                                                 zero_division=np.nan))
            np.testing.assert_allclose(side.f1, f1_score(y, p, labels=range(3), average=None, zero_division=np.nan))
            for metric in ("accuracy", "macro_f1"):
                low, high = getattr(side, f"{metric}_ci")
                assert low <= getattr(side, metric) <= high
    m = slice_metrics(rows, SLICE_CLASSES)
    b = rows[1]
    assert m["slice_group_b_recall_sadness"] == b.production.recall[1]
    assert m["test_slice_group_b_recall_sadness"] == b.test.recall[1]
    assert m["slice_group_b_macro_f1_ci_low"] == b.production.macro_f1_ci[0]
    assert m["test_slice_group_b_count"] == 100


def test_a_class_absent_from_a_slice_is_nan_not_zero():
    production, test = fixture_sets()
    group_a = slice_rows(production, test, 3)[0]
    assert np.isnan(group_a.production.recall[2]) and np.isnan(group_a.production.f1[2])
    assert all(np.isnan(v) for v in group_a.production.recall_ci[2]) and all(np.isnan(group_a.recall_change[2]))
    m = slice_metrics([group_a], SLICE_CLASSES)
    assert np.isnan(m["slice_group_a_recall_fear"]) and np.isnan(m["slice_group_a_f1_fear"])
    fear = slice_class_record(group_a, 2, SLICE_CLASSES)      # the report's per-class row: empty, not 0
    assert (fear["count"], fear["recall"], fear["f1"], fear["test_recall"], fear["taken_for"]) == (0, None, None,
                                                                                                  None, "")
    # macro F1 is over the classes with a defined F1 (fear leaves, it does not count as 0)
    assert group_a.production.macro_f1 == pytest.approx(np.mean(group_a.production.f1[:2]))


def test_a_slice_below_the_minimum_count_is_shown_but_not_judged():
    production, test = fixture_sets()
    small = Labelled(production.labels[:12], production.predicted[:12], [{"group": "c"}] * 12)
    (row,) = slice_rows(small, test, 3)
    assert row.production.count == 12 and row.test is None
    assert unjudged_reason(row) == f"too few to judge (12 images, under {MIN_SLICE_COUNT})"
    assert slice_finding(row, SLICE_CLASSES) == f"group=c (12 images): too few to judge (12 images, under {MIN_SLICE_COUNT})"
    assert slice_cells(row)[-1].startswith("no: too few") and slice_record(row)["judged"] == "no"
    big = slice_rows(production, test, 3)
    assert [unjudged_reason(r) for r in big] == [None, None]
    assert unjudged_reason(big[0], min_count=90) == "too few test images to judge (80, under 90)"


def test_the_finding_names_the_class_a_group_loses_and_what_it_is_taken_for():
    production, test = fixture_sets()
    group_a, group_b = slice_rows(production, test, 3)
    text = slice_finding(group_b, SLICE_CLASSES)
    assert text.startswith("group=b (150 images): loses sadness recall ")
    assert "most often taken for happiness" in text and "happiness recall" not in text
    d, low, high = group_b.recall_change[1]
    assert d < 0 and high < 0 and low <= d
    target, share = most_confused(group_b.production.confusion, 1)
    assert (target, share) == (0, group_b.production.confusion[1][0] / sum(group_b.production.confusion[1]))
    assert f"({percent(share)}% of its images; test " in text
    assert slice_finding(group_a, SLICE_CLASSES).startswith("group=a (120 images): no class loses recall beyond chance")


def test_recall_intervals_are_wilson_and_the_change_is_newcombes_interval():
    low, high = wilson(np.array([81, 5, 0]), np.array([263, 5, 0]))
    for i, (k, n) in enumerate(((81, 263), (5, 5))):
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert (low[i], high[i]) == pytest.approx((ci.low, ci.high))
    assert np.isnan(low[2]) and np.isnan(high[2])                 # no images: no interval
    # Newcombe (1998), Table II (a): 56/70 - 48/80 = 0.2000, hybrid score interval 0.0524 to 0.3339.
    (d, lo, hi), absent = recall_changes([[56, 14], [0, 0]], [[48, 32], [0, 0]])
    assert (d, lo, hi) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)
    assert np.isnan(absent).all()


def test_slices_json_round_trips_with_nan_as_null():
    production, test = fixture_sets()
    rows = slice_rows(production, test, 3)
    raw = json.loads(json.dumps(slices_json(rows, SLICE_CLASSES, "a note")))      # strict JSON: no NaN token
    assert raw["slices"][0]["production"]["recall"][2] is None
    back, classes, note, min_count = slices_from_json(raw)
    assert (classes, note, min_count) == (SLICE_CLASSES, "a note", MIN_SLICE_COUNT)
    assert json.dumps(slices_json(back, classes, note)) == json.dumps(slices_json(rows, SLICE_CLASSES, "a note"))
    assert slice_file_stem(back[1]) == "group=b"


def test_test_images_get_their_attributes_by_path_key_and_a_note_for_the_rest():
    predictions = Predictions(keys=np.array(["x/1.png", "x/2.png", "x/3.png"], dtype=object),
                              labels=np.array([0, 1, 1]), predicted=np.array([0, 1, 0]),
                              probs=np.zeros((3, 2), np.float32), classes=CLASSES)
    test, note = labelled_test_images(predictions, {"x/1.png": {"group": "a"}, "x/3.png": {"group": "b"},
                                                    "x/2.png": {}})
    assert test.labels.tolist() == [0, 1] and test.predicted.tolist() == [0, 0]
    assert test.attrs == [{"group": "a"}, {"group": "b"}]
    assert note.startswith("1 of 3 test images have no attributes")
    none, note = labelled_test_images(predictions, {})
    assert none is None and note.startswith("test slices unavailable: none of the 3 test images")


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


def test_a_production_run_logged_before_slices_json_still_shows_its_slice_metrics(tmp_path):
    report = Report(tmp_path, replicated=False)
    slice_metrics_table(report, {"slice_group_a_count": 40, "slice_group_a_accuracy": 0.55,
                                 "slice_group_a_macro_f1": 0.45, "slice_group_a_accuracy_ci_low": 0.4,
                                 "test_slice_group_a_accuracy": 0.9})
    (row,) = list(csv.DictReader((tmp_path / "production_slices.csv").open()))
    assert row["slice"] == "group_a" and float(row["accuracy"]) == pytest.approx(55.0)
    assert "predates slices.json" in report.blocks[0]
