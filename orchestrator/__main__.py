"""fer-sweep: turn a YAML sweep spec into trials, run them, and read the results back from MLflow."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from orchestrator import verbs
from trainers.errors import UserError, one_line
from trainers.process.side_files import STORE_DIR, keep_side_files_local

VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plan": verbs.plan, "sweep": verbs.sweep, "worker": verbs.worker, "status": verbs.status,
    "promote": verbs.promote, "production": verbs.production, "report": verbs.report, "prepare": verbs.prepare,
    "predict": verbs.predict, "serve": verbs.serve,
}


def _add_spec(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="the sweep spec, e.g. sweeps/demo.yaml")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=verbs.DEFAULT_SPEC, help="the sweep spec (default: %(default)s)")
    parser.add_argument("--storage", help="Optuna storage URL shared by workers, e.g. postgresql://user@host/db "
                                          f"(default: sqlite under {STORE_DIR}/)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               f"sqlite under {STORE_DIR}/)")
    parser.add_argument("--gpus", help="GPU indices to use, e.g. 0,1 (default: every visible GPU)")
    parser.add_argument("--jobs", type=int, help="parallel CPU trials when no GPU is used (default: the spec's "
                                                 "execution.jobs)")
    parser.add_argument("--trials-per-gpu", type=int, help="trials side by side on each GPU (default: the spec's "
                                                           "execution.trials_per_gpu)")


def _add_status_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=verbs.DEFAULT_SPEC, help="the sweep spec (default: %(default)s)")
    parser.add_argument("--storage", help=f"Optuna storage URL (default: sqlite under {STORE_DIR}/)")


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=verbs.DEFAULT_SPEC, help="the sweep spec (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               f"sqlite under {STORE_DIR}/)")
    parser.add_argument("--out", help="folder for report.md, its CSVs and figures "
                                      f"(default: {STORE_DIR}/reports/<sweep>)")


def _add_registry_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=verbs.DEFAULT_SPEC, help="the sweep spec (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI, registry included (default: "
                                               f"$MLFLOW_TRACKING_URI, else sqlite under {STORE_DIR}/)")


def _add_promote_options(parser: argparse.ArgumentParser) -> None:
    _add_registry_options(parser)
    parser.add_argument("--replace", action="store_true",
                        help="make the pick champion without comparing it with the incumbent (needed when the "
                             "two were trained on different data, whose validation scores do not compare)")


def _add_production_options(parser: argparse.ArgumentParser) -> None:
    _add_registry_options(parser)
    parser.add_argument("--runs", action="append", metavar="WHICH",
                        help="which runs: champion (the registry alias), all (every finished trial run) or an "
                             "experiment name of the spec; comma-separated or repeated, e.g. --runs "
                             "champion,mitigation (default: the spec's production.evaluate, else champion)")
    parser.add_argument("--fail-on-drift", action="store_true",
                        help="exit with status 3 when any evaluated run's drift verdict is moderate or strong "
                             "(after logging everything), so a scheduler can start a retraining sweep")
    parser.epilog = ("Each run is evaluated once per production data (source run, data digest); a second call "
                     "evaluates nothing new and reads the logged numbers. Exit status: 0 done (whatever the "
                     "drift without --fail-on-drift); 1 some selected run not evaluated (its model or run could "
                     "not be read; the others were); 2 bad spec or arguments, no champion for --runs champion, "
                     "nothing to evaluate; 3 with --fail-on-drift, drift moderate or strong ('class mix only' "
                     "and 'unknown: ...' do not count), also when some run was not evaluated.")


def _add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="URI",
                        help="a registered model, models:/<name>/<version> or models:/<name>@<alias> (default: "
                             "the spec's promote.name @ promote.alias, e.g. models:/fer-vit@champion)")


def _add_predict_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=verbs.DEFAULT_SPEC,
                        help="the sweep spec whose champion labels the photos (default: %(default)s)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="photo files, or folders of them (searched "
                                                                  "recursively; hidden files skipped)")
    _add_model_option(parser)
    parser.add_argument("--out", default="predictions.csv",
                        help="the CSV to write: path, label, p_<class>..., face_found, face box, error "
                             "(default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI, registry included (default: "
                                               f"$MLFLOW_TRACKING_URI, else sqlite under {STORE_DIR}/)")
    parser.epilog = "Exit status: 0 every file labelled; 1 some file was not an image (its row says why); 2 bad " \
                    "arguments or no model."


def _add_prepare_options(parser: argparse.ArgumentParser) -> None:
    _add_spec(parser)
    parser.add_argument("--refresh", action="store_true",
                        help="decode again the images the cache holds as unusable (after a decoder upgrade); "
                             "files that could not be read are never cached and are always read again")


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    _add_registry_options(parser)
    _add_model_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine "
                                                            "only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=5001, help="port (default: %(default)s; make ui uses 5000)")


# Each verb's arguments.
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "plan": _add_spec, "sweep": _add_run_options, "worker": _add_run_options, "status": _add_status_options,
    "report": _add_report_options, "promote": _add_promote_options, "production": _add_production_options,
    "prepare": _add_prepare_options, "predict": _add_predict_options, "serve": _add_serve_options,
}


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
    """Parse the command line and run one verb; a bad spec or config is one line on stderr, exit 2; Ctrl-C
    is one line, exit 130 (a verb that has more to say, as sweep does, says it itself)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        print("error: " + one_line(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    keep_side_files_local()
    sys.exit(main())
