"""Promotion: register the sweep's best model in the MLflow registry and alias it champion if it wins.

Selection, as the report's Table 11: the promoted model's finished runs are grouped into configurations
(runs that differ only in their seed), the configuration with the best mean of promote.metric over its
seeds wins, and its run closest to that mean (the lowest seed of equals) is the one registered: a
typical seed, not the luckiest one. promote.model names an architecture or a preset; a preset's runs
are those with its model params, as the report reads them. A run registered before gets its selection
tags brought up to date when it is picked again (more seeds may have finished since).

Conventions (MLflow 3 aliases, not stages):
  registered model  = spec.promote.name (default fer-vit); one version per promoted trial run
  version tags      = source_run_id, sweep, config_hash, data_digest, model, selection_metric,
                      selection_value (this run's score), selection_mean and selection_n_seeds (its
                      configuration's mean over that many seeds, what promotion compares) and every
                      comparable metric (val_macro_f1, val_accuracy, test_macro_f1, test_accuracy)
                      under the spec's names
  aliases           = spec.promote.alias (default champion) on the best version so far;
                      previous on the version it replaced

A candidate trained on other data (another data_digest) than the champion is not compared with it:
their validation scores measure different things. It is registered, so that `promote --replace` (which
crowns the candidate without comparing) or a manual alias move can use it, but the champion stays.

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

from orchestrator.results.report.cells import best_configuration, configurations, runs_of_model
from orchestrator.results.report.store import trial_of
from orchestrator.results.runs import child_runs, safe_uri, sweep_command
from orchestrator.sweep.spec import PromoteSpec, SweepSpec
from trainers.tracking import global_tracking_uri, model_interface, photo_model_of
from trainers.errors import UserError

PREVIOUS_ALIAS = "previous"
# A version tag: "true" when its model takes photos (trainers/photo_model.py), "false" on a version registered
# before models took photos once its run is registered again; absent on older versions.
PHOTO_TAG = "takes_photos"
# The spec's metric name -> the trial-run metric that scores the logged model (see the module docstring).
RUN_METRICS = {"val_macro_f1": "final_val_macro_f1", "val_accuracy": "val_accuracy",
               "test_macro_f1": "test_macro_f1", "test_accuracy": "test_accuracy"}


class RegistryError(UserError, ValueError):
    """Promotion or production evaluation cannot go on; the one-line message says what to do."""


@dataclass(frozen=True)
class Selection:
    """The run to register and the configuration it stands for."""
    run: Run
    mean: float                  # the configuration's mean run metric over its seeds
    n_seeds: int                 # its finished runs with that metric
    n_configurations: int        # configurations of the promoted model that competed


@dataclass
class PromotionResult:
    version: int                 # the registered version of the picked run (new or existing)
    run_id: str
    metric: str                  # the run metric compared, e.g. final_val_macro_f1
    value: float                 # this run's score
    mean: float                  # its configuration's mean over n_seeds seeds (what is compared)
    n_seeds: int
    champion_changed: bool
    message: str


def promote(spec: SweepSpec, client: MlflowClient, replace: bool = False) -> PromotionResult:
    """Register the run closest to the best configuration's mean (by spec.promote) and alias it champion
    if it beats the incumbent; replace crowns it without comparing."""
    p = spec.promote
    run_metric = RUN_METRICS[p.metric]
    chosen = select_run(spec, client, run_metric)
    run = chosen.run
    value = run.data.metrics[run_metric]
    version = find_version(client, p.name, run.info.run_id)
    if version is not None and model_interface(client, f"models:/{p.name}/{version.version}") == "network":
        # Registered before models took photos: the run is registered again, as a photo model.
        client.set_model_version_tag(p.name, version.version, PHOTO_TAG, "false")
        version = None
    if version is None:
        version = register_run(client, spec, chosen)
    else:
        for key, text in selection_tags(chosen).items():
            client.set_model_version_tag(p.name, version.version, key, text)
    changed, why = crown_if_better(client, p, version, chosen, replace)
    seeds = f"{chosen.n_seeds} seed{'s' if chosen.n_seeds != 1 else ''}"
    message = f"{p.name} v{version.version} from run {run.info.run_name} ({run.info.run_id[:8]}), " \
              f"{_metric_label(p.metric)} {value:.4f}: the run closest to the best mean over {seeds} " \
              f"({chosen.mean:.4f}, {chosen.n_configurations} configuration(s) compared); {why}"
    return PromotionResult(version=int(version.version), run_id=run.info.run_id, metric=run_metric,
                           value=value, mean=chosen.mean, n_seeds=chosen.n_seeds, champion_changed=changed,
                           message=message)


def _metric_label(metric: str) -> str:
    if metric.startswith("test_"):
        return f"{metric} (selected on the test set, as the study did: an optimistic score)"
    if metric == "val_macro_f1":
        return "val_macro_f1 (final epoch)"
    return metric


# --- picking the run --------------------------------------------------------------------

def select_run(spec: SweepSpec, client: MlflowClient, run_metric: str) -> Selection:
    """The best configuration of spec.promote.model by mean run_metric over seeds, and its run closest
    to that mean that has a logged model."""
    finished = child_runs(client, spec.name, status="finished")
    if not finished:
        raise RegistryError(f"sweep '{spec.name}' has no finished runs in {safe_uri(client.tracking_uri)}; "
                            f"run `{sweep_command(spec, client.tracking_uri)}` first")
    model = spec.promote.model
    candidates = runs_of_model(spec, model, [trial_of(r) for r in finished])
    if not candidates:
        found = sorted({r.data.params.get("model.name", "?") for r in finished})
        raise RegistryError(f"sweep '{spec.name}' has no finished {model} run to promote "
                            f"(promote.model: {model}; finished runs are {', '.join(found)}); "
                            "set promote.model to one of those or run the sweep's experiments with it")
    configs = configurations(candidates)
    best = best_configuration(configs, run_metric)
    if best is None:
        raise RegistryError(f"no finished {model} run of sweep '{spec.name}' has {run_metric}; "
                            "check that the runs have validation and test splits")
    stat = best.stat(run_metric)
    by_id = {r.info.run_id: r for r in finished}
    logged = [by_id[t.run_id] for t in best.finished
              if math.isfinite(t.metrics.get(run_metric, math.nan)) and by_id[t.run_id].data.tags.get("model_id")]
    if not logged:
        raise RegistryError(f"the best {model} configuration of sweep '{spec.name}' (runs "
                            f"{', '.join(t.name for t in best.finished)}) has no logged model; "
                            "check that tracking.log_model is on and run it again (with log_model: best_k, "
                            "runs tagged model_pending wait for the sweep to complete on the host that keeps "
                            "their weights: run the sweep or worker there again)")
    return Selection(closest_to_mean(logged, run_metric, stat.mean), stat.mean, stat.n, len(configs))


def closest_to_mean(runs: list[Run], run_metric: str, mean: float) -> Run:
    """The run whose run_metric is nearest the mean; the lowest train.seed of equals."""
    def seed(run: Run) -> float:
        try:
            return int(run.data.params.get("train.seed", ""))
        except ValueError:
            return math.inf
    # Rounded: 0.7 and 0.9 around 0.8 differ from it by 0.1 up to float noise, and are equals.
    return min(runs, key=lambda r: (round(abs(r.data.metrics[run_metric] - mean), 12), seed(r)))


# --- versions ---------------------------------------------------------------------------

def find_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version already registered from this run, if any (the oldest, should there be several); one
    known to be a bare network (tagged takes_photos=false when its run was registered again) does not count."""
    found = client.search_model_versions(f"name = '{name}' and tags.source_run_id = '{run_id}'")
    found = [v for v in found if v.tags.get(PHOTO_TAG) != "false"]
    return min(found, key=lambda v: int(v.version)) if found else None


def selection_tags(chosen: Selection) -> dict[str, str]:
    """Why this run was picked: its configuration's mean and how many seeds it is over."""
    return {"selection_mean": repr(chosen.mean), "selection_n_seeds": str(chosen.n_seeds)}


def version_tags(spec: SweepSpec, chosen: Selection) -> dict[str, str]:
    """What a version records of its run: provenance, the selection, and every metric a later promotion may compare."""
    run = chosen.run
    tags = {"source_run_id": run.info.run_id, "sweep": spec.name,
            "config_hash": run.data.tags.get("config_hash", ""), "data_digest": run.data.tags.get("data_digest", ""),
            "model": run.data.params.get("model.name", ""), "run_name": run.info.run_name or "",
            "selection_metric": spec.promote.metric,
            "selection_value": repr(run.data.metrics[RUN_METRICS[spec.promote.metric]]),
            **selection_tags(chosen)}
    for name, run_metric in RUN_METRICS.items():
        if run_metric in run.data.metrics:
            tags[name] = repr(run.data.metrics[run_metric])
    return tags


def register_run(client: MlflowClient, spec: SweepSpec, chosen: Selection) -> ModelVersion:
    """A new version of spec.promote.name from the chosen run's logged model (models:/<model_id>), which takes
    photos (a model logged before that is logged again first)."""
    run = chosen.run
    model_id, interface = photo_model_of(client, run)
    tags = version_tags(spec, chosen)
    if interface == "photos":
        tags[PHOTO_TAG] = "true"
    with global_tracking_uri(client.tracking_uri):
        version = mlflow.register_model(f"models:/{model_id}", spec.promote.name, tags=tags)
    metric = spec.promote.metric
    client.update_model_version(
        spec.promote.name, version.version,
        description=f"{run.data.params.get('model.name', 'model')} from sweep {spec.name}, run "
                    f"{run.info.run_name}; {metric} {run.data.metrics[RUN_METRICS[metric]]:.4f}, its "
                    f"configuration's mean over {chosen.n_seeds} seed(s) {chosen.mean:.4f}")
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


def source_run_id(version: ModelVersion) -> str | None:
    """The trial run a registered version came from (its source_run_id tag; the version's run for older ones)."""
    return version.tags.get("source_run_id") or version.run_id


def incumbent_score(client: MlflowClient, version: ModelVersion, metric: str) -> tuple[float | None, str]:
    """The incumbent's score on metric and what it is: its selection mean when it was selected on metric,
    else its run's value (a version promoted before selection by mean)."""
    if version.tags.get("selection_metric") == metric and "selection_mean" in version.tags:
        n = version.tags.get("selection_n_seeds", "?")
        return float(version.tags["selection_mean"]), f"mean {metric} over {n} seed(s)"
    if metric in version.tags:
        return float(version.tags[metric]), metric
    run_id = source_run_id(version)
    if not run_id:
        return None, metric
    try:
        return client.get_run(run_id).data.metrics.get(RUN_METRICS[metric]), metric
    except MlflowException:
        return None, metric


def other_data(incumbent: ModelVersion, candidate: ModelVersion) -> str | None:
    """How the two versions' training data differ ('data_digest a vs b'), or None when it is the same or unknown."""
    theirs, ours = incumbent.tags.get("data_digest"), candidate.tags.get("data_digest", "")
    if theirs in (None, "", ours):
        return None
    return f"data_digest {ours or 'unknown'}, v{incumbent.version}'s {theirs}"


def crown_if_better(client: MlflowClient, p: PromoteSpec, candidate: ModelVersion, chosen: Selection,
                    replace: bool = False) -> tuple[bool, str]:
    """Move the champion alias to candidate when it beats the incumbent on p.metric (or replace says so);
    a candidate trained on other data is not compared. Say what happened."""
    incumbent = champion_version(client, p)
    if incumbent is None:
        client.set_registered_model_alias(p.name, p.alias, candidate.version)
        return True, f"now {p.alias} (there was none)"
    if incumbent.version == candidate.version:
        return False, f"already {p.alias}"
    if source_run_id(incumbent) == source_run_id(candidate) and incumbent.tags.get(PHOTO_TAG) == "false":
        client.set_registered_model_alias(p.name, p.alias, candidate.version)
        return True, f"now {p.alias}: the run of v{incumbent.version}, registered again to take photos"
    score, what = incumbent_score(client, incumbent, p.metric)
    before = "no score" if score is None else f"{what} {score:.4f}"
    differs = other_data(incumbent, candidate)
    if differs:
        verdict = f"v{candidate.version} was trained on different data (its {differs}), so their " \
                  f"{p.metric} scores are not comparable"
    elif score is not None and chosen.mean <= score:
        verdict = f"its {what} {score:.4f} is not beaten by {chosen.mean:.4f}"
    else:
        verdict = None
    if verdict and not replace:
        hint = f"; v{candidate.version} is registered, not {p.alias}: pass --replace to promote it anyway" \
            if differs else ""
        return False, f"kept {p.alias} v{incumbent.version}: {verdict}{hint}"
    client.set_registered_model_alias(p.name, p.alias, candidate.version)
    client.set_registered_model_alias(p.name, PREVIOUS_ALIAS, incumbent.version)
    forced = f"; --replace promoted it although {verdict}" if verdict else ""
    return True, f"now {p.alias}, replacing v{incumbent.version} ({before}), which is now {PREVIOUS_ALIAS}{forced}"
