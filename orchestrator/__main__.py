"""fer-sweep: turn a YAML sweep spec into trials, run them, and read the results back from MLflow."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from rich.console import Console
from rich.table import Table

from orchestrator.sweep.plan import PlannedTrial, estimate_cost, expand, grid_points
from orchestrator.sweep.preflight import check_prepare_folders, check_sweep_folders
from orchestrator.sweep.spec import SweepSpec, load_spec
from trainers.config import ConfigError, DataConfig
from trainers.process.side_files import keep_side_files_local


def plan(args: argparse.Namespace) -> int:
    """Check a sweep spec, then print its trials, their count and the estimated cost; runs nothing."""
    spec = load_spec(args.spec)
    trials = expand(spec)
    console = _console()
    console.print(trial_table(spec, trials))
    console.print(count_line(spec, trials))
    if spec.search.method == "tpe":
        console.print(tpe_line(spec))
    for line in cost_lines(estimate_cost(spec, trials)):
        console.print(line)
    return 0


def sweep(args: argparse.Namespace) -> int:
    """Run a sweep end to end (or resume it): every planned trial once, then the report."""
    spec = load_spec(args.spec)
    check_sweep_folders(spec, args.storage, args.tracking_uri)    # before the ledger or any run exists
    from orchestrator.sweep.runner import run_sweep

    try:
        outcome = run_sweep(spec, args.storage, args.tracking_uri, _gpu_list(args.gpus), args.jobs)
    except KeyboardInterrupt:    # while preparing data: no trial had started
        print("\nstopped before any trial started; run the same command again to resume", file=sys.stderr)
        return 130
    _print_outcome(spec, outcome)
    if outcome.interrupted:
        return 130
    _write_report(spec, args.tracking_uri)
    unfinished = outcome.counts.get("waiting", 0) + outcome.counts.get("running", 0)
    return 1 if outcome.counts.get("failed") or unfinished else 0


def worker(args: argparse.Namespace) -> int:
    """Join a started sweep: claim and train waiting trials on this host's slots until none is left."""
    spec = load_spec(args.spec)
    check_sweep_folders(spec, args.storage, args.tracking_uri)
    from orchestrator.sweep.runner import run_sweep

    try:
        outcome = run_sweep(spec, args.storage, args.tracking_uri, _gpu_list(args.gpus), args.jobs, enqueue=False)
    except KeyboardInterrupt:    # while waiting for the sweep to start: nothing was claimed
        print("\nstopped before the sweep started", file=sys.stderr)
        return 130
    _print_outcome(spec, outcome)
    return 130 if outcome.interrupted else 0


def status(args: argparse.Namespace) -> int:
    """Show a sweep's trials: waiting, running, finished, failed, diverged, and who runs what."""
    from trainers.process.side_files import STORE_DIR
    from orchestrator.sweep.runner import SweepError, open_ledger

    spec = load_spec(args.spec)
    if args.storage is None and not (STORE_DIR / "optuna.db").exists():     # reading creates nothing
        raise SweepError(f"no sweep has run from this folder ({STORE_DIR.resolve()} has no optuna.db); start "
                         f"'{spec.name}' with `python -m orchestrator sweep {args.spec}`, or pass --storage")
    ledger = open_ledger(spec, args.storage)
    latest = ledger.latest_by_hash()
    counts = ledger.counts()
    print(f"sweep '{spec.name}' ({ledger.safe_url}): " + ", ".join(
        f"{k} {counts.get(k, 0)}" for k in ("waiting", "running", "finished", "diverged", "pruned", "failed")))
    table = Table(title="trials")
    for column in ("optuna #", "name", "state", "attempt", "host/slot", "run id"):
        table.add_column(column)
    for t in sorted(latest.values(), key=lambda t: t.number):
        state = t.state.name.lower() if t.state.name in ("WAITING", "RUNNING") else t.user_attrs.get("status", "")
        # worker = host/slot: running it now, or where it ran (a waiting retry has none yet)
        table.add_row(str(t.number), t.user_attrs.get("name", ""), state, str(t.user_attrs.get("attempt", 0)),
                      t.user_attrs.get("worker", ""), t.user_attrs.get("run_id", ""))
    _console().print(table)
    return 0


def _gpu_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--gpus: expected GPU indices like 0,1; got '{text}'") from None


def _print_outcome(spec: SweepSpec, outcome) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(outcome.counts.items()))
    print(f"sweep '{spec.name}': {counts}; wall {outcome.wall_seconds:.0f}s, trials' training "
          f"{outcome.train_seconds:.0f}s (summed over slots); parent run {outcome.parent_run_id}")
    if outcome.interrupted:
        print("interrupted: run the same command again to resume; finished trials are kept")


def _write_report(spec: SweepSpec, tracking: str | None, out: str | None = None) -> None:
    """Write the sweep's report from MLflow and say where it is."""
    from mlflow import MlflowClient

    from orchestrator.results.report import write_report
    from trainers.tracking import tracking_uri

    path = write_report(spec, MlflowClient(tracking_uri(tracking)), out)
    print(f"report: {path}\nbrowse the runs with `make ui` (MLflow UI on http://127.0.0.1:5000)")


def promote(args: argparse.Namespace) -> int:
    """Register the sweep's best model and alias it champion if it beats the incumbent."""
    from mlflow import MlflowClient

    from orchestrator.results.registry import promote as promote_best
    from trainers.tracking import tracking_uri

    spec = load_spec(args.spec)
    result = promote_best(spec, MlflowClient(tracking_uri(args.tracking_uri)))
    print(result.message)
    return 0


def production(args: argparse.Namespace) -> int:
    """Evaluate the champion on the production data: metrics, slices, drift."""
    from mlflow import MlflowClient

    from orchestrator.results.production import degradation_table, drift_line, evaluate_production, slice_table
    from trainers.tracking import tracking_uri

    spec = load_spec(args.spec)
    result = evaluate_production(spec, MlflowClient(tracking_uri(args.tracking_uri)))
    console = _console()
    console.print(degradation_table(result))
    console.print(slice_table(result))
    console.print(drift_line(result))
    console.print(f"logged run {result.run_id} in experiment '{spec.name}-production'")
    return 0


def report(args: argparse.Namespace) -> int:
    """Write the study's tables and figures for a sweep from MLflow."""
    _write_report(load_spec(args.spec), args.tracking_uri, args.out)
    return 0


def prepare(args: argparse.Namespace) -> int:
    """Align and cache a spec's data (and production data) ahead of a sweep, then summarise what was found."""
    from trainers.data.dataset import prepare_data

    spec = load_spec(args.spec)
    datasets = datasets_to_prepare(spec, expand(spec))
    check_prepare_folders([cfg for _, cfg, _ in datasets])
    console = _console()
    for title, cfg, size in datasets:
        data = prepare_data(cfg, size)
        console.print(f"{title}: {cfg.source} at {size} px, align {cfg.align}")
        console.print(data_table(data))
        for line in data_lines(cfg, data):
            console.print(line)
    return 0


# Errors about the user's input or set-up: one line, exit 2, no traceback.
USER_ERRORS = ("DataError", "ModelUnavailableError", "SweepError", "RegistryError", "ProductionError", "ReportError",
               "OutputFolderError")

VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plan": plan, "sweep": sweep, "worker": worker, "status": status,
    "promote": promote, "production": production, "report": report, "prepare": prepare,
}


def _add_spec(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="the sweep spec, e.g. sweeps/demo.yaml")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default="sweeps/demo.yaml", help="the sweep spec (default: %(default)s)")
    parser.add_argument("--storage", help="Optuna storage URL shared by workers, e.g. postgresql://user@host/db "
                                          "(default: sqlite under mlruns/)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite under mlruns/)")
    parser.add_argument("--gpus", help="GPU indices to use, e.g. 0,1 (default: every visible GPU)")
    parser.add_argument("--jobs", type=int, help="parallel CPU trials when no GPU is used (default: the spec's "
                                                 "execution.jobs)")


def _add_status_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default="sweeps/demo.yaml", help="the sweep spec (default: %(default)s)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite under mlruns/)")


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default="sweeps/demo.yaml", help="the sweep spec (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite under mlruns/)")
    parser.add_argument("--out", help="folder for report.md, its CSVs and figures (default: mlruns/reports/<sweep>)")


def _add_registry_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default="sweeps/demo.yaml", help="the sweep spec (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI, registry included (default: "
                                               "$MLFLOW_TRACKING_URI, else sqlite under mlruns/)")


# Each verb's arguments.
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "plan": _add_spec, "sweep": _add_run_options, "worker": _add_run_options, "status": _add_status_options,
    "report": _add_report_options, "promote": _add_registry_options, "production": _add_registry_options,
    "prepare": _add_spec,
}


# --- plan output ----------------------------------------------------------------------

def _console() -> Console:
    console = Console()
    # Piped output would be cut to 80 columns; a file or log has room for the whole table.
    return console if console.is_terminal else Console(width=200)


def trial_table(spec: SweepSpec, trials: list[PlannedTrial]) -> Table:
    """One row per unique trial."""
    table = Table(title=f"{spec.name}: {len(trials)} trials")
    for column in ("#", "hash", "name", "groups", "model", "epochs", "optimizer", "lr", "seed"):
        table.add_column(column, justify="right" if column in ("#", "epochs", "lr", "seed") else "left")
    for i, trial in enumerate(trials, 1):
        c = trial.config
        table.add_row(str(i), trial.hash, trial.name, ", ".join(trial.groups), c.model.name,
                      str(c.train.epochs), c.optim.name, f"{c.optim.lr:g}", str(c.train.seed))
    return table


def count_line(spec: SweepSpec, trials: list[PlannedTrial]) -> str:
    """'18 grid points → 15 unique trials', with the seed multiplier when there are several seeds."""
    points = grid_points(spec)
    seeds = len(spec.seeds)
    shown = f"{points} grid points" if seeds == 1 else f"{points} grid points ({points // seeds} × {seeds} seeds)"
    return f"{shown} → {len(trials)} unique trials"


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


# --- prepare output -------------------------------------------------------------------

def datasets_to_prepare(spec: SweepSpec, trials: list[PlannedTrial]) -> list[tuple[str, DataConfig, int]]:
    """Each distinct (data, input size) the trials train on, then the production data at those sizes."""
    from trainers.config import from_dict, to_dict

    seen, out = set(), []
    for t in trials:
        key = (json.dumps(to_dict(t.config.data), sort_keys=True), t.config.model.image_size)
        if key not in seen:
            seen.add(key)
            out.append(("data", t.config.data, t.config.model.image_size))
    if spec.production is not None:
        classes = out[0][1].classes if out else None
        raw = spec.production if "classes" in spec.production or classes is None else \
            {**spec.production, "classes": list(classes)}    # production is evaluated on the model's classes
        production_cfg = from_dict({"data": raw}, spec.path).data
        for size in sorted({size for _, _, size in out}):
            out.append(("production", production_cfg, size))
    return out


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


def data_lines(cfg: DataConfig, data) -> list[str]:
    """Skipped files by reason, dropped labels, alignment failures, near-duplicates across splits."""
    r = data.report

    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

    lines = [f"  skipped: {counts(r.skipped)}", f"  dropped (label not in classes): {counts(r.dropped)}"]
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
    return lines


# --- entry point ----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """One subcommand per verb; each verb's help is its docstring."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, run in VERBS.items():
        doc = run.__doc__.strip()
        sub = verbs.add_parser(name, help=doc, description=doc)
        ARGUMENTS[name](sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one verb; a bad spec or config is one line on stderr, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as err:
        if not isinstance(err, ConfigError) and type(err).__name__ not in USER_ERRORS:
            raise
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    keep_side_files_local()
    sys.exit(main())
