"""The one module that owns a run's life in MLflow: a trial's run (open or resume, log params, metrics,
artifacts and the model, finish), a dead trial's run closed by its sweep, and the sweep's parent run.

Runs are addressed by id through an explicit MlflowClient; nothing relies on the global
active run, so parallel trials in one process cannot cross-log.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import dataclasses
import io
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import yaml
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as mlflow_utils
from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run, RunTag, ViewType

from trainers.config import TrialConfig, applicable_params, config_hash, short_number, to_dict, trial_name
from trainers.data.dataset import PreparedData
from trainers.data.split import SPLIT_NAMES
from trainers.metrics import flat
from trainers.predictions import ARTIFACT as PREDICTIONS_ARTIFACT
from trainers.process.children import child_env
from trainers.process.figure_helper import log_figures
from trainers.process.free_space import require_room
from trainers.process.protocol import FigureJob, FiguresDone, ProtocolError, decode, encode
from trainers.process.side_files import STORE_DIR

if TYPE_CHECKING:       # the orchestrator imports this module for its helpers: no torch, no plotting here
    from trainers.train import TrialResult

# Test metrics' 95% bootstrap intervals over the test images (trainers/stats.py), logged beside them.
TEST_INTERVALS = ("accuracy_ci_low", "accuracy_ci_high", "macro_f1_ci_low", "macro_f1_ci_high")

MLFLOW_STATUS = {"finished": "FINISHED", "diverged": "FINISHED", "pruned": "FINISHED", "failed": "FAILED",
                 "killed": "KILLED", "superseded": "KILLED"}
# The tag naming the ledger claim a sweep's trial run belongs to (set when the run is created or resumed),
# so that a worker reaping a dead worker's trial finds its run even before the ledger knows the run's id.
CLAIM_TAG = "claim"
# A finished trial run whose model waits for its sweep's decision (tracking.log_model: best_k); the value is
# the kept weights' file. Removed once decided: its model logged, or not among the best.
MODEL_PENDING_TAG = "model_pending"


def tracking_uri(uri: str | None = None, create: bool = True) -> str:
    """The explicit uri, else $MLFLOW_TRACKING_URI, else the local sqlite store under mlruns/ (its folder
    made unless create is False)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if create:
        STORE_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(STORE_DIR / 'mlflow.db').resolve()}"


def store_client(uri: str | None = None) -> MlflowClient:
    """A client on tracking_uri(uri): the verbs' way into the store, so they need not import mlflow."""
    return MlflowClient(tracking_uri(uri))


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of the local sqlite store go under mlruns/artifacts/; a server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent / "artifacts" / experiment).resolve().as_uri()


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it (with a local artifact root) if needed."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name),
                                        tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def environment(key: str, value: str | None):
    """Set (or with None, remove) one environment variable for the duration, then restore it."""
    before = os.environ.get(key)
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def no_download_bars():
    """MLflow draws a progress bar for every artifact download, even of one small file."""
    return environment("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextlib.contextmanager
def global_tracking_uri(uri: str):
    """Point MLflow's process-wide URI at a store for the duration, then restore it (and the env var).

    Model logging, registration and loading resolve the store globally, not through our client;
    MLflow also exports the URI to MLFLOW_TRACKING_URI, which child processes would inherit.
    """
    uri_before = mlflow_utils._tracking_uri
    with environment("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI")):
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(uri_before)


def mlflow_name(name: str) -> str:
    """A metric's name in MLflow: the data counters under data/ and the timings under time/, which MLflow's UI
    groups into chart sections of their own, out of the way of the scores (data_n_test -> data/n_test,
    train_seconds -> time/train_seconds); every other name as it is."""
    if name.startswith("data_"):
        return "data/" + name.removeprefix("data_")
    if name.endswith("_seconds"):
        return "time/" + name
    return name


def logged_metric(metrics: dict[str, float], name: str, default=None):
    """A run's metric by its name in the code (mlflow_name), also from runs logged before the data/ and time/
    names."""
    return metrics.get(mlflow_name(name), metrics.get(name, default))


def _metrics(values: dict[str, float], step: int = 0, model_id: str | None = None) -> list[Metric]:
    """MLflow metrics of the given values, named by mlflow_name; NaN is kept (an undefined metric, e.g. a class
    without images, is logged as NaN and shown as n/a, never dropped or turned into 0), an infinity is left
    out. With model_id they are also the logged model's metrics."""
    ts = int(1000 * time.time())
    return [Metric(mlflow_name(k), float(v), ts, step, model_id=model_id) for k, v in values.items()
            if v is not None and (np.isfinite(v) or np.isnan(v))]


def describe(cfg: TrialConfig, status: str, metrics: dict[str, float] | None = None) -> str:
    """A trial run's one-line description (MLflow shows it on the run page and as a tooltip):
    'vit · adam · lr 1e-3 · 3 epochs · seed 0 · finished · val macro F1 0.818 · test macro F1 0.827'."""
    parts = [cfg.model.name, cfg.optim.name, f"lr {short_number(cfg.optim.lr)}", f"{cfg.train.epochs} epochs",
             f"seed {cfg.train.seed}", status]
    for key, label in (("final_val_macro_f1", "val macro F1"), ("test_macro_f1", "test macro F1")):
        if metrics and key in metrics and np.isfinite(metrics[key]):
            parts.append(f"{label} {metrics[key]:.3f}")
    return " · ".join(parts)


def _timed(method):
    """Add the call's wall time to the run's `mlflow_seconds` (what logging costs the trial)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
    return wrapper


# --- the logged model: the exported network, served as a photo model ------------------------------------

TRAINERS_DIR = Path(__file__).resolve().parent
PHOTO_LOADER = "trainers.photo_model"      # the pyfunc loader module of a model that takes photos
# What the photo model imports; pinned to this environment's versions, so `mlflow models serve` with a
# virtualenv or conda env-manager rebuilds the environment the model was trained in.
PHOTO_MODEL_PACKAGES = ("torch", "torchvision", "transformers", "facenet-pytorch", "scikit-image", "pillow",
                        "pandas", "numpy", "pyyaml")


def photo_signature(classes: tuple[str, ...]):
    """The pyfunc's interface: a column of encoded images in; label, probabilities, face and error out."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema

    from trainers.photo_model import output_columns

    kinds = {"label": "string", "face_found": "boolean", "error": "string"}
    return ModelSignature(
        inputs=Schema([ColSpec("binary")]),
        outputs=Schema([ColSpec(kinds.get(c, "double"), c, required=c.startswith("p_") or c == "label")
                        for c in output_columns(classes)]))


def pinned_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version
    pins = []
    for name in PHOTO_MODEL_PACKAGES:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


class PhotoFlavor:
    """Model.log's flavor for a trial's model: mlflow.pytorch's exported network (pt2: torch.export, no
    pickled code), plus the trial's photo settings and the trainers package, with the python_function
    interface replaced by trainers.photo_model (encoded photos in, labels out)."""
    __name__ = "pytorch"        # the logged model's flavor, as MLflow's UI shows it

    @staticmethod
    def save_model(path: str, mlflow_model, pytorch_model, settings, **_) -> None:
        import mlflow.pytorch
        from mlflow import pyfunc
        from mlflow.models.signature import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from trainers.photo_model import SETTINGS_FILE

        size, n = settings.image_size, len(settings.classes)
        network = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size), "images")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n), "logits")]))
        # A batch of 2 keeps the exported batch dimension dynamic (torch.export specialises a 1).
        example = np.zeros((2, 3, size, size), dtype=np.float32)
        mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, signature=network,
                                  input_example=example, serialization_format="pt2",
                                  code_paths=[str(TRAINERS_DIR)], pip_requirements=pinned_requirements())
        root = Path(path)
        (root / "data" / SETTINGS_FILE).write_text(settings.to_json())
        # The tensor example describes the network, not the photo interface the signature below states.
        for name in ("input_example.json", "serving_input_example.json"):
            (root / name).unlink(missing_ok=True)
        mlflow_model.saved_input_example_info = None
        pyfunc.add_to_model(mlflow_model, loader_module=PHOTO_LOADER, data="data", code="code",
                            conda_env="conda.yaml", python_env="python_env.yaml")
        mlflow_model.signature = photo_signature(settings.classes)
        mlflow_model.save(str(root / "MLmodel"))


PHOTO_FLAVOR = PhotoFlavor()


def model_info(client: MlflowClient, model_uri: str):
    """MLflow's ModelInfo (flavors, run, model id) of the model at models:/<...> in this store."""
    from mlflow.models import get_model_info

    with global_tracking_uri(client.tracking_uri), no_download_bars():
        return get_model_info(model_uri)


def interface_of(info) -> str | None:
    """What a model takes: "photos" (its pyfunc is the photo model), "network" (a bare mlflow.pytorch
    network, as models were logged before), or None (neither)."""
    if info.flavors.get("python_function", {}).get("loader_module") == PHOTO_LOADER:
        return "photos"
    return "network" if "pytorch" in info.flavors else None


def model_interface(client: MlflowClient, model_uri: str) -> str | None:
    """interface_of the model at models:/<...>; None also when its MLmodel cannot be read."""
    try:
        return interface_of(model_info(client, model_uri))
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def photo_model_of(client: MlflowClient, run: Run) -> tuple[str, str | None]:
    """The run's logged model id and what it takes (model_interface); when that is a bare network (logged
    before models took photos), the network logged again with the photo interface, from the run's
    config.yaml (the run's model_id tag then names it). A model whose files cannot be read is left as it is."""
    model_id = run.data.tags["model_id"]
    interface = model_interface(client, f"models:/{model_id}")
    if interface != "network":
        return model_id, interface
    import mlflow.pytorch

    from trainers.config import from_dict

    with tempfile.TemporaryDirectory() as tmp, no_download_bars():
        raw = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", tmp)).read_text())
    cfg = from_dict({"data": raw["data"], "model": raw["model"]})
    with global_tracking_uri(client.tracking_uri), no_download_bars():
        network = mlflow.pytorch.load_model(f"models:/{model_id}")
    return TrialRun(client, run.info.run_id, resumed=True).log_model(network, cfg, cfg.data.classes), "photos"


def logged_config(client: MlflowClient, run_id: str) -> TrialConfig:
    """The trial config a run logged (its config.yaml)."""
    from trainers.config import from_dict

    with tempfile.TemporaryDirectory() as tmp, no_download_bars():
        raw = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text())
    return from_dict(raw, f"run {run_id}'s config.yaml")


def log_decided_model(client: MlflowClient, run_id: str, network, cfg: TrialConfig) -> str:
    """Log the model of a finished run whose model was pending (log_model: best_k) from its kept weights, loaded
    into `network`, and clear the pending tag; returns the model id."""
    trial = TrialRun(client, run_id, resumed=True, cfg=cfg)
    trial.model_id = trial._new_logged_model()
    try:
        model_id = trial.log_model(network, cfg, cfg.data.classes)
    except BaseException:       # the logged model made for it is marked FAILED, not left PENDING in the UI
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            from mlflow.entities import LoggedModelStatus
            client.finalize_logged_model(trial.model_id, LoggedModelStatus.FAILED)
        raise
    client.delete_tag(run_id, MODEL_PENDING_TAG)
    return model_id


def link_model(client: MlflowClient, run_id: str, model_id: str | None) -> None:
    """Record a logged model as the run's input (MLflow's run page links to it): a production run names the
    model it evaluated. Nothing when there is no model id (a run logged without one)."""
    from mlflow.entities import LoggedModelInput

    if model_id:
        client.log_inputs(run_id, models=[LoggedModelInput(model_id)])


# --- figures: drawn and logged by a helper process while the trial exports its model --------------

FIGURE_TIMEOUT_SECONDS = 300     # two PNGs take well under a second; a helper this late is hung


class FigureHelper:
    """A `python -m trainers.process.figure_helper` child: started once per trainer process, importing matplotlib
    while the first trial trains, then given each trial's figures. One job in flight at a time."""

    def __init__(self):
        # Its output outside jobs (font-cache notices) has no trial to go to; each job's goes to its log.
        self.proc = subprocess.Popen([sys.executable, "-m", "trainers.process.figure_helper"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=child_env())
        self.jobs = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, job: FigureJob) -> None:
        self.jobs += 1
        self.proc.stdin.write(encode(dataclasses.replace(job, id=self.jobs)))
        self.proc.stdin.flush()

    def result(self, timeout: float = FIGURE_TIMEOUT_SECONDS) -> None:
        """Wait for the last job's answer (skipping any left by an earlier, abandoned wait). RuntimeError
        with the helper's message if drawing failed; OSError if the helper died, hung or garbled its
        answer (it is then killed)."""
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            answer = self._answer(self.proc.stdout.readline() if ready else "")
            if answer is None:
                self.proc.kill()
                raise OSError(f"the figure helper {'exited or garbled its answer' if ready else 'did not answer'} "
                              f"(status {self.proc.wait()})")
            if answer.id == self.jobs:
                break
        if answer.error:
            raise RuntimeError(answer.error)

    @staticmethod
    def _answer(line: str) -> FiguresDone | None:
        try:
            answer = decode(line) if line else None
        except ProtocolError:
            return None
        return answer if isinstance(answer, FiguresDone) else None


_helper: FigureHelper | None = None


def start_figure_helper() -> FigureHelper:
    """This process's figure helper, started (again) if there is none alive."""
    global _helper
    if _helper is None or not _helper.alive():
        _helper = FigureHelper()
    return _helper


# --- a trial's run, and what its sweep does when a trainer dies ------------------------------------

def close_dead_run(uri: str, run_id: str, word: str) -> None:
    """Close a run its trainer left RUNNING when it died with the trial's status `word` (killed or failed;
    finished, diverged or pruned when the ledger had recorded the result) as tag and MLflow status to
    match; a run already closed is left alone, and a retry reopens it."""
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, MLFLOW_STATUS[word])
            tags = [RunTag("status", word)]
            note = run.data.tags.get("mlflow.note.content", "")
            if note.endswith(" · running"):          # the description's status, as describe() wrote it
                tags.append(RunTag("mlflow.note.content", f"{note.removesuffix(' · running')} · {word}"))
            client.log_batch(run_id, tags=tags)
    except Exception as err:   # the store may be unreachable; the retry will reopen the run anyway
        print(f"warning: could not close run {run_id}: {err}", file=sys.stderr)


# The metrics a run logs first (MLflow's Compare page plots the first one by default).
SCORES_FIRST = ("val_macro_f1", "val_accuracy", "val_loss", "train_macro_f1", "train_accuracy", "train_loss")

OUTCOME_METRICS = ("val_macro_f1", "val_accuracy", "train_loss", "test_loss", "test_accuracy", "test_macro_f1")


def open_trial_runs(uri: str, parent_run_id: str) -> dict[str, str]:
    """The parent's child runs MLflow shows RUNNING, as {run id: its claim tag, '' without one}; {} when
    the store cannot say (the runs are looked at again later)."""
    client = MlflowClient(uri)
    found: dict[str, str] = {}
    token = None
    try:
        while True:
            page = client.search_runs([_experiment_of(uri, parent_run_id)], page_token=token, filter_string=(
                f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"))
            found.update({r.info.run_id: r.data.tags.get(CLAIM_TAG, "") for r in page})
            token = page.token
            if not token:
                return found
    except Exception as err:
        print(f"warning: could not list the sweep's open runs: {err}", file=sys.stderr)
        return {}


def finished_trial_run(uri: str, parent_run_id: str, config_hash: str) -> tuple[str, dict[str, float]] | None:
    """A FINISHED child run of the parent with this config hash and status finished, as (run id, its final
    metrics); None when there is none or the store cannot say (the trial then runs).

    MLflow is the record of results: an orchestrator killed between a trial's last write to MLflow and its
    ledger update leaves the trial queued again, and this keeps it from running (and finishing) twice."""
    client = MlflowClient(uri)
    try:
        runs = client.search_runs([_experiment_of(uri, parent_run_id)], max_results=1, filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.config_hash = '{config_hash}' "
            "and tags.status = 'finished' and attributes.status = 'FINISHED'"))
    except Exception as err:     # an unreachable store must not stop the sweep: running the trial is safe
        print(f"warning: could not look up finished runs of {config_hash}: {err}", file=sys.stderr)
        return None
    if not runs:
        return None
    metrics = runs[0].data.metrics
    return runs[0].info.run_id, {k: metrics[k] for k in OUTCOME_METRICS if k in metrics}


@functools.lru_cache(maxsize=16)
def _experiment_of(uri: str, run_id: str) -> str:
    """The experiment a run is in (asked once per sweep, not once per claimed trial)."""
    return MlflowClient(uri).get_run(run_id).info.experiment_id


# --- the sweep's parent run ------------------------------------------------------------------------

def find_parent_run(client: MlflowClient, sweep: str) -> Run | None:
    """The sweep's parent run (the most recent one if several were ever made), or None."""
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.role = 'sweep' and tags.sweep = '{sweep}'",
                              run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def open_parent_run(client: MlflowClient, sweep: str, description: str = "",
                    tags: dict[str, str] | None = None) -> str:
    """Reuse the sweep's parent run (a resumed sweep keeps one parent), else create it (with tags, e.g. its
    source) and set up its experiment for comparing trials (describe_experiment)."""
    found = find_parent_run(client, sweep)
    if found is not None:
        if found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
        # An experiment from before the comparison view gets it (setting the tags again changes nothing).
        describe_experiment(client, found.info.experiment_id, description, found.info.run_id)
        return found.info.run_id
    experiment_id = ensure_experiment(client, sweep)
    tags = {"role": "sweep", "sweep": sweep, **(tags or {})}
    if description:
        tags["mlflow.note.content"] = description
    run_id = client.create_run(experiment_id, run_name=sweep, tags=tags).info.run_id
    describe_experiment(client, experiment_id, description, run_id)
    return run_id


# MLflow's UI opens an experiment in its GenAI mode unless the experiment says it trains models.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A saved view of the runs table is an experiment tag mlflow.sharedViewState.<id> (listed under Views, and
# opened by ?viewStateShareKey=<id>); this one shows what tells trials apart, best validation F1 first.
COMPARE_VIEW = "fer-compare"
COMPARE_COLUMNS = ("metrics.`val_macro_f1`", "metrics.`test_macro_f1`", "metrics.`test_accuracy`",
                   "params.`model.name`", "params.`optim.name`", "params.`optim.lr`", "params.`train.epochs`",
                   "params.`train.seed`", "tags.`groups`", "tags.`status`")


def compare_view(parent_run_id: str) -> str:
    """The saved view's tag value: its name and the runs table's state (columns, order, the parent open)."""
    state = {"searchFilter": "", "orderByKey": "metrics.`val_macro_f1`", "orderByAsc": False, "startTime": "ALL",
             "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
             "selectedColumns": list(COMPARE_COLUMNS), "runsExpanded": {parent_run_id: True},
             # MLflow puts sections of prefixed metrics (data/, time/) before the scores' own; the chart
             # view of this view opens on the F1 charts (the search box shows the filter, to clear).
             "chartsSearchFilter": "macro_f1", "runsHiddenMode": "SHOW_ALL"}      # every trial, not the first 10
    now = int(1000 * time.time())
    return json.dumps({"name": "Compare trials", "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def describe_experiment(client: MlflowClient, experiment_id: str, description: str, parent_run_id: str) -> None:
    """The experiment's description, the tag that opens it in MLflow's model-training view, and the saved
    view that compares its trials."""
    tags = {**EXPERIMENT_KIND, f"mlflow.sharedViewState.{COMPARE_VIEW}": compare_view(parent_run_id)}
    if description:
        tags["mlflow.note.content"] = description
    for key, value in tags.items():
        client.set_experiment_tag(experiment_id, key, value)


TRIAL_STATUSES = ("waiting", "running", "finished", "diverged", "pruned", "failed")


class SweepParent:
    """The sweep's parent run as the runner uses it: opened or rejoined, given the spec and plan, closed."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    @classmethod
    def rejoin(cls, uri: str, run_id: str | None) -> SweepParent | None:
        """The run marked RUNNING again, or None when the store has no such run (none given, or reset)."""
        if not run_id:
            return None
        client = MlflowClient(uri)
        try:
            client.get_run(run_id)
        except Exception:   # MlflowException for a missing run, or a store that was reset
            return None
        client.update_run(run_id, status="RUNNING")
        return cls(uri, run_id)

    @classmethod
    def open(cls, uri: str, sweep: str, description: str = "", tags: dict[str, str] | None = None) -> SweepParent:
        """Reuse the sweep's latest parent run in this store, else create it."""
        return cls(uri, open_parent_run(MlflowClient(uri), sweep, description, tags))

    def log_axes(self, params: dict[str, str]) -> None:
        """The sweep's axes as the parent's params. MLflow params cannot change: a parent reused after the
        spec changed keeps the values it has and gains the new keys."""
        client = MlflowClient(self.uri)
        logged = client.get_run(self.run_id).data.params
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):      # the store takes at most 100 params per batch
            client.log_batch(self.run_id, params=new[i:i + 100])

    def log_texts(self, files: dict[str, str]) -> None:
        """Text artifacts such as spec.yaml and plan.csv, by file name."""
        client = MlflowClient(self.uri)
        for name, text in files.items():
            client.log_text(self.run_id, text, name)

    def finish(self, counts: dict[str, int], interrupted: bool) -> None:
        """Tag the parent with the trial counts (one batched call) and close it."""
        client = MlflowClient(self.uri)
        every = {status: counts.get(status, 0) for status in TRIAL_STATUSES} | counts   # 0s replace old counts
        client.log_batch(self.run_id, tags=[RunTag(f"trials_{key}", str(value)) for key, value in every.items()],
                         metrics=_metrics({f"trials_{key}": value for key, value in every.items()}))
        unfinished = counts.get("waiting", 0) + counts.get("running", 0)
        client.set_terminated(self.run_id, "KILLED" if interrupted or unfinished else "FINISHED")

    def kill(self) -> None:
        """Close it as KILLED: the sweep stopped before its first trial (bad data, Ctrl-C)."""
        MlflowClient(self.uri).set_terminated(self.run_id, "KILLED")


class TrialRun:
    """One trial's MLflow run: create or resume, then log through explicit run ids."""

    def __init__(self, client: MlflowClient, run_id: str, resumed: bool, cfg: TrialConfig | None = None):
        self.client, self.run_id, self.resumed, self.cfg = client, run_id, resumed, cfg
        self.seconds = 0.0           # spent in MLflow calls, the model's export and upload excluded
        self.model_seconds = 0.0     # torch.export of the model and its upload
        # The trial's other steps (trainers.run: data, build, checkpoint, test, figures, the whole trial), in
        # seconds by metric name, logged with these two when the run closes.
        self.timings: dict[str, float] = {}
        self._figures: tuple[FigureHelper, FigureJob] | None = None     # drawing in the helper, and its job
        self.summary: dict[str, float] = {}      # the final metrics (log_result), for the description
        self._pending: dict[str, float] = {}     # data counters not logged yet (see log_setup)
        self._model_logged = False
        self.model_id: str | None = None         # the logged model the final metrics belong to

    @classmethod
    def open(cls, cfg: TrialConfig, resume_run_id: str | None = None) -> TrialRun:
        """Reopen the given run (a restarted trial) or start a new one, under the parent if given."""
        t = cfg.tracking
        client = MlflowClient(tracking_uri(t.uri))
        if resume_run_id:
            try:
                client.get_run(resume_run_id)
                # This attempt's tags (its claim, its trial number) before RUNNING: a run shown RUNNING
                # always names the claim it runs for, or a reaper would close it under the retry.
                tags = {**t.tags, "mlflow.note.content": describe(cfg, "running")}
                client.log_batch(resume_run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                client.update_run(resume_run_id, status="RUNNING")
                return cls(client, resume_run_id, resumed=True, cfg=cfg)
            except mlflow.exceptions.MlflowException:
                pass  # the run was deleted or the store changed: start a fresh one
        experiment_id = ensure_experiment(client, t.experiment)
        tags = {"config_hash": config_hash(cfg), "model": cfg.model.name, "optimizer": cfg.optim.name,
                "status": "running", "mlflow.note.content": describe(cfg, "running"), **t.tags}
        if t.parent_run_id:
            tags["mlflow.parentRunId"] = t.parent_run_id
        run = client.create_run(experiment_id, run_name=t.run_name or trial_name(cfg), tags=tags)
        return cls(client, run.info.run_id, resumed=False, cfg=cfg)

    def claimed_elsewhere(self) -> bool:
        """Whether the run's claim tag names another attempt than this one's: a retry on this host resumed the
        run (from the same checkpoint folder) after this attempt's claim was taken over, so it is the retry's."""
        mine = self.cfg.tracking.tags.get(CLAIM_TAG, "") if self.cfg is not None else ""
        if not mine:
            return False
        try:
            return self.client.get_run(self.run_id).data.tags.get(CLAIM_TAG, "") != mine
        except mlflow.exceptions.MlflowException:
            return False        # unreadable: closing it is what a reaper would do too

    # --- logging -------------------------------------------------------------------------

    def require_room(self, writing_mb: int = 0) -> None:
        """Before the trial writes its setup, an epoch (and that epoch's checkpoint after it), its results or its
        model: DiskFullError when its checkpoint folder or local store is under the free-space reserve (plus
        writing_mb, the size of what is about to be written), so the writes that close the run still fit
        (trainers/process/free_space.py)."""
        folders = [] if self.cfg is None else [(Path(self.cfg.train.checkpoint_dir), "train.checkpoint_dir")]
        if self.client.tracking_uri.startswith("sqlite:///"):
            folders.append((Path(self.client.tracking_uri.removeprefix("sqlite:///")).parent, "the MLflow store"))
        require_room(folders, writing_mb)

    @_timed
    def log_setup(self, cfg: TrialConfig, data: PreparedData) -> None:
        """Params and resolved config (a resumed run logs the params it lacks: its attempt may have been killed
        before it logged them), data counts, digest and split mode (tag data_split_mode), and data_report.json."""
        self.require_room()
        logged = self.client.get_run(self.run_id).data.params if self.resumed else {}
        params = [Param(k, v[:6000]) for k, v in applicable_params(cfg).items() if k not in logged]
        for i in range(0, len(params), 100):   # the store takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
        # The counters wait for the first epoch's scores: MLflow's Compare page plots the metric a run
        # logged first (val_macro_f1 then, not data/listed).
        self._pending = data.report.metrics()
        self.client.set_tag(self.run_id, "data_digest", data.digest)
        self.client.set_tag(self.run_id, "data_split_mode", data.report.split_mode)
        report = {**data.report.__dict__, "digest": data.digest}
        self.client.log_text(self.run_id, json.dumps(report, indent=2), "data_report.json")
        self._log_dataset(data)

    def _log_dataset(self, data: PreparedData) -> None:
        import pandas as pd

        frame = pd.DataFrame({"path": data.paths, "label": [data.classes[i] for i in data.labels],
                              "split": [SPLIT_NAMES[s] for s in data.splits]})
        with warnings.catch_warnings():   # a local folder matches two equivalent MLflow source types
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=data.root, name=Path(data.root).name,
                                              digest=data.digest)
        inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "train")])]
        try:
            self.client.log_inputs(self.run_id, inputs)
        except mlflow.exceptions.MlflowException:
            # Two trials logging the same dataset at once race to insert its row (a unique
            # violation on a PostgreSQL store); the row exists now, so once more succeeds.
            time.sleep(0.5)
            self.client.log_inputs(self.run_id, inputs)

    @_timed
    def on_epoch(self, epoch: int, values: dict[str, float]) -> None:
        """Per-epoch metrics with step = epoch, the scores first, one batched call; then the data counters."""
        self.require_room()
        ordered = {k: values[k] for k in SCORES_FIRST if k in values} | values
        self.client.log_batch(self.run_id, metrics=_metrics(ordered, step=epoch))
        self._log_pending()

    def _log_pending(self) -> None:
        """The data counters held back by log_setup, once."""
        if self._pending:
            pending, self._pending = self._pending, {}
            self.client.log_batch(self.run_id, metrics=_metrics(pending))

    @_timed
    def log_result(self, cfg: TrialConfig, data: PreparedData, result: TrialResult,
                   log_file: Path | None = None) -> None:
        """Test metrics, per-class table and confusion matrix (JSON), logged now; the curves and the confusion
        matrix as PNGs are drawn by the helper process (its messages going to log_file) while the model
        is exported; see wait_figures."""
        self.require_room()
        title = trial_name(cfg)
        summary = {"train_seconds": result.train_seconds, "epochs_completed": float(len(result.history))}
        if result.history:
            summary["best_val_macro_f1"] = max(h["val_macro_f1"] for h in result.history)
            summary["final_val_macro_f1"] = result.history[-1]["val_macro_f1"]
        if result.status == "diverged":      # the epochs before it stay logged; this says where it blew up
            summary["diverged_epoch"] = float(len(result.history) + 1)
        cm = None
        if result.test is not None:
            summary.update({"test_loss": result.test["loss"], **flat("test", result.test["confusion"], data.classes)})
            summary.update({f"test_{k}": result.test[k] for k in TEST_INTERVALS})
            self.log_bytes(result.test["predictions"].to_bytes(), PREDICTIONS_ARTIFACT)
            self.client.log_text(self.run_id, per_class_csv(result.test, data.classes), "per_class.csv")
            cm = result.test["confusion"]
            confusion = {"classes": list(data.classes), "counts": cm.tolist()}
            self.client.log_text(self.run_id, json.dumps(confusion), "confusion_matrix.json")
        if result.status == "finished" and cfg.tracking.logs_model_now:
            # The model is made now, so the final metrics are its metrics too (MLflow's model page shows them).
            self.model_id = self._new_logged_model()
        # Step 0: a metric with one value per run is drawn as one bar per run in MLflow's chart view (the
        # per-epoch curves keep step = epoch).
        self.client.log_batch(self.run_id, metrics=_metrics(summary, model_id=self.model_id))
        self.summary = summary
        self._log_pending()
        if result.history or cm is not None:
            job = FigureJob(self.client.tracking_uri, self.run_id, os.getcwd(), title, result.history,
                            list(data.classes), None if cm is None else cm.tolist(),
                            str(log_file) if log_file else None)
            try:
                helper = start_figure_helper()
                helper.submit(job)
                self._figures = helper, job
            except OSError:              # no helper could start: draw them here
                log_figures(job)

    def log_bytes(self, content: bytes, name: str) -> None:
        """One binary artifact at the run's root, written through a private temporary folder."""
        with tempfile.TemporaryDirectory(prefix="fer-artifact-") as folder:
            path = Path(folder) / name
            path.write_bytes(content)
            self.client.log_artifact(self.run_id, str(path))

    @_timed
    def wait_figures(self) -> None:
        """Wait for the figures (a run is closed only with its artifacts); if the helper died, draw them here."""
        if self._figures is None:
            return
        (helper, job), self._figures = self._figures, None
        try:
            helper.result()
        except OSError:
            log_figures(job)

    def _new_logged_model(self) -> str:
        """A logged model of this run, in the run's own experiment (Model.log alone would use the global
        default experiment and put its files under the working directory); its id."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return self.client.create_logged_model(experiment_id, name="model", source_run_id=self.run_id).model_id

    def log_model(self, model, cfg: TrialConfig, classes: tuple[str, ...]) -> str:
        """Log the trained model (the exported network; its pyfunc takes photos, see PHOTO_FLAVOR); returns its model id."""
        # The export takes about the parameters' bytes (buffers are small beside them).
        self.require_room(sum(p.numel() * p.element_size() for p in model.parameters()) // 2**20 + 1)
        start = time.perf_counter()
        try:
            return self._log_model(model, cfg, classes)
        finally:
            self.model_seconds += time.perf_counter() - start

    def _log_model(self, model, cfg: TrialConfig, classes: tuple[str, ...]) -> str:
        from mlflow.models import Model

        from trainers.photo_model import PhotoSettings

        model_id = self.model_id or self._new_logged_model()       # log_result made it, unless logged again
        self.client.log_model_params(model_id, applicable_params(cfg))
        settings = PhotoSettings.of_trial(cfg, classes)
        network = model.cpu()
        with contextlib.suppress(NotImplementedError):     # an exported graph (logged again) has no train mode
            network = network.eval()
        with global_tracking_uri(self.client.tracking_uri):
            info = Model.log(artifact_path=None, name="model", flavor=PHOTO_FLAVOR, run_id=self.run_id,
                             model_id=model_id, pytorch_model=network, settings=settings,
                             validate_serving_input=False)   # a JSON round trip of images adds nothing
        self.client.set_tag(self.run_id, "model_id", info.model_id)
        self._model_logged = True
        return info.model_id

    def mark_model_pending(self, weights: Path, seconds: float) -> None:
        """The model waits for the sweep's decision (log_model: best_k): its weights are kept in `weights`,
        which took `seconds` to write (counted as what the model cost the trial)."""
        self.model_seconds += seconds
        self.client.set_tag(self.run_id, MODEL_PENDING_TAG, str(weights))

    @_timed
    def log_file(self, path: Path) -> None:
        self.require_room()
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        """Tag the trial status, record what logging cost, and close the run."""
        if self._figures is not None:      # a trial failing after its result: its figures still come first
            with contextlib.suppress(Exception):
                self._figures[0].result(timeout=10)
            self._figures = None
        self._log_pending()         # a trial that failed before its first epoch still says what data it had
        self.client.log_batch(self.run_id, metrics=_metrics({"mlflow_seconds": self.seconds,
                                                              "model_log_seconds": self.model_seconds,
                                                              **self.timings}))
        if self.model_id is not None and not self._model_logged:     # made for a model that never came
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                from mlflow.entities import LoggedModelStatus
                self.client.finalize_logged_model(self.model_id, LoggedModelStatus.FAILED)
        tags = [RunTag("status", status)]
        if self.cfg is not None:
            tags.append(RunTag("mlflow.note.content", describe(self.cfg, status, self.summary)))
        self.client.log_batch(self.run_id, tags=tags)
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])


def per_class_csv(test: dict, classes: tuple[str, ...]) -> str:
    """class, precision, recall, f1, support: the study's Tables 4, 7 and 11."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["class", "precision", "recall", "f1", "support"])
    pc = test["per_class"]
    for i, name in enumerate(classes):
        writer.writerow([name, f"{pc['precision'][i]:.4f}", f"{pc['recall'][i]:.4f}", f"{pc['f1'][i]:.4f}",
                         int(pc["support"][i])])
    return buf.getvalue()
