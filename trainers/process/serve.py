"""`python -m trainers serve`: one long-lived process per sweep slot.

It reads one job per line on stdin, runs it with its output sent to the job's log, and answers on
stdout. It saves the ~6 s of imports a fresh process costs. `execute` runs one trial for both verbs.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import yaml

from trainers.errors import UserError
from trainers.process.children import die_with_parent, output_to

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
        if isinstance(err, UserError):
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
