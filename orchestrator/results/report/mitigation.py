"""The mitigation table's numbers (the study's Task 4): every grid point of an experiment evaluated on the
production data, each measure with its change against the experiment's compare_to point (the unmitigated
baseline). Pure: trial runs, production evaluations and their saved predictions in; numbers out.

Measures per run (fractions; the report prints percent and percentage points):
  test_macro_f1        the trial run's logged test macro F1
  production_macro_f1  its production evaluation's logged macro F1
  production_drop      test minus production macro F1
  gap_<attribute>      the best minus the worst production slice of the attribute by macro F1, over the
                       values with at least MIN_SLICE_COUNT images (from production_predictions.csv.gz)
  production_f1_<cls>  production F1 of the class the reference point lost most (test minus production F1)

Changes: one run per point, a paired bootstrap over the same production images (every production measure
computed for both runs on each resample) and over the same test images (test F1); the drop's change
combines the two, drawn independently. Several seeds: the runs are paired by seed and the interval is
the t-interval of the per-seed differences, as comparisons.py does for the test metrics.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from orchestrator.results.production_metrics import MAX_SLICE_VALUES
from orchestrator.results.production_tables import MIN_SLICE_COUNT
from orchestrator.results.report.cells import Cell, Trial
from orchestrator.results.report.comparisons import (NOT_COMPARABLE, comparable_rows, delta_over_seeds, reference_cell,
                                                     same_data, seed_pairs)
from orchestrator.results.report.tables import Delta, Stat, summarize
from orchestrator.sweep.spec import Experiment
from trainers import metrics
from trainers.data.dataset import metric_key
from trainers.predictions import Predictions
from trainers.stats import DEFAULT, Resampling, bootstrap_draws, grouped_confusions, percentile_interval

TEST_F1, PRODUCTION_F1, DROP = "test_macro_f1", "production_macro_f1", "production_drop"
GAP = "gap_"
CLASS_F1 = "production_f1_"
# The production resamples use another seed than the test ones (which match comparisons.over_images):
# the drop's change subtracts one from the other and needs the two drawn independently.
PRODUCTION_RESAMPLING = Resampling(seed=DEFAULT.seed + 1)
NOT_COMPARABLE_PRODUCTION = "not comparable (different production images)"


@dataclass(frozen=True)
class ProductionEvaluation:
    """A FINISHED run of <sweep>-production: which trial run it evaluated, on which production data."""
    run_id: str
    source_run_id: str
    config_hash: str              # the trial's config_hash tag ("" when the run predates the tag)
    data_digest: str              # the production data it saw
    start_time: int               # ms since the epoch
    metrics: dict[str, float]


@dataclass(frozen=True)
class Evaluated:
    """A trial run with its production evaluation and both runs' saved predictions (None when not logged)."""
    trial: Trial
    production: ProductionEvaluation
    test: Predictions | None
    predictions: Predictions | None   # production_predictions.csv.gz, with the images' attributes


PredictionsOf = Callable[[str], "Predictions | None"]


@dataclass
class MitigationRow:
    """One grid point: its runs with a production evaluation, their measures and the changes."""
    cell: Cell
    evaluated: list[Evaluated]
    values: dict[str, Stat | None] = field(default_factory=dict)    # measure -> over the evaluated runs
    deltas: dict[str, Delta] = field(default_factory=dict)          # measure -> minus the reference's


@dataclass
class Mitigation:
    """An experiment's mitigation table: the measures in column order and one row per grid point."""
    experiment: Experiment
    measures: list[str]
    rows: list[MitigationRow]
    reference: MitigationRow | None
    lost_class: str | None        # the class the reference lost most, None when it was not evaluated
    lost_by: float | None         # how much (test minus production F1, fraction)
    older_digests: list[str]      # production data versions some runs were also evaluated on, left out


def preparation(trial: Trial) -> tuple[str, str]:
    """What the production data's digest depends on besides the data: the model's image size and classes
    (production images are prepared at the model's size), so runs of different sizes have different digests."""
    return trial.params.get("model.image_size", ""), trial.params.get("data.classes", "")


def latest_evaluations(trials: list[Trial], evaluations: list[ProductionEvaluation]
                       ) -> tuple[dict[str, ProductionEvaluation], list[str]]:
    """run id -> the newest evaluation of that run on the newest production data prepared as it needs
    (its image size and classes), and the older digests left out. An evaluation whose config_hash differs
    from its run's is not its."""
    by_id = {t.run_id: t for t in trials}
    mine = sorted((e for e in evaluations if e.source_run_id in by_id
                   and e.config_hash in ("", by_id[e.source_run_id].config_hash)),
                  key=lambda e: e.start_time, reverse=True)
    newest: dict[tuple[str, str], str] = {}
    for evaluation in mine:
        newest.setdefault(preparation(by_id[evaluation.source_run_id]), evaluation.data_digest)
    chosen: dict[str, ProductionEvaluation] = {}
    for evaluation in mine:
        if evaluation.data_digest == newest[preparation(by_id[evaluation.source_run_id])]:
            chosen.setdefault(evaluation.source_run_id, evaluation)
    older = [d for d in dict.fromkeys(e.data_digest for e in mine) if d not in newest.values()]
    return chosen, older


# --- one run's measures ------------------------------------------------------------------------------

def slice_codes(predictions: Predictions, attribute: str) -> tuple[np.ndarray, int]:
    """Each image's slice of the attribute (0..G-1, values in sorted order) and G; an image whose value is
    unknown or shared by fewer than MIN_SLICE_COUNT images gets G (no slice). An attribute with over
    MAX_SLICE_VALUES values (an id) is not sliced, as in the production evaluation."""
    values = predictions.attrs.get(attribute)
    if values is None:
        return np.zeros(len(predictions.keys), np.int64), 0
    names, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
    known = [(name, count) for name, count in zip(names, counts) if name]
    if len(known) > MAX_SLICE_VALUES:
        return np.zeros(len(predictions.keys), np.int64), 0
    kept = [name for name, count in known if count >= MIN_SLICE_COUNT]
    index = {name: i for i, name in enumerate(kept)}
    return np.array([index.get(v, len(kept)) for v in np.asarray(values, dtype=str)], np.int64), len(kept)


def slice_gap(confusions: np.ndarray) -> np.ndarray:
    """(r, G, K, K) slice confusion matrices -> (r,) best minus worst slice macro F1; NaN with under two
    slices of defined F1."""
    f1 = np.atleast_2d(metrics.macro_f1(confusions)) if confusions.shape[1] else np.zeros((len(confusions), 0))
    defined = np.isfinite(f1)
    best = np.where(defined, f1, -np.inf).max(axis=1, initial=-np.inf)
    worst = np.where(defined, f1, np.inf).min(axis=1, initial=np.inf)
    return np.where(defined.sum(axis=1) >= 2, best - worst, np.nan)


def lost_most(test_f1: np.ndarray, production_f1: np.ndarray) -> tuple[int, float] | None:
    """The class with the largest mean test-minus-production F1 over runs ((runs, K) arrays) and that mean;
    None when no class has one."""
    loss = np.asarray(test_f1, np.float64) - np.asarray(production_f1, np.float64)
    defined = np.isfinite(loss)
    count = defined.sum(axis=0)
    if not count.any():
        return None
    mean = np.where(count > 0, np.where(defined, loss, 0.0).sum(axis=0) / np.maximum(count, 1), -np.inf)
    k = int(np.argmax(mean))
    return k, float(mean[k])


def class_f1s(run: Evaluated, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The run's per-class test F1 and production F1 as logged (NaN where a class has none)."""
    test = [run.trial.metrics.get(f"test_f1_{c}", np.nan) for c in classes]
    production = [run.production.metrics.get(f"production_f1_{metric_key(c)}", np.nan) for c in classes]
    return np.asarray(test, np.float64), np.asarray(production, np.float64)


def production_statistic(predictions: Predictions, attributes: list[str], lost: int | None
                         ) -> Callable[[np.ndarray], np.ndarray]:
    """rows (r, n) of image positions -> (r, 2 + A): macro F1, the lost class's F1, then each attribute's gap."""
    n_classes = len(predictions.classes)
    whole = np.zeros(len(predictions.keys), np.int64)
    codes = [slice_codes(predictions, attribute) for attribute in attributes]

    def statistic(rows: np.ndarray) -> np.ndarray:
        args = (predictions.labels, predictions.predicted)
        cms = grouped_confusions(rows, whole, *args, (1, n_classes))[:, 0]
        lost_f1 = np.full(len(rows), np.nan) if lost is None else metrics.per_class(cms)["f1"][:, lost]
        columns = [np.atleast_1d(metrics.macro_f1(cms)), lost_f1]
        columns += [slice_gap(grouped_confusions(rows, c, *args, (g, n_classes))) for c, g in codes]
        return np.stack(columns, axis=1)
    return statistic


def run_values(run: Evaluated, attributes: list[str], classes: list[str], lost: int | None) -> dict[str, float]:
    """One evaluated run's measures: test and production F1 and the lost class's F1 as logged, the gaps
    from its production predictions (NaN without them)."""
    test = run.trial.metrics.get(TEST_F1, np.nan)
    production = run.production.metrics.get(PRODUCTION_F1, np.nan)
    out = {TEST_F1: test, PRODUCTION_F1: production, DROP: test - production}
    if run.predictions is not None:
        found = production_statistic(run.predictions, attributes, None)(np.arange(len(run.predictions.keys))[None])[0]
        out.update({GAP + a: float(v) for a, v in zip(attributes, found[2:])})
    else:
        out.update({GAP + a: np.nan for a in attributes})
    if lost is not None:
        out[CLASS_F1 + classes[lost]] = float(class_f1s(run, classes)[1][lost])
    return out


# --- changes against the reference point -----------------------------------------------------------

Draws = tuple[np.ndarray, np.ndarray]     # values on the images themselves (M,), on each resample (R, M)


def draws_on_test(a: Evaluated, b: Evaluated) -> Draws | str:
    """Test macro F1 of a minus b on their test images, paired; why not when it cannot be."""
    if a.test is None or b.test is None:
        return "—"
    rows = comparable_rows(a.test, b.test) if same_data(a.trial, b.trial) else None
    if rows is None:
        return NOT_COMPARABLE
    shape = (1, len(a.test.classes))
    zeros = np.zeros(len(a.test.keys), np.int64)

    def statistic(draw: np.ndarray) -> np.ndarray:
        f1 = [metrics.macro_f1(grouped_confusions(r[draw], zeros, p.labels, p.predicted, shape)[:, 0])
              for r, p in zip(rows, (a.test, b.test))]
        return np.atleast_1d(f1[0] - f1[1])[:, None]
    return bootstrap_draws(len(rows[0]), statistic)


def draws_on_production(a: Evaluated, b: Evaluated, attributes: list[str], lost: int | None) -> Draws | str:
    """production_statistic of a minus b on the same production images, paired; why not when it cannot be."""
    if a.predictions is None or b.predictions is None:
        return "—"
    rows = comparable_rows(a.predictions, b.predictions)
    if rows is None:
        return NOT_COMPARABLE_PRODUCTION
    of_a, of_b = (production_statistic(p, attributes, lost) for p in (a.predictions, b.predictions))
    return bootstrap_draws(len(rows[0]), lambda draw: of_a(rows[0][draw]) - of_b(rows[1][draw]),
                           PRODUCTION_RESAMPLING)


def drawn_delta(draws: Draws | str, column: int, n: int) -> Delta:
    """One quantity's paired-bootstrap Delta from its draws; 'n/a' when the quantity is undefined."""
    if isinstance(draws, str):
        return Delta(why=draws)
    point, resampled = draws
    if not np.isfinite(point[column]):
        return Delta(why="n/a")
    return Delta(float(point[column]), *percentile_interval(resampled[:, column]), "bootstrap", n)


def bootstrap_deltas(a: Evaluated, b: Evaluated, attributes: list[str], lost: tuple[int, str] | None
                     ) -> dict[str, Delta]:
    """Every measure of one run minus the reference run's, by paired bootstrap; the drop's change combines
    the test and the production resamples, drawn independently."""
    test = draws_on_test(a, b)
    production = draws_on_production(a, b, attributes, None if lost is None else lost[0])
    n_test, n_production = (0 if p is None else len(p.keys) for p in (a.test, a.predictions))
    out = {TEST_F1: drawn_delta(test, 0, n_test), PRODUCTION_F1: drawn_delta(production, 0, n_production)}
    out.update({GAP + name: drawn_delta(production, 2 + i, n_production) for i, name in enumerate(attributes)})
    if lost is not None:
        out[CLASS_F1 + lost[1]] = drawn_delta(production, 1, n_production)
    if isinstance(test, str) or isinstance(production, str):
        out[DROP] = Delta(why=test if isinstance(test, str) else production)
    else:
        drop = (test[0][:1] - production[0][:1], test[1][:, :1] - production[1][:, :1])
        out[DROP] = drawn_delta(drop, 0, n_production)
    return out


def seed_deltas(pairs: list[tuple[Evaluated, Evaluated]], values: dict[str, dict[str, float]],
                measures: list[str]) -> dict[str, Delta]:
    """Every measure's mean per-seed difference with its t-interval over the seeds (values: run id -> measures)."""
    return {m: delta_over_seeds([values[a.trial.run_id][m] - values[b.trial.run_id][m] for a, b in pairs])
            for m in measures}


def evaluated_pairs(row: list[Evaluated], reference: list[Evaluated]) -> list[tuple[Evaluated, Evaluated]]:
    """(run, reference run) per seed both evaluated, as comparisons.seed_pairs pairs trials."""
    by_id = {e.trial.run_id: e for e in (*row, *reference)}
    pairs = seed_pairs([e.trial for e in row], [e.trial for e in reference])
    return [(by_id[a.run_id], by_id[b.run_id]) for a, b in pairs]


# --- the table ------------------------------------------------------------------------------------

def stat_of_values(values: list[float]) -> Stat | None:
    """Mean ± t over the runs' values; a Stat with a NaN mean (shown n/a) when every value is undefined."""
    stat = summarize(values)
    if stat is None and values:
        return Stat(np.nan, None, len(values))
    return stat


def sliced_attributes(runs: list[Evaluated]) -> list[str]:
    """The attributes at least one run's production images split into two or more judged slices."""
    names = sorted({a for run in runs if run.predictions is not None for a in run.predictions.attrs})
    return [a for a in names if any(run.predictions is not None and slice_codes(run.predictions, a)[1] >= 2
                                    for run in runs)]


def evaluate_rows(cells: list[Cell], evaluations: list[ProductionEvaluation], test_of: PredictionsOf,
                  production_of: PredictionsOf) -> tuple[list[MitigationRow], list[str]]:
    """Each cell with its finished runs' production evaluations on the newest production data (and the
    older digests left out)."""
    chosen, older = latest_evaluations([t for c in cells for t in c.finished], evaluations)

    def evaluated(trial: Trial) -> Evaluated:
        production = chosen[trial.run_id]
        return Evaluated(trial, production, test_of(trial.run_id), production_of(production.run_id))
    rows = [MitigationRow(c, [evaluated(t) for t in c.finished if t.run_id in chosen]) for c in cells]
    return rows, older


def mitigation_table(exp: Experiment, cells: list[Cell], evaluations: list[ProductionEvaluation],
                     test_of: PredictionsOf, production_of: PredictionsOf) -> Mitigation:
    """The experiment's grid points with their measures in production and the changes against compare_to."""
    rows, older = evaluate_rows(cells, evaluations, test_of, production_of)
    ref_cell = reference_cell(exp, cells)
    reference = next((r for r in rows if r.cell is ref_cell), None)
    runs = [e for r in rows for e in r.evaluated]
    attributes = sliced_attributes(runs)
    classes = runs[0].trial.classes if runs else []
    found = None
    if reference is not None and reference.evaluated and classes:
        found = lost_most(*(np.stack(f) for f in zip(*(class_f1s(e, classes) for e in reference.evaluated))))
    lost = None if found is None else (found[0], classes[found[0]])
    measures = [TEST_F1, PRODUCTION_F1, DROP, *(GAP + a for a in attributes), *([CLASS_F1 + lost[1]] if lost else [])]
    lost_index = None if lost is None else lost[0]
    values = {e.trial.run_id: run_values(e, attributes, classes, lost_index) for e in runs}
    for row in rows:
        row.values = {m: stat_of_values([values[e.trial.run_id][m] for e in row.evaluated]) if row.evaluated
                      else None for m in measures}
        row.deltas = row_deltas(row, reference, values, (measures, attributes), lost)
    return Mitigation(exp, measures, rows, reference, None if lost is None else lost[1],
                      None if found is None else found[1], older)


def row_deltas(row: MitigationRow, reference: MitigationRow | None, values: dict[str, dict[str, float]],
               columns: tuple[list[str], list[str]], lost: tuple[int, str] | None) -> dict[str, Delta]:
    """A row's measures minus the reference row's: 'reference' on itself, over seeds when they share two
    or more evaluated seeds, else by paired bootstrap over one run of each; '—' when a side is not evaluated."""
    measures, attributes = columns
    if row is reference:
        return {m: Delta(kind="reference", why="reference") for m in measures}
    if reference is None or not row.evaluated or not reference.evaluated:
        return {m: Delta() for m in measures}
    pairs = evaluated_pairs(row.evaluated, reference.evaluated)
    if len(pairs) >= 2:
        return seed_deltas(pairs, values, measures)
    a, b = pairs[0] if pairs else (row.evaluated[0], reference.evaluated[0])
    return bootstrap_deltas(a, b, attributes, lost)
