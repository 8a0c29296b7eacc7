"""tracking.log_model: best_k: a sweep logs the models of its best configuration per model only, decided once it is
complete from the weights its finished trials kept. Real trainer processes, Optuna ledger and MLflow store."""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.results.kept_models import choose
from orchestrator.results.registry import promote
from orchestrator.results.runs import child_runs
from orchestrator.sweep.runner import run_sweep
from orchestrator.sweep.spec import SpecError, load_spec
from trainers.config import ConfigError, applicable_params, config_hash, from_dict
from trainers.tracking import MODEL_PENDING_TAG


def kept_weights(folder, sweep: str) -> list:
    found = folder / "mlruns" / "checkpoints" / "kept-models" / sweep
    return sorted(found.glob("*.pt")) if found.is_dir() else []


def interrupt_after_first_kept_weights(folder, spec_path, env, client) -> str:
    """`sweep` run until a trial has finished and kept its weights, then Ctrl-C (SIGINT); its output."""
    with open(folder / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(spec_path)], cwd=folder,
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        # The weights are written before the run closes; the store is only read once the sweep has made it.
        while proc.poll() is None and time.monotonic() < deadline and not (
                kept_weights(folder, "bestk") and child_runs(client, "bestk", status="finished")):
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    return (folder / "out.txt").read_text()


def test_an_interrupted_sweep_keeps_the_weights_and_the_complete_one_logs_the_best_run_per_model_only(
        in_tmp, clean_env, store, tiny_vit, write_spec):
    # ViT: two learning rates x two seeds; ResNet-50: one configuration, one seed. One slot: fewer processes to start.
    spec_path = write_spec(in_tmp, "bestk", {"vit": {"grid": {"optim.lr": [1e-3, 3e-3], "train.seed": [0, 1]}},
                                             "resnet": {"grid": {"model": ["resnet"]}}},
                           models={"vit": tiny_vit, "resnet": {"name": "resnet50", "image_size": 32}},
                           execution={"jobs": 1, "max_retries": 1}, tracking={"log_model": "best_k"})
    client = store(in_tmp)
    out = interrupt_after_first_kept_weights(in_tmp, spec_path, clean_env(), client)
    finished = child_runs(client, "bestk", status="finished")
    assert finished and len(finished) < 5, out
    assert "models: logged" not in out and "keep their weights" in out, out
    for run in finished:       # no model yet; each run names the weights it kept, which are there
        assert "model_id" not in run.data.tags and Path(run.data.tags[MODEL_PENDING_TAG]).is_file()
    assert not client.search_logged_models([finished[0].info.experiment_id])

    spec = load_spec(spec_path)
    outcome = run_sweep(spec)          # the rerun: the rest of the trials, then the models are decided
    assert not outcome.interrupted and outcome.counts == {"finished": 5}
    runs = child_runs(client, "bestk", status="finished")
    assert len(runs) == 5 and not kept_weights(in_tmp, "bestk")
    assert not [r for r in runs if MODEL_PENDING_TAG in r.data.tags]
    with_model = {r.info.run_id for r in runs if r.data.tags.get("model_id")}
    logged = client.search_logged_models([runs[0].info.experiment_id])
    assert sorted(m.source_run_id for m in logged) == sorted(with_model)
    assert {m.status.name for m in logged} == {"READY"}
    allowed = best_runs_per_model(runs)
    assert len(with_model) == len(allowed) == 2         # one run per model: ViT and ResNet-50
    assert all(len(with_model & ids) == 1 for ids in allowed.values()), allowed
    assert promote(spec, client).run_id in with_model & allowed["vit"]       # the champion has its model


def best_runs_per_model(runs) -> dict[str, set[str]]:
    """Per model name, the runs `promote` may choose: for each configuration (a learning rate here) with the best
    mean final validation macro F1 over its seeds, its run nearest that mean (the lowest seed of equals)."""
    configs = defaultdict(list)
    for run in runs:
        configs[run.data.params["model.name"], run.data.params["optim.lr"]].append(run)
    mean = {key: sum(r.data.metrics["final_val_macro_f1"] for r in rs) / len(rs) for key, rs in configs.items()}
    allowed = defaultdict(set)
    for model in {name for name, _ in configs}:
        best = max(mean[key] for key in configs if key[0] == model)
        for key in configs:
            if key[0] == model and math.isclose(mean[key], best, abs_tol=1e-12):
                nearest = min(configs[key], key=lambda r: (round(abs(r.data.metrics["final_val_macro_f1"] - best), 12),
                                                           int(r.data.params["train.seed"])))
                allowed[model].add(nearest.info.run_id)
    return dict(allowed)


@pytest.mark.parametrize("tracking, message", [
    ({"log_model": "best"}, "tracking.log_model must be one of true, false, best_k; got str 'best'"),
    ({"log_model": 1}, "tracking.log_model must be one of true, false, best_k; got int 1"),
    ({"log_model": "best_k", "best_k": 0}, "tracking.best_k must be at least 1"),
    ({"log_model": "best_k", "best_k": 1.5}, "tracking.best_k must be an integer, got float 1.5"),
    ({"best_k": 2}, "tracking.best_k applies only with log_model: best_k"),
    ({"uri": "sqlite:///x.db"}, "tracking.uri is set by the orchestrator"),
])
def test_a_bad_tracking_section_is_refused_in_one_line(tmp_path, write_spec, tracking, message):
    spec_path = write_spec(tmp_path, "bad", {"lr": {"grid": {"optim.lr": [1e-3]}}}, tracking=tracking)
    with pytest.raises(SpecError) as err:
        load_spec(spec_path)
    assert str(err.value).startswith(f"{spec_path}: {message}")
    assert "\n" not in str(err.value)


def test_a_trial_config_takes_best_k_and_refuses_other_words(tiny_trial, tmp_path):
    assert from_dict(tiny_trial(tmp_path, tracking={"log_model": "best_k", "best_k": 3})).tracking.best_k == 3
    with pytest.raises(ConfigError, match=r"^config: tracking.log_model must be one of true, false, best_k; got str "
                                          r"'True'$"):
        from_dict(tiny_trial(tmp_path, tracking={"log_model": "True"}))


def record_finished_runs(client, spec, f1s: dict[float, list[float]], folder: Path) -> list:
    """Trial runs as the trainer records them (params, config hash, final metric, a model_pending tag naming
    kept weights written to folder), one per learning rate and seed, under one parent run; the finished runs."""
    experiment = client.create_experiment(spec.name)
    parent = client.create_run(experiment, tags={"role": "sweep"}).info.run_id
    for trial in spec.plan:
        cfg = trial.config
        weights = folder / f"{cfg.optim.lr}-{cfg.train.seed}.pt"
        weights.write_bytes(b"weights")
        run = client.create_run(experiment, run_name=weights.stem, tags={
            "role": "trial", "status": "finished", "mlflow.parentRunId": parent, "config_hash": config_hash(cfg),
            MODEL_PENDING_TAG: str(weights)}).info.run_id
        for key, value in applicable_params(cfg).items():
            client.log_param(run, key, value)
        client.log_metric(run, "final_val_macro_f1", f1s[cfg.optim.lr][cfg.train.seed])
        client.set_terminated(run)
    return child_runs(client, spec.name, parent, status="finished")


def test_a_chosen_run_whose_weights_are_not_here_is_named_and_the_next_nearest_is_logged_in_its_place(
        tmp_path, write_spec):
    spec = load_spec(write_spec(tmp_path, "bestk", {"vit": {"grid": {"optim.lr": [1e-3, 3e-3],
                                                                   "train.seed": [0, 1, 2]}}}))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # lr 3e-3 is the best configuration (mean 0.8167): seed 1 (0.80) is nearest its mean, then seed 0 (0.70).
    f1s = {3e-3: [0.70, 0.80, 0.95], 1e-3: [0.50, 0.60, 0.65]}
    runs = {r.info.run_name: r for r in record_finished_runs(client, spec, f1s, tmp_path)}
    Path(runs["0.003-1"].data.tags[MODEL_PENDING_TAG]).unlink()      # kept on another host, or deleted

    to_log, missing = choose(spec, list(runs.values()), k=1)
    assert [r.info.run_name for r in to_log] == ["0.003-0"]     # promote finds a model in the best configuration
    assert [r.info.run_name for r in missing] == ["0.003-1"]    # named in a warning, left pending for its host

    to_log, missing = choose(spec, list(runs.values()), k=2)    # lr 1e-3 too: its nearest (0.60) has weights
    assert sorted(r.info.run_name for r in to_log) == ["0.001-1", "0.003-0"]
    assert [r.info.run_name for r in missing] == ["0.003-1"]

    client.set_tag(runs["0.003-1"].info.run_id, "model_id", "m-logged-by-its-host")
    runs = {r.info.run_name: r for r in child_runs(client, spec.name, status="finished")}
    assert choose(spec, list(runs.values()), k=1) == ([], [])   # its host logged it: nothing more to log
