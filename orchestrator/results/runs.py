"""Reading a sweep's MLflow runs: one experiment per sweep, one parent run, one child run per trial
(trainers.tracking opens and closes them).

Conventions every verb relies on:
  experiment  = the sweep's name
  parent run  = run name <sweep>, tags role=sweep, sweep=<name>; spec.yaml and plan.csv as artifacts
  child runs  = run name <trial name>, tags role=trial, sweep=<name>, groups=<g1,g2>, config_hash,
                optuna_trial, status (finished | diverged | failed | pruned), mlflow.parentRunId
"""
from __future__ import annotations

import re
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from orchestrator.sweep.spec import SweepSpec
from trainers.errors import UserError
from trainers.tracking import find_parent_run, tracking_uri


class SweepNotRunError(UserError, RuntimeError):
    """A verb that reads a sweep's results found none; the message names the store and the command that runs it."""


def safe_uri(uri: str) -> str:
    """The tracking URI without a password."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def sweep_command(spec: SweepSpec, uri: str) -> str:
    """The command that runs the spec's sweep into this store: `python -m orchestrator sweep <spec>`, with
    --tracking-uri when the store is not the one a sweep uses by default."""
    command = f"python -m orchestrator sweep {spec.path}"
    return command if uri == tracking_uri(create=False) else f"{command} --tracking-uri {safe_uri(uri)}"


def not_run_error(spec: SweepSpec, uri: str) -> SweepNotRunError:
    """sweep 'x' has not been run in <store>; run `python -m orchestrator sweep <spec>` first."""
    where = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else safe_uri(uri)
    return SweepNotRunError(f"sweep '{spec.name}' has not been run in {where}; run `{sweep_command(spec, uri)}` "
                            "first")


def sweep_store(spec: SweepSpec, uri: str | None) -> MlflowClient:
    """A client on the store that holds the sweep's runs (tracking_uri rules), for the verbs that read them
    first (report, promote, production): a local sqlite store that does not exist is not created."""
    resolved = tracking_uri(uri, create=False)
    if resolved.startswith("sqlite:///") and not Path(resolved.removeprefix("sqlite:///")).is_file():
        raise not_run_error(spec, resolved)
    return MlflowClient(resolved)


def child_runs(client: MlflowClient, sweep: str, parent_run_id: str | None = None,
               status: str | None = None) -> list[Run]:
    """The sweep's trial runs (optionally only those with tag status=<status>), oldest first."""
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        return []
    parent = parent_run_id or getattr(getattr(find_parent_run(client, sweep), "info", None), "run_id", None)
    if parent is None:
        return []
    query = f"tags.role = 'trial' and tags.mlflow.parentRunId = '{parent}'"
    if status:
        query += f" and tags.status = '{status}'"
    return search_all(client, [experiment.experiment_id], query, order_by=["attributes.start_time ASC"])


def search_all(client: MlflowClient, experiment_ids: list[str], query: str, order_by: list[str]) -> list[Run]:
    """Every active run the query matches, page after page (the store hands out at most 1,000 at a time)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=query, run_view_type=ViewType.ACTIVE_ONLY,
                                  order_by=order_by, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def groups_of(run: Run) -> list[str]:
    """The experiment groups a child run belongs to."""
    return [g for g in run.data.tags.get("groups", "").split(",") if g]
