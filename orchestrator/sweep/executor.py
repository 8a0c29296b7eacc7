"""Run a sweep's trials on every slot of this host: one long-lived trainer process per slot.

Each slot (a GPU, or a CPU job) claims a trial from the ledger, sends it as a `run` message to its
`python -m trainers serve` process pinned with CUDA_VISIBLE_DEVICES, sends heartbeats while it runs,
follows its `started` and `epoch` messages (and sends `stop` when TPE prunes it), records its result in
the ledger when it sends `finishing` (the verdict tells it whether the result was kept, which it is only
while the claim is still the trial's), and then its `done`. A process that dies is replaced, its run
closed by the sweep's run closer; its trial is retried. The claim's token tags the trial's MLflow run from
the moment it is created, so a worker reaping a dead worker's trial finds and closes that run.
"""
from __future__ import annotations

import dataclasses
import os
import queue
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

from orchestrator.sweep.ledger import HEARTBEAT_SECONDS, Claim, Ledger
from orchestrator.sweep.plan import trial_flop
from trainers.config import TrialConfig, to_dict
from trainers.errors import UserError, one_line
from trainers.process.children import child_env
from trainers.process.free_space import DiskFullError
from trainers.process.gpu_share import GPU_SHARE_ENV
from trainers.process.protocol import (Done, Epoch, Finishing, Message, ProtocolError, Run, Started, Stop, Verdict,
                                       decode, encode)
from trainers.tracking import CLAIM_TAG

STOP_GRACE_SECONDS = 60  # after Ctrl-C, a trial has this long to close its run before it is killed


class NewTrials(Protocol):
    """A source of trials sampled at claim time (TPE), which may also prune them per epoch."""

    def new_claim(self) -> Claim | None: ...
    def has_more(self) -> bool: ...
    def report(self, claim: Claim, epoch: int, value: float) -> bool: ...


@dataclass(frozen=True)
class Slot:
    name: str                     # gpu0, gpu1, ...; gpu0.0, gpu0.1, ... with several per GPU; or cpu0, cpu1, ...
    env: dict[str, str]           # CUDA_VISIBLE_DEVICES, the GPU share and thread counts for its process
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


def make_slots(gpus: list[int] | None, jobs: int | None, per_gpu: int = 1) -> list[Slot]:
    """per_gpu slots per GPU (execution.trials_per_gpu); without GPUs (or with --jobs), N CPU slots. Either
    way the host's cores are split evenly between the slots."""
    if jobs is None and gpus is None:
        gpus = visible_gpus()
    if gpus and jobs is None:
        return [gpu_slot(g, k, per_gpu, _threads(len(gpus) * per_gpu)) for g in gpus for k in range(per_gpu)]
    jobs = jobs or 1
    threads = _threads(jobs)
    return [Slot(f"cpu{i}", {"CUDA_VISIBLE_DEVICES": "", **_thread_env(threads)}, threads) for i in range(jobs)]


def gpu_slot(gpu: int, k: int, per_gpu: int, threads: int) -> Slot:
    """The k-th of per_gpu slots pinned to one GPU. Its trainer reads GPU_SHARE_ENV and sizes what it keeps on
    the card (the resident set, its allocator's cap) from a 1/per_gpu share, not from the whole card."""
    name = f"gpu{gpu}" if per_gpu == 1 else f"gpu{gpu}.{k}"
    env = {"CUDA_VISIBLE_DEVICES": str(gpu), GPU_SHARE_ENV: str(per_gpu), **_thread_env(threads)}
    return Slot(name, env, threads)


def _threads(slots: int) -> int:
    return max(1, (os.cpu_count() or 1) // slots)


def _thread_env(threads: int) -> dict[str, str]:
    """What caps a process's math libraries' threads before torch starts (torch.set_num_threads does it after)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


@dataclass
class SlotState:
    """What one slot is doing, for the live table."""
    trial: str = ""
    epoch: int = 0
    epochs: int = 0
    started: float = 0.0
    run_id: str = ""              # its MLflow run, once the trainer has opened it
    cost: float = 0.0             # its FLOPs per dataset image (plan.trial_flop), to weigh the ETA
    resumed_at: int | None = None  # epochs done before this attempt (a checkpoint's), from its first epoch
    committed: Finishing | None = None  # the result the ledger recorded for this attempt (a kept `finishing`)


@dataclass
class TrialEvent:
    name: str
    status: str                   # finished / diverged / pruned / failed / retried / released / superseded
    seconds: float
    detail: str = ""
    cost: float = 0.0             # as SlotState.cost; 0 for a trial that did not run here


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
        self.answers: queue.Queue[Message | ProtocolError | None] = queue.Queue()
        self.jobs = 0                # trials sent; a process that never had one holds nothing to finish
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.answers.put(decode(line))
            except ProtocolError as err:     # the trial fails with it; the process is not trusted again
                self.answers.put(err)
                return
        self.answers.put(None)       # end of output: the process exited

    def send(self, message: Run | Stop | Verdict) -> None:
        """Write one message; a process that already exited is noticed by its end of output instead."""
        if isinstance(message, Run):
            self.jobs += 1
        try:
            self.proc.stdin.write(encode(message))
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def interrupt(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL its process group and reap it, so alive() is False at once and the slot starts a new one."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

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


@dataclass(frozen=True)
class SweepHooks:
    """What the executor asks of its sweep."""
    trial_config: Callable[[Claim, Slot], TrialConfig]   # a claim's whole config, tracking and threads set
    close_run: Callable[[str, str], None]                # (run id, status word): a dead trainer's run, closed
                                                         # killed / failed, or as the ledger recorded it
    search: NewTrials | None = None                      # TPE: samples new trials and prunes on epochs
    # config hash -> (run id, metrics) of the sweep's finished run of it, or None: a trial MLflow already holds
    # finished (its ledger entry lost to a kill) is recorded from there, not run again.
    finished_run: Callable[[str], tuple[str, dict[str, float]] | None] | None = None
    # Raises DiskFullError when a folder the sweep writes is under the free-space reserve (preflight.py).
    check_room: Callable[[], None] | None = None
    # The sweep's trial runs MLflow shows RUNNING, {run id: claim tag}: those of reaped or settled claims are
    # closed (a worker killed before the ledger learnt its run, or between the ledger's record and MLflow's).
    open_runs: Callable[[], dict[str, str]] | None = None


class Executor:
    """Claims and runs trials on all slots until the ledger has nothing left to run."""

    def __init__(self, ledger: Ledger, slots: list[Slot], workdir: Path, hooks: SweepHooks,
                 ready: dict[str, TrainerProcess] | None = None):
        self.ledger, self.slots, self.workdir = ledger, slots, workdir
        self.hooks = hooks
        self.progress = Progress(slots={s.name: SlotState() for s in slots})
        self.stopping = threading.Event()
        self.ledger_lock = threading.Lock()
        self.host = os.environ.get("FER_WORKER_NAME") or socket.gethostname()    # shown by `status`
        self.ready = dict(ready or {})       # trainer processes started ahead (start_trainers), by slot
        self.disk_full: DiskFullError | None = None     # why the sweep stopped early, for run_sweep to raise

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

    def stop(self) -> None:
        """Stop claiming; running trials are interrupted and handed back to the queue."""
        self.stopping.set()

    def _slot_loop(self, slot: Slot) -> None:
        process: TrainerProcess | None = self.ready.pop(slot.name, None)
        try:
            while not self.stopping.is_set():
                if self._stop_if_disk_full():
                    return
                try:
                    claim = self._claim(slot)
                except Exception as err:     # e.g. a locked or unreachable store: try again shortly
                    print(f"warning: {slot.name} could not claim a trial ({type(err).__name__}: {err}); "
                          "retrying", file=sys.stderr)
                    time.sleep(5.0)
                    continue
                if claim is None:
                    if self._drained():
                        self._close_settled_runs()
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
                    self._abandon(slot, claim, err)
        finally:
            if process is not None and process.jobs:
                process.close()
            elif process is not None:     # never used (nothing left to claim): no waiting for its imports
                stop_trainers({slot.name: process})

    def _abandon(self, slot: Slot, claim: Claim, err: Exception) -> None:
        """After the slot's own code raised mid-trial (its trainer killed): close the run the trainer had open,
        clear the slot, and fail the claim for a retry. A store that refuses these too gets a warning line:
        the trial's heartbeats have stopped, so a reaper queues it again and closes its run."""
        state = self.progress.slots[slot.name]
        problem = f"{slot.name}: {type(err).__name__}: {one_line(err)}"
        try:
            if state.run_id:        # (close_run warns, never raises, on a store it cannot reach)
                word = state.committed.status if state.committed else "killed" if self.stopping.is_set() else "failed"
                self.hooks.close_run(state.run_id, word)
            with self.ledger_lock:
                self.ledger.fail(claim, problem, retriable=True)
        except Exception as again:
            print(f"warning: trial {claim.config_hash} left for a reaper after {problem}: "
                  f"{type(again).__name__}: {one_line(again)}", file=sys.stderr, flush=True)
        finally:
            state.trial, state.run_id, state.committed = "", "", None

    def _claim(self, slot: Slot) -> Claim | None:
        with self.ledger_lock:
            reaped = self.ledger.reap_stale()
            claim = self.ledger.claim()
            if claim is None and self.hooks.search is not None:
                claim = self.hooks.search.new_claim()
            if claim is not None:
                self.ledger.storage.set_trial_user_attr(claim.trial_id, "worker", f"{self.host}/{slot.name}")
        if reaped:
            self._close_reaped_runs(reaped)
        return claim

    def _close_reaped_runs(self, reaped: list) -> None:
        """A dead worker's runs: KILLED (a retry on its host reopens the run). Found by the run id the ledger
        has and by the claim tag, which the run carries from its creation, before the ledger learns its id."""
        runs = {t.user_attrs["run_id"] for t in reaped if t.user_attrs.get("run_id")}
        claims = {t.user_attrs["claim"] for t in reaped if t.user_attrs.get("claim")}
        if claims and self.hooks.open_runs is not None:
            runs |= {run_id for run_id, claim in self.hooks.open_runs().items() if claim in claims}
        for run_id in runs:
            self.hooks.close_run(run_id, "killed")

    def _close_settled_runs(self) -> None:
        """Once nothing is left to run: close every run still open whose claim the ledger has settled, as the
        ledger says (a worker killed between recording a result and closing its run leaves one open)."""
        if self.hooks.open_runs is None:
            return
        open_runs = self.hooks.open_runs()
        if not open_runs:
            return
        with self.ledger_lock:
            settled = self.ledger.settled_claims()
        for run_id, claim in open_runs.items():
            if claim in settled:
                self.hooks.close_run(run_id, settled[claim])

    def _stop_if_disk_full(self) -> bool:
        """Whether a folder the sweep writes is under the free-space reserve (hooks.check_room) with trials left.
        Then, as on Ctrl-C, no trial is claimed and running ones are interrupted and handed back, while the
        writes that close their runs and trials still fit; run_sweep then raises disk_full."""
        if self.hooks.check_room is None:
            return False
        try:
            self.hooks.check_room()
        except DiskFullError as err:
            if self._drained():       # nothing left to run: the sweep ends as it would have
                return True
            self.disk_full = self.disk_full or err
            self.stopping.set()
            return True
        return False

    def _drained(self) -> bool:
        """Nothing waiting and nothing running anywhere (another worker's crash could queue a retry)."""
        with self.ledger_lock:
            counts = self.ledger.counts()
            more = self.hooks.search is not None and self.hooks.search.has_more()
        return counts["waiting"] == 0 and counts["running"] == 0 and not more

    def _run_claim(self, slot: Slot, claim: Claim, process: TrainerProcess) -> None:
        try:
            cfg = self.hooks.trial_config(claim, slot)
        except UserError as err:     # a stored TPE config that no longer builds: no retry can fix it
            with self.ledger_lock:
                self.ledger.fail(claim, one_line(err), retriable=False)
            return
        name = cfg.tracking.run_name
        found = self.hooks.finished_run(claim.config_hash) if self.hooks.finished_run else None
        if found is not None:       # a retry of a point already finished (its ledger entry lost to a kill)
            committed = self._commit(claim, Finishing(claim.token, "finished", found[0], found[1]))
            if committed is not None:       # (else a reaper took this claim over: the run is recorded there)
                self._record(claim, name, Done("finished", found[0], found[1]), 0.0, committed=committed)
            return
        tags = {**cfg.tracking.tags, CLAIM_TAG: claim.token}
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, tags=tags))
        log = self.workdir / claim.config_hash / "log.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        state = self.progress.slots[slot.name]
        state.trial, state.epoch, state.epochs, state.started = name, 0, cfg.train.epochs, started
        state.cost, state.resumed_at, state.committed = trial_flop(cfg, 1), None, None
        process.send(Run(to_dict(cfg), str(log), claim.attempt, f"{self.host}/{slot.name}", claim.token))
        done = self._watch(claim, process, state)
        if done.disk_full:       # the trainer met a full disk: every next trial would too; hand this one back
            self._stop_if_disk_full()       # the sweep's own line, when it is the reserve that ran out
            self.disk_full = self.disk_full or DiskFullError(f"sweep stopped: {done.error}")
            self.stopping.set()
        elif done.status == "error":    # a trial that failed on a full disk is handed back, and the sweep stops
            self._stop_if_disk_full()
        if done.status == "error" and state.run_id:     # a trainer that died left its run RUNNING
            word = state.committed.status if state.committed else "killed" if self.stopping.is_set() else "failed"
            self.hooks.close_run(state.run_id, word)
        state.trial, state.run_id = "", ""
        self._record(claim, name, done, time.monotonic() - started, state.cost, state.committed)

    def _watch(self, claim: Claim, process: TrainerProcess, state: SlotState) -> Done:
        """Follow the trainer's messages until its `done`, sending heartbeats; an error if it died."""
        last_beat, interrupted = 0.0, 0.0
        while True:
            try:
                answer = process.answers.get(timeout=1.0)
            except queue.Empty:
                answer = ""
            if answer is None or isinstance(answer, ProtocolError):
                return _lost(process, answer)
            if isinstance(answer, Done):
                return answer
            if isinstance(answer, Finishing):
                # Once the trainer is interrupted, it closes its run KILLED whatever it hears: keep nothing.
                state.committed = None if interrupted else self._commit(claim, answer)
                process.send(Verdict(state.committed is not None))
            elif answer:
                self._follow(claim, process, state, answer)
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_SECONDS:
                with self.ledger_lock:
                    self.ledger.beat(claim.trial_id)
                last_beat = now
            if self.stopping.is_set() and not interrupted and state.committed is None:
                process.interrupt()      # (a trial whose result is recorded only has its run to close)
                interrupted = now
            elif interrupted and now - interrupted > STOP_GRACE_SECONDS:
                process.kill()       # it ignored the interrupt; its checkpoint still allows a resume

    def _follow(self, claim: Claim, process: TrainerProcess, state: SlotState, message: Message) -> None:
        """A `started` is recorded on the trial (a reaper closes its run); an `epoch` moves the progress
        and, with TPE, may prune the trial: the trainer is told to stop after this epoch."""
        if isinstance(message, Started):
            state.run_id = message.run_id
            with self.ledger_lock:
                self.ledger.set_run_id(claim.trial_id, message.run_id)
        elif isinstance(message, Epoch):
            if state.resumed_at is None:
                state.resumed_at = message.epoch - 1
            state.epoch = message.epoch
            if self.hooks.search is None:
                return
            with self.ledger_lock:
                prune = self.hooks.search.report(claim, message.epoch, message.metrics["val_macro_f1"])
            if prune:
                process.send(Stop("pruned by the median rule"))

    def _commit(self, claim: Claim, ending: Finishing) -> Finishing | None:
        """Record a trial's result in the ledger; the result, or None when this claim was taken over (or the
        `finishing` names another claim)."""
        value = ending.metrics.get("val_macro_f1", 0.0) if ending.status == "finished" else 0.0
        with self.ledger_lock:
            kept = ending.claim == claim.token and self.ledger.finish(claim, ending.status, value, ending.run_id)
        return ending if kept else None

    def _record(self, claim: Claim, name: str, done: Done, seconds: float, cost: float = 0.0,
                committed: Finishing | None = None) -> None:
        """Tell the ledger how the trial ended, unless it recorded the result already (committed); and the display."""
        with self.ledger_lock:
            if committed is not None:
                event = TrialEvent(name, committed.status, seconds, _metrics_line(committed.metrics), cost)
                self.progress.train_seconds += done.train_seconds
            elif self.stopping.is_set() and self.ledger.release(claim):    # still this worker's claim
                detail = done.error if done.disk_full else "interrupted; resumes on the next run"
                event = TrialEvent(name, "released", seconds, detail)
            elif done.status == "superseded":
                print(f"warning: trial {name} ({claim.config_hash}) was taken over by another worker after this "
                      f"one's heartbeats stopped; its late result is not kept: run {done.run_id} closed as KILLED, "
                      "status superseded", file=sys.stderr, flush=True)
                event = TrialEvent(name, "superseded", seconds, "result not kept: another worker took the trial over")
            elif self.stopping.is_set():    # a reaper took it over meanwhile: its record is the reaper's
                event = TrialEvent(name, "superseded", seconds, "another worker took the trial over")
            else:
                retried = self.ledger.fail(claim, done.error, done.retriable)
                event = TrialEvent(name, "retried" if retried else "failed", seconds, done.error)
        with self.progress.lock:
            self.progress.events.append(event)


def _lost(process: TrainerProcess, garbled: ProtocolError | None) -> Done:
    """The `done` of a trainer that exited mid-trial, or answered with a line that is not a message."""
    if garbled is None:
        return Done("error", error="the trainer process died (killed, out of memory, or interrupted)",
                    retriable=True)
    process.kill()
    return Done("error", error=f"trainer: {garbled}", retriable=False)


def _metrics_line(metrics: dict) -> str:
    keys = ("val_macro_f1", "test_accuracy", "test_macro_f1")
    return " ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)
