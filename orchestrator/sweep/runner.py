"""A whole sweep on this host: plan -> ledger -> executor, under one MLflow parent run."""
from __future__ import annotations

import csv
import dataclasses
import functools
import getpass
import math
import subprocess
import sys
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchestrator.results.kept_models import decide_kept_models, kept_files
from orchestrator.results.runs import child_runs
from orchestrator.sweep.executor import Executor, Slot, SweepHooks, make_slots, start_trainers, stop_trainers
from orchestrator.sweep.ledger import (Claim, Ledger, Recorded, default_storage, recorded_trial, take_host_lock,
                                       unrecorded)
from orchestrator.sweep.plan import PlannedTrial, count_images, datasets_to_prepare, resolve_trial, trial_flop
from orchestrator.sweep.preflight import OutputFolder, check_sweep_room, sweep_folders
from orchestrator.sweep.spec import SweepSpec
from trainers.config import (BEST_K, NAME_SEPARATOR, TrialConfig, config_hash, from_dict, to_dict, leading_parts,
                             trial_name, with_tracking)
from trainers.data.balance import balance_text
from trainers.errors import UserError, first_line
from trainers.process.side_files import STORE_DIR
from trainers.tracking import (SweepParent, close_dead_run, finished_trial_run, open_trial_runs, store_client,
                               tracking_uri)

WORK_DIR = STORE_DIR / "sweeps"
ENDED = ("finished", "diverged", "pruned")      # a trial run's status tags that end its grid point for good
START_POLL_SECONDS = 2.0    # how often a worker started before its sweep looks for it


class SweepError(UserError, RuntimeError):
    """The sweep cannot start; the message says what to do."""


@dataclass
class SweepOutcome:
    counts: dict[str, int]
    parent_run_id: str
    wall_seconds: float
    train_seconds: float
    interrupted: bool


def child_run_tags(sweep: str, groups: str, trial_number: int) -> dict[str, str]:
    """The tags that mark a trial's MLflow run as a child of its sweep (groups: comma-separated names)."""
    return {"role": "trial", "sweep": sweep, "groups": groups, "optuna_trial": str(trial_number)}


PROJECT_DIR = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=8)
def source_tags(spec_path: str) -> dict[str, str]:
    """MLflow's Source and User columns: the spec that ran, the project's git commit (when run from a git
    checkout) and the user."""
    tags = {"mlflow.source.name": spec_path, "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):     # no user name for this uid (a container run with an arbitrary uid)
        pass
    try:        # the commit of this code, when it runs from a git checkout
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=PROJECT_DIR)
    except (OSError, subprocess.TimeoutExpired):
        return tags
    if commit.returncode == 0 and commit.stdout.strip():
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


def sweep_axes(spec: SweepSpec) -> dict[str, str]:
    """The parent run's params: each experiment's grid axes with their values, the seeds and the trial count."""
    params = {f"grid.{exp.name}.{axis}": ",".join(map(str, values))
              for exp in spec.experiments for axis, values in exp.grid.items()}
    return {**params, "seeds": ",".join(map(str, spec.seeds)), "trials": str(len(spec.plan)),
            "search": spec.search.method, "promote.metric": spec.promote.metric}


@dataclass(frozen=True)
class SweepContext:
    """What every trial of this sweep shares: where it logs and under which parent."""
    spec: SweepSpec
    tracking_uri: str
    parent_run_id: str
    plan: dict[str, PlannedTrial]

    def trial_config(self, claim: Claim, slot: Slot) -> TrialConfig:
        """A claim's config (planned, or as TPE stored it in the ledger), with the sweep's tracking fields
        and the slot's threads."""
        planned = self.plan.get(claim.config_hash)
        cfg = planned.config if planned else from_dict(json.loads(claim.attrs["config"]), self.spec.path)
        name = planned.name if planned else claim.attrs["name"]
        groups = ",".join(planned.groups) if planned else claim.attrs.get("groups", "")
        # The spec's tracking section (log_model, best_k) with where and under what this run logs.
        tracking = dataclasses.replace(self.spec.tracking, uri=self.tracking_uri, experiment=self.spec.name,
                                       run_name=name, parent_run_id=self.parent_run_id,
                                       tags={**child_run_tags(self.spec.name, groups, claim.number),
                                             **source_tags(self.spec.path)})
        return with_tracking(cfg, tracking, slot.threads)

    def hooks(self, search: TpeTrials | None, folders: list[OutputFolder]) -> SweepHooks:
        """What the executor needs from this sweep: configs, the run closer for dead trainers (and the lister
        of open runs it closes from), TPE, and the free-space check of the folders it writes."""
        return SweepHooks(self.trial_config, functools.partial(close_dead_run, self.tracking_uri), search,
                          functools.partial(finished_trial_run, self.tracking_uri, self.parent_run_id),
                          functools.partial(check_sweep_room, folders),
                          open_runs=functools.partial(open_trial_runs, self.tracking_uri, self.parent_run_id))


def tpe_name(number: int, cfg: TrialConfig, space: tuple[str, ...]) -> str:
    """A sampled trial's run name: tpe<n> and what the search varies first, tpe3·adam·3.16e-4·ep3·vit·s0."""
    return f"tpe{number}{NAME_SEPARATOR}{trial_name(cfg, leading_parts(space), space)}"


class TpeTrials:
    """`search: tpe`: new trials sampled by Optuna's TPE, pruned by the median rule on val macro F1."""

    def __init__(self, spec: SweepSpec, ledger: Ledger):
        self.spec, self.ledger = spec, ledger

    def has_more(self) -> bool:
        """Budget left: every sampled trial counts once (retries and re-proposed points included)."""
        sampled = sum(1 for t in self.ledger.all_trials() if t.user_attrs.get("tpe") and "retry_of" not in t.user_attrs)
        return sampled < self.spec.search.n_trials

    def new_claim(self) -> Claim | None:
        """Sample a new point; a point TPE proposes again is recorded as a duplicate and not run twice."""
        while self.has_more():
            known = self.ledger.latest_by_hash()
            trial = self.ledger.study.ask()
            if "config_hash" in trial.user_attrs:      # ask() handed out a queued retry: run it as queued
                attrs = dict(trial.user_attrs)
                return self.ledger.hold(trial._trial_id, trial.number, attrs)
            point = {"train.seed": self.spec.seeds[0]}
            for path, choice in self.spec.search.space.items():
                if isinstance(choice, dict):
                    point[path] = trial.suggest_float(path, choice["low"], choice["high"],
                                                      log=choice.get("log", False))
                else:
                    point[path] = trial.suggest_categorical(path, list(choice))
            cfg = resolve_trial(self.spec, point)
            attrs = {"config_hash": config_hash(cfg), "name": tpe_name(trial.number, cfg, tuple(self.spec.search.space)),
                     "groups": "tpe", "attempt": 0, "tpe": True, "config": json.dumps(to_dict(cfg))}
            if attrs["config_hash"] in known:
                trial.set_user_attr("tpe", True)
                self.ledger.storage.set_trial_user_attr(trial._trial_id, "status", "duplicate")
                self.ledger.storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
                continue
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            return self.ledger.hold(trial._trial_id, trial.number, attrs)
        return None

    def report(self, claim: Claim, epoch: int, value: float) -> bool:
        trial = optuna.trial.Trial(self.ledger.study, claim.trial_id)
        trial.report(value, epoch)
        return bool(trial.should_prune())


def open_ledger(spec: SweepSpec, storage: str | None) -> Ledger:
    """The sweep's Optuna study (TPE sampler and median pruner when the spec asks for TPE)."""
    sampler = pruner = None
    if spec.search.method == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.seeds[0])
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return Ledger(storage or default_storage(), spec.name, spec.execution.max_retries, sampler, pruner)


def plan_csv(trials: list[PlannedTrial]) -> str:
    """The plan as CSV: hash, name, groups, model, epochs, optimizer, lr, seed."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["hash", "name", "groups", "model", "epochs", "optimizer", "lr", "seed"])
    for t in trials:
        c = t.config
        writer.writerow([t.hash, t.name, ",".join(t.groups), c.model.name, c.train.epochs, c.optim.name,
                         c.optim.lr, c.train.seed])
    return buf.getvalue()


def prepare_datasets(spec: SweepSpec) -> None:
    """Decode and cache each distinct training dataset once, before trials start (they then read the cache)."""
    from trainers.data.dataset import prepare_data

    for role, cfg, size in datasets_to_prepare(spec):
        if role == "data":      # the production data waits for the production verb
            print(data_line(prepare_data(cfg, size).report, size))


def data_line(report, image_size: int) -> str:
    """'data: 76 images (train 54, ...) at 32 px; split mode: group; skipped 6 (empty 1, ...); dropped 3 not in
    data.classes (...); balanced by class: ...', then '; warning: ...' for each of the report's warnings."""
    splits = ", ".join(f"{k} {sum(v.values())}" for k, v in report.per_split.items())
    line = f"data: {report.usable} images ({splits}) at {image_size} px"
    if report.split_mode:
        line += f"; split mode: {report.split_mode}"
    line += f"; skipped {sum(report.skipped.values())}{_by_reason(report.skipped)}"
    if report.dropped:      # a folder (or a dataset's label) that names none of the classes
        line += f"; dropped {sum(report.dropped.values())} not in data.classes{_by_reason(report.dropped)}"
    if report.balance:
        line += f"; {balance_text(report.balance)}"
    return line + "".join(f"; warning: {w}" for w in report.warnings)


def _by_reason(counts: dict[str, int]) -> str:
    """' (empty 1, unreadable 2)': each reason (or label) and its count; '' when there is none."""
    return f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else ""


def start(spec: SweepSpec, ledger: Ledger, tracking: str | None, enqueue: bool) -> SweepContext:
    """Recover a crashed run's trials, open (or join) the parent run, and queue the plan."""
    recovered = ledger.recover_orphans() if ledger.url.startswith("sqlite") else 0
    if recovered:
        print(f"resuming: {recovered} trial(s) interrupted last time are queued again")
    uri = tracking_uri(tracking)
    trials = list(spec.plan)
    if not enqueue:
        known = ledger.parent_run() or wait_for_start(ledger, spec.name)
        parent = SweepParent.rejoin(uri, known)
        if parent is None:
            raise SweepError(f"sweep '{spec.name}' logs to parent run {known}, which {uri} does not have; "
                             "pass the --tracking-uri the sweep was started with")
        return SweepContext(spec, uri, parent.run_id, {t.hash: t for t in trials})
    with ledger.starting():     # sweeps started together: the first opens the parent run, the others join it
        parent = SweepParent.rejoin(uri, ledger.parent_run())
        fresh = parent is None
        if fresh:       # a new sweep, or a ledger lost: the sweep's newest parent run is reused if there is one
            parent = SweepParent.open(uri, spec.name, spec.description, source_tags(spec.path))
            parent.log_axes(sweep_axes(spec))
        parent.log_texts({"spec.yaml": Path(spec.path).read_text(encoding="utf-8"), "plan.csv": plan_csv(trials)})
        queue_plan(spec, ledger, functools.partial(ended_runs, uri, spec.name, parent.run_id))
        if fresh:
            ledger.set_parent_run(parent.run_id)    # after the queue is full: a worker waiting sees every trial
    return SweepContext(spec, uri, parent.run_id, {t.hash: t for t in trials})


def queue_plan(spec: SweepSpec, ledger: Ledger, ended: Callable[[], dict[str, Recorded]]) -> None:
    """Record in the ledger the trials MLflow holds as ended (read by `ended`) that it lacks: a lost ledger
    is rebuilt. Then queue the rest of the plan, each trial with its cost."""
    trials = list(spec.plan)
    latest = ledger.latest_by_hash()
    # MLflow is read when the ledger is empty (new, lost or emptied; a TPE sweep may plan no point) or
    # lacks a planned point or holds one failed. A resumed sweep's ledger holds them all, and reading
    # every run of a large sweep takes seconds.
    if not latest or any(t.hash not in latest or latest[t.hash].state == TrialState.FAIL for t in trials):
        rebuilt = ledger.reconcile(ended())
        if rebuilt:
            print(f"ledger: {rebuilt} trial(s) that ended in MLflow were missing from {ledger.safe_url}; "
                  "recorded from their runs, they do not run again")
    added = ledger.enqueue(trials, trial_costs(trials))
    done = len(trials) - added
    print(f"sweep '{spec.name}': {len(trials)} planned trials, {added} to run, {done} already done or queued")


def ended_runs(uri: str, sweep: str, parent_run_id: str | None) -> dict[str, Recorded]:
    """Config hash -> the newest run that ended for good (FINISHED: finished, diverged or pruned) under the
    sweep's parent run (parent_run_id, else its newest) in the store at uri, as the ledger records a trial."""
    ended: dict[str, Recorded] = {}
    for run in child_runs(store_client(uri), sweep, parent_run_id):    # oldest first: a newer one replaces it
        tags = run.data.tags
        if run.info.status != "FINISHED" or tags.get("status") not in ENDED or not tags.get("config_hash"):
            continue
        # The value the executor records: the final validation macro F1 of a finished trial, else 0.
        value = run.data.metrics.get("val_macro_f1", 0.0) if tags["status"] == "finished" else 0.0
        ended[tags["config_hash"]] = Recorded(run.info.run_id, tags["status"], value if math.isfinite(value) else 0.0,
                                              run.info.run_name or "", tags.get("groups", ""))
    return ended


def status_points(spec: SweepSpec, ledger: Ledger | None) -> dict[str, FrozenTrial]:
    """The latest trial of each grid point as `sweep` will leave the ledger once it rebuilt it from MLflow: the
    ledger's (None: it holds no study of the sweep) and, for each point only MLflow holds as ended, a trial
    made in memory from its run (number -1). `status` reads: no trial is written, no store created."""
    latest = ledger.latest_by_hash() if ledger is not None else {}
    uri = tracking_uri(create=False)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return latest
    try:
        ended = ended_runs(uri, spec.name, ledger.parent_run() if ledger is not None else None)
    except Exception as err:       # an unreachable store: the ledger alone is still worth showing
        print(f"warning: the sweep's runs in MLflow could not be read ({first_line(err)}); showing the ledger "
              "alone", file=sys.stderr)
        return latest
    return {**latest, **{h: recorded_trial(h, run) for h, run in unrecorded(latest, ended).items()}}


def trial_costs(trials: list[PlannedTrial]) -> dict[str, float]:
    """Each planned trial's cost (FLOPs), by config hash: the ledger claims the costliest first, so the sweep
    does not end on one long trial alone."""
    datas = {t.config.data for t in trials}
    # With one dataset its size cancels out: only count images (a walk of the folder) to weigh several.
    images = {d: (count_images(d) or 1) if len(datas) > 1 else 1 for d in datas}
    return {t.hash: trial_flop(t.config, images[t.config.data]) for t in trials}


def wait_for_start(ledger: Ledger, sweep: str) -> str:
    """A worker started before its sweep waits until `sweep` has queued the trials; returns the parent run."""
    print(f"waiting for sweep '{sweep}' to be started in {ledger.safe_url} (`python -m orchestrator sweep`); "
          "Ctrl-C to stop", flush=True)
    while (parent := ledger.parent_run()) is None:
        time.sleep(START_POLL_SECONDS)
    return parent


def run_sweep(spec: SweepSpec, storage: str | None = None, tracking: str | None = None,
              gpus: list[int] | None = None, jobs: int | None = None, enqueue: bool = True) -> SweepOutcome:
    """Run (or resume, or join) the sweep on this host's slots until no trial is left."""
    started = time.perf_counter()
    if gpus is None and jobs is None:
        gpus, jobs = (list(spec.execution.gpus) if spec.execution.gpus else None), None
        if not gpus:
            from orchestrator.sweep.executor import visible_gpus
            jobs = None if visible_gpus() else spec.execution.jobs
    slots = make_slots(gpus, jobs, spec.execution.trials_per_gpu)
    url = storage or default_storage()
    take_host_lock(url)         # before any trainer process starts: a second sweep here is refused at once
    ledger = open_ledger(spec, url)
    ready = start_trainers(slots)      # their imports overlap the parent run and the data
    try:
        ctx = start(spec, ledger, tracking, enqueue)
    except BaseException:
        stop_trainers(ready)
        raise
    search = TpeTrials(spec, ledger) if spec.search.method == "tpe" else None
    hooks = ctx.hooks(search, sweep_folders(spec, storage, tracking))
    executor = Executor(ledger, slots, WORK_DIR / spec.name, hooks, ready)
    try:
        prepare_datasets(spec)
    except BaseException:       # bad data or Ctrl-C before any trial: close the parent, keep the queue
        executor.close_trainers()
        SweepParent(ctx.tracking_uri, ctx.parent_run_id).kill()
        raise
    interrupted = follow(executor, ledger)
    counts = dict(ledger.counts())
    if enqueue:     # the process that started the sweep closes its parent run; workers only join
        SweepParent(ctx.tracking_uri, ctx.parent_run_id).finish(counts, interrupted)
    if spec.tracking.log_model == BEST_K or kept_files(spec):     # (weights kept under an earlier setting too)
        complete = executor.disk_full is None and not (interrupted or counts.get("waiting") or counts.get("running")
                                                       or (search and search.has_more()))
        with ledger.starting():     # one host decides at a time; the next finds the runs decided
            decide_kept_models(spec, store_client(ctx.tracking_uri), ctx.parent_run_id, complete)
    if executor.disk_full is not None:      # stopped while closing the runs and trials still fitted
        raise executor.disk_full
    return SweepOutcome(counts, ctx.parent_run_id, time.perf_counter() - started,
                        executor.progress.train_seconds, interrupted)


def follow(executor: Executor, ledger: Ledger) -> bool:
    """Run the executor and show live progress; Ctrl-C stops claiming and stops trials cleanly."""
    from orchestrator.sweep.display import LiveProgress

    display = LiveProgress(executor, ledger)
    executor.run()
    interrupted = False
    try:
        display.until(executor.alive)
    except KeyboardInterrupt:
        interrupted = True
        print("\nstopping: no new trials; running trials are interrupted and will resume on the next run")
        executor.stop()
        display.until(executor.alive)
    display.close()
    return interrupted
