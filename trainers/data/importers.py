"""Importers for the public FER datasets, each in its own on-disk format, onto the spec's classes.

Every importer returns a Listing like the image-folder one: samples carry the
dataset's own split ("train" / "val" / "test", used with
``data.use_dataset_split``) and, for AffectNet, the annotated face box.
Labels outside the spec's classes (neutral, contempt, AffectNet's none /
uncertain / no-face) are dropped and counted by name; rows that cannot be
read are skipped and counted by reason.

fer2013 stores pixels in its CSV. They are written once as 48 x 48 PNGs
under ``<cache_dir>/imported/`` so that they take the same path as every
other image: content digest, aligned cache, skip counting, leakage audit.
That costs ~35,900 small files (about 70 MB) once, instead of a second,
in-memory code path that every later stage would have to know about.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from trainers.data.cache import atomic_write_bytes, short_hash
from trainers.data.sources import Listing, Sample, canonical_class, path_order

FER2013_LABELS = {0: "angry", 1: "disgust", 2: "fear", 3: "happy", 4: "sad", 5: "surprise", 6: "neutral"}
# PublicTest was the challenge's public leaderboard set, PrivateTest its final test.
FER2013_SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FER2013_SIDE = 48

RAFDB_LABELS = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger", 7: "neutral"}
RAFDB_SPLITS = {"train": "train", "test": "test"}       # from the file-name prefix: train_00001.jpg

AFFECTNET_LABELS = {0: "neutral", 1: "happy", 2: "sad", 3: "surprise", 4: "fear", 5: "disgust", 6: "anger",
                    7: "contempt", 8: "none", 9: "uncertain", 10: "no_face"}
# AffectNet's test set is not public; its validation set is what papers report as test.
AFFECTNET_SPLITS = {"training.csv": "train", "validation.csv": "test"}
AFFECTNET_LISTS = "Manually_Annotated_file_lists"
AFFECTNET_IMAGES = "Manually_Annotated_Images"


def add_sample(listing: Listing, classes: tuple[str, ...], label_name: str, **sample) -> None:
    """Append a sample labelled ``label_name`` if it means one of ``classes``; otherwise count it dropped."""
    cls = canonical_class(label_name, classes)
    if cls is None:
        listing.dropped[label_name] += 1
    else:
        listing.samples.append(Sample(label=classes.index(cls), **{**sample, "path": str(sample["path"])}))


# --- fer2013 --------------------------------------------------------------------------

def list_fer2013(root: Path, classes: tuple[str, ...], cache_dir: Path) -> Listing:
    """fer2013.csv (emotion, pixels, Usage): 48 x 48 grey faces, written once as PNGs into the cache."""
    folder = fer2013_images(_fer2013_csv(root), cache_dir)
    index = json.loads((folder / "index.json").read_text())
    listing = Listing(samples=[])
    listing.skipped.update(index["skipped"])
    for name, emotion, usage in index["rows"]:
        add_sample(listing, classes, FER2013_LABELS[emotion], path=folder / name,
                   split=FER2013_SPLITS.get(usage))
    return listing


def fer2013_images(csv_path: Path, cache_dir: Path) -> Path:
    """The folder of PNGs for this CSV (by path, size and mtime), written on first use."""
    st = csv_path.stat()
    key = short_hash([str(csv_path.resolve()), st.st_size, st.st_mtime_ns])
    folder = cache_dir / "imported" / f"fer2013-{key}"
    if (folder / "index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-fer2013-"))
    try:
        _write_fer2013(csv_path, tmp)
        os.replace(tmp, folder)      # whole folder at once: a reader never sees half an import
    except OSError:
        if not (folder / "index.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # left over only when another process won the race
    return folder


def _fer2013_csv(root: Path) -> Path:
    for path in (root / "fer2013.csv", root / "fer2013" / "fer2013.csv"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{root}: no fer2013.csv here; set data.root to the folder holding fer2013.csv "
                            "(columns emotion, pixels, Usage)")


def _write_fer2013(csv_path: Path, folder: Path) -> None:
    rows, skipped = [], {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"emotion", "pixels"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: needs columns emotion, pixels (and Usage); "
                             f"missing {', '.join(sorted(missing))}")
        for number, row in enumerate(reader):
            pixels = _fer2013_pixels(row)
            if pixels is None:
                skipped["malformed_row"] = skipped.get("malformed_row", 0) + 1
                continue
            name = f"{number:05d}.png"
            Image.fromarray(pixels).save(folder / name)
            rows.append([name, int(row["emotion"]), (row.get("Usage") or "").strip()])
    atomic_write_bytes(folder / "index.json", json.dumps({"rows": rows, "skipped": skipped}).encode())


def _fer2013_pixels(row: dict) -> np.ndarray | None:
    """The row's 48 x 48 uint8 image; None when the label or pixels are not what fer2013 holds."""
    try:
        emotion = int(row["emotion"])
        values = np.array((row["pixels"] or "").split(), dtype=np.int64)
    except (TypeError, ValueError):
        return None
    if emotion not in FER2013_LABELS or values.size != FER2013_SIDE ** 2 or values.min() < 0 or values.max() > 255:
        return None
    return values.astype(np.uint8).reshape(FER2013_SIDE, FER2013_SIDE)


# --- RAF-DB (basic) -------------------------------------------------------------------

def list_rafdb(root: Path, classes: tuple[str, ...], cache_dir: Path) -> Listing:
    """RAF-DB basic: EmoLabel/list_patition_label.txt ('train_00001.jpg 5'), Image/aligned/<stem>_aligned.jpg."""
    labels = root / "EmoLabel" / "list_patition_label.txt"
    if not labels.is_file():
        raise FileNotFoundError(f"{root}: no EmoLabel/list_patition_label.txt; set data.root to the RAF-DB "
                                "basic folder (holding EmoLabel/ and Image/aligned/)")
    listing = Listing(samples=[])
    for line in labels.read_text(encoding="utf-8-sig").splitlines():
        parts = line.split()
        if not parts:
            continue
        code = int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else None
        if code not in RAFDB_LABELS:
            listing.skipped["malformed_row"] += 1
            continue
        path = _rafdb_image(root, parts[0])
        if path is None and canonical_class(RAFDB_LABELS[code], classes) is not None:
            listing.skipped["missing"] += 1
            continue
        add_sample(listing, classes, RAFDB_LABELS[code], path=path,
                   split=RAFDB_SPLITS.get(parts[0].split("_", 1)[0]))
    listing.samples.sort(key=path_order)
    return listing


def _rafdb_image(root: Path, name: str) -> Path | None:
    """The aligned 100 x 100 image the label names, else the original; None when neither exists."""
    for path in (root / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg", root / "Image" / "original" / name):
        if path.is_file():
            return path
    return None


# --- AffectNet ------------------------------------------------------------------------

def list_affectnet(root: Path, classes: tuple[str, ...], cache_dir: Path) -> Listing:
    """AffectNet's training.csv / validation.csv with a face box per image, images under Manually_Annotated_Images."""
    lists = [p for name in AFFECTNET_SPLITS for p in (root / name, root / AFFECTNET_LISTS / name) if p.is_file()]
    if not lists:
        raise FileNotFoundError(f"{root}: no training.csv or validation.csv (here or in {AFFECTNET_LISTS}/); "
                                "set data.root to the AffectNet folder")
    images = root / AFFECTNET_IMAGES if (root / AFFECTNET_IMAGES).is_dir() else root
    listing = Listing(samples=[])
    for csv_path in lists:
        split = AFFECTNET_SPLITS[csv_path.name]
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                _add_affectnet_row(listing, classes, images, row, split)
    listing.samples.sort(key=path_order)
    return listing


def _add_affectnet_row(listing: Listing, classes: tuple[str, ...], images: Path, row: dict, split: str) -> None:
    try:
        code = int(float(row["expression"]))
        relative = row["subDirectory_filePath"].strip()
        box = tuple(int(round(float(row[k]))) for k in ("face_x", "face_y", "face_width", "face_height"))
    except (KeyError, TypeError, ValueError):
        listing.skipped["malformed_row"] += 1
        return
    if code not in AFFECTNET_LABELS or not relative:
        listing.skipped["malformed_row"] += 1
        return
    path = images.joinpath(*relative.replace("\\", "/").split("/"))
    if canonical_class(AFFECTNET_LABELS[code], classes) is not None and not path.is_file():
        listing.skipped["missing"] += 1
        return
    add_sample(listing, classes, AFFECTNET_LABELS[code], path=path, split=split,
               box=box if box[2] > 0 and box[3] > 0 else None)


IMPORTERS: dict[str, Callable[[Path, tuple[str, ...], Path], Listing]] = {
    "fer2013": list_fer2013, "rafdb": list_rafdb, "affectnet": list_affectnet,
}
