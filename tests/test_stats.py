"""Intervals from saved predictions: they contain the point value, narrow with more images, and a run compared
with itself differs by exactly nothing."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from trainers import metrics, stats
from trainers.predictions import Predictions, read_predictions


def predictions(n: int, right: float, seed: int = 0, classes: int = 6):
    """n labels and predictions that are right with probability `right`, else a random class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return y, np.where(rng.random(n) < right, y, rng.integers(0, classes, n))


def test_the_interval_contains_the_point_value_and_narrows_with_more_test_images():
    widths = []
    for n in (200, 2000):
        y, pred = predictions(n, 0.7)
        ci = stats.bootstrap_ci(y, pred, 6)
        point = {"accuracy": accuracy_score(y, pred),
                 "macro_f1": f1_score(y, pred, labels=range(6), average="macro", zero_division=np.nan)}
        for name, (low, high) in ci.items():
            assert low <= point[name] <= high
        widths.append(ci["macro_f1"][1] - ci["macro_f1"][0])
    # The width shrinks as 1/sqrt(n): 10x the images, ~3.2x narrower (1/2.5 leaves room for resampling noise).
    assert widths[1] < widths[0] / 2.5


def test_the_same_predictions_always_give_the_same_interval():
    y, pred = predictions(300, 0.6)
    assert stats.bootstrap_ci(y, pred, 6) == stats.bootstrap_ci(y, pred, 6)


def test_a_run_compared_with_itself_differs_by_exactly_zero_with_a_zero_width_interval():
    y, pred = predictions(500, 0.6)
    for metric in ("accuracy", "macro_f1"):
        assert stats.paired_difference(y, pred, pred, 6, metric) == (0.0, 0.0, 0.0)
    assert not stats.excludes_zero(0.0, 0.0)


def test_a_paired_difference_finds_a_better_run_that_separate_intervals_cannot_separate():
    y, worse = predictions(400, 0.6, seed=1)
    rng = np.random.default_rng(2)
    better = np.where(rng.random(400) < 0.15, y, worse)      # the same predictions, 15% of them corrected
    diff, low, high = stats.paired_difference(y, better, worse, 6, "accuracy")
    assert diff == pytest.approx(accuracy_score(y, better) - accuracy_score(y, worse))
    assert low <= diff <= high and stats.excludes_zero(low, high)
    a, b = stats.bootstrap_ci(y, better, 6)["accuracy"], stats.bootstrap_ci(y, worse, 6)["accuracy"]
    assert a[0] < b[1]          # the two separate intervals overlap: only the pairing tells them apart


def test_macro_f1_of_a_stack_matches_each_matrix_and_scikit_learn():
    y, pred = predictions(60, 0.5, classes=4)
    pred[pred == 3] = 2                                   # class 3 is never predicted
    cm = metrics.confusion_matrix(y, pred, 4)
    stack = np.stack([cm, np.zeros_like(cm)])
    got = metrics.macro_f1(stack)
    assert got[0] == pytest.approx(f1_score(y, pred, labels=range(4), average="macro", zero_division=np.nan))
    assert np.isnan(got[1])                               # no images at all: undefined, not 0


def test_a_predictions_file_keeps_each_images_attributes_and_reads_back_the_same(tmp_path):
    """Production predictions carry the attributes their slices are cut by; "" stands for unknown."""
    written = Predictions(keys=np.array(["b/1.png", "a/2.png"], dtype=object), labels=np.array([0, 1]),
                          predicted=np.array([1, 1]), probs=np.array([[0.4, 0.6], [0.1, 0.9]], np.float32),
                          classes=("anger", "fear"),
                          attrs={"group": np.array(["b", ""], dtype=object), "occluded": np.array(["1", "0"])})
    path = tmp_path / "p.csv.gz"
    path.write_bytes(written.to_bytes())
    read = read_predictions(path)
    assert list(read.keys) == ["b/1.png", "a/2.png"] and read.classes == ("anger", "fear")
    assert {k: list(v) for k, v in read.attrs.items()} == {"group": ["b", ""], "occluded": ["1", "0"]}
    assert read.labels.tolist() == [0, 1] and np.allclose(read.probs, written.probs)
