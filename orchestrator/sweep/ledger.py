"""The sweep's ledger: one Optuna study; each planned trial enqueued once by config hash.

A worker pops a WAITING trial by switching it to RUNNING in the storage (a conditional update,
so two workers never get the same one) and stamps it with a random claim token; it records heartbeats
while it runs, and settles it: finished, failed or released, only while the trial is still RUNNING under
its token (checked and written under a lock), so a worker whose claim a reaper took over cannot.
Enqueueing holds a lock too: sweeps started at the same moment queue each grid point once.
The locks: a PostgreSQL advisory lock (across hosts), or for sqlite a file lock beside the database.
MLflow is the record of results: a sweep records the trials its runs show ended that the ledger lacks
(`reconcile`), so a lost, emptied or replaced ledger is rebuilt and nothing finished runs again.
States, and the `status` user attribute that says why:
  COMPLETE  finished | diverged (value = final validation macro F1, the logged model's; 0 when diverged)
  PRUNED    pruned (TPE's median rule)
  FAIL      failed (retries used up) | retried (a new WAITING copy took over) | released (interrupted)
"""
from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import random
import secrets
import shlex
import sqlite3
import sys
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import optuna
import sqlalchemy
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from orchestrator.sweep.plan import PlannedTrial
from trainers.config import to_dict
from trainers.errors import UserError, first_line
from trainers.process.side_files import STORE_DIR

# A RUNNING trial without a heartbeat for a minute belongs to a dead worker. Tests shorten both.
HEARTBEAT_SECONDS = int(os.environ.get("FER_HEARTBEAT_SECONDS", 10))
GRACE_SECONDS = int(os.environ.get("FER_GRACE_SECONDS", 60))

# A locked, busy or unreachable database, as SQLAlchemy raises it or as Optuna wraps it.
STORE_ERRORS = (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)

# PostgreSQL advisory lock classes (the second key is the study's or the trial's id).
ENQUEUE_LOCK, SETTLE_LOCK, PARENT_LOCK = 0x666572, 0x666573, 0x666574


@dataclass(frozen=True)
class Claim:
    trial_id: int
    number: int
    config_hash: str
    attempt: int              # 0 for the first run of this grid point, 1 for its first retry, ...
    attrs: dict               # the user attributes it was enqueued with
    token: str                # this claim's random token, stored on the trial: settling checks it


class LedgerError(UserError, RuntimeError):
    """The ledger cannot be used (its file is unreadable, another orchestrator holds it); the message says
    what to do."""


@dataclass(frozen=True)
class Recorded:
    """A trial MLflow holds as ended under the sweep's parent run: what a lost ledger is rebuilt from."""
    run_id: str
    status: str               # finished | diverged | pruned (its run's status tag)
    value: float              # as `finish` records it: final validation macro F1, 0 when diverged (pruned: unused)
    name: str
    groups: str               # comma-separated, as the run's groups tag


def store_cause(err: BaseException) -> str:
    """What the database said, under Optuna's wrapper ('OperationalError: database is locked')."""
    cause = err.__cause__ if isinstance(err, optuna.exceptions.StorageInternalError) and err.__cause__ else err
    cause = getattr(cause, "orig", None) or cause
    return f"{type(cause).__name__}: {first_line(cause)}"


def default_storage() -> str:
    """sqlite under mlruns/, written by one orchestrator process per host."""
    STORE_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(STORE_DIR / 'optuna.db').resolve()}"


@functools.lru_cache(maxsize=None)
def warn_if_password(url: str) -> None:
    """Once per URL: a password in the storage URL is readable by every user of the machine (ps)."""
    if sqlalchemy.engine.make_url(url).password:
        print("warning: the storage URL holds a password, which every user of this machine can read on the "
              "command line (ps); leave it out of the URL and put it in ~/.pgpass (or PGPASSFILE, PGPASSWORD)",
              file=sys.stderr)


# The host locks this process holds, by lock file: held until it exits (a flock ends with its process).
_HOST_LOCKS: dict[str, IO[str]] = {}


def take_host_lock(url: str) -> None:
    """For a local sqlite ledger: take the one-orchestrator-per-host lock beside it (once per process);
    LedgerError when another process holds it. Light on purpose: a sweep takes it before importing what
    its trials need (MLflow, seconds), so a refused one says so at once."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///") + ".lock").resolve()
    if str(path) in _HOST_LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise LedgerError(f"another orchestrator on this host is using {url}; wait for it to finish, or join it "
                          "from another host with `python -m orchestrator worker --storage ...`") from None
    lock.write(str(os.getpid()))
    lock.flush()
    _HOST_LOCKS[str(path)] = lock


@contextmanager
def corrupt_file_in_one_line(url: str) -> Iterator[None]:
    """A sqlite ledger that is not a database (overwritten, truncated mid-page) stops with one line saying
    what to do, not a traceback: MLflow keeps every result, so a ledger moved aside loses no finished trial
    (the sweep rebuilds it from the sweep's runs). A 0-byte file is a new, empty database to sqlite."""
    try:
        yield
    except sqlalchemy.exc.DatabaseError as err:
        # Only sqlite's own "not a database" errors: locks, races and servers raise its subclasses.
        if type(err) is not sqlalchemy.exc.DatabaseError or not url.startswith("sqlite:///"):
            raise
        raise unreadable_file(url, first_line(err.orig)) from None


def unreadable_file(url: str, cause: str) -> LedgerError:
    """The one line for a sqlite ledger that is not a sound database: what sqlite said, and what to do."""
    path = shlex.quote(url.removeprefix("sqlite:///"))
    return LedgerError(f"{path} is not a readable Optuna database ({cause}); move it aside (mv {path} {path}.bad) "
                       "and run again: finished trials are recovered from MLflow")


def check_sqlite_file(engine: sqlalchemy.engine.Engine, url: str) -> None:
    """LedgerError when sqlite's quick check finds the ledger's file damaged: a page overwritten mid-file
    opens fine and fails only when a trial's row is read, mid-sweep. Milliseconds for a sweep's ledger."""
    path = Path(url.removeprefix("sqlite:///"))
    if not path.is_file() or path.stat().st_size == 0:
        return
    with engine.connect() as conn:
        found = conn.execute(sqlalchemy.text("PRAGMA quick_check")).scalar()
    if found != "ok":
        raise unreadable_file(url, first_line(Exception(found)))


class Ledger:
    """The Optuna study of one sweep."""

    def __init__(self, url: str, sweep: str, max_retries: int, sampler=None, pruner=None):
        optuna.logging.set_verbosity(logging.WARNING)
        warn_if_password(url)
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        self.url = url
        self.max_retries = max_retries
        if url.startswith("sqlite:///"):    # --storage sqlite:///new/folder/optuna.db: sqlite makes no folders
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        with corrupt_file_in_one_line(url):
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
            if url.startswith("sqlite:///"):
                check_sqlite_file(self.storage.engine, url)
            self.study = optuna.create_study(study_name=sweep, storage=self.storage, direction="maximize",
                                             load_if_exists=True, sampler=sampler, pruner=pruner)

    @classmethod
    def open_to_read(cls, url: str, sweep: str) -> Ledger | None:
        """The sweep's study for reading (`status`), or None when the storage holds no such study. Nothing is
        created (no file, table or study) and a sqlite file is opened read-only, so a read-only store reads."""
        warn_if_password(url)
        engine: dict = {"pool_pre_ping": True}
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///")).resolve()
            if not path.is_file():
                return None
            engine = {"creator": lambda: sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=60,
                                                         check_same_thread=False)}
        probe = sqlalchemy.create_engine(url, **engine)
        try:
            with corrupt_file_in_one_line(url):
                if not sqlalchemy.inspect(probe).has_table("studies"):     # RDBStorage would make the tables
                    return None
        except sqlalchemy.exc.OperationalError as err:      # a server that is down, a wrong host, user or database
            shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
            raise LedgerError(f"cannot read the ledger at {shown} ({first_line(err.orig or err)}); check --storage "
                              "and that its database server is running") from None
        finally:
            probe.dispose()
        ledger = cls.__new__(cls)       # no __init__: it creates the study
        ledger.url, ledger.max_retries = url, 0
        ledger.storage = RDBStorage(url, engine_kwargs=engine, skip_table_creation=True)
        try:
            ledger.study = optuna.load_study(study_name=sweep, storage=ledger.storage)
        except KeyError:                # Optuna's "Record does not exist."
            return None
        return ledger

    @property
    def safe_url(self) -> str:
        """The storage URL with its password hidden, for printing."""
        return sqlalchemy.engine.make_url(self.url).render_as_string(hide_password=True)

    # --- set-up -------------------------------------------------------------------------

    def recover_orphans(self) -> int:
        """With the host lock held, every RUNNING trial belongs to a dead process: queue it again."""
        orphans = self._trials((TrialState.RUNNING,))
        for t in orphans:
            if self._settle(t._trial_id, t.user_attrs.get("claim"), TrialState.FAIL, {"status": "released"}):
                self._enqueue_copy(t, attempt=t.user_attrs.get("attempt", 0))
        return len(orphans)

    def enqueue(self, trials: list[PlannedTrial], costs: dict[str, float] | None = None) -> int:
        """Queue planned trials not yet finished or queued; a re-run retries those that failed. Each keeps its
        cost (costs, by config hash; FLOPs), by which `claim` takes the costliest first.

        Under the enqueue lock: of sweeps started at the same moment, each reads the queue as the one
        before it left it, so each grid point is queued once."""
        added = 0
        with self._exclusive(ENQUEUE_LOCK, self.study._study_id):
            latest = self.latest_by_hash()
            for trial in trials:
                last = latest.get(trial.hash)
                if last is not None and last.user_attrs.get("status") != "failed":
                    continue
                # The resolved config travels with the trial, so a worker whose spec copy differs runs
                # what the sweep planned.
                self.study.enqueue_trial({}, user_attrs={"config_hash": trial.hash, "name": trial.name,
                                                         "groups": ",".join(trial.groups), "attempt": 0,
                                                         "cost": (costs or {}).get(trial.hash, 0.0),
                                                         "config": json.dumps(to_dict(trial.config))})
                added += 1
        return added

    def set_parent_run(self, run_id: str) -> None:
        self.study.set_user_attr("parent_run_id", run_id)

    def parent_run(self) -> str | None:
        return self.study.user_attrs.get("parent_run_id")

    # --- claiming and finishing -----------------------------------------------------------

    def claim(self) -> Claim | None:
        """Pop one WAITING trial atomically, the costliest first (so the sweep does not end on one long trial
        alone; a retry, a released or a reaped trial keeps its cost), or None when the queue is empty."""
        waiting = self._trials((TrialState.WAITING,))
        for t in sorted(waiting, key=lambda t: -t.user_attrs.get("cost", 0.0)):     # stable: queue order next
            # Beat first: a worker that dies right after the switch still leaves a trial the reaper sees.
            self.heartbeat(t._trial_id)
            try:
                if not self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    continue        # another worker took it first
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            return self.hold(t._trial_id, t.number, dict(t.user_attrs))
        return None

    def hold(self, trial_id: int, number: int, attrs: dict) -> Claim:
        """The claim on a trial this worker switched to RUNNING: a fresh token stored on it, a first heartbeat."""
        token = secrets.token_hex(8)
        self.storage.set_trial_user_attr(trial_id, "claim", token)
        self.heartbeat(trial_id)
        return Claim(trial_id, number, attrs["config_hash"], attrs.get("attempt", 0), attrs, token)

    def heartbeat(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)

    def beat(self, trial_id: int) -> None:
        """A running trial's heartbeat; a missed one is not fatal (the grace period covers a few)."""
        try:
            self.heartbeat(trial_id)
        except STORE_ERRORS as err:
            print(f"warning: heartbeat for trial {trial_id} not recorded: {store_cause(err)}", file=sys.stderr)

    def set_run_id(self, trial_id: int, run_id: str) -> None:
        """Record the trial's MLflow run (while it runs, so a reaper can close it if its worker dies; one not
        recorded is still found by its claim tag)."""
        try:
            self.storage.set_trial_user_attr(trial_id, "run_id", run_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass    # reaped meanwhile; the reaper closed the run it knew of
        except STORE_ERRORS as err:
            print(f"warning: run id of trial {trial_id} not recorded: {store_cause(err)}", file=sys.stderr)

    def finish(self, claim: Claim, status: str, value: float, run_id: str | None) -> bool:
        """Record a trial that ran to an end: finished, diverged or pruned. False, and nothing written, when
        the claim was taken over (a reaper re-queued the trial): this result is not kept."""
        state = TrialState.PRUNED if status == "pruned" else TrialState.COMPLETE
        attrs = {"status": status, **({"run_id": run_id} if run_id else {})}
        return self._settle(claim.trial_id, claim.token, state, attrs,
                            value if state == TrialState.COMPLETE else None)

    def fail(self, claim: Claim, error: str, retriable: bool) -> bool:
        """Record a crash; queue a retry while retries remain. Returns whether it was retried."""
        retry = retriable and claim.attempt < self.max_retries
        attrs = {"error": error[-2000:], "status": "retried" if retry else "failed"}
        if not self._settle(claim.trial_id, claim.token, TrialState.FAIL, attrs):
            return False    # a reaper closed it first and queued its own retry
        if retry:
            self._enqueue_copy(self.storage.get_trial(claim.trial_id), attempt=claim.attempt + 1)
        return retry

    def release(self, claim: Claim) -> bool:
        """Give back an interrupted trial (Ctrl-C) without using one of its retries; False, nothing written,
        when the claim was taken over."""
        if not self._settle(claim.trial_id, claim.token, TrialState.FAIL, {"status": "released"}):
            return False
        self._enqueue_copy(self.storage.get_trial(claim.trial_id), attempt=claim.attempt)
        return True

    def reap_stale(self) -> list[FrozenTrial]:
        """Fail the trials whose worker stopped sending heartbeats and queue them again; returns them.

        Done here rather than by Optuna's fail_stale_trials, whose callback runs after the trial is
        FAIL and so can no longer record why. Of several workers reaping at once (and the stalled owner
        finishing late), the one whose settle lands first wins; the others' `_settle` sees it settled.
        """
        reaped = []
        for trial_id in self.storage._get_stale_trial_ids(self.study._study_id):
            trial = self.storage.get_trial(trial_id)
            retry = trial.user_attrs.get("attempt", 0) < self.max_retries
            attrs = {"error": f"worker {trial.user_attrs.get('worker', '?')} stopped sending heartbeats",
                     "status": "retried" if retry else "failed"}
            if self._settle(trial_id, trial.user_attrs.get("claim"), TrialState.FAIL, attrs):
                if retry:
                    self._enqueue_copy(trial, attempt=trial.user_attrs.get("attempt", 0) + 1)
                reaped.append(trial)
        return reaped

    def _enqueue_copy(self, trial: FrozenTrial, attempt: int) -> None:
        attrs = {k: v for k, v in trial.user_attrs.items()
                 if k not in ("status", "error", "run_id", "worker", "claim")}
        self.study.enqueue_trial({}, user_attrs={**attrs, "attempt": attempt, "retry_of": trial.number})

    def _settle(self, trial_id: int, token: str | None, state: TrialState, attrs: dict,
                value: float | None = None) -> bool:
        """Write the trial's user attributes and final state if it is still RUNNING under this claim token;
        False, writing nothing, when another worker (a reaper, or the owner) settled it first. The check
        and the writes are one step under the trial's settle lock."""
        with self._exclusive(SETTLE_LOCK, trial_id):
            trial = self.storage.get_trial(trial_id)
            if trial.state != TrialState.RUNNING or trial.user_attrs.get("claim") != token:
                return False
            for key, text in attrs.items():
                self.storage.set_trial_user_attr(trial_id, key, text)
            self.storage.set_trial_state_values(trial_id, state, [value] if value is not None else None)
        return True

    @contextmanager
    def _exclusive(self, kind: int, key: int) -> Iterator[None]:
        """Hold the ledger's lock `kind` for `key` (a study or trial id) against every process using it."""
        if self.url.startswith("sqlite:///"):
            # One file lock per kind beside the database (a settle is short: one lock serves every trial).
            name = {ENQUEUE_LOCK: "enqueue", SETTLE_LOCK: "settle", PARENT_LOCK: "parent"}[kind]
            with open(self.url.removeprefix("sqlite:///") + f".{name}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield
            return
        # PostgreSQL: an advisory lock held by its own connection's transaction, released at its end, or by
        # the server when a killed worker's connection drops.
        with self.storage.engine.connect() as conn, conn.begin():
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:kind, :key)"), {"kind": kind, "key": key})
            yield

    def starting(self):
        """Held by a sweep while it opens (or joins) the parent run, queues the plan and records the parent:
        of sweeps started at the same moment, the first opens the parent run and the others join it."""
        return self._exclusive(PARENT_LOCK, self.study._study_id)

    # --- rebuilding from MLflow ---------------------------------------------------------------

    def reconcile(self, ended: dict[str, Recorded]) -> int:
        """Record the trials MLflow holds as ended (by config hash) that the ledger lost or holds as failed,
        each as one settled trial with its run id and value, so none is queued or run again; returns how many.

        MLflow is the record of results: a deleted, emptied or replaced ledger is rebuilt from it. A point
        the ledger holds waiting or running is left to the executor, which takes a finished run from MLflow
        before training (hooks.finished_run)."""
        with self._exclusive(ENQUEUE_LOCK, self.study._study_id):      # as enqueue: once across sweeps
            missing = unrecorded(self.latest_by_hash(), ended)
            for config_hash, run in missing.items():
                self.study.add_trial(recorded_trial(config_hash, run))
        return len(missing)

    # --- reading ----------------------------------------------------------------------------

    def _trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study._study_id, deepcopy=False, states=states)

    def all_trials(self) -> list[FrozenTrial]:
        """Every trial of the study, retries and superseded attempts included."""
        return self._trials()

    def settled_claims(self) -> dict[str, str]:
        """Claim token -> how that attempt ended, for every settled trial: its status when the ledger kept its
        result (finished, diverged, pruned); failed when its retries ran out; otherwise killed."""
        out = {}
        for t in self._trials((TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
            if "claim" in t.user_attrs:
                status = t.user_attrs.get("status", "")
                out[t.user_attrs["claim"]] = status if t.state != TrialState.FAIL or status == "failed" else "killed"
        return out

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
        return count_points(self.latest_by_hash())


def count_points(latest: dict[str, FrozenTrial]) -> Counter:
    """Grid points by the state of their latest trial: waiting, running, finished, diverged, pruned, failed."""
    out: Counter = Counter()
    for t in latest.values():
        if t.state == TrialState.WAITING:
            out["waiting"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        else:
            out[t.user_attrs.get("status", t.state.name.lower())] += 1
    return out


def unrecorded(latest: dict[str, FrozenTrial], ended: dict[str, Recorded]) -> dict[str, Recorded]:
    """The ended runs (by config hash) whose grid point the ledger has no trial of, or holds as failed."""
    return {h: run for h, run in ended.items() if h not in latest or latest[h].state == TrialState.FAIL}


def recorded_trial(config_hash: str, run: Recorded) -> FrozenTrial:
    """A settled trial as `finish` leaves one, made from the run MLflow holds (not yet in any study)."""
    attrs = {"config_hash": config_hash, "name": run.name, "groups": run.groups, "attempt": 0,
             "status": run.status, "run_id": run.run_id}
    if run.groups == "tpe":         # a sampled trial: it counts against TPE's budget (TpeTrials.has_more)
        attrs["tpe"] = True
    state = TrialState.PRUNED if run.status == "pruned" else TrialState.COMPLETE
    return optuna.trial.create_trial(state=state, value=run.value if state == TrialState.COMPLETE else None,
                                     user_attrs=attrs)
