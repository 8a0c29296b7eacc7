"""`python -m trainers run CONFIG.yaml`: one trial from a file, into MLflow.

`python -m trainers serve` keeps one process per sweep slot: it reads one job per line on stdin
({"config", "result", "log", "stop"} paths), runs it with its output sent to the job's log, and
answers {"done": <result path>} on stdout. It saves the ~6 s of imports a fresh process costs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import yaml

from trainers.processes import die_with_parent, output_to
from trainers.side_files import keep_side_files_local

USER_ERRORS = ("ConfigError", "DataError", "ModelUnavailableError", "CheckpointError")


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


def execute(config: Path, overrides: list[str], log_file: Path | None = None,
            stop_file: Path | None = None, reuse_data: bool = False) -> dict:
    """Run one trial; returns its outcome as plain data (status error + retriable on failure)."""
    from trainers.config import ConfigError, from_dict, with_overrides

    started = time.perf_counter()
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        cfg = from_dict(with_overrides(raw, overrides), str(config))
    except (OSError, yaml.YAMLError, ConfigError) as err:
        return {"status": "error", "retriable": False, "error": _one_line(err)}
    from trainers.run import run_trial

    try:
        outcome = run_trial(cfg, log_file, stop_file, reuse_data)
    except Exception as err:
        if type(err).__name__ in USER_ERRORS:
            return {"status": "error", "retriable": False, "error": _one_line(err)}
        traceback.print_exc()
        if _out_of_memory(err):
            return {"status": "error", "retriable": True,
                    "error": f"out of memory ({_one_line(err)[:300]}); lower train.batch_size or model.image_size, "
                             "or run fewer jobs per machine"}
        return {"status": "error", "retriable": True, "error": f"{type(err).__name__}: {_one_line(err)}"}
    return {"status": outcome.status, "run_id": outcome.run_id, "metrics": outcome.metrics,
            "train_seconds": outcome.train_seconds, "wall_seconds": time.perf_counter() - started,
            "tracking_uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment}


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


def serve_verb() -> int:
    """Run jobs from stdin until it closes, each job's output in its own log file; then end the process
    at once (os._exit), unless MLflow logs asynchronously. Returns 130 when interrupted."""
    die_with_parent()        # a sweep's trainer ends with the sweep, even one killed by SIGKILL
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    try:
        _import_trial_modules()  # while the sweep still starts up, not on the first trial's clock
    except Exception:            # a broken install: the first job meets the same error, in its own log
        pass
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        log = Path(job["log"])
        try:
            with output_to(log):
                result = execute(Path(job["config"]), [], log, Path(job["stop"]) if job.get("stop") else None,
                                 reuse_data=True)
        except KeyboardInterrupt:    # the sweep is stopping: the run is closed as KILLED, its checkpoint kept
            Path(job["result"]).write_text(json.dumps({"status": "error", "retriable": True,
                                                       "error": "interrupted"}))
            return 130
        Path(job["result"]).write_text(json.dumps(result))
        answers.write(json.dumps({"done": job["result"]}) + "\n")
        _release_memory()
    # Every run is closed and every result written: skip the interpreter's ~1.5 s teardown of torch,
    # MLflow and transformers, which the sweep would otherwise wait for at its end.
    if os.environ.get("MLFLOW_ENABLE_ASYNC_LOGGING", "").lower() in ("1", "true"):
        return 0     # MLflow's queues may still hold the last metrics: the normal exit flushes them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _import_trial_modules() -> None:
    """Import what every trial needs (torch, MLflow, both model families) up front."""
    import torchvision.models  # noqa: F401
    from transformers import ViTForImageClassification  # noqa: F401

    import trainers.run  # noqa: F401


def _release_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _out_of_memory(err: BaseException) -> bool:
    """A failed allocation: CUDA out of memory, or the CPU allocator refused (a memory limit, no swap)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    keep_side_files_local()
    sys.exit(main())
