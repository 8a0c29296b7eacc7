"""What a production evaluation returns, and its tables as text: CSV and Markdown artifacts, printed cells.

Pure and light to import (no numpy, no MLflow): the CLI's renderers use the same cells as the
Markdown table logged with the production run.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DEGRADATION_COLUMNS = ("class", "test_accuracy", "production_accuracy", "accuracy_change",
                       "test_f1", "production_f1", "f1_change")
DEGRADATION_HEADERS = ("class", "test accuracy (%)", "production accuracy (%)", "change (pts)",
                       "test F1 (%)", "production F1 (%)", "change (pts)")
SLICE_COLUMNS = ("attribute", "value", "count", "accuracy", "macro_f1")


@dataclass
class ProductionResult:
    """What evaluate_production returns: the logged run, the model version and its scores on production data."""
    run_id: str                   # the production run in <sweep>-production
    model_name: str
    version: int
    source_run_id: str
    classes: tuple[str, ...]
    metrics: dict[str, float]
    degradation: list[dict]       # per class, then "overall": test vs production, Tables 12-13
    slices: list[dict]            # attribute, value, count, accuracy, macro_f1
    drift_verdict: str
    confusion: np.ndarray         # counts[true class, predicted class] on the production data


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
    """A fraction as a percentage to one decimal ('n/a' for None); signed for changes in points."""
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


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
