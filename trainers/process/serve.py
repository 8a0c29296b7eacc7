"""`python -m trainers serve`: one long-lived process per sweep slot.

It reads trainers.process.protocol messages on stdin (a thread keeps reading while a trial runs, so a
`stop` reaches it between epochs), runs each `run` with its output sent to the trial's log, and answers
`started`, `epoch`, `finishing` (a claimed trial, before its run is closed) and `done` on its original
stdout, which nothing else writes to. It saves the ~6 s of imports a fresh process costs. `execute` runs
one trial for both verbs.
"""
from __future__ import annotations

import functools
import gc
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO


from trainers.errors import UserError, one_line
from trainers.process.children import die_with_parent, output_to
from trainers.process.free_space import is_disk_full
from trainers.process.protocol import Done, Finishing, Message, ProtocolError, Run, Stop, Verdict, decode, encode

if TYPE_CHECKING:
    from trainers.config import TrialConfig
    from trainers.run import Settle, Supervisor


def read_trial(config: Path, overrides: list[str]) -> TrialConfig:
    """A trial config from a YAML file with `--set` overrides; OSError, yaml.YAMLError or ConfigError."""
    from trainers.config import from_dict, limited_load, with_overrides

    raw = limited_load(config.read_text(encoding="utf-8")) or {}
    return from_dict(with_overrides(raw, overrides), str(config))


def execute(cfg: TrialConfig, log_file: Path | None = None, supervisor: Supervisor | None = None,
            reuse_data: bool = False, settle: Settle | None = None) -> Done:
    """Run one trial; returns how it ended (status error, retriable or not, when it raised)."""
    from trainers.run import run_trial

    started = time.perf_counter()
    try:
        outcome = run_trial(cfg, log_file, supervisor, reuse_data, settle)
    except Exception as err:
        return _failure(err)
    return Done(outcome.status, outcome.run_id, outcome.metrics, outcome.train_seconds,
                time.perf_counter() - started)


def _failure(err: Exception) -> Done:
    """The `done` of a trial that raised: a full disk stops the sweep; another user error is not retried; a
    crash or out of memory is."""
    if is_disk_full(err):
        return Done("error", error=one_line(err), retriable=True, disk_full=True)
    if isinstance(err, UserError):
        return Done("error", error=one_line(err), retriable=False)
    traceback.print_exc()
    if _out_of_memory(err):
        return Done("error", retriable=True,
                    error=f"out of memory ({one_line(err)[:300]}); lower train.batch_size or model.image_size, "
                          "or run fewer trials per machine (execution.jobs, execution.trials_per_gpu)")
    return Done("error", error=f"{type(err).__name__}: {one_line(err)}", retriable=True)


class Pipe:
    """The trainer's end of the protocol: a thread reads stdin (runs are queued, a stop is noted for the
    running trial, a verdict goes to the trial waiting for it); answers go to `answers`, a copy of the
    original stdout, one whole line at a time."""

    def __init__(self, requests: TextIO, answers: TextIO):
        self.answers = answers
        self.runs: queue.Queue[Run | None] = queue.Queue()
        self.verdicts: queue.Queue[bool] = queue.Queue()
        self.stop_reason: str | None = None
        self.lock = threading.Lock()         # the reader thread may answer while a trial sends epochs
        threading.Thread(target=self._read, args=(requests,), daemon=True).start()

    def _read(self, requests: TextIO) -> None:
        for line in requests:
            if not line.strip():
                continue
            try:
                message = decode(line)
            except ProtocolError as err:
                self._give_up(err)
            if isinstance(message, Stop):
                self.stop_reason = message.reason
            elif isinstance(message, Run):
                self.stop_reason = None      # a stop read before this run was meant for the trial before
                self.runs.put(message)
            elif isinstance(message, Verdict):
                self.verdicts.put(message.kept)
        self.runs.put(None)                  # stdin closed: the sweep is done with this process
        self.verdicts.put(False)             # no sweep left to record a result: never claim it finished

    def _give_up(self, err: ProtocolError) -> NoReturn:
        """The other end speaks another version: answer the run in hand (or the next) with an error that
        is not retried, and end this process now (a running trial's run is closed by the sweep)."""
        with self.lock:
            self.answers.write(encode(Done("error", error=f"trainer: {err}", retriable=False)))
            self.answers.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)

    def send(self, message: Message) -> None:
        """Write one answer whole (the trial's thread and the reader both answer)."""
        with self.lock:
            self.answers.write(encode(message))
            self.answers.flush()

    def stop_requested(self) -> str | None:
        """Why the executor asked the running trial to stop, or None."""
        return self.stop_reason

    def settle(self, claim: str, status: str, run_id: str, metrics: dict[str, float]) -> bool:
        """Ask the executor to record how the claimed trial ended; True when its ledger kept the result."""
        self.send(Finishing(claim, status, run_id, metrics))
        return self.verdicts.get()


def serve_verb() -> int:
    """Run trials sent on stdin until it closes, each trial's output in its own log file; then end the
    process at once (os._exit), unless MLflow logs asynchronously. Returns 130 when interrupted."""
    die_with_parent()        # a sweep's trainer ends with the sweep, even one killed by SIGKILL
    pipe = Pipe(sys.stdin, os.fdopen(os.dup(1), "w", buffering=1))
    os.dup2(2, 1)            # outside a trial, whatever a library prints goes to stderr, never onto the pipe
    try:
        _import_trial_modules()  # while the sweep still starts up, not on the first trial's clock
    except Exception:            # a broken install: the first trial meets the same error, in its own log
        pass
    while (request := pipe.runs.get()) is not None:
        try:
            pipe.send(_serve_run(request, pipe))
        except KeyboardInterrupt:    # the sweep is stopping: the run is closed as KILLED, its checkpoint kept
            pipe.send(Done("error", error="interrupted", retriable=True))
            return 130
        _release_memory()
    # Every run is closed and answered: skip the interpreter's ~1.5 s teardown of torch, MLflow and
    # transformers, which the sweep would otherwise wait for at its end.
    if os.environ.get("MLFLOW_ENABLE_ASYNC_LOGGING", "").lower() in ("1", "true"):
        return 0     # MLflow's queues may still hold the last metrics: the normal exit flushes them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve_run(request: Run, pipe: Pipe) -> Done:
    """One `run` request, its output (the attempt's header first) appended to the trial's log."""
    from trainers.config import ConfigError, from_dict

    log = Path(request.log)
    with output_to(log):
        print(f"--- attempt {request.attempt + 1} on {request.worker} at {time.ctime()}", flush=True)
        try:
            cfg = from_dict(request.config, "the sweep's trial config")
        except ConfigError as err:
            return Done("error", error=one_line(err), retriable=False)
        settle = functools.partial(pipe.settle, request.claim) if request.claim else None
        return execute(cfg, log, pipe, reuse_data=True, settle=settle)


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
