import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, precision_recall_fscore_support

from trainers import metrics
from trainers.data.balance import balance_plan, class_weights
from trainers.data.split import (TEST, TRAIN, VAL, count_per_split, distinct_per_split, group_split,
                                 missing_class_warnings, partial_subjects_warning, split_mode, stratified_split)
from trainers.train import reduce_lr_on_f1_drop


def labels_like_table1(n=2000, seed=0):
    p = np.array([8228, 2458, 2983, 9113, 13040, 7417]) / 43239
    return np.random.default_rng(seed).choice(6, size=n, p=p)


def test_stratified_split_keeps_70_20_10_within_every_class():
    labels = labels_like_table1()
    split = stratified_split(labels, (0.7, 0.2, 0.1), seed=0)
    for c in range(6):
        n = (labels == c).sum()
        got = [((labels == c) & (split == s)).sum() for s in (TRAIN, VAL, TEST)]
        assert sum(got) == n
        assert abs(got[1] - 0.2 * n) <= 1 and abs(got[2] - 0.1 * n) <= 1


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    labels = labels_like_table1()
    a = stratified_split(labels, (0.7, 0.2, 0.1), seed=3)
    assert np.array_equal(a, stratified_split(labels, (0.7, 0.2, 0.1), seed=3))
    assert not np.array_equal(a, stratified_split(labels, (0.7, 0.2, 0.1), seed=4))


def test_group_split_puts_each_subject_in_one_split_near_the_ratios():
    rng = np.random.default_rng(1)
    subjects = [f"s{i // 8}" for i in range(2400)]
    labels = rng.integers(0, 6, 2400)
    split = group_split(labels, subjects, (0.7, 0.2, 0.1), seed=0)
    by_subject = {}
    for s, k in zip(subjects, split):
        by_subject.setdefault(s, set()).add(int(k))
    assert all(len(v) == 1 for v in by_subject.values())
    shares = np.bincount(split, minlength=3) / len(split)
    assert np.allclose(shares, [0.7, 0.2, 0.1], atol=0.02)
    for c in range(6):
        class_shares = np.bincount(split[labels == c], minlength=3) / (labels == c).sum()
        assert np.allclose(class_shares, [0.7, 0.2, 0.1], atol=0.06)


def test_balance_grows_rare_classes_up_to_the_cap():
    labels = np.array([0] * 100 + [1] * 10 + [2] * 60)
    idx = np.arange(len(labels))
    plan, augmented = balance_plan(idx, labels, max_factor=3.0, seed=0)
    counts = np.bincount(labels[plan])
    assert counts.tolist() == [100, 30, 100]
    assert augmented.sum() == len(plan) - len(idx) and not augmented[: len(idx)].any()
    assert set(plan[augmented]) <= set(idx[labels != 0])


def test_class_weights_use_the_effective_distribution():
    effective = np.array([0] * 100 + [1] * 30 + [2] * 100)
    w = class_weights(effective, 4)
    assert w[3] == 0
    assert np.allclose(w[:3], [230 / (4 * 100), 230 / (4 * 30), 230 / (4 * 100)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, 400)
    pred = np.where(rng.random(400) < 0.6, y, rng.integers(0, 6, 400))
    pred[pred == 4] = 5          # a class never predicted
    cm = metrics.confusion_matrix(y, pred, 6)
    assert np.array_equal(cm, sk_confusion(y, pred, labels=range(6)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(6), zero_division=np.nan)
    pc = metrics.per_class(cm)
    assert np.isnan(pc["precision"][4])          # never predicted: precision undefined, not 0
    for ours, theirs in ((pc["precision"], p), (pc["recall"], r), (pc["f1"], f)):
        assert np.allclose(ours, theirs, equal_nan=True)
    summary = metrics.summary(cm)
    assert summary["macro_f1"] == pytest.approx(
        f1_score(y, pred, labels=range(6), average="macro", zero_division=np.nan))
    assert summary["accuracy"] == pytest.approx((y == pred).mean())


@pytest.mark.parametrize("prev, now, expected", [
    (None, 0.5, 1e-3),          # first epoch: nothing to compare
    (0.90, 0.85, 1e-3),         # fell 5.6%: keep
    (0.90, 0.80, 0.8e-3),       # fell 11.1%: lr x 0.8
    (0.50, 0.60, 1e-3),         # rose: keep
])
def test_lr_drops_by_20_percent_when_val_f1_falls_more_than_10_percent(prev, now, expected):
    assert reduce_lr_on_f1_drop(prev, now, 1e-3, 0.10, 0.8) == pytest.approx(expected)


def test_flat_names_every_metric_as_logged_and_leaves_undefined_class_metrics_nan():
    # Class "c" is neither in the truth nor predicted; "b" is in the truth but never predicted.
    cm = metrics.confusion_matrix(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]), 3)
    got = metrics.flat("test", cm, ("a", "b", "c"))
    assert list(got) == ["test_accuracy", "test_macro_f1",
                         "test_precision_a", "test_precision_b", "test_precision_c",
                         "test_recall_a", "test_recall_b", "test_recall_c", "test_f1_a", "test_f1_b", "test_f1_c"]
    assert all(type(v) is float for v in got.values())
    assert got["test_accuracy"] == 0.75 and got["test_precision_a"] == 0.75 and got["test_recall_a"] == 1.0
    # b has an image but is never predicted: no precision (NaN), recall and F1 0 (it was missed).
    assert math.isnan(got["test_precision_b"]) and got["test_recall_b"] == got["test_f1_b"] == 0.0
    # c has no image and no prediction: nothing is defined, so NaN ("n/a"), never a 0 that reads as failure.
    assert all(math.isnan(got[f"test_{k}_c"]) for k in ("precision", "recall", "f1"))
    # Macro F1 is over the spec's classes whose F1 is defined: a (6/7) and b (0), not c.
    assert got["test_macro_f1"] == pytest.approx((6 / 7 + 0) / 2)
    y, pred = np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])
    assert got["test_macro_f1"] == pytest.approx(f1_score(y, pred, labels=range(3), average="macro",
                                                          zero_division=np.nan))


def test_flat_uses_the_class_names_as_given():
    cm = metrics.confusion_matrix(np.array([0, 1]), np.array([0, 1]), 2)
    assert set(metrics.flat("production", cm, ("very happy", "sad"))) == {
        "production_accuracy", "production_macro_f1", *(f"production_{k}_{c}" for k in ("precision", "recall", "f1")
                                                         for c in ("very happy", "sad"))}


def test_split_mode_is_group_only_when_every_image_has_a_subject():
    assert split_mode(["a", "b", "a"]) == "group"
    assert split_mode(["a", None, "a"]) == split_mode([None, None]) == split_mode([]) == "stratified"
    assert partial_subjects_warning(["a", "b"]) is None and partial_subjects_warning([None, None]) is None
    assert partial_subjects_warning(["a"] * 812 + [None] * 188).startswith(
        "subjects for 812 of 1,000 images: split stratified by class, not by subject; "
        "frames of one subject may sit in two splits")


def test_missing_class_warnings_name_each_split_without_a_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    splits = np.array([TRAIN, VAL, TRAIN, TEST, TRAIN, TRAIN])
    warnings = missing_class_warnings(labels, splits, ("anger", "fear", "sadness"), "group")
    assert [w.split(":")[0] for w in warnings] == ["the group split left fear, sadness out of val",
                                                   "the group split left anger, sadness out of test"]
    assert "their val metrics are n/a" in warnings[0]
    dataset = missing_class_warnings(labels, np.array([VAL, TEST, TRAIN, TEST, TRAIN, TEST]), ("a", "b", "c"),
                                     "dataset")
    assert dataset == ["the dataset split left a out of train: the model never learns it; "
                       "the dataset's own split has none",
                       "the dataset split left b, c out of val: their val metrics are n/a; "
                       "the dataset's own split has none"]


def test_per_split_counts_of_subjects_and_flags():
    splits = np.array([TRAIN, TRAIN, VAL, TEST, TEST])
    assert distinct_per_split(["a", "a", "b", None, "c"], splits) == {"train": 1, "val": 1, "test": 1}
    assert count_per_split(np.array([1, 0, 1, 1, 1]), splits) == {"train": 1, "val": 1, "test": 2}
