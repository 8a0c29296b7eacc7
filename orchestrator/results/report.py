"""The study's tables and figures for one sweep, rebuilt from MLflow alone.

Each experiment group is reported by the shape of its grid, not by its name:
  a `model` axis          -> per-epoch training details and curves, test metrics, per-class
                             metrics and confusion matrices (the study's Tables 2-7, Figures 3, 4, 6, 7)
  optim.name x optim.lr   -> the "acc / F1" grid and a heatmap of test macro F1 (Table 9, Figure 8)
  anything else           -> one row per grid point (train.epochs: Table 8; optim.lr: Table 10)
then the best model per class (Table 11) and the newest production run (Tables 12-13).
A `train.seed` axis, like the spec's seeds, only adds replicates of a point.

Numbers are percentages with one decimal, losses raw with three; a point run over
several seeds shows the mean ± the half-width of its 95% t-interval. Every table is
also written as a CSV of the same numbers, unrounded, with the run ids behind each row.
"""
from __future__ import annotations

import csv
import json
import math
import re
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from scipy import stats

from orchestrator.sweep.plan import experiment_points
from orchestrator.results.runs import child_runs, find_parent_run, groups_of
from orchestrator.sweep.spec import Experiment, SweepSpec, canonical_axis
from trainers.plots import confusion_png, curves_png  # first: it selects the Agg backend
from trainers.config import ModelConfig, to_dict
from trainers.process.side_files import STORE_DIR
from trainers.tracking import no_download_bars
from trainers.errors import UserError

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

__all__ = ["ReportError", "write_report"]

REPORTS_DIR = STORE_DIR / "reports"
CURVE_METRICS = ("train_loss", "train_accuracy", "train_macro_f1", "val_loss", "val_accuracy", "val_macro_f1")
TEST_METRICS = ("test_accuracy", "test_macro_f1")
PER_CLASS = ("recall", "precision", "f1")   # the study's per-class "accuracy" is recall
LABELS = {
    "train_loss": "train loss", "train_accuracy": "train acc", "train_macro_f1": "train F1",
    "val_loss": "val loss", "val_accuracy": "val acc", "val_macro_f1": "val F1",
    "test_accuracy": "test acc", "test_macro_f1": "test F1",
    "recall": "accuracy (recall)", "precision": "precision", "f1": "F1",
    "model": "model", "model.name": "model", "optim.name": "optimizer", "optim.lr": "learning rate",
    "train.epochs": "epochs", "train.seed": "seed",
}
# The params that tell runs of a group without a grid apart (TPE: its search space instead).
RUN_AXES = ("model.name", "optim.name", "optim.lr", "train.epochs", "train.seed")
# Params that say where or how a trial ran, not what it computed (config_hash leaves them out too);
# runs that differ only in these and the seed are replicates of one configuration.
NOT_RESULT_PARAMS = {"train.seed", "train.device", "train.checkpoint_dir", "train.num_threads", "data.cache_dir"}
# The study's numbering for its main (ViT) and baseline (ResNet-50) model.
STUDY_NUMBERS = {
    "vit": {"curves": "Table 2, Figure 3", "per_class": "Table 4, Figure 4"},
    "resnet50": {"curves": "Table 5, Figure 6", "per_class": "Table 7, Figure 7"},
}
# Our production run's metric names, keyed by the names paper.yaml's reference blocks use
# (per class: <name>_<class>). Should the production evaluation rename a metric, map it here.
PRODUCTION_METRICS = {
    "production_accuracy": "production_accuracy", "production_macro_f1": "production_macro_f1",
    "production_precision": "production_precision", "production_recall": "production_recall",
    "production_f1": "production_f1",
}
SLICE_METRIC = re.compile(r"slice_(?P<slice>.+)_(?P<kind>count|accuracy|macro_f1)$")
ONE_SEED_WARNING = ("**One seed per trial.** Differences below the run-to-run noise cannot be read "
                    "from a single seed; list several under `seeds:` to get intervals.")


class ReportError(UserError, RuntimeError):
    """The report cannot be written (e.g. the sweep has no runs); the message says what to do."""


# --- runs and numbers -----------------------------------------------------------------

@dataclass(frozen=True)
class Trial:
    """One child run, as the report needs it."""
    run_id: str
    name: str
    status: str                   # finished | diverged | failed | pruned | running
    groups: tuple[str, ...]
    params: dict[str, str]
    metrics: dict[str, float]

    @classmethod
    def of(cls, run: Run) -> Trial:
        status = run.data.tags.get("status") or run.info.status.lower()
        return cls(run.info.run_id, run.info.run_name or run.info.run_id, status, tuple(groups_of(run)),
                   dict(run.data.params), dict(run.data.metrics))

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def classes(self) -> list[str]:
        return [c for c in self.params.get("data.classes", "").split(",") if c]

    def replicate_key(self) -> frozenset:
        return frozenset((k, v) for k, v in self.params.items() if k not in NOT_RESULT_PARAMS)


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
    return f"{value:g}" if isinstance(value, float) else str(value)


def status_text(trials: list[Trial], counted: bool = False) -> str:
    """Why there is no number: 'diverged' (one kind), '2 failed, 1 diverged' (or when counted), 'not run'."""
    counts = Counter(t.status for t in trials if not t.finished)
    if not counts:
        return "not run"
    if len(counts) == 1 and not counted:
        return next(iter(counts))
    return ", ".join(f"{n} {status}" for status, n in counts.most_common())


# --- the study's reference values -----------------------------------------------------

def same(a, b) -> bool:
    """Spec values and reference keys compare as numbers when both are numbers."""
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return str(a) == str(b)


def study(block, metric: str, query: dict, partial: bool = False) -> float | None:
    """The study's value of ``metric`` at the reference point matching ``query`` (see sweeps/paper.yaml).

    ``partial``: the point may carry keys the query does not name (the study's own best model).
    """
    if not isinstance(block, dict) or metric not in (block.get("metric") or []):
        return None
    index = block["metric"].index(metric)
    for point in block.get("points") or []:
        if not isinstance(point, dict):
            continue
        keys = {canonical_axis(str(k)): v for k, v in point.items() if k != "value"}
        if not partial and set(keys) != set(query):
            continue
        if all(k in keys and same(keys[k], v) for k, v in query.items()):
            values = point.get("value") or []
            return float(values[index]) if index < len(values) else None
    return None


# --- matching runs to grid points -----------------------------------------------------

def flatten(mapping: dict, prefix: str) -> dict[str, object]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def preset_fields(model: ModelConfig) -> dict[str, object]:
    """The model.* params a preset pins: its architecture and every field it sets away from the default."""
    defaults = flatten(to_dict(ModelConfig()), "model")
    fields = flatten(to_dict(model), "model")
    return {k: v for k, v in fields.items() if k == "model.name" or v != defaults[k]}


def param_matches(value, text: str | None) -> bool:
    """Does a spec value equal a logged param (flat_params: str(value), lists joined by commas)?"""
    if text is None:
        return False
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) == text
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return math.isclose(float(text), value, rel_tol=1e-9)
        except ValueError:
            return False
    return str(value) == text


def axis_value(spec: SweepSpec, axis: str, choices, params: dict):
    """Which of an axis' values a run has; for `model`, the most specific preset its params match."""
    if axis != "model":
        return next((c for c in choices if param_matches(c, params.get(axis))), None)
    best, best_size = None, -1
    for preset in choices:
        fields = preset_fields(spec.models[preset]) if preset in spec.models else {"model.name": preset}
        if all(param_matches(v, params.get(k)) for k, v in fields.items()) and len(fields) > best_size:
            best, best_size = preset, len(fields)
    return best


def axes_of(exp: Experiment) -> list[str]:
    """The grid's axes; seeds are replicates, not an axis of any table."""
    return [axis for axis in exp.grid if axis != "train.seed"]


@dataclass
class Cell:
    """One grid point of a group and the runs of it, over seeds and retries."""
    point: tuple
    trials: list[Trial] = field(default_factory=list)

    @property
    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.finished]

    def stat(self, metric: str) -> Stat | None:
        return summarize(t.metrics.get(metric) for t in self.finished)

    def run_ids(self) -> str:
        return ";".join(t.run_id for t in self.finished)


def group_cells(spec: SweepSpec, exp: Experiment, trials: list[Trial]) -> tuple[list[Cell], list[Trial]]:
    """The group's grid points in spec order, each with its runs; and the group's runs that match none."""
    axes = axes_of(exp)
    cells: dict[tuple, Cell] = {}
    for point in experiment_points(exp):
        key = tuple(point[a] for a in axes)
        cells.setdefault(key, Cell(key))
    stray = []
    for trial in trials:
        if exp.name not in trial.groups:
            continue
        key = tuple(axis_value(spec, a, exp.grid[a], trial.params) for a in axes)
        (cells[key].trials if key in cells else stray).append(trial)
    return list(cells.values()), stray


def label(exp: Experiment, point: tuple) -> str:
    axes = axes_of(exp)
    if len(axes) == 1:
        return value_text(point[0])
    return ", ".join(f"{a}={value_text(v)}" for a, v in zip(axes, point)) or "all"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "all"


# --- output: tables, figures, Markdown ------------------------------------------------

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
    """What one report is made of, while it is being written."""
    spec: SweepSpec
    client: MlflowClient
    out: Path
    scratch: Path                 # downloaded artifacts; thrown away afterwards
    replicated: bool              # some configuration ran over several seeds
    blocks: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def text(self, *lines: str) -> None:
        self.blocks.append("\n".join(lines))

    def table(self, table: Table) -> None:
        self.files.append(table.write(self.out))
        self.blocks.append(table.markdown())

    def figure(self, path: Path, caption: str) -> None:
        self.files.append(path)
        self.blocks.append(f"![{caption}]({path.name})")

    def n_header(self) -> list[str]:
        return ["n"] if self.replicated else []

    def n_cells(self, cell: Cell) -> list[str]:
        """The seed count column, when the sweep has replicates."""
        return [n_text(cell)] if self.replicated else []


def n_text(cell: Cell) -> str:
    """'3', or '2, 1 diverged' when some of the point's runs did not finish."""
    others = [t for t in cell.trials if not t.finished]
    return f"{len(cell.finished)}" + (f", {status_text(others)}" if others else "")


def heatmap_png(matrix: np.ndarray, rows: list[str], cols: list[str], notes: dict, path: Path,
                title: str) -> Path:
    """Test macro F1 (%) per optimizer x learning rate, as the study's Figure 8; empty cells say why."""
    fig, ax = plt.subplots(figsize=(2.2 * len(cols) + 2, 0.9 * len(rows) + 1.8))
    sns.heatmap(matrix, annot=True, fmt=".1f", cmap="viridis", vmin=0, vmax=100, xticklabels=cols,
                yticklabels=rows, cbar_kws={"label": "test macro F1 (%)"}, ax=ax)
    for (i, j), note in notes.items():   # seaborn leaves NaN cells blank
        ax.text(j + 0.5, i + 0.5, note, ha="center", va="center", color="0.3")
    ax.tick_params(axis="y", rotation=0)
    ax.set_xlabel("optimizer")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- sections -------------------------------------------------------------------------

def metric_history(client: MlflowClient, run_id: str, metric: str) -> dict[int, float]:
    """step -> value; a resumed run may log a step twice, the last value wins."""
    history = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def confusion_counts(report: Report, run_ids: list[str]) -> tuple[list[str], np.ndarray] | None:
    """The runs' confusion_matrix.json counts, summed over seeds; None when no run logged one."""
    classes, total = None, None
    for run_id in run_ids:
        folder = report.scratch / run_id
        folder.mkdir(exist_ok=True)
        try:
            with no_download_bars():
                path = report.client.download_artifacts(run_id, "confusion_matrix.json", str(folder))
        except (MlflowException, OSError):
            continue
        body = json.loads(Path(path).read_text())
        counts = np.asarray(body["counts"], dtype=np.int64)
        if total is None:
            classes, total = list(body["classes"]), counts
        elif list(body["classes"]) == classes and counts.shape == total.shape:
            total = total + counts
    return None if total is None else (classes, total)


def architecture(spec: SweepSpec, preset, cell: Cell) -> str:
    if cell.finished:
        return cell.finished[0].params.get("model.name", str(preset))
    return spec.models[preset].name if preset in spec.models else str(preset)


def numbered(title: str, spec: SweepSpec, exp: Experiment, cell: Cell, part: str) -> str:
    """'Training details: vit (Table 2, Figure 3)' for a model the study reports, else without numbers."""
    preset = cell.point[axes_of(exp).index("model")]
    ref = STUDY_NUMBERS.get(architecture(spec, preset, cell), {}).get(part)
    return f"{title}: {label(exp, cell.point)}" + (f" ({ref})" if ref and len(axes_of(exp)) == 1 else "")


def model_sections(report: Report, exp: Experiment, cells: list[Cell]) -> None:
    """Per-epoch details and curves, test metrics, per-class metrics and confusion matrices per model."""
    ran = [c for c in cells if c.finished]
    for cell in cells:
        if not cell.finished:
            report.text(f"{label(exp, cell.point)}: no finished trial ({status_text(cell.trials, counted=True)}).")
    for cell in ran:
        report.text(f"### {numbered('Training details', report.spec, exp, cell, 'curves')}")
        curves_table(report, exp, cell)
    report.text("### Test metrics" + (" (Tables 3, 6)" if len(axes_of(exp)) == 1 else ""))
    test_table(report, exp, ran)
    for cell in ran:
        report.text(f"### {numbered('Per-class test metrics', report.spec, exp, cell, 'per_class')}")
        query = dict(zip(axes_of(exp), cell.point))
        per_class_table(report, f"{exp.name}_per_class_{slug(label(exp, cell.point))}", cell,
                        lambda metric, cls, q=query: study(exp.reference.get("per_class"), f"test_{metric}",
                                                           {**q, "class": cls}))
        confusion_figure(report, f"{exp.name}_confusion_{slug(label(exp, cell.point))}", cell,
                         f"{exp.name}: {label(exp, cell.point)}")


def curves_table(report: Report, exp: Experiment, cell: Cell) -> None:
    """Table 2 / 5 from each run's metric history (step = epoch), and its curves (Figure 3 / 6)."""
    histories = [{m: metric_history(report.client, t.run_id, m) for m in CURVE_METRICS} for t in cell.finished]
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


def test_table(report: Report, exp: Experiment, cells: list[Cell]) -> None:
    """Test accuracy and macro F1 per model (Tables 3 and 6 in one)."""
    axes = axes_of(exp)
    table = Table(f"{exp.name}_test", [*(LABELS.get(a, a) for a in axes), *report.n_header(),
                                       *(LABELS[m] for m in TEST_METRICS)])
    for cell in cells:
        record = {a: v for a, v in zip(axes, cell.point)}
        record["n"] = len(cell.finished)
        row = [value_text(v) for v in cell.point] + report.n_cells(cell)
        stats = [(m, cell.stat(m), study(exp.reference, m, dict(zip(axes, cell.point)))) for m in TEST_METRICS]
        add_row(table, cell, record, row, stats)
    report.table(table)


def add_row(table: Table, cell: Cell, record: dict, row: list, stats: list[tuple]) -> None:
    """Append one row: each (metric, stat, study value) shown in the table and kept in the CSV record."""
    for metric, stat, ref in stats:
        put(record, metric, metric, stat, ref)
        row.append(show(metric, stat, ref))
    record["runs"] = cell.run_ids()
    table.rows.append(row)
    table.records.append(record)


def per_class_table(report: Report, name: str, cell: Cell, reference) -> None:
    """Per class: accuracy (recall), precision, F1 over the cell's runs; reference(metric, class) -> study."""
    table = Table(name, ["class", *report.n_header(), *(LABELS[m] for m in PER_CLASS)])
    classes = cell.finished[0].classes
    for cls in classes:
        record = {"class": cls, "n": len(cell.finished)}
        row = [cls, *report.n_cells(cell)]
        stats = [(m, cell.stat(f"test_{m}_{cls}"), reference(m, cls)) for m in PER_CLASS]
        add_row(table, cell, record, row, stats)
    report.table(table)


def confusion_figure(report: Report, name: str, cell: Cell, title: str) -> None:
    """The confusion matrix (Figures 4 and 7) from the runs' confusion_matrix.json, and its counts as CSV."""
    found = confusion_counts(report, [t.run_id for t in cell.finished])
    if found is None:
        report.text(f"{title}: no confusion_matrix.json logged.")
        return
    classes, counts = found
    table = Table(name, ["true \\ predicted", *classes])
    for cls, row in zip(classes, counts):
        table.records.append({"true": cls, **{c: int(v) for c, v in zip(classes, row)}})
    report.files.append(table.write(report.out))
    seeds = f" (summed over {len(cell.finished)} seeds)" if len(cell.finished) > 1 else ""
    report.figure(confusion_png(counts, tuple(classes), report.out / f"{name}.png", title + seeds),
                  f"confusion matrix: {title}")


def optimizer_lr_section(report: Report, exp: Experiment, cells: list[Cell]) -> None:
    """Table 9: 'acc / F1' per learning rate (rows) x optimizer (columns); Figure 8: heatmap of F1."""
    axes = axes_of(exp)
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
            if f1 is not None:
                matrix[i, j] = 100 * f1.mean
            else:
                notes[(i, j)] = status_text(cell.trials)
        table.rows.append(row)
    for cell in cells:
        record = dict(zip(axes, cell.point))
        record["n"] = len(cell.finished)
        for metric in TEST_METRICS:
            put(record, metric, metric, cell.stat(metric), study(exp.reference, metric, dict(zip(axes, cell.point))))
        record["status"] = "finished" if cell.finished else status_text(cell.trials)
        record["runs"] = cell.run_ids()
        table.records.append(record)
    report.table(table)
    heat = Table(f"{exp.name}_heatmap", [])
    heat.records = [{"optim.lr": lr, **{opt: "" if math.isnan(v) else v for opt, v in zip(optimizers, row)}}
                    for lr, row in zip(rates, matrix)]
    report.files.append(heat.write(report.out))
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
            text += f" (n={n_text(cell)})"
    if all(r is not None for r in refs):
        text += " · study " + " / ".join(number(m, 100 * r) for m, r in zip(TEST_METRICS, refs))
    return text


def points_section(report: Report, exp: Experiment, cells: list[Cell]) -> None:
    """One row per grid point: its axis values and test accuracy / macro F1 (Tables 8 and 10)."""
    axes = axes_of(exp)
    table = Table(exp.name, [*(LABELS.get(a, a) for a in axes), *report.n_header(),
                             *(LABELS[m] for m in TEST_METRICS)])
    for cell in cells:
        query = dict(zip(axes, cell.point))
        record = {**query, "n": len(cell.finished)}
        row = [value_text(v) for v in cell.point] + report.n_cells(cell)
        for metric in TEST_METRICS:
            stat, ref = cell.stat(metric), study(exp.reference, metric, query)
            put(record, metric, metric, stat, ref)
            row.append(show(metric, stat, ref) if cell.finished else status_text(cell.trials))
        record["status"] = "finished" if cell.finished else status_text(cell.trials)
        record["runs"] = cell.run_ids()
        table.rows.append(row)
        table.records.append(record)
    report.table(table)


def experiment_section(report: Report, exp: Experiment, trials: list[Trial]) -> None:
    """One group's tables, chosen by the shape of its grid; a line saying why when nothing finished."""
    cells, stray = group_cells(report.spec, exp, trials)
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
        model_sections(report, exp, cells)
    elif axes == {"optim.name", "optim.lr"}:
        optimizer_lr_section(report, exp, cells)
    else:
        points_section(report, exp, cells)


def other_groups_section(report: Report, trials: list[Trial]) -> None:
    """Runs of groups the spec has no grid for (TPE samples, tagged 'tpe'): one row per run."""
    known = {exp.name for exp in report.spec.experiments}
    others = sorted({g for t in trials for g in t.groups} - known)
    axes = list(report.spec.search.space) or list(RUN_AXES)
    for group in others:
        report.text(f"## Group '{group}'")
        table = Table(f"group_{slug(group)}", ["run", *(LABELS.get(a, a) for a in axes), "status",
                                                LABELS["val_macro_f1"], *(LABELS[m] for m in TEST_METRICS)])
        for trial in (t for t in trials if group in t.groups):
            record = {"run": trial.name, **{a: trial.params.get(a, "") for a in axes}, "status": trial.status}
            row = [trial.name, *(trial.params.get(a, "—") for a in axes), trial.status]
            for metric in ("val_macro_f1", *TEST_METRICS):
                stat = summarize([trial.metrics.get(metric)])
                put(record, metric, metric, stat)
                row.append(show(metric, stat))
            record["runs"] = trial.run_id
            table.rows.append(row)
            table.records.append(record)
        report.table(table)


def best_model_section(report: Report, trials: list[Trial]) -> Cell | None:
    """Table 11: per-class metrics of the best configuration of the promoted model by the promote metric."""
    spec, promote = report.spec, report.spec.promote
    metric = promote.metric
    report.text(f"## Best {promote.model} by {metric} (Table 11)")
    candidates = [t for t in trials if t.finished and is_model(spec, promote.model, t)]
    configs: dict[frozenset, Cell] = {}
    for trial in candidates:
        configs.setdefault(trial.replicate_key(), Cell(())).trials.append(trial)
    scored = [(c.stat(metric).mean, i, c) for i, c in enumerate(configs.values()) if c.stat(metric)]
    if not scored:
        report.text(f"Best {promote.model}: no finished {promote.model} trial with {metric}.")
        return None
    score, _, best = max(scored)
    p = best.finished[0].params
    block = next((e.reference.get("per_class") for e in spec.experiments
                  if "model" not in e.grid and isinstance(e.reference.get("per_class"), dict)), None)
    on_test = " (chosen on the test set, as the study did)" if metric.startswith("test_") else ""
    report.text(f"Chosen among {len(configs)} finished {promote.model} configuration(s) by mean {metric} "
                f"({number(metric, 100 * score)}){on_test}: {p.get('model.name')}, {p.get('optim.name')}, "
                f"lr {p.get('optim.lr')}, epochs {p.get('train.epochs')} "
                f"(runs: {', '.join(t.name for t in best.finished)})."
                + (" The study's values are those of its own best model, picked by test F1." if block else ""))
    per_class_table(report, "best_per_class", best,
                    lambda m, cls: study(block, f"test_{m}", {"class": cls}, partial=True))
    return best


def is_model(spec: SweepSpec, model: str, trial: Trial) -> bool:
    """Is the run of this preset (when the spec defines it) or architecture?"""
    if model in spec.models:
        return axis_value(spec, "model", [model], trial.params) == model
    return trial.params.get("model.name") == model


def newest_production_run(client: MlflowClient, sweep: str) -> Run | None:
    experiment = client.get_experiment_by_name(f"{sweep}-production")
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'production'",
                              run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def production_section(report: Report, best: Cell | None) -> None:
    """Tables 12-13: test vs production for the champion, overall and per class, then slices and drift."""
    report.text("## Production (Tables 12, 13)")
    run = newest_production_run(report.client, report.spec.name)
    if run is None:
        report.text(f"Production: no production run in experiment '{report.spec.name}-production'; "
                    "run `make production` to evaluate the champion.")
        return
    tags, prod = run.data.tags, run.data.metrics
    source = source_trial(report.client, tags.get("source_run_id"))
    note = ""
    if source is None and best is not None:
        source, note = best.finished[0], " Its source trial is not recorded; test numbers are the best trial's."
    test = source.metrics if source else {}
    report.text(f"Model version {tags.get('model_version', '?')} (trial {source.name if source else '?'}), "
                f"production run `{run.info.run_id}`.{note}")
    blocks = {key: next((e.reference[key] for e in report.spec.experiments
                         if isinstance(e.reference.get(key), dict)), None)
              for key in ("production", "production_per_class")}
    report.text("### Test vs production (Table 12)")
    overall = Table("production", ["metric", "test", "production", "change (pp)"])
    for name, shown in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        ref_name = f"production_{name}"
        ref = study(blocks["production"], ref_name, {}, partial=True)
        cells, values = comparison(test.get(f"test_{name}"), prod.get(PRODUCTION_METRICS[ref_name]), ref)
        overall.rows.append([shown, *cells])
        overall.records.append({"metric": name, **values})
    report.table(overall)
    classes = (source.classes if source else []) or production_classes(prod)
    report.text("### Test vs production per class (Table 13)")
    per_class = Table("production_per_class", ["class", "test acc (recall)", "production acc (recall)",
                                               "change (pp)", "test F1", "production F1", "change (pp)"])
    for cls in classes:
        row, record = [cls], {"class": cls}
        for metric in ("recall", "f1"):
            ours = prod.get(f"{PRODUCTION_METRICS['production_' + metric]}_{cls}")
            ref = study(blocks["production_per_class"], f"production_{metric}", {"class": cls}, partial=True)
            cells, values = comparison(test.get(f"test_{metric}_{cls}"), ours, ref)
            row += cells
            record.update({f"{k}_{metric}": v for k, v in values.items()})
        per_class.rows.append(row)
        per_class.records.append(record)
    report.table(per_class)
    slices_and_drift(report, prod)
    confusion = confusion_counts(report, [run.info.run_id])
    if confusion is not None:
        classes_, counts = confusion
        report.figure(confusion_png(counts, tuple(classes_), report.out / "production_confusion.png",
                                    "production"), "confusion matrix: production")


def source_trial(client: MlflowClient, run_id: str | None) -> Trial | None:
    if not run_id:
        return None
    try:
        return Trial.of(client.get_run(run_id))
    except MlflowException:
        return None


def production_classes(metrics: dict) -> list[str]:
    prefix = PRODUCTION_METRICS["production_recall"] + "_"
    return [k[len(prefix):] for k in metrics if k.startswith(prefix)]


def comparison(test: float | None, prod: float | None, ref: float | None) -> tuple[list[str], dict]:
    """Markdown cells 'test | production · study | change' and the CSV values (percent)."""
    pct = {k: None if v is None else 100 * v for k, v in (("test", test), ("production", prod), ("study", ref))}
    change = None if test is None or prod is None else pct["production"] - pct["test"]
    cells = ["—" if pct["test"] is None else f"{pct['test']:.1f}",
             ("—" if pct["production"] is None else f"{pct['production']:.1f}")
             + ("" if ref is None else f" · study {pct['study']:.1f}"),
             "—" if change is None else f"{change:+.1f}"]
    values = {"test": pct["test"], "production": pct["production"], "change": change}
    if ref is not None:
        values["study_production"] = pct["study"]
    return cells, {k: "" if v is None else v for k, v in values.items()}


def slices_and_drift(report: Report, metrics: dict) -> None:
    """Accuracy and macro F1 per attribute slice of the production data, and the drift score."""
    slices: dict[str, dict] = {}
    for key, value in metrics.items():
        found = SLICE_METRIC.match(key)
        if found:
            slices.setdefault(found["slice"], {})[found["kind"]] = value
    if slices:
        table = Table("production_slices", ["slice", "images", "accuracy", "macro F1"])
        for name, values in sorted(slices.items()):
            acc, f1 = values.get("accuracy"), values.get("macro_f1")
            count = values.get("count")
            table.rows.append([name, "—" if count is None else f"{count:.0f}",
                               "—" if acc is None else f"{100 * acc:.1f}", "—" if f1 is None else f"{100 * f1:.1f}"])
            table.records.append({"slice": name, "count": count, "accuracy": None if acc is None else 100 * acc,
                                  "macro_f1": None if f1 is None else 100 * f1})
        report.text("### Production slices")
        report.table(table)
    if "drift_auc" in metrics:
        control = metrics.get("drift_auc_control")
        report.text(f"Drift: a classifier tells training from production images with AUC {metrics['drift_auc']:.3f}"
                    + ("" if control is None else f" (the same classifier on held-out training data: {control:.3f})")
                    + "; 0.5 is indistinguishable, 1.0 fully shifted.")
    if "production_align_failure_rate" in metrics:
        report.text(f"Face alignment fell back to a centre crop on "
                    f"{100 * metrics['production_align_failure_rate']:.1f}% of production images "
                    "(the study: about 5%, against 3% in training).")


# --- the whole report -----------------------------------------------------------------

def safe_uri(uri: str) -> str:
    """The tracking URI without a password."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def header(report: Report, parent: Run, trials: list[Trial]) -> None:
    spec = report.spec
    counts = Counter(t.status for t in trials)
    tally = " · ".join(f"{n} {status}" for status, n in counts.most_common()) or "none"
    report.text(f"# {spec.name}: report")
    if spec.description.strip():
        report.text(spec.description.strip())
    report.text(f"From MLflow `{safe_uri(report.client.tracking_uri)}`, experiment `{spec.name}`, "
                f"parent run `{parent.info.run_id}`; written "
                f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Trials: {tally}.")
    report.text("Numbers are percentages with one decimal (losses: raw, three decimals); a study value is "
                "shown beside ours as `· study 99.0`; per-class \"accuracy\" is recall, as in the study. "
                "Each table's CSV holds the same numbers unrounded and the run ids behind them.")
    if report.replicated:
        report.text("Cells over several seeds show the mean ± the half-width of the 95% t-interval; "
                    "n is the number of finished seeds.")
    else:
        report.text(f"> {ONE_SEED_WARNING}")


def write_report(spec: SweepSpec, client: MlflowClient, out_dir: Path | str | None = None) -> Path:
    """Write <out_dir>/report.md with its CSVs and figures from the sweep's MLflow runs; log them to the parent."""
    parent = find_parent_run(client, spec.name)
    if parent is None:
        raise ReportError(f"no runs for sweep '{spec.name}' in {safe_uri(client.tracking_uri)}; "
                          "run `make sweep` first")
    trials = [Trial.of(run) for run in child_runs(client, spec.name, parent.info.run_id)]
    sizes = Counter(t.replicate_key() for t in trials if t.finished)
    out = Path(out_dir) if out_dir is not None else REPORTS_DIR / spec.name
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        report = Report(spec, client, out, Path(scratch), replicated=any(n > 1 for n in sizes.values()))
        header(report, parent, trials)
        for exp in spec.experiments:
            experiment_section(report, exp, trials)
        other_groups_section(report, trials)
        best = best_model_section(report, trials)
        production_section(report, best)
    path = out / "report.md"
    path.write_text("\n\n".join(report.blocks) + "\n", encoding="utf-8")
    for file in [path, *report.files]:
        client.log_artifact(parent.info.run_id, str(file), artifact_path="report")
    return path
