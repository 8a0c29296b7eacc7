"""Run a sweep's trials on every slot of this host: one long-lived trainer process per slot.

Each slot (a GPU, or a CPU job) claims a trial from the ledger, hands it to its
`python -m trainers serve` process pinned with CUDA_VISIBLE_DEVICES, sends heartbeats while it
runs, and records the outcome. A process that dies is replaced; its trial is retried.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import yaml
from mlflow import MlflowClient

from orchestrator.sweep.ledger import HEARTBEAT_SECONDS, Claim, Ledger
from trainers.process.children import child_env

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) .*val_macro_f1 ([0-9.naninf]+)", re.M)
STOP_GRACE_SECONDS = 60  # after Ctrl-C, a trial has this long to close its run before it is killed


class NewTrials(Protocol):
    """A source of trials sampled at claim time (TPE), which may also prune them per epoch."""

    def new_claim(self) -> Claim | None: ...
    def has_more(self) -> bool: ...
    def report(self, claim: Claim, epoch: int, value: float) -> bool: ...


@dataclass(frozen=True)
class Slot:
    name: str                     # gpu0, gpu1, ... or cpu0, cpu1, ...
    env: dict[str, str]           # CUDA_VISIBLE_DEVICES and thread counts for its process
    threads: int = 0              # torch CPU threads for trials on this slot (0: torch default)


def visible_gpus() -> list[int]:
    """GPU indices from nvidia-smi (no torch import in the orchestrator); [] without a driver."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [int(x) for x in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if x.strip().isdigit()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [i for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def make_slots(gpus: list[int] | None, jobs: int | None) -> list[Slot]:
    """One slot per GPU; without GPUs (or with --jobs), N CPU slots sharing the cores."""
    if jobs is None and gpus is None:
        gpus = visible_gpus()
    if gpus and jobs is None:
        return [Slot(f"gpu{g}", {"CUDA_VISIBLE_DEVICES": str(g)}) for g in gpus]
    jobs = jobs or 1
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return [Slot(f"cpu{i}", env, threads) for i in range(jobs)]


@dataclass
class SlotState:
    """What one slot is doing, for the live table."""
    trial: str = ""
    epoch: int = 0
    epochs: int = 0
    started: float = 0.0
    log_offset: int = 0           # where this attempt's lines start in the trial's log
    run_id: str = ""              # its MLflow run, once the trainer has opened it


@dataclass
class TrialEvent:
    name: str
    status: str                   # finished / diverged / pruned / failed / retried / released
    seconds: float
    detail: str = ""


@dataclass
class Progress:
    """Shared between slot threads and the display."""
    slots: dict[str, SlotState] = field(default_factory=dict)
    events: list[TrialEvent] = field(default_factory=list)
    train_seconds: float = 0.0    # the trainers' own time in epochs, summed over finished trials
    lock: threading.Lock = field(default_factory=threading.Lock)


class TrainerProcess:
    """A `python -m trainers serve` child in its own session (Ctrl-C reaches it only through us)."""

    def __init__(self, slot: Slot):
        env = child_env({**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"})
        self.proc = subprocess.Popen([sys.executable, "-m", "trainers", "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self.answers: queue.Queue = queue.Queue()
        self.jobs = 0                # jobs sent; a process that never had one holds nothing to finish
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.answers.put(line)
        self.answers.put(None)       # end of output: the process exited

    def submit(self, job: dict) -> None:
        self.jobs += 1
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def interrupt(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self, timeout: float = 10) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass     # it already exited
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_trainers(slots: list[Slot]) -> dict[str, TrainerProcess]:
    """One trainer process per slot, started ahead so its imports overlap the sweep's own start-up."""
    return {slot.name: TrainerProcess(slot) for slot in slots}


def stop_trainers(ready: dict[str, TrainerProcess]) -> None:
    """Kill trainer processes started ahead: they hold nothing yet, so no waiting for their imports."""
    for process in ready.values():
        process.kill()
        process.proc.wait()
        process.proc.stdin.close()


class Executor:
    """Claims and runs trials on all slots until the ledger has nothing left to run."""

    def __init__(self, ledger: Ledger, slots: list[Slot], workdir: Path,
                 trial_config: Callable[[Claim, Slot], dict], search: NewTrials | None = None,
                 tracking_uri: str | None = None, ready: dict[str, TrainerProcess] | None = None):
        self.ledger, self.slots, self.workdir = ledger, slots, workdir
        self.trial_config = trial_config     # the plain trial config (tracking included) for a claim
        self.search = search                 # TPE: samples new trials and prunes on epochs
        self.tracking_uri = tracking_uri     # where a dead worker's runs are closed
        self.progress = Progress(slots={s.name: SlotState() for s in slots})
        self.stopping = threading.Event()
        self.ledger_lock = threading.Lock()
        self.host = os.environ.get("FER_WORKER_NAME") or socket.gethostname()    # shown by `status`
        self.ready = dict(ready or {})       # trainer processes started ahead (start_trainers), by slot

    # --- the loop of one slot ------------------------------------------------------------------

    def close_trainers(self) -> None:
        """Stop the trainer processes started ahead that no slot took (the sweep ended before it ran)."""
        stop_trainers(self.ready)
        self.ready = {}

    def run(self) -> None:
        """Start one thread per slot and wait for them (the caller shows progress meanwhile)."""
        self.threads = [threading.Thread(target=self._slot_loop, args=(s,), name=s.name, daemon=True)
                        for s in self.slots]
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def wait(self, poll: float = 0.5) -> None:
        while self.alive():
            time.sleep(poll)

    def stop(self) -> None:
        """Stop claiming; running trials are interrupted and handed back to the queue."""
        self.stopping.set()

    def _slot_loop(self, slot: Slot) -> None:
        process: TrainerProcess | None = self.ready.pop(slot.name, None)
        try:
            while not self.stopping.is_set():
                try:
                    claim = self._claim(slot)
                except Exception as err:     # e.g. a locked or unreachable store: try again shortly
                    print(f"warning: {slot.name} could not claim a trial ({type(err).__name__}: {err}); "
                          "retrying", file=sys.stderr)
                    time.sleep(5.0)
                    continue
                if claim is None:
                    if self._drained():
                        return
                    time.sleep(1.0)
                    continue
                if process is None or not process.alive():
                    process = TrainerProcess(slot)
                try:
                    self._run_claim(slot, claim, process)
                except Exception as err:     # never leave a claimed trial RUNNING behind a dead thread
                    process.kill()
                    process = None
                    with self.ledger_lock:
                        self.ledger.fail(claim, f"{slot.name}: {type(err).__name__}: {err}", retriable=True)
        finally:
            if process is not None and process.jobs:
                process.close()
            elif process is not None:     # never used (nothing left to claim): no waiting for its imports
                stop_trainers({slot.name: process})

    def _claim(self, slot: Slot) -> Claim | None:
        with self.ledger_lock:
            reaped = self.ledger.reap_stale()
            claim = self.ledger.claim()
            if claim is None and self.search is not None:
                claim = self.search.new_claim()
            if claim is not None:
                self.ledger.storage.set_trial_user_attr(claim.trial_id, "worker", f"{self.host}/{slot.name}")
        for trial in reaped:     # a dead worker's runs: KILLED (a retry on its host reopens the run)
            if trial.user_attrs.get("run_id") and self.tracking_uri:
                close_run(self.tracking_uri, trial.user_attrs["run_id"], "KILLED")
        return claim

    def _drained(self) -> bool:
        """Nothing waiting and nothing running anywhere (another worker's crash could queue a retry)."""
        with self.ledger_lock:
            counts = self.ledger.counts()
            more = self.search is not None and self.search.has_more()
        return counts["waiting"] == 0 and counts["running"] == 0 and not more

    def _run_claim(self, slot: Slot, claim: Claim, process: TrainerProcess) -> None:
        raw = self.trial_config(claim, slot)
        name = raw["tracking"]["run_name"]
        work = self.workdir / claim.config_hash
        work.mkdir(parents=True, exist_ok=True)
        paths = {k: work / f for k, f in (("config", "trial.yaml"), ("result", "result.json"),
                                            ("log", "log.txt"), ("stop", "stop"))}
        paths["result"].unlink(missing_ok=True)
        paths["stop"].unlink(missing_ok=True)
        paths["config"].write_text(yaml.safe_dump(raw, sort_keys=False))
        with paths["log"].open("a") as log:
            log.write(f"--- attempt {claim.attempt + 1} on {self.host}/{slot.name} at {time.ctime()}\n")
        started = time.monotonic()
        state = self.progress.slots[slot.name]
        state.trial, state.epoch, state.epochs, state.started = name, 0, raw["train"].get("epochs", 0), started
        state.log_offset = paths["log"].stat().st_size     # earlier attempts' epoch lines are not this one's
        process.submit({k: str(v) for k, v in paths.items()})
        answered = self._watch(claim, process, paths, state, raw)
        state.trial, state.run_id = "", ""
        self._record(claim, name, raw, paths, answered, time.monotonic() - started)

    def _watch(self, claim: Claim, process: TrainerProcess, paths: dict[str, Path], state: SlotState,
               raw: dict) -> bool:
        """Wait for the trial while sending heartbeats and reading its epochs; False if the process died."""
        last_beat, interrupted = 0.0, 0.0
        while True:
            try:
                answer = process.answers.get(timeout=1.0)
            except queue.Empty:
                answer = ""
            if answer is None:
                return False
            if answer:
                return True
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_SECONDS:
                with self.ledger_lock:
                    self.ledger.beat(claim.trial_id)
                self._note_run(claim, state, raw)
                last_beat = now
            self._read_epochs(claim, paths, state)
            if self.stopping.is_set() and not interrupted:
                process.interrupt()
                interrupted = now
            elif interrupted and now - interrupted > STOP_GRACE_SECONDS:
                process.kill()       # it ignored the interrupt; its checkpoint still allows a resume

    def _note_run(self, claim: Claim, state: SlotState, raw: dict) -> None:
        """Once the trainer has opened its MLflow run, record it on the trial (a reaper closes it)."""
        if state.run_id:
            return
        state.run_id = marked_run(raw) or ""
        if state.run_id:
            with self.ledger_lock:
                self.ledger.set_run_id(claim.trial_id, state.run_id)

    def _read_epochs(self, claim: Claim, paths: dict[str, Path], state: SlotState) -> None:
        """Follow the trainer's `epoch k/n ... val_macro_f1 x` lines: progress, and pruning for TPE."""
        try:
            with paths["log"].open("rb") as f:
                f.seek(max(state.log_offset, f.seek(0, os.SEEK_END) - 4096))
                tail = f.read().decode(errors="replace")
        except OSError:
            return
        for match in EPOCH_LINE.finditer(tail):
            epoch, value = int(match.group(1)), float(match.group(3))
            if epoch <= state.epoch:
                continue
            state.epoch = epoch
            if self.search is not None:
                with self.ledger_lock:
                    prune = self.search.report(claim, epoch, value)
                if prune:
                    paths["stop"].write_text("pruned by the median rule")

    def _record(self, claim: Claim, name: str, raw: dict, paths: dict[str, Path], answered: bool,
                seconds: float) -> None:
        """Tell the ledger how the trial ended; close an MLflow run a dead process left RUNNING."""
        result = _read_json(paths["result"]) if answered else None
        if result is None:
            result = {"status": "error", "retriable": True,
                      "error": "the trainer process died (killed, out of memory, or interrupted)"}
        with self.ledger_lock:
            if result["status"] != "error":
                value = result["metrics"].get("val_macro_f1", 0.0) if result["status"] == "finished" else 0.0
                self.ledger.finish(claim, result["status"], value, result.get("run_id"))
                event = TrialEvent(name, result["status"], seconds, _metrics_line(result["metrics"]))
                self.progress.train_seconds += result.get("train_seconds", 0.0)
            elif self.stopping.is_set():
                self.ledger.release(claim)
                event = TrialEvent(name, "released", seconds, "interrupted; resumes on the next run")
            else:
                retried = self.ledger.fail(claim, result["error"], result["retriable"])
                event = TrialEvent(name, "retried" if retried else "failed", seconds, result["error"])
        if result["status"] == "error":
            close_orphan_run(raw, "KILLED" if self.stopping.is_set() else "FAILED")
        with self.progress.lock:
            self.progress.events.append(event)


def marked_run(raw: dict) -> str | None:
    """The MLflow run the trainer noted for this trial under this sweep's parent, if any yet."""
    from trainers.config import from_dict, trial_dir

    saved = _read_json(trial_dir(from_dict(raw)) / "run.json")
    if not saved or saved.get("parent_run_id") != raw["tracking"].get("parent_run_id"):
        return None     # none yet, or another sweep's leftover the trainer will clear
    return saved["run_id"]


def close_orphan_run(raw: dict, status: str) -> None:
    """A trainer killed mid-trial leaves its MLflow run RUNNING: close it (a retry reopens it)."""
    run_id = marked_run(raw)
    if run_id:
        close_run(raw["tracking"]["uri"], run_id, status)


def close_run(uri: str, run_id: str, status: str) -> None:
    """Terminate a run left RUNNING with KILLED or FAILED and tag why; a finished run is left alone."""
    client = MlflowClient(uri)
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
            client.set_tag(run_id, "status", "failed" if status == "FAILED" else "killed")
    except Exception as err:   # the store may be unreachable; the retry will reopen the run anyway
        print(f"warning: could not close run {run_id}: {err}", file=sys.stderr)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _metrics_line(metrics: dict) -> str:
    keys = ("val_macro_f1", "test_accuracy", "test_macro_f1")
    return " ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)
