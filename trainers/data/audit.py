"""Leakage audit: near-duplicate images across train / val / test, by perceptual hash.

Frame-level random splits of video-derived data put near-identical frames in
train and test, which inflates test scores (the study's 99.8% test against
94.6% in production has that shape). A perceptual hash of each aligned image
and a Hamming-distance threshold find such pairs; they are counted, and with
``dedupe`` the later copy (in val or test) is removed. The same search between two
sets (near_duplicates_between) counts production images that copy training ones.

Why 256 bits: aligned faces share their layout (eyes, nose and mouth sit at
the template's points), so the 64 lowest frequencies of a 64-bit pHash are
much alike across people. On the synthetic faces at 64 px, distinct faces
came within 2 of 64 bits while a JPEG re-save moved a face by up to 4: no
threshold separates them. With the 16 x 16 lowest frequencies (256 bits),
distinct faces stay >= 32 bits apart and re-saved or resized copies within 16.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from trainers.data.split import SPLIT_NAMES

HASH_SIDE = 32        # the image is reduced to 32 x 32 grey before its DCT
HASH_FREQS = 16       # the 16 x 16 lowest frequencies against their median: 256 bits
HASH_BYTES = HASH_FREQS * HASH_FREQS // 8
HASH_CHUNK = 1024     # images hashed per vectorised step: 1024 x 32 x 32 float64 is 8 MB


@dataclass
class AuditResult:
    """Cross-split near-duplicate pairs by split pair ('train-test': n), and the later copy of each pair."""
    pairs: dict[str, int] = field(default_factory=dict)
    later_copies: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """256-bit pHash of each N x S x S x 3 uint8 image, packed as N x 32 uint8."""
    basis = _dct_basis(HASH_SIDE)[:HASH_FREQS]
    out = np.zeros((len(images), HASH_BYTES), dtype=np.uint8)
    for start in range(0, len(images), HASH_CHUNK):
        grey = np.stack([_small_grey(im) for im in images[start:start + HASH_CHUNK]])
        low = np.einsum("fi,nij,gj->nfg", basis, grey, basis).reshape(len(grey), -1)
        out[start:start + len(grey)] = np.packbits(low > np.median(low, axis=1, keepdims=True), axis=1)
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between packed hashes (last axis: bytes; broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """P x 2 index pairs (i < j) whose hashes differ in at most max_distance bits.

    Pigeonhole: cut the bits into max_distance + 1 bands; two hashes that close
    agree exactly on at least one band, so only images sharing a band value
    are compared (multi-index hashing), not all N^2 / 2 pairs. Candidates are
    checked as they are found, at most N at a time, so memory stays O(N) however
    many images share a band value.
    """
    words = np.ascontiguousarray(hashes).view(np.uint64)    # popcount over 4 words, not 32 bytes
    edges = np.linspace(0, HASH_BYTES * 8, max_distance + 2).astype(int)
    found = [np.zeros((0, 2), dtype=np.int64)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        for candidates in _same_key_pairs(_band_keys(hashes, lo, hi)):
            close = hamming(words[candidates[:, 0]], words[candidates[:, 1]]) <= max_distance
            found.append(candidates[close])
    pairs = np.concatenate(found)
    return np.unique(np.sort(pairs, axis=1), axis=0)


def _band_keys(hashes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Bits lo..hi-1 of each packed hash (most significant bit first) as one integer per hash."""
    first = lo // 8
    bits = np.unpackbits(np.ascontiguousarray(hashes[:, first:(hi - 1) // 8 + 1]), axis=1)
    bits = bits[:, lo - 8 * first:hi - 8 * first].astype(np.int64)
    return bits @ (np.int64(1) << np.arange(hi - lo - 1, -1, -1, dtype=np.int64))


def near_duplicates_between(hashes_a: np.ndarray, hashes_b: np.ndarray, max_distance: int) -> np.ndarray:
    """P x 2 pairs (row in a, row in b) whose hashes differ in at most max_distance bits (pairs within
    one set are not counted): e.g. training images against production images."""
    pairs = near_duplicate_pairs(np.concatenate([hashes_a, hashes_b]), max_distance)
    # near_duplicate_pairs gives i < j, so a cross pair has its row of a first.
    cross = pairs[(pairs[:, 0] < len(hashes_a)) & (pairs[:, 1] >= len(hashes_a))]
    return np.stack([cross[:, 0], cross[:, 1] - len(hashes_a)], axis=1)


def audit_splits(pairs: np.ndarray, splits: np.ndarray) -> AuditResult:
    """Count the near-duplicate pairs whose members sit in different splits."""
    a, b = pairs[:, 0], pairs[:, 1]
    cross = splits[a] != splits[b]
    a, b = a[cross], b[cross]
    first, second = np.minimum(splits[a], splits[b]), np.maximum(splits[a], splits[b])
    counts = Counter(f"{SPLIT_NAMES[x]}-{SPLIT_NAMES[y]}" for x, y in zip(first.tolist(), second.tolist()))
    # The copy in the later split (val after train, test after both) is the leak; train keeps its own.
    later = np.where(splits[a] > splits[b], a, b)
    return AuditResult(pairs=dict(sorted(counts.items())), later_copies=np.unique(later))


def _same_key_pairs(keys: np.ndarray) -> Iterator[np.ndarray]:
    """Every pair (i, j) with keys[i] == keys[j], at most len(keys) at a time, without a Python loop over
    groups: step k pairs each position of the sorted keys with the one k further on."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    alive = np.arange(len(keys) - 1)            # positions whose next neighbour may share their key
    step = 1
    while len(alive):
        alive = alive[alive + step < len(keys)]
        alive = alive[sorted_keys[alive] == sorted_keys[alive + step]]
        yield np.stack([order[alive], order[alive + step]], axis=1)
        step += 1


def _small_grey(image: np.ndarray) -> np.ndarray:
    grey = Image.fromarray(np.asarray(image)).convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.float64)


def _dct_basis(n: int) -> np.ndarray:
    """Rows of the orthonormal DCT-II matrix: basis @ x is the DCT of x."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    basis = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    return basis
