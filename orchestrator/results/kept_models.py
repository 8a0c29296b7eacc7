"""tracking.log_model: best_k: once a sweep is complete, the models of its best configurations are logged from
the weights their runs kept, and the other weights are deleted unwritten.

A finished trial under best_k logs no model: it keeps its final weights (trainers/run.py keep_weights) in
<train.checkpoint_dir>/kept-models/<sweep>/<run id>.pt and its run carries the tag model_pending (the file).
When no trial is left waiting or running, the sweep ranks, per model name (and among promote.model's runs),
the configurations as `promote` does (report/cells.best_configuration: the best mean of promote.metric over
seeds) and logs the model of each of the k best's run nearest that mean (registry.closest_to_mean): the run
`promote` picks. A run whose weights are not on this host (another worker ran it, or they were deleted)
keeps its tag and is named in a warning; the configuration's next-nearest run with weights here is logged
in its place, so promotion still finds a model. Then this host's kept weights are deleted.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.entities import Run

from orchestrator.results.registry import RUN_METRICS, closest_to_mean
from orchestrator.results.report.cells import Cell, best_configuration, configurations, runs_of_model
from orchestrator.results.report.store import trial_of
from orchestrator.results.runs import child_runs, sweep_command
from orchestrator.sweep.spec import SweepSpec
from trainers.config import kept_models_dir
from trainers.errors import first_line
from trainers.tracking import MODEL_PENDING_TAG, log_decided_model, logged_config


@dataclass
class Decision:
    """What deciding the pending models did."""
    logged: list[Run] = field(default_factory=list)     # runs whose model was logged now
    missing: list[Run] = field(default_factory=list)    # chosen runs whose weights are not on this host
    pending: int = 0                                    # runs whose model was pending
    unwritten_bytes: int = 0                            # kept weights deleted without being logged


def kept_folders(spec: SweepSpec) -> list[Path]:
    """This host's kept-models folders of the sweep: one per train.checkpoint_dir its trials use."""
    dirs = {spec.defaults.train.checkpoint_dir, *(t.config.train.checkpoint_dir for t in spec.plan)}
    return [kept_models_dir(d, spec.name) for d in sorted(dirs)]


def kept_files(spec: SweepSpec) -> list[Path]:
    return [f for folder in kept_folders(spec) if folder.is_dir() for f in folder.glob("*.pt")]


def best_configurations(configs: list[Cell], metric: str, k: int) -> list[Cell]:
    """The k configurations with the best mean metric, best first: best_configuration (promote's choice)
    taken k times."""
    left, best = list(configs), []
    while len(best) < k and (cell := best_configuration(left, metric)) is not None:
        best.append(cell)
        left = [c for c in left if c is not cell]
    return best


def candidates(spec: SweepSpec, finished: list[Run], k: int) -> list[list[Run]]:
    """For each model name, and for promote.model's runs, each of the k best configurations' finished runs,
    nearest the configuration's mean first (the first is the one `promote` registers)."""
    metric = RUN_METRICS[spec.promote.metric]
    trials = [trial_of(r) for r in finished]
    by_id = {r.info.run_id: r for r in finished}
    groups = [[t for t in trials if t.params.get("model.name") == name]
              for name in sorted({t.params.get("model.name", "") for t in trials})]
    groups.append(runs_of_model(spec, spec.promote.model, trials))
    ranked = []
    for group in groups:
        for cell in best_configurations(configurations(group), metric, k):
            left = [by_id[t.run_id] for t in cell.finished if math.isfinite(t.metrics.get(metric, math.nan))]
            order = []
            while left:
                nearest = closest_to_mean(left, metric, cell.stat(metric).mean)
                order.append(nearest)
                left = [r for r in left if r is not nearest]
            ranked.append(order)
    return ranked


def has_weights(run: Run) -> bool:
    path = run.data.tags.get(MODEL_PENDING_TAG)
    return bool(path) and Path(path).is_file()


def choose(spec: SweepSpec, finished: list[Run], k: int) -> tuple[list[Run], list[Run]]:
    """(runs whose model to log now, chosen runs whose weights are not here): per ranked configuration, its
    nearest run; when that one has neither a model nor weights here, also the next nearest that has either."""
    log, missing = {}, {}
    for order in candidates(spec, finished, k):
        for run in order:
            if run.data.tags.get("model_id"):           # logged already (log_model: true, or decided before)
                break
            if has_weights(run):
                log[run.info.run_id] = run
                break
            if MODEL_PENDING_TAG in run.data.tags:
                missing[run.info.run_id] = run
    return list(log.values()), [r for r in missing.values() if r.info.run_id not in log]


def decide(spec: SweepSpec, client: MlflowClient, parent_run_id: str) -> Decision:
    """Log the chosen runs' models from their kept weights, clear the others' pending tags, delete this host's
    kept weights. Safe to repeat (another host may have decided some runs meanwhile); a model that cannot be
    logged keeps its run pending and its weights, with one warning line."""
    finished = child_runs(client, spec.name, parent_run_id, status="finished")
    pending = [r for r in finished if MODEL_PENDING_TAG in r.data.tags]
    to_log, missing = choose(spec, finished, spec.tracking.best_k) if pending else ([], [])
    decision = Decision(missing=missing, pending=len(pending))
    kept_back = set()
    for run in to_log:
        if client.get_run(run.info.run_id).data.tags.get("model_id"):    # another host logged it meanwhile
            continue
        try:
            log_kept_model(client, run)
            decision.logged.append(run)
        except Exception as err:        # a damaged file, the store: this run waits, the others go on
            kept_back.add(Path(run.data.tags[MODEL_PENDING_TAG]).resolve())
            print(f"warning: the model of run {run.info.run_name} ({run.info.run_id}) could not be logged from "
                  f"{run.data.tags[MODEL_PENDING_TAG]}: {first_line(err)}; it stays {MODEL_PENDING_TAG} with its "
                  "weights (run the sweep again to retry)", flush=True)
    decided = {r.info.run_id for r in to_log + missing}
    for run in pending:
        if run.info.run_id not in decided:
            forget_pending(client, run.info.run_id)      # not among the best: no model
    logged_files = {Path(r.data.tags[MODEL_PENDING_TAG]).resolve() for r in decision.logged}
    for f in kept_files(spec):
        if f.resolve() not in kept_back:
            decision.unwritten_bytes += 0 if f.resolve() in logged_files else f.stat().st_size
            f.unlink(missing_ok=True)
    for folder in kept_folders(spec):
        with contextlib.suppress(OSError):      # the folders, once they hold no weights
            folder.rmdir()
            folder.parent.rmdir()
    return decision


def forget_pending(client: MlflowClient, run_id: str) -> None:
    """The run's pending tag removed; already gone (another host decided it) is fine."""
    try:
        client.delete_tag(run_id, MODEL_PENDING_TAG)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def log_kept_model(client: MlflowClient, run: Run) -> None:
    """The run's model, rebuilt from its logged config and loaded with its kept weights, logged into the run."""
    import torch

    from trainers.models import build_model

    cfg = logged_config(client, run.info.run_id)
    network = build_model(cfg.model, len(cfg.data.classes))
    # weights_only: a state dict of tensors, nothing pickled runs
    network.load_state_dict(torch.load(run.data.tags[MODEL_PENDING_TAG], map_location="cpu", weights_only=True))
    log_decided_model(client, run.info.run_id, network.eval(), cfg)


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def decide_kept_models(spec: SweepSpec, client: MlflowClient, parent_run_id: str, complete: bool) -> None:
    """At the end of a log_model: best_k sweep on this host: decide the models when the sweep is complete, else
    say that the weights wait; one line either way (plus one warning per chosen run without weights here)."""
    k = spec.tracking.best_k
    if not complete:
        waiting = kept_files(spec)
        if waiting:
            resume = sweep_command(spec, client.tracking_uri)
            print(f"models: {len(waiting)} finished run(s) keep their weights under {kept_folders(spec)[0]}; the "
                  f"best {k} per model are logged when the sweep is complete (`{resume}` resumes it)", flush=True)
        return
    decision = decide(spec, client, parent_run_id)
    for run in decision.missing:
        print(f"warning: run {run.info.run_name} ({run.info.run_id}) is among the best {k} but its kept weights "
              f"{run.data.tags[MODEL_PENDING_TAG]} are not on this host (another worker's, or deleted); it stays "
              f"{MODEL_PENDING_TAG} for the host that holds them", flush=True)
    if decision.pending:
        print(f"models: logged {len(decision.logged)} of {decision.pending} runs (best {k} per model by "
              f"{spec.promote.metric}), {size_text(decision.unwritten_bytes)} not written", flush=True)
