"""The sweep's ledger: one Optuna study; each planned trial enqueued once by config hash.

A worker pops a WAITING trial by switching it to RUNNING in the storage (a conditional update,
so two workers never get the same one), records heartbeats while it runs, and finishes it.
States, and the `status` user attribute that says why:
  COMPLETE  finished | diverged (value = final validation macro F1, the logged model's; 0 when diverged)
  PRUNED    pruned (TPE's median rule)
  FAIL      failed (retries used up) | retried (a new WAITING copy took over) | released (interrupted)
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from orchestrator.sweep.plan import PlannedTrial
from trainers.config import to_dict
from trainers.process.side_files import STORE_DIR

# A RUNNING trial without a heartbeat for a minute belongs to a dead worker. Tests shorten both.
HEARTBEAT_SECONDS = int(os.environ.get("FER_HEARTBEAT_SECONDS", 10))
GRACE_SECONDS = int(os.environ.get("FER_GRACE_SECONDS", 60))


@dataclass(frozen=True)
class Claim:
    trial_id: int
    number: int
    config_hash: str
    attempt: int              # 0 for the first run of this grid point, 1 for its first retry, ...
    attrs: dict               # the user attributes it was enqueued with


def default_storage() -> str:
    """sqlite under mlruns/, written by one orchestrator process per host."""
    STORE_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(STORE_DIR / 'optuna.db').resolve()}"


class Ledger:
    """The Optuna study of one sweep."""

    def __init__(self, url: str, sweep: str, max_retries: int, sampler=None, pruner=None):
        optuna.logging.set_verbosity(logging.WARNING)
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        self.url = url
        self.max_retries = max_retries
        if url.startswith("sqlite:///"):    # --storage sqlite:///new/folder/optuna.db: sqlite makes no folders
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(10):
            try:
                with warnings.catch_warnings():     # heartbeats are "experimental" in Optuna
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self.storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS,
                                              grace_period=GRACE_SECONDS)
                break
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                    sqlalchemy.exc.OperationalError) as err:
                # Processes opening a fresh database together (workers, a sweep and its `status`)
                # race to create Optuna's tables; the loser sees them "already exist" and retries.
                racing = not isinstance(err, sqlalchemy.exc.OperationalError) or "already exists" in str(err)
                if attempt == 9 or not racing:
                    raise
                time.sleep(0.1 * (attempt + 1) + random.uniform(0, 0.2))
        self.study = optuna.create_study(study_name=sweep, storage=self.storage, direction="maximize",
                                         load_if_exists=True, sampler=sampler, pruner=pruner)
        self._lock_file = None

    @property
    def safe_url(self) -> str:
        """The storage URL with its password hidden, for printing."""
        return sqlalchemy.engine.make_url(self.url).render_as_string(hide_password=True)

    # --- set-up -------------------------------------------------------------------------

    def hold_host_lock(self) -> bool:
        """For the local sqlite store: take the one-orchestrator lock; False if another process has it."""
        if not self.url.startswith("sqlite:///"):
            return True
        path = Path(self.url.removeprefix("sqlite:///") + ".lock")
        self._lock_file = open(path, "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        return True

    def recover_orphans(self) -> int:
        """With the host lock held, every RUNNING trial belongs to a dead process: queue it again."""
        orphans = self._trials((TrialState.RUNNING,))
        for t in orphans:
            self._close(t._trial_id, TrialState.FAIL, "released")
            self._enqueue_copy(t, attempt=t.user_attrs.get("attempt", 0))
        return len(orphans)

    def enqueue(self, trials: list[PlannedTrial]) -> int:
        """Queue planned trials not yet finished or queued; a re-run retries those that failed."""
        latest = self.latest_by_hash()
        added = 0
        for trial in trials:
            last = latest.get(trial.hash)
            if last is not None and last.user_attrs.get("status") != "failed":
                continue
            # The resolved config travels with the trial, so a worker whose spec copy differs runs
            # what the sweep planned.
            self.study.enqueue_trial({}, user_attrs={"config_hash": trial.hash, "name": trial.name,
                                                     "groups": ",".join(trial.groups), "attempt": 0,
                                                     "config": json.dumps(to_dict(trial.config))})
            added += 1
        return added

    def set_parent_run(self, run_id: str) -> None:
        self.study.set_user_attr("parent_run_id", run_id)

    def parent_run(self) -> str | None:
        return self.study.user_attrs.get("parent_run_id")

    # --- claiming and finishing -----------------------------------------------------------

    def claim(self) -> Claim | None:
        """Pop one WAITING trial atomically, or None when the queue is empty."""
        for t in self._trials((TrialState.WAITING,)):
            # Beat first: a worker that dies right after the switch still leaves a trial the reaper sees.
            self.heartbeat(t._trial_id)
            try:
                if not self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    continue        # another worker took it first
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            return Claim(t._trial_id, t.number, t.user_attrs["config_hash"], t.user_attrs.get("attempt", 0),
                         dict(t.user_attrs))
        return None

    def heartbeat(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)

    def beat(self, trial_id: int) -> None:
        """A running trial's heartbeat; a missed one is not fatal (the grace period covers a few)."""
        try:
            self.heartbeat(trial_id)
        except sqlalchemy.exc.SQLAlchemyError as err:
            print(f"warning: heartbeat for trial {trial_id} not recorded: {type(err).__name__}", file=sys.stderr)

    def set_run_id(self, trial_id: int, run_id: str) -> None:
        """Record the trial's MLflow run (while it runs, so a reaper can close it if its worker dies)."""
        try:
            self.storage.set_trial_user_attr(trial_id, "run_id", run_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass    # reaped meanwhile; the reaper closed the run it knew of

    def finish(self, claim: Claim, status: str, value: float, run_id: str | None) -> None:
        """Close a trial that ran to an end: finished, diverged or pruned."""
        if run_id:
            self.set_run_id(claim.trial_id, run_id)
        state = TrialState.PRUNED if status == "pruned" else TrialState.COMPLETE
        self._close(claim.trial_id, state, status, value if state == TrialState.COMPLETE else None)

    def fail(self, claim: Claim, error: str, retriable: bool) -> bool:
        """Record a crash; queue a retry while retries remain. Returns whether it was retried."""
        retry = retriable and claim.attempt < self.max_retries
        if not self._close(claim.trial_id, TrialState.FAIL, "retried" if retry else "failed", error=error):
            return False    # a reaper closed it first and queued its own retry
        if retry:
            self._enqueue_copy(self.storage.get_trial(claim.trial_id), attempt=claim.attempt + 1)
        return retry

    def release(self, claim: Claim) -> None:
        """Give back an interrupted trial (Ctrl-C) without using one of its retries."""
        if self._close(claim.trial_id, TrialState.FAIL, "released"):
            self._enqueue_copy(self.storage.get_trial(claim.trial_id), attempt=claim.attempt)

    def reap_stale(self) -> list[FrozenTrial]:
        """Fail the trials whose worker stopped sending heartbeats and queue them again; returns them.

        Done here rather than by Optuna's fail_stale_trials, whose callback runs after the trial is
        FAIL and so can no longer record why. Of several workers reaping at once, the one whose
        state change lands queues the retry; the others' `_close` sees a finished trial.
        """
        reaped = []
        for trial_id in self.storage._get_stale_trial_ids(self.study._study_id):
            trial = self.storage.get_trial(trial_id)
            retry = trial.user_attrs.get("attempt", 0) < self.max_retries
            if self._close(trial_id, TrialState.FAIL, "retried" if retry else "failed",
                           error=f"worker {trial.user_attrs.get('worker', '?')} stopped sending heartbeats"):
                if retry:
                    self._enqueue_copy(trial, attempt=trial.user_attrs.get("attempt", 0) + 1)
                reaped.append(trial)
        return reaped

    def _enqueue_copy(self, trial: FrozenTrial, attempt: int) -> None:
        attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("status", "error", "run_id", "worker")}
        self.study.enqueue_trial({}, user_attrs={**attrs, "attempt": attempt, "retry_of": trial.number})

    def _close(self, trial_id: int, state: TrialState, status: str, value: float | None = None,
               error: str | None = None) -> bool:
        """Set the final state; False when a stale-trial sweep by another worker closed it first."""
        try:
            if error is not None:
                self.storage.set_trial_user_attr(trial_id, "error", error[-2000:])
            self.storage.set_trial_user_attr(trial_id, "status", status)
            self.storage.set_trial_state_values(trial_id, state, [value] if value is not None else None)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False    # the reaper's status (retried or failed) stands
        return True

    # --- reading ----------------------------------------------------------------------------

    def _trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study._study_id, deepcopy=False, states=states)

    def all_trials(self) -> list[FrozenTrial]:
        """Every trial of the study, retries and superseded attempts included."""
        return self._trials()

    def latest_by_hash(self) -> dict[str, FrozenTrial]:
        """The newest trial of each grid point (retries supersede the attempts before them)."""
        latest: dict[str, FrozenTrial] = {}
        for t in self._trials():
            h = t.user_attrs.get("config_hash")
            if h and (h not in latest or t.number > latest[h].number):
                latest[h] = t
        return latest

    def counts(self) -> Counter:
        """Grid points by state: waiting, running, finished, diverged, pruned, failed."""
        out: Counter = Counter()
        for t in self.latest_by_hash().values():
            if t.state == TrialState.WAITING:
                out["waiting"] += 1
            elif t.state == TrialState.RUNNING:
                out["running"] += 1
            else:
                out[t.user_attrs.get("status", t.state.name.lower())] += 1
        return out
