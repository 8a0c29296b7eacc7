"""`python -m trainers run CONFIG.yaml`: one trial from a file, into MLflow.

`python -m trainers serve`: the long-lived trainer of a sweep slot (trainers.process.serve).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainers.process.serve import execute, serve_verb
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
    sub.add_parser("serve", help="run jobs read from stdin, one JSON line each (used by the sweep executor)")
    args = parser.parse_args(argv)
    return run_verb(args) if args.verb == "run" else serve_verb()


def run_verb(args) -> int:
    try:
        result = execute(args.config, args.set, args.log_file)
    except KeyboardInterrupt:
        print("\ninterrupted: the run is marked KILLED; run the same command again to resume from the last "
              "finished epoch", file=sys.stderr)
        return 130
    if args.result:
        args.result.write_text(json.dumps(result))
    if result["status"] == "error":
        if result["retriable"]:
            print(f"error: trial crashed: {result['error']}", file=sys.stderr)
            return 1
        print(f"error: {result['error']}", file=sys.stderr)
        return 2
    from trainers.tracking import tracking_uri

    summary = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    print(f"trial {result['status']} in {result['wall_seconds']:.1f}s: {summary}")
    print(f"MLflow run {result['run_id']} in {tracking_uri(result['tracking_uri'])} "
          f"(experiment '{result['experiment']}'); browse it with `make ui`")
    return 0


if __name__ == "__main__":
    keep_side_files_local()
    sys.exit(main())
