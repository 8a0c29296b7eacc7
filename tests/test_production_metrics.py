"""The production evaluation's pure parts on small arrays: slices (against scikit-learn), degradation rows,
drift scores and verdict."""
import csv
import dataclasses
import json

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, f1_score, recall_score

from orchestrator.results.drift import (DriftSide, class_mix_weights, compare_with_control, drift_auc, drift_features,
                                        drift_rows, drift_scores, drift_verdict, split_by_group, weighted_auc)
from orchestrator.results.production_metrics import (Labelled, degradation_rows, labelled_test_images,
                                                     production_predictions, recall_changes, score_production,
                                                     slice_metrics, slice_rows, wilson)
from orchestrator.results.production_tables import (DEGRADATION_COLUMNS, MIN_SLICE_COUNT, most_confused, percent,
                                                    slice_cells, slice_file_stem, slice_finding, slice_record,
                                                    slices_from_json, slices_json, table_csv, unjudged_reason)
from orchestrator.results.report.champion import slice_class_record, slice_metrics_table
from orchestrator.results.report.tables import Report
from trainers import metrics
from trainers.data.dataset import DataReport, PreparedData
from trainers.data.split import TEST, TRAIN, VAL
from trainers.predictions import Predictions, read_predictions

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
                                     for c in ("anger", "very_happy")),
                                   *(f"production_{k}_ci_{end}" for k in ("accuracy", "macro_f1")
                                     for end in ("low", "high"))}
    assert scores.degradation[1]["class"] == "very happy" and scores.slices == []


def test_production_predictions_keep_every_image_with_its_attributes_and_read_back(tmp_path):
    data = small_data([0, 1, 1], [{"group": "a", "occluded": "1"}, {"group": "b"}, {}])
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]], np.float32)
    path = tmp_path / "production_predictions.csv.gz"
    path.write_bytes(production_predictions(data, logits).to_bytes())
    back = read_predictions(path)
    assert list(back.keys) == data.paths and back.predicted.tolist() == [0, 1, 0]
    assert back.labels.tolist() == [0, 1, 1] and np.allclose(back.probs.sum(axis=1), 1)
    assert back.probs[1, 1] == pytest.approx(np.exp(1) / (1 + np.exp(1)), abs=1e-5)
    # An image without an attribute has "" there: the slices of the file are the slices of the run.
    assert {k: list(v) for k, v in back.attrs.items()} == {"group": ["a", "b", ""], "occluded": ["1", "", ""]}


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


def test_a_production_run_logged_before_slices_json_still_shows_its_slice_metrics(tmp_path):
    report = Report(tmp_path, replicated=False)
    slice_metrics_table(report, {"slice_group_a_count": 40, "slice_group_a_accuracy": 0.55,
                                 "slice_group_a_macro_f1": 0.45, "slice_group_a_accuracy_ci_low": 0.4,
                                 "test_slice_group_a_accuracy": 0.9})
    (row,) = list(csv.DictReader((tmp_path / "production_slices.csv").open()))
    assert row["slice"] == "group_a" and float(row["accuracy"]) == pytest.approx(55.0)
    assert "predates slices.json" in report.blocks[0]


@pytest.mark.parametrize("robust_low, robust_excess, plain_low, verdict", [
    (0.01, 0.05, 0.02, "slight"), (0.05, 0.2, 0.1, "moderate"), (0.2, 0.3, 0.2, "strong"),
    (-0.01, 0.08, 0.05, "class mix only"), (-0.05, 0.02, -0.03, "none"), (float("nan"), 0.0, 0.1, "unknown")])
def test_the_verdict_is_drift_only_when_the_label_robust_excess_interval_lies_above_zero(
        robust_low, robust_excess, plain_low, verdict):
    scores = {"drift_auc_label_robust_excess_ci_low": robust_low, "drift_auc_label_robust_excess": robust_excess,
              "drift_auc_excess_ci_low": plain_low}
    assert drift_verdict(scores) == verdict


@pytest.mark.parametrize("seed", range(5))
def test_held_out_halves_split_by_subject_are_never_empty_even_when_one_subject_is_most_images(seed):
    rows = np.arange(100)
    groups = ["big"] * 60 + ["p"] * 20 + ["q"] * 20
    half_a, half_b = split_by_group(rows, groups, np.random.default_rng(seed))
    assert len(half_a) and len(half_b) and sorted(np.r_[half_a, half_b].tolist()) == rows.tolist()
    assert {groups[i] for i in half_a}.isdisjoint(groups[i] for i in half_b)


def test_a_drift_score_that_cannot_be_computed_has_no_interval_and_an_unknown_verdict():
    rng = np.random.default_rng(0)
    one_subject = DriftSide(rng.random((40, 5)), ["s"] * 40, rng.integers(0, 2, 40))
    other = DriftSide(rng.random((40, 5)), [f"t{i % 8}" for i in range(40)], rng.integers(0, 2, 40))
    scores = compare_with_control(one_subject, other, other, "drift_auc_label_robust", robust=True)
    assert np.isnan(scores["drift_auc_label_robust"])           # one subject a side: no grouped folds
    assert np.isnan(scores["drift_auc_label_robust_excess_ci_low"])
    assert drift_verdict(scores) == "unknown"
