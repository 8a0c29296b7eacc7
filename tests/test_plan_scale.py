"""Large plans through the real code: every trial listed, built, hashed and named as resolve_trial and
config_hash make them one at a time, with a progress line past 1,000 grid points. How fast: tests/bench/
test_plan_speed.py."""
from __future__ import annotations

import argparse

import pytest

from trainers.config import ConfigError, config_hash
from orchestrator import verbs
from orchestrator.sweep.plan import TrialBuilder, experiment_points, resolve_trial, trial_point
from orchestrator.sweep.spec import SpecError, load_spec, spec_from_dict


def test_plan_command_lists_a_10k_point_grid_as_10k_trials_with_progress(tmp_path, grid_spec, capsys):
    assert verbs.plan(argparse.Namespace(spec=str(grid_spec(tmp_path, 100, 10, 10)))) == 0
    out, err = capsys.readouterr()
    assert "10000 grid points → 10000 unique trials" in out
    assert "estimated cost: 10000 trials" in out
    # The table shows the first 20 and last 10 trials and counts those between in one row.
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 31 and "9,970 more trials" in rows[20]
    assert "adam·1e-5·batch_size8·ep1·vit·s0" in rows[0] and "adam·1e-3·batch_size80·ep10·vit·s0" in rows[-1]
    assert "planning grid points: 5000/10000" in err and "planning grid points: 10000/10000" in err


def test_a_10k_point_plan_holds_the_trials_resolve_trial_and_config_hash_make_one_at_a_time(tmp_path, grid_spec):
    spec = load_spec(grid_spec(tmp_path, 100, 10, 10))
    assert len(spec.plan) == 10_000
    assert len({t.name for t in spec.plan}) == len({t.hash for t in spec.plan}) == 10_000
    exp = spec.experiments[0]
    points = experiment_points(exp)
    for i in (0, 1, 10, 99, 4321, 9999):
        cfg = resolve_trial(spec, trial_point(exp, points[i], seed=0))
        assert spec.plan[i].config == cfg and spec.plan[i].hash == config_hash(cfg)
    assert spec.plan[0].name == "adam·1e-5·batch_size8·ep1·vit·s0"


def test_plans_of_up_to_1000_points_print_no_progress(tmp_path, grid_spec, capsys):
    assert len(load_spec(grid_spec(tmp_path, 10, 10, 10)).plan) == 1000
    assert capsys.readouterr().err == ""


def test_trial_builder_keeps_apart_values_python_calls_equal(tmp_path, grid_spec):
    # 1, 1.0 and True are equal (and hash alike) in Python, but only 1 is an integer: the section built
    # for 1 must not stand in for 1.0 or True.
    spec = load_spec(grid_spec(tmp_path, 1, 1, 1))
    builder = TrialBuilder(spec)
    point = {"train.seed": 0, "train.epochs": 1}
    assert builder.resolve(point) == resolve_trial(spec, point)
    for value, words in ((1.0, "got float 1.0"), (True, "got bool True")):
        with pytest.raises(ConfigError, match=rf"train\.epochs must be an integer, {words}"):
            builder.resolve({"train.seed": 0, "train.epochs": value})


def test_a_value_another_experiment_shares_fails_where_it_is_given():
    raw = {"name": "grid", "experiments": {"a": {"grid": {"train.epochs": [2]}},
                                           "b": {"grid": {"train.epochs": [2.0]}}}}
    with pytest.raises(SpecError, match=r"experiments\.b\.grid\.train\.epochs must be an integer, got float 2\.0"):
        spec_from_dict(raw, "spec.yaml")
