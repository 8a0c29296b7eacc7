"""Leakage made visible: how the split was made, near-duplicates of training images in production, and the
report's data section, read back from a real (temporary sqlite) MLflow store."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from orchestrator.results.production import duplicates_against_training, run_training_data
from orchestrator.results.report import write_report
from orchestrator.sweep.runner import child_run_tags, data_line
from orchestrator.sweep.spec import spec_from_dict
from trainers.config import TrackingConfig, from_dict
from trainers.data.audit import near_duplicates_between, perceptual_hashes
from trainers.data.dataset import prepare_data
from trainers.data.split import TRAIN
from trainers.run import run_trial
from trainers.tracking import TrialRun, ensure_experiment, open_parent_run


def smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct 48 px images with the low-frequency content a perceptual hash reads (16 px noise, upscaled)."""
    small = rng.integers(20, 236, (n, 16, 16, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((48, 48), Image.Resampling.BILINEAR)) for s in small])


def test_near_duplicates_between_two_sets_count_only_the_planted_copies():
    rng = np.random.default_rng(0)
    training, production = smooth_images(rng, 30), smooth_images(rng, 20)
    training[1] = training[0]                         # a duplicate within training: not a cross-set pair
    production[4] = training[7] + 5                   # brighter copy
    production[11] = np.asarray(Image.fromarray(training[19]).resize((40, 40)).resize((48, 48)))   # resized copy
    production[15] = training[0]                      # copies two training images at once
    pairs = near_duplicates_between(perceptual_hashes(training), perceptual_hashes(production), 16)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 15), (1, 15), (7, 4), (19, 11)]
    assert len(np.unique(pairs[:, 1])) == 3
    none = near_duplicates_between(perceptual_hashes(training[:0]), perceptual_hashes(production), 16)
    assert none.shape == (0, 2)


def logged_setup(tmp_path: Path, data_section: dict) -> tuple[MlflowClient, str]:
    """A trial run that logged only its setup (params, data counts, data_report.json), as run_trial does first."""
    cfg = from_dict({"data": {"cache_dir": str(tmp_path / "cache"), **data_section}, "model": {"image_size": 16},
                     "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "setup"}})
    run = TrialRun.open(cfg, None)
    run.log_setup(cfg, prepare_data(cfg.data, 16))
    run.finish("finished")
    return run.client, run.run_id


def write_folder(root: Path, subjects: bool) -> Path:
    """Two classes of 30 images; with subjects, a metadata.csv giving every image one of 10 subjects."""
    rows = ["path,subject"]
    for c, colour in (("anger", 200), ("happiness", 20)):
        (root / c).mkdir(parents=True)
        for i in range(30):
            Image.new("RGB", (40 + i, 40), (colour, i * 3, 80)).save(root / c / f"{i}.png")
            rows.append(f"{c}/{i}.png,p{i % 10}")
    if subjects:
        (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("subjects, mode", [(True, "group"), (False, "stratified")])
def test_split_mode_is_tagged_on_the_trial_run_and_in_its_data_report(tmp_path, subjects, mode):
    root = write_folder(tmp_path / "faces", subjects)
    client, run_id = logged_setup(tmp_path, {"source": "imagefolder", "root": str(root),
                                             "classes": ["anger", "happiness"]})
    run = client.get_run(run_id)
    assert run.data.tags["data_split_mode"] == mode
    report = json.loads(Path(client.download_artifacts(run_id, "data_report.json", str(tmp_path))).read_text())
    assert report["split_mode"] == mode and report["digest"] == run.data.tags["data_digest"]
    assert report["warnings"] == [] and run.data.metrics["data/warnings"] == 0
    subjects_logged = {k: v for k, v in run.data.metrics.items() if k.startswith("data/subjects_")}
    assert sum(subjects_logged.values()) == (10 if subjects else 0)


def test_data_line_shows_the_split_mode_and_every_warning(tmp_path):
    root = write_folder(tmp_path / "faces", True)
    rows = (root / "metadata.csv").read_text().splitlines()
    (root / "metadata.csv").write_text("\n".join(rows[:51]) + "\n")    # subjects for 50 of the 60 images
    cfg = from_dict({"data": {"source": "imagefolder", "root": str(root), "classes": ["anger", "happiness"],
                              "cache_dir": str(tmp_path / "cache")}})
    line = data_line(prepare_data(cfg.data, 16).report, 16)
    assert line.startswith("data: 60 images (train 42, val 12, test 6) at 16 px; split mode: stratified; skipped 0")
    assert line.endswith("; warning: subjects for 50 of 60 images: split stratified by class, not by subject; "
                         "frames of one subject may sit in two splits (give every image a subject in metadata.csv)")


# --- one tiny sweep, its production run and its report ----------------------------------------

@pytest.fixture(scope="module")
def reported(tmp_path_factory, tiny_vit):
    """A one-trial, one-epoch sweep, a production run of its model on the same images, and the report."""
    tmp = tmp_path_factory.mktemp("leakage")
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    spec = spec_from_dict({
        "name": "leak", "data": {"source": "synthetic", "synthetic": {"n_images": 120, "draw_size": 32},
                                 "cache_dir": str(tmp / "cache")},
        "models": {"vit": tiny_vit},
        "defaults": {"model": "vit", "train": {"epochs": 1, "batch_size": 32, "checkpoint_dir": str(tmp / "ck"),
                                               "num_threads": 2}},
        "experiments": {"once": {"grid": {"optim.lr": [1.0e-3]}}}})
    parent = open_parent_run(client, spec.name)
    (trial,) = spec.plan
    tracking = TrackingConfig(uri=client.tracking_uri, experiment=spec.name, run_name=trial.name,
                              parent_run_id=parent, tags=child_run_tags(spec.name, "once", 0), log_model=False)
    run_id = run_trial(dataclasses.replace(trial.config, tracking=tracking)).run_id
    production_data = prepare_data(trial.config.data, 32)       # production = the training images again
    training = run_training_data(client, client.get_run(run_id), 32)
    duplicates = duplicates_against_training(training, production_data, 16)
    production = client.create_run(ensure_experiment(client, "leak-production"), run_name="production",
                                   tags={"role": "production", "model_version": "1", "source_run_id": run_id})
    for key, value in {**duplicates, "production_align_failure_rate": 0.05,
                       "data/usable": float(len(production_data.labels))}.items():
        client.log_metric(production.info.run_id, key, value)
    client.set_terminated(production.info.run_id)
    path = write_report(spec, client, tmp / "report")
    saved = Path(client.download_artifacts(run_id, "data_report.json", str(tmp))).read_text()
    return path, json.loads(saved), duplicates, production_data


def test_training_images_seen_again_in_production_are_counted_as_duplicates(reported):
    _, _, duplicates, data = reported
    n_train = int((data.splits == TRAIN).sum())
    # Every training image matches itself; val/test images may add near-copies of training ones.
    assert duplicates["production_duplicates_train_images"] >= n_train
    assert duplicates["production_duplicates_train"] >= duplicates["production_duplicates_train_images"]


def test_report_data_section_shows_splits_mode_warnings_and_training_beside_production(reported):
    path, data_report, duplicates, _ = reported
    text = path.read_text()
    section = text[text.index("## Data"):text.index("\n## ", text.index("## Data") + 1)]
    assert f"data digest `{data_report['digest']}`" in section and "Every finished trial trained on the same" in section
    assert "Split mode: **group** (whole subjects in one split" in section
    for warning in data_report["warnings"]:
        assert f"> **Warning:** {warning}" in section
    with (path.parent / "data_splits.csv").open(newline="") as f:
        rows = {r["split"]: r for r in csv.DictReader(f)}
    for split, counts in data_report["per_split"].items():
        assert int(rows[split]["images"]) == sum(counts.values())
        assert int(rows[split]["subjects"]) == data_report["subjects"][split]
        assert float(rows[split]["align_failure_rate"]) == 0.0                  # synthetic faces: align none
    pairs = sum(data_report["duplicates"].values())
    assert sum(int(r["duplicate_pairs"]) for r in rows.values()) == 2 * pairs   # each pair counts for both splits
    with (path.parent / "data_production.csv").open(newline="") as f:
        production = {r["metric"]: r for r in csv.DictReader(f)}
    assert float(production["align_failure_rate"]["training"]) == 0.0
    assert float(production["align_failure_rate"]["production"]) == pytest.approx(5.0)
    assert float(production["production_duplicates_train"]["production"]) == duplicates["production_duplicates_train"]
    assert "| alignment failure rate | 0.0% | 5.0% |" in section
    assert f"| images | {data_report['usable']} | {data_report['usable']} |" in section   # production = the same images


def test_data_section_names_every_digest_and_leaves_unknown_counts_blank():
    from orchestrator.results.report.cells import Trial
    from orchestrator.results.report.data_section import mode_line, provenance_line, split_table

    trial = Trial("r1", "vit-s0", "finished", ("baseline",), "h", {}, {})
    line = provenance_line(trial, {"digest": "aaa"}, [{"digest": "aaa"}, {"digest": "bbb"}])
    assert line.startswith("The finished trials trained on 2 prepared datasets (digests aaa, bbb")
    assert line.endswith("shown: trial `vit-s0`, data digest `aaa`.")
    assert mode_line("") == "Split mode: not recorded (the trials predate `data_split_mode`)."
    # A report from before per-split counts, on a dataset without subjects: '—', not 0.
    table = split_table({"per_split": {"train": {"a": 7}, "val": {"a": 2}, "test": {"a": 1}},
                         "subjects": {"train": 0, "val": 0, "test": 0}, "duplicates": {"train-val": 1}})
    assert table.rows[0] == ["train", "7", "—", "1", "—"] and table.rows[2] == ["test", "1", "—", "0", "—"]
