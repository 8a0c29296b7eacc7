"""The figure helper: a process beside each trainer that draws a trial's curves and confusion matrix
and logs them to its run, while the trainer exports the model.

The trainer (trainers.tracking.FigureHelper) writes one JSON job per line on the helper's stdin; the
helper answers each with one JSON line on stdout: {"ok": true} or {"error": "..."}. It ends when its
stdin closes, or with its trainer.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
from mlflow import MlflowClient


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    return MlflowClient(uri)


def log_figures(uri: str, run_id: str, cwd: str, title: str, history: list[dict], classes: list[str],
                confusion: list[list[int]] | None) -> None:
    """Draw training curves and the confusion matrix (counts and normalised) and log them as PNGs."""
    from trainers.plots import confusion_png, curves_png

    os.chdir(cwd)            # a relative store or artifact path means the trainer's folder
    client = _client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        if history:
            client.log_artifact(run_id, str(curves_png(history, Path(tmp) / "curves.png", title)))
        if confusion is not None:
            png = confusion_png(np.array(confusion, dtype=np.int64), tuple(classes),
                                Path(tmp) / "confusion_matrix.png", title)
            client.log_artifact(run_id, str(png))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is for the trainer, which waits for us
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)            # whatever a library prints goes to stderr (a job's log), not into the answers
    import trainers.plots  # noqa: F401  (matplotlib and seaborn, before the first job)

    for line in sys.stdin:
        job = json.loads(line)
        with output_to(job.pop("log", None)):
            try:
                log_figures(**job)
                answer = {"ok": True}
            except Exception as err:     # the trainer reports it as the trial's error
                answer = {"error": f"figures: {type(err).__name__}: {err}"}
        answers.write(json.dumps(answer) + "\n")


@contextlib.contextmanager
def output_to(log: str | None):
    """Warnings and messages of a job go to its trial's log (appended beside the trainer's own lines)."""
    if log is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a", buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


if __name__ == "__main__":
    main()
