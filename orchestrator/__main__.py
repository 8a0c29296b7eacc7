"""fer-sweep: a YAML sweep spec -> trials -> MLflow. Each verb is one function in VERBS."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from rich.console import Console
from rich.table import Table

from orchestrator.plan import PlannedTrial, estimate_cost, expand, grid_points
from orchestrator.spec import SweepSpec, load_spec
from trainers.config import ConfigError


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
    """Run a sweep end to end: plan, claim and train every trial, promote, then report."""
    return _not_implemented("sweep")


def worker(args: argparse.Namespace) -> int:
    """Join a running sweep: claim and train waiting trials on this host's GPUs."""
    return _not_implemented("worker")


def status(args: argparse.Namespace) -> int:
    """Show a sweep's trials: waiting, running, finished, failed, diverged."""
    return _not_implemented("status")


def promote(args: argparse.Namespace) -> int:
    """Register the sweep's best model and alias it champion if it beats the incumbent."""
    return _not_implemented("promote")


def production(args: argparse.Namespace) -> int:
    """Evaluate the champion on the production data: metrics, slices, drift."""
    return _not_implemented("production")


def report(args: argparse.Namespace) -> int:
    """Write the study's tables and figures for a sweep from MLflow."""
    return _not_implemented("report")


VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plan": plan, "sweep": sweep, "worker": worker, "status": status,
    "promote": promote, "production": production, "report": report,
}


def _add_spec(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="the sweep spec, e.g. sweeps/demo.yaml")


def _add_anything(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


# Each verb's arguments; a verb not listed accepts anything (until it is implemented).
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"plan": _add_spec}


def _not_implemented(verb: str) -> int:
    print(f"error: '{verb}' is not implemented yet", file=sys.stderr)
    return 2


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


# --- entry point ----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """One subcommand per verb; each verb's help is its docstring."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, run in VERBS.items():
        doc = run.__doc__.strip()
        sub = verbs.add_parser(name, help=doc, description=doc)
        ARGUMENTS.get(name, _add_anything)(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one verb; a bad spec or config is one line on stderr, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:
        print("error: " + str(err).replace("\n", " "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
