"""The report's mitigation section (the study's Task 4): every grid point of an experiment evaluated on the
production data, against its unmitigated reference, read from a real sqlite MLflow store in tmp_path."""
from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats

from orchestrator.results.report import write_report
from orchestrator.results.report.cells import Cell, Trial
from orchestrator.results.report.comparisons import over_images
from orchestrator.results.report.mitigation import (Mitigation, MitigationRow, ProductionEvaluation,
                                                    latest_evaluations, lost_most, mitigation_table, slice_codes,
                                                    slice_gap)
from orchestrator.results.report.mitigation_section import findings
from orchestrator.results.report.tables import Delta, Stat
from orchestrator.sweep.runner import child_run_tags
from orchestrator.sweep.spec import spec_from_dict
from trainers import metrics
from trainers.config import flat_params
from trainers.predictions import ARTIFACT, PRODUCTION_ARTIFACT, Predictions, read_predictions
from trainers.stats import grouped_confusions
from trainers.tracking import ensure_experiment, open_parent_run

N_TEST, N_PRODUCTION = 300, 480
DIGEST, OLD_DIGEST = "prod-new", "prod-old"


def raw_spec(tiny_vit: dict, epochs: list[int]) -> dict:
    return {"name": "m", "data": {"source": "synthetic", "synthetic": {"n_images": 120, "draw_size": 32}},
            "models": {"vit": tiny_vit},
            "defaults": {"model": "vit", "optim": {"name": "adam", "lr": 1.0e-3}, "train": {"epochs": 1}},
            "experiments": {"mitigation": {"grid": {"train.epochs": epochs}, "compare_to": {"epochs": 1}}},
            "seeds": [0]}


def predictions(keys: list[str], labels: np.ndarray, right: np.ndarray, classes: tuple[str, ...],
                rng: np.random.Generator, attrs: dict | None = None) -> Predictions:
    """Each image predicted right with its probability in ``right``, else as another class at random."""
    k = len(classes)
    hit = rng.random(len(labels)) < right
    predicted = np.where(hit, labels, (labels + rng.integers(1, k, len(labels))) % k)
    return Predictions(np.array(keys, dtype=object), labels, predicted, np.eye(k, dtype=np.float32)[predicted],
                       classes, attrs or {})


def log_file(client: MlflowClient, run_id: str, folder: Path, name: str, found: Predictions) -> None:
    path = folder / run_id / name
    path.parent.mkdir(parents=True)
    path.write_bytes(found.to_bytes())
    client.log_artifact(run_id, str(path))


def log_trial(client: MlflowClient, spec, parent: str, index: int, test: Predictions, folder: Path) -> str:
    """A finished child run of the planned trial, as a trainer logs it: tags, params, test metrics, predictions."""
    planned = spec.plan[index]
    tags = {**child_run_tags(spec.name, ",".join(planned.groups), index), "mlflow.parentRunId": parent,
            "status": "finished", "config_hash": planned.hash, "data_digest": "train-digest"}
    run_id = client.create_run(ensure_experiment(client, spec.name), run_name=planned.name, tags=tags).info.run_id
    for key, value in flat_params(planned.config).items():
        client.log_param(run_id, key, value)
    cm = metrics.confusion_matrix(test.labels, test.predicted, len(test.classes))
    for key, value in {**metrics.flat("test", cm, test.classes), "data/n_test": len(test.keys)}.items():
        client.log_metric(run_id, key, value)
    log_file(client, run_id, folder, ARTIFACT, test)
    client.set_terminated(run_id)
    return run_id


def log_evaluation(client: MlflowClient, spec, source: str, found: Predictions, folder: Path, start: int,
                   digest: str = DIGEST, status: str = "FINISHED", evaluated_as: str = "run") -> str:
    """A production evaluation of a trial run, as the production verb logs it (the shared contract)."""
    trial = client.get_run(source)
    tags = {"role": "production", "sweep": spec.name, "source_run_id": source, "data_digest": digest,
            "config_hash": trial.data.tags["config_hash"], "groups": trial.data.tags["groups"],
            "drift_verdict": "moderate", "evaluated_as": evaluated_as}
    run_id = client.create_run(ensure_experiment(client, f"{spec.name}-production"), start_time=start,
                               tags=tags).info.run_id
    cm = metrics.confusion_matrix(found.labels, found.predicted, len(found.classes))
    for key, value in metrics.flat("production", cm, found.classes).items():
        client.log_metric(run_id, key, value)
    log_file(client, run_id, folder, PRODUCTION_ARTIFACT, found)
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_vit):
    """Epochs 1 is the unmitigated reference: its group b images are mostly wrong in production and disgust
    suffers most; epochs 2 is right as often on both groups; epochs 3 finished but was never evaluated."""
    tmp = tmp_path_factory.mktemp("mitigation")
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    spec = dataclasses.replace(spec_from_dict(raw_spec(tiny_vit, [1, 2, 3])), production_evaluate=("mitigation",))
    classes = tuple(spec.plan[0].config.data.classes)
    rng = np.random.default_rng(0)
    parent = open_parent_run(client, spec.name)
    test_keys, test_labels = [f"test/{i}.png" for i in range(N_TEST)], rng.permutation(np.arange(N_TEST) % 6)
    labels = rng.permutation(np.arange(N_PRODUCTION) % 6)
    group = np.where(np.arange(N_PRODUCTION) % 2 == 0, "a", "b").astype(object)
    occluded = np.where(rng.random(N_PRODUCTION) < 0.5, "yes", "no").astype(object)
    attrs = {"group": group, "occluded": occluded}
    keys = [f"prod/{i}.png" for i in range(N_PRODUCTION)]
    disgust = labels == classes.index("disgust")

    def production(a: float, b: float, on_disgust: float) -> Predictions:
        right = np.where(disgust, on_disgust, np.where(group == "a", a, b))
        return predictions(keys, labels, right, classes, rng, attrs)

    runs = [log_trial(client, spec, parent, i, predictions(test_keys, test_labels, np.full(N_TEST, p), classes, rng),
                      tmp) for i, p in enumerate((0.9, 0.88, 0.85))]
    evaluations = {
        "reference": log_evaluation(client, spec, runs[0], production(0.9, 0.4, 0.3), tmp, 2_000,
                                    evaluated_as="champion"),
        "mitigated": log_evaluation(client, spec, runs[1], production(0.88, 0.85, 0.6), tmp, 3_000),
        # On older production data, and a failed retry: neither is the one the table reads.
        "old": log_evaluation(client, spec, runs[1], production(1.0, 1.0, 1.0), tmp, 1_000, digest=OLD_DIGEST),
        "failed": log_evaluation(client, spec, runs[0], production(1.0, 1.0, 1.0), tmp, 4_000, status="FAILED")}
    path = write_report(spec, client, tmp / "report")
    return client, spec, runs, evaluations, path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def logged_predictions(client: MlflowClient, run_id: str, artifact: str, folder: Path) -> Predictions:
    return read_predictions(client.download_artifacts(run_id, artifact, str(folder)))


def recomputed(found: Predictions, classes: tuple[str, ...]) -> dict[str, float]:
    """What the table should say of one production evaluation, from its logged predictions, in percent."""
    k = len(classes)
    out = {"production_macro_f1": 100 * metrics.macro_f1(metrics.confusion_matrix(found.labels, found.predicted, k))}
    for attribute in ("group", "occluded"):
        f1s = [metrics.macro_f1(metrics.confusion_matrix(found.labels[mask], found.predicted[mask], k))
               for value in sorted(set(found.attrs[attribute])) if (mask := found.attrs[attribute] == value).any()]
        out[f"gap_{attribute}"] = 100 * (max(f1s) - min(f1s))
    cm = metrics.confusion_matrix(found.labels, found.predicted, k)
    out["production_f1_disgust"] = 100 * metrics.per_class(cm)["f1"][classes.index("disgust")]
    return out


def test_mitigation_table_holds_what_the_production_runs_logged(sweep, tmp_path):
    client, spec, runs, evaluations, path = sweep
    classes = tuple(spec.plan[0].config.data.classes)
    rows = read_csv(path.parent / "mitigation_production.csv")
    assert [r["train.epochs"] for r in rows] == ["1", "2", "3"]
    for row, name in zip(rows, ("reference", "mitigated")):
        (run_id,), (production_id,) = row["runs"].split(";"), row["production_runs"].split(";")
        assert production_id == evaluations[name]
        found = recomputed(logged_predictions(client, production_id, PRODUCTION_ARTIFACT, tmp_path / name), classes)
        test_f1 = 100 * client.get_run(run_id).data.metrics["test_macro_f1"]
        assert float(row["test_macro_f1"]) == pytest.approx(test_f1)
        for column, value in found.items():
            assert float(row[column]) == pytest.approx(value), column
        assert float(row["production_drop"]) == pytest.approx(test_f1 - found["production_macro_f1"])
        assert row["production_digest"] == DIGEST
    # The class the reference lost most, from its logged test and production F1 per class.
    test, production = (client.get_run(i).data.metrics for i in (runs[0], evaluations["reference"]))
    loss = {c: test[f"test_f1_{c}"] - production[f"production_f1_{c}"] for c in classes}
    assert max(loss, key=loss.get) == "disgust" == rows[0]["lost_class"]
    text = path.read_text()
    assert "| test F1 | production F1 | drop | gap group | gap occluded | production F1 disgust |" in text
    assert f"{float(rows[1]['gap_group']):.1f} (Δ " in text


def test_changes_against_the_unmitigated_reference_are_paired_with_intervals(sweep, tmp_path):
    client, _, runs, _, path = sweep
    reference, mitigated, unevaluated = read_csv(path.parent / "mitigation_production.csv")
    assert reference["delta_kind"] == "reference" and reference["delta_gap_group"] == ""
    for column in ("test_macro_f1", "production_macro_f1", "production_drop", "gap_group", "gap_occluded",
                   "production_f1_disgust"):
        low, delta, high = (float(mitigated[f"delta_{column}{s}"]) for s in ("_low", "", "_high"))
        assert low <= delta <= high
        # One run each on the same images: the change is the difference of the two rows' values.
        assert delta == pytest.approx(float(mitigated[column]) - float(reference[column]))
        assert mitigated[f"distinguishable_{column}"] == str(low > 0 or high < 0).lower()
    assert float(mitigated["delta_gap_group_high"]) < 0 and mitigated["distinguishable_gap_group"] == "true"
    assert float(mitigated["delta_production_f1_disgust_low"]) > 0       # disgust recovered
    # Test F1's change is the report's usual paired bootstrap over the same test images.
    reference_test, mitigated_test = (logged_predictions(client, r, ARTIFACT, tmp_path / r) for r in runs[:2])
    usual = over_images(mitigated_test, reference_test)["macro_f1"]
    assert (float(mitigated["delta_test_macro_f1_low"]), float(mitigated["delta_test_macro_f1_high"])) == \
        (pytest.approx(100 * usual.low), pytest.approx(100 * usual.high))
    assert unevaluated["status"] == "not evaluated" and unevaluated["delta_gap_group"] == ""


def test_the_sentence_names_the_narrowed_gap_and_the_rows_left_to_evaluate(sweep):
    _, _, _, _, path = sweep
    text = path.read_text()
    _, mitigated, _ = read_csv(path.parent / "mitigation_production.csv")
    narrowed = -float(mitigated["delta_gap_group"])
    assert f"- epochs 2: narrowed the group gap by {narrowed:.1f} points" in text
    assert "did not measurably narrow the occluded gap" in text
    command = "`python -m orchestrator production spec --runs mitigation`"
    assert f"Not evaluated in production: epochs 3; run {command}." in text
    assert f"older production data (digest `{OLD_DIGEST}`): left out; the table uses the newest (digest `{DIGEST}`)" \
        in text
    assert text.index("## Production (Tables 12, 13)") < text.index("## Mitigation (the study's Task 4)")


def test_the_champion_section_reads_the_champions_evaluation_not_a_newer_run_of_the_group(sweep):
    _, _, _, evaluations, path = sweep
    text = path.read_text()
    production = text[text.index("## Production (Tables 12, 13)"):text.index("## Mitigation")]
    assert f"production run `{evaluations['reference']}`" in production


def test_no_section_without_an_experiment_evaluated_in_production(sweep, tiny_vit, tmp_path):
    client, spec, _, _, _ = sweep
    # Not named in production.evaluate, and epochs 3 has no production run: no section.
    path = write_report(dataclasses.replace(spec, production_evaluate=("champion",)), client, tmp_path / "none")
    assert "the study's Task 4" not in path.read_text() and not (path.parent / "mitigation_production.csv").exists()
    # The grid without epochs 3: every point is evaluated, but an epochs ablation is no mitigation (as after
    # `production --runs all`): still no section unless production.evaluate names it.
    path = write_report(spec_from_dict(raw_spec(tiny_vit, [1, 2])), client, tmp_path / "all")
    assert "the study's Task 4" not in path.read_text()


# --- the pure parts -----------------------------------------------------------------------------------

def test_slice_gap_is_best_minus_worst_judged_slice_and_small_slices_are_not_judged():
    classes = ("anger", "happiness")
    labels = np.array([0, 1] * 50)
    predicted = labels.copy()
    predicted[50:75] = 1 - predicted[50:75]        # half of slice "b" wrong
    attrs = {"group": np.array(["a"] * 50 + ["b"] * 50, dtype=object)}
    attrs["group"][-10:] = "c"                      # 10 images: under MIN_SLICE_COUNT, no slice
    found = Predictions(np.arange(100).astype(str), labels, predicted, np.eye(2)[predicted], classes, attrs)
    codes, n_slices = slice_codes(found, "group")
    assert n_slices == 2 and set(codes[-10:]) == {2}
    cms = grouped_confusions(np.arange(100)[None], codes, labels, predicted, (n_slices, 2))
    for g, value in enumerate(("a", "b")):
        mask = attrs["group"] == value
        assert (cms[0, g] == metrics.confusion_matrix(labels[mask], predicted[mask], 2)).all()
    assert slice_gap(cms)[0] == pytest.approx(1.0 - metrics.macro_f1(cms[0, 1]))
    assert math.isnan(slice_gap(cms[:, :1])[0])     # one slice: no gap
    assert slice_codes(found, "occluded")[1] == 0


def test_lost_most_is_the_class_with_the_largest_mean_drop_over_runs():
    test = np.array([[0.9, 0.9, np.nan], [0.8, 0.9, np.nan]])
    production = np.array([[0.7, 0.5, np.nan], [0.7, 0.8, np.nan]])
    assert lost_most(test, production) == (1, pytest.approx(0.25))
    assert lost_most(np.full((1, 2), np.nan), np.full((1, 2), np.nan)) is None


def test_several_seeds_are_paired_by_seed_with_a_t_interval_over_the_differences(tiny_vit):
    spec = spec_from_dict(raw_spec(tiny_vit, [1, 2]))
    exp = spec.experiments[0]
    test_f1 = {(1, 0): 0.90, (1, 1): 0.88, (1, 2): 0.91, (2, 0): 0.89, (2, 1): 0.90, (2, 2): 0.87}
    production_f1 = {(1, 0): 0.60, (1, 1): 0.55, (1, 2): 0.62, (2, 0): 0.80, (2, 1): 0.72, (2, 2): 0.78}
    cells, evaluations = [Cell((1,)), Cell((2,))], []
    for (epochs, seed), f1 in test_f1.items():
        run = Trial(f"r{epochs}{seed}", "r", "finished", ("mitigation",), "", {"train.seed": str(seed)},
                    {"test_macro_f1": f1})
        cells[epochs - 1].trials.append(run)
        evaluations.append(ProductionEvaluation(f"p{epochs}{seed}", run.run_id, "", DIGEST, seed,
                                                {"production_macro_f1": production_f1[epochs, seed]}))
    found = mitigation_table(exp, cells, evaluations, lambda _: None, lambda _: None)
    mitigated = found.rows[1]
    for measure, values in (("production_macro_f1", production_f1),
                            ("production_drop", {k: test_f1[k] - v for k, v in production_f1.items()})):
        per_seed = [values[2, s] - values[1, s] for s in range(3)]
        half = stats.t.ppf(0.975, 2) * statistics.stdev(per_seed) / math.sqrt(3)
        delta = mitigated.deltas[measure]
        assert (delta.kind, delta.n) == ("seeds", 3)
        assert delta.value == pytest.approx(statistics.fmean(per_seed))
        assert (delta.low, delta.high) == (pytest.approx(delta.value - half), pytest.approx(delta.value + half))
    assert mitigated.values["production_macro_f1"].mean == pytest.approx(statistics.fmean([0.80, 0.72, 0.78]))
    assert found.measures == ["test_macro_f1", "production_macro_f1", "production_drop"]   # no predictions, no gaps


def test_the_sentence_says_narrowed_only_when_the_interval_lies_below_zero(tiny_vit):
    exp = spec_from_dict(raw_spec(tiny_vit, [1, 2, 3])).experiments[0]
    run = Trial("r", "r", "finished", ("mitigation",), "", {}, {})
    evaluation = ProductionEvaluation("p", "r", "", DIGEST, 0, {})

    def row(epochs: int, gap: float, delta: Delta) -> MitigationRow:
        return MitigationRow(Cell((epochs,), trials=[run]), [evaluation], {"gap_group": Stat(gap, None, 1)},
                             {"gap_group": delta})

    reference = row(1, 0.30, Delta(kind="reference", why="reference"))
    unclear = row(3, 0.25, Delta(-0.05, -0.12, 0.02, "bootstrap", 400))
    for narrowing, lead in ((Delta(-0.20, -0.28, -0.11, "bootstrap", 400), "Against the reference (epochs 1)"),
                            (Delta(0.04, 0.01, 0.07, "bootstrap", 400), "No mitigation measurably narrowed a gap")):
        second = row(2, 0.30 + narrowing.value, narrowing)
        text = "\n".join(findings(Mitigation(exp, ["gap_group"], [reference, second, unclear], reference, None,
                                              None, [])))
        assert text.startswith(lead)
        assert "- epochs 3: did not measurably narrow the group gap (30.0 → 25.0; Δ -5.0 [-12.0, +2.0] ≈)." in text
        verb = "narrowed the group gap by 20.0 points" if narrowing.value < 0 else "widened the group gap by 4.0 points"
        assert f"- epochs 2: {verb}" in text


def test_each_run_is_read_on_the_newest_production_data_prepared_at_its_image_size():
    def run(name: str, size: str, config_hash: str = "h") -> Trial:
        return Trial(name, name, "finished", (), config_hash, {"model.image_size": size}, {})

    def evaluation(name: str, source: str, digest: str, start: int, config_hash: str = "h") -> ProductionEvaluation:
        return ProductionEvaluation(name, source, config_hash, digest, start, {})

    small, large, edited = run("small", "32"), run("large", "224"), run("edited", "32", "other")
    found, older = latest_evaluations([small, large, edited], [
        evaluation("small-old", "small", "d32-old", 1), evaluation("small-new", "small", "d32", 3),
        evaluation("small-retry", "small", "d32", 2), evaluation("large", "large", "d224", 2),
        evaluation("edited", "edited", "d32", 4)])    # logged under another config_hash: not this run's
    assert {k: v.run_id for k, v in found.items()} == {"small": "small-new", "large": "large"}
    assert older == ["d32-old"]


def test_the_champion_section_follows_the_alias_to_a_run_that_was_evaluated_as_a_groups_run(sweep, tmp_path):
    """Promoted after its evaluation (production skips a run it has evaluated), the champion's run keeps its
    evaluated_as=run tag; the report finds it by the registered version's source run, not by that tag."""
    client, spec, runs, evaluations, _ = sweep
    client.create_registered_model(spec.promote.name)
    try:
        version = client.create_model_version(spec.promote.name, f"runs:/{runs[1]}/model", run_id=runs[1],
                                              tags={"source_run_id": runs[1]})
        client.set_registered_model_alias(spec.promote.name, spec.promote.alias, version.version)
        text = write_report(spec, client, tmp_path / "promoted").read_text()
    finally:
        client.delete_registered_model(spec.promote.name)
    production = text[text.index("## Production (Tables 12, 13)"):text.index("## Mitigation")]
    assert f"Model version {version.version} (trial {spec.plan[1].name}), production run `{evaluations['mitigated']}`" \
        in production
    assert "No production run of the current champion yet" not in production


def test_a_grid_over_list_and_mapping_values_reports_each_point_under_its_value(tiny_vit, tmp_path):
    """balance_by takes lists and model.vit mappings: their points key the report's tables as any value does;
    a run joins its grid point by config hash, also when its groups tag predates the experiment."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    raw = raw_spec(tiny_vit, [1])
    raw["experiments"] = {
        "mitigation": {"grid": {"data.balance_by": [["class"], ["class", "group"]]},
                       "compare_to": {"data.balance_by": ["class"]}},
        "patches": {"grid": {"model.vit": [{"patch_size": 4}, {"patch_size": 8}]}}}
    spec = spec_from_dict(raw)      # production.evaluate names nothing: a grid over balance_by shows when evaluated
    classes = tuple(spec.plan[0].config.data.classes)
    rng = np.random.default_rng(0)
    parent = open_parent_run(client, spec.name)
    keys, labels = [f"test/{i}.png" for i in range(60)], np.arange(60) % 6
    prod_keys, prod_labels = [f"prod/{i}.png" for i in range(60)], np.arange(60) % 6
    for i in range(len(spec.plan)):
        run = log_trial(client, spec, parent, i, predictions(keys, labels, np.full(60, 0.8), classes, rng), tmp_path)
        if spec.plan[i].config.data.balance_by == ("class",):
            # Run before the mitigation group was added to the spec: its groups tag does not name it, its
            # config hash places it.
            client.set_tag(run, "groups", "baseline")
        if "mitigation" in spec.plan[i].groups:
            log_evaluation(client, spec, run, predictions(prod_keys, prod_labels, np.full(60, 0.6), classes, rng,
                                                          {"group": np.array(["a", "b"] * 30, dtype=object)}),
                           tmp_path, 1_000 + i)
    path = write_report(spec, client, tmp_path / "report")
    rows = read_csv(path.parent / "mitigation_production.csv")
    assert [r["status"] for r in rows] == ["evaluated", "evaluated"]
    text = path.read_text()
    assert "[class, group]" in text and "{patch_size: 8}" in text
    assert text.count("## Mitigation (the study's Task 4)") == 1         # the patches grid is no mitigation
