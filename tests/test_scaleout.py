"""Scale-out: one sweep shared by worker processes through PostgreSQL and a real MLflow server.

Each worker runs in its own folder, as it would on its own host: its own data cache, checkpoints
and trial logs; only the Optuna study (a fresh PostgreSQL database per test) and the MLflow
server (started here on a free loopback port) are shared.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType
from optuna.trial import TrialState

from orchestrator.__main__ import main
from orchestrator.sweep.ledger import Ledger
from orchestrator.sweep.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
# Short heartbeats so that a killed worker's trial is taken over in seconds, not a minute.
FAST_HEARTBEATS = {"FER_HEARTBEAT_SECONDS": "1", "FER_GRACE_SECONDS": "6"}
EPOCHS = 8          # the kill test's trials: long enough to be killed mid-way


# --- PostgreSQL and the MLflow server ------------------------------------------------------------

def postgres_reachable() -> bool:
    """A PostgreSQL driver is installed and the server on 127.0.0.1:5432 lets us in."""
    try:
        import psycopg
    except ImportError:
        return False
    try:
        psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=3).close()
        return True
    except psycopg.OperationalError:
        return False


def require_postgres() -> None:
    """Skip without PostgreSQL, unless FER_REQUIRE_POSTGRES says it must be there (CI)."""
    if postgres_reachable():
        return
    if os.environ.get("FER_REQUIRE_POSTGRES"):
        pytest.fail("PostgreSQL on 127.0.0.1:5432 is unreachable and FER_REQUIRE_POSTGRES is set")
    pytest.skip("PostgreSQL on 127.0.0.1:5432 is unreachable (FER_REQUIRE_POSTGRES=1 makes this a failure)")


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database; dropped afterwards, connections and all."""
    import psycopg

    name = f"fer_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def storage() -> Iterator[str]:
    require_postgres()
    with fresh_database() as url:
        yield url


@dataclass(frozen=True)
class Server:
    url: str
    artifacts: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[Server]:
    """`mlflow server` on a free loopback port, over a fresh PostgreSQL database, artifacts proxied."""
    require_postgres()
    folder = tmp_path_factory.mktemp("mlflow-server")
    with fresh_database() as backend:
        port = free_port()
        log = (folder / "server.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_answering(url, proc, folder / "server.log")
            yield Server(url, folder / "artifacts")
        finally:
            stop_group(proc)
            log.close()


def wait_until_answering(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer within {timeout:.0f}s: {log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- sweeps in separate folders ("hosts") ---------------------------------------------------------

def child_env(**extra: str) -> dict:
    """This repo importable, offline, no tracking URI inherited from other tests."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **extra}


def write_spec(host: Path, name: str, lrs: list[float], epochs: int, tiny_vit: dict) -> Path:
    """The same tiny spec on a host: tiny ViT at 32 px, 120 synthetic images, one trial per lr."""
    spec = {"name": name, "data": {"source": "synthetic", "synthetic": {"n_images": 120, "draw_size": 32}},
            "models": {"vit": tiny_vit},
            "defaults": {"model": "vit", "optim": {"name": "adam", "lr": lrs[0]},
                         "train": {"epochs": epochs, "batch_size": 16}},
            "experiments": {"lr": {"grid": {"optim.lr": lrs}}},
            "execution": {"jobs": 1, "max_retries": 1}}
    host.mkdir(parents=True, exist_ok=True)
    path = host / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def start(host: Path, verb: str, spec: Path, storage: str, server: Server) -> subprocess.Popen:
    """`python -m orchestrator sweep|worker` on one host (named after its folder), with one CPU slot."""
    log = (host / f"{verb}.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "orchestrator", verb, str(spec), "--storage", storage,
                             "--tracking-uri", server.url, "--jobs", "1"],
                            cwd=host, stdout=log, stderr=subprocess.STDOUT,
                            env=child_env(FER_WORKER_NAME=host.name, **FAST_HEARTBEATS))


def finish(proc: subprocess.Popen, host: Path, verb: str, timeout: float = 240) -> str:
    proc.wait(timeout=timeout)
    out = (host / f"{verb}.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def wait_for_line(log: Path, line: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def trials_logged_on(host: Path, sweep: str) -> set[str]:
    """Config hashes whose trial log is in this host's work folder (it ran at least an attempt)."""
    return {p.parent.name for p in (host / "mlruns" / "sweeps" / sweep).glob("*/log.txt")}


def status(spec: Path, storage: str, capsys) -> str:
    """`python -m orchestrator status SPEC --storage URL`, in this process (its imports are done)."""
    capsys.readouterr()
    assert main(["status", str(spec), "--storage", storage]) == 0
    return capsys.readouterr().out


def sweep_runs(server: Server, sweep: str) -> tuple[list, list]:
    """The sweep's parent runs and trial runs on the server (every run of its experiment)."""
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(sweep)
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    return ([r for r in runs if r.data.tags.get("role") == "sweep"],
            [r for r in runs if r.data.tags.get("role") == "trial"])


def study_trials(storage: str, sweep: str) -> list:
    return Ledger(storage, sweep, 1).study.get_trials(deepcopy=False)


def at_once(work, items) -> list:
    """work(item) for every item, each in its own thread, all at the same time."""
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(work, items))


def open_runs(server: Server, sweep: str) -> list:
    """The sweep's trial runs MLflow still shows RUNNING."""
    return [r for r in sweep_runs(server, sweep)[1] if r.info.status == "RUNNING"]


# --- the tests ------------------------------------------------------------------------------------

def test_ledgers_opened_at_once_on_a_fresh_database_claim_each_trial_once(storage):
    def drain(ledger: Ledger) -> list[str]:
        got = []
        while (claim := ledger.claim()) is not None:
            got.append(claim.config_hash)
        return got

    # Workers starting at the same moment race to create Optuna's tables; each must still open.
    ledgers = at_once(lambda _: Ledger(storage, "race", 1), range(4))
    for i in range(24):
        ledgers[0].study.enqueue_trial({}, user_attrs={"config_hash": f"h{i}", "name": f"t{i}", "attempt": 0})
    claimed = [h for got in at_once(drain, ledgers) for h in got]
    assert sorted(claimed) == sorted(f"h{i}" for i in range(24))      # each once, none lost
    assert ledgers[0].counts() == {"running": 24}


def test_two_workers_split_a_sweep_and_run_every_trial_once(tmp_path, storage, mlflow_server, capsys, tiny_vit):
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    spec_a = write_spec(a, "split", [1e-3, 2e-3, 3e-3], epochs=1, tiny_vit=tiny_vit)
    spec_b = write_spec(b, "split", [1e-3, 2e-3, 3e-3], epochs=1, tiny_vit=tiny_vit)
    worker = start(b, "worker", spec_b, storage, mlflow_server)      # before the sweep exists: it waits
    wait_for_line(b / "worker.log", "waiting for sweep 'split' to be started", worker)
    sweep = start(a, "sweep", spec_a, storage, mlflow_server)
    finish(sweep, a, "sweep")
    finish(worker, b, "worker")

    planned = {t.hash for t in load_spec(spec_a).plan}
    trials = study_trials(storage, "split")
    assert len(trials) == 3, [(t.number, t.state.name, t.user_attrs.get("status"), t.user_attrs.get("error"))
                              for t in trials]                        # no retry, no duplicate
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["status"] == "finished" for t in trials)
    assert sorted(t.user_attrs["config_hash"] for t in trials) == sorted(planned)
    ran_a, ran_b = trials_logged_on(a, "split"), trials_logged_on(b, "split")
    assert ran_a and ran_b and not ran_a & ran_b and ran_a | ran_b == planned
    assert {t.user_attrs["worker"] for t in trials} == {"host-a/cpu0", "host-b/cpu0"}

    (parent,), children = sweep_runs(mlflow_server, "split")
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_finished"] == "3"
    assert sorted(r.data.tags["config_hash"] for r in children) == sorted(planned)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" and r.data.tags["status"] == "finished" for r in children)
    assert {t.user_attrs["run_id"] for t in trials} == {r.info.run_id for r in children}
    # Artifacts went through the server's proxy into its artifact store.
    names = {f.path for f in MlflowClient(mlflow_server.url).list_artifacts(children[0].info.run_id)}
    assert any("confusion" in n for n in names), names
    assert any(mlflow_server.artifacts.rglob("*.png"))

    shown = status(spec_a, storage, capsys)
    assert "waiting 0, running 0, finished 3" in shown and "fer_test_" in shown
    for t in trials:        # each trial's row says where it ran
        (row,) = [line for line in shown.splitlines() if t.user_attrs["run_id"] in line]
        assert " finished " in row and t.user_attrs["worker"] in row, shown


def test_a_worker_killed_mid_trial_has_its_trial_finished_by_the_other(tmp_path, storage, mlflow_server, capsys,
                                                                       tiny_vit):
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    # Eight short epochs: long enough to kill a trial in the middle of its training.
    spec_a = write_spec(a, "kill", [1e-3, 2e-3, 3e-3], epochs=EPOCHS, tiny_vit=tiny_vit)
    spec_b = write_spec(b, "kill", [1e-3, 2e-3, 3e-3], epochs=EPOCHS, tiny_vit=tiny_vit)
    sweep = start(a, "sweep", spec_a, storage, mlflow_server)
    worker = start(b, "worker", spec_b, storage, mlflow_server)
    killed = wait_for_training_on(b, "kill", storage, worker, sweep)
    worker.send_signal(signal.SIGKILL)        # the host is gone: no goodbye, no more heartbeats
    worker.wait()
    # Until the grace period ends, the ledger still shows the trial running where it was.
    shown = status(spec_a, storage, capsys)
    rows = [line for line in shown.splitlines() if "host-b/cpu0" in line and " running " in line]
    assert len(rows) == 1, shown
    out = finish(sweep, a, "sweep")
    assert "finished 3" in out

    trials = study_trials(storage, "kill")
    by_hash: dict[str, list] = {}
    for t in trials:
        by_hash.setdefault(t.user_attrs["config_hash"], []).append(t)
    assert len(by_hash) == 3 and len(trials) == 4                    # one extra attempt: the killed one
    first, retry = sorted(by_hash[killed], key=lambda t: t.number)
    assert first.state == TrialState.FAIL and first.user_attrs["status"] == "retried"
    assert "stopped sending heartbeats" in first.user_attrs["error"]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["status"] == "finished"
    assert retry.user_attrs["retry_of"] == first.number and retry.user_attrs["attempt"] == 1
    assert killed in trials_logged_on(a, "kill")                      # host a finished it
    for others in (v for h, v in by_hash.items() if h != killed):
        assert [t.user_attrs["status"] for t in others] == ["finished"]

    (parent,), children = sweep_runs(mlflow_server, "kill")
    assert parent.info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["config_hash"] for r in finished) == sorted(by_hash)
    assert all(r.data.tags["status"] == "finished" for r in finished)
    # The dead worker's run was closed by the one that reaped its trial, not left RUNNING.
    (orphan,) = [r for r in children if r.info.status != "FINISHED"]
    assert orphan.info.run_id == first.user_attrs["run_id"]
    assert orphan.info.status == "KILLED" and orphan.data.tags["status"] == "killed"
    assert orphan.data.tags["config_hash"] == killed


def test_sweeps_started_at_the_same_moment_queue_each_grid_point_once(tmp_path, storage, tiny_vit):
    plan = load_spec(write_spec(tmp_path, "together", [1e-4 * (i + 1) for i in range(8)], 1, tiny_vit)).plan
    ledgers = at_once(lambda _: Ledger(storage, "together", 1), range(4))    # four `sweep` commands...
    ready = threading.Barrier(len(ledgers))

    def enqueue(ledger: Ledger) -> int:
        ready.wait()                                                           # ...queueing at one moment
        return ledger.enqueue(plan)

    added = at_once(enqueue, ledgers)
    queued = sorted(t.user_attrs["config_hash"] for t in study_trials(storage, "together"))
    assert queued == sorted(t.hash for t in plan) and sum(added) == len(plan), added


def test_sweeps_started_at_the_same_moment_share_one_parent_run(tmp_path, storage, mlflow_server, tiny_vit):
    from orchestrator.sweep.runner import start as start_sweep

    spec = load_spec(write_spec(tmp_path, "one-parent", [1e-4, 2e-4], 1, tiny_vit))
    ledgers = at_once(lambda _: Ledger(storage, "one-parent", 1), range(4))    # four `sweep` commands...
    ready = threading.Barrier(len(ledgers))

    def open_sweep(ledger: Ledger) -> str:
        ready.wait()                                                           # ...starting at one moment
        return start_sweep(spec, ledger, mlflow_server.url, enqueue=True).parent_run_id

    parents = set(at_once(open_sweep, ledgers))
    logged, _ = sweep_runs(mlflow_server, "one-parent")
    assert len(parents) == 1 and [r.info.run_id for r in logged] == list(parents), (parents, logged)
    assert Ledger(storage, "one-parent", 1).parent_run() in parents


def test_a_stalled_worker_whose_trial_was_taken_over_cannot_finish_it_too(tmp_path, storage, mlflow_server,
                                                                          trainer_processes, tiny_vit):
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    spec_a = write_spec(a, "stall", [1e-3], epochs=4, tiny_vit=tiny_vit)
    spec_b = write_spec(b, "stall", [1e-3], epochs=4, tiny_vit=tiny_vit)
    sweep = start(b, "sweep", spec_b, storage, mlflow_server)
    (planned,) = load_spec(spec_b).plan
    assert wait_for_training_on(b, "stall", storage, sweep, epochs=4) == planned.hash
    # The whole host freezes (a paused VM, a swapping machine): alive, but no heartbeat for the grace period.
    frozen = [sweep.pid, *trainer_processes(b)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        worker = start(a, "worker", spec_a, storage, mlflow_server)
        finish(worker, a, "worker")      # reaps the frozen trial and runs it again
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    out = finish(sweep, b, "sweep")      # thawed: its trainer ends the trial it was training

    first, retry = sorted(study_trials(storage, "stall"), key=lambda t: t.number)
    assert (first.state, first.user_attrs["status"]) == (TrialState.FAIL, "retried")
    assert (retry.state, retry.user_attrs["status"]) == (TrialState.COMPLETE, "finished")
    _, children = sweep_runs(mlflow_server, "stall")
    (kept,) = [r for r in children if r.info.status == "FINISHED"]        # one finished run, the retry's
    assert kept.info.run_id == retry.user_attrs["run_id"] and kept.data.tags["status"] == "finished"
    (late,) = [r for r in children if r.info.status != "FINISHED"]         # the frozen worker's
    assert late.info.status == "KILLED" and late.data.tags["status"] == "superseded"
    warnings = [line for line in out.splitlines() if line.startswith("warning:") and "superseded" in line]
    assert len(warnings) == 1 and late.info.run_id in warnings[0], out[-3000:]


def test_a_worker_killed_right_after_opening_its_run_leaves_no_run_running(tmp_path, storage, mlflow_server,
                                                                           tiny_vit):
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    spec_a = write_spec(a, "opened", [1e-3, 2e-3], epochs=2, tiny_vit=tiny_vit)
    spec_b = write_spec(b, "opened", [1e-3, 2e-3], epochs=2, tiny_vit=tiny_vit)
    sweep = start(a, "sweep", spec_a, storage, mlflow_server)
    worker = start(b, "worker", spec_b, storage, mlflow_server)
    killed = wait_for_run_request_on(b, "opened", worker, sweep)
    # Frozen as its trainer starts the trial: the trainer opens the run, but its `started` is never read.
    worker.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 120
    while not [r for r in open_runs(mlflow_server, "opened") if r.data.tags["config_hash"] == killed]:
        assert time.monotonic() < deadline, "the trainer never opened its run"
        time.sleep(0.05)
    worker.kill()                        # the host is gone; its trainer dies with it
    worker.wait()
    finish(sweep, a, "sweep")

    assert not open_runs(mlflow_server, "opened")
    _, children = sweep_runs(mlflow_server, "opened")
    (dead,) = [r for r in children if r.data.tags["config_hash"] == killed and r.info.status != "FINISHED"]
    assert dead.info.status == "KILLED" and dead.data.tags["status"] == "killed"
    assert sorted(r.data.tags["config_hash"] for r in children if r.info.status == "FINISHED") == sorted(
        t.hash for t in load_spec(spec_a).plan)


def wait_for_run_request_on(host: Path, sweep: str, *procs: subprocess.Popen, timeout: float = 180) -> str:
    """The config hash of the first trial this host's trainer was sent (its log's attempt line is written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"a process exited early with {proc.returncode}"
        for log in (host / "mlruns" / "sweeps" / sweep).glob("*/log.txt"):
            if "--- attempt 1" in log.read_text():
                return log.parent.name
        time.sleep(0.01)
    pytest.fail(f"{host.name} was never sent a trial")


def test_a_run_left_open_after_its_result_was_recorded_is_closed_as_recorded(tmp_path, storage, mlflow_server,
                                                                             tiny_vit):
    """A worker killed between recording a trial's result in the ledger and closing its MLflow run."""
    from trainers.tracking import CLAIM_TAG, SweepParent

    spec = write_spec(tmp_path, "between", [1e-3, 2e-3], epochs=1, tiny_vit=tiny_vit)
    ledger = Ledger(storage, "between", 1)
    ledger.enqueue(load_spec(spec).plan)
    parent = SweepParent.open(mlflow_server.url, "between")
    ledger.set_parent_run(parent.run_id)
    client = MlflowClient(mlflow_server.url)
    left_open = {}
    while (claim := ledger.claim()) is not None:
        run = client.create_run(client.get_run(parent.run_id).info.experiment_id, tags={
            "mlflow.parentRunId": parent.run_id, "role": "trial", CLAIM_TAG: claim.token,
            "config_hash": claim.config_hash, "status": "running"})
        assert ledger.finish(claim, "finished", 0.5, run.info.run_id)
        left_open[claim.config_hash] = run.info.run_id          # ...and the worker died here

    joined = start(tmp_path, "worker", spec, storage, mlflow_server)    # nothing to run: it only tidies up
    finish(joined, tmp_path, "worker")
    assert not open_runs(mlflow_server, "between")
    for run_id in left_open.values():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"


def test_a_password_in_the_storage_url_is_warned_about_once(tmp_path, storage, capsys, tiny_vit):
    spec = write_spec(tmp_path, "secret", [1e-3], epochs=1, tiny_vit=tiny_vit)
    Ledger(storage, "secret", 1)
    with_password = storage.replace("postgres@", "postgres:hunter2@")     # trust auth ignores it
    capsys.readouterr()
    assert main(["status", str(spec), "--storage", with_password]) == 0
    assert main(["status", str(spec), "--storage", with_password]) == 0
    shown = capsys.readouterr()
    assert shown.err.count("warning: the storage URL holds a password") == 1, shown.err
    assert "hunter2" not in shown.err + shown.out


def wait_for_training_on(host: Path, sweep: str, storage: str, *procs: subprocess.Popen,
                         timeout: float = 180, epochs: int = EPOCHS) -> str:
    """The config hash of a trial this host is training, once it has logged a first epoch and the
    ledger knows its MLflow run (its other epochs, test and logging leave seconds before it is done)."""
    deadline = time.monotonic() + timeout
    ledger = None
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"a process exited early with {proc.returncode}"
        for log in (host / "mlruns" / "sweeps" / sweep).glob("*/log.txt"):
            text = log.read_text()
            if f"epoch 1/{epochs}" not in text or f"epoch {epochs}/{epochs}" in text:
                continue
            ledger = ledger or Ledger(storage, sweep, 1)
            if any(t.user_attrs.get("config_hash") == log.parent.name and t.user_attrs.get("run_id")
                   for t in ledger.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
                return log.parent.name
        time.sleep(0.1)
    pytest.fail(f"{host.name} never got through a first epoch")


# --- the compose stack ------------------------------------------------------------------------

VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^${}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} (innermost first; $$ is $),
    applied as compose does: to every string of the parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match.groups()
        found = env.get(name)
        if op in (":-", ":?") and not found or op in ("-", "?") and found is None:
            if op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg
        return found or ""
    previous, text = None, value.replace("$$", "\0")
    while previous != text:
        previous, text = text, VARIABLE.sub(one, text)
    return text.replace("\0", "$")


def stack(env: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load((REPO / "docker" / "compose.yaml").read_text()), env)


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def published_hosts(services: dict) -> list[tuple[str, str]]:
    """(service, host address) of every published port; '' when a port binds every interface."""
    out = []
    for name, service in services.items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                out.append((name, port.get("host_ip", "")))
            else:
                parts = str(port).rsplit(":", 2)
                out.append((name, parts[0] if len(parts) == 3 else ""))
    return out


def test_the_compose_stack_keeps_its_ports_on_loopback_and_reserves_gpus_for_workers():
    example = env_file(REPO / "docker" / "env.example")
    compose = stack(example)
    services = compose["services"]
    assert {"postgres", "mlflow", "worker"} <= set(services)

    assert services["postgres"]["healthcheck"]["test"]
    assert "${POSTGRES_USER}" in str(services["postgres"]["healthcheck"])   # for the container's shell
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    server = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://fer@postgres:5432/mlflow" in server
    assert "--serve-artifacts" in server and "--artifacts-destination /mlartifacts" in server
    assert any(v.endswith(":/mlartifacts") for v in services["mlflow"]["volumes"])
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {"postgres-data", "mlflow-artifacts", "worker-mlruns"} <= set(compose["volumes"])

    worker = services["worker"]
    command = worker["command"].split()
    assert command[:5] == ["python", "-m", "orchestrator", "worker", "sweeps/demo.yaml"]
    assert command[command.index("--storage") + 1] == "postgresql://fer@postgres:5432/optuna"
    assert command[command.index("--tracking-uri") + 1] == "http://mlflow:5000"
    (gpus,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"] and gpus["count"] == "all"
    assert worker["build"]["dockerfile"] == "docker/Dockerfile" and worker["stop_signal"] == "SIGINT"

    # The password reaches the server and the worker in their environment, never on a command line
    # (every user of the machine reads those in `ps`), also when FER_STORAGE names another machine's database.
    joining = stack({**example, "FER_STORAGE": "postgresql://fer@192.168.1.10:5432/optuna"})["services"]
    for services_of in (services, joining):
        for name in ("mlflow", "worker"):
            assert services_of[name]["environment"]["PGPASSWORD"] == example["POSTGRES_PASSWORD"]
            assert example["POSTGRES_PASSWORD"] not in str(services_of[name]["command"])
    assert "# FER_STORAGE=postgresql://fer@" in (REPO / "docker" / "env.example").read_text()

    # Nothing binds beyond loopback unless docker/.env says so: with the template, or with no settings.
    for env in (example, {"POSTGRES_USER": "u", "POSTGRES_PASSWORD": "p"}):
        services = stack(env)["services"]
        hosts = published_hosts(services)
        assert {s for s, _ in hosts} == {"postgres", "mlflow"}
        assert all(h == "127.0.0.1" for _, h in hosts), hosts
        assert not any(s.get("network_mode") == "host" for s in services.values())
    opened = published_hosts(stack({**example, "FER_BIND_ADDRESS": "192.168.1.10"})["services"])
    assert all(h == "192.168.1.10" for _, h in opened)
    # The credentials come from the env file only: the stack refuses to start without them.
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        stack({"POSTGRES_USER": "u"})


def test_the_image_pins_torch_and_runs_as_a_user():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", dockerfile, re.M) and "ARG CUDA_IMAGE=nvidia/cuda:" in dockerfile
    assert "torch==2.14.1" in dockerfile and "torchvision==0.29.1" in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert "HF_HUB_OFFLINE=${HF_HUB_OFFLINE}" in dockerfile
