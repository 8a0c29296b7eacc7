"""Promotion: register the sweep's best model in the MLflow registry and alias it champion if it wins.

Conventions (MLflow 3 aliases, not stages):
  registered model  = spec.promote.name (default fer-vit); one version per promoted trial run
  version tags      = source_run_id, sweep, config_hash, data_digest, model, selection_metric,
                      selection_value and every comparable metric (val_macro_f1, val_accuracy,
                      test_macro_f1, test_accuracy) under the spec's names
  aliases           = spec.promote.alias (default champion) on the best version so far;
                      previous on the version it replaced

"val_macro_f1" means the run's final_val_macro_f1: the logged model holds the last epoch's
weights (training does not restore the best epoch), so the last epoch's validation F1 is the
score of the model being registered. best_val_macro_f1 would credit it with an earlier epoch's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from orchestrator.results.runs import child_runs
from orchestrator.sweep.spec import PromoteSpec, SweepSpec
from trainers.tracking import global_tracking_uri
from trainers.errors import UserError

PREVIOUS_ALIAS = "previous"
# The spec's metric name -> the trial-run metric that scores the logged model (see the module docstring).
RUN_METRICS = {"val_macro_f1": "final_val_macro_f1", "val_accuracy": "val_accuracy",
               "test_macro_f1": "test_macro_f1", "test_accuracy": "test_accuracy"}


class RegistryError(UserError, ValueError):
    """Promotion or production evaluation cannot go on; the one-line message says what to do."""


@dataclass
class PromotionResult:
    version: int                 # the registered version of the picked run (new or existing)
    run_id: str
    metric: str                  # the run metric compared, e.g. final_val_macro_f1
    value: float
    champion_changed: bool
    message: str


def promote(spec: SweepSpec, client: MlflowClient) -> PromotionResult:
    """Register the best finished run of the sweep (by spec.promote) and alias it champion if it wins."""
    p = spec.promote
    run_metric = RUN_METRICS[p.metric]
    run = best_run(spec, client, run_metric)
    value = run.data.metrics[run_metric]
    version = find_version(client, p.name, run.info.run_id)
    if version is None:
        version = register_run(client, spec, run)
    changed, why = crown_if_better(client, p, version, run)
    label = _metric_label(p.metric)
    message = f"{p.name} v{version.version} from run {run.info.run_name} ({run.info.run_id[:8]}), " \
              f"{label} {value:.4f}: {why}"
    return PromotionResult(version=int(version.version), run_id=run.info.run_id, metric=run_metric,
                           value=value, champion_changed=changed, message=message)


def _metric_label(metric: str) -> str:
    if metric.startswith("test_"):
        return f"{metric} (selected on the test set, as the study did: an optimistic score)"
    if metric == "val_macro_f1":
        return "val_macro_f1 (final epoch)"
    return metric


# --- picking the run --------------------------------------------------------------------

def promote_architecture(spec: SweepSpec) -> str:
    """The architecture (param model.name) that spec.promote.model names, directly or through a preset."""
    preset = spec.models.get(spec.promote.model)
    return preset.name if preset else spec.promote.model


def best_run(spec: SweepSpec, client: MlflowClient, run_metric: str) -> Run:
    """The finished run of the promoted architecture with the highest run_metric (earliest on a tie)."""
    finished = child_runs(client, spec.name, status="finished")
    if not finished:
        raise RegistryError(f"sweep '{spec.name}' has no finished runs in {client.tracking_uri}; "
                            "run `make sweep` first")
    arch = promote_architecture(spec)
    matching = [r for r in finished if r.data.params.get("model.name") == arch]
    if not matching:
        found = sorted({r.data.params.get("model.name", "?") for r in finished})
        raise RegistryError(f"sweep '{spec.name}' has no finished {arch} run to promote "
                            f"(promote.model: {spec.promote.model}; finished runs are {', '.join(found)}); "
                            "set promote.model to one of those or run the sweep's experiments with it")
    scored = [r for r in matching if math.isfinite(r.data.metrics.get(run_metric, math.nan))
              and r.data.tags.get("model_id")]
    if not scored:
        raise RegistryError(f"no finished {arch} run of sweep '{spec.name}' has both {run_metric} and a "
                            "logged model; check that tracking.log_model is on and the runs have a test split")
    # search order is oldest first, and max keeps the first of equals
    return max(scored, key=lambda r: r.data.metrics[run_metric])


# --- versions ---------------------------------------------------------------------------

def find_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version already registered from this run, if any (the oldest, should there be several)."""
    found = client.search_model_versions(f"name = '{name}' and tags.source_run_id = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def version_tags(spec: SweepSpec, run: Run) -> dict[str, str]:
    """What a version records of its run: provenance, and every metric a later promotion may compare."""
    tags = {"source_run_id": run.info.run_id, "sweep": spec.name,
            "config_hash": run.data.tags.get("config_hash", ""), "data_digest": run.data.tags.get("data_digest", ""),
            "model": run.data.params.get("model.name", ""), "run_name": run.info.run_name or "",
            "selection_metric": spec.promote.metric,
            "selection_value": repr(run.data.metrics[RUN_METRICS[spec.promote.metric]])}
    for name, run_metric in RUN_METRICS.items():
        if run_metric in run.data.metrics:
            tags[name] = repr(run.data.metrics[run_metric])
    return tags


def register_run(client: MlflowClient, spec: SweepSpec, run: Run) -> ModelVersion:
    """A new version of spec.promote.name from the run's logged model (models:/<model_id>)."""
    model_id = run.data.tags["model_id"]
    with global_tracking_uri(client.tracking_uri):
        version = mlflow.register_model(f"models:/{model_id}", spec.promote.name, tags=version_tags(spec, run))
    metric = spec.promote.metric
    client.update_model_version(
        spec.promote.name, version.version,
        description=f"{run.data.params.get('model.name', 'model')} from sweep {spec.name}, run "
                    f"{run.info.run_name}; {metric} {run.data.metrics[RUN_METRICS[metric]]:.4f}")
    return client.get_model_version(spec.promote.name, version.version)


def champion_version(client: MlflowClient, promote_spec: PromoteSpec) -> ModelVersion | None:
    """The version holding the champion alias, or None (no registered model or no alias yet)."""
    try:
        registered = client.get_registered_model(promote_spec.name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = registered.aliases.get(promote_spec.alias)
    return None if version is None else client.get_model_version(promote_spec.name, str(version))


def incumbent_score(client: MlflowClient, version: ModelVersion, metric: str) -> float | None:
    """The incumbent's score on metric: its version tag, else its source run's metric."""
    if metric in version.tags:
        return float(version.tags[metric])
    run_id = version.tags.get("source_run_id") or version.run_id
    if not run_id:
        return None
    try:
        return client.get_run(run_id).data.metrics.get(RUN_METRICS[metric])
    except MlflowException:
        return None


def crown_if_better(client: MlflowClient, p: PromoteSpec, candidate: ModelVersion, run: Run) -> tuple[bool, str]:
    """Move the champion alias to candidate when it beats the incumbent on p.metric; say what happened."""
    incumbent = champion_version(client, p)
    value = run.data.metrics[RUN_METRICS[p.metric]]
    if incumbent is None:
        client.set_registered_model_alias(p.name, p.alias, candidate.version)
        return True, f"now {p.alias} (there was none)"
    if incumbent.version == candidate.version:
        return False, f"already {p.alias}"
    score = incumbent_score(client, incumbent, p.metric)
    other_data = ""
    if incumbent.tags.get("data_digest") not in (None, "", candidate.tags.get("data_digest")):
        other_data = f"; note the two were measured on different data ({incumbent.tags['data_digest']} " \
                     f"vs {candidate.tags.get('data_digest')})"
    if score is not None and value <= score:
        return False, (f"kept {p.alias} v{incumbent.version}: its {p.metric} {score:.4f} is not beaten "
                       f"by {value:.4f}{other_data}")
    client.set_registered_model_alias(p.name, p.alias, candidate.version)
    client.set_registered_model_alias(p.name, PREVIOUS_ALIAS, incumbent.version)
    before = "no score" if score is None else f"{p.metric} {score:.4f}"
    return True, f"now {p.alias}, replacing v{incumbent.version} ({before}), which is now {PREVIOUS_ALIAS}{other_data}"
