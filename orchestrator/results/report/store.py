"""Everything the report reads from MLflow (the only module of the report that imports mlflow):
the sweep's parent and child runs, metric histories, test predictions, confusion matrices, the newest
production run of the champion with its degradation.csv, every production evaluation of a trial run with
its production predictions, and logging the finished report back to the parent run."""
from __future__ import annotations

import csv
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag
from mlflow.exceptions import MlflowException

from orchestrator.results.report.cells import Trial, without_duplicate_seeds
from orchestrator.results.report.mitigation import ProductionEvaluation
from orchestrator.results.runs import child_runs, find_parent_run, groups_of, safe_uri, search_all
from trainers.predictions import ARTIFACT as PREDICTIONS
from trainers.predictions import PRODUCTION_ARTIFACT, Predictions, PredictionsError, read_predictions
from trainers.tracking import no_download_bars

__all__ = ["MlflowClient", "ProductionRun", "SweepRuns", "safe_uri"]


def trial_of(run: Run) -> Trial:
    """A child run as the report needs it."""
    status = run.data.tags.get("status") or run.info.status.lower()
    return Trial(run.info.run_id, run.info.run_name or run.info.run_id, status, tuple(groups_of(run)),
                 run.data.tags.get("config_hash", ""), dict(run.data.params), dict(run.data.metrics),
                 run.data.tags.get("data_digest", ""))


@dataclass(frozen=True)
class ProductionRun:
    """The newest run of <sweep>-production, as the production verb logged it."""
    run_id: str
    tags: dict[str, str]
    metrics: dict[str, float]
    degradation: list[dict] | None    # degradation.csv: per class, then "overall"; None if not logged


class SweepRuns:
    """One sweep's records in an MLflow store; artifacts are downloaded into ``scratch``."""

    def __init__(self, client: MlflowClient, sweep: str, scratch: Path):
        self.client, self.sweep, self.scratch = client, sweep, scratch
        self._predictions: dict[tuple[str, str], Predictions | None] = {}

    @property
    def uri(self) -> str:
        """Where the runs are, fit to print (no password)."""
        return safe_uri(self.client.tracking_uri)

    def parent_run_id(self) -> str | None:
        parent = find_parent_run(self.client, self.sweep)
        return None if parent is None else parent.info.run_id

    def trials(self, parent_run_id: str) -> list[Trial]:
        """The sweep's child runs, oldest first; an older finished run of a config hash and seed that finished
        again is marked 'duplicate' (the report's tally counts it; no table does)."""
        return without_duplicate_seeds([trial_of(run) for run in child_runs(self.client, self.sweep, parent_run_id)])

    def trial(self, run_id: str | None) -> Trial | None:
        """One run by id; None when there is no id or the run is gone."""
        if not run_id:
            return None
        try:
            return trial_of(self.client.get_run(run_id))
        except MlflowException:
            return None

    def metric_history(self, run_id: str, metric: str) -> dict[int, float]:
        """step -> value; a resumed run may log a step twice, the last value wins."""
        history = sorted(self.client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
        return {m.step: m.value for m in history}

    def download(self, run_id: str, artifact: str) -> Path | None:
        """A run's artifact as a local file; None when the run did not log it."""
        folder = self.scratch / run_id
        folder.mkdir(exist_ok=True)
        try:
            with no_download_bars():
                return Path(self.client.download_artifacts(run_id, artifact, str(folder)))
        except (MlflowException, OSError):
            return None

    def predictions(self, run_id: str, artifact: str = PREDICTIONS) -> Predictions | None:
        """A run's saved test predictions (or another predictions artifact), downloaded once per report;
        None when it has none (older runs) or the file is not one this project writes."""
        key = (run_id, artifact)
        if key not in self._predictions:
            path = self.download(run_id, artifact)
            try:
                self._predictions[key] = None if path is None else read_predictions(path)
            except PredictionsError:
                self._predictions[key] = None
        return self._predictions[key]

    def production_predictions(self, run_id: str) -> Predictions | None:
        """A production evaluation's production_predictions.csv.gz (with the images' attributes), or None."""
        return self.predictions(run_id, PRODUCTION_ARTIFACT)

    def confusion_counts(self, run_ids: list[str]) -> tuple[list[str], np.ndarray] | None:
        """The runs' confusion_matrix.json counts, summed over seeds; None when no run logged one."""
        classes, total = None, None
        for run_id in run_ids:
            path = self.download(run_id, "confusion_matrix.json")
            if path is None:
                continue
            body = json.loads(path.read_text())
            counts = np.asarray(body["counts"], dtype=np.int64)
            if total is None:
                classes, total = list(body["classes"]), counts
            elif list(body["classes"]) == classes and counts.shape == total.shape:
                total = total + counts
        return None if total is None else (classes, total)

    @functools.cached_property
    def _production_runs(self) -> list[Run]:
        """The runs of <sweep>-production tagged role=production, newest first: read once per report."""
        experiment = self.client.get_experiment_by_name(f"{self.sweep}-production")
        if experiment is None:
            return []
        return search_all(self.client, [experiment.experiment_id], "tags.role = 'production'",
                          order_by=["attributes.start_time DESC"])

    def champion_source_run(self, name: str, alias: str) -> str | None:
        """The trial run behind the registered version that holds the alias, or None (none promoted yet)."""
        version = self._aliased(name, alias)
        return None if version is None else version.tags.get("source_run_id") or version.run_id

    def champion_version(self, name: str, alias: str) -> str | None:
        """The number of the registered version that holds the alias, or None."""
        version = self._aliased(name, alias)
        return None if version is None else str(version.version)

    def _aliased(self, name: str, alias: str):
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def production_run(self, champion_run_id: str | None = None, any_run: bool = False) -> ProductionRun | None:
        """The newest production evaluation of the champion (its trial run champion_run_id). Without one (not
        evaluated yet, or nothing promoted): the newest evaluated as a champion (an earlier one; a run without
        the evaluated_as tag predates `production --runs` and was one); with any_run, else the newest of all."""
        runs = self._production_runs
        run = (next((r for r in runs if champion_run_id and r.data.tags.get("source_run_id") == champion_run_id),
                    None)
               or next((r for r in runs if r.data.tags.get("evaluated_as", "champion") == "champion"), None)
               or (runs[0] if any_run and runs else None))
        if run is None:
            return None
        path = self.download(run.info.run_id, "degradation.csv")
        return ProductionRun(run.info.run_id, dict(run.data.tags), dict(run.data.metrics),
                             None if path is None else read_degradation(path))

    def production_evaluations(self) -> list[ProductionEvaluation]:
        """Every FINISHED production evaluation of a trial run (tag source_run_id), newest first."""
        return [ProductionEvaluation(r.info.run_id, r.data.tags["source_run_id"], r.data.tags.get("config_hash", ""),
                                     r.data.tags.get("data_digest", ""), r.info.start_time or 0, dict(r.data.metrics))
                for r in self._production_runs
                if r.info.status == "FINISHED" and r.data.tags.get("source_run_id")]

    def log_report(self, parent_run_id: str, files: list[Path]) -> None:
        """The report's files as artifacts of the parent run, under report/."""
        for file in files:
            self.client.log_artifact(parent_run_id, str(file), artifact_path="report")

    def log_summary(self, parent_run_id: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """The sweep's summary on its parent run (step 0: MLflow's charts draw one value per run)."""
        now = int(1000 * time.time())
        self.client.log_batch(parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                              tags=[RunTag(k, v[:5000]) for k, v in tags.items()])


def read_degradation(path: Path) -> list[dict]:
    """degradation.csv's rows: `class` as text, every other column a fraction (None where empty)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{k: v if k == "class" else (float(v) if v else None) for k, v in row.items()} for row in rows]
