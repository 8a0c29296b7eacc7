"""From a DataConfig to aligned uint8 images, labels and splits, through the content-addressed cache."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainers.config import DataConfig
from trainers.data.cache import AlignedStore, DigestIndex, atomic_write_bytes, save_array, short_hash
from trainers.data.images import ImageSkipped, centre_square, decode_image
from trainers.data.sources import Listing, Sample, list_imagefolder
from trainers.data.split import SPLIT_NAMES, assign_splits
from trainers.data.synthetic import write_synthetic
from trainers.progress import progress


class DataError(ValueError):
    """The dataset cannot be used as configured; the message says what to do."""


@dataclass
class DataReport:
    """What preparation found: counts a user reads in the output and in MLflow."""
    listed: int = 0
    usable: int = 0
    decoded: int = 0                                   # images decoded this time (0 on a cache hit)
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> files
    dropped: dict[str, int] = field(default_factory=dict)   # label outside the class list -> images
    per_split: dict[str, dict[str, int]] = field(default_factory=dict)   # split -> class -> images

    def metrics(self) -> dict[str, float]:
        """Flat numeric counts for logging."""
        out = {"data_listed": self.listed, "data_usable": self.usable}
        out.update({f"data_skipped_{k}": v for k, v in self.skipped.items()})
        out.update({f"data_dropped_{k}": v for k, v in self.dropped.items()})
        out.update({f"data_n_{s}": sum(c.values()) for s, c in self.per_split.items()})
        return {metric_key(k): float(v) for k, v in out.items()}


def metric_key(name: str) -> str:
    """A folder name made safe as an MLflow metric key (letters, digits, _ - . / only)."""
    return re.sub(r"[^A-Za-z0-9_\-./]", "_", name)


@dataclass
class PreparedData:
    """Every usable image once, aligned to the model's input size, with labels and split ids."""
    images: np.ndarray          # N x S x S x 3 uint8
    labels: np.ndarray          # N int64, index into classes
    splits: np.ndarray          # N int8: 0 train, 1 val, 2 test
    classes: tuple[str, ...]
    paths: list[str]            # relative to the dataset root
    subjects: list[str | None]
    attrs: list[dict[str, str]]
    digest: str                 # content + settings + split: names this exact dataset
    root: str
    report: DataReport

    def indices(self, split: int) -> np.ndarray:
        """Sample indices of one split."""
        return np.flatnonzero(self.splits == split)


def dataset_root(cfg: DataConfig) -> Path:
    """The folder the images come from (drawing the synthetic set first if needed)."""
    if cfg.source == "synthetic":
        return write_synthetic(cfg.cache_dir, cfg.synthetic, cfg.classes)
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: folder '{root}' does not exist; "
                        "set data.root to the folder holding one sub-folder per class")
    return root


def align_image(path: Path, image_size: int) -> np.ndarray:
    """Decode and crop one image to the model's input (align: none = centre square)."""
    return centre_square(decode_image(path, max_side=max(4 * image_size, 256)), image_size)


def prepare_data(cfg: DataConfig, image_size: int) -> PreparedData:
    """Decode and align every image once (cached), then split deterministically."""
    root = dataset_root(cfg)
    try:
        listing = list_imagefolder(root, cfg.classes)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(err)) from None
    cache_dir = Path(cfg.cache_dir)
    store = AlignedStore(cache_dir, {"align": cfg.align, "size": image_size})
    index = DigestIndex(cache_dir, root)
    samples, digests, skipped = _digest_samples(listing, index)
    index.save()
    set_key = short_hash(digests)
    images, keep, decoded, reasons = _load_aligned(store, set_key, samples, digests, image_size)
    skipped.update(reasons)
    samples = [s for s, k in zip(samples, keep) if k]
    return _finish(cfg, root, listing, samples, images, skipped, decoded, f"{store.root.name}/{set_key}")


def _digest_samples(listing: Listing, index: DigestIndex) -> tuple[list[Sample], list[str], Counter]:
    skipped: Counter = Counter(listing.skipped)
    samples, digests = [], []
    for sample in listing.samples:
        digest = index.digest(sample.path)
        if digest is None:
            skipped["unreadable"] += 1
            continue
        samples.append(sample)
        digests.append(digest)
    return samples, digests, skipped


def _load_aligned(store: AlignedStore, set_key: str, samples: list[Sample], digests: list[str],
                  image_size: int) -> tuple[np.ndarray, list[bool], int, Counter]:
    """Stacked images for usable samples; the whole set comes from one file when seen before."""
    set_array, set_manifest = store.set_paths(set_key)
    if set_array.exists() and set_manifest.exists():
        manifest = json.loads(set_manifest.read_text())
        images = np.load(set_array, mmap_mode="r", allow_pickle=False)
        return images, manifest["keep"], 0, Counter(manifest["reasons"])

    def one(i: int):
        cached = store.get(digests[i])
        if cached is not None:
            return cached, False
        try:
            array = align_image(samples[i].path, image_size)
        except ImageSkipped as skip:
            store.put_skip(digests[i], skip.reason)
            return skip.reason, True
        store.put(digests[i], array)
        return array, True

    arrays, keep, reasons, decoded = [], [], Counter(), 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = pool.map(one, range(len(samples)))
        for result, fresh in progress(results, len(samples), "decoding images"):
            decoded += fresh
            if isinstance(result, str):
                reasons[result] += 1
                keep.append(False)
            else:
                arrays.append(result)
                keep.append(True)
    stacked = np.stack(arrays) if arrays else np.zeros((0, image_size, image_size, 3), np.uint8)
    save_array(set_array, stacked)
    atomic_write_bytes(set_manifest, json.dumps({"keep": keep, "reasons": reasons}).encode())
    return stacked, keep, decoded, reasons


def _finish(cfg: DataConfig, root: Path, listing: Listing, samples: list[Sample], images: np.ndarray,
            skipped: Counter, decoded: int, content_key: str) -> PreparedData:
    labels = np.array([s.label for s in samples], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(cfg.classes)) if len(labels) else np.zeros(len(cfg.classes), int)
    if not len(samples):
        raise DataError(f"no usable image found under '{root}' for classes {', '.join(cfg.classes)}; "
                        "check data.root and data.classes (one sub-folder per class)")
    empty = [c for c, n in zip(cfg.classes, counts) if n == 0]
    if empty:
        raise DataError(f"class '{empty[0]}' has no usable image under '{root}'; "
                        "add images for it or remove it from data.classes")
    subjects = [s.subject for s in samples]
    splits = assign_splits(labels, subjects, cfg.split, cfg.split_seed)
    report = DataReport(
        listed=len(listing.samples) + sum(listing.skipped.values()),
        usable=len(samples), decoded=decoded,
        skipped=dict(sorted(skipped.items())), dropped=dict(sorted(listing.dropped.items())),
        per_split={name: {c: int(((splits == s) & (labels == k)).sum()) for k, c in enumerate(cfg.classes)}
                   for s, name in enumerate(SPLIT_NAMES)})
    paths = [_rel(s.path, root) for s in samples]
    digest = short_hash({"content": content_key, "paths": paths, "labels": labels.tolist(),
                         "split": splits.tolist()})
    return PreparedData(images=images, labels=labels, splits=splits, classes=tuple(cfg.classes),
                        paths=paths, subjects=subjects,
                        attrs=[dict(s.attrs) for s in samples], digest=digest, root=str(root),
                        report=report)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
