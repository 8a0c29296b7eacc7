"""The report's last sections: the best model per class (Table 11) and the newest production run
(Tables 12-13 read from its degradation.csv, as the production verb computed them; then slices and
drift from its metrics, and its confusion matrix)."""
from __future__ import annotations

import json
import math
import re

from orchestrator.results.drift import drift_verdict
from orchestrator.results.production_tables import (SLICE_HEADERS, SliceRow, auc_text, change_text, most_confused,
                                                    slice_cells, slice_finding, slice_record, slices_from_json,
                                                    taken_for, with_interval)
from orchestrator.results.report.cells import Cell, Trial, best_configuration, configurations, runs_of_model
from orchestrator.results.report.groups import per_class_table
from orchestrator.results.report.references import study, sweep_block
from orchestrator.results.report.store import ProductionRun, SweepRuns
from orchestrator.results.report.tables import Report, Table, number
from orchestrator.sweep.spec import SweepSpec
from trainers.plots import confusion_png

# The drift scores as logged, and the words the drift table shows for each.
DRIFT_ROWS = (("drift_auc", "all (logits + colour grid)"), ("drift_auc_label_robust", "all, label-robust"),
              ("drift_auc_logits", "logits only"), ("drift_auc_pixels", "colour grid only"))
DRIFT_COLUMNS = ("", "_ci_low", "_ci_high", "_control", "_excess", "_excess_ci_low", "_excess_ci_high")
SLICE_METRIC = re.compile(r"slice_(?P<slice>.+)_(?P<kind>count|accuracy|macro_f1)$")
# Table 12's rows: (our name, shown as, degradation.csv's column stem on its "overall" row).
TABLE_12_ROWS = (("accuracy", "accuracy", "accuracy"), ("macro_f1", "macro F1", "f1"))
# Table 13's metrics per class: (our name, degradation.csv's column stem; per class "accuracy" is recall).
TABLE_13_METRICS = (("recall", "accuracy"), ("f1", "f1"))


def best_model_section(report: Report, spec: SweepSpec, trials: list[Trial]) -> Cell | None:
    """Table 11: per-class metrics of the best configuration of the promoted model by the promote metric;
    returns that configuration (None when there is none)."""
    promote = spec.promote
    metric = promote.metric
    report.text(f"## Best {promote.model} by {metric} (Table 11)")
    configs = configurations(runs_of_model(spec, promote.model, [t for t in trials if t.finished]))
    best = best_configuration(configs, metric)
    if best is None:
        report.text(f"Best {promote.model}: no finished {promote.model} trial with {metric}.")
        return None
    score = best.stat(metric).mean
    p = best.finished[0].params
    block = sweep_block(spec, "per_class", skip_model_grids=True)
    on_test = " (chosen on the test set, as the study did)" if metric.startswith("test_") else ""
    report.text(f"Chosen among {len(configs)} finished {promote.model} configuration(s) by mean {metric} "
                f"({number(metric, 100 * score)}){on_test}: {p.get('model.name')}, {p.get('optim.name')}, "
                f"lr {p.get('optim.lr')}, epochs {p.get('train.epochs')} "
                f"(runs: {', '.join(t.name for t in best.finished)})."
                + (" The study's values are those of its own best model, picked by test F1." if block else ""))
    per_class_table(report, "best_per_class", best,
                    lambda m, cls: study(block, f"test_{m}", {"class": cls}, partial=True))
    return best


def production_section(report: Report, store: SweepRuns, spec: SweepSpec, champion: str | None) -> None:
    """Tables 12-13: test vs production for the champion (its trial run id; None: none promoted), overall and
    per class, then slices and drift."""
    report.text("## Production (Tables 12, 13)")
    run = store.production_run(champion)
    if run is None:
        what = "the champion" if champion else "a champion (none is promoted yet: run `make promote` first)"
        report.text(f"Production: no production evaluation of {what} in experiment '{spec.name}-production'; "
                    "run `make production` to evaluate it.")
        return
    source = store.trial(run.tags.get("source_run_id"))
    # Evaluated before it was promoted (as a group's run), the run has no model_version tag: the registry has it.
    version = run.tags.get("model_version") or (store.champion_version(spec.promote.name, spec.promote.alias)
                                                 if run.tags.get("source_run_id") == champion else None)
    report.text(f"Model version {version or '?'} (trial {source.name if source else '?'}), "
                f"production run `{run.run_id}`.")
    if champion is not None and run.tags.get("source_run_id") != champion:
        report.text("No production run of the current champion yet: this is an earlier champion's; run "
                    "`make production` to evaluate the current one.")
    if run.degradation is None:
        report.text("Production: the run logged no degradation.csv; run `make production` again.")
    else:
        degradation_tables(report, spec, run.degradation)
    production_slices(report, store, run)
    slices_and_drift(report, run.metrics)
    confusion = store.confusion_counts([run.run_id])
    if confusion is not None:
        classes, counts = confusion
        report.figure(confusion_png(counts, tuple(classes), report.out / "production_confusion.png",
                                    "production"), "confusion matrix: production")


def degradation_tables(report: Report, spec: SweepSpec, rows: list[dict]) -> None:
    """Tables 12 (overall) and 13 (per class) from the production run's degradation.csv rows."""
    overall_block, per_class_block = (sweep_block(spec, key) for key in ("production", "production_per_class"))
    overall_row = next((r for r in rows if r["class"] == "overall"), {})
    report.text("### Test vs production (Table 12)")
    overall = Table("production", ["metric", "test", "production", "change (pp)"])
    for name, shown, stem in TABLE_12_ROWS:
        ref = study(overall_block, f"production_{name}", {}, partial=True)
        cells, values = comparison(overall_row, stem, ref)
        overall.rows.append([shown, *cells])
        overall.records.append({"metric": name, **values})
    report.table(overall)
    report.text("### Test vs production per class (Table 13)")
    per_class = Table("production_per_class", ["class", "test acc (recall)", "production acc (recall)",
                                               "change (pp)", "test F1", "production F1", "change (pp)"])
    for row in (r for r in rows if r["class"] != "overall"):
        cls = row["class"]
        shown, record = [cls], {"class": cls}
        for metric, stem in TABLE_13_METRICS:
            ref = study(per_class_block, f"production_{metric}", {"class": cls}, partial=True)
            cells, values = comparison(row, stem, ref)
            shown += cells
            record.update({f"{k}_{metric}": v for k, v in values.items()})
        per_class.rows.append(shown)
        per_class.records.append(record)
    report.table(per_class)


def comparison(row: dict, stem: str, ref: float | None) -> tuple[list[str], dict]:
    """Markdown cells 'test | production · study | change' and the CSV values (percent) of one
    degradation.csv row's test_<stem>, production_<stem> and <stem>_change."""
    values = {"test": row.get(f"test_{stem}"), "production": row.get(f"production_{stem}"),
              "change": row.get(f"{stem}_change")}
    # degradation.csv keeps four decimals of a fraction: two of a percentage, and no float noise beyond.
    pct = {k: None if v is None or not math.isfinite(v) else round(100 * v, 2) for k, v in values.items()}

    def shown(key: str, fmt: str) -> str:       # NaN: undefined (a class without images), None: not logged
        value = values[key]
        return "—" if value is None else "n/a" if not math.isfinite(value) else f"{pct[key]:{fmt}}"

    cells = [shown("test", ".1f"), shown("production", ".1f") + ("" if ref is None else f" · study {100 * ref:.1f}"),
             shown("change", "+.1f")]
    if ref is not None:
        pct["study_production"] = 100 * ref
    return cells, {k: "" if v is None else v for k, v in pct.items()}


def drift_table(report: Report, metrics: dict) -> None:
    """Each drift score against its control (held-out images of the champion's data), with the verdict."""
    if "drift_auc" not in metrics:
        return
    table = Table("production_drift", ["features", "production AUC [95%]", "control AUC", "excess [95%]"])
    for name, shown in DRIFT_ROWS:
        m = {k: metrics.get(f"{name}{k}") for k in DRIFT_COLUMNS}
        if m[""] is None:
            continue
        table.rows.append([shown, auc_text(m[""], ".3f", m["_ci_low"], m["_ci_high"]), auc_text(m["_control"]),
                           auc_text(m["_excess"], "+.3f", m["_excess_ci_low"], m["_excess_ci_high"])])
        table.records.append({"score": name, **{f"auc{k}": "" if v is None else v for k, v in m.items()}})
    report.text("### Drift")
    report.text("A classifier tells production images from held-out images of the champion's data (val + test); "
                "its AUC is 0.5 when it cannot. The control is the same classifier on two halves of the held-out "
                "images (no drift by construction), so the excess over it is the drift. The label-robust score "
                "reweights the held-out images to production's mix of predicted classes, so a change of class mix "
                "alone does not count.")
    report.table(table)
    report.text(f"Drift verdict: **{drift_verdict(metrics)}** (drift when the label-robust excess's 95% interval "
                "lies above 0; 'class mix only' when only the plain score's does).")


def production_slices(report: Report, store: SweepRuns, run: ProductionRun) -> None:
    """Per attribute value: production beside the test slice with intervals, per class, and the classes
    each slice loses (from slices.json; only the slice_* metrics of a run logged before it existed)."""
    path = store.download(run.run_id, "slices.json")
    if path is None:
        slice_metrics_table(report, run.metrics)
        return
    rows, classes, note, min_count = slices_from_json(json.loads(path.read_text()))
    if not rows:
        report.text("Production slices: the production data has no metadata attributes to slice by.")
        return
    report.text("### Production slices",
                f"Each attribute value of the production data beside the champion's test images with the same "
                f"value; a slice with under {min_count} images on either side is shown but not judged. "
                "Accuracy and macro F1 carry 95% bootstrap intervals over the slice's images; a class's recall "
                "a 95% Wilson score interval, and its change against the test slice Newcombe's interval for "
                "a difference of two independent proportions. A class *loses* when that change's interval "
                "lies wholly below 0." + (f" Note: {note}." if note else ""))
    table = Table("production_slices", ["slice", *SLICE_HEADERS[2:]])
    for row in rows:
        table.rows.append([row.name, *slice_cells(row, min_count)[2:]])
        record = slice_record(row, min_count)
        table.records.append({"slice": row.name, **{k: _pct(k, v) for k, v in record.items()
                                                    if k not in ("attribute", "value")}})
    report.table(table)
    report.text("Which classes each slice loses against its test slice, and what they are taken for:", "",
                *(f"- {slice_finding(row, classes, min_count)}" for row in rows))
    slice_class_table(report, rows, classes)


def slice_class_table(report: Report, rows: list[SliceRow], classes: tuple[str, ...]) -> None:
    """Per slice and class: recall (with interval) and F1, production beside test, and the class most
    often predicted instead."""
    table = Table("production_slice_classes", ["slice", "class", "images", "recall [95% CI]", "test recall",
                                               "Δ recall [95% CI]", "F1", "test F1", "most often taken for"])
    for row in rows:
        for k, cls in enumerate(classes):
            record = slice_class_record(row, k, classes)
            table.records.append(record)
            table.rows.append([row.name, cls, str(record["count"]),
                               with_interval(row.production.recall[k], row.production.recall_ci[k]),
                               _shown(record["test_recall"]), change_text(*row.recall_change[k]).removeprefix("Δ "),
                               _shown(record["f1"]), _shown(record["test_f1"]), taken_for(row, k, classes) or "—"])
    report.table(table)


def slice_class_record(row: SliceRow, k: int, classes: tuple[str, ...]) -> dict:
    """One class in one slice, in percent (None where undefined): the CSV row of production_slice_classes."""
    p, t = row.production, row.test
    target, share = most_confused(p.confusion, k)
    test_share = None if t is None or target is None else most_confused(t.confusion, k, target)[1]
    d, lo, hi = row.recall_change[k]
    return {"slice": row.name, "class": classes[k], "count": sum(p.confusion[k]), "recall": _in_percent(p.recall[k]),
            "recall_ci_low": _in_percent(p.recall_ci[k][0]), "recall_ci_high": _in_percent(p.recall_ci[k][1]),
            "test_recall": None if t is None else _in_percent(t.recall[k]), "recall_change": _in_percent(d),
            "recall_change_ci_low": _in_percent(lo), "recall_change_ci_high": _in_percent(hi),
            "f1": _in_percent(p.f1[k]), "test_f1": None if t is None else _in_percent(t.f1[k]),
            "taken_for": "" if target is None else classes[target], "taken_for_share": _in_percent(share),
            "test_taken_for_share": _in_percent(test_share)}


def _in_percent(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else 100 * value


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _pct(column: str, value):
    """A slices.csv value in the report's CSV units: rates in percent, counts as they are, n/a empty."""
    if not isinstance(value, float) or column.endswith("count"):
        return value
    return _in_percent(value)


def slice_metrics_table(report: Report, metrics: dict) -> None:
    """Accuracy and macro F1 per slice from the slice_* metrics alone (a run logged before slices.json)."""
    slices: dict[str, dict] = {}
    for key, value in metrics.items():
        found = SLICE_METRIC.match(key)
        if found:
            slices.setdefault(found["slice"], {})[found["kind"]] = value
    if not slices:
        return
    table = Table("production_slices", ["slice", "images", "accuracy", "macro F1"])
    for name, values in sorted(slices.items()):
        acc, f1 = values.get("accuracy"), values.get("macro_f1")
        count = values.get("count")
        table.rows.append([name, "—" if count is None else f"{count:.0f}",
                           "—" if acc is None else f"{100 * acc:.1f}", "—" if f1 is None else f"{100 * f1:.1f}"])
        table.records.append({"slice": name, "count": count, "accuracy": None if acc is None else 100 * acc,
                              "macro_f1": None if f1 is None else 100 * f1})
    report.text("### Production slices", "This production run predates slices.json: no intervals, per-class "
                "metrics or test slices; run `make production` again for them.")
    report.table(table)


def slices_and_drift(report: Report, metrics: dict) -> None:
    """The drift score and the alignment failure rate of the production data."""
    drift_table(report, metrics)
    if "production_align_failure_rate" in metrics:
        report.text(f"Face alignment fell back to a centre crop on "
                    f"{100 * metrics['production_align_failure_rate']:.1f}% of production images "
                    "(the study: about 5%, against 3% in training).")
