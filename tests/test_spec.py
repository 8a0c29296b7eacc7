"""Sweep specs: validation messages, expansion into unique trials, and the plan command."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainers.config import ConfigError, ModelConfig, OptimConfig, TrainConfig, name_parts, trial_name

from orchestrator.sweep.plan import datasets_to_prepare, estimate_cost, grid_points, resolve_trial
from orchestrator.sweep.spec import SpecError, parse_yaml, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sweeps" / "demo.yaml"
PAPER = REPO / "sweeps" / "paper.yaml"
SHARED = ("baseline", "epochs", "optimizer_lr", "mitigation")


def read(path: Path) -> dict:
    return parse_yaml(path.read_text())


def write(tmp_path: Path, raw: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def demo_core() -> dict:
    """demo.yaml without its mitigation group (and the production.evaluate that names it): the four
    experiments of the study's tables, for tests that add or replace experiments."""
    raw = read(DEMO)
    del raw["experiments"]["mitigation"]
    del raw["production"]["evaluate"]
    return raw


def paper_at(tmp_path: Path) -> dict:
    raw = read(PAPER)
    raw["data"]["root"] = str(tmp_path)
    return raw


def shared_trial(trials):
    return next(t for t in trials if t.name == "vit·ep3·adam·1e-3·s0")


# --- expansion ----------------------------------------------------------------------

def test_demo_expands_to_22_grid_points_and_18_unique_trials():
    spec = load_spec(DEMO)
    assert grid_points(spec) == 22
    assert len(spec.plan) == 18


def test_paper_expands_to_the_same_structure_less_the_mitigation_that_needs_group_metadata(tmp_path):
    spec = spec_from_dict(paper_at(tmp_path), "sweeps/paper.yaml")
    trials = spec.plan
    assert (grid_points(spec), len(trials)) == (18, 15)
    assert shared_trial(trials).config.model.pretrained == "google/vit-base-patch16-224-in21k"


def test_the_papers_mitigation_group_uncommented_adds_three_trials_and_shares_the_unmitigated_vit(tmp_path):
    """paper.yaml carries the group commented out (it needs a group column in metadata.csv): uncommented, with
    such a file, it plans like the demo's; without the column the spec is refused naming data.balance_by."""
    text = PAPER.read_text()
    start = text.index("  # mitigation:")
    block = "\n".join(line.replace("  # ", "  ", 1) for line in text[start:text.index("\nseeds:")].splitlines())
    raw = parse_yaml(text[:start] + block + text[text.index("\nseeds:"):])
    raw["data"]["root"] = str(tmp_path)
    (tmp_path / "metadata.csv").write_text("path,subject,group\n")
    trials = spec_from_dict(raw, "sweeps/paper.yaml").plan
    assert len(trials) == 18 and shared_trial(trials).groups == SHARED
    assert sum("mitigation" in t.groups for t in trials) == 4
    (tmp_path / "metadata.csv").write_text("path,subject\n")
    with pytest.raises(ConfigError, match="data.balance_by"):
        spec_from_dict(raw, "sweeps/paper.yaml")


def test_shared_trial_belongs_to_baseline_epochs_and_optimizer_lr():
    trials = load_spec(DEMO).plan
    assert shared_trial(trials).groups == SHARED
    adam_1e5 = next(t for t in trials if t.name == "adam·1e-5·ep3·vit·s0")
    assert adam_1e5.groups == ("optimizer_lr", "fine_lr")


def test_seeds_triple_the_trials(tmp_path):
    raw = read(DEMO)
    raw["seeds"] = [0, 1, 2]
    spec = load_spec(write(tmp_path, raw))
    trials = spec.plan
    assert grid_points(spec) == 66
    assert len(trials) == 54
    assert sorted({t.config.train.seed for t in trials}) == [0, 1, 2]
    assert all(t.groups == SHARED for t in trials if re.fullmatch(r"vit·ep3·adam·1e-3·s\d", t.name))


def test_expand_is_deterministic_and_hashes_are_stable_across_loads():
    first, second = load_spec(DEMO).plan, load_spec(DEMO).plan
    assert [(t.hash, t.name, t.groups) for t in first] == [(t.hash, t.name, t.groups) for t in second]
    assert all(re.fullmatch(r"[0-9a-f]{12}", t.hash) for t in first)


def test_trial_names_lead_with_what_their_experiment_varies_and_differ_where_mlflow_cuts_them():
    trials = load_spec(DEMO).plan
    names = [t.name for t in trials]
    # MLflow's runs table shows about 16 characters of a run name: the trials must differ within them.
    assert len({n[:16] for n in names}) == len(names)
    for t in trials:     # every part, once, the seed last
        assert sorted(t.name.split("·")) == sorted(name_parts(t.config).values()) and t.name.endswith("·s0")
    by_name = {t.name: t for t in trials}
    assert by_name["ep2·adam·1e-3·vit·s0"].groups == ("epochs",)
    assert by_name["sgd·1e-2·ep3·vit·s0"].groups == ("optimizer_lr",)
    assert by_name["adam·3e-5·ep3·vit·s0"].groups == ("fine_lr",)     # an lr reads with its optimizer
    assert by_name["resnet50·ep3·adam·1e-3·s0"].groups == ("baseline",)
    assert by_name["byclass+group·occ0.5·ep3·adam·1e-3·vit·s0"].groups == ("mitigation",)
    assert trial_name(trials[2].config) == "ep2·adam·1e-3·vit·s0"      # the standing order, alone


def test_other_grid_axes_name_their_trials_by_key_and_value(tmp_path):
    raw = demo_core()
    raw["experiments"] = {"splits": {"grid": {"data.split_seed": [0, 1], "train.batch_size": [16]}}}
    names = [t.name for t in load_spec(write(tmp_path, raw)).plan]
    assert names == ["split_seed0·batch_size16·ep3·adam·1e-3·vit·s0", "split_seed1·batch_size16·ep3·adam·1e-3·vit·s0"]


def test_names_that_collide_get_a_hash_suffix(tmp_path):
    raw = demo_core()      # two presets of one architecture: the name says vit for both
    raw["models"]["vit_wide"] = {**raw["models"]["vit"], "vit": {**raw["models"]["vit"]["vit"], "hidden_size": 128}}
    raw["experiments"] = {"widths": {"grid": {"model": ["vit", "vit_wide"]}}}
    names = [t.name for t in load_spec(write(tmp_path, raw)).plan]
    assert len(set(names)) == 2 and all(n.startswith("vit·ep3·adam·1e-3·s0·") for n in names)


def test_resolve_trial_expands_the_preset_and_applies_the_point_over_defaults():
    spec = load_spec(DEMO)
    cfg = resolve_trial(spec, {"train.seed": 1, "model": "resnet50", "optim.lr": 2e-5})
    assert cfg.model == ModelConfig(name="resnet50", pretrained=None, image_size=32)
    assert cfg.optim == OptimConfig(name="adam", lr=2e-5)
    assert cfg.train == TrainConfig(epochs=3, batch_size=32, seed=1)
    assert cfg.data.synthetic.n_images == 4800
    assert spec.defaults.optim.lr == 1e-3   # the spec is not modified


def test_aliases_and_set_reach_the_trial(tmp_path):
    raw = demo_core()
    raw["experiments"] = {"short": {"grid": {"optimizer": ["sgd"], "lr": [1e-2]}, "set": {"epochs": 2}}}
    spec = load_spec(write(tmp_path, raw))
    assert spec.experiments[0].grid == {"optim.name": ("sgd",), "optim.lr": (0.01,)}
    (trial,) = spec.plan
    assert trial.name == "sgd·1e-2·ep2·vit·s0"


def test_compare_to_names_each_experiments_reference_point_and_defaults_to_the_sweeps_defaults():
    raw = read(DEMO)
    assert {e.name: e.compare_to for e in spec_from_dict(raw).experiments} == {
        "baseline": {"model": "resnet50"}, "epochs": {"train.epochs": 3},
        "optimizer_lr": {"optim.name": "adam", "optim.lr": 1e-3}, "fine_lr": {"optim.lr": 1e-5},
        "mitigation": {"data.balance_by": ["class"], "augment.occlusion": 0}}
    raw["experiments"]["optimizer_lr"]["compare_to"] = {"lr": 1e-2, "optimizer": "sgd"}   # aliases, any order
    for name in ("baseline", "epochs", "fine_lr", "mitigation"):
        del raw["experiments"][name]["compare_to"]
    found = {e.name: e.compare_to for e in spec_from_dict(raw).experiments}
    assert found["optimizer_lr"] == {"optim.lr": 1e-2, "optim.name": "sgd"}
    # Without compare_to: the point of the defaults (vit, 3 epochs), else the grid's first point (1e-5).
    assert (found["baseline"], found["epochs"], found["fine_lr"]) == (
        {"model": "vit"}, {"train.epochs": 3}, {"optim.lr": 1e-5})
    # A list-valued axis (balance_by) finds the defaults' point too: the unmitigated trial.
    assert found["mitigation"] == {"data.balance_by": ["class"], "augment.occlusion": 0}


def test_exponent_floats_are_numbers_not_strings(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(DEMO.read_text().replace("lr: 1.0e-3", "lr: 1e-3"))
    assert load_spec(path).defaults.optim.lr == 1e-3


def test_estimate_cost_counts_epochs_and_image_epochs():
    spec = load_spec(DEMO)
    cost = estimate_cost(spec)
    assert cost["epochs"] == 56                     # 18 trials of 3 epochs, plus 2, 4 and 5 minus 3 three times
    assert cost["image_epochs"] == round(4800 * 0.7 * 56)
    assert 0 < cost["gpu_hours"] < cost["cpu_hours"] < 1
    assert cost["assumptions"]


def test_tpe_search_keeps_grid_trials_and_validates_the_space(tmp_path):
    raw = demo_core()
    raw["search"] = {"method": "tpe", "n_trials": 20,
                     "space": {"lr": {"low": 1e-5, "high": 1e-2, "log": True}, "optim.name": ["adam", "rmsprop"]}}
    del raw["experiments"]
    spec = load_spec(write(tmp_path, raw))
    assert spec.plan == ()
    assert spec.search.space == {"optim.lr": {"low": 1e-5, "high": 1e-2, "log": True},
                                 "optim.name": ("adam", "rmsprop")}
    assert estimate_cost(spec)["epochs"] == 60


# The plans' (name, hash) pairs as the untyped spec computed them (plain dicts deep-merged, then
# built): resolving typed sections with dataclasses.replace must not move a trial, or a resumed
# sweep would run everything again.
DEMO_PLAN = [
    ("vit·ep3·adam·1e-3·s0", "1c376e4d989d"), ("resnet50·ep3·adam·1e-3·s0", "ea0fd85e7e1e"),
    ("ep2·adam·1e-3·vit·s0", "088b60eba2bb"), ("ep4·adam·1e-3·vit·s0", "eff1f1c0fbcd"),
    ("ep5·adam·1e-3·vit·s0", "3f8511ff5877"), ("sgd·1e-2·ep3·vit·s0", "7f729e8173ef"),
    ("sgd·1e-3·ep3·vit·s0", "17f129893a25"), ("sgd·1e-5·ep3·vit·s0", "7aa39aa30901"),
    ("rmsprop·1e-2·ep3·vit·s0", "06044def3cbd"), ("rmsprop·1e-3·ep3·vit·s0", "ba68840e4dc5"),
    ("rmsprop·1e-5·ep3·vit·s0", "aff09d58eca2"), ("adam·1e-2·ep3·vit·s0", "50769876528a"),
    ("adam·1e-5·ep3·vit·s0", "58ae92bd88cc"), ("adam·2e-5·ep3·vit·s0", "85758e48c02c"),
    ("adam·3e-5·ep3·vit·s0", "5003e65986ac"), ("occ0.5·ep3·adam·1e-3·vit·s0", "bc9729aaed1b"),
    ("byclass+group·ep3·adam·1e-3·vit·s0", "30381094edf3"),
    ("byclass+group·occ0.5·ep3·adam·1e-3·vit·s0", "31e5ecd98ecd"),
]
PAPER_PLAN = [   # data.root: .
    ("vit·ep3·adam·1e-3·s0", "e614bcd1d8bf"), ("resnet50·ep3·adam·1e-3·s0", "0a1fade89c2e"),
    ("ep2·adam·1e-3·vit·s0", "8b24f9b0e28a"), ("ep4·adam·1e-3·vit·s0", "5d71c14e8c3e"),
    ("ep5·adam·1e-3·vit·s0", "a01616135bfc"), ("sgd·1e-2·ep3·vit·s0", "27bd31c8c010"),
    ("sgd·1e-3·ep3·vit·s0", "3202d2e5ffd3"), ("sgd·1e-5·ep3·vit·s0", "658b2c498419"),
    ("rmsprop·1e-2·ep3·vit·s0", "d7ac5e9bbda4"), ("rmsprop·1e-3·ep3·vit·s0", "07ddf5b85cc1"),
    ("rmsprop·1e-5·ep3·vit·s0", "31c568265fcd"), ("adam·1e-2·ep3·vit·s0", "a1aa4b647034"),
    ("adam·1e-5·ep3·vit·s0", "1670c84d109e"), ("adam·2e-5·ep3·vit·s0", "abfbccfe0858"),
    ("adam·3e-5·ep3·vit·s0", "570c2b363a55"),
]


def test_plans_keep_the_hashes_the_dict_merged_configs_had():
    assert [(t.name, t.hash) for t in load_spec(DEMO).plan] == DEMO_PLAN
    paper = read(PAPER)
    paper["data"]["root"] = "."     # the hash covers data.root: one that exists wherever the test runs
    assert [(t.name, t.hash) for t in spec_from_dict(paper, "sweeps/paper.yaml").plan] == PAPER_PLAN


def test_production_without_classes_is_prepared_with_the_models_classes(tmp_path):
    raw = read(DEMO)
    raw["data"]["classes"] = ["anger", "fear", "happiness"]
    spec = load_spec(write(tmp_path, raw))
    assert not spec.production_has_classes
    production = [cfg for title, cfg, _ in datasets_to_prepare(spec) if title == "production"]
    assert [cfg.classes for cfg in production] == [("anger", "fear", "happiness")]
    assert production[0].synthetic.variant == "production"


def test_production_evaluate_names_the_runs_and_leaves_the_production_data_as_it_was(tmp_path):
    raw = read(DEMO)
    assert load_spec(DEMO).production_evaluate == ("champion", "mitigation")
    del raw["production"]["evaluate"]
    plain = load_spec(write(tmp_path, raw, "plain.yaml"))
    assert plain.production_evaluate == ()
    raw["production"]["evaluate"] = ["champion", "baseline", "all"]
    spec = load_spec(write(tmp_path, raw))
    assert spec.production_evaluate == ("champion", "baseline", "all")
    assert spec.production == plain.production


def test_a_mapping_on_an_axis_merges_into_the_preset_section(tmp_path):
    raw = demo_core()
    raw["experiments"] = {"patch": {"grid": {"model.vit": [{"patch_size": 4}]}}}
    (trial,) = load_spec(write(tmp_path, raw)).plan
    assert trial.config.model.vit.patch_size == 4
    assert trial.config.model.vit.hidden_size == 96        # kept from the vit preset


def test_augment_occlusion_is_a_grid_axis_whose_zero_point_is_the_shared_default_trial(tmp_path):
    raw = demo_core()
    raw["experiments"]["occlusion"] = {"grid": {"augment.occlusion": [0, 0.5]},
                                       "compare_to": {"augment.occlusion": 0}}
    spec = load_spec(write(tmp_path, raw))
    assert len(spec.plan) == 16                      # occlusion 0 is the default trial: one new trial
    shared = shared_trial(spec.plan)
    assert shared.groups == SHARED[:3] + ("occlusion",) and shared.hash == DEMO_PLAN[0][1]
    occluded = next(t for t in spec.plan if t.config.augment.occlusion == 0.5)
    assert (occluded.name, occluded.groups) == ("occ0.5·ep3·adam·1e-3·vit·s0", ("occlusion",))
    assert spec.experiments[-1].compare_to == {"augment.occlusion": 0}
    del raw["experiments"]["occlusion"]["compare_to"]          # the defaults' point: occlusion 0
    assert load_spec(write(tmp_path, raw)).experiments[-1].compare_to == {"augment.occlusion": 0}


def test_defaults_augment_reaches_every_trial_and_is_validated(tmp_path):
    raw = demo_core()
    raw["defaults"]["augment"] = {"occlusion": 0.25}
    spec = load_spec(write(tmp_path, raw))
    assert {t.config.augment.occlusion for t in spec.plan} == {0.25}
    assert all(t.hash not in dict(DEMO_PLAN).values() for t in spec.plan)   # an occluded trial is another trial
    raw["defaults"]["augment"] = {"occlusion": 2}
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, raw))
    assert caught.value.field == "defaults.augment.occlusion" and "[0, 1]" in caught.value.why
    raw["defaults"]["augment"] = {}
    raw["experiments"]["epochs"]["grid"] = {"augment.occlusion": [0.5, -1]}
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, raw))
    assert caught.value.field == "experiments.epochs.grid.augment.occlusion"


def test_spec_errors_carry_the_spec_field_and_what_to_do(tmp_path):
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, edit(read(DEMO), "experiments/fine_lr/grid/optim.lr", [1e-5, -1e-5])))
    assert caught.value.field == "experiments.fine_lr.grid.optim.lr"
    assert caught.value.why.startswith("must be a positive number")
    assert caught.value.source == str(tmp_path / "spec.yaml")


# --- rejections ---------------------------------------------------------------------

def edit(raw: dict, dotted: str, value) -> dict:
    """Set (or, with value None, delete) a dotted key in a plain spec dict."""
    *parents, last = dotted.split("/")
    node = raw
    for part in parents:
        node = node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return raw


REJECTIONS = [
    # (edit: path with / between keys, value), expected field, expected words
    (("surprise", 1), "surprise", "not a known top-level key"),
    (("defaults/train/epoch", 3), "defaults.train.epoch", "not a known field"),
    (("experiments/optimizer_lr/grid/optim.name", ["sgd", "adamw"]),
     "experiments.optimizer_lr.grid.optim.name", "must be one of sgd, rmsprop, adam; got 'adamw'"),
    (("experiments/optimizer_lr/grid", {"optimizer": ["adamw"]}), "experiments.optimizer_lr.grid.optimizer", "adamw"),
    (("defaults/optim/lr", 0), "defaults.optim.lr", "must be a positive number"),
    (("experiments/fine_lr/grid/optim.lr", [1e-5, -1e-5]), "experiments.fine_lr.grid.optim.lr", "positive"),
    (("experiments/epochs/grid/train.epochs", [0, 3]), "experiments.epochs.grid.train.epochs", "at least 1"),
    (("experiments/baseline/grid", {}), "experiments.baseline.grid", "empty"),
    (("experiments/epochs/grid/train.epochs", []), "experiments.epochs.grid.train.epochs", "non-empty list"),
    (("data/classes", ["anger", "fear", "anger"]), "data.classes", "more than once"),
    (("data", {"source": "imagefolder", "root": "/no/such"}), "data.root", "does not exist"),
    (("defaults/train/epochs", "three"), "defaults.train.epochs", "must be an integer"),
    (("data/split", [0.8, 0.3, -0.1]), "data.split", "must not be negative"),
    (("data/split", [0.7, 0.2, 0.2]), "data.split", "sum to 1"),
    (("experiments/baseline/grid/model", ["vit", "vgg16"]), "experiments.baseline.grid.model", "model preset"),
    (("defaults/model", "vit-large"), "defaults.model", "model preset"),
    (("experiments/epochs/grid", {"train.epoch": [2, 3]}), "experiments.epochs.grid.train.epoch",
     "did you mean train.epochs"),
    (("experiments/epochs/grid", {"tracking.experiment": ["x"]}), "experiments.epochs.grid.tracking.experiment",
     "orchestrator"),
    (("defaults/tracking", {"experiment": "x"}), "defaults.tracking", "orchestrator"),
    (("seeds", [0, "1"]), "seeds", "non-empty list of integers"),
    (("seeds", []), "seeds", "non-empty list of integers"),
    (("name", "Demo Run"), "name", "a-z, 0-9"),
    (("name", None), "name", "is required"),
    (("production/synthetic/variant", "prod"), "production.synthetic.variant", "got 'prod'"),
    (("production/evaluate", ["champion", "mitigations"]), "production.evaluate",
     "names 'mitigations', which is not champion, all or an experiment of this spec"),
    (("production/evaluate", ["champion", "basline"]), "production.evaluate", "did you mean baseline?"),
    (("production/evaluate", "champion"), "production.evaluate", "must be a non-empty list of champion, all or"),
    (("production/evaluate", []), "production.evaluate", "must be a non-empty list"),
    (("production/evaluate", ["all", "all"]), "production.evaluate", "lists 'all' more than once"),
    (("production", {"evaluate": ["all"]}), "production", "needs a data section naming the production images"),
    (("models/vit/vit/patch_size", 5), "models.vit.vit.patch_size", "must divide"),
    (("models/resnet50/name", None), "models.resnet50.name", "is required"),
    (("experiments/epochs/colour", "red"), "experiments.epochs.colour", "allowed: title, grid, set, reference"),
    (("experiments/baseline/compare_to", {"optimizer": "adam"}), "experiments.baseline.compare_to.optimizer",
     "is not an axis of this experiment's grid (model)"),
    (("experiments/baseline/compare_to", {"model": "vgg"}), "experiments.baseline.compare_to.model",
     "is 'vgg', not a value of the grid's model (vit, resnet50); pick one of them"),
    (("experiments/epochs/compare_to", {"epochs": 7}), "experiments.epochs.compare_to.epochs",
     "not a value of the grid's train.epochs (2, 3, 4, 5)"),
    (("experiments/optimizer_lr/compare_to", {"optim.name": "adam"}), "experiments.optimizer_lr.compare_to",
     "must give a value for every grid axis; missing optim.lr"),
    (("experiments/epochs/compare_to", {"seed": 0}), "experiments.epochs.compare_to.seed", "seeds are replicates"),
    (("experiments/baseline/compare_to", "resnet50"), "experiments.baseline.compare_to",
     "must map each grid axis to one of its values, e.g. {model: vit}"),
    (("experiments/epochs/reference", [1, 2]), "experiments.epochs.reference", "must be a mapping"),
    (("experiments/epochs/set", {"optim.lr": "fast"}), "experiments.epochs.set.optim.lr", "must be a number"),
    (("search", {"method": "random"}), "search.method", "must be one of grid, tpe"),
    (("search", {"method": "tpe", "n_trials": 5, "space": {"lr": {"low": 1e-2, "high": 1e-5}}}),
     "search.space.lr", "low < high"),
    (("search", {"method": "tpe", "n_trials": 5, "space": {"lr": {"low": 0, "high": 1e-2, "log": True}}}),
     "search.space.lr.low", "positive on a log scale"),
    (("search", {"method": "tpe", "n_trials": 5, "space": {"train.epochs": {"low": 0, "high": 4}}}),
     "search.space.train.epochs.low", "at least 1"),
    (("search", {"method": "tpe", "n_trials": 0, "space": {"lr": [1e-3]}}), "search.n_trials", "positive integer"),
    (("search", {"method": "tpe", "n_trials": 5, "space": {"optimizer": ["adam", "lion"]}}),
     "search.space.optimizer", "got 'lion'"),
    (("promote/metric", "f1"), "promote.metric", "must be one of val_macro_f1"),
    (("promote/alias", "latest"), "promote.alias", "latest"),
    (("execution/jobs", 0), "execution.jobs", ">= 1"),
    (("execution/gpus", [0, -1]), "execution.gpus", "GPU indices"),
    (("execution/max_retries", -1), "execution.max_retries", ">= 0"),
]


@pytest.mark.parametrize("change, field, words", REJECTIONS, ids=[r[1] + ":" + r[2][:20] for r in REJECTIONS])
def test_bad_spec_is_rejected_with_one_line_naming_file_and_field(tmp_path, change, field, words):
    path = write(tmp_path, edit(read(DEMO), *change))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field} "), message
    assert caught.value.field == field
    assert words in message, message


@pytest.mark.parametrize("change, field, words", REJECTIONS, ids=[r[1] + ":" + r[2][:20] for r in REJECTIONS])
def test_sweep_with_a_bad_spec_exits_2_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys,
                                                                            change, field, words):
    from orchestrator.__main__ import main

    path = write(tmp_path, edit(read(DEMO), *change))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {field} ") and words in lines[0], lines
    assert [p.name for p in tmp_path.iterdir()] == [path.name]      # no mlruns/: no store, no MLflow run


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: demo\nexperiments:\n  baseline: {grid: {model: [vit, resnet50]}\n")
    with pytest.raises(SpecError, match=r"broken\.yaml: not valid YAML at line \d+, column \d+: ") as caught:
        load_spec(path)
    assert "\n" not in str(caught.value)


def test_duplicate_experiment_names_are_rejected(tmp_path):
    path = tmp_path / "twice.yaml"
    text = DEMO.read_text()
    path.write_text(text + "\n".join(["", "experiments:", "  epochs: {grid: {train.epochs: [2]}}"]) + "\n")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: experiments is given twice \(line"):
        load_spec(path)
    nested = text.replace("  fine_lr:", "  epochs:")
    path.write_text(nested)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: experiments\.epochs is given twice \(line \d+"):
        load_spec(path)


def test_missing_file_and_non_mapping_are_one_line_errors(tmp_path):
    with pytest.raises(SpecError, match="nothing.yaml: file not found"):
        load_spec(tmp_path / "nothing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="list.yaml: the top level must be a mapping"):
        load_spec(path)


def test_paper_spec_fails_only_on_its_missing_data_root(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    if (REPO / "data" / "faces").is_dir():
        pytest.skip("data/faces exists here")
    with pytest.raises(SpecError, match=r"^sweeps/paper\.yaml: data\.root folder 'data/faces' does not exist"):
        load_spec("sweeps/paper.yaml")
    spec_from_dict(paper_at(tmp_path), "sweeps/paper.yaml")   # and nothing else is wrong


def test_paper_references_follow_one_shape(tmp_path):
    spec = spec_from_dict(paper_at(tmp_path), "sweeps/paper.yaml")
    for exp in spec.experiments:
        tables = [exp.reference] + [v for v in exp.reference.values() if isinstance(v, dict)]
        for table in tables:
            assert isinstance(table["source"], str)
            for point in table["points"]:
                assert len(point["value"]) == len(table["metric"])
                assert all(0 <= v <= 1 for v in point["value"] if table["metric"][0] != "train_loss")
                assert set(point) - {"value", "epoch", "class"} <= set(exp.grid)


# --- the plan command -----------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_plan_prints_the_table_count_and_cost():
    done = run_cli("plan", "sweeps/demo.yaml")
    assert done.returncode == 0, done.stderr
    assert "22 grid points → 18 unique trials" in done.stdout
    assert "adam·3e-5·ep3·vit·s0" in done.stdout
    assert "estimated cost" in done.stdout


def test_plan_with_a_bad_spec_prints_one_error_line_and_exits_2(tmp_path):
    path = write(tmp_path, edit(read(DEMO), "defaults/optim/name", "adamw"))
    done = run_cli("plan", str(path))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "defaults.optim.name" in done.stderr and "Traceback" not in done.stderr


def test_plan_prints_the_tpe_search(tmp_path):
    raw = read(DEMO)
    raw["search"] = {"method": "tpe", "n_trials": 8, "space": {"lr": {"low": 1e-5, "high": 1e-2, "log": True}}}
    done = run_cli("plan", str(write(tmp_path, raw)))
    assert done.returncode == 0, done.stderr
    assert "TPE: 8 trials over space optim.lr" in done.stdout


