"""One trial end to end: data, model, training, MLflow; resumable from its checkpoint."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from trainers.config import TrialConfig, config_hash
from trainers.data.dataset import prepare_data
from trainers.models import build_model
from trainers.tracking import TrialRun, test_summary
from trainers.train import Checkpoint, run_training


@dataclass
class TrialOutcome:
    run_id: str
    status: str                      # finished / diverged
    metrics: dict[str, float]        # final validation and test numbers
    train_seconds: float


def trial_dir(cfg: TrialConfig) -> Path:
    """Checkpoint folder of this exact config (hash), shared by every retry of it."""
    return Path(cfg.train.checkpoint_dir) / config_hash(cfg)


def run_trial(cfg: TrialConfig, log_file: Path | None = None) -> TrialOutcome:
    """Prepare data and model (failing before any run is created), then train and log one run."""
    data = prepare_data(cfg.data, cfg.model.image_size)
    model = build_model(cfg.model, len(data.classes))
    directory = trial_dir(cfg)
    marker = directory / "run.json"
    resume_id = json.loads(marker.read_text())["run_id"] if marker.exists() else None
    run = TrialRun.open(cfg, resume_id)
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"run_id": run.run_id}))
    try:
        run.log_setup(cfg, data)
        result = run_training(cfg, data, model, Checkpoint(directory), observer=run)
        run.log_result(cfg, data, result)
        if result.status == "finished" and cfg.tracking.log_model:
            run.log_model(model, cfg.model.image_size, len(data.classes))
        if log_file is not None and log_file.exists():
            run.log_file(log_file)
    except KeyboardInterrupt:
        run.finish("killed")
        raise
    except BaseException:
        run.finish("failed")   # the checkpoint stays: a retry resumes this run from its last epoch
        raise
    run.finish(result.status)
    shutil.rmtree(directory, ignore_errors=True)
    return TrialOutcome(run.run_id, result.status, _final_metrics(result, data.classes), result.train_seconds)


def _final_metrics(result, classes) -> dict[str, float]:
    out = {}
    if result.history:
        last = result.history[-1]
        out.update({k: last[k] for k in ("val_macro_f1", "val_accuracy", "train_loss")})
    if result.test is not None:
        summary = test_summary(result.test, classes)
        out.update({k: summary[k] for k in ("test_loss", "test_accuracy", "test_macro_f1")})
    return out
