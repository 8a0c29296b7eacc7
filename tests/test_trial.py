"""A trial end to end into a real (temporary sqlite) MLflow store, read back through MLflow."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from trainers import metrics
from trainers.config import from_dict, trial_dir
from trainers.data.dataset import prepare_data
from trainers.models import ModelUnavailableError, build_model
from trainers.predictions import read_predictions
from trainers.run import run_trial
from trainers.tracking import TrialRun, global_tracking_uri, start_figure_helper
from trainers.train import Checkpoint, run_training

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("anger", "disgust", "fear", "happiness", "sadness", "surprise")


def read_run(cfg, run_id):
    client = MlflowClient(cfg.tracking.uri)
    return client, client.get_run(run_id)


@pytest.mark.parametrize("model", [
    {},                                                   # tiny ViT
    {"name": "resnet50", "image_size": 32},
])
def test_two_epochs_log_params_metrics_and_artifacts(tmp_path, model, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, model=model))
    outcome = run_trial(cfg)
    client, run = read_run(cfg, outcome.run_id)
    assert outcome.status == "finished" and run.info.status == "FINISHED"
    assert run.data.tags["status"] == "finished" and run.data.tags["model"] == cfg.model.name
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.name"] == cfg.model.name
    assert run.data.params["train.epochs"] == "2"
    for key in ("train_loss", "train_accuracy", "train_macro_f1", "val_loss", "val_accuracy",
                "val_macro_f1", "lr"):
        history = client.get_metric_history(outcome.run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert all(np.isfinite(m.value) for m in history)
    m = run.data.metrics
    assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["test_macro_f1"] <= 1
    for name in CLASSES:       # every class has test images: recall and F1 are defined (precision may not be)
        assert 0 <= m[f"test_recall_{name}"] <= 1 and 0 <= m[f"test_f1_{name}"] <= 1
        assert math.isnan(m[f"test_precision_{name}"]) or 0 <= m[f"test_precision_{name}"] <= 1
    intervals = {f"test_{k}_ci_{end}" for k in ("accuracy", "macro_f1") for end in ("low", "high")}
    assert {k for k in m if k.startswith("test_")} == {"test_loss", "test_accuracy", "test_macro_f1"} | {
        f"test_{key}_{name}" for key in ("precision", "recall", "f1") for name in CLASSES} | intervals
    for k in ("accuracy", "macro_f1"):
        assert m[f"test_{k}_ci_low"] <= m[f"test_{k}"] <= m[f"test_{k}_ci_high"]
    assert outcome.metrics == {k: pytest.approx(m[k]) for k in ("val_macro_f1", "val_accuracy", "train_loss",
                                                                "test_loss", "test_accuracy", "test_macro_f1")}
    assert m["data/n_train"] + m["data/n_val"] + m["data/n_test"] == 240
    # What the trial's steps took (the GPU bench's fixed costs), each inside the trial's own time.
    steps = ("load", "build", "checkpoint", "test", "figures", "model_log", "train")
    assert all(m[f"time/{step}_seconds"] >= 0 for step in steps)
    assert m["time/trial_seconds"] >= sum(m[f"time/{step}_seconds"] for step in ("train", "test", "model_log"))
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "curves.png", "confusion_matrix.png", "confusion_matrix.json",
            "per_class.csv", "data_report.json"} <= artifacts
    local = Path(client.download_artifacts(outcome.run_id, "confusion_matrix.json", str(tmp_path)))
    counts = np.array(json.loads(local.read_text())["counts"])
    assert counts.sum() == m["data/n_test"]
    assert np.trace(counts) / counts.sum() == pytest.approx(m["test_accuracy"])
    saved = read_predictions(client.download_artifacts(outcome.run_id, "test_predictions.csv.gz", str(tmp_path)))
    assert len(saved.keys) == m["data/n_test"] and saved.classes == tuple(CLASSES)
    assert np.array_equal(metrics.confusion_matrix(saved.labels, saved.predicted, len(CLASSES)), counts)
    assert np.allclose(saved.probs.sum(1), 1, atol=1e-4)
    png = Path(client.download_artifacts(outcome.run_id, "curves.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.inputs.dataset_inputs and run.data.tags["data_digest"] == run.inputs.dataset_inputs[0].dataset.digest
    assert not trial_dir(cfg).exists()         # a finished trial leaves no checkpoint behind


def test_figures_reach_the_run_when_the_figure_helper_dies_with_the_job(tmp_path, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, train={"epochs": 1}))
    data = prepare_data(cfg.data, cfg.model.image_size)
    result = run_training(cfg, data, build_model(cfg.model, 6), Checkpoint(tmp_path / "ckpt"))
    run = TrialRun.open(cfg)
    helper = start_figure_helper()
    os.kill(helper.proc.pid, signal.SIGSTOP)     # it takes the job but never answers...
    run.log_result(cfg, data, result)
    helper.proc.kill()                           # ...and dies: the trainer draws the figures itself
    run.wait_figures()
    run.finish(result.status)
    client = MlflowClient(cfg.tracking.uri)
    assert {"curves.png", "confusion_matrix.png"} <= {a.path for a in client.list_artifacts(run.run_id)}
    assert start_figure_helper() is not helper and start_figure_helper().alive()    # a new one for the next trial


def test_the_figure_helper_dies_with_its_trainer():
    trainer = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                                "from trainers.tracking import start_figure_helper\n"
                                "print(start_figure_helper().proc.pid, flush=True)\n"
                                "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    helper = int(trainer.stdout.readline())
    os.kill(trainer.pid, signal.SIGKILL)          # no clean-up code runs in the trainer
    trainer.wait()
    deadline = time.monotonic() + 10
    while running(helper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(helper)


def running(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_logged_model_predicts_from_the_store(tmp_path, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, train={"epochs": 1}))
    outcome = run_trial(cfg)
    model_id = MlflowClient(cfg.tracking.uri).get_run(outcome.run_id).data.tags["model_id"]
    with global_tracking_uri(cfg.tracking.uri):     # restored after: later tests must not inherit this store
        model = mlflow.pytorch.load_model(f"models:/{model_id}")
    import torch
    logits = model(torch.rand(5, 3, 32, 32))
    assert tuple(logits.shape) == (5, 6)


class StopAfter:
    """An observer that crashes the trial once the given epoch is logged."""

    def __init__(self, epoch):
        self.epoch, self.seen = epoch, []

    def on_epoch(self, epoch, values):
        self.seen.append(epoch)
        if epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_a_checkpoint_holds_the_state_at_save_time_and_reports_a_failed_write(tmp_path):
    import torch

    weights = torch.zeros(1000)
    ckpt = Checkpoint(tmp_path / "ckpt")
    ckpt.save({"epoch": 1, "model": {"w": weights}, "history": [{"epoch": 1}]})
    weights += 1                                  # training goes on while the file is written
    assert ckpt.load()["model"]["w"].sum() == 0 and ckpt.load()["history"] == [{"epoch": 1}]

    (tmp_path / "blocked").write_text("a file where the checkpoint folder should be")
    broken = Checkpoint(tmp_path / "blocked")
    broken.save({"epoch": 1})                     # returns at once; the write fails in the background
    with pytest.raises(OSError):
        broken.wait()


def test_a_restarted_trial_resumes_without_repeating_finished_epochs(tmp_path, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, train={"epochs": 3}))
    data = prepare_data(cfg.data, cfg.model.image_size)
    ckpt = Checkpoint(tmp_path / "ckpt")
    first = StopAfter(3)
    with pytest.raises(RuntimeError):
        run_training(cfg, data, build_model(cfg.model, 6), ckpt, first)
    assert first.seen == [1, 2, 3] and ckpt.load()["epoch"] == 2
    second = StopAfter(None)
    result = run_training(cfg, data, build_model(cfg.model, 6), ckpt, second)
    assert second.seen == [3]
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.test is not None


def test_a_crashed_trial_is_resumed_in_the_same_mlflow_run(tmp_path, monkeypatch, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, train={"epochs": 2}))
    import trainers.tracking as tracking
    real = tracking.TrialRun.log_result

    def crash(*args, **kwargs):
        raise RuntimeError("disk full while logging")
    monkeypatch.setattr(tracking.TrialRun, "log_result", crash)
    with pytest.raises(RuntimeError):
        run_trial(cfg)
    marker = json.loads((trial_dir(cfg) / "run.json").read_text())
    client, run = read_run(cfg, marker["run_id"])
    assert run.info.status == "FAILED"
    monkeypatch.setattr(tracking.TrialRun, "log_result", real)
    outcome = run_trial(cfg)
    assert outcome.run_id == marker["run_id"]
    assert [m.step for m in client.get_metric_history(outcome.run_id, "val_macro_f1")] == [1, 2]
    assert client.get_run(outcome.run_id).info.status == "FINISHED"


def test_a_trial_killed_before_it_logged_its_params_logs_them_when_resumed(tmp_path, monkeypatch, tiny_trial):
    # A sweep's trainer killed between creating its run and logging its params (Ctrl-C, SIGKILL): the retry
    # resumes that run, which must still get its params and config.yaml (reports and promotion read them).
    cfg = from_dict(tiny_trial(tmp_path, train={"epochs": 1}))
    import trainers.tracking as tracking

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tracking.TrialRun, "log_setup", killed)
    with pytest.raises(KeyboardInterrupt):
        run_trial(cfg)
    run_id = json.loads((trial_dir(cfg) / "run.json").read_text())["run_id"]
    client, run = read_run(cfg, run_id)
    assert run.data.params == {}
    monkeypatch.undo()
    assert run_trial(cfg).run_id == run_id
    params = client.get_run(run_id).data.params
    assert params["model.name"] == cfg.model.name and params["optim.lr"] == str(cfg.optim.lr)
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}


def test_a_non_finite_loss_ends_the_trial_as_diverged(tmp_path, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, optim={"name": "sgd", "lr": 1e12}, train={"epochs": 2}))
    outcome = run_trial(cfg)
    client, run = read_run(cfg, outcome.run_id)
    assert outcome.status == "diverged" and run.data.tags["status"] == "diverged"
    assert "test_macro_f1" not in run.data.metrics


def test_missing_pretrained_weights_offline_give_one_clear_error(tmp_path):
    cfg = from_dict({"model": {"name": "vit", "pretrained": "google/vit-base-patch16-224-in21k"}})
    with pytest.raises(ModelUnavailableError, match="model.pretrained: ViT weights .* local folder"):
        build_model(cfg.model, 6)
    cfg = from_dict({"model": {"name": "resnet50", "pretrained": str(tmp_path / "r50.pth")}})
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        build_model(cfg.model, 6)


def test_resnet_loads_a_local_state_dict_safely(tmp_path):
    import torch
    from torchvision.models import resnet50
    state = resnet50(weights=None).state_dict()
    torch.save(state, tmp_path / "r50.pth")
    cfg = from_dict({"model": {"name": "resnet50", "pretrained": str(tmp_path / "r50.pth")}})
    model = build_model(cfg.model, 6)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert model.backbone.fc.out_features == 6


def test_cli_runs_a_trial_and_prints_its_run_id(tmp_path, tiny_trial):
    raw = tiny_trial(tmp_path, train={"epochs": 1})
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'cli.db'}"
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "trainers", "run", str(config), "--set", "optim.lr=5e-4",
                           "--result", str(tmp_path / "out.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["run_id"] in done.stdout and out["status"] == "finished"
    run = MlflowClient(raw["tracking"]["uri"]).get_run(out["run_id"])
    assert run.data.params["optim.lr"] == "0.0005"


def test_cli_rejects_a_bad_config_in_one_line(tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text("optim: {name: adamw}\n")
    done = subprocess.run([sys.executable, "-m", "trainers", "run", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "optim.name" in done.stderr
