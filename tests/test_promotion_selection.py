"""Promotion picks a configuration by its mean over seeds and never compares models trained on different data.

The runs are written straight into a real (temporary sqlite) MLflow store, as the sweep logs them:
child runs of the sweep's parent run with their params, final validation F1, data digest and a
logged model (an empty one: registration needs the model's id, not its weights). No training.
"""
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric, Param

from orchestrator.__main__ import main
from orchestrator.results.registry import PREVIOUS_ALIAS, promote
from orchestrator.sweep.runner import child_run_tags
from orchestrator.sweep.spec import spec_from_dict
from trainers.tracking import open_parent_run

# Configuration A: the best mean (0.7933) but no single outstanding seed; its run nearest the mean is seed 1.
BEST_MEAN = {0: 0.70, 1: 0.78, 2: 0.90}
# Configuration B: the single best seed of the sweep (0.95) but a worse mean (0.7233).
BEST_SEED = {0: 0.95, 1: 0.60, 2: 0.62}


def spec_raw(sweep: str, name: str) -> dict:
    return {"name": sweep, "data": {"source": "synthetic"}, "experiments": {"baseline": {"grid": {"optim.lr": [1e-3]}}},
            "promote": {"name": name}}


def add_configuration(client: MlflowClient, sweep: str, lr: float, scores: dict[int, float],
                      digest: str = "digest-a") -> dict[int, str]:
    """Finished ViT runs of one configuration (learning rate lr), one per seed; their run ids by seed."""
    parent = open_parent_run(client, sweep)
    experiment = client.get_experiment_by_name(sweep).experiment_id
    ids = {}
    for seed, f1 in scores.items():
        tags = {**child_run_tags(sweep, "baseline", seed), "mlflow.parentRunId": parent, "status": "finished",
                "config_hash": f"lr{lr}-seed{seed}", "data_digest": digest}
        run_id = client.create_run(experiment, run_name=f"lr{lr}-seed{seed}", tags=tags).info.run_id
        params = {"model.name": "vit", "optim.lr": str(lr), "train.seed": str(seed)}
        client.log_batch(run_id, metrics=[Metric("final_val_macro_f1", f1, 0, 0)],
                         params=[Param(k, v) for k, v in params.items()])
        model = client.create_logged_model(experiment, source_run_id=run_id, name="model")
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        client.set_tag(run_id, "model_id", model.model_id)
        client.set_terminated(run_id)
        ids[seed] = run_id
    return ids


@pytest.fixture
def client(in_tmp):
    return MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")


def aliases(client, name):
    return {alias: int(v) for alias, v in client.get_registered_model(name).aliases.items()}


def test_promotion_picks_the_best_mean_over_seeds_not_the_single_best_seed(client):
    best_mean = add_configuration(client, "t", 1e-3, BEST_MEAN)
    add_configuration(client, "t", 1e-4, BEST_SEED)

    result = promote(spec_from_dict(spec_raw("t", "fer-mean"), "t.yaml"), client)

    assert result.run_id == best_mean[1]                      # 0.78: the seed nearest the mean 0.7933
    assert result.value == pytest.approx(0.78) and result.mean == pytest.approx(sum(BEST_MEAN.values()) / 3)
    assert result.n_seeds == 3 and result.champion_changed
    assert "best mean over 3 seeds (0.7933, 2 configuration(s) compared)" in result.message
    tags = client.get_model_version("fer-mean", str(result.version)).tags
    assert float(tags["selection_mean"]) == pytest.approx(result.mean) and tags["selection_n_seeds"] == "3"
    assert tags["selection_metric"] == "val_macro_f1" and float(tags["selection_value"]) == pytest.approx(0.78)
    assert tags["source_run_id"] == best_mean[1] and tags["data_digest"] == "digest-a"


def test_runs_equally_near_the_mean_go_to_the_lowest_seed(client):
    runs = add_configuration(client, "t", 1e-3, {5: 0.7, 3: 0.9})    # both 0.1 from the mean 0.8

    result = promote(spec_from_dict(spec_raw("t", "fer-tie"), "t.yaml"), client)

    assert result.run_id == runs[3] and result.n_seeds == 2


def test_a_candidate_trained_on_other_data_keeps_the_champion_until_replace_is_passed(client, in_tmp, capsys):
    add_configuration(client, "old", 1e-3, BEST_SEED, digest="digest-a")
    first = promote(spec_from_dict(spec_raw("old", "fer"), "old.yaml"), client)
    new = add_configuration(client, "new", 1e-3, BEST_MEAN, digest="digest-b")   # a better mean, other data
    spec = spec_from_dict(spec_raw("new", "fer"), "new.yaml")

    kept = promote(spec, client)

    assert not kept.champion_changed and kept.version == 2 and kept.run_id == new[1]
    assert aliases(client, "fer") == {"champion": first.version}
    assert "kept champion v1: v2 was trained on different data (its data_digest digest-b, v1's digest-a), " \
           "so their val_macro_f1 scores are not comparable; v2 is registered, not champion: " \
           "pass --replace to promote it anyway" in kept.message

    path = in_tmp / "new.yaml"
    path.write_text(yaml.safe_dump(spec_raw("new", "fer")))
    assert main(["promote", str(path), "--tracking-uri", client.tracking_uri, "--replace"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()      # the outcome in one line; then the refreshed report and the version's link
    assert lines[0].startswith("fer v2 from run lr0.001-seed1") and lines[1].startswith("report: ")
    assert lines[-1].strip() == "version: http://127.0.0.1:5000/#/models/fer/versions/2"
    assert "now champion, replacing v1 (mean val_macro_f1 over 3 seed(s) 0.7233), which is now previous; " \
           "--replace promoted it although v2 was trained on different data" in out
    assert aliases(client, "fer") == {"champion": 2, PREVIOUS_ALIAS: 1}
    assert len(client.search_model_versions("name = 'fer'")) == 2      # v2 found by its run, not registered again


def test_a_candidate_on_the_same_data_is_compared_by_its_mean_with_the_champions_mean(client):
    add_configuration(client, "old", 1e-3, BEST_SEED)
    promote(spec_from_dict(spec_raw("old", "fer"), "old.yaml"), client)
    add_configuration(client, "new", 1e-3, BEST_MEAN)

    better = promote(spec_from_dict(spec_raw("new", "fer"), "new.yaml"), client)
    worse = promote(spec_from_dict(spec_raw("old", "fer"), "old.yaml"), client)

    assert better.champion_changed and "replacing v1 (mean val_macro_f1 over 3 seed(s) 0.7233)" in better.message
    assert not worse.champion_changed
    assert "kept champion v2: its mean val_macro_f1 over 3 seed(s) 0.7933 is not beaten by 0.7233" in worse.message
