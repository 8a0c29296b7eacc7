"""Reading a sweep's MLflow runs: one experiment per sweep, one parent run, one child run per trial
(trainers.tracking opens and closes them).

Conventions every verb relies on:
  experiment  = the sweep's name
  parent run  = run name <sweep>, tags role=sweep, sweep=<name>; spec.yaml and plan.csv as artifacts
  child runs  = run name <trial name>, tags role=trial, sweep=<name>, groups=<g1,g2>, config_hash,
                optuna_trial, status (finished | diverged | failed | pruned), mlflow.parentRunId
"""
from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from trainers.tracking import find_parent_run


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
