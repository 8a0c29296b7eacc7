"""The report's "Mitigation (the study's Task 4)" section: for each experiment evaluated in production (the
spec's `production.evaluate`, else any experiment whose every grid point has a production evaluation), one
row per grid point with its production measures and their changes against compare_to (mitigation.py),
the sentence that says which mitigation narrowed which gap, and the rows still to evaluate."""
from __future__ import annotations

from orchestrator.results.production_tables import MIN_SLICE_COUNT
from orchestrator.results.report.cells import Cell, Trial, axes_of, group_cells, status_text
from orchestrator.results.report.comparisons import NOT_DISTINGUISHABLE_NOTE, point_words, reference_label
from orchestrator.results.report.mitigation import (CLASS_F1, DROP, GAP, PRODUCTION_F1, TEST_F1, Mitigation,
                                                    MitigationRow, ProductionEvaluation, latest_evaluations,
                                                    mitigation_table)
from orchestrator.results.report.store import SweepRuns
from orchestrator.results.report.tables import LABELS, Delta, Report, Table, delta_text, put, show, slug, value_text
from orchestrator.sweep.plan import PlannedTrial
from orchestrator.sweep.spec import Experiment, SweepSpec
from trainers.stats import N_RESAMPLES

TITLE = "Mitigation (the study's Task 4)"


def header_of(measure: str) -> str:
    """A measure's column header: 'test F1', 'drop', 'gap group', 'production F1 disgust'."""
    fixed = {TEST_F1: "test F1", PRODUCTION_F1: "production F1", DROP: "drop"}
    if measure in fixed:
        return fixed[measure]
    if measure.startswith(GAP):
        return f"gap {measure[len(GAP):]}"
    return f"production F1 {measure[len(CLASS_F1):]}"


def evaluated_experiments(spec: SweepSpec, plan: list[PlannedTrial], trials: list[Trial],
                          evaluations: list[ProductionEvaluation]) -> list[tuple[Experiment, list[Cell]]]:
    """The experiments the spec's production.evaluate names; when it names none, those over mitigation settings
    (a grid axis under data.balance* or augment.) whose two or more grid points all have a finished run with a
    production evaluation (an ablation evaluated by `--runs all` is no mitigation)."""
    listed = set(spec.production_evaluate)
    every = [(exp, group_cells(spec, plan, exp, trials)[0]) for exp in spec.experiments]
    named = [(exp, cells) for exp, cells in every if exp.name in listed]
    if named:
        return named

    def all_evaluated(cells: list[Cell]) -> bool:
        chosen, _ = latest_evaluations([t for c in cells for t in c.finished], evaluations)
        return len(cells) >= 2 and all(any(t.run_id in chosen for t in c.finished) for c in cells)
    return [(exp, cells) for exp, cells in every if mitigates(exp) and all_evaluated(cells)]


def mitigates(exp: Experiment) -> bool:
    """Whether a grid axis changes what the model trains on: the balance of its data or its augmentation."""
    return any(axis.startswith(("data.balance", "augment.")) for axis in axes_of(exp))


def mitigation_sections(report: Report, store: SweepRuns, spec: SweepSpec, plan: list[PlannedTrial],
                        trials: list[Trial]) -> None:
    """One mitigation section per experiment evaluated in production; nothing when there is none."""
    evaluations = store.production_evaluations()
    chosen = evaluated_experiments(spec, plan, trials, evaluations)
    for exp, cells in chosen:
        found = mitigation_table(exp, cells, evaluations, store.predictions, store.production_predictions)
        several = len(chosen) > 1
        # The group's own section (its test images) is headed by its title; this one by the study's step.
        named = exp.title if exp.title != exp.name else exp.name
        own = several or (exp.title != exp.name and "Task 4" not in exp.title)
        report.text(f"## {TITLE}" + (f": {named}" if own else ""))
        # <group>_production.csv: the group's own table is <group>.csv (or <group>_test.csv).
        mitigation_section(report, spec, found, f"{slug(exp.name)}_production")


def mitigation_section(report: Report, spec: SweepSpec, found: Mitigation, name: str) -> None:
    """The table, how to read it, what it says about the gaps, and the rows still to evaluate."""
    exp = found.experiment
    command = f"run `python -m orchestrator production {spec.path or 'SPEC'} --runs {exp.name}`"
    if not any(row.evaluated for row in found.rows):
        report.text(f"No grid point of '{exp.name}' has a production evaluation yet; {command}.")
        return
    table = Table(name, [*(LABELS.get(a, a) for a in axes_of(exp)), *report.n_header(),
                         *(header_of(m) for m in found.measures)])
    for row in found.rows:
        table.rows.append(row_cells(report, found, row))
        table.records.append(row_record(found, row))
    table.notes = reading_notes(found)
    report.table(table)
    report.text(*findings(found))
    missing = [missing_text(exp, row) for row in found.rows if len(row.evaluated) < len(row.cell.finished)]
    if missing:
        report.text(f"Not evaluated in production: {', '.join(missing)}; {command}.")


def row_label(exp: Experiment, row: MitigationRow) -> str:
    """The row's point in words: 'epochs 2', 'data.balance_by [class, group], augment.occlusion 0.5'."""
    return point_words(dict(zip(axes_of(exp), row.cell.point)))


def missing_text(exp: Experiment, row: MitigationRow) -> str:
    """'epochs 3', or 'epochs 3 (1 of 3 runs evaluated)' when some of its runs are."""
    text = row_label(exp, row)
    if row.evaluated:
        text += f" ({len(row.evaluated)} of {len(row.cell.finished)} runs evaluated)"
    return text


def row_cells(report: Report, found: Mitigation, row: MitigationRow) -> list[str]:
    """One row: the point's axis values, n, then each measure with its change against the reference."""
    point = [value_text(v) for v in row.cell.point]
    if row is found.reference and point:
        point[-1] += " (reference)"
    n = [f"{len(row.evaluated)}"] if report.replicated else []
    if not row.cell.finished:
        return point + n + [status_text(row.cell.trials)] * len(found.measures)
    if not row.evaluated:
        test = show(TEST_F1, row.cell.stat(TEST_F1))
        return point + n + [test] + ["not evaluated"] * (len(found.measures) - 1)
    return point + n + [measure_cell(m, row.values[m], row.deltas[m]) for m in found.measures]


def measure_cell(measure: str, value, delta: Delta) -> str:
    """'62.3 (Δ +4.1 [+1.2, +7.0])'; the reference row's value alone."""
    text = show(measure, value)
    if delta.kind == "reference":
        return text
    return f"{text} (Δ {delta_text(delta)})"


def row_record(found: Mitigation, row: MitigationRow) -> dict:
    """The row's CSV record: each measure in percent with its interval over seeds, and its change with the
    change's interval (percentage points) and whether it excludes 0."""
    exp = found.experiment
    record = {a: value_text(v) for a, v in zip(axes_of(exp), row.cell.point)}
    record["n"] = len(row.evaluated)
    for measure in found.measures:
        put(record, measure, measure, row.values.get(measure))
        delta = row.deltas.get(measure, Delta())
        for suffix, value in (("", delta.value), ("_low", delta.low), ("_high", delta.high)):
            record[f"delta_{measure}{suffix}"] = "" if value is None else 100 * value
        verdict = delta.distinguishable
        record[f"distinguishable_{measure}"] = "" if verdict is None else str(verdict).lower()
    production = row.deltas.get(PRODUCTION_F1, Delta())
    record["delta_kind"] = production.kind or production.why
    record["lost_class"] = found.lost_class or ""
    record["production_digest"] = ";".join(dict.fromkeys(e.production.data_digest for e in row.evaluated))
    record["status"] = ("evaluated" if row.evaluated else "not evaluated") if row.cell.finished else \
        status_text(row.cell.trials)
    record["runs"] = ";".join(e.trial.run_id for e in row.evaluated)
    record["production_runs"] = ";".join(e.production.run_id for e in row.evaluated)
    return record


def reading_notes(found: Mitigation) -> list[str]:
    """Under the table: what each column is, which interval each change carries, and which production data."""
    lost = "" if found.lost_class is None else (
        f"; production F1 {found.lost_class}: the class the reference lost most in production "
        f"(test minus production F1: {100 * found.lost_by:.1f} points)")
    notes = [f"test F1, production F1: macro F1 (%) on the trial's test split and on the production data; drop: "
             f"test minus production F1 (points); gap <attribute>: the best minus the worst production slice of "
             f"the attribute by macro F1 (points), over its values with at least {MIN_SLICE_COUNT} images{lost}."]
    notes.append(delta_reading(found))
    if found.older_digests:
        used = sorted({e.production.data_digest for row in found.rows for e in row.evaluated})
        notes.append(f"Some runs were also evaluated on older production data (digest "
                     f"{', '.join(f'`{d}`' for d in found.older_digests)}): left out; the table uses the newest "
                     f"(digest {', '.join(f'`{d}`' for d in used)}).")
    return notes


def delta_reading(found: Mitigation) -> str:
    """How the changes were computed: paired bootstrap over images, or t over seeds paired by seed."""
    shown = [d for row in found.rows for d in row.deltas.values() if d.value is not None]
    kinds = []
    if any(d.kind == "bootstrap" for d in shown):
        production = sorted({d.n for row in found.rows for m, d in row.deltas.items()
                             if d.kind == "bootstrap" and m != TEST_F1})
        test = sorted({row.deltas[TEST_F1].n for row in found.rows if row.deltas.get(TEST_F1, Delta()).kind
                       == "bootstrap"})
        kinds.append(f"paired bootstrap ({N_RESAMPLES:,} resamples) over the same "
                     f"{'/'.join(map(str, production))} production images for the production measures"
                     + (f" and the same {'/'.join(map(str, test))} test images for test F1" if test else "")
                     + "; the drop's change combines the two, drawn independently")
    seeds = sorted({d.n for d in shown if d.kind == "seeds"})
    if seeds:
        kinds.append(f"t over {'/'.join(map(str, seeds))} seeds paired by seed")
    text = (f"Δ: the measure minus the reference's ({reference_label(found.experiment)}), in percentage points, "
            "with the 95% interval of the difference")
    return text + (": " + "; ".join(kinds) + ". " + NOT_DISTINGUISHABLE_NOTE if kinds else ".")


def findings(found: Mitigation) -> list[str]:
    """Which mitigation narrowed which gap and by how much ('narrowed' only when the change's interval lies
    below 0), or that none did."""
    gaps = [m for m in found.measures if m.startswith(GAP)]
    reference = reference_label(found.experiment)
    if found.reference is None or not found.reference.evaluated:
        return [f"The reference ({reference}) has no production evaluation: no change can be computed."]
    if not gaps:
        return [f"The production images carry no attribute with two or more slices of at least {MIN_SLICE_COUNT} "
                "images: there is no gap to compare."]
    lines, narrowed = [], False
    for row in (r for r in found.rows if r is not found.reference and r.evaluated):
        parts = [gap_finding(m, row, found.reference) for m in gaps]
        narrowed |= any(p.startswith("narrowed") for p in parts)
        lines.append(f"- {row_label(found.experiment, row)}: " + "; ".join(parts) + overall_change(row) + ".")
    lead = (f"Against the reference ({reference}), in production:" if narrowed else
            f"No mitigation measurably narrowed a gap against the reference ({reference}): no change of a gap "
            "has a 95% interval wholly below 0.")
    return [lead, "", *lines] if lines else [lead]


def overall_change(row: MitigationRow) -> str:
    """'; production F1 fell by 25.5 points (Δ ...)' when the change is measurable: a gap can narrow because
    every slice got worse, which is no mitigation. '' otherwise."""
    delta = row.deltas.get(PRODUCTION_F1)
    if delta is None or delta.value is None or not delta.distinguishable:
        return ""
    verb = "rose" if delta.value > 0 else "fell"
    return f"; production F1 {verb} by {100 * abs(delta.value):.1f} points (Δ {delta_text(delta)})"


def gap_finding(measure: str, row: MitigationRow, reference: MitigationRow) -> str:
    """'narrowed the group gap by 12.3 points (20.1 → 7.8; Δ -12.3 [-18.0, -6.5])', 'widened ...', or
    'did not measurably narrow ...'."""
    delta, name = row.deltas[measure], measure[len(GAP):]
    if delta.value is None:
        return f"the {name} gap cannot be compared ({delta.why})"
    before, after = (r.values.get(measure) for r in (reference, row))
    span = "" if before is None or after is None else f"{100 * before.mean:.1f} → {100 * after.mean:.1f}; "
    shown = f"({span}Δ {delta_text(delta)})"
    if delta.distinguishable and delta.value < 0:
        return f"narrowed the {name} gap by {-100 * delta.value:.1f} points {shown}"
    if delta.distinguishable:
        return f"widened the {name} gap by {100 * delta.value:.1f} points {shown}"
    return f"did not measurably narrow the {name} gap {shown}"
