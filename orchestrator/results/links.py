"""Deep links into MLflow's UI, printed by the verbs that write runs: the sweep's runs in the model-training
view with the saved comparison view, a Compare page of its trials, a registered version, a run."""
from __future__ import annotations

import json
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.entities import ViewType

from orchestrator.results.report.store import safe_uri
from trainers.tracking import COMPARE_VIEW, find_parent_run
from trainers.tracking import tracking_uri as tracking_uri_of

LOCAL_UI = "http://127.0.0.1:5000"      # `make ui` over the local store
ML_VIEW = "workflowType=machine_learning"


def ui_base(tracking_uri: str) -> str:
    """The UI over this store: a tracking server is its own UI; another store's is served on LOCAL_UI
    (ui_command says how)."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def ui_command(tracking_uri: str) -> str | None:
    """How to serve the UI the links point at: `make ui` for the default store under mlruns/, mlflow ui
    over any other store (its password left out), None for a tracking server (already serving)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    if tracking_uri == tracking_uri_of(None, create=False):
        return "`make ui`"
    return f"`mlflow ui --backend-store-uri {safe_uri(tracking_uri)} --port 5000`"


def run_link(client: MlflowClient, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(client.tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


def version_link(client: MlflowClient, name: str, version: str) -> str:
    return f"{ui_base(client.tracking_uri)}/#/models/{quote(name, safe='')}/versions/{version}"


def sweep_links(client: MlflowClient, sweep: str) -> list[str]:
    """'runs: <url>' (the trials under their parent, the comparison view's columns) and 'compare: <url>'
    (MLflow's Compare page of every trial); none when the sweep has no parent run in this store."""
    parent = find_parent_run(client, sweep)
    if parent is None:
        return []
    experiment_id = parent.info.experiment_id
    base = ui_base(client.tracking_uri)
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=500)
    ids = json.dumps([r.info.run_id for r in children], separators=(",", ":"))
    return [f"runs: {base}/#/experiments/{experiment_id}/runs?{ML_VIEW}&viewStateShareKey={COMPARE_VIEW}",
            f"compare: {base}/#/compare-runs?runs={quote(ids)}&experiments={quote(json.dumps([experiment_id]))}"
            f"&{ML_VIEW}"]
