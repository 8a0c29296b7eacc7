"""The ledger against loss and misuse: MLflow is the record of results, so a lost, emptied or corrupt
ledger is rebuilt from the sweep's finished runs and nothing finished runs again; the report counts one
run per configuration and seed; a second sweep on the host is refused at once; re-queued trials are
claimed costliest first. Real sweeps, real sqlite stores."""
from __future__ import annotations

import csv
import random
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from orchestrator.results.report import write_report
from orchestrator.results.runs import child_runs
from orchestrator.sweep.ledger import Ledger, LedgerError, take_host_lock
from orchestrator.sweep.plan import trial_flop
from orchestrator.sweep.spec import load_spec

SWEEP = "lost"


@pytest.fixture(scope="module")
def swept(tmp_path_factory, orchestrate, write_spec) -> Path:
    """A folder where a real two-trial sweep (one epoch each) has finished; tests work on copies of it."""
    folder = tmp_path_factory.mktemp("swept")
    spec_path = write_spec(folder, SWEEP, {"lr": {"grid": {"optim.lr": [1e-3, 2e-3]}}})
    done = orchestrate(folder, "sweep", str(spec_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return folder


@pytest.fixture
def copy_of_sweep(swept, tmp_path) -> Path:
    shutil.copytree(swept, tmp_path, dirs_exist_ok=True)
    return tmp_path


def finished_runs(folder: Path) -> dict[str, list]:
    """config hash -> the sweep's finished child runs of it."""
    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    by_hash: dict[str, list] = {}
    for run in child_runs(client, SWEEP, status="finished"):
        by_hash.setdefault(run.data.tags["config_hash"], []).append(run)
    return by_hash


def epochs_trained(folder: Path) -> dict[str, int]:
    """config hash -> how many epochs its trial logs say were trained."""
    return {log.parent.name: log.read_text().count("epoch 1/1")
            for log in (folder / "mlruns" / "sweeps" / SWEEP).glob("*/log.txt")}


def test_an_emptied_ledger_is_rebuilt_from_mlflow_so_status_counts_and_the_sweep_reruns_nothing(
        copy_of_sweep, orchestrate):
    trained = epochs_trained(copy_of_sweep)
    (copy_of_sweep / "mlruns" / "optuna.db").write_bytes(b"")
    status = orchestrate(copy_of_sweep, "status", f"{SWEEP}.yaml")
    assert status.returncode == 0, status.stderr[-3000:]
    assert "finished 2" in status.stdout

    again = orchestrate(copy_of_sweep, "sweep", f"{SWEEP}.yaml", "--jobs", "1")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "0 to run" in again.stdout
    runs = finished_runs(copy_of_sweep)
    assert len(runs) == 2 and all(len(r) == 1 for r in runs.values()), runs
    assert epochs_trained(copy_of_sweep) == trained
    # The ledger is whole again: each point finished, with its run and value, as if it had never been lost.
    latest = Ledger(f"sqlite:///{copy_of_sweep / 'mlruns' / 'optuna.db'}", SWEEP, 0).latest_by_hash()
    for config_hash, (run,) in runs.items():
        assert latest[config_hash].user_attrs["status"] == "finished"
        assert latest[config_hash].user_attrs["run_id"] == run.info.run_id
        assert latest[config_hash].value == pytest.approx(run.data.metrics["val_macro_f1"])


def test_a_corrupt_ledger_stops_with_one_line_naming_it_and_once_moved_aside_mlflow_still_counts(copy_of_sweep,
                                                                                                 orchestrate):
    ledger = copy_of_sweep / "mlruns" / "optuna.db"
    ledger.write_bytes(random.Random(0).randbytes(8192))
    for verb in ("sweep", "status"):
        refused = orchestrate(copy_of_sweep, verb, f"{SWEEP}.yaml")
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr
        (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert "mlruns/optuna.db" in line and "move it aside" in line and "MLflow" in line
    # Moved aside, the ledger is missing: `status` counts what MLflow holds, and a sweep rebuilds the ledger
    # from it as from an emptied one (the test above).
    ledger.rename(ledger.with_name("optuna.db.bad"))
    status = orchestrate(copy_of_sweep, "status", f"{SWEEP}.yaml")
    assert status.returncode == 0 and "finished 2" in status.stdout, status.stdout[-2000:] + status.stderr[-3000:]
    assert not ledger.exists()              # status reads: it made no ledger


def test_the_report_counts_two_finished_runs_of_one_config_and_seed_as_one_seed(copy_of_sweep):
    # A second finished run of a trial already finished (as a lost ledger used to make): a copy of its
    # run with another score, started later. The newer one stands; neither is a second seed.
    client = MlflowClient(f"sqlite:///{copy_of_sweep / 'mlruns' / 'mlflow.db'}")
    spec = load_spec(copy_of_sweep / f"{SWEEP}.yaml")
    first = next(r for r in child_runs(client, SWEEP) if r.data.tags["config_hash"] == spec.plan[0].hash)
    tags = {k: v for k, v in first.data.tags.items() if k != "mlflow.runName"}
    twin = client.create_run(first.info.experiment_id, run_name=first.info.run_name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = {**first.data.metrics, "test_macro_f1": 0.5, "test_macro_f1_ci_low": 0.4, "test_macro_f1_ci_high": 0.6}
    client.log_batch(twin, metrics=[Metric(k, v, now, 1) for k, v in metrics.items()],
                     params=[Param(k, v) for k, v in first.data.params.items()])
    client.set_terminated(twin, "FINISHED")

    out = copy_of_sweep / "report"
    write_report(spec, client, out)
    with (out / "lr.csv").open(newline="") as f:
        row = next(r for r in csv.DictReader(f) if float(r["optim.lr"]) == spec.plan[0].config.optim.lr)
    assert row["n"] == "1" and row["runs"] == twin
    assert float(row["test_macro_f1"]) == pytest.approx(50.0)
    text = (out / "report.md").read_text()
    assert "One seed per trial" in text and "1 duplicate" in text


def test_a_second_sweep_on_this_host_is_refused_within_seconds(in_tmp, orchestrate, trainer_processes, write_spec):
    spec_path = write_spec(in_tmp, "busy", {"lr": {"grid": {"optim.lr": [1e-3, 2e-3]}}})
    take_host_lock(f"sqlite:///{in_tmp / 'mlruns' / 'optuna.db'}")      # as a sweep running here holds it
    started = time.monotonic()
    refused = orchestrate(in_tmp, "sweep", str(spec_path))
    seconds = time.monotonic() - started
    assert refused.returncode == 2 and "another orchestrator" in refused.stderr, refused.stderr[-3000:]
    assert not trainer_processes(in_tmp)
    # Against the same command line reading the same spec (`plan`): the refusal adds the lock, not the
    # seconds of importing MLflow and starting trainer processes (before: ~7 s on 2 cores, ~27 s on a busy host).
    started = time.monotonic()
    assert orchestrate(in_tmp, "plan", str(spec_path)).returncode == 0
    baseline = time.monotonic() - started
    assert seconds < baseline + 3, (seconds, baseline)


def test_requeued_trials_are_claimed_costliest_first(tmp_path, write_spec):
    spec = load_spec(write_spec(tmp_path, "order", {"epochs": {"grid": {"train.epochs": [1, 2, 3]}}}))
    ledger = Ledger(f"sqlite:///{tmp_path / 'optuna.db'}", "order", max_retries=1)
    ledger.enqueue(list(spec.plan), {t.hash: trial_flop(t.config, 1) for t in spec.plan})

    def epochs(claim) -> int:
        return next(t.config.train.epochs for t in spec.plan if t.hash == claim.config_hash)

    longest = ledger.claim()
    second = ledger.claim()
    assert (epochs(longest), epochs(second)) == (3, 2)
    assert ledger.fail(longest, "out of memory", retriable=True)      # its retry goes to the queue's end
    ledger.release(second)                                              # so does an interrupted trial
    assert [epochs(ledger.claim()) for _ in range(3)] == [3, 2, 1]
    assert ledger.claim() is None


def test_a_locked_ledger_costs_a_running_trial_a_heartbeat_not_its_life(tmp_path, write_spec, capsys):
    spec = load_spec(write_spec(tmp_path, "locked", {"lr": {"grid": {"optim.lr": [1e-3]}}}))
    path = tmp_path / "optuna.db"
    ledger = Ledger(f"sqlite:///{path}", "locked", max_retries=1)
    ledger.enqueue(list(spec.plan))
    claim = ledger.claim()
    # The ledger's connections give up on a lock after 0.2 s here instead of a minute.
    sqlalchemy.event.listen(ledger.storage.engine, "connect",
                            lambda conn, _: conn.execute("PRAGMA busy_timeout = 200"))
    ledger.storage.engine.dispose()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")       # another process writing, for longer than the ledger waits
    try:
        ledger.beat(claim.trial_id)
        ledger.set_run_id(claim.trial_id, "run-1")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    warned = capsys.readouterr().err
    assert "heartbeat for trial" in warned and "run id of trial" in warned and "locked" in warned
    ledger.beat(claim.trial_id)             # the lock gone, the trial is still this worker's to finish
    assert ledger.finish(claim, "finished", 0.5, "run-1")


def test_a_ledger_damaged_mid_file_is_refused_at_open_with_the_one_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    ledger = Ledger(url, "damaged", max_retries=1)
    for i in range(300):
        ledger.study.enqueue_trial({}, user_attrs={"config_hash": f"{i:016x}", "attempt": 0, "config": "{}" * 50})
    ledger.storage.engine.dispose()
    data = bytearray((tmp_path / "optuna.db").read_bytes())
    # 200 bytes inside a page of trial rows two thirds into the file: sqlite opens it and Optuna loads the
    # study; only reading the trials (claiming, counting) meets "database disk image is malformed".
    page = len(data) // 4096 * 2 // 3 * 4096
    data[page + 100:page + 300] = random.Random(0).randbytes(200)
    (tmp_path / "optuna.db").write_bytes(bytes(data))
    with pytest.raises(LedgerError) as refused:
        Ledger(url, "damaged", max_retries=1)
    line = str(refused.value)
    assert "\n" not in line and "optuna.db" in line and "move it aside" in line and "MLflow" in line


def test_status_with_an_unreachable_postgresql_ledger_says_so_in_one_line(in_tmp, orchestrate, write_spec):
    spec_path = write_spec(in_tmp, "away", {"lr": {"grid": {"optim.lr": [1e-3]}}})
    shown = orchestrate(in_tmp, "status", str(spec_path), "--storage", "postgresql://nobody@127.0.0.1:1/x",
                        timeout=120)
    assert shown.returncode == 2, shown.stdout[-2000:] + shown.stderr[-3000:]
    assert "Traceback" not in shown.stderr
    (line,) = [line for line in shown.stderr.splitlines() if line.startswith("error:")]
    assert "postgresql://nobody@127.0.0.1:1/x" in line and "--storage" in line
