"""Sweeps end to end: real Optuna storage, real MLflow store, real trainer processes, in tmp_path."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from orchestrator.sweep.ledger import Ledger
from orchestrator.results.runs import child_runs
from orchestrator.sweep.spec import load_spec
from orchestrator.sweep.runner import TpeTrials
from trainers.tracking import find_parent_run

def finished_children(client: MlflowClient, sweep: str) -> dict[str, list]:
    by_hash: dict[str, list] = {}
    for run in child_runs(client, sweep):
        by_hash.setdefault(run.data.tags["config_hash"], []).append(run)
    return by_hash


def test_each_grid_point_runs_once_as_a_child_of_one_parent(in_tmp, orchestrate, store, write_spec):
    spec_path = write_spec(in_tmp, "two", {"lr": {"grid": {"optim.lr": [1e-3, 3e-3]}},
                                           "again": {"grid": {"optim.lr": [1e-3]}}})
    done = orchestrate(in_tmp, "sweep", str(spec_path), "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    plan = list(load_spec(spec_path).plan)
    runs = finished_children(store(in_tmp), "two")
    assert sorted(runs) == sorted(t.hash for t in plan)
    assert all(len(r) == 1 and r[0].info.status == "FINISHED" for r in runs.values())
    shared = next(t for t in plan if t.config.optim.lr == 1e-3)
    tags = runs[shared.hash][0].data.tags
    assert tags["groups"] == "lr,again" and tags["sweep"] == "two" and tags["status"] == "finished"
    assert tags["mlflow.runName"] == shared.name and "optuna_trial" in tags
    parent = find_parent_run(store(in_tmp), "two")
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_finished"] == "2"
    artifacts = {a.path for a in store(in_tmp).list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "plan.csv"} <= artifacts
    assert (in_tmp / "mlruns" / "sweeps" / "two" / shared.hash / "log.txt").read_text().count("epoch 1/1") == 1

    again = orchestrate(in_tmp, "sweep", str(spec_path), "--jobs", "2")
    assert again.returncode == 0 and "0 to run" in again.stdout
    assert all(len(r) == 1 for r in finished_children(store(in_tmp), "two").values())

    status = orchestrate(in_tmp, "status", str(spec_path))
    assert status.returncode == 0 and "finished 2" in status.stdout

    # An orchestrator killed after a trial's run was FINISHED in MLflow but before the ledger heard of it
    # leaves the trial queued again: the next sweep takes it from MLflow instead of running it twice.
    ledger = Ledger(f"sqlite:///{in_tmp / 'mlruns' / 'optuna.db'}", "two", 0)
    finished = ledger.latest_by_hash()[shared.hash]
    attrs = {k: v for k, v in finished.user_attrs.items() if k not in ("status", "run_id", "worker")}
    ledger.study.enqueue_trial({}, user_attrs={**attrs, "attempt": 1})
    third = orchestrate(in_tmp, "sweep", str(spec_path), "--jobs", "2")
    assert third.returncode == 0, third.stderr[-3000:]
    runs = finished_children(store(in_tmp), "two")
    assert all(len(r) == 1 for r in runs.values())
    assert ledger.latest_by_hash()[shared.hash].user_attrs["run_id"] == runs[shared.hash][0].info.run_id
    assert (in_tmp / "mlruns" / "sweeps" / "two" / shared.hash / "log.txt").read_text().count("epoch 1/1") == 1


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(in_tmp, clean_env, orchestrate, store,
                                                                  write_spec):
    spec_path = write_spec(in_tmp, "kill", {"lr": {"grid": {"optim.lr": [1e-3, 2e-3, 3e-3, 4e-3]}}},
                           defaults={"model": "vit", "optim": {"name": "adam", "lr": 1e-3},
                                     "train": {"epochs": 3, "batch_size": 16}})
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(spec_path), "--jobs", "1"],
                            cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=clean_env())
    db = in_tmp / "mlruns" / "optuna.db"
    deadline = time.monotonic() + 300
    first_done = None
    while time.monotonic() < deadline and first_done is None:
        time.sleep(1)
        if db.exists():
            try:
                study = optuna.load_study(study_name="kill", storage=f"sqlite:///{db}")
                complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
                running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
                if complete and running:
                    first_done = complete[0]
            except (KeyError, Exception):
                continue
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_done is not None, "the sweep never finished a first trial"
    done = orchestrate(in_tmp, "sweep", str(spec_path), "--jobs", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interrupted last time are queued again" in done.stdout
    runs = finished_children(store(in_tmp), "kill")
    assert len(runs) == 4 and all(len(r) == 1 for r in runs.values())
    assert all(r[0].info.status == "FINISHED" and r[0].data.tags["status"] == "finished" for r in runs.values())
    kept = runs[first_done.user_attrs["config_hash"]][0]
    assert kept.info.run_id == first_done.user_attrs["run_id"]        # not run again
    for (r,) in runs.values():
        steps = [m.step for m in store(in_tmp).get_metric_history(r.info.run_id, "val_macro_f1")]
        assert sorted(set(steps)) == [1, 2, 3]
    everything = store(in_tmp).search_runs([store(in_tmp).get_experiment_by_name("kill").experiment_id])
    assert not [r for r in everything if r.info.status == "RUNNING"]


def test_unreadable_weights_fail_their_trial_at_once_while_the_others_finish(in_tmp, orchestrate, tiny_vit,
                                                                             write_spec):
    (in_tmp / "broken.pth").write_bytes(b"\x80\x02truncated download")
    spec_path = write_spec(in_tmp, "crash", {"models": {"grid": {"model": ["vit", "resnet"]}}},
                           models={"vit": tiny_vit, "resnet": {"name": "resnet50", "image_size": 32,
                                                               "pretrained": str(in_tmp / "broken.pth")}})
    done = orchestrate(in_tmp, "sweep", str(spec_path), "--jobs", "2")
    assert done.returncode == 1
    assert "failed 1" in done.stdout and "finished 1" in done.stdout
    study = optuna.load_study(study_name="crash", storage=f"sqlite:///{in_tmp / 'mlruns' / 'optuna.db'}")
    assert sorted(t.user_attrs.get("status") for t in study.get_trials()) == ["failed", "finished"]
    failed = next(t for t in study.get_trials() if t.user_attrs.get("status") == "failed")
    assert failed.user_attrs["attempt"] == 0       # a bad file is not retried
    assert "broken.pth' is not a readable state dict" in failed.user_attrs["error"]


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds trainer processes through /proc")
def test_a_trainer_killed_mid_trial_is_retried_and_resumes_its_run(in_tmp, clean_env, store, trainer_processes,
                                                                   write_spec):
    spec_path = write_spec(in_tmp, "oom", {"lr": {"grid": {"optim.lr": [1e-3]}}},
                           defaults={"model": "vit", "optim": {"name": "adam", "lr": 1e-3},
                                     "train": {"epochs": 3, "batch_size": 16}})
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(spec_path), "--jobs", "1"],
                            cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env())
    log = in_tmp / "mlruns" / "sweeps" / "oom" / load_spec(spec_path).plan[0].hash / "log.txt"
    deadline = time.monotonic() + 300
    # Once epoch 2 is reported, epoch 1's checkpoint is surely on disk.
    while time.monotonic() < deadline and not (log.exists() and "epoch 2/3" in log.read_text()):
        time.sleep(0.5)
    for pid in trainer_processes(in_tmp):     # what the kernel's OOM killer would do
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert "retried" in out
    (run,) = finished_children(store(in_tmp), "oom").values()
    assert len(run) == 1 and run[0].data.tags["status"] == "finished"
    steps = [m.step for m in store(in_tmp).get_metric_history(run[0].info.run_id, "val_macro_f1")]
    assert sorted(set(steps)) == [1, 2, 3] and steps.count(1) == 1     # epoch 1 was not trained again
    assert log.read_text().count("--- attempt") == 2


def test_tpe_samples_its_budget_and_the_median_rule_prunes_a_lagging_trial(in_tmp, orchestrate, write_spec):
    spec_path = write_spec(in_tmp, "tpe", {"base": {"grid": {"optim.lr": [1e-3]}}},
                           search={"method": "tpe", "n_trials": 3,
                                   "space": {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}})
    done = orchestrate(in_tmp, "sweep", str(spec_path), "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    spec = load_spec(spec_path)
    ledger = Ledger(f"sqlite:///{in_tmp / 'mlruns' / 'optuna.db'}", "tpe", 0)
    sampled = [t for t in ledger.latest_by_hash().values() if t.user_attrs.get("tpe")]
    assert len(sampled) == 3 and len({t.params["optim.lr"] for t in sampled}) == 3
    assert all(1e-4 <= t.params["optim.lr"] <= 1e-2 for t in sampled)
    # The pruning decision itself, on the same real study: three trials at 0.8, a fourth at 0.1.
    spec = dataclasses.replace(spec, search=dataclasses.replace(spec.search, n_trials=4))
    tpe = TpeTrials(spec, Ledger(f"sqlite:///{in_tmp / 'prune.db'}", "tpe", 0,
                                 pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)))
    claims = [tpe.new_claim() for _ in range(4)]
    for c in claims[:3]:
        assert tpe.report(c, 1, 0.8) is False
        tpe.ledger.finish(c, "finished", 0.8, None)
    assert tpe.report(claims[3], 1, 0.1) is True


class PruneAtOnce:
    """A supervisor (what `trainers serve` is to a trial) that asks the trial to stop from its first epoch."""

    def __init__(self):
        self.sent = []

    def send(self, message) -> None:
        self.sent.append(message)

    def stop_requested(self) -> str | None:
        return "pruned by the median rule"


def test_a_stop_request_prunes_a_running_trial(tmp_path, tiny_trial):
    from trainers.config import from_dict
    from trainers.process.protocol import Epoch, Started
    from trainers.run import run_trial

    supervisor = PruneAtOnce()
    outcome = run_trial(from_dict(tiny_trial(tmp_path, train={"epochs": 3})), supervisor=supervisor)
    assert outcome.status == "pruned"
    assert [type(m) for m in supervisor.sent] == [Started, Epoch] and supervisor.sent[1].epoch == 1
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(outcome.run_id)
    assert run.data.tags["status"] == "pruned" and "test_macro_f1" not in run.data.metrics


class PruneEveryEpoch:
    """A search (TPE's place in the executor) whose median rule prunes every trial at its first epoch."""

    def __init__(self):
        self.reported: list[int] = []

    def new_claim(self):
        return None

    def has_more(self) -> bool:
        return False

    def report(self, claim, epoch: int, value: float) -> bool:
        self.reported.append(epoch)
        return True


def test_the_executor_stops_a_trial_its_search_prunes_and_records_it_pruned(in_tmp, write_spec):
    import functools

    from orchestrator.sweep.executor import Executor, SweepHooks, make_slots
    from orchestrator.sweep.runner import SweepContext
    from trainers.tracking import close_dead_run, open_parent_run

    spec_path = write_spec(in_tmp, "prune", {"lr": {"grid": {"optim.lr": [1e-3]}}},
                           defaults={"model": "vit", "optim": {"name": "adam", "lr": 1e-3},
                                     "train": {"epochs": 5, "batch_size": 16}})
    spec = load_spec(spec_path)
    plan = spec.plan
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    ledger = Ledger(f"sqlite:///{in_tmp / 'optuna.db'}", "prune", 0)
    ledger.enqueue(plan)
    ctx = SweepContext(spec, uri, open_parent_run(MlflowClient(uri), "prune"), {t.hash: t for t in plan})
    search = PruneEveryEpoch()
    executor = Executor(ledger, make_slots(None, 1), in_tmp / "work",
                        SweepHooks(ctx.trial_config, functools.partial(close_dead_run, uri), search))
    executor.run()
    deadline = time.monotonic() + 300
    while executor.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [e.status for e in executor.progress.events] == ["pruned"], executor.progress.events
    (trial,) = ledger.latest_by_hash().values()
    assert trial.user_attrs["status"] == "pruned" and 1 <= len(search.reported) < 5
    run = MlflowClient(uri).get_run(trial.user_attrs["run_id"])     # the id the trainer sent in `started`
    assert run.data.tags["status"] == "pruned" and run.info.status == "FINISHED"
