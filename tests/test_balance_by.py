"""data.balance_by: the training split's copies grow every class x attribute cell towards the largest cell,
within the cap; the default (class) draws exactly today's per-class plan; columns are checked up front."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.render import balance_table, console
from orchestrator.sweep.runner import data_line
from trainers.config import ConfigError, config_hash, from_dict
from trainers.data.balance import balance_cells, balance_plan, balance_summary, balance_text
from trainers.data.dataset import DataError, prepare_data
from trainers.data.split import TEST, TRAIN, VAL
from trainers.models import build_model
from trainers.tracking import TrialRun
from trainers.train import build_loop

CLASSES = ("anger", "disgust", "happiness")


def per_class_plan_before_balance_by(train_idx, labels, max_factor, seed):
    """The per-class plan as it was drawn before data.balance_by existed (kept to prove the default is unchanged)."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels[train_idx])
    target = counts.max()
    extra = []
    for c, n in enumerate(counts):
        if n == 0:
            continue
        want = min(target, int(n * max_factor)) - n
        if want > 0:
            extra.append(rng.choice(train_idx[labels[train_idx] == c], size=want, replace=True))
    copies = np.concatenate(extra) if extra else np.empty(0, dtype=train_idx.dtype)
    return np.concatenate([train_idx, copies]), np.arange(len(train_idx) + len(copies)) >= len(train_idx)


def skewed_images(seed=0, n=900):
    """Labels, groups (b rare except in happiness, as the study's male/female), glasses (unknown for some),
    and a 70/20/10 split; one combination (disgust x b) exists only in the test split."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.45, 0.15, 0.40])
    group = np.where(rng.random(n) < np.where(labels == 2, 0.7, 0.1), "b", "a")
    splits = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
    splits[(labels == 1) & (group == "b")] = TEST
    glasses = rng.choice(["yes", "no", ""], size=n, p=[0.2, 0.6, 0.2])
    attrs = [{"group": g, **({"glasses": s} if s else {})} for g, s in zip(group, glasses)]
    return labels, attrs, splits


# --- the plan ---------------------------------------------------------------------------

def test_balance_by_two_columns_grows_every_cell_towards_the_largest_within_the_cap():
    labels, attrs, splits = skewed_images()
    train = np.flatnonzero(splits == TRAIN)
    cells = balance_cells(labels, attrs, CLASSES, ("class", "group"))
    assert cells.values == [(c, g) for c in CLASSES for g in "ab"]
    plan, augmented = balance_plan(train, cells.ids, 3.0, seed=5)

    before = np.bincount(cells.ids[train], minlength=6)
    after = np.bincount(cells.ids[plan], minlength=6)
    largest = before.max()
    for cell, (n, m) in enumerate(zip(before, after)):
        assert m == (0 if n == 0 else max(n, min(largest, int(3.0 * n)))), cells.values[cell]
    assert before[cells.values.index(("disgust", "b"))] == 0       # only in test: nothing to copy, stays empty
    assert after.max() == largest and (after[before > 0] >= np.minimum(largest, 3 * before[before > 0])).all()
    # The copies come from the training images of their own cell; val and test images are never drawn.
    copies = plan[augmented]
    assert set(copies) <= set(train) and not augmented[:len(train)].any()
    assert np.array_equal(plan[:len(train)], train)
    # The labels follow the cells: the class weights see every copy's true class.
    assert np.array_equal(np.bincount(labels[plan], minlength=3),
                          [after[[2 * c, 2 * c + 1]].sum() for c in range(3)])


def test_the_summary_counts_each_cell_as_the_plan_draws_it_and_names_the_empty_ones():
    labels, attrs, splits = skewed_images()
    train = np.flatnonzero(splits == TRAIN)
    cells = balance_cells(labels, attrs, CLASSES, ("class", "group"))
    summary = balance_summary(cells, train, 2.0)
    plan = balance_plan(train, cells.ids, 2.0, seed=3)[0]
    assert [c["after"] for c in summary["cells"]] == np.bincount(cells.ids[plan], minlength=6).tolist()
    assert summary["cells"][3] == {"values": {"class": "disgust", "group": "b"}, "before": 0, "after": 0}
    assert balance_text(summary).endswith("; no training image in 1 cell, left empty: disgust×b")


def test_balance_by_is_deterministic_for_the_seed():
    labels, attrs, splits = skewed_images()
    train = np.flatnonzero(splits == TRAIN)
    ids = balance_cells(labels, attrs, CLASSES, ("group", "class")).ids
    first, again = balance_plan(train, ids, 3.0, seed=1), balance_plan(train, ids, 3.0, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = balance_plan(train, ids, 3.0, seed=2)[0]
    assert len(other) == len(first[0]) and not np.array_equal(other, first[0])


def test_an_image_without_the_attribute_is_its_own_cell():
    labels, attrs, splits = skewed_images()
    cells = balance_cells(labels, attrs, CLASSES, ("glasses",))
    assert cells.values == [("",), ("no",), ("yes",)]
    unknown = [not a.get("glasses") for a in attrs]
    assert np.array_equal(cells.ids == 0, unknown)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_default_balance_by_draws_exactly_the_per_class_plan(seed):
    labels, attrs, splits = skewed_images(seed)
    train = np.flatnonzero(splits == TRAIN)
    ids = balance_cells(labels, attrs, CLASSES, ("class",)).ids
    assert np.array_equal(ids, labels)
    for factor in (1.0, 2.5, 3.0, 10.0):
        got = balance_plan(train, ids, factor, seed)
        expected = per_class_plan_before_balance_by(train, labels, factor, seed)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))


# --- configuration ------------------------------------------------------------------------

def test_balance_by_at_its_default_or_with_balance_off_keeps_the_config_hash():
    default = config_hash(from_dict({}))
    assert default == "96a85a117792"        # the defaults' hash before data.balance_by existed
    assert config_hash(from_dict({"data": {"balance_by": ["class"]}})) == default
    by_group = from_dict({"data": {"balance_by": ["class", "group"]}})
    assert config_hash(by_group) != default
    off = {"data": {"balance": False}}
    assert config_hash(from_dict({"data": {"balance": False, "balance_by": ["class", "group"]}})) == \
        config_hash(from_dict(off)) == "85b78d3051b2"


@pytest.mark.parametrize("balance_by, says", [
    ([], "must name at least one column"),
    (["class", "group", "class"], "lists 'class' more than once"),
    (["class", "subject"], "cannot use 'subject'"),
    (["class", "gender"], "names 'gender', which is not a column of the synthetic source's metadata; "
                          "choose from: class, group, occluded"),
])
def test_a_bad_balance_by_is_rejected_at_config_time_with_the_field_path(balance_by, says):
    with pytest.raises(ConfigError) as err:
        from_dict({"data": {"balance_by": balance_by}}, "spec.yaml")
    assert err.value.field == "data.balance_by" and says in str(err.value)
    assert str(err.value).startswith("spec.yaml: data.balance_by ")


def write_folder(root: Path, metadata: list[str] | None) -> Path:
    """anger (30 images) and happiness (20), and metadata.csv rows when given (header first)."""
    for c, n, colour in (("anger", 30, 200), ("happiness", 20, 20)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40 + i, 40), (colour, i * 7 % 255, 80)).save(root / c / f"{i}.png")
    if metadata is not None:
        (root / "metadata.csv").write_text("\n".join(metadata) + "\n")
    return root


def glasses_metadata() -> list[str]:
    """A subject per image and glasses for most: yes on every third anger image, unknown on the last 5 of each."""
    rows = ["path,subject,glasses"]
    rows += [f"anger/{i}.png,p{i % 10},{'' if i >= 25 else 'yes' if i % 3 == 0 else 'no'}" for i in range(30)]
    rows += [f"happiness/{i}.png,q{i % 10},{'' if i >= 15 else 'no'}" for i in range(20)]
    return rows


def folder_config(tmp_path, root, balance_by):
    return {"data": {"source": "imagefolder", "root": str(root), "classes": ["anger", "happiness"],
                     "cache_dir": str(tmp_path / "cache"), "balance_by": balance_by},
            "model": {"image_size": 16}}


def test_an_image_folder_column_that_metadata_csv_lacks_is_rejected_at_config_time(tmp_path):
    root = write_folder(tmp_path / "faces", glasses_metadata())
    with pytest.raises(ConfigError) as err:
        from_dict(folder_config(tmp_path, root, ["class", "group"]), "spec.yaml")
    assert err.value.field == "data.balance_by"
    assert f"names 'group', which is not a column of {root / 'metadata.csv'}; choose from: class, glasses" in \
        str(err.value)
    bare = write_folder(tmp_path / "bare", None)
    with pytest.raises(ConfigError, match="no such file: add one"):
        from_dict(folder_config(tmp_path, bare, ["class", "glasses"]))


def test_a_column_unknown_until_the_data_is_read_stops_preparation_naming_it(tmp_path):
    root = tmp_path / "later"            # not there yet when the config is read: checked when prepared
    cfg = from_dict(folder_config(tmp_path, root, ["class", "group"]))
    write_folder(root, glasses_metadata())
    with pytest.raises(DataError) as err:
        prepare_data(cfg.data, 16)
    assert str(err.value).startswith("data.balance_by: column 'group' is not in this dataset's metadata "
                                     "(columns: class, glasses)")


# --- an image folder end to end: report, data line, logged report, the train loop's plan --------

@pytest.fixture
def glasses_folder(tmp_path):
    """A prepared image folder balanced by class x glasses, and its trial config."""
    root = write_folder(tmp_path / "faces", glasses_metadata())
    raw = folder_config(tmp_path, root, ["class", "glasses"])
    raw["model"] = {"name": "vit", "image_size": 16, "vit": {"patch_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
                                                             "num_attention_heads": 2, "intermediate_size": 32}}
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "balance"}
    cfg = from_dict(raw)
    return cfg, prepare_data(cfg.data, 16)


def test_an_image_folder_is_balanced_by_its_metadata_column_as_reported(glasses_folder):
    cfg, data = glasses_folder
    balance = data.report.balance
    assert balance["by"] == ["class", "glasses"] and balance["max_factor"] == 3.0
    names = [tuple(c["values"].values()) for c in balance["cells"]]
    assert names == [("anger", ""), ("anger", "no"), ("anger", "yes"), ("happiness", ""), ("happiness", "no")]
    train = data.indices(TRAIN)
    assert sum(c["before"] for c in balance["cells"]) == len(train)

    plan, augmented = build_loop(cfg, data, build_model(cfg.model, 2)).plan    # what the trial trains on
    ids = balance_cells(data.labels, data.attrs, data.classes, cfg.data.balance_by).ids
    assert np.bincount(ids[plan], minlength=len(names)).tolist() == [c["after"] for c in balance["cells"]]
    assert not np.isin(plan, data.indices(VAL)).any() and not np.isin(plan, data.indices(TEST)).any()
    assert data.report.metrics()["data_n_train_balanced"] == len(plan)


def test_the_data_line_the_prepare_table_and_data_report_json_carry_the_cells(glasses_folder, tmp_path):
    cfg, data = glasses_folder
    cells = data.report.balance["cells"]
    assert [(c["before"], c["after"]) for c in cells] == [(3, 9), (12, 12), (6, 12), (4, 12), (10, 12)]
    assert data_line(data.report, 16) == ("data: 50 images (train 35, val 10, test 5) at 16 px; split mode: group; "
                                          "skipped 0; balanced by class×glasses: 5 cells, train 35 → 57 "
                                          "(smallest cell anger×(none) 3 → 9)")

    out = console()
    with out.capture() as shown:
        out.print(balance_table(data.report.balance))
    assert "a cell grows to at most 3x its size" in shown.get() and "│ happiness │ (none)  │" in shown.get()

    run = TrialRun.open(cfg, None)
    run.log_setup(cfg, data)
    run.finish("finished")
    logged = json.loads(Path(run.client.download_artifacts(run.run_id, "data_report.json", str(tmp_path)))
                        .read_text())
    assert logged["balance"] == data.report.balance
    assert run.client.get_run(run.run_id).data.metrics["data/n_train_balanced"] == sum(c["after"] for c in cells)


def test_prepare_prints_the_training_balance_cells_not_the_production_ones(tmp_path, write_spec, capsys):
    from orchestrator.__main__ import main

    data = {"source": "synthetic", "synthetic": {"n_images": 120, "draw_size": 32},
            "cache_dir": str(tmp_path / "cache")}
    spec = write_spec(tmp_path, "cells", {"mitigation": {"grid": {"data.balance_by": [["class", "group"]]}}},
                      data=data, production={**data, "synthetic": {**data["synthetic"], "variant": "production"}})
    assert main(["prepare", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out.count("balanced by class×group: ") == 1 and "a cell grows to at most 3x its size" in out
    assert "┃ class     ┃ group ┃ train ┃ balanced ┃" in out
