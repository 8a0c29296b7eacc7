"""A whole sweep on an image folder that mixes good images with every kind of bad input.

The sweep must finish, count every skipped file by reason (in its output and on the
trial's MLflow run), convert odd modes instead of skipping them, and say plainly what
happened to folders it could not use.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from orchestrator.results.runs import child_runs, find_parent_run

CLASSES = ("anger", "disgust", "fear", "happiness", "sadness", "surprise")
# Folder names as public datasets spell them; each maps onto one of CLASSES.
FOLDERS = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happiness", "sad": "sadness",
           "surprise": "surprise"}
GOOD_PER_CLASS = 12
UNKNOWN = "không rõ (unsorted)"     # a folder that is none of the spec's classes
UNKNOWN_IMAGES = 3


def write_good(path: Path, seed: int) -> None:
    """A noise image 32 to 48 px a side (noise: no two are near-duplicates across splits)."""
    rng = np.random.default_rng(seed)
    side = int(rng.integers(32, 49))
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming width x height (CRC recomputed so the header is valid)."""
    fields = struct.pack(">II", width, height) + png[24:29]
    chunk = b"IHDR" + fields
    return png[:12] + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF) + png[33:]


def write_bad_dataset(root: Path) -> None:
    """Good images in alias-named class folders, plus one of each kind of bad input.

    Used as is: 72 good images, an RGBA PNG, a 16-bit PNG, a CMYK JPEG, a 10,000 x 10,000 PNG.
    Skipped: truncated 1, empty 1, not_an_image 1, too_large 1, unreadable 2 (dangling link, link loop).
    Dropped: 3 images in an unknown folder, 0 in an empty one. Not counted: directory link loops.
    """
    for k, folder in enumerate(FOLDERS):
        for i in range(GOOD_PER_CLASS):
            # Unicode and spaces in sub-folder and file names: half of each class sits in one.
            sub = f"Urlaub 2019 – Zoë/café {i} 😀.png" if i % 2 else f"{folder} {i:02d}.png"
            write_good(root / folder / sub, seed=100 * k + i)
    for i in range(UNKNOWN_IMAGES):
        write_good(root / UNKNOWN / f"{i}.png", seed=900 + i)
    (root / "neutral").mkdir()                       # empty folder of a class the spec does not have

    cut = root / "angry" / "cut off.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:600])          # a download stopped part way
    (root / "angry" / "zero.jpg").touch()
    (root / "happy" / "notes.jpg").write_text("not a photo\n", encoding="utf-8")
    (root / "happy" / "readme.txt").write_text("ignored: not an image suffix\n", encoding="utf-8")
    small = root / "surprise" / "bomb.png"
    Image.new("L", (8, 8)).save(small)
    small.write_bytes(with_png_size(small.read_bytes(), 20_000, 20_000))   # claims 400 MP > 250 MP

    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (200, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(root / "fear" / "alpha.png")
    ramp = np.linspace(0, 65535, 40 * 40).astype("<u2").reshape(40, 40)
    Image.frombytes("I;16", (40, 40), ramp.tobytes()).save(root / "sad" / "deep 16-bit.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(root / "disgust" / "print cmyk.jpg", "JPEG")
    # 100 MP: over Pillow's default bomb warning (~89 MP), under our 250 MP limit, so it is shrunk and used.
    Image.new("L", (10_000, 10_000), 90).save(root / "surprise" / "huge flat.png")

    os.symlink(root / "fear" / "deleted.jpg", root / "fear" / "dangling.jpg")
    os.symlink(root / "fear" / "self.jpg", root / "fear" / "self.jpg")
    os.symlink(root / "sad", root / "sad" / "again")                          # sad/again -> sad
    os.symlink(root / "happy", root / "happy" / "Urlaub 2019 – Zoë" / "up")    # -> its parent
    os.symlink(root, root / "loop")                                           # a folder of root -> root


def write_imagefolder_spec(folder: Path, name: str, root: Path, tiny_vit: dict) -> Path:
    """One tiny-ViT trial, one epoch, on the image folder at root."""
    spec = {"name": name, "data": {"source": "imagefolder", "root": str(root), "classes": list(CLASSES)},
            "models": {"vit": tiny_vit},
            "defaults": {"model": "vit", "optim": {"name": "adam", "lr": 1e-3},
                         "train": {"epochs": 1, "batch_size": 32}},
            "experiments": {"once": {"grid": {"optim.lr": [1e-3]}}}, "execution": {"jobs": 1, "max_retries": 1}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def data_report(client, folder: Path, run_id: str) -> dict:
    """The trial's data_report.json, read back from the MLflow store into folder."""
    local = client.download_artifacts(run_id, "data_report.json", str(folder / "downloaded"))
    return json.loads(Path(local).read_text(encoding="utf-8"))


def test_sweep_on_bad_images_finishes_and_counts_every_skip_by_reason(in_tmp, orchestrate, store, tiny_vit):
    write_bad_dataset(in_tmp / "faces")
    done = orchestrate(in_tmp, "sweep", str(write_imagefolder_spec(in_tmp, "baddata", in_tmp / "faces", tiny_vit)),
                       timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished 1" in done.stdout

    # One line tells the user what was used, skipped by reason, and dropped by folder.
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("data:")]
    assert line.startswith("data: 76 images (train ")
    assert "skipped 6 (empty 1, not_an_image 1, too_large 1, truncated 1, unreadable 2)" in line
    assert f"dropped 3 not in data.classes ({UNKNOWN} 3, neutral 0)" in line

    (run,) = child_runs(store(in_tmp), "baddata")
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    metrics = run.data.metrics
    assert {k: v for k, v in metrics.items() if k.startswith("data/skipped_")} == {
        "data/skipped_empty": 1, "data/skipped_not_an_image": 1, "data/skipped_too_large": 1,
        "data/skipped_truncated": 1, "data/skipped_unreadable": 2}
    # Folder names become metric keys with anything MLflow refuses replaced by '_'.
    assert {k: v for k, v in metrics.items() if k.startswith("data/dropped_")} == {
        "data/dropped_kh_ng_r___unsorted_": UNKNOWN_IMAGES, "data/dropped_neutral": 0}
    assert metrics["data/listed"] == 82 and metrics["data/usable"] == 76      # 76 used + 6 skipped
    assert metrics["data/n_train"] + metrics["data/n_val"] + metrics["data/n_test"] == 76

    report = data_report(store(in_tmp), in_tmp, run.info.run_id)
    assert report["skipped"] == {"empty": 1, "not_an_image": 1, "too_large": 1, "truncated": 1, "unreadable": 2}
    assert report["dropped"] == {UNKNOWN: UNKNOWN_IMAGES, "neutral": 0}     # the root -> root link is not a class
    per_class = {c: sum(split[c] for split in report["per_split"].values()) for c in CLASSES}
    # 12 good each; RGBA (fear), 16-bit (sadness), CMYK (disgust) and the 10,000 px PNG (surprise) are used.
    assert per_class == {"anger": 12, "disgust": 13, "fear": 13, "happiness": 12, "sadness": 13, "surprise": 13}
    assert find_parent_run(store(in_tmp), "baddata").info.status == "FINISHED"


def test_empty_class_folder_stops_the_sweep_before_any_trial_with_one_line_saying_what_to_do(in_tmp, orchestrate,
                                                                                             store, tiny_vit):
    root = in_tmp / "faces"
    for k, folder in enumerate(FOLDERS):
        if folder != "surprise":
            for i in range(2):
                write_good(root / folder / f"{i}.png", seed=100 * k + i)
    (root / "surprise").mkdir()
    done = orchestrate(in_tmp, "sweep", str(write_imagefolder_spec(in_tmp, "emptyclass", root, tiny_vit)), timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: class 'surprise' has no usable image under '{root}'; "
        "add images for it or remove it from data.classes")
    assert "Traceback" not in done.stderr
    assert child_runs(store(in_tmp), "emptyclass") == []
    assert find_parent_run(store(in_tmp), "emptyclass").info.status == "KILLED"
