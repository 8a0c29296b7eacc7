"""`python -m trainers run CONFIG.yaml`: one trial from a file, into MLflow."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

USER_ERRORS = ("ConfigError", "DataError", "ModelUnavailableError")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="run one trial from a YAML config and log it to MLflow")
    run.add_argument("config", type=Path, help="trial config (YAML), e.g. trainers/configs/example.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. --set optim.lr=1e-4 (repeatable)")
    run.add_argument("--result", type=Path, help="write the outcome as JSON here (used by the orchestrator)")
    run.add_argument("--log-file", type=Path, help="this trial's log, attached to its run at the end")
    args = parser.parse_args(argv)
    return run_verb(args)


def run_verb(args) -> int:
    from trainers.config import ConfigError, from_dict, with_overrides

    try:
        raw = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        cfg = from_dict(with_overrides(raw, args.set), str(args.config))
    except (OSError, yaml.YAMLError, ConfigError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    from trainers.run import run_trial
    from trainers.tracking import tracking_uri

    started = time.perf_counter()
    try:
        outcome = run_trial(cfg, args.log_file)
    except Exception as err:
        if type(err).__name__ in USER_ERRORS:
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return 2
        raise
    wall = time.perf_counter() - started
    if args.result:
        args.result.write_text(json.dumps({"run_id": outcome.run_id, "status": outcome.status,
                                           "metrics": outcome.metrics, "train_seconds": outcome.train_seconds,
                                           "wall_seconds": wall}))
    summary = ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items())
    print(f"trial {outcome.status} in {wall:.1f}s: {summary}")
    print(f"MLflow run {outcome.run_id} in {tracking_uri(cfg.tracking.uri)} "
          f"(experiment '{cfg.tracking.experiment}'); browse it with `make ui`")
    return 0


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
