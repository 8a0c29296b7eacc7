"""How the report writes numbers: mean ± 95% t-interval over seeds, percentages with one decimal
(losses raw, three), and each table as Markdown beside a CSV of the same numbers, unrounded."""
from __future__ import annotations

import csv
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from scipy import stats

LABELS = {
    "train_loss": "train loss", "train_accuracy": "train acc", "train_macro_f1": "train F1",
    "val_loss": "val loss", "val_accuracy": "val acc", "val_macro_f1": "val F1",
    "test_accuracy": "test acc", "test_macro_f1": "test F1",
    "recall": "accuracy (recall)", "precision": "precision", "f1": "F1",
    "model": "model", "model.name": "model", "optim.name": "optimizer", "optim.lr": "learning rate",
    "train.epochs": "epochs", "train.seed": "seed",
}


@dataclass(frozen=True)
class Stat:
    """A metric over a point's seeds: mean, half-width of the 95% t-interval (None for one seed), n."""
    mean: float
    half: float | None
    n: int


def summarize(values) -> Stat | None:
    """Mean ± 95% t-interval of the finite values; None when there are none."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    n = len(values)
    if n == 1:
        return Stat(values[0], None, 1)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Stat(statistics.fmean(values), float(half), n)


def scale(metric: str) -> float:
    """Rates are shown as percentages, losses as they are."""
    return 1.0 if metric.endswith("loss") else 100.0


def number(metric: str, value: float) -> str:
    """A value already in the table's units: three decimals for a loss, one for a percentage."""
    return f"{value:.3f}" if metric.endswith("loss") else f"{value:.1f}"


def show(metric: str, stat: Stat | None, study: float | None = None) -> str:
    """'96.2', '96.2 ± 0.8', with ' · study 99.0' when the study reports the number."""
    text = "—" if stat is None else number(metric, stat.mean * scale(metric))
    if stat is not None and stat.half is not None:
        text += f" ± {number(metric, stat.half * scale(metric))}"
    if study is not None:
        text += f" · study {number(metric, study * scale(metric))}"
    return text


def put(record: dict, column: str, metric: str, stat: Stat | None, study: float | None = None) -> None:
    """A metric's CSV columns, in the units of the Markdown table: value, ci95, study."""
    s = scale(metric)
    record[column] = "" if stat is None else stat.mean * s
    record[f"{column}_ci95"] = "" if stat is None or stat.half is None else stat.half * s
    if study is not None:
        record[f"study_{column}"] = study * s


def value_text(value) -> str:
    """An axis value as a row label: floats in their shortest form (1e-05, 0.001)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def slug(text: str) -> str:
    """A file-name-safe form of a row label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "all"


@dataclass
class Table:
    """A Markdown table and the CSV beside it (the same numbers, unrounded)."""
    name: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + f"\n\n<sub>data: [{self.name}.csv]({self.name}.csv)</sub>"

    def write(self, folder: Path) -> Path:
        columns: dict[str, None] = {}
        for record in self.records:
            columns.update(dict.fromkeys(record))
        path = folder / f"{self.name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
            writer.writeheader()
            writer.writerows(self.records)
        return path


@dataclass
class Report:
    """The document being written: Markdown blocks in order, and the files (CSVs, figures) beside it."""
    out: Path
    replicated: bool              # some configuration ran over several seeds
    blocks: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def text(self, *lines: str) -> None:
        self.blocks.append("\n".join(lines))

    def table(self, table: Table) -> None:
        self.files.append(table.write(self.out))
        self.blocks.append(table.markdown())

    def csv(self, table: Table) -> None:
        """A table written as CSV only (its Markdown form is a figure)."""
        self.files.append(table.write(self.out))

    def figure(self, path: Path, caption: str) -> None:
        self.files.append(path)
        self.blocks.append(f"![{caption}]({path.name})")

    def n_header(self) -> list[str]:
        """The seed count column's header, when the sweep has replicates."""
        return ["n"] if self.replicated else []
