"""Balance for the training split: augmented copies per cell (a class, or a class x attribute combination)
towards the largest cell, and class loss weights."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainers.config import CLASS_COLUMN


@dataclass(frozen=True)
class Cells:
    """The balance cell of every image: the value combinations of the columns ``by``."""
    by: tuple[str, ...]
    ids: np.ndarray                  # N int64: each image's index into ``values``
    values: list[tuple[str, ...]]    # per cell: its value for each column of ``by`` ('' unknown)


def balance_cells(labels: np.ndarray, attrs: list[dict[str, str]], classes: tuple[str, ...],
                  by: tuple[str, ...]) -> Cells:
    """Each image's cell over the columns ``by``: 'class' is its label, an attribute it lacks is ''.

    Cells are ordered by their values in the order of ``by``, a class by its index in ``classes``, so
    ``by=("class",)`` numbers the cells as the labels are (every class has an image) and the plan
    draws exactly what a per-class balance drew.
    """
    columns = [labels.tolist() if column == CLASS_COLUMN else [a.get(column) or "" for a in attrs]
               for column in by]
    keys = list(zip(*columns)) if columns else []
    ordered = sorted(set(keys))
    index = {key: i for i, key in enumerate(ordered)}
    ids = np.fromiter((index[key] for key in keys), dtype=np.int64, count=len(keys))
    values = [tuple(classes[v] if column == CLASS_COLUMN else v for column, v in zip(by, key)) for key in ordered]
    return Cells(tuple(by), ids, values)


def grown_sizes(before: np.ndarray, max_factor: float) -> np.ndarray:
    """Each cell's training images after balance: towards the largest cell, but to at most ``max_factor``
    times its own size, so a rare cell (the study's disgust: 1,721 vs sadness 9,128) stays somewhat rare;
    an empty cell stays empty (there is nothing to copy)."""
    if not len(before):
        return before.copy()
    capped = np.minimum(before.max(), (before * max_factor).astype(np.int64))
    return np.where(before > 0, np.maximum(before, capped), 0)


def balance_plan(train_idx: np.ndarray, cells: np.ndarray, max_factor: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training indices with augmented copies added, and a mask of which entries are copies.

    ``cells`` gives every image's cell id (the labels for a per-class balance, else ``Cells.ids``);
    each cell grows to its ``grown_sizes``, copies drawn with replacement from its training images.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(cells[train_idx])
    sizes = grown_sizes(counts, max_factor)
    extra = [rng.choice(train_idx[cells[train_idx] == c], size=sizes[c] - counts[c], replace=True)
             for c in np.flatnonzero(sizes > counts)]
    copies = np.concatenate(extra) if extra else np.empty(0, dtype=train_idx.dtype)
    indices = np.concatenate([train_idx, copies])
    augmented = np.concatenate([np.zeros(len(train_idx), bool), np.ones(len(copies), bool)])
    return indices, augmented


def balance_summary(cells: Cells, train_idx: np.ndarray, max_factor: float) -> dict:
    """The cells and their training images before and after balance (as data_report.json logs them);
    the counts follow from the cells alone, whatever the seed that draws the copies."""
    before = np.bincount(cells.ids[train_idx], minlength=len(cells.values))
    after = grown_sizes(before, max_factor)
    rows = [{"values": dict(zip(cells.by, values)), "before": int(b), "after": int(a)}
            for values, b, a in zip(cells.values, before, after)]
    return {"by": list(cells.by), "max_factor": max_factor, "cells": rows}


def balance_text(summary: dict) -> str:
    """'balanced by class×group: 12 cells, train 3,360 → 5,040 (smallest cell disgust×b 14 → 42)', then the
    cells no training image falls in (balance cannot grow them)."""
    cells = summary["cells"]
    text = (f"balanced by {'×'.join(summary['by'])}: {len(cells)} cells, train "
            f"{sum(c['before'] for c in cells):,} → {sum(c['after'] for c in cells):,}")
    filled = [c for c in cells if c["before"]]
    if filled:
        small = min(filled, key=lambda c: c["before"])
        text += f" (smallest cell {cell_name(small)} {small['before']:,} → {small['after']:,})"
    empty = [cell_name(c) for c in cells if not c["before"]]
    if empty:
        more = ", ..." if len(empty) > 3 else ""
        cells_word = "cell" if len(empty) == 1 else "cells"
        text += f"; no training image in {len(empty)} {cells_word}, left empty: {', '.join(empty[:3])}{more}"
    return text


def cell_name(cell: dict) -> str:
    """A cell's values joined as its columns are ('disgust×b')."""
    return "×".join(map(value_text, cell["values"].values()))


def value_text(value: str) -> str:
    """A cell's value as printed: '(none)' for images the column gives no value."""
    return value or "(none)"


def class_weights(effective_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Weights N / (K * n_c) over the effective (augmented) training distribution; 0 for absent classes."""
    counts = np.bincount(effective_labels, minlength=n_classes).astype(np.float64)
    weights = np.divide(len(effective_labels), n_classes * counts,
                        out=np.zeros(n_classes), where=counts > 0)
    return weights.astype(np.float32)
