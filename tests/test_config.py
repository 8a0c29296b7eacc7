import dataclasses

import pytest

from trainers.config import (ConfigError, TrackingConfig, config_hash, from_dict, from_yaml, short_number, trial_name, with_overrides,
                             with_tracking, with_value)


def reject(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        from_dict(raw, "trial.yaml")
    return str(err.value)


def test_defaults_follow_the_study_protocol():
    cfg = from_dict({})
    assert cfg.optim.name == "adam" and cfg.optim.lr == 1e-3
    assert cfg.train.batch_size == 256 and cfg.train.epochs == 3
    assert (cfg.optim.lr_drop_threshold, cfg.optim.lr_drop_factor) == (0.10, 0.8)
    assert cfg.data.split == (0.7, 0.2, 0.1)


def test_unknown_key_is_named_with_its_dotted_path():
    msg = reject({"optim": {"learning_rate": 0.1}})
    assert msg.startswith("trial.yaml: unknown key 'optim.learning_rate'")
    assert "lr" in msg


def test_nested_unknown_key_is_named():
    assert "'model.vit.layers'" in reject({"model": {"vit": {"layers": 2}}})


@pytest.mark.parametrize("raw, field", [
    ({"optim": {"lr": 0}}, "optim.lr"),
    ({"optim": {"lr": -1e-3}}, "optim.lr"),
    ({"optim": {"name": "adamw"}}, "optim.name"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"epochs": "three"}}, "train.epochs"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size"),
    ({"data": {"split": [0.7, 0.4, -0.1]}}, "data.split"),
    ({"data": {"split": [0.5, 0.2, 0.1]}}, "data.split"),
    ({"data": {"classes": ["anger", "fear", "Anger"]}}, "data.classes"),
    ({"data": {"source": "imagefolder"}}, "data.root"),
    ({"model": {"name": "vgg"}}, "model.name"),
    ({"model": {"image_size": 30, "vit": {"patch_size": 8}}}, "model.vit.patch_size"),
    ({"train": {"device": "tpu"}}, "train.device"),
    ({"data": {"balance": "yes"}}, "data.balance"),
])
def test_bad_values_are_rejected_naming_the_field(raw, field):
    msg = reject(raw)
    assert msg.startswith("trial.yaml: ") and field in msg
    assert "\n" not in msg


def test_numeric_strings_are_accepted_for_floats():
    assert from_dict({"optim": {"lr": "1e-5"}}).optim.lr == 1e-5


def test_config_tree_is_frozen():
    cfg = from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: [1e-3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line \d+"):
        from_yaml(path)


def test_hash_ignores_tracking_and_device_but_not_hyperparameters():
    base = from_dict({})
    assert config_hash(base) == config_hash(from_dict({"tracking": {"experiment": "x"},
                                                       "train": {"device": "cpu"}}))
    assert config_hash(base) != config_hash(from_dict({"optim": {"lr": 1e-4}}))
    assert len(config_hash(base)) == 12


def test_overrides_parse_values_as_yaml():
    raw = with_overrides({"optim": {"name": "sgd"}}, ["optim.lr=3e-5", "train.epochs=5"])
    cfg = from_dict(raw)
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.epochs) == ("sgd", 3e-5, 5)


def test_trial_name_is_readable():
    cfg = from_dict({"optim": {"lr": 3e-5}, "train": {"seed": 1}})
    assert trial_name(cfg) == "ep3·adam·3e-5·vit·s1"
    assert trial_name(from_dict({})) == "ep3·adam·1e-3·vit·s0"
    assert trial_name(cfg, first=("lr", "model")) == "3e-5·vit·ep3·adam·s1"      # what varies first, seed last
    odd = from_dict({"optim": {"name": "sgd", "lr": 1e12}, "augment": {"occlusion": 0.25}})
    assert trial_name(odd) == "ep3·sgd·1e12·vit·occ0.25·s0"
    assert [short_number(x) for x in (0.001, 1e-5, 2.5e-4, 0.5, 0.1, 1.0, 1e12)] == [
        "1e-3", "1e-5", "2.5e-4", "0.5", "0.1", "1", "1e12"]


def test_errors_carry_the_field_and_what_is_wrong_beside_the_message():
    with pytest.raises(ConfigError) as err:
        from_dict({"optim": {"lr": -1.0}}, "trial.yaml")
    assert (err.value.source, err.value.field) == ("trial.yaml", "optim.lr")
    assert str(err.value) == f"trial.yaml: optim.lr {err.value.why}"
    with pytest.raises(ConfigError) as err:
        from_dict({"data": {"classes": ["anger", "fear", 3]}})
    assert err.value.field == "data.classes[2]" and err.value.why.startswith("must be a string")
    with pytest.raises(ConfigError) as err:
        from_dict({"train": {"epoch": 3}}, "trial.yaml")
    assert err.value.field == "train.epoch"
    assert err.value.why.startswith("is not a known field; did you mean epochs? allowed here: ")
    assert str(err.value).startswith("trial.yaml: unknown key 'train.epoch' (allowed here: ")


def test_with_value_coerces_through_the_builder_and_merges_sections():
    base = from_dict({"model": {"vit": {"hidden_size": 96, "num_attention_heads": 4}}})
    cfg = with_value(base, "model.vit", {"patch_size": 8}, "spec")
    assert (cfg.model.vit.patch_size, cfg.model.vit.hidden_size) == (8, 96)
    assert with_value(base, "optim.lr", "3e-5", "spec").optim.lr == 3e-5
    assert with_value(base, "data.classes", ["a", "b"], "spec").data.classes == ("a", "b")
    with pytest.raises(ConfigError) as err:
        with_value(base, "train.epochs", "three", "spec")
    assert str(err.value) == "spec: train.epochs must be an integer, got str 'three'"
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        with_value(base, "optim.learning_rate", 1.0, "spec")
    with pytest.raises(ConfigError, match="optim.lr is a single value"):
        with_value(base, "optim.lr.low", 1.0, "spec")


def test_with_tracking_sets_the_run_and_threads_without_changing_the_hash():
    cfg = from_dict({"optim": {"lr": 1e-4}})
    tracking = TrackingConfig(experiment="demo", run_name="vit", tags={"role": "trial"})
    run = with_tracking(cfg, tracking, num_threads=2)
    assert (run.tracking, run.train.num_threads) == (tracking, 2)
    assert config_hash(run) == config_hash(cfg)
    assert with_tracking(cfg, tracking).train == cfg.train


def test_an_empty_test_split_is_rejected_at_config_time_naming_the_field_and_the_fix():
    msg = reject({"data": {"split": [0.8, 0.2, 0.0]}})
    assert msg.startswith("trial.yaml: data.split gives the test split no images")
    assert "give test a share, e.g. [0.7, 0.2, 0.1]" in msg
    # With the dataset's own split the ratios only carve validation from train: its test split stands.
    kept = from_dict({"data": {"source": "fer2013", "root": "fer", "use_dataset_split": True,
                               "split": [0.8, 0.2, 0.0]}})
    assert kept.data.split == (0.8, 0.2, 0.0)
