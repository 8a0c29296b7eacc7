"""One trial end to end: data, model, training, MLflow; resumable from its checkpoint."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from trainers.config import TrialConfig, kept_models_dir, trial_dir
from trainers.data.dataset import DataError, PreparedData, prepare_data
from trainers.data.split import TEST, VAL
from trainers.models import FerClassifier, build_model
from trainers.process.free_space import is_disk_full
from trainers.process.protocol import Epoch, Message, Started
from trainers.tracking import TrialRun, start_figure_helper
from trainers.train import Checkpoint, StopTrial, run_training, save_tensors, seed_everything, tensor_bytes


@dataclass
class TrialOutcome:
    run_id: str
    status: str                      # finished / diverged / pruned, or superseded (settle said not kept)
    metrics: dict[str, float]        # final validation and test numbers
    train_seconds: float


class Supervisor(Protocol):
    """Whoever runs this trial for a sweep (trainers.process.serve.Pipe): told when the run opens and as
    each epoch ends, and may ask the trial to stop."""

    def send(self, message: Message) -> None: ...
    def stop_requested(self) -> str | None: ...


# (status, run id, final metrics) -> kept: asked before a claimed trial's run is closed; False when the
# sweep's ledger did not record the result (another worker took the trial over): the run ends superseded.
Settle = Callable[[str, str, dict[str, float]], bool]


class EpochReporter:
    """Logs each epoch to MLflow, prints one line for the log's reader, tells the supervisor, and stops
    the trial when the supervisor asks."""

    def __init__(self, run: TrialRun, epochs: int, supervisor: Supervisor | None):
        self.run, self.epochs, self.supervisor = run, epochs, supervisor

    def on_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self.run.on_epoch(epoch, values)
        shown = " ".join(f"{k} {values[k]:.4f}" for k in ("train_loss", "val_loss", "val_macro_f1", "lr"))
        print(f"epoch {epoch}/{self.epochs} {shown} ({values['epoch_seconds']:.1f}s)", flush=True)
        if self.supervisor is None:
            return
        self.supervisor.send(Epoch(epoch, self.epochs, values))
        reason = self.supervisor.stop_requested()
        if reason:
            raise StopTrial(reason)


def resumable_run_id(cfg: TrialConfig, directory: Path) -> str | None:
    """The MLflow run a crashed attempt left, if it belongs to the same parent (same sweep).

    run.json is this trainer's own record beside its checkpoint; the sweep learns the id from `started`."""
    marker = directory / "run.json"
    if not marker.exists():
        return None
    saved = json.loads(marker.read_text())
    if saved.get("parent_run_id") != cfg.tracking.parent_run_id:
        shutil.rmtree(directory, ignore_errors=True)   # another sweep's leftovers: start clean
        return None
    return saved["run_id"]


_last_data: dict = {}     # {(data config, image size): PreparedData}, the last one a process prepared


def load_data(cfg: TrialConfig, reuse: bool) -> PreparedData:
    """prepare_data, or with reuse the dataset this process prepared for the previous trial on the same
    data: a sweep's trials all train on the data as it was prepared when the sweep started."""
    key = (cfg.data, cfg.model.image_size)
    if reuse and key in _last_data:
        return _last_data[key]
    _last_data.clear()
    data = prepare_data(cfg.data, cfg.model.image_size)
    if reuse:
        _last_data[key] = data
    return data


def require_val_and_test(data: PreparedData) -> None:
    """A trial needs validation images (the LR rule, pruning) and test images (its result): fail before training."""
    for split, name in ((VAL, "val"), (TEST, "test")):
        if not len(data.indices(split)):
            how = f"{data.report.split_mode} split" if data.report.split_mode else "split"
            raise DataError(f"{data.root}: the {how} left no {name} image (of {len(data.labels)} images); give "
                            f"{name} a larger share in data.split, add images (or subjects), or try another "
                            "data.split_seed")


def prepare_trial(cfg: TrialConfig, reuse_data: bool) -> tuple[PreparedData, FerClassifier, dict[str, float]]:
    """Data and the seeded initial model, before any run is created (a bad dataset fails here), and what each
    took: load_seconds (prepare_data, or the previous trial's data reused) and build_seconds."""
    started = time.perf_counter()
    data = load_data(cfg, reuse_data)
    require_val_and_test(data)
    loaded = time.perf_counter()
    seed_everything(cfg.train.seed, cfg.train.deterministic)    # the initial weights come from the seed
    model = build_model(cfg.model, len(data.classes))
    return data, model, {"load_seconds": loaded - started, "build_seconds": time.perf_counter() - loaded}


def run_trial(cfg: TrialConfig, log_file: Path | None = None, supervisor: Supervisor | None = None,
              reuse_data: bool = False, settle: Settle | None = None) -> TrialOutcome:
    """Prepare data and model (failing before any run is created), then train and log one run; with
    settle, the run is closed FINISHED only when the sweep kept the result."""
    started = time.perf_counter()
    with contextlib.suppress(OSError):      # without one, the figures are drawn here
        start_figure_helper()                # it imports matplotlib while this trial trains
    data, model, timings = prepare_trial(cfg, reuse_data)
    directory = trial_dir(cfg)
    run = TrialRun.open(cfg, resumable_run_id(cfg, directory))
    run.timings.update(timings)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "run.json").write_text(json.dumps({"run_id": run.run_id,
                                                        "parent_run_id": cfg.tracking.parent_run_id}))
        if supervisor is not None:
            supervisor.send(Started(run.run_id))
        run.log_setup(cfg, data)
        reporter = EpochReporter(run, cfg.train.epochs, supervisor)
        checkpoint = Checkpoint(directory)
        result = run_training(cfg, data, model, checkpoint, observer=reporter)
        run.timings.update(checkpoint_seconds=checkpoint.seconds, test_seconds=result.test_seconds)
        run.log_result(cfg, data, result, log_file)
        if result.status == "finished" and cfg.tracking.logs_model_now:
            run.log_model(model, cfg, data.classes)
        elif result.status == "finished" and cfg.tracking.defers_model:
            keep_weights(run, model, cfg)
        figures = time.perf_counter()
        run.wait_figures()
        run.timings["figures_seconds"] = time.perf_counter() - figures
        if log_file is not None and log_file.exists():
            run.log_file(log_file)
        metrics = _final_metrics(result)
        kept = settle is None or settle(result.status, run.run_id, metrics)
        run.timings["trial_seconds"] = time.perf_counter() - started
    except KeyboardInterrupt:
        run.finish("killed")
        raise
    except BaseException as err:
        # The checkpoint stays: a retry resumes this run from its last epoch. A full disk is no failure of
        # the trial: the sweep stops and hands it back, as when interrupted.
        run.finish("killed" if is_disk_full(err) else "failed")
        raise
    if kept:
        run.finish(result.status)
        shutil.rmtree(directory, ignore_errors=True)
        return TrialOutcome(run.run_id, result.status, metrics, result.train_seconds)
    # Not kept: the claim was taken over, and a retry on this host may be resuming this same run from this
    # same folder's checkpoint, or the sweep is stopping and a later run resumes from it: the folder stays.
    if run.claimed_elsewhere():
        print("superseded: another worker took this trial over and resumed this run; it is left to it", flush=True)
    else:
        print("superseded: this trial's result was not kept; this run is closed as KILLED", flush=True)
        run.finish("superseded")
    return TrialOutcome(run.run_id, "superseded", metrics, result.train_seconds)


def keep_weights(run: TrialRun, model, cfg: TrialConfig) -> None:
    """log_model: best_k: the trial's final weights (its fp32 state_dict) kept in the sweep's kept-models folder as
    <run id>.pt, and the run tagged pending, until the sweep ranks its runs and logs the best models' (the
    checkpoint folder, with the optimizer's moments, is removed as the run closes)."""
    import torch

    start = time.perf_counter()
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    run.require_room(tensor_bytes(state) // 2**20 + 1)
    path = kept_models_dir(cfg.train.checkpoint_dir, cfg.tracking.experiment).resolve() / f"{run.run_id}.pt"
    save_tensors(state, path)
    run.mark_model_pending(path, time.perf_counter() - start)


def _final_metrics(result) -> dict[str, float]:
    """The last epoch's validation scores and the test scores, for the trial's outcome."""
    out = {}
    if result.history:
        last = result.history[-1]
        out.update({k: last[k] for k in ("val_macro_f1", "val_accuracy", "train_loss")})
    if result.test is not None:
        out.update({f"test_{k}": result.test[k] for k in ("loss", "accuracy", "macro_f1")})
    return out
