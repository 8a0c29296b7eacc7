"""List an image-folder dataset (root/<class>/**/*) and map its labels onto the spec's classes."""
from __future__ import annotations

import csv
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from trainers.config import METADATA_FILE

CLASS_ALIASES: dict[str, str] = {
    "angry": "anger", "anger": "anger",
    "disgusted": "disgust", "disgust": "disgust",
    "fearful": "fear", "fear": "fear", "scared": "fear",
    "happy": "happiness", "happiness": "happiness", "joy": "happiness",
    "sad": "sadness", "sadness": "sadness",
    "surprised": "surprise", "surprise": "surprise", "suprise": "surprise",  # "suprise" is a real folder name in public sets
    "neutral": "neutral",
    "contempt": "contempt",
}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True, slots=True)
class Sample:
    """One listed image: absolute path, class index, optional subject and metadata attributes.

    The path is a str, absolute and normalised: a Path object costs ~4x its memory, for every file listed.

    Importers may add the dataset's own split ("train", "val" or "test") and a
    face box (x, y, width, height in the file's pixels) to crop to before alignment.
    """

    path: str
    label: int
    subject: str | None = None
    attrs: tuple[tuple[str, str], ...] = ()
    split: str | None = None
    box: tuple[int, int, int, int] | None = None


@dataclass
class Listing:
    """What a dataset folder holds: usable samples plus what was dropped or skipped, with counts."""

    samples: list[Sample]
    dropped: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)


def canonical_class(name: str, classes: tuple[str, ...]) -> str | None:
    """Return the member of ``classes`` that a folder or label name means, or None if it means none."""
    key = _canonical_key(name)
    for cls in classes:
        if cls.casefold().strip() == name.casefold().strip():
            return cls
    # Compare canonical forms on both sides so a spec that itself uses an alias
    # ("angry") still accepts an "Anger/" folder.
    for cls in classes:
        if _canonical_key(cls) == key:
            return cls
    return None


def list_imagefolder(root: Path, classes: tuple[str, ...]) -> Listing:
    """List root/<class folder>/**/<image> as samples labelled by index into ``classes``."""
    root = _checked_root(root)
    listing = Listing(samples=[])
    for folder in sorted(_class_folders(root)):
        cls = canonical_class(folder.name, classes)
        images, unreadable = _walk_images(folder)
        if cls is None:
            listing.dropped[folder.name] += len(images)
            continue
        listing.skipped["unreadable"] += unreadable
        label = classes.index(cls)
        listing.samples.extend(Sample(path=path, label=label) for path in images)
    listing.skipped = +listing.skipped  # drop zero counts so an all-clean listing reports nothing
    listing.samples = _attach_metadata(root, listing.samples)
    listing.samples.sort(key=path_order)
    return listing


def path_order(sample: Sample) -> str:
    """Sort key: the order Path objects of the samples' paths compare in (part by part). NUL is below every
    character a name can hold, so "a/x" comes before "a-b/x" as the parts "a" < "a-b" say (a plain string
    sort would put "-" first); the rows of every set cached before paths were strings keep their order."""
    return sample.path.replace("/", "\0")


def _canonical_key(name: str) -> str:
    """Casefolded, stripped name translated through CLASS_ALIASES where it is an alias."""
    key = name.casefold().strip()
    return CLASS_ALIASES.get(key, key)


def _checked_root(root: Path) -> Path:
    """Absolute root, or a FileNotFoundError / NotADirectoryError telling the user what to set."""
    root = Path(os.path.abspath(root))
    hint = "set data.root to the folder holding one sub-folder per class"
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder; {hint}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: is a file, not a folder; {hint}")
    return root


def _class_folders(root: Path) -> list[Path]:
    """Visible sub-folders of root (symlinked class folders count: a user may link their data in)."""
    return [entry for entry in root.iterdir()
            if not entry.name.startswith(".") and entry.is_dir() and not _links_up(entry, root)]


def _links_up(entry: Path, root: Path) -> bool:
    """Whether entry is a link to root or above it: walking it would list every class again under its name."""
    return entry.is_symlink() and root.resolve().is_relative_to(entry.resolve())


def _walk_images(folder: Path) -> tuple[list[str], int]:
    """Image files under folder (recursively, not into symlinked dirs) and how many were unreadable."""
    images: list[str] = []
    unreadable = 0

    def count_unreadable_dir(_: OSError) -> None:
        nonlocal unreadable
        unreadable += 1

    # followlinks=False: a link back up the tree (or to another class) must not loop or double-count.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False, onerror=count_unreadable_dir):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(dirpath, name)     # normalised: the walk starts from an absolute, normalised folder
            if _resolves(path):
                images.append(path)
            else:
                unreadable += 1
    return images, unreadable


def _resolves(path: str) -> bool:
    """Whether path (following symlinks) can be stat'ed: dangling links and link loops cannot."""
    try:
        os.stat(path)
    except OSError:
        return False
    return True


def _attach_metadata(root: Path, samples: list[Sample]) -> list[Sample]:
    """The samples (the list itself) with subject and attributes from root/metadata.csv, when that file
    exists."""
    rows = _read_metadata(root)
    if not rows:
        return samples
    for i, sample in enumerate(samples):     # replaced in place: one Sample per file alive at a time, not two
        row = rows.pop(sample.path, None)
        if row is not None:
            samples[i] = Sample(path=sample.path, label=sample.label, subject=row[0], attrs=row[1])
    return samples


def _read_metadata(root: Path) -> dict[str, tuple[str | None, tuple[tuple[str, str], ...]]]:
    """(subject, sorted attribute pairs) per row of root/metadata.csv, keyed by absolute image path; {} when
    there is no such file. Values are interned and each distinct attribute tuple is one object: a dataset of
    10^5 images has a few combinations, and repeats its subjects."""
    csv_path = root / METADATA_FILE
    if not csv_path.is_file():
        return {}
    # utf-8-sig: a spreadsheet-saved CSV starts with a BOM that would otherwise rename the first column.
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        if "path" not in columns:
            found = ", ".join(columns) if columns else "(none)"
            raise ValueError(
                f"{csv_path}: needs a 'path' column (relative image paths); found columns: {found}"
            )
        rows, shared = {}, {}
        for raw in reader:
            row = {sys.intern((key or "").strip()): sys.intern((value or "").strip())
                   for key, value in raw.items() if key is not None}
            path = row.pop("path")
            attrs = tuple(sorted((name, value) for name, value in row.items() if name != "subject"))
            rows[os.path.normpath(os.path.join(root, path))] = (row.get("subject") or None,
                                                                shared.setdefault(attrs, attrs))
    return rows
