"""Production evaluation of one trial run's model, as the study's section 5 (Tables 12-13).

This is the MLflow side; production_runs decides which runs, once each. A registered model is loaded
through the registry (models:/<name>/<version>; the champion is the version the alias points at when we
start), any other run's logged model by its id (models:/<model_id>); the run's metrics and config are
read; the production images go through the same preparation and cache as training. The numbers come
from pure modules: production_metrics (inference; production_*, slice_* metrics; degradation rows) and
drift (drift_auc*, each with its control and excess, the verdict). One run in experiment
<sweep>-production logs them: params production.* (the data section), those metrics, tags
(production_tags; drift_verdict: none, class mix only, slight, moderate, strong, or "unknown: why" when
the run's training data is gone; drift.drift_verdict states the rule) and artifacts
confusion_matrix.{json,png}, degradation.{csv,md}, slices.csv and slices.json (text from
production_tables), per slice value slices/<attr>=<value>.{json,png} (its confusion counts, production
and test), and production_predictions.csv.gz (every image's prediction with its metadata attributes).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from orchestrator.results.drift import Predict, measure_drift
from orchestrator.results.production_metrics import (Labelled, labelled_test_images, predict, production_predictions,
                                                     score_production)
from orchestrator.results.production_tables import (DEGRADATION_COLUMNS, SLICE_COLUMNS, ProductionResult,
                                                    degradation_markdown, slice_file_stem, slice_record,
                                                    slices_json, table_csv)
from orchestrator.results.registry import RegistryError, champion_version
from orchestrator.sweep.spec import SweepSpec
from orchestrator.sweep.spec_types import CHAMPION_RUNS
from trainers.config import ConfigError, DataConfig, flat_params, from_dict, validate_data
from trainers.data.audit import near_duplicates_between, perceptual_hashes
from trainers.data.dataset import DataError, PreparedData, prepare_data
from trainers.data.split import TRAIN
from trainers.plots import confusion_png
from trainers.predictions import ARTIFACT as PREDICTIONS
from trainers.predictions import PRODUCTION_ARTIFACT as PRODUCTION_PREDICTIONS
from trainers.predictions import Predictions, PredictionsError, read_predictions
from trainers.errors import first_line
from trainers.tracking import ensure_experiment, global_tracking_uri, link_model, mlflow_name, no_download_bars

if TYPE_CHECKING:
    import torch


class ProductionError(RegistryError):
    """The production evaluation cannot run as configured; the message says what to do."""


class ModelUnavailable(ProductionError):
    """One selected run's model cannot be loaded; the message says why. The other runs are still evaluated."""


# What loading a logged model raises when it cannot: the registry or the artifact store has no such
# model (MlflowException), its files are gone or unreadable (OSError), torch cannot read them (RuntimeError).
LOAD_ERRORS = (MlflowException, OSError, RuntimeError)


@dataclass(frozen=True)
class Candidate:
    """A finished trial run to evaluate on production data, and how its model is loaded."""
    run: Run
    evaluated_as: str                       # "champion": the run behind the registry alias now; else "run"
    groups: str                             # the trial's experiments, comma-separated (the plan's when it has it)
    version: ModelVersion | None = None     # its registered version (the champion's, for the champion)

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run.info.run_id[:8]

    @property
    def model_label(self) -> str:
        """'champion fer-vit v3', 'fer-vit v2', or '' for a run never registered."""
        if self.version is None:
            return ""
        role = f"{CHAMPION_RUNS} " if self.evaluated_as == CHAMPION_RUNS else ""
        return f"{role}{self.version.name} v{self.version.version}"

    @property
    def model_path(self) -> str:
        """What follows models:/ : the registered version (<name>/<version>) when there is one, else the run's
        logged model (its model id)."""
        if self.version is not None:
            return f"{self.version.name}/{self.version.version}"
        return self.run.data.tags["model_id"]

    @property
    def model_id(self) -> str | None:
        """The logged model evaluated: the registered version's, else the run's (None when it has none)."""
        return getattr(self.version, "model_id", None) or self.run.data.tags.get("model_id")


@dataclass(frozen=True)
class Evaluated:
    """What one model was evaluated on and what it predicted: the data config, the images, the predictions."""
    cfg: DataConfig
    data: PreparedData
    predictions: Predictions


class PreparedCache:
    """Data prepared once per call: production images per (image size, classes), each run's training
    data per data config (several runs of a sweep share one)."""

    def __init__(self, spec: SweepSpec, client: MlflowClient):
        self.spec, self.client = spec, client
        self.cfg = production_config(spec)
        self._production: dict[tuple, tuple[DataConfig, PreparedData]] = {}
        self._training: dict[tuple, PreparedData | str] = {}

    def production(self, source: Run) -> tuple[DataConfig, PreparedData]:
        """The production data config (with the model's classes) and its images at the model's size."""
        image_size, classes = model_input(source)
        key = (image_size, classes)
        if key not in self._production:
            cfg = with_model_classes(self.spec, self.cfg, classes)
            self._production[key] = (cfg, prepare_data(cfg, image_size))
        return self._production[key]

    def training(self, source: Run) -> PreparedData | str:
        """The run's own data, prepared as its trial did, or why that is not available."""
        image_size, _ = model_input(source)
        cfg = training_config_or_reason(self.client, source)
        if isinstance(cfg, str):
            return cfg
        key = (tuple(sorted(flat_params(cfg).items())), image_size)
        if key not in self._training:
            self._training[key] = prepared_or_reason(cfg, image_size)
        return self._training[key]


def model_input(source: Run) -> tuple[int, tuple[str, ...]]:
    """The run's model input size (px) and its classes, in the model's order."""
    return int(source.data.params["model.image_size"]), tuple(source.data.params["data.classes"].split(","))


def evaluate_run(client: MlflowClient, spec: SweepSpec, candidate: Candidate, cache: PreparedCache) -> ProductionResult:
    """Evaluate one run's model on spec.production and log one run in <sweep>-production; ModelUnavailable
    (nothing logged) when its model cannot be loaded."""
    source = candidate.run
    data_cfg, data = cache.production(source)
    model, device = load_candidate(client, candidate)
    logits = predict(model, data.images, np.arange(len(data.labels)), device)
    train = cache.training(source)                 # prepared once per data config, from the cache
    test_images, slice_note = source_test_images(client, source, train, data.classes)
    scores = score_production(data, logits, source.data.metrics, test_images)
    drift, verdict = drift_against_training(train, data, logits,
                                            lambda images, rows: predict(model, images, rows, device))
    version = candidate.version
    result = ProductionResult(run_id="", model_name="" if version is None else version.name,
                              version=None if version is None else int(version.version),
                              source_run_id=source.info.run_id, classes=data.classes,
                              metrics={**scores.metrics, **drift}, degradation=scores.degradation,
                              slices=scores.slices, drift_verdict=verdict, confusion=scores.confusion,
                              slice_note=slice_note, source_name=candidate.name)
    result.metrics.update(duplicates_against_training(train, data, data_cfg.duplicate_distance))
    evaluated = Evaluated(data_cfg, data, production_predictions(data, logits))
    result.run_id = log_production_run(client, spec, candidate, evaluated, result)
    return result


# --- what to evaluate -------------------------------------------------------------------

def production_config(spec: SweepSpec) -> DataConfig:
    """spec.production as a DataConfig; every split of it is production data."""
    if spec.production is None:
        raise ProductionError(f"{spec.path}: has no production section; add one naming the production "
                              "images (same keys as data, e.g. source: imagefolder, root: <folder>)")
    cfg = spec.production   # load_spec built and validated it
    if cfg.source != "synthetic" and not Path(cfg.root).expanduser().is_dir():
        raise ProductionError(f"{spec.path}: production.root folder '{cfg.root}' does not exist; "
                              "point it at the production images (one sub-folder per class)")
    return cfg


def with_model_classes(spec: SweepSpec, cfg: DataConfig, classes: tuple[str, ...]) -> DataConfig:
    """The production classes are the model's unless the spec names them; then they must match."""
    if not spec.production_has_classes:
        cfg = dataclasses.replace(cfg, classes=tuple(classes))
        validate_data(cfg, spec.path)
        return cfg
    if tuple(cfg.classes) != classes:
        raise ProductionError(f"{spec.path}: production.classes ({', '.join(cfg.classes)}) differ from the "
                              f"model's classes ({', '.join(classes)}); list the model's classes in its "
                              "order, or remove production.classes")
    return cfg


def require_champion(client: MlflowClient, spec: SweepSpec) -> ModelVersion:
    """The version the champion alias points at; an error naming `make promote` when there is none."""
    found = champion_version(client, spec.promote)
    if found is None:
        raise ProductionError(f"no {spec.promote.alias} for registered model '{spec.promote.name}' "
                              f"in {client.tracking_uri}; run `make promote` first")
    return found


def load_candidate(client: MlflowClient, candidate: Candidate) -> tuple[object, torch.device]:
    """The candidate's model (load_model), or ModelUnavailable saying why it cannot be loaded."""
    try:
        return load_model(client, candidate.model_path)
    except LOAD_ERRORS as err:
        raise ModelUnavailable(f"cannot load its model ({first_line(err)})") from err


def load_version(client: MlflowClient, name: str, version) -> tuple[object, torch.device]:
    """A registered model version (through the registry, never a local path) on CUDA if present."""
    return load_model(client, f"{name}/{version}")


def load_model(client: MlflowClient, path: str) -> tuple[object, torch.device]:
    """The model at models:/<path> of this store (a registered version or a logged model, never a file path:
    nothing outside the store is unpickled), on CUDA if present."""
    import mlflow.pytorch
    import torch

    from trainers.models import move_exported

    with global_tracking_uri(client.tracking_uri):
        model = mlflow.pytorch.load_model(f"models:/{path}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return move_exported(model, device), device


# --- drift against the model's held-out data ----------------------------------------------

def training_config(client: MlflowClient, source: Run) -> DataConfig:
    """The data section the run trained on (from its config.yaml artifact)."""
    with tempfile.TemporaryDirectory() as tmp, no_download_bars():
        path = client.download_artifacts(source.info.run_id, "config.yaml", tmp)
        raw = yaml.safe_load(Path(path).read_text())
    return from_dict({"data": raw["data"]}).data


def source_training_data(client: MlflowClient, source: Run, image_size: int) -> PreparedData:
    """The run's own data, prepared as its trial did."""
    return prepare_data(training_config(client, source), image_size)


def run_training_data(client: MlflowClient, source: Run, image_size: int) -> PreparedData | str:
    """source_training_data, or why it is not available (the data moved, the run lost its config)."""
    cfg = training_config_or_reason(client, source)
    return cfg if isinstance(cfg, str) else prepared_or_reason(cfg, image_size)


def training_config_or_reason(client: MlflowClient, source: Run) -> DataConfig | str:
    """training_config, or why the run's data section cannot be read (no config.yaml, a bad one)."""
    try:
        return training_config(client, source)
    except (MlflowException, OSError, KeyError, ConfigError) as err:
        return unavailable_training_data(err)


def prepared_or_reason(cfg: DataConfig, image_size: int) -> PreparedData | str:
    """prepare_data, or why the data cannot be prepared now."""
    try:
        return prepare_data(cfg, image_size)
    except (OSError, ConfigError, DataError) as err:
        return unavailable_training_data(err)


def unavailable_training_data(err: Exception) -> str:
    """Why a run's training data cannot be used (the data moved, the run lost its config)."""
    return f"the model's training data is not available ({first_line(err)})"


def drift_against_training(train: PreparedData | str, data: PreparedData, logits: np.ndarray,
                           predict_rows: Predict) -> tuple[dict[str, float], str]:
    """The drift scores against the model's held-out images (val + test of its training data), with
    their controls and intervals, and the verdict; 'unknown: why' when that data is gone."""
    if isinstance(train, str):
        return {}, f"unknown: {train}"
    drift = measure_drift(train, data, logits, predict_rows)
    return drift.scores, drift.verdict


# --- leakage into production -------------------------------------------------------------

def duplicates_against_training(train: PreparedData | str, data: PreparedData, max_distance: int) -> dict[str, float]:
    """production_duplicates_train (near-duplicate pairs between the model's training split and the
    production images) and production_duplicates_train_images; nothing when the training data is gone."""
    if isinstance(train, str):
        return {}
    # Hash every training image, then keep the train split's: the images stay memory-mapped, read in chunks.
    train_hashes = perceptual_hashes(train.images)[train.indices(TRAIN)]
    pairs = near_duplicates_between(train_hashes, perceptual_hashes(data.images), max_distance)
    return {"production_duplicates_train": float(len(pairs)),
            "production_duplicates_train_images": float(len(np.unique(pairs[:, 1])))}


# --- the test side of the slices -------------------------------------------------------------

def source_test_images(client: MlflowClient, source: Run, train: PreparedData | str,
                       classes: tuple[str, ...]) -> tuple[Labelled | None, str]:
    """The model's test predictions with each image's attributes, and a note when that is not (wholly)
    possible: predictions from its run's test_predictions.csv.gz, attributes from its training data."""
    unavailable = "test slices unavailable: "
    try:
        with tempfile.TemporaryDirectory() as tmp, no_download_bars():
            predictions = read_predictions(client.download_artifacts(source.info.run_id, PREDICTIONS, tmp))
    except (MlflowException, OSError, PredictionsError) as err:
        return None, f"{unavailable}the model's run has no readable {PREDICTIONS} ({first_line(err)})"
    if predictions.classes != classes:
        return None, f"{unavailable}{PREDICTIONS} has classes {list(predictions.classes)}, the model {list(classes)}"
    if isinstance(train, str):
        return None, unavailable + train
    return labelled_test_images(predictions, dict(zip(train.paths, train.attrs)))


# --- logging ---------------------------------------------------------------------------

def production_tags(spec: SweepSpec, candidate: Candidate, data: PreparedData, result: ProductionResult) -> dict:
    """The run's identity (role, sweep, source run and its config_hash and groups, production data digest),
    how it was picked (evaluated_as, with model_name / model_version when registered) and the drift verdict."""
    source = candidate.run
    tags = {"role": "production", "sweep": spec.name, "source_run_id": source.info.run_id,
            "source_run_name": candidate.name, "config_hash": source.data.tags.get("config_hash", ""),
            "groups": candidate.groups, "data_digest": data.digest,
            "drift_verdict": result.drift_verdict, "evaluated_as": candidate.evaluated_as}
    if candidate.version is not None:
        tags.update(model_name=candidate.version.name, model_version=str(candidate.version.version))
    if candidate.evaluated_as == CHAMPION_RUNS:
        tags["model_alias"] = spec.promote.alias
    return tags


def log_production_run(client: MlflowClient, spec: SweepSpec, candidate: Candidate, evaluated: Evaluated,
                       result: ProductionResult) -> str:
    """One run in <sweep>-production: params, metrics, tags, the tables and the predictions as artifacts;
    returns its id. Named '<model>-v<version>' for the champion, '<trial run>@production' otherwise."""
    data = evaluated.data
    experiment_id = ensure_experiment(client, f"{spec.name}-production")
    tags = production_tags(spec, candidate, data, result)
    run_name = (f"{result.model_name}-v{result.version}" if candidate.evaluated_as == CHAMPION_RUNS
                else f"{candidate.name}@production")
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    try:
        params = {f"production.{key}": value for key, value in flat_params(evaluated.cfg).items()}
        params["model.image_size"] = str(data.images.shape[1])
        now = int(1000 * time.time())
        values = {**result.metrics, **data.report.metrics()}
        # NaN is logged (an undefined metric, e.g. a class absent from a slice, reads "n/a"), not dropped.
        metrics = [Metric(mlflow_name(k), float(v), now, 0) for k, v in values.items()
                   if v is not None and not np.isinf(v)]
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        for i in range(0, len(metrics), 1000):   # the store takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        _log_tables(client, run_id, data.classes, result)
        link_model(client, run_id, candidate.model_id)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / PRODUCTION_PREDICTIONS
            path.write_bytes(evaluated.predictions.to_bytes())
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _log_tables(client: MlflowClient, run_id: str, classes: tuple[str, ...], result: ProductionResult) -> None:
    """The confusion matrix (JSON and PNG), degradation.csv / .md and slices.csv."""
    title = f"{result.title} on production data"
    client.log_text(run_id, json.dumps({"classes": list(classes), "counts": result.confusion.tolist()}),
                    "confusion_matrix.json")
    client.log_text(run_id, table_csv(result.degradation, DEGRADATION_COLUMNS), "degradation.csv")
    client.log_text(run_id, degradation_markdown(title, result.degradation), "degradation.md")
    with tempfile.TemporaryDirectory() as tmp:
        png = confusion_png(result.confusion, classes, Path(tmp) / "confusion_matrix.png", title)
        client.log_artifact(run_id, str(png))
    _log_slices(client, run_id, classes, result, title)


def _log_slices(client: MlflowClient, run_id: str, classes: tuple[str, ...], result: ProductionResult,
                title: str) -> None:
    """slices.csv (one row per slice), slices.json (everything, read by the report) and, per slice,
    slices/<attr>=<value>.json (production and test confusion counts) and .png (production)."""
    client.log_text(run_id, table_csv([slice_record(row) for row in result.slices], SLICE_COLUMNS), "slices.csv")
    client.log_text(run_id, json.dumps(slices_json(result.slices, classes, result.slice_note)), "slices.json")
    with tempfile.TemporaryDirectory() as tmp:
        for row in result.slices:
            stem = slice_file_stem(row)
            counts = {"classes": list(classes), "slice": row.name, "counts": row.production.confusion,
                      "test_counts": None if row.test is None else row.test.confusion}
            client.log_text(run_id, json.dumps(counts), f"slices/{stem}.json")
            png = confusion_png(np.asarray(row.production.confusion), classes, Path(tmp) / f"{stem}.png",
                                f"{title}: {row.name} ({row.production.count} images)")
            client.log_artifact(run_id, str(png), artifact_path="slices")
