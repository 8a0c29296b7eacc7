"""What the verbs print: the plan's tables and cost, the prepared data, a sweep's outcome, the production evaluation."""
from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from orchestrator.results.production_tables import (DEGRADATION_HEADERS, MIN_SLICE_COUNT, OUTCOME_HEADERS,
                                                    SLICE_HEADERS, Outcome, ProductionResult, auc_text,
                                                    degradation_cells, outcome_cells, slice_cells, slice_finding)
from orchestrator.sweep.plan import PlannedTrial, grid_points
from orchestrator.sweep.spec import SweepSpec
from trainers.config import DataConfig
from trainers.data.balance import balance_text, value_text


def console() -> Console:
    console = Console()
    # Piped output would be cut to 80 columns; a file or log has room for the whole table.
    return console if console.is_terminal else Console(width=200)


# A plan of up to TABLE_WHOLE trials is listed whole; a longer one, its first TABLE_HEAD and last TABLE_TAIL
# trials, with one row counting those between. rich lays out ~700 rows a second (10^4 rows: 15 s,
# 10^5: 2.5 min), and a table that long is not read anyway; the count line below it gives the total.
TABLE_WHOLE, TABLE_HEAD, TABLE_TAIL = 60, 20, 10


def trial_table(spec: SweepSpec) -> Table:
    """One row per unique trial of the plan (past TABLE_WHOLE trials, the first and last ones)."""
    table = Table(title=f"{spec.name}: {len(spec.plan)} trials")
    for column in ("#", "hash", "name", "groups", "model", "epochs", "optimizer", "lr", "seed"):
        table.add_column(column, justify="right" if column in ("#", "epochs", "lr", "seed") else "left")
    cut = len(spec.plan) > TABLE_WHOLE
    for i, trial in enumerate(spec.plan[:TABLE_HEAD] if cut else spec.plan, 1):
        table.add_row(*_trial_row(i, trial))
    if cut:
        table.add_row("…", "", f"{len(spec.plan) - TABLE_HEAD - TABLE_TAIL:,} more trials", style="dim")
        tail = len(spec.plan) - TABLE_TAIL
        for i, trial in enumerate(spec.plan[tail:], tail + 1):
            table.add_row(*_trial_row(i, trial))
    return table


def _trial_row(number: int, trial: PlannedTrial) -> tuple[str, ...]:
    c = trial.config
    return (str(number), trial.hash, trial.name, ", ".join(trial.groups), c.model.name, str(c.train.epochs),
            c.optim.name, f"{c.optim.lr:g}", str(c.train.seed))


def count_line(spec: SweepSpec) -> str:
    """'18 grid points → 15 unique trials', with the seed multiplier when there are several seeds."""
    points = grid_points(spec)
    seeds = len(spec.seeds)
    shown = f"{points} grid points" if seeds == 1 else f"{points} grid points ({points // seeds} × {seeds} seeds)"
    return f"{shown} → {len(spec.plan)} unique trials"


def tpe_line(spec: SweepSpec) -> str:
    """The TPE search the ledger will sample at run time."""
    def describe(entry) -> str:
        if isinstance(entry, dict):
            return f"{entry['low']:g}..{entry['high']:g}{' (log)' if entry['log'] else ''}"
        return "{" + ", ".join(map(str, entry)) + "}"
    space = "; ".join(f"{path} in {describe(entry)}" for path, entry in spec.search.space.items())
    return f"TPE: {spec.search.n_trials} trials over space {space}"


def cost_lines(cost: dict) -> list[str]:
    """The estimate in two lines, then its assumptions."""
    trials = cost["trials"] + cost["tpe_trials"]
    lines = [f"estimated cost: {trials} trials, {cost['epochs']} epochs"]
    if cost["flop"] is not None:
        lines[0] += f", {cost['image_epochs']:,} image-epochs, {cost['flop'] / 1e15:.3g} PFLOP"
        lines.append(f"  about {_duration(cost['gpu_hours'])} on one GPU or {_duration(cost['cpu_hours'])} on a CPU")
    return lines + [f"  [dim]assuming {note}[/dim]" for note in cost["assumptions"]]


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{max(1, round(hours * 60))} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def data_table(data) -> Table:
    """Images per class per split."""
    table = Table()
    splits = list(data.report.per_split)
    for column in ("class", *splits, "total"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for c in data.classes:
        counts = [data.report.per_split[s].get(c, 0) for s in splits]
        table.add_row(c, *map(str, counts), str(sum(counts)))
    totals = [sum(data.report.per_split[s].values()) for s in splits]
    table.add_row("all", *map(str, totals), str(sum(totals)))
    return table


def balance_table(balance: dict) -> Group:
    """The training split's balance in a line, then its cells: each value combination's images before and after."""
    table = Table()
    for column in (*balance["by"], "train", "balanced"):
        table.add_column(column, justify="right" if column in ("train", "balanced") else "left")
    for cell in balance["cells"]:
        table.add_row(*map(value_text, cell["values"].values()), f"{cell['before']:,}", f"{cell['after']:,}")
    line = f"  {balance_text(balance)}; a cell grows to at most {balance['max_factor']:g}x its size"
    return Group(Text(line), table)


def data_lines(cfg: DataConfig, data) -> list[str]:
    """Split mode, skipped files by reason, dropped labels, alignment failures, near-duplicates across splits,
    then the data's warnings."""
    r = data.report

    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

    lines = [f"  split mode: {r.split_mode}", f"  skipped: {counts(r.skipped)}",
             f"  dropped (label not in classes): {counts(r.dropped)}"]
    if cfg.align != "none":
        lines.append(f"  alignment: no face found in {r.align_failures} of {r.usable} images "
                     f"({100 * r.align_failures / max(r.usable, 1):.1f}%), centre-cropped instead")
    duplicates = (f"  near-duplicates across splits (perceptual hash within {cfg.duplicate_distance} bits): "
                  f"{counts(r.duplicates)}")
    if cfg.dedupe:
        duplicates += f"; {r.duplicates_removed} removed from val/test"
    elif r.duplicates:
        duplicates += " (set data.dedupe: true to remove the val/test copies)"
    lines.append(duplicates)
    lines.append(f"  cache: {r.decoded} images decoded now, {r.usable} usable")
    return lines + [f"  warning: {w}" for w in r.warnings]


def print_outcome(spec: SweepSpec, outcome) -> None:
    """The sweep's closing line: trial counts, wall and training time, the parent run."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(outcome.counts.items()))
    print(f"sweep '{spec.name}': {counts}; wall {outcome.wall_seconds:.0f}s, trials' training "
          f"{outcome.train_seconds:.0f}s (summed over slots); parent run {outcome.parent_run_id}")
    if outcome.interrupted:
        print("interrupted: run the same command again to resume; finished trials are kept")


def status_table(latest: dict) -> Table:
    """One row per grid point: its latest Optuna trial, state, attempt, where it runs and its MLflow run."""
    table = Table(title="trials")
    for column in ("optuna #", "name", "state", "attempt", "host/slot", "run id"):
        table.add_column(column)
    for t in sorted(latest.values(), key=lambda t: t.number):
        state = t.state.name.lower() if t.state.name in ("WAITING", "RUNNING") else t.user_attrs.get("status", "")
        # worker = host/slot: running it now, or where it ran (a waiting retry has none yet)
        table.add_row(str(t.number), t.user_attrs.get("name", ""), state, str(t.user_attrs.get("attempt", 0)),
                      t.user_attrs.get("worker", ""), t.user_attrs.get("run_id", ""))
    return table


def degradation_table(result: ProductionResult) -> Table:
    """Test vs production per class, then overall (the study's Tables 12-13)."""
    table = Table(title=f"{result.title}: test vs production (Tables 12-13)")
    for i, header in enumerate(DEGRADATION_HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in result.degradation:
        table.add_row(*degradation_cells(row), style="bold" if row["class"] == "overall" else None)
    return table


def slice_table(result: ProductionResult) -> Group:
    """Per attribute value: production with 95% intervals beside the test slice, then, per slice, the
    classes it loses against its test slice and what they are taken for."""
    table = Table(title=f"production slices (test = the model's test images with the same value; "
                        f"under {MIN_SLICE_COUNT} images a side: shown, not judged)")
    for i, header in enumerate(SLICE_HEADERS):
        table.add_column(header, justify="left" if i < 2 or i == len(SLICE_HEADERS) - 1 else "right")
    for row in result.slices:
        table.add_row(*map(Text, slice_cells(row)))
    lines = [result.slice_note] if result.slice_note else []
    lines += [slice_finding(row, result.classes) for row in result.slices]
    return Group(table, *(Text("  " + line) for line in lines))   # Text: no markup in class or slice names


def drift_line(result: ProductionResult) -> str:
    """One line: the verdict, then each drift score against its control (held-out images), with intervals."""
    m = result.metrics
    if "drift_auc" not in m:
        return f"drift: {result.drift_verdict}"
    def excess(name: str) -> str:
        return auc_text(m.get(f"{name}_excess"), "+.3f", m.get(f"{name}_excess_ci_low"), m.get(f"{name}_excess_ci_high"))

    return (f"drift: AUC {auc_text(m['drift_auc'], '.3f', m.get('drift_auc_ci_low'), m.get('drift_auc_ci_high'))} "
            f"vs {auc_text(m.get('drift_auc_control'))} on held-out images "
            f"(excess {excess('drift_auc')}; label-robust excess {excess('drift_auc_label_robust')}; "
            f"logits alone {auc_text(m.get('drift_auc_logits_excess'), '+.3f')}, "
            f"pixels alone {auc_text(m.get('drift_auc_pixels_excess'), '+.3f')}): {result.drift_verdict}")


def outcome_table(outcomes: list[Outcome]) -> Table:
    """One row per evaluated run: test and production macro F1, the change, the drift verdict, its run."""
    table = Table(title="production: every selected run (macro F1; change = production - test)")
    for i, header in enumerate(OUTCOME_HEADERS):
        table.add_column(header, justify="right" if 3 <= i <= 5 else "left")
    for outcome in outcomes:
        table.add_row(*map(Text, outcome_cells(outcome)))
    return table


# Rows a terminal shows of a prediction; the CSV holds them all.
PREDICTION_ROWS_SHOWN = 30


def prediction_table(rows: list[dict], classes: tuple[str, ...]) -> Table:
    """The first PREDICTION_ROWS_SHOWN predictions: file, label and its probability, face found, or the error."""
    more = len(rows) - PREDICTION_ROWS_SHOWN
    table = Table(title=f"{len(rows)} photo(s)", caption=f"... and {more} more in the CSV" if more > 0 else None)
    for column in ("path", "label", "p", "face", "error"):
        table.add_column(column, justify="right" if column == "p" else "left")
    for row in rows[:PREDICTION_ROWS_SHOWN]:
        label = row["label"]
        p = f"{row[f'p_{label}']:.2f}" if label in classes else ""
        face = {True: "found", False: "none: centre crop", None: ""}[row["face_found"]]
        table.add_row(Text(row["path"]), label or "", p, face, Text(row["error"] or ""))
    return table
