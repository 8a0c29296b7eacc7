"""One section per experiment group, chosen by the shape of its grid:
  a `model` axis          -> per-epoch training details and curves, test metrics, per-class
                             metrics and confusion matrices (the study's Tables 2-7, Figures 3, 4, 6, 7)
  optim.name x optim.lr   -> the "acc / F1" grid and a heatmap of test macro F1 (Table 9, Figure 8)
  anything else           -> one row per grid point (train.epochs: Table 8; optim.lr: Table 10)
and one row per run for groups the spec has no grid for (TPE samples). Each table of several grid points
has a Δ F1 column against the experiment's compare_to point, with its interval (see comparisons.py)."""
from __future__ import annotations

import math

import numpy as np

from orchestrator.results.report.cells import Cell, Trial, axes_of, group_cells, label, stat_of, status_text
from orchestrator.results.report.comparisons import delta_header, delta_note, group_differences, value_note
from orchestrator.results.report.references import study, study_numbers
from orchestrator.results.report.store import SweepRuns
from orchestrator.results.report.tables import LABELS, Report, Table, delta_text, number, put, put_delta, scale, \
    show, slug, summarize, value_text
from orchestrator.sweep.plan import PlannedTrial
from orchestrator.sweep.spec import Experiment, SweepSpec
from trainers.plots import confusion_png, curves_png, heatmap_png

CURVE_METRICS = ("train_loss", "train_accuracy", "train_macro_f1", "val_loss", "val_accuracy", "val_macro_f1")
TEST_METRICS = ("test_accuracy", "test_macro_f1")
PER_CLASS = ("recall", "precision", "f1")   # the study's per-class "accuracy" is recall
# The params that tell runs of a group without a grid apart (TPE: its search space instead).
RUN_AXES = ("model.name", "optim.name", "optim.lr", "train.epochs", "train.seed")


def n_cells(report: Report, cell: Cell) -> list[str]:
    """The seed count column, when the sweep has replicates."""
    return [cell.n_text()] if report.replicated else []


def experiment_section(report: Report, store: SweepRuns, spec: SweepSpec, plan: list[PlannedTrial],
                       exp: Experiment, trials: list[Trial]) -> None:
    """One group's tables, chosen by the shape of its grid; a line saying why when nothing finished."""
    cells, stray = group_cells(spec, plan, exp, trials)
    members = [t for c in cells for t in c.trials] + stray
    report.text(f"## {exp.title}")
    if stray:
        report.text(f"{len(stray)} run(s) tagged '{exp.name}' match no grid point of the spec "
                    "(was it edited since?); they are left out.")
    if not any(c.finished for c in cells):
        why = status_text(members, counted=True) if members else "no runs"
        report.text(f"{exp.title}: no finished trials in group '{exp.name}' ({why}).")
        return
    axes = set(axes_of(exp))
    if "model" in axes:
        model_sections(report, store, exp, cells)
    elif axes == {"optim.name", "optim.lr"}:
        optimizer_lr_section(report, store, exp, cells)
    else:
        points_section(report, store, exp, cells)


def numbered(title: str, exp: Experiment, cell: Cell, part: str) -> str:
    """'Training details: vit (Table 2, Figure 3)' for a model the study reports, else without numbers."""
    ref = study_numbers(cell.config.model.name, part) if cell.config is not None else None
    return f"{title}: {label(exp, cell.point)}" + (f" ({ref})" if ref and len(axes_of(exp)) == 1 else "")


def model_sections(report: Report, store: SweepRuns, exp: Experiment, cells: list[Cell]) -> None:
    """Per-epoch details and curves, test metrics, per-class metrics and confusion matrices per model."""
    ran = [c for c in cells if c.finished]
    for cell in cells:
        if not cell.finished:
            report.text(f"{label(exp, cell.point)}: no finished trial ({status_text(cell.trials, counted=True)}).")
    for cell in ran:
        report.text(f"### {numbered('Training details', exp, cell, 'curves')}")
        curves_table(report, store, exp, cell)
    report.text("### Test metrics" + (" (Tables 3, 6)" if len(axes_of(exp)) == 1 else ""))
    test_table(report, store, exp, cells)
    for cell in ran:
        report.text(f"### {numbered('Per-class test metrics', exp, cell, 'per_class')}")
        query = dict(zip(axes_of(exp), cell.point))
        per_class_table(report, f"{exp.name}_per_class_{slug(label(exp, cell.point))}", cell,
                        lambda metric, cls, q=query: study(exp.reference.get("per_class"), f"test_{metric}",
                                                           {**q, "class": cls}))
        confusion_figure(report, store, f"{exp.name}_confusion_{slug(label(exp, cell.point))}", cell,
                         f"{exp.name}: {label(exp, cell.point)}")


def curves_table(report: Report, store: SweepRuns, exp: Experiment, cell: Cell) -> None:
    """Table 2 / 5 from each run's metric history (step = epoch), and its curves (Figure 3 / 6)."""
    histories = [{m: store.metric_history(t.run_id, m) for m in CURVE_METRICS} for t in cell.finished]
    epochs = sorted({step for h in histories for steps in h.values() for step in steps})
    query = dict(zip(axes_of(exp), cell.point))
    name = f"{exp.name}_curves_{slug(label(exp, cell.point))}"
    table = Table(name, ["epoch", *report.n_header(), *(LABELS[m] for m in CURVE_METRICS)])
    means = []
    for epoch in epochs:
        record = {"epoch": epoch}
        row_stats = {m: summarize(h[m].get(epoch) for h in histories) for m in CURVE_METRICS}
        n = max((s.n for s in row_stats.values() if s), default=0)
        record["n"] = n
        cells = []
        for metric, stat in row_stats.items():
            ref = study(exp.reference.get("curves"), metric, {**query, "epoch": epoch})
            put(record, metric, metric, stat, ref)
            cells.append(show(metric, stat, ref))
        record["runs"] = cell.run_ids()
        table.rows.append([str(epoch), *([str(n)] if report.replicated else []), *cells])
        table.records.append(record)
        # The figure in the table's units: rates in percent.
        means.append({"epoch": epoch, **{m: s.mean * scale(m) if s else math.nan for m, s in row_stats.items()}})
    report.table(table)
    if means:
        seeds = f" (mean of {len(histories)} seeds)" if len(histories) > 1 else ""
        path = curves_png(means, report.out / f"{name}.png", f"{label(exp, cell.point)}{seeds}")
        report.figure(path, f"training curves: {label(exp, cell.point)}")


def test_table(report: Report, store: SweepRuns, exp: Experiment, cells: list[Cell]) -> None:
    """Test accuracy and macro F1 per finished model (Tables 3 and 6 in one), with Δ F1 against compare_to."""
    axes = axes_of(exp)
    found = group_differences(exp, cells, store.predictions)
    table = Table(f"{exp.name}_test", [*(LABELS.get(a, a) for a in axes), *report.n_header(),
                                       *(LABELS[m] for m in TEST_METRICS), *([delta_header(exp)] if found else [])])
    for cell in (c for c in cells if c.finished):
        record = {a: v for a, v in zip(axes, cell.point)}
        record["n"] = len(cell.finished)
        row = [value_text(v) for v in cell.point] + n_cells(report, cell)
        stats = [(m, cell.stat(m), study(exp.reference, m, dict(zip(axes, cell.point)))) for m in TEST_METRICS]
        add_row(table, cell, record, row, stats, found.get(cell.point))
    table.notes = interval_notes(exp, cells, found)
    report.table(table)


def interval_notes(exp: Experiment, cells: list[Cell], found: dict) -> list[str]:
    """Under a comparison table: which interval the value cells carry, and what Δ and ≈ mean."""
    return [note for note in (value_note(cells), delta_note(exp, found) if found else None) if note]


def add_row(table: Table, cell: Cell, record: dict, row: list, stats: list[tuple], deltas: dict | None = None) -> None:
    """Append one row: each (metric, stat, study value) shown in the table and kept in the CSV record,
    then the Δ F1 column (and every difference column in the CSV) when the table compares points."""
    for metric, stat, ref in stats:
        put(record, metric, metric, stat, ref)
        row.append(show(metric, stat, ref))
    if deltas is not None:
        row.append(delta_text(deltas["macro_f1"]))
        put_delta(record, deltas)
    record["runs"] = cell.run_ids()
    table.rows.append(row)
    table.records.append(record)


def per_class_table(report: Report, name: str, cell: Cell, reference) -> None:
    """Per class: accuracy (recall), precision, F1 over the cell's runs; reference(metric, class) -> study."""
    table = Table(name, ["class", *report.n_header(), *(LABELS[m] for m in PER_CLASS)])
    classes = cell.finished[0].classes
    for cls in classes:
        record = {"class": cls, "n": len(cell.finished)}
        row = [cls, *n_cells(report, cell)]
        stats = [(m, cell.stat(f"test_{m}_{cls}"), reference(m, cls)) for m in PER_CLASS]
        add_row(table, cell, record, row, stats)
    report.table(table)


def confusion_figure(report: Report, store: SweepRuns, name: str, cell: Cell, title: str) -> None:
    """The confusion matrix (Figures 4 and 7) from the runs' confusion_matrix.json, and its counts as CSV."""
    found = store.confusion_counts([t.run_id for t in cell.finished])
    if found is None:
        report.text(f"{title}: no confusion_matrix.json logged.")
        return
    classes, counts = found
    table = Table(name, ["true \\ predicted", *classes])
    for cls, row in zip(classes, counts):
        table.records.append({"true": cls, **{c: int(v) for c, v in zip(classes, row)}})
    report.csv(table)
    seeds = f" (summed over {len(cell.finished)} seeds)" if len(cell.finished) > 1 else ""
    report.figure(confusion_png(counts, tuple(classes), report.out / f"{name}.png", title + seeds),
                  f"confusion matrix: {title}")


def optimizer_lr_section(report: Report, store: SweepRuns, exp: Experiment, cells: list[Cell]) -> None:
    """Table 9: 'acc / F1' per learning rate (rows) x optimizer (columns), then Δ F1 against compare_to in the
    same layout; Figure 8: heatmap of F1."""
    axes = axes_of(exp)
    found = group_differences(exp, cells, store.predictions)
    optimizers, rates = list(exp.grid["optim.name"]), list(exp.grid["optim.lr"])
    at = {}
    for cell in cells:
        point = dict(zip(axes, cell.point))
        at[point["optim.name"], point["optim.lr"]] = cell
    table = Table(exp.name, ["learning rate \\ optimizer", *optimizers])
    matrix = np.full((len(rates), len(optimizers)), np.nan)
    notes = {}
    for i, lr in enumerate(rates):
        row = [value_text(lr)]
        for j, opt in enumerate(optimizers):
            cell = at[opt, lr]
            row.append(grid_cell(report, exp, cell, {"optim.name": opt, "optim.lr": lr}))
            f1 = cell.stat("test_macro_f1")
            if f1 is not None and math.isfinite(f1.mean):
                matrix[i, j] = 100 * f1.mean
            else:
                notes[(i, j)] = status_text(cell.trials)
        table.rows.append(row)
    for cell in cells:
        record = dict(zip(axes, cell.point))
        record["n"] = len(cell.finished)
        for metric in TEST_METRICS:
            put(record, metric, metric, cell.stat(metric), study(exp.reference, metric, dict(zip(axes, cell.point))))
        if found:
            put_delta(record, found[cell.point])
        record["status"] = "finished" if cell.finished else status_text(cell.trials)
        record["runs"] = cell.run_ids()
        table.records.append(record)
    table.notes = [n for n in [value_note(cells, "acc / F1")] if n]
    report.table(table)
    if found:
        delta_grid(report, exp, rates, optimizers, {p: d["macro_f1"] for p, d in found.items()})
    heatmap(report, exp, rates, optimizers, matrix, notes)


def delta_grid(report: Report, exp: Experiment, rates: list, optimizers: list, deltas: dict) -> None:
    """Δ F1 against the reference point in Table 9's layout (its numbers are in the same CSV)."""
    position = {name: i for i, name in enumerate(axes_of(exp))}
    at = {(point[position["optim.name"]], point[position["optim.lr"]]): d for point, d in deltas.items()}
    report.text(f"{delta_header(exp)} (percentage points):")
    grid = Table(exp.name, ["learning rate \\ optimizer", *optimizers])
    for lr in rates:
        grid.rows.append([value_text(lr), *(delta_text(at[opt, lr]) for opt in optimizers)])
    grid.notes = [delta_note(exp, {p: {"macro_f1": d} for p, d in deltas.items()})]
    report.view(grid)


def heatmap(report: Report, exp: Experiment, rates: list, optimizers: list, matrix: np.ndarray,
            notes: dict) -> None:
    """Figure 8 and its numbers as CSV: test macro F1 (%) per learning rate (rows) x optimizer."""
    heat = Table(f"{exp.name}_heatmap", [])
    heat.records = [{"optim.lr": lr, **{opt: "" if math.isnan(v) else v for opt, v in zip(optimizers, row)}}
                    for lr, row in zip(rates, matrix)]
    report.csv(heat)
    path = heatmap_png(matrix, [value_text(lr) for lr in rates], optimizers, notes,
                       report.out / f"{exp.name}_heatmap.png", f"{exp.title}: test macro F1 (%)")
    report.figure(path, "test macro F1 per optimizer and learning rate")


def grid_cell(report: Report, exp: Experiment, cell: Cell, query: dict) -> str:
    """'98.5 / 98.1', with ± and n over seeds, 'diverged' when no run finished, the study's pair beside."""
    refs = [study(exp.reference, m, query) for m in TEST_METRICS]
    stats_ = [cell.stat(m) for m in TEST_METRICS]
    if not cell.finished:
        text = status_text(cell.trials)
    else:
        text = " / ".join(show(m, s) for m, s in zip(TEST_METRICS, stats_))
        if report.replicated:
            text += f" (n={cell.n_text()})"
    if all(r is not None for r in refs):
        text += " · study " + " / ".join(number(m, 100 * r) for m, r in zip(TEST_METRICS, refs))
    return text


def points_section(report: Report, store: SweepRuns, exp: Experiment, cells: list[Cell]) -> None:
    """One row per grid point: its axis values, test accuracy / macro F1 (Tables 8 and 10) and Δ F1."""
    axes = axes_of(exp)
    found = group_differences(exp, cells, store.predictions)
    table = Table(exp.name, [*(LABELS.get(a, a) for a in axes), *report.n_header(),
                             *(LABELS[m] for m in TEST_METRICS), *([delta_header(exp)] if found else [])])
    for cell in cells:
        query = dict(zip(axes, cell.point))
        record = {**query, "n": len(cell.finished)}
        row = [value_text(v) for v in cell.point] + n_cells(report, cell)
        for metric in TEST_METRICS:
            stat, ref = cell.stat(metric), study(exp.reference, metric, query)
            put(record, metric, metric, stat, ref)
            row.append(show(metric, stat, ref) if cell.finished else status_text(cell.trials))
        if found:
            row.append(delta_text(found[cell.point]["macro_f1"]))
            put_delta(record, found[cell.point])
        record["status"] = "finished" if cell.finished else status_text(cell.trials)
        record["runs"] = cell.run_ids()
        table.rows.append(row)
        table.records.append(record)
    table.notes = interval_notes(exp, cells, found)
    report.table(table)


def other_groups_section(report: Report, spec: SweepSpec, trials: list[Trial]) -> None:
    """Runs of groups the spec has no grid for (TPE samples, tagged 'tpe'): one row per run."""
    known = {exp.name for exp in spec.experiments}
    others = sorted({g for t in trials for g in t.groups} - known)
    axes = list(spec.search.space) or list(RUN_AXES)
    for group in others:
        report.text(f"## Group '{group}'")
        table = Table(f"group_{slug(group)}", ["run", *(LABELS.get(a, a) for a in axes), "status",
                                                LABELS["val_macro_f1"], *(LABELS[m] for m in TEST_METRICS)])
        for trial in (t for t in trials if group in t.groups):
            record = {"run": trial.name, **{a: trial.params.get(a, "") for a in axes}, "status": trial.status}
            row = [trial.name, *(trial.params.get(a, "—") for a in axes), trial.status]
            for metric in ("val_macro_f1", *TEST_METRICS):
                stat = stat_of([trial], metric)
                put(record, metric, metric, stat)
                row.append(show(metric, stat))
            record["runs"] = trial.run_id
            table.rows.append(row)
            table.records.append(record)
        table.notes = [n for n in [value_note([Cell((), trials=[t]) for t in trials if group in t.groups])] if n]
        report.table(table)
