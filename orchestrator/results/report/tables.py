"""How the report writes numbers: mean ± 95% t-interval over seeds, a single run's value with its logged
bootstrap interval `71.0 [68.2, 73.9]`, differences against a reference point `+4.1 [+1.2, +7.0]`
(≈ when the interval holds 0), percentages with one decimal (losses raw, three), and each table as
Markdown beside a CSV of the same numbers, unrounded."""
from __future__ import annotations

import csv
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from scipy import stats

from trainers.stats import excludes_zero

LABELS = {
    "train_loss": "train loss", "train_accuracy": "train acc", "train_macro_f1": "train F1",
    "val_loss": "val loss", "val_accuracy": "val acc", "val_macro_f1": "val F1",
    "test_accuracy": "test acc", "test_macro_f1": "test F1",
    "recall": "accuracy (recall)", "precision": "precision", "f1": "F1",
    "model": "model", "model.name": "model", "optim.name": "optimizer", "optim.lr": "learning rate",
    "train.epochs": "epochs", "train.seed": "seed",
}


NOT_DISTINGUISHABLE = "≈"
DELTA_METRICS = {"macro_f1": "f1", "accuracy": "accuracy"}   # metric -> its CSV stem (delta_f1, ...)


@dataclass(frozen=True)
class Stat:
    """A metric over a point's seeds: mean, half-width of the 95% t-interval (None for one seed), n;
    for one run, low and high are its logged 95% bootstrap interval over the test images, when it has one."""
    mean: float
    half: float | None
    n: int
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Delta:
    """A metric of a point minus the reference point's (fractions), with its 95% interval.

    kind: "bootstrap" (one run each, resampling the test images both hold: n images), "seeds" (runs
    paired by seed, t-interval over n per-seed differences), "reference" (this is the reference point),
    or "" with ``why`` saying why there is no number."""
    value: float | None = None
    low: float | None = None
    high: float | None = None
    kind: str = ""
    n: int = 0
    why: str = "—"

    @property
    def distinguishable(self) -> bool | None:
        """True when the interval lies on one side of 0; None without a number."""
        if self.value is None or self.low is None or self.high is None:
            return None
        return excludes_zero(self.low, self.high)


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
    """'96.2', '96.2 ± 0.8', with ' · study 99.0' when the study reports the number; '—' without a value,
    'n/a' for an undefined one (NaN: a class without images)."""
    if stat is not None and not math.isfinite(stat.mean):
        text, stat = "n/a", None
    else:
        text = "—" if stat is None else number(metric, stat.mean * scale(metric))
    if stat is not None and stat.half is not None:
        text += f" ± {number(metric, stat.half * scale(metric))}"
    elif stat is not None and stat.low is not None and stat.high is not None:
        text += f" [{number(metric, stat.low * scale(metric))}, {number(metric, stat.high * scale(metric))}]"
    if study is not None:
        text += f" · study {number(metric, study * scale(metric))}"
    return text


def put(record: dict, column: str, metric: str, stat: Stat | None, study: float | None = None) -> None:
    """A metric's CSV columns, in the units of the Markdown table: value, ci95, study."""
    s = scale(metric)
    if stat is not None and not math.isfinite(stat.mean):
        stat = None                     # undefined: an empty cell, as no value
    record[column] = "" if stat is None else stat.mean * s
    record[f"{column}_ci95"] = "" if stat is None or stat.half is None else stat.half * s
    low, high = (None, None) if stat is None else \
        (stat.mean - stat.half, stat.mean + stat.half) if stat.half is not None else (stat.low, stat.high)
    record[f"{column}_ci_low"] = "" if low is None else low * s
    record[f"{column}_ci_high"] = "" if high is None else high * s
    if study is not None:
        record[f"study_{column}"] = study * s


def delta_text(delta: Delta) -> str:
    """'+4.1 [+1.2, +7.0]' in percentage points, '-0.3 [-2.0, +1.5] ≈' when the interval holds 0,
    else why there is none ('reference', '—', 'not comparable (different test images)')."""
    if delta.value is None:
        return delta.why
    text = f"{100 * delta.value:+.1f} [{100 * delta.low:+.1f}, {100 * delta.high:+.1f}]"
    return text + (f" {NOT_DISTINGUISHABLE}" if not delta.distinguishable else "")


def put_delta(record: dict, deltas: dict[str, Delta]) -> None:
    """A row's difference columns in percentage points: delta_f1(_low, _high), delta_accuracy(...),
    delta_kind, delta_n, and distinguishable (F1) / distinguishable_accuracy ('' without a number)."""
    for metric, stem in DELTA_METRICS.items():
        delta = deltas.get(metric, Delta())
        for suffix, value in (("", delta.value), ("_low", delta.low), ("_high", delta.high)):
            record[f"delta_{stem}{suffix}"] = "" if value is None else 100 * value
        verdict = delta.distinguishable
        record["distinguishable" if stem == "f1" else f"distinguishable_{stem}"] = \
            "" if verdict is None else str(verdict).lower()
    f1 = deltas.get("macro_f1", Delta())
    record["delta_kind"] = f1.kind or f1.why
    record["delta_n"] = f1.n or ""


def value_text(value) -> str:
    """An axis value as a row label: floats in their shortest form (1e-05, 0.001), lists as [class, group]."""
    if isinstance(value, (list, tuple)) and type(value).__str__ is tuple.__str__:   # not a MappingValue
        return "[" + ", ".join(value_text(v) for v in value) + "]"
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
    notes: list[str] = field(default_factory=list)    # under the table: how to read its intervals

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        notes = "".join(f"\n\n{note}" for note in self.notes)
        # Plain Markdown (MLflow's artifact viewer shows HTML tags such as <sub> as text).
        return "\n".join(lines) + notes + f"\n\n*data: [{self.name}.csv]({self.name}.csv)*"

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

    def view(self, table: Table) -> None:
        """A second Markdown view of numbers already written to the CSV the table names."""
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
