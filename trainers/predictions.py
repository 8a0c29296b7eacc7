"""Predictions as a file: one row per image (its key, true and predicted class, the probability of every
class and, optionally, the image's metadata attributes), so any comparison can be recomputed later without
the model. A trial logs its test predictions; a production evaluation logs its production predictions with
the attributes (group, occluded, ...) that its slices are cut by."""
from __future__ import annotations

import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ARTIFACT = "test_predictions.csv.gz"
PRODUCTION_ARTIFACT = "production_predictions.csv.gz"
PROB = "prob_"        # column prefix of one class's probability
ATTR = "attr_"        # column prefix of one metadata attribute (its value as text, "" when unknown)


class PredictionsError(ValueError):
    """A predictions file that is not one this project writes."""


@dataclass(frozen=True)
class Predictions:
    keys: np.ndarray          # N str: the image's path relative to its dataset root
    labels: np.ndarray        # N int64: true class index
    predicted: np.ndarray     # N int64: predicted class index (argmax of probs)
    probs: np.ndarray         # N x K float32: softmax probabilities
    classes: tuple[str, ...]
    attrs: dict[str, np.ndarray] = field(default_factory=dict)   # attribute -> N str ("" when unknown)

    def to_bytes(self) -> bytes:
        """A gzipped CSV: key, label, predicted, prob_<class>..., attr_<name>... (labels as class names)."""
        frame = pd.DataFrame({"key": self.keys, "label": np.asarray(self.classes)[self.labels],
                              "predicted": np.asarray(self.classes)[self.predicted]})
        for k, name in enumerate(self.classes):
            frame[PROB + name] = self.probs[:, k]
        for name in sorted(self.attrs):
            frame[ATTR + name] = self.attrs[name]
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as out:   # mtime 0: same bytes for same numbers
            out.write(frame.to_csv(index=False, float_format="%.6g").encode())
        return buffer.getvalue()

    def aligned(self, other: Predictions) -> tuple[np.ndarray, np.ndarray]:
        """Row positions (in self, in other) of the images both hold, in self's order."""
        position = {key: i for i, key in enumerate(other.keys)}
        mine = [i for i, key in enumerate(self.keys) if key in position]
        return np.asarray(mine, np.int64), np.asarray([position[self.keys[i]] for i in mine], np.int64)


def read_predictions(path: Path | str) -> Predictions:
    """Read a file written by Predictions.to_bytes; raises PredictionsError naming what is wrong."""
    try:
        frame = pd.read_csv(path, compression="gzip", dtype=str, keep_default_na=False)
    except (OSError, ValueError, EOFError) as err:
        raise PredictionsError(f"{path}: not a readable predictions file ({err})") from None
    classes = tuple(c[len(PROB):] for c in frame.columns if c.startswith(PROB))
    missing = {"key", "label", "predicted"} - set(frame.columns)
    if missing or not classes:
        raise PredictionsError(f"{path}: a predictions file needs key, label, predicted and prob_<class> columns")
    index = {name: k for k, name in enumerate(classes)}
    unknown = (set(frame["label"]) | set(frame["predicted"])) - set(index)
    if unknown:
        raise PredictionsError(f"{path}: labels {sorted(unknown)} are not among its classes {list(classes)}")
    return Predictions(keys=frame["key"].to_numpy(dtype=object),
                       labels=frame["label"].map(index).to_numpy(np.int64),
                       predicted=frame["predicted"].map(index).to_numpy(np.int64),
                       probs=frame[[PROB + c for c in classes]].to_numpy(np.float32), classes=classes,
                       attrs={c[len(ATTR):]: frame[c].to_numpy(dtype=object) for c in frame.columns
                              if c.startswith(ATTR)})
