"""Read verbs never write, and a full disk stops a sweep in one line.

status, report, promote and production create no store and no study; they read a read-only store (report
and status) or say in one line that they cannot write it (promote and production); a disk that fills up
mid-sweep closes every run and trial the sweep had open and keeps what finished. Real stores, a real sweep,
a real drop in free space.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator.__main__ import main
from orchestrator.sweep.ledger import Ledger

NAME = "mine"
SPEC = f"{NAME}.yaml"       # a spec other than the demo: hints must name it


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# --- read verbs before any sweep ------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["report", "promote", "production"])
def test_a_read_verb_before_any_sweep_creates_no_store_and_names_the_specs_sweep_command(in_tmp, write_spec, capsys,
                                                                                       verb):
    write_spec(in_tmp, NAME, {"lr": {"grid": {"optim.lr": [1e-3]}}})
    assert main([verb, SPEC]) == 2
    store = in_tmp / "mlruns" / "mlflow.db"
    assert error_lines(capsys) == [f"error: sweep '{NAME}' has not been run in {store}; run "
                                   f"`python -m orchestrator sweep {SPEC}` first"]
    assert sorted(p.name for p in in_tmp.iterdir()) == [SPEC]        # no mlruns/, no store, no cache


def test_status_of_a_spec_never_run_in_an_existing_ledger_creates_no_study(in_tmp, write_spec, capsys):
    write_spec(in_tmp, NAME, {"lr": {"grid": {"optim.lr": [1e-3]}}})
    url = f"sqlite:///{(in_tmp / 'mlruns' / 'optuna.db').resolve()}"
    (in_tmp / "mlruns").mkdir()
    Ledger(url, "another", max_retries=0)           # another sweep ran here
    assert main(["status", SPEC]) == 2
    line, = error_lines(capsys)
    assert line.startswith(f"error: sweep '{NAME}' has not been started in {url}") and \
        f"`python -m orchestrator sweep {SPEC}`" in line, line
    assert optuna.get_all_study_names(url) == ["another"]


# --- a disk that fills up mid-sweep ---------------------------------------------------------------

def finished_runs(store: Path) -> int:
    """FINISHED runs in an MLflow sqlite store, read without writing (0 before the store exists)."""
    if not store.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0]
    except sqlite3.OperationalError:       # tables not made yet, or locked by a writer for a moment
        return 0


@pytest.fixture(scope="module")
def stopped_sweep(tmp_path_factory, clean_env, write_spec):
    """A sweep of three one-epoch trials on one CPU slot whose disk drops under the free-space reserve once its
    first trial has finished: FER_MIN_FREE_MB is set a margin under the free space, and a file of twice that
    margin is allocated when MLflow holds the first finished run. Returns (folder, reserve, the process)."""
    root = tmp_path_factory.mktemp("full")
    folder = root / "work"
    folder.mkdir()
    write_spec(folder, NAME, {"lr": {"grid": {"optim.lr": [1e-3, 2e-3, 3e-3]}}},
                     execution={"jobs": 1, "max_retries": 0})
    free = shutil.disk_usage(root).free // 2**20
    margin = min(1024, free // 8)       # MB: far more than the sweep writes, or the machine around it meanwhile
    reserve = free - margin
    env = {**clean_env(), "FER_MIN_FREE_MB": str(reserve)}
    with open(root / "out.txt", "w") as out, open(root / "err.txt", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", SPEC], cwd=folder, env=env,
                                   stdout=out, stderr=err)
        ballast = root / "ballast"
        try:
            deadline = time.monotonic() + 300
            while finished_runs(folder / "mlruns" / "mlflow.db") == 0 and process.poll() is None:
                assert time.monotonic() < deadline, "no trial finished"
                time.sleep(0.1)
            with open(ballast, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, 2 * margin * 2**20)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
            ballast.unlink(missing_ok=True)
    process.stdout, process.stderr = (root / "out.txt").read_text(), (root / "err.txt").read_text()
    return folder, reserve, process


def test_a_disk_filling_up_mid_sweep_ends_in_one_line_with_nothing_left_running(stopped_sweep, store):
    folder, reserve, done = stopped_sweep
    # stderr also carries the sweep's progress; the end is one error line, with no traceback before it.
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = errors[0]
    assert done.stderr.strip().endswith(line)
    free = re.search(r"has only (\d+) MB free", line)
    assert line.startswith("error: sweep stopped: ") and str(folder / "mlruns") in line, line
    assert free and int(free[1]) < reserve and f"under the {reserve} MB" in line and "FER_MIN_FREE_MB" in line

    client = store(folder)
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    parent, = [r for r in runs if r.data.tags.get("role") == "sweep"]
    assert parent.info.status == "KILLED"
    finished = [r for r in runs if r.data.tags.get("status") == "finished"]
    assert 1 <= len(finished) < 3, [(r.info.run_name, r.data.tags.get("status")) for r in runs]
    for run in finished:        # what finished before the disk filled is kept whole
        assert run.info.status == "FINISHED" and "test_macro_f1" in run.data.metrics and run.data.tags["model_id"]

    ledger = Ledger.open_to_read(f"sqlite:///{folder / 'mlruns' / 'optuna.db'}", NAME)
    assert not [t.number for t in ledger.all_trials() if t.state == TrialState.RUNNING]
    counts = ledger.counts()
    assert counts["finished"] == len(finished) and counts["waiting"] == 3 - len(finished), counts


# --- a read-only store ----------------------------------------------------------------------------

@pytest.fixture
def read_only_store(stopped_sweep, tmp_path, monkeypatch, read_only):
    """A copy of the stopped sweep's folder with mlruns/ read-only, as the working folder."""
    folder = tmp_path / "copy"
    shutil.copytree(stopped_sweep[0], folder)
    monkeypatch.chdir(folder)
    with read_only(folder / "mlruns"):
        yield folder


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.db")))).hexdigest()


def test_status_and_report_read_a_read_only_store(read_only_store, tmp_path, capsys):
    before = digest(read_only_store / "mlruns")
    assert main(["status", SPEC]) == 0
    assert f"sweep '{NAME}' (sqlite:///" in capsys.readouterr().out
    out = tmp_path / "report"
    assert main(["report", SPEC, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "report.md").is_file() and f"report: {out / 'report.md'} (not logged to the sweep's parent run: " \
        in printed and "is read-only" in printed, printed
    assert digest(read_only_store / "mlruns") == before
    # Its default folder is under the read-only mlruns/: one line naming it and --out.
    assert main(["report", SPEC]) == 2
    line, = error_lines(capsys)
    assert str(Path("mlruns") / "reports" / NAME) in line and "not writable" in line and "--out" in line, line


@pytest.mark.parametrize("verb, writes", [("promote", "the registered version and its alias"),
                                          ("production", "the production runs")])
def test_promote_and_production_on_a_read_only_store_say_so_in_one_line(read_only_store, capsys, verb, writes):
    assert main([verb, SPEC]) == 2
    line, = error_lines(capsys)
    store = read_only_store / "mlruns" / "mlflow.db"
    assert line.startswith(f"error: cannot write {writes} to the MLflow store {store}: ") and "read-only" in line, line
