"""Differences against an experiment's reference point (its `compare_to`), with 95% intervals.

One run per point: a paired bootstrap over the two runs' test images, which must be the same files with
the same labels (trainers.stats, the same resamples for both runs, from their saved
test_predictions.csv.gz). Several seeds: the runs are paired
by seed, and the interval is the t-interval of the per-seed differences, as the report's other
intervals over seeds. Pure functions; the predictions come through a getter (the store's, cached).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from orchestrator.results.report.cells import Cell, Trial, axes_of, frozen
from orchestrator.results.report.tables import LABELS, Delta, summarize, value_text
from orchestrator.sweep.spec import Experiment
from trainers.predictions import ARTIFACT, Predictions
from trainers.stats import N_RESAMPLES, paired_differences
from trainers.tracking import logged_metric

METRICS = ("macro_f1", "accuracy")
NOT_COMPARABLE = "not comparable (different test images)"
NOT_DISTINGUISHABLE_NOTE = "≈: not distinguishable, the 95% interval of the difference contains 0."

PredictionsOf = Callable[[str], "Predictions | None"]    # run id -> its saved test predictions, or None


def reference_cell(exp: Experiment, cells: list[Cell]) -> Cell | None:
    """The cell at the experiment's compare_to point (None when the grid has no such point)."""
    point = tuple(frozen(exp.compare_to.get(axis)) for axis in axes_of(exp))
    return next((c for c in cells if c.point == point), None)


def seed_pairs(runs: list[Trial], reference: list[Trial]) -> list[tuple[Trial, Trial]]:
    """(run, reference run) per seed both finished, in seed order; a seed's last run wins (retries)."""
    mine, theirs = ({t.seed: t for t in trials} for trials in (runs, reference))
    common = sorted(set(mine) & set(theirs), key=lambda s: (len(s), s))
    return [(mine[s], theirs[s]) for s in common]


def delta_over_seeds(diffs: list[float]) -> Delta:
    """The mean of per-seed differences and its 95% t-interval over the seeds ('—' with under two)."""
    stat = summarize(diffs)
    if stat is None or stat.half is None:
        return Delta()
    return Delta(stat.mean, stat.mean - stat.half, stat.mean + stat.half, "seeds", stat.n)


def over_seeds(pairs: list[tuple[Trial, Trial]], metric: str) -> Delta:
    """Mean of the per-seed differences of test_<metric> and its 95% t-interval over the seeds."""
    key = f"test_{metric}"
    return delta_over_seeds([a.metrics.get(key, np.nan) - b.metrics.get(key, np.nan) for a, b in pairs])


def comparable_rows(a: Predictions, b: Predictions) -> tuple[np.ndarray, np.ndarray] | None:
    """Row positions (in a, in b) of their images when they hold the same keys (every one of them) with the
    same labels and classes; None when they do not, so a paired comparison would mean nothing."""
    rows_a, rows_b = a.aligned(b)
    same_keys = len(rows_a) == len(a.keys) == len(b.keys) > 0
    if a.classes != b.classes or not same_keys or not np.array_equal(a.labels[rows_a], b.labels[rows_b]):
        return None
    return rows_a, rows_b


def over_images(a: Predictions, b: Predictions) -> dict[str, Delta]:
    """Paired bootstrap of a - b per metric over their test images: the same keys (every one of them)
    with the same labels; otherwise not comparable."""
    rows = comparable_rows(a, b)
    if rows is None:
        return {m: Delta(why=NOT_COMPARABLE) for m in METRICS}
    rows_a, rows_b = rows
    found = paired_differences(a.labels[rows_a], a.predicted[rows_a], b.predicted[rows_b], len(a.classes))
    return {metric: Delta(*found[metric], "bootstrap", len(rows_a)) for metric in METRICS}


# The params that say which image files a run was tested on; the others (balance, alignment margin,
# image size, ...) change how a run trained or what its model saw, not which test images it answered.
TEST_SET_PARAMS = ("data.source", "data.root", "data.synthetic.", "data.classes")


def same_data(a: Trial, b: Trial) -> bool:
    """Whether two runs may have been tested on the same image files: the same data_digest, or the same
    source of images. The digest also names the preprocessing (the aligned size follows the model's
    image_size) and the training-only settings, so runs that differ only there differ in digest while
    answering the same test images; over_images then requires the same keys with the same labels."""
    if a.data_digest and a.data_digest == b.data_digest:
        return True
    source = [{k: v for k, v in t.applicable_params.items() if k.startswith(TEST_SET_PARAMS)} for t in (a, b)]
    return bool(source[0]) and source[0] == source[1]


def differences(cell: Cell, reference: Cell, predictions: PredictionsOf) -> dict[str, Delta]:
    """The cell's test metrics minus the reference cell's: over seeds when they share two or more,
    else by bootstrap over one run of each; '—' when a side has no finished run or no predictions."""
    if cell is reference:
        return {m: Delta(kind="reference", why="reference") for m in METRICS}
    if not cell.finished or not reference.finished:
        return {m: Delta() for m in METRICS}
    pairs = seed_pairs(cell.finished, reference.finished)
    if len(pairs) >= 2:
        return {m: over_seeds(pairs, m) for m in METRICS}
    a, b = pairs[0] if pairs else (cell.finished[0], reference.finished[0])
    if not same_data(a, b):
        return {m: Delta(why=NOT_COMPARABLE) for m in METRICS}
    found_a, found_b = predictions(a.run_id), predictions(b.run_id)
    if found_a is None or found_b is None:
        return {m: Delta() for m in METRICS}
    return over_images(found_a, found_b)


def group_differences(exp: Experiment, cells: list[Cell], predictions: PredictionsOf) -> dict[tuple, dict]:
    """point -> {metric: Delta} for every cell; {} when there is nothing to compare (one point, or no
    reference point among the cells)."""
    reference = reference_cell(exp, cells)
    if reference is None or len(cells) < 2:
        return {}
    return {c.point: differences(c, reference, predictions) for c in cells}


def point_words(point: dict) -> str:
    """A grid point in words: 'resnet50', 'epochs 3', 'optimizer adam, learning rate 0.001'."""
    return ", ".join(str(value) if axis == "model" else f"{LABELS.get(axis, axis)} {value_text(value)}"
                     for axis, value in point.items())


def reference_label(exp: Experiment) -> str:
    """The reference point in words (point_words of compare_to)."""
    return point_words(exp.compare_to)


def delta_header(exp: Experiment) -> str:
    """The Δ column's header: 'Δ F1 vs resnet50'."""
    return f"Δ F1 vs {reference_label(exp)}"


def delta_note(exp: Experiment, found: dict[tuple, dict]) -> str:
    """Under a table with a Δ column: what it is, which kind of interval each row carries, and ≈."""
    shown = [d["macro_f1"] for d in found.values() if d["macro_f1"].value is not None]
    reference = reference_label(exp)
    text = (f"Δ F1: test macro F1 minus the reference's ({reference}), in percentage points, "
            "with the 95% interval of the difference")
    kinds = []
    images = sorted({d.n for d in shown if d.kind == "bootstrap"})
    if images:
        counts = str(images[0]) if len(images) == 1 else f"{images[0]}-{images[-1]}"
        kinds.append(f"paired bootstrap over the same {counts} test images ({N_RESAMPLES:,} resamples)")
    seeds = sorted({d.n for d in shown if d.kind == "seeds"})
    if seeds:
        kinds.append(f"t over {'/'.join(map(str, seeds))} seeds paired by seed")
    text += (": " + "; ".join(kinds) + ". " + NOT_DISTINGUISHABLE_NOTE) if kinds else "."
    if any(d["macro_f1"].value is None and d["macro_f1"].why == "—" and d["macro_f1"].kind != "reference"
           for d in found.values()):
        text += f" —: no difference (a run did not finish, or it saved no {ARTIFACT})."
    return text


def value_note(cells: list[Cell], names: str = "test acc, test F1") -> str | None:
    """How to read the value cells' intervals: '[low, high]' for one run, '± t' over seeds; None when
    no cell has an interval."""
    single = [c.finished[0] for c in cells if len(c.finished) == 1 and "test_macro_f1_ci_low" in c.finished[0].metrics]
    seeds = sorted({len(c.finished) for c in cells if len(c.finished) > 1})
    parts = []
    if single:
        sizes = sorted({int(logged_metric(t.metrics, "data_n_test")) for t in single
                        if logged_metric(t.metrics, "data_n_test") is not None})
        over = f"its {sizes[0]} test images" if len(sizes) == 1 else "its test images"
        parts.append(f"one run, [95% bootstrap interval over {over} ({N_RESAMPLES:,} resamples)]")
    if seeds:
        parts.append(f"mean ± half-width of the 95% t-interval over {'/'.join(map(str, seeds))} seeds")
    return f"{names}: " + "; ".join(parts) + "." if parts else None
