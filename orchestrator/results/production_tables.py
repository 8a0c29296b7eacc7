"""What a production evaluation returns, and its tables as text: CSV and Markdown artifacts, printed cells.

Pure and light to import (no numpy, no MLflow): the CLI's renderers use the same cells as the
Markdown table logged with the production run.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DEGRADATION_COLUMNS = ("class", "test_accuracy", "production_accuracy", "accuracy_change",
                       "test_f1", "production_f1", "f1_change")
DEGRADATION_HEADERS = ("class", "test accuracy (%)", "production accuracy (%)", "change (pts)",
                       "test F1 (%)", "production F1 (%)", "change (pts)")
SLICE_COLUMNS = ("attribute", "value", "count", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1",
                 "macro_f1_ci_low", "macro_f1_ci_high", "test_count", "test_accuracy", "test_macro_f1", "judged")
SLICE_HEADERS = ("attribute", "value", "images", "accuracy (%) [95% CI]", "test acc (%)",
                 "macro F1 (%) [95% CI]", "test F1 (%)", "test images", "judged")
MIN_SLICE_COUNT = 30    # images: a smaller slice (production or test side) is shown but not judged


@dataclass
class ProductionResult:
    """One model's evaluation on production data: the logged run, the model and its scores."""
    run_id: str                   # the production run in <sweep>-production
    model_name: str               # the registered model ("" when the run was never registered)
    version: int | None           # its registered version (None: not registered)
    source_run_id: str
    classes: tuple[str, ...]
    metrics: dict[str, float]
    degradation: list[dict]       # per class, then "overall": test vs production, Tables 12-13
    slices: list[SliceRow]        # per attribute value: production and test slice side by side
    drift_verdict: str
    confusion: np.ndarray         # counts[true class, predicted class] on the production data
    slice_note: str = ""          # why test slices are missing or partial ("" when complete)
    source_name: str = ""         # the trial run's name

    @property
    def title(self) -> str:
        """'fer-vit v3' for a registered version, else the trial run's name."""
        return f"{self.model_name} v{self.version}" if self.version is not None else self.source_name


@dataclass(frozen=True)
class Outcome:
    """One selected run's production evaluation: logged by this call, or found from an earlier one."""
    name: str                     # the trial run's name
    model_label: str              # 'champion fer-vit v3', 'fer-vit v2' or '' (not registered)
    groups: str                   # the trial's experiments, comma-separated (the spec's plan's when it has it)
    run_id: str                   # its run in <sweep>-production
    test_f1: float | None         # the trial's test macro F1
    production_f1: float | None
    production_f1_ci: tuple[float | None, float | None]
    drift_verdict: str
    result: ProductionResult | None = None    # the whole evaluation when this call made it; None: found

    @property
    def evaluated_now(self) -> bool:
        return self.result is not None

    @property
    def drop(self) -> float | None:
        """Production minus test macro F1 (negative: production is worse)."""
        return None if self.test_f1 is None or self.production_f1 is None else self.production_f1 - self.test_f1


OUTCOME_HEADERS = ("run", "model", "groups", "test F1 (%)", "production F1 (%) [95% CI]", "change (pts)", "drift",
                   "production run", "evaluated")


def outcome_cells(outcome: Outcome) -> list[str]:
    """One row of the summary table (OUTCOME_HEADERS)."""
    ci = tuple(math.nan if v is None else v for v in outcome.production_f1_ci)
    production = "n/a" if outcome.production_f1 is None else with_interval(outcome.production_f1, ci)
    return [outcome.name, outcome.model_label, outcome.groups, percent(outcome.test_f1), production,
            percent(outcome.drop, True), outcome.drift_verdict, outcome.run_id,
            "now" if outcome.evaluated_now else "before"]


def outcome_line(outcome: Outcome) -> str:
    """'vit-good: test F1 78.1, production F1 62.0 [57.3, 66.4] (-16.1 pts), drift moderate'; an outcome
    found from an earlier call says so and names its run."""
    _, _, _, test, production, drop, verdict, run_id, _ = outcome_cells(outcome)
    model = f" ({outcome.model_label})" if outcome.model_label else ""
    before = "" if outcome.evaluated_now else f" evaluated before in run {run_id}:"
    return f"{outcome.name}{model}:{before} test F1 {test}, production F1 {production} ({drop} pts), drift {verdict}"


def table_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    """The rows as CSV: floats to 4 decimals, None as an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else f"{row[c]:.4f}" if isinstance(row[c], float) else row[c]
                         for c in columns])
    return buf.getvalue()


def percent(value: float | None, signed: bool = False) -> str:
    """A fraction as a percentage to one decimal ('n/a' for None or NaN: undefined); signed for changes in points."""
    if value is None or value != value:
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def auc_text(value: float | None, fmt: str = ".3f", low: float | None = None, high: float | None = None) -> str:
    """'0.712', or '0.712 [0.655, 0.769]' with an interval; 'n/a' for a score that is missing or NaN."""
    def one(v: float | None) -> str:
        return "n/a" if v is None or v != v else f"{v:{fmt}}"
    if low is None and high is None:
        return one(value)
    return f"{one(value)} [{one(low)}, {one(high)}]"


def degradation_cells(row: dict) -> list[str]:
    """One row as the study prints it: percentages, changes in points."""
    return [row["class"], percent(row["test_accuracy"]), percent(row["production_accuracy"]),
            percent(row["accuracy_change"], True), percent(row["test_f1"]), percent(row["production_f1"]),
            percent(row["f1_change"], True)]


def degradation_markdown(title: str, rows: list[dict]) -> str:
    """Tables 12-13 of the study in one: per-class accuracy (recall) and F1, then overall."""
    lines = [f"# {title}", "",
             "Per class, accuracy is recall (the study's per-class accuracy); the overall row is "
             "accuracy and macro F1. Changes are production minus test, in percentage points.", "",
             "| " + " | ".join(DEGRADATION_HEADERS) + " |", "|" + "---|" * len(DEGRADATION_HEADERS)]
    lines += ["| " + " | ".join(degradation_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- slices ----------------------------------------------------------------------------
# Fractions throughout, NaN where undefined (a class without images has no recall); in JSON, NaN is null.

Interval = tuple[float, float]


@dataclass
class SliceSide:
    """One attribute value's images on one side (production, or the champion's test split)."""
    count: int
    accuracy: float
    accuracy_ci: Interval
    macro_f1: float               # over the spec's classes with a defined F1, as everywhere
    macro_f1_ci: Interval
    recall: list[float]           # per class; NaN for a class without images in the slice
    recall_ci: list[Interval]     # Wilson score intervals
    f1: list[float]               # per class; NaN for a class neither present nor predicted
    confusion: list[list[int]]    # counts[true class][predicted class]


@dataclass
class SliceRow:
    """One attribute value (e.g. group=b): production beside the same value on the test split."""
    attribute: str
    value: str
    production: SliceSide
    test: SliceSide | None                           # None: no test image has this value, or none known
    recall_change: list[tuple[float, float, float]]  # per class: production - test recall, 95% CI (Newcombe)

    @property
    def name(self) -> str:
        return f"{self.attribute}={self.value}"


def unjudged_reason(row: SliceRow, min_count: int = MIN_SLICE_COUNT) -> str | None:
    """Why the slice is shown but not judged (too few images on a side, no test slice); None when judged."""
    if row.production.count < min_count:
        return f"too few to judge ({row.production.count} images, under {min_count})"
    if row.test is None:
        return "no test images with this value to compare with"
    if row.test.count < min_count:
        return f"too few test images to judge ({row.test.count}, under {min_count})"
    return None


def slice_record(row: SliceRow, min_count: int = MIN_SLICE_COUNT) -> dict:
    """The row's SLICE_COLUMNS (fractions; None where undefined) for slices.csv."""
    p, t = row.production, row.test
    return {"attribute": row.attribute, "value": row.value, "count": p.count, "accuracy": _known(p.accuracy),
            "accuracy_ci_low": _known(p.accuracy_ci[0]), "accuracy_ci_high": _known(p.accuracy_ci[1]),
            "macro_f1": _known(p.macro_f1), "macro_f1_ci_low": _known(p.macro_f1_ci[0]),
            "macro_f1_ci_high": _known(p.macro_f1_ci[1]), "test_count": None if t is None else t.count,
            "test_accuracy": None if t is None else _known(t.accuracy),
            "test_macro_f1": None if t is None else _known(t.macro_f1),
            "judged": "yes" if unjudged_reason(row, min_count) is None else "no"}


def slice_cells(row: SliceRow, min_count: int = MIN_SLICE_COUNT) -> list[str]:
    """One slice as printed: percentages with their intervals, the test slice beside them."""
    p, t = row.production, row.test
    reason = unjudged_reason(row, min_count)
    return [row.attribute, row.value, str(p.count), with_interval(p.accuracy, p.accuracy_ci),
            "n/a" if t is None else percent(t.accuracy), with_interval(p.macro_f1, p.macro_f1_ci),
            "n/a" if t is None else percent(t.macro_f1), "0" if t is None else str(t.count),
            "yes" if reason is None else "no: " + reason]


def with_interval(value: float, interval: Interval) -> str:
    """'62.0 [55.0, 69.0]' in percent; 'n/a' for an undefined value."""
    if not math.isfinite(value):
        return "n/a"
    lo, hi = interval
    return percent(value) + ("" if not (math.isfinite(lo) and math.isfinite(hi))
                             else f" [{percent(lo)}, {percent(hi)}]")


def slice_finding(row: SliceRow, classes: tuple[str, ...], min_count: int = MIN_SLICE_COUNT) -> str:
    """The study's question for one slice: which classes lose recall against the test slice, and to what.

    A class loses when the 95% interval of its recall change (production - test) lies wholly below 0.
    """
    head = f"{row.name} ({row.production.count} images)"
    reason = unjudged_reason(row, min_count)
    if reason is not None:
        return f"{head}: {reason}"
    changes = [(d, lo, hi, k) for k, (d, lo, hi) in enumerate(row.recall_change) if math.isfinite(d)]
    losses = sorted(c for c in changes if math.isfinite(c[2]) and c[2] < 0)
    if losses:
        return f"{head}: loses " + "; ".join(_class_loss(row, classes, k) for *_, k in losses)
    if not changes:
        return f"{head}: no class has images on both sides"
    d, lo, hi, k = min(changes)
    return (f"{head}: no class loses recall beyond chance (largest change: {classes[k]} "
            f"{change_text(d, lo, hi)})")


def _class_loss(row: SliceRow, classes: tuple[str, ...], k: int) -> str:
    """'sadness recall 62.0 [55.0, 69.0] of 120 vs test 80.1 of 95 (Δ -18.1 [-27.0, -9.0]), F1 58.0 vs 77.0;
    most often taken for happiness (21.0% of its images; test 5.0%)'."""
    p, t = row.production, row.test
    text = (f"{classes[k]} recall {with_interval(p.recall[k], p.recall_ci[k])} of {sum(p.confusion[k])} vs test "
            f"{percent(t.recall[k])} of {sum(t.confusion[k])} ({change_text(*row.recall_change[k])}), "
            f"F1 {percent(p.f1[k])} vs {percent(t.f1[k])}")
    taken = taken_for(row, k, classes, " of its images")
    return text if taken is None else f"{text}; most often taken for {taken}"


def taken_for(row: SliceRow, k: int, classes: tuple[str, ...], of: str = "") -> str | None:
    """'happiness (21.0%; test 5.0%)': the class that class k's production images are most often predicted
    as, with its share of them and the same share on the test slice; None when none is mistaken."""
    target, share = most_confused(row.production.confusion, k)
    if target is None:
        return None
    test = "" if row.test is None else f"; test {share_text(most_confused(row.test.confusion, k, target)[1])}"
    return f"{classes[target]} ({share_text(share)}{of}{test})"


def most_confused(confusion: list[list[int]], k: int, target: int | None = None) -> tuple[int | None, float | None]:
    """The class that class k's images are most often predicted as (or the given target), and its share of
    class k's images; (None, None) when class k has no images or none is mistaken."""
    row = confusion[k]
    total = sum(row)
    if target is None:
        wrong = [(n, j) for j, n in enumerate(row) if j != k and n > 0]
        if not wrong:
            return None, None
        target = max(wrong)[1]
    return target, (row[target] / total if total else None)


def share_text(share: float | None) -> str:
    """'21.0%', or 'n/a' when the class has no images."""
    return "n/a" if share is None else f"{percent(share)}%"


def change_text(d: float, low: float, high: float) -> str:
    """'Δ -18.1 [-27.0, -9.0]' in percentage points; 'n/a' when undefined."""
    if not math.isfinite(d):
        return "n/a"
    return f"Δ {percent(d, True)} [{percent(low, True)}, {percent(high, True)}]"


def _known(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def slices_json(rows: list[SliceRow], classes: tuple[str, ...], note: str,
                min_count: int = MIN_SLICE_COUNT) -> dict:
    """Everything the slices hold, JSON-ready (NaN as null): slices.json, read back by the report."""
    return {"classes": list(classes), "min_count": min_count, "note": note,
            "slices": [_nulls(asdict(row)) for row in rows]}


def slices_from_json(raw: dict) -> tuple[list[SliceRow], tuple[str, ...], str, int]:
    """slices.json back as rows, classes, the note and the minimum count (null back to NaN)."""
    def side(d):
        if d is None:
            return None
        d = _nans(d)
        return SliceSide(**{**d, "accuracy_ci": tuple(d["accuracy_ci"]), "macro_f1_ci": tuple(d["macro_f1_ci"]),
                            "recall_ci": [tuple(ci) for ci in d["recall_ci"]]})
    rows = [SliceRow(r["attribute"], r["value"], side(r["production"]), side(r["test"]),
                     [tuple(_nans(c)) for c in r["recall_change"]]) for r in raw["slices"]]
    return rows, tuple(raw["classes"]), raw.get("note", ""), int(raw.get("min_count", MIN_SLICE_COUNT))


def _nulls(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulls(v) for v in value]
    return value


def _nans(value):
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: v if k == "confusion" else _nans(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nans(v) for v in value]
    return value


def slice_file_stem(row: SliceRow) -> str:
    """'group=b': the slice's confusion artifact name, safe as a file name."""
    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    return f"{safe(row.attribute)}={safe(row.value)}"
