"""Production evaluation: the champion on the production data, as the study's section 5 (Tables 12-13).

The champion is loaded through the registry (models:/<name>/<version>, the version the alias
points at when we start), the production images go through the same preparation and cache as
training, and one run in experiment <sweep>-production records:

  production_accuracy, production_macro_f1, production_{precision,recall,f1}_<class>
  production_align_failure_rate        images the aligner fell back on / usable images
  slice_<attr>_<value>_{count,accuracy,macro_f1}   per metadata attribute (group, occluded, ...)
  drift_auc                            domain classifier: training split vs production (0.5: no drift)
  drift_auc_control                    the same classifier: training split vs the held-out splits of
                                       the same data (what "no drift" scores with this model and data)
  drift_auc_logits, drift_auc_pixels   the two halves of the features on their own
  tag drift_verdict                    none (< 0.6), moderate (< 0.75) or strong

Drift features: the logged pt2 model exposes only its forward pass, so the "embedding" is the
logits (6 numbers) plus each image's mean colour on a 4 x 4 grid (48 numbers): the logits see
what the model reacts to, the grid sees shifts the model ignores (hair, hands, captions).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from orchestrator.results.registry import RegistryError, champion_version
from orchestrator.sweep.spec import SweepSpec
from trainers import metrics as cls_metrics
from trainers.config import ConfigError, DataConfig, from_dict, to_dict, validate_data
from trainers.data.dataset import DataError, PreparedData, metric_key, prepare_data
from trainers.data.split import TEST, TRAIN, VAL
from trainers.plots import confusion_png
from trainers.tracking import ensure_experiment, global_tracking_uri, no_download_bars

BATCH_SIZE = 256
DRIFT_SAMPLE = 2000           # images per side of the domain classifier: 4000 x 54 features fit in a second
DRIFT_GRID = 4                # mean colour on a 4 x 4 grid: 48 features
DRIFT_FOLDS = 5
MAX_SLICE_VALUES = 20         # an attribute with more values (e.g. an id) is not sliced
VERDICTS = ((0.6, "none"), (0.75, "moderate"))   # below each bound; "strong" above the last


class ProductionError(RegistryError):
    """The production evaluation cannot run as configured; the message says what to do."""


@dataclass
class ProductionResult:
    run_id: str                   # the production run in <sweep>-production
    model_name: str
    version: int
    source_run_id: str
    classes: tuple[str, ...]
    metrics: dict[str, float]
    degradation: list[dict]       # per class, then "overall": test vs production, Tables 12-13
    slices: list[dict]            # attribute, value, count, accuracy, macro_f1
    drift_verdict: str


def evaluate_production(spec: SweepSpec, client: MlflowClient) -> ProductionResult:
    """Evaluate the champion on spec.production and log one run in <sweep>-production."""
    data_cfg = production_config(spec)
    champion = require_champion(client, spec)
    source = client.get_run(champion.tags.get("source_run_id") or champion.run_id)
    image_size = int(source.data.params["model.image_size"])
    classes = tuple(source.data.params["data.classes"].split(","))
    data_cfg = with_model_classes(spec, data_cfg, classes)
    data = prepare_data(data_cfg, image_size)
    model, device = load_version(client, spec.promote.name, champion.version)
    logits = predict(model, data.images, np.arange(len(data.labels)), device)
    cm = cls_metrics.confusion_matrix(data.labels, logits.argmax(1), len(classes))
    slices = slice_rows(data, logits.argmax(1))
    drift, verdict = drift_scores(client, source, model, device, data, logits)
    values = {**production_metrics(cm, classes), **align_failure(data), **slice_metrics(slices), **drift}
    result = ProductionResult(run_id="", model_name=spec.promote.name, version=int(champion.version),
                              source_run_id=source.info.run_id, classes=classes, metrics=values,
                              degradation=degradation_rows(source.data.metrics, cm, classes), slices=slices,
                              drift_verdict=verdict)
    result.run_id = log_production_run(client, spec, data, data_cfg, cm, result)
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
                              f"champion's classes ({', '.join(classes)}); list the model's classes in its "
                              "order, or remove production.classes")
    return cfg


def require_champion(client: MlflowClient, spec: SweepSpec) -> ModelVersion:
    """The version the champion alias points at; an error naming `make promote` when there is none."""
    found = champion_version(client, spec.promote)
    if found is None:
        raise ProductionError(f"no {spec.promote.alias} for registered model '{spec.promote.name}' "
                              f"in {client.tracking_uri}; run `make promote` first")
    return found


def load_version(client: MlflowClient, name: str, version) -> tuple[object, "torch.device"]:
    """The registered model version (through the registry, never a local path) on CUDA if present."""
    import mlflow.pytorch
    import torch

    with global_tracking_uri(client.tracking_uri):
        model = mlflow.pytorch.load_model(f"models:/{name}/{version}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return move_exported(model, device), device


def move_exported(module, device):
    """module.to(device) for a torch.export graph, whose ops carry the export device (cpu) burnt in.

    A ViT's graph creates position indices with aten.arange(..., device=cpu); moved with .to()
    alone it fails on any other device. This rewrites those arguments, as
    torch.export.passes.move_to_device_pass does for an ExportedProgram.
    """
    import torch

    module = module.to(device)
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            if "device" in node.kwargs:
                node.kwargs = {**node.kwargs, "device": device}
            if node.op == "call_function" and node.target is torch.ops.aten.to.device:
                node.args = (node.args[0], device, *node.args[2:])
        sub.recompile()
    return module


def predict(model, images: np.ndarray, rows: np.ndarray, device) -> np.ndarray:
    """Logits (float32, len(rows) x classes) for the given rows, in batches of uint8 from the cache."""
    import torch

    from trainers.train import batches, to_float_images

    out = np.zeros((len(rows), 0), np.float32)
    parts = []
    with torch.no_grad():
        for _, x_u8 in batches(images, rows, BATCH_SIZE, device):
            parts.append(model(to_float_images(x_u8).contiguous()).float().cpu().numpy())
    return np.concatenate(parts) if parts else out


# --- metrics ----------------------------------------------------------------------------

def production_metrics(cm: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """production_accuracy, production_macro_f1 and per-class precision, recall, F1."""
    summary, per_class = cls_metrics.summary(cm), cls_metrics.per_class(cm)
    out = {"production_accuracy": summary["accuracy"], "production_macro_f1": summary["macro_f1"]}
    for key in ("precision", "recall", "f1"):
        for name, value in zip(classes, per_class[key]):
            out[metric_key(f"production_{key}_{name}")] = float(value)
    return out


def align_failure(data: PreparedData) -> dict[str, float]:
    """Share of usable images the aligner could not align (0 when the data reports no alignment)."""
    failures = data.report.metrics().get("data_align_failures", 0.0)
    return {"production_align_failure_rate": failures / max(data.report.usable, 1)}


def slice_rows(data: PreparedData, predicted: np.ndarray) -> list[dict]:
    """Accuracy and macro F1 per value of each metadata attribute (e.g. group a/b, occluded 0/1)."""
    rows = []
    n_classes = len(data.classes)
    for attr in sorted({k for a in data.attrs for k in a}):
        column = np.array([a.get(attr) or "" for a in data.attrs])
        values = sorted(set(column) - {""})
        if len(values) > MAX_SLICE_VALUES:
            continue
        for value in values:
            mask = column == value
            summary = cls_metrics.summary(cls_metrics.confusion_matrix(data.labels[mask], predicted[mask], n_classes))
            rows.append({"attribute": attr, "value": value, "count": int(mask.sum()), **summary})
    return rows


def slice_metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for row in rows:
        prefix = metric_key(f"slice_{row['attribute']}_{row['value']}")
        out.update({f"{prefix}_count": row["count"], f"{prefix}_accuracy": row["accuracy"],
                    f"{prefix}_macro_f1": row["macro_f1"]})
    return out


def degradation_rows(test: dict[str, float], cm: np.ndarray, classes: tuple[str, ...]) -> list[dict]:
    """Test (from the source run) vs production per class, then overall: the study's Tables 13 and 12.

    Per class, "accuracy" is recall, as in the study's per-class tables; overall it is accuracy,
    and F1 is macro F1. Changes are production minus test.
    """
    summary, per_class = cls_metrics.summary(cm), cls_metrics.per_class(cm)
    rows = [{"class": name, "test_accuracy": test.get(f"test_recall_{name}"),
             "production_accuracy": float(per_class["recall"][i]), "test_f1": test.get(f"test_f1_{name}"),
             "production_f1": float(per_class["f1"][i])} for i, name in enumerate(classes)]
    rows.append({"class": "overall", "test_accuracy": test.get("test_accuracy"),
                 "production_accuracy": summary["accuracy"], "test_f1": test.get("test_macro_f1"),
                 "production_f1": summary["macro_f1"]})
    for row in rows:
        for key in ("accuracy", "f1"):
            before = row[f"test_{key}"]
            row[f"{key}_change"] = None if before is None else row[f"production_{key}"] - before
    return rows


# --- drift ------------------------------------------------------------------------------

def drift_features(images: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Logits plus mean colour on a DRIFT_GRID x DRIFT_GRID grid, in [0, 1]."""
    n, side = len(images), images.shape[1] // DRIFT_GRID * DRIFT_GRID
    cells = np.asarray(images[:, :side, :side], np.float32).reshape(
        n, DRIFT_GRID, side // DRIFT_GRID, DRIFT_GRID, side // DRIFT_GRID, 3).mean(axis=(2, 4)) / 255
    return np.concatenate([logits, cells.reshape(n, -1)], axis=1)


def drift_auc(reference: np.ndarray, candidate: np.ndarray, reference_groups=None, candidate_groups=None,
              seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling candidate rows from reference rows.

    0.5: indistinguishable; 1.0: fully separable. Folds keep each group (subject) on one side,
    so the classifier cannot score by recognising people it saw in training folds; with no
    signal a cross-validated AUC lands a little below 0.5, not exactly on it.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([reference, candidate])
    y = np.r_[np.zeros(len(reference)), np.ones(len(candidate))]
    groups = np.array(_groups("reference", reference_groups, len(reference))
                      + _groups("candidate", candidate_groups, len(candidate)))
    folds = min(DRIFT_FOLDS, len(set(groups[y == 0])), len(set(groups[y == 1])))
    if folds < 2:
        return float("nan")
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(classifier, x, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def _groups(side: str, groups, n: int) -> list[str]:
    if groups is None:
        return [f"{side}#{i}" for i in range(n)]
    return [f"{side}:{g}" if g else f"{side}#{i}" for i, g in enumerate(groups)]


def drift_verdict(auc: float) -> str:
    """Plain words for a drift AUC."""
    if not np.isfinite(auc):
        return "unknown"
    return next((word for bound, word in VERDICTS if auc < bound), "strong")


def source_training_data(client: MlflowClient, source: Run, image_size: int) -> PreparedData:
    """The champion's own data, prepared as its trial did (from the run's config.yaml artifact)."""
    with tempfile.TemporaryDirectory() as tmp, no_download_bars():
        path = client.download_artifacts(source.info.run_id, "config.yaml", tmp)
        raw = yaml.safe_load(Path(path).read_text())
    return prepare_data(from_dict({"data": raw["data"]}).data, image_size)


def drift_scores(client: MlflowClient, source: Run, model, device, data: PreparedData,
                 logits: np.ndarray) -> tuple[dict[str, float], str]:
    """drift_auc and its control and halves, plus the verdict; 'unknown: why' when training data is gone."""
    image_size = data.images.shape[1]
    try:
        train = source_training_data(client, source, image_size)
    except (MlflowException, OSError, KeyError, ConfigError, DataError) as err:
        return {}, f"unknown: the champion's training data is not available ({str(err).splitlines()[0]})"
    rng = np.random.default_rng(0)
    ref = _sample(train.indices(TRAIN), rng)
    held = _sample(np.r_[train.indices(VAL), train.indices(TEST)], rng)
    prod = _sample(np.arange(len(data.labels)), rng)
    ref_logits, held_logits = (predict(model, train.images, rows, device) for rows in (ref, held))
    ref_x = drift_features(np.asarray(train.images[ref]), ref_logits)
    held_x = drift_features(np.asarray(train.images[held]), held_logits)
    prod_x = drift_features(np.asarray(data.images[prod]), logits[prod])
    ref_g, held_g = [train.subjects[i] for i in ref], [train.subjects[i] for i in held]
    prod_g = [data.subjects[i] for i in prod]
    k = logits.shape[1]
    out = {"drift_auc": drift_auc(ref_x, prod_x, ref_g, prod_g),
           "drift_auc_control": drift_auc(ref_x, held_x, ref_g, held_g),
           "drift_auc_logits": drift_auc(ref_x[:, :k], prod_x[:, :k], ref_g, prod_g),
           "drift_auc_pixels": drift_auc(ref_x[:, k:], prod_x[:, k:], ref_g, prod_g)}
    return out, drift_verdict(out["drift_auc"])


def _sample(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """At most DRIFT_SAMPLE rows, sorted (sequential reads from the memory-mapped cache)."""
    return np.sort(rng.choice(rows, DRIFT_SAMPLE, replace=False)) if len(rows) > DRIFT_SAMPLE else rows


# --- tables and logging -----------------------------------------------------------------

DEGRADATION_COLUMNS = ("class", "test_accuracy", "production_accuracy", "accuracy_change",
                       "test_f1", "production_f1", "f1_change")
SLICE_COLUMNS = ("attribute", "value", "count", "accuracy", "macro_f1")


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else f"{row[c]:.4f}" if isinstance(row[c], float) else row[c]
                         for c in columns])
    return buf.getvalue()


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def degradation_cells(row: dict) -> list[str]:
    """One row as the study prints it: percentages, changes in points."""
    return [row["class"], _pct(row["test_accuracy"]), _pct(row["production_accuracy"]),
            _pct(row["accuracy_change"], True), _pct(row["test_f1"]), _pct(row["production_f1"]),
            _pct(row["f1_change"], True)]


DEGRADATION_HEADERS = ("class", "test accuracy (%)", "production accuracy (%)", "change (pts)",
                       "test F1 (%)", "production F1 (%)", "change (pts)")


def degradation_markdown(title: str, rows: list[dict]) -> str:
    """Tables 12-13 of the study in one: per-class accuracy (recall) and F1, then overall."""
    lines = [f"# {title}", "",
             "Per class, accuracy is recall (the study's per-class accuracy); the overall row is "
             "accuracy and macro F1. Changes are production minus test, in percentage points.", "",
             "| " + " | ".join(DEGRADATION_HEADERS) + " |", "|" + "---|" * len(DEGRADATION_HEADERS)]
    lines += ["| " + " | ".join(degradation_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def degradation_table(result: ProductionResult):
    """The degradation table for the terminal (rich)."""
    from rich.table import Table

    table = Table(title=f"{result.model_name} v{result.version}: test vs production (Tables 12-13)")
    for i, header in enumerate(DEGRADATION_HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in result.degradation:
        table.add_row(*degradation_cells(row), style="bold" if row["class"] == "overall" else None)
    return table


def slice_table(result: ProductionResult):
    """Production metrics per attribute value, for the terminal (rich)."""
    from rich.table import Table

    table = Table(title="production slices")
    for column in ("attribute", "value", "images", "accuracy (%)", "macro F1 (%)"):
        table.add_column(column, justify="right" if column not in ("attribute", "value") else "left")
    for row in result.slices:
        table.add_row(row["attribute"], row["value"], str(row["count"]), _pct(row["accuracy"]),
                      _pct(row["macro_f1"]))
    return table


def drift_line(result: ProductionResult) -> str:
    """One line: the drift score, its control and the verdict."""
    m = result.metrics
    if "drift_auc" not in m:
        return f"drift: {result.drift_verdict}"
    return (f"drift: AUC {m['drift_auc']:.3f} ({result.drift_verdict}; held-out training data scores "
            f"{m['drift_auc_control']:.3f}; logits alone {m['drift_auc_logits']:.3f}, "
            f"pixels alone {m['drift_auc_pixels']:.3f})")


def _flat(prefix: str, value) -> dict[str, str]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}.{key}", item))
        return out
    return {prefix: ",".join(map(str, value)) if isinstance(value, list) else str(value)}


def log_production_run(client: MlflowClient, spec: SweepSpec, data: PreparedData, data_cfg: DataConfig,
                       cm: np.ndarray, result: ProductionResult) -> str:
    """One run in <sweep>-production: params, metrics, tags and the tables as artifacts."""
    experiment_id = ensure_experiment(client, f"{spec.name}-production")
    tags = {"role": "production", "sweep": spec.name, "model_name": result.model_name,
            "model_version": str(result.version), "model_alias": spec.promote.alias,
            "source_run_id": result.source_run_id, "drift_verdict": result.drift_verdict,
            "data_digest": data.digest}
    title = f"{result.model_name} v{result.version} on production data"
    run_name = f"{result.model_name}-v{result.version}"
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    try:
        params = _flat("production", to_dict(data_cfg))
        params["model.image_size"] = str(data.images.shape[1])
        now = int(1000 * time.time())
        values = {**result.metrics, **data.report.metrics()}
        metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if np.isfinite(v)]
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        for i in range(0, len(metrics), 1000):   # the store takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.log_text(run_id, json.dumps({"classes": list(data.classes), "counts": cm.tolist()}),
                        "confusion_matrix.json")
        client.log_text(run_id, _csv(result.degradation, DEGRADATION_COLUMNS), "degradation.csv")
        client.log_text(run_id, degradation_markdown(title, result.degradation), "degradation.md")
        client.log_text(run_id, _csv(result.slices, SLICE_COLUMNS), "slices.csv")
        with tempfile.TemporaryDirectory() as tmp:
            png = confusion_png(cm, data.classes, Path(tmp) / "confusion_matrix.png", title)
            client.log_artifact(run_id, str(png))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
