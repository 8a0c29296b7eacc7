"""`python -m trainers run CONFIG.yaml`: one trial from a file, into MLflow.

`python -m trainers serve`: the long-lived trainer of a sweep slot (trainers.process.serve).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from trainers.process.protocol import Done
from trainers.errors import one_line
from trainers.process.serve import execute, read_trial, serve_verb
from trainers.process.side_files import keep_side_files_local


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="run one trial from a YAML config and log it to MLflow")
    run.add_argument("config", type=Path, help="trial config (YAML), e.g. trainers/configs/example.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. --set optim.lr=1e-4 (repeatable)")
    run.add_argument("--result", type=Path, help="write the outcome as JSON here")
    run.add_argument("--log-file", type=Path, help="this trial's log, attached to its run at the end")
    sub.add_parser("serve", help="run trials sent on stdin, one JSON message a line (used by the sweep executor)")
    args = parser.parse_args(argv)
    try:
        return run_verb(args) if args.verb == "run" else serve_verb()
    except KeyboardInterrupt:     # before or after the trial (which says more when it is interrupted)
        print("\ninterrupted", file=sys.stderr)
        return 130


def run_verb(args) -> int:
    """Run the trial, write --result, print the outcome; 0 done, 1 crashed, 2 a bad config or input."""
    import yaml

    from trainers.config import ConfigError

    try:
        cfg = read_trial(args.config, args.set)
    except (OSError, yaml.YAMLError, ConfigError) as err:
        cfg, done = None, Done("error", error=one_line(err), retriable=False)
    else:
        try:
            done = execute(cfg, args.log_file)
        except KeyboardInterrupt:
            print("\ninterrupted: the run is marked KILLED; run the same command again to resume from the last "
                  "finished epoch", file=sys.stderr)
            return 130
    if args.result:
        tracking = {"tracking_uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment} if cfg else {}
        args.result.write_text(json.dumps({**dataclasses.asdict(done), **tracking}))
    return print_outcome(done, cfg)


def print_outcome(done: Done, cfg) -> int:
    """One line for an error (exit 2 for a bad input, 1 for a crash); two for a finished trial (exit 0)."""
    if done.status == "error":
        print(f"error: trial crashed: {done.error}" if done.retriable else f"error: {done.error}", file=sys.stderr)
        return 1 if done.retriable else 2
    from trainers.tracking import tracking_uri

    summary = ", ".join(f"{k} {v:.4f}" for k, v in done.metrics.items())
    print(f"trial {done.status} in {done.wall_seconds:.1f}s: {summary}")
    print(f"MLflow run {done.run_id} in {tracking_uri(cfg.tracking.uri)} "
          f"(experiment '{cfg.tracking.experiment}'); browse it with `make ui`")
    return 0


if __name__ == "__main__":
    keep_side_files_local()
    sys.exit(main())
