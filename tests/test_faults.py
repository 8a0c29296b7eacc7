"""Faults a real sweep meets: the orchestrator killed at random moments, trials that run out of memory,
a diverging trial, four trials writing to the local sqlite stores at once. Real processes, real stores."""
from __future__ import annotations

import random
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from orchestrator.sweep.ledger import Ledger
from orchestrator.results.runs import child_runs
from orchestrator.sweep.spec import load_spec

KILL_SEEDS = (4, 5)     # between them: kills at start-up, just after a trial finished (twice) and mid-epoch


def study(folder, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'mlruns' / 'optuna.db'}")


def completed(folder, name: str) -> dict[str, str]:
    """config hash -> run id of every trial the ledger holds as finished (empty before the ledger exists)."""
    if not (folder / "mlruns" / "optuna.db").exists():
        return {}
    try:
        trials = study(folder, name).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    except KeyError:            # killed before the study was created
        return {}
    return {t.user_attrs["config_hash"]: t.user_attrs["run_id"] for t in trials
            if t.user_attrs.get("status") == "finished"}


def assert_each_point_finished_once(client, folder, name: str, spec_path, epochs: int) -> None:
    """Every planned trial has exactly one finished child run (in client's store) with every epoch and its
    test metrics; nothing is left RUNNING in MLflow or in the ledger."""
    plan = {t.hash for t in load_spec(spec_path).plan}
    children = child_runs(client, name)
    by_hash: dict[str, list] = {}
    for run in children:
        by_hash.setdefault(run.data.tags["config_hash"], []).append(run)
    finished = {h: [r for r in runs if r.data.tags.get("status") == "finished"] for h, runs in by_hash.items()}
    assert set(finished) == plan and all(len(r) == 1 for r in finished.values()), \
        {h: [(r.info.run_id, r.data.tags.get("status")) for r in runs] for h, runs in by_hash.items()}
    for (run,) in finished.values():
        assert run.info.status == "FINISHED"
        steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")})
        assert steps == list(range(1, epochs + 1)) and "test_macro_f1" in run.data.metrics
    experiment = client.get_experiment_by_name(name)
    assert not [r.info.run_id for r in client.search_runs([experiment.experiment_id])
                if r.info.status == "RUNNING"]
    assert not study(folder, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def epoch_lines(folder) -> int:
    return sum(p.read_text().count("epoch ") for p in (folder / "mlruns" / "sweeps").glob("*/*/log.txt"))


def finished_so_far(folder) -> int:
    """How many trials the running sweep has finished; 0 while it is still creating its ledger (this
    read and the sweep then race to create Optuna's tables, and the sweep must survive that)."""
    try:
        return len(completed(folder, "chaos"))
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
        return 0


def wait_for(moment: str, folder, rng: random.Random) -> None:
    """Sleep until a moment of the sweep just started: its start-up, its next epoch, its next finished trial."""
    if moment == "start-up":
        time.sleep(rng.uniform(0.3, 3.0))
        return
    count = epoch_lines if moment == "epoch" else finished_so_far
    before, deadline = count(folder), time.monotonic() + 120
    while count(folder) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(rng.uniform(0.0, 1.0))


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_an_orchestrator_killed_at_random_moments_finishes_every_point_once(in_tmp, seed, clean_env, orchestrate,
                                                                            store, trainer_processes, write_spec):
    spec_path = write_spec(in_tmp, "chaos", {"lr": {"grid": {"optim.lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3]}}},
                           defaults={"model": "vit", "optim": {"name": "adam", "lr": 1e-3},
                                     "train": {"epochs": 3, "batch_size": 16}})
    rng = random.Random(seed)
    kept: dict[str, str] = {}
    for _ in range(2):       # two SIGKILLs, each at a moment drawn from the seed
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(spec_path)], cwd=in_tmp,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
        wait_for(rng.choice(["start-up", "epoch", "finished"]), in_tmp, rng)
        assert proc.poll() is None, "the sweep ended before its kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10      # its trainer processes die with it (PR_SET_PDEATHSIG)
        while trainer_processes(in_tmp) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not trainer_processes(in_tmp)
        before = completed(in_tmp, "chaos")
        assert before.items() >= kept.items()       # a finished trial is never undone or replaced
        kept = before
    done = orchestrate(in_tmp, "sweep", str(spec_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert_each_point_finished_once(store(in_tmp), in_tmp, "chaos", spec_path, epochs=3)
    final = completed(in_tmp, "chaos")
    assert final.items() >= kept.items()            # trials finished before a kill kept their runs


def limited_memory(limit_bytes: int):
    """Run the sweep (and so its trainer processes, which inherit it) under an address-space limit."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return apply


def test_a_trial_out_of_memory_is_retried_then_failed_while_the_others_finish(in_tmp, clean_env, store,
                                                                              write_spec):
    # 257 tokens x batch 16 x a 2,000,000-wide MLP needs ~33 GB for one activation: far over the
    # limit below, so the allocation fails the way a too-large batch fails on a real machine.
    greedy = {"name": "vit", "image_size": 128,
              "vit": {"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 2_000_000}}
    spec_path = write_spec(in_tmp, "oom", {"models": {"grid": {"model": ["vit", "greedy"]}}},
                           models={"vit": {"name": "vit", "image_size": 32,
                                           "vit": {"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                                                   "num_attention_heads": 2, "intermediate_size": 64}},
                                   "greedy": greedy},
                           defaults={"model": "vit", "optim": {"name": "adam", "lr": 1e-3},
                                     "train": {"epochs": 1, "batch_size": 16}})
    # CPU slots only (CUDA cannot start under the limit), and few malloc arenas and threads, so the
    # normal trial stays far below it on a machine with many cores too.
    env = {**clean_env(), "CUDA_VISIBLE_DEVICES": "", "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(spec_path), "--jobs", "2"],
                          cwd=in_tmp, capture_output=True, text=True, timeout=400, env=env,
                          preexec_fn=limited_memory(16 * 2**30))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert "finished 1" in done.stdout and "failed 1" in done.stdout
    trials = study(in_tmp, "oom").get_trials(deepcopy=False)
    failed = [t for t in trials if t.user_attrs.get("status") == "failed"]
    assert len(failed) == 1 and failed[0].user_attrs["attempt"] == 1       # max_retries 1: tried twice
    assert "out of memory" in failed[0].user_attrs["error"] and "train.batch_size" in failed[0].user_attrs["error"]
    assert "retried" in done.stderr and "lower train.batch_size" in done.stderr      # the progress lines
    runs = child_runs(store(in_tmp), "oom")
    assert sorted(r.data.tags["status"] for r in runs) == ["failed", "finished"]
    assert all(r.info.status != "RUNNING" for r in runs)


def test_a_diverging_trial_finishes_as_diverged_with_its_partial_metrics(in_tmp, orchestrate, store, write_spec):
    spec_path = write_spec(in_tmp, "blowup", {"lr": {"grid": {"optim.lr": [1e-3, 1e12]}}},
                           defaults={"model": "vit", "optim": {"name": "sgd", "lr": 1e-3},
                                     "train": {"epochs": 2, "batch_size": 16}})
    done = orchestrate(in_tmp, "sweep", str(spec_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "diverged" in done.stdout
    trials = {t.user_attrs["name"]: t for t in study(in_tmp, "blowup").get_trials(deepcopy=False)}
    blown = trials["sgd·1e12·ep2·vit·s0"]
    assert blown.user_attrs["status"] == "diverged" and blown.user_attrs["attempt"] == 0    # not retried
    run = store(in_tmp).get_run(blown.user_attrs["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "diverged"
    metrics = run.data.metrics
    assert metrics["diverged_epoch"] == 1 and metrics["epochs_completed"] == 0
    assert metrics["data/usable"] > 0 and "time/train_seconds" in metrics       # what it had, kept
    assert "test_macro_f1" not in metrics
    assert trials["sgd·1e-3·ep2·vit·s0"].user_attrs["status"] == "finished"


def test_four_trials_at_once_share_the_local_sqlite_stores(in_tmp, orchestrate, store, write_spec):
    spec_path = write_spec(in_tmp, "four", {"lr": {"grid": {"optim.lr": [1e-3, 2e-3, 3e-3, 4e-3]}}},
                           defaults={"model": "vit", "optim": {"name": "adam", "lr": 1e-3},
                                     "train": {"epochs": 2, "batch_size": 16}})
    done = orchestrate(in_tmp, "sweep", str(spec_path), "--jobs", "4")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    logs = "".join(p.read_text() for p in (in_tmp / "mlruns" / "sweeps" / "four").glob("*/log.txt"))
    assert "database is locked" not in done.stdout + done.stderr + logs
    assert_each_point_finished_once(store(in_tmp), in_tmp, "four", spec_path, epochs=2)
    client = store(in_tmp)
    for run in child_runs(client, "four"):     # every epoch's every metric, once
        for key in ("train_loss", "val_loss", "val_macro_f1", "lr"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key


def test_ledgers_opened_together_on_a_fresh_sqlite_file_all_open(tmp_path):
    # A sweep starting while `status` (or a second sweep, refused later by the host lock) opens the
    # same new optuna.db: all of them race to create Optuna's tables; the losers must retry, not crash.
    def open_ledger(url: str) -> int:
        return len(Ledger(url, "race", 0).study.get_trials(deepcopy=False))

    for round_ in range(8):
        url = f"sqlite:///{tmp_path / f'round{round_}' / 'optuna.db'}"
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(open_ledger, [url] * 4)) == [0, 0, 0, 0]
