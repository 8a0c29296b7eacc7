"""From a DataConfig to aligned uint8 images, labels and splits, through the content-addressed cache."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainers.config import METADATA_FILE, DataConfig
from trainers.data.align import Aligner, build_aligner
from trainers.data.aligning import AlignedSet, AlignJob, build_set, reads_again
from trainers.data.audit import AuditResult, audit_splits, near_duplicate_pairs, perceptual_hashes
from trainers.data.balance import CLASS_COLUMN, balance_cells, balance_summary
from trainers.data.cache import (NPY_HEADER, AlignedStore, DigestIndex, atomic_write_json, npy_header,
                                 read_row_chunks, relative_posix, save_array, short_hash_of_list)
from trainers.data.images import DECODE_REASONS, READ_REASONS, ImageSkipped
from trainers.data.importers import IMPORTERS
from trainers.data.sources import Listing, Sample, list_imagefolder
from trainers.data.split import (SPLIT_NAMES, TRAIN, VAL, assign_splits, count_per_split, distinct_per_split,
                                 missing_class_warnings, partial_subjects_warning, split_mode, stratified_split)
from trainers.data.synthetic import write_synthetic
from trainers.errors import UserError

# Rows a pass over a set file (hashing, subsetting) reads at once: ~150 MB at 224 px.
HASH_ROWS = 1024


class DataError(UserError, ValueError):
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
    align_failures: int = 0                            # usable images the aligner fell back on (centre crop)
    duplicates: dict[str, int] = field(default_factory=dict)   # 'train-test' -> near-duplicate pairs across them
    duplicates_removed: int = 0                        # later copies taken out of val/test (data.dedupe)
    split_mode: str = ""                               # group, stratified or dataset (trainers/data/split.py)
    subjects: dict[str, int] = field(default_factory=dict)          # split -> distinct subjects (0: none known)
    split_align_failures: dict[str, int] = field(default_factory=dict)   # split -> alignment failures
    warnings: list[str] = field(default_factory=list)  # what may make the split's numbers misleading
    balance: dict = field(default_factory=dict)        # {by, max_factor, cells: [{values, before, after}]}; {} off

    def split_images(self) -> dict[str, int]:
        """Images per split."""
        return {s: sum(c.values()) for s, c in self.per_split.items()}

    def metrics(self) -> dict[str, float]:
        """Flat numeric counts for logging."""
        out = {"data_listed": self.listed, "data_usable": self.usable, "data_align_failures": self.align_failures,
               "data_align_failure_rate": self.align_failures / max(self.usable, 1),
               "data_duplicates_found": sum(self.duplicates.values()),
               "data_duplicates_removed": self.duplicates_removed}
        out.update({f"data_skipped_{k}": v for k, v in self.skipped.items()})
        out.update({f"data_dropped_{k}": v for k, v in self.dropped.items()})
        out.update({f"data_n_{s}": sum(c.values()) for s, c in self.per_split.items()})
        out.update({f"data_duplicates_{k.replace('-', '_')}": v for k, v in self.duplicates.items()})
        out.update({f"data_subjects_{s}": n for s, n in self.subjects.items()})
        images = self.split_images()
        out.update({f"data_align_failure_rate_{s}": n / max(images.get(s, 0), 1)
                    for s, n in self.split_align_failures.items()})
        out["data_warnings"] = len(self.warnings)
        if self.balance:
            out["data_n_train_balanced"] = sum(cell["after"] for cell in self.balance["cells"])
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
    fallback: np.ndarray | None = None   # N bool: no face found, the image is a centre crop

    def indices(self, split: int) -> np.ndarray:
        """Sample indices of one split."""
        return np.flatnonzero(self.splits == split)


ROOT_HINTS = {
    "imagefolder": "the folder holding one sub-folder per class",
    "fer2013": "the folder holding fer2013.csv",
    "rafdb": "the RAF-DB basic folder (EmoLabel/, Image/aligned/)",
    "affectnet": "the AffectNet folder (Manually_Annotated_file_lists/, Manually_Annotated_Images/)",
}


def dataset_root(cfg: DataConfig) -> Path:
    """The absolute folder the images come from (drawing the synthetic set first if needed)."""
    if cfg.source == "synthetic":
        return Path(os.path.abspath(write_synthetic(cfg.cache_dir, cfg.synthetic, cfg.classes)))
    root = Path(os.path.abspath(Path(cfg.root).expanduser()))
    if not root.is_dir():
        raise DataError(f"data.root: folder '{root}' does not exist; set data.root to {ROOT_HINTS[cfg.source]}")
    return root


def list_samples(cfg: DataConfig, root: Path) -> Listing:
    """The dataset's samples, labels mapped onto cfg.classes, through its importer."""
    try:
        if cfg.source in IMPORTERS:
            return IMPORTERS[cfg.source](root, tuple(cfg.classes), Path(cfg.cache_dir))
        return list_imagefolder(root, cfg.classes)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(err)) from None


def prepare_data(cfg: DataConfig, image_size: int, workers: int | None = None, refresh: bool = False
                 ) -> PreparedData:
    """Decode and align every image once (cached), split deterministically, audit the splits for leaks.
    workers: worker processes that align, 0 for this process (align_workers decides when None).
    refresh: decode again the images the cache holds as unusable (after a decoder upgrade, say)."""
    return _finish(cfg, _gather(cfg, image_size, workers, refresh))


def _gather(cfg: DataConfig, image_size: int, workers: int | None, refresh: bool) -> Gathered:
    """The listing's usable samples, their aligned set and its near-duplicate pairs; the per-file keys and
    digests (~130 bytes a file) are let go once the set is aligned, before the near-duplicate pass."""
    root = dataset_root(cfg)
    listing = list_samples(cfg, root)
    cache_dir = Path(cfg.cache_dir)
    aligner = build_aligner(cfg.align, image_size, cfg.align_margin)
    store = AlignedStore(cache_dir, aligner.settings)
    samples, keys, digests, skipped = _digest_samples(listing, DigestIndex(cache_dir, root), aligner)
    set_key = short_hash_of_list(keys)
    aligned = _load_aligned(AlignJob(store, aligner, samples, keys, digests, image_size, refresh), set_key, workers)
    del keys, digests
    skipped.update(aligned.reasons)
    samples = [s for s, k in zip(samples, aligned.keep) if k]
    pairs = _near_duplicates(store, set_key, aligned.images, cfg.duplicate_distance)
    return Gathered(root, listing, samples, aligned, skipped, pairs, store, set_key)


def _digest_samples(listing: Listing, index: DigestIndex, aligner: Aligner
                    ) -> tuple[list[Sample], list[str], list[str], Counter]:
    """Readable samples, their cache keys (the file's SHA-256, plus the face box when one is given) and
    digests; the rest counted by why they could not be read (not cached: they are read again next time)."""
    skipped: Counter = Counter(listing.skipped)
    samples, keys, digests = [], [], []
    for sample in listing.samples:
        try:
            digest = index.digest(sample.path)
        except ImageSkipped as skip:
            skipped[skip.reason] += 1
            continue
        samples.append(sample)
        digests.append(digest)
        keys.append(digest if sample.box is None else hashlib.sha256(
            f"{digest}:{list(sample.box)}:{aligner.box_context}".encode()).hexdigest())
    index.save()     # and let it go: its entries (~0.4 KB a file) are not needed past the digests
    return samples, keys, digests, skipped


def _load_aligned(job: AlignJob, set_key: str, workers: int | None) -> AlignedSet:
    """The set's aligned images: mapped from its file when seen before, else built (build_set)."""
    set_array, set_manifest = job.store.set_paths(set_key)
    try:
        manifest = json.loads(set_manifest.read_text())
        images = np.load(set_array, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return build_set(job, set_key, workers)
    if "keys" not in manifest:
        _adopt_legacy_set(job, set_key, manifest)
    unusable = set(manifest["reasons"])
    # A set is reused as it is unless building it again would give another one: a refresh decodes its
    # failures again; a file it could not read (or, from earlier versions, 'unreadable') is tried again,
    # and the set rebuilt, taking its other rows from itself, only when one now reads.
    if (job.refresh and unusable) or (not unusable <= set(DECODE_REASONS) and reads_again(job, manifest)):
        return build_set(job, set_key, workers)
    return AlignedSet(images, manifest["keep"], manifest.get("fallback", [False] * len(images)), 0,
                      Counter(manifest["reasons"]))


def _adopt_legacy_set(job: AlignJob, set_key: str, manifest: dict) -> None:
    """A set stacked by the per-image layout: its manifest gains its rows' keys (so other sets can take them
    from it) and the unusable keys' reasons, and the per-image copies of its images go."""
    set_array, manifest_path = job.store.set_paths(set_key)
    if _data_offset(set_array) != NPY_HEADER or len(manifest["keep"]) != len(job.keys):
        return
    keep = manifest["keep"]
    keys = [k for k, kept in zip(job.keys, keep) if kept]
    skips = {}
    for key in (k for k, kept in zip(job.keys, keep) if not kept):
        legacy = job.store.legacy_get(key)
        if legacy is not None and isinstance(legacy[0], str):
            skips[key] = legacy[0]
    manifest.update(keys=keys, skips=skips, fallback=manifest.get("fallback", [False] * len(keys)))
    atomic_write_json(manifest_path, manifest)
    job.store.forget_legacy(job.keys)
    print(f"cache: {set_array.name} now lists its images; their per-image copies were removed ({job.store.root})",
          file=sys.stderr)


def _near_duplicates(store: AlignedStore, set_key: str, images: np.ndarray, max_distance: int) -> np.ndarray:
    """Near-duplicate index pairs of a stacked set; hashes and pairs are computed once and kept beside it."""
    set_array = store.set_paths(set_key)[0]
    pairs_path = set_array.with_suffix(f".near{max_distance}.npy")
    pairs = _load_if_exists(pairs_path)
    if pairs is None:
        hashes_path = set_array.with_suffix(".phash256.npy")
        hashes = _load_if_exists(hashes_path)
        if hashes is None or len(hashes) != len(images):
            hashes = _hashes_of(set_array, images)
            save_array(hashes_path, hashes)
        pairs = near_duplicate_pairs(hashes, max_distance)
        save_array(pairs_path, pairs)
    return pairs


def _hashes_of(set_array: Path, images: np.ndarray) -> np.ndarray:
    """Perceptual hashes of a set file's rows, read a chunk at a time (a pass over a mapping would keep
    the whole set resident)."""
    if len(images) == 0:
        return perceptual_hashes(images)
    chunks = read_row_chunks(set_array, len(images), images.shape[1:], HASH_ROWS, _data_offset(set_array))
    return np.concatenate([perceptual_hashes(chunk) for chunk in chunks])


def _data_offset(path: Path) -> int:
    """Bytes before an .npy file's first row (a set of the per-image layout was written by np.save)."""
    with open(path, "rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        read(handle)
        return handle.tell()


def _load_if_exists(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, allow_pickle=False)
    except (FileNotFoundError, ValueError, OSError):
        return None


@dataclass
class Gathered:
    """Every usable sample with its aligned image, before splitting, and what was left out on the way."""
    root: Path
    listing: Listing
    samples: list[Sample]       # usable and aligned, in the stacked set's row order
    aligned: AlignedSet
    skipped: Counter            # reason -> files left out
    pairs: np.ndarray           # near-duplicate row pairs of the stacked set
    store: AlignedStore
    set_key: str                # names the stacked set in the store


@dataclass
class Rows:
    """The rows a prepared set keeps (all, or all but the val/test near-duplicates data.dedupe removed)."""
    samples: list[Sample]
    labels: np.ndarray
    splits: np.ndarray
    fallback: np.ndarray
    images: np.ndarray
    content_key: str            # names the stacked file in the store that holds these images


def _finish(cfg: DataConfig, gathered: Gathered) -> PreparedData:
    """Label, split and audit the gathered samples; drop removed duplicates; name the result by its digest."""
    samples, root, store = gathered.samples, gathered.root, gathered.store
    labels = np.array([s.label for s in samples], dtype=np.int64)
    _check_classes(cfg, gathered, labels)
    splits, mode = _assign(cfg, labels, samples)
    audit = audit_splits(gathered.pairs, splits)
    rows = Rows(samples, labels, splits, np.array(gathered.aligned.fallback, dtype=bool), gathered.aligned.images,
                gathered.set_key)
    removed = audit.later_copies if cfg.dedupe else np.zeros(0, dtype=np.int64)
    if len(removed):
        rows = _without(rows, removed, store)
    report = _report(cfg, gathered, rows, audit, len(removed))
    report.split_mode = mode
    report.warnings = _split_warnings(cfg, rows, mode)
    attrs = _attr_dicts(rows.samples)
    report.balance = _balance(cfg, rows, attrs)
    cache_dir = Path(cfg.cache_dir)
    paths = [_rel(s.path, root, cache_dir) for s in rows.samples]
    digest = data_digest(f"{store.root.name}/{rows.content_key}", paths, rows.labels, rows.splits)
    return PreparedData(images=rows.images, labels=rows.labels, splits=rows.splits, classes=tuple(cfg.classes),
                        paths=paths, subjects=[s.subject for s in rows.samples],
                        attrs=attrs, digest=digest, root=str(root),
                        report=report, fallback=rows.fallback)


def data_digest(content: str, paths: list[str], labels: np.ndarray, splits: np.ndarray) -> str:
    """short_hash({"content", "paths", "labels", "split"}), its JSON text hashed a few thousand items at a
    time: the whole text and its pieces, ~10 MB for 32,000 images, were the top of preparing's memory."""
    sha = hashlib.sha256(f'{{"content":{json.dumps(content)},"labels":['.encode())

    def feed(items, show) -> None:
        for start in range(0, len(items), 4096):
            text = ",".join(map(show, items[start:start + 4096]))
            sha.update((text if start == 0 else "," + text).encode())

    feed(labels.tolist(), str)
    sha.update(b'],"paths":[')
    feed(paths, json.dumps)
    sha.update(b'],"split":[')
    feed(splits.tolist(), str)
    sha.update(b"]}")
    return sha.hexdigest()[:12]


def _attr_dicts(samples: list[Sample]) -> list[dict[str, str]]:
    """Each sample's attributes as a dict, one dict per distinct combination (read, never written)."""
    shared: dict[tuple, dict[str, str]] = {}
    return [shared.setdefault(s.attrs, dict(s.attrs)) for s in samples]


def _balance(cfg: DataConfig, rows: Rows, attrs: list[dict[str, str]]) -> dict:
    """The training split's balance cells before and after (as the train loop will draw them); {} when off."""
    if not cfg.balance:
        return {}
    columns = sorted({name for a in attrs for name in a})
    missing = [c for c in cfg.balance_by if c != CLASS_COLUMN and c not in columns]
    if missing:
        known = ", ".join([CLASS_COLUMN, *columns])
        where = f"add the column to {METADATA_FILE} in data.root" if cfg.source == "imagefolder" else \
            f"the {cfg.source} source gives its images no other attributes"
        raise DataError(f"data.balance_by: column '{missing[0]}' is not in this dataset's metadata (columns: "
                        f"{known}); name one of those, or {where}")
    cells = balance_cells(rows.labels, attrs, tuple(cfg.classes), cfg.balance_by)
    return balance_summary(cells, np.flatnonzero(rows.splits == TRAIN), cfg.balance_max_factor)


def _without(rows: Rows, removed: np.ndarray, store: AlignedStore) -> Rows:
    """rows less the removed ones; their images as their own cached file."""
    kept = np.setdiff1d(np.arange(len(rows.samples)), removed)
    images, content_key = _subset(store, rows.content_key, rows.images, kept)
    return Rows([rows.samples[i] for i in kept], rows.labels[kept], rows.splits[kept], rows.fallback[kept], images,
                content_key)


def _check_classes(cfg: DataConfig, gathered: Gathered, labels: np.ndarray) -> None:
    """Every class has a usable image; when one has none although files were listed for it, say why they
    were skipped (by reason, over the whole dataset) rather than to add images."""
    root, listed = gathered.root, Counter(s.label for s in gathered.listing.samples)
    skipped = _by_reason(gathered.skipped)
    if not len(labels):
        why = f": all {sum(listed.values())} listed files were skipped ({skipped}); {_skip_advice(gathered)}" \
            if listed else f"; check data.root ({ROOT_HINTS.get(cfg.source, 'the dataset folder')}) and data.classes"
        raise DataError(f"no usable image found under '{root}' for classes {', '.join(cfg.classes)}{why}")
    counts = np.bincount(labels, minlength=len(cfg.classes))
    empty = [k for k, n in enumerate(counts) if n == 0]
    if not empty:
        return
    name, files = cfg.classes[empty[0]], listed[empty[0]]
    if not files:
        raise DataError(f"class '{name}' has no usable image under '{root}'; "
                        "add images for it or remove it from data.classes")
    raise DataError(f"class '{name}' has no usable image under '{root}': its {files} listed files were all "
                    f"skipped (skipped in all classes: {skipped}); {_skip_advice(gathered)}")


def _by_reason(counts: Counter) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()) if n)


def _skip_advice(gathered: Gathered) -> str:
    """What to do about skipped files: reading failures may pass next time; decoding failures will not."""
    if any(gathered.skipped[reason] for reason in READ_REASONS if reason != "too_large"):
        return ("make sure the files are in place and readable (a moved folder, a disconnected mount, "
                "permissions) and prepare again: files that could not be read are read again")
    return "replace them with images that decode, or remove the class from data.classes"


def _assign(cfg: DataConfig, labels: np.ndarray, samples: list[Sample]) -> tuple[np.ndarray, str]:
    """Split ids and the split mode: the dataset's own split when asked (val carved from train if it has
    none), else the spec's, by subject when every image has one."""
    if not cfg.use_dataset_split:
        subjects = [s.subject for s in samples]
        return assign_splits(labels, subjects, cfg.split, cfg.split_seed), split_mode(subjects)
    unsplit = sum(s.split not in SPLIT_NAMES for s in samples)
    if unsplit:
        raise DataError(f"data.use_dataset_split: {unsplit} {cfg.source} images have no split of their own "
                        "(e.g. an unknown Usage value); set data.use_dataset_split to false to split them by "
                        "data.split")
    splits = np.array([SPLIT_NAMES.index(s.split) for s in samples], dtype=np.int8)
    if not (splits == VAL).any():
        # RAF-DB and AffectNet publish train and test only: validation comes out of train, in the
        # spec's train:val proportion (70:20 by default, so 22% of the dataset's train).
        train = np.flatnonzero(splits == TRAIN)
        share = cfg.split[1] / (cfg.split[0] + cfg.split[1])
        carved = stratified_split(labels[train], (1 - share, share, 0.0), cfg.split_seed)
        splits[train[carved == VAL]] = VAL
    return splits, "dataset"


def _split_warnings(cfg: DataConfig, rows: Rows, mode: str) -> list[str]:
    """Subjects known for only some images (a frame-level split), and classes a split has no image of."""
    partial = None if cfg.use_dataset_split else partial_subjects_warning([s.subject for s in rows.samples])
    return ([partial] if partial else []) + missing_class_warnings(rows.labels, rows.splits, tuple(cfg.classes), mode)


def _subset(store: AlignedStore, set_key: str, images: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, str]:
    """The rows ``kept`` (ascending) of a stacked set, as their own cached file (read in chunks, never whole)."""
    key = f"{set_key}-{short_hash_of_list(kept.tolist())}"
    path = store.set_paths(key)[0]
    if not path.exists():
        source = store.set_paths(set_key)[0]
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        try:
            with open(tmp, "wb") as out:
                out.write(npy_header((len(kept), *images.shape[1:])))
                chunks = read_row_chunks(source, len(images), images.shape[1:], HASH_ROWS, _data_offset(source))
                for start, chunk in zip(range(0, len(images), HASH_ROWS), chunks):
                    rows = kept[(kept >= start) & (kept < start + len(chunk))] - start
                    out.write(np.ascontiguousarray(chunk[rows]).data)
            os.replace(tmp, path)
        except BaseException:       # a full disk, Ctrl-C: no half-written copy left behind
            tmp.unlink(missing_ok=True)
            raise
    return np.load(path, mmap_mode="r", allow_pickle=False), key


def _report(cfg: DataConfig, gathered: Gathered, rows: Rows, audit: AuditResult, removed: int) -> DataReport:
    """The counts a user reads: listed, usable, skipped and dropped files, images per split and class."""
    listing = gathered.listing
    return DataReport(
        listed=len(listing.samples) + sum(listing.skipped.values()),
        usable=len(rows.samples), decoded=gathered.aligned.decoded,
        skipped=dict(sorted(gathered.skipped.items())), dropped=dict(sorted(listing.dropped.items())),
        per_split={name: {c: int(((rows.splits == s) & (rows.labels == k)).sum()) for k, c in enumerate(cfg.classes)}
                   for s, name in enumerate(SPLIT_NAMES)},
        align_failures=int(rows.fallback.sum()), duplicates=audit.pairs, duplicates_removed=removed,
        subjects=distinct_per_split([s.subject for s in rows.samples], rows.splits),
        split_align_failures=count_per_split(rows.fallback, rows.splits))


def _rel(path: str, root: Path, cache_dir: Path) -> str:
    """The image's name relative to the dataset (or, for fer2013's written PNGs, to the cache)."""
    return relative_posix(path, root) or relative_posix(path, cache_dir.absolute()) or str(path)
