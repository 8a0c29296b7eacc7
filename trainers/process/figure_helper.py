"""The figure helper: a process beside each trainer that draws a trial's curves and confusion matrix
and logs them to its run, while the trainer exports the model.

The trainer (trainers.tracking.FigureHelper) writes one JSON job per line on the helper's stdin; the
helper answers each with one JSON line on stdout: {"id": n, "ok": true} or {"id": n, "error": "..."}.
Each job's messages go to its trial's log. The helper ends when its stdin closes, or with its trainer.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path


@functools.lru_cache(maxsize=8)
def _client(uri: str, cwd: str):
    """One client per store; cwd is part of the key because a relative URI means a different store there."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def log_figures(uri: str, run_id: str, cwd: str, title: str, history: list[dict], classes: list[str],
                confusion: list[list[int]] | None) -> None:
    """Draw training curves and the confusion matrix (counts and normalised) and log them as PNGs."""
    import numpy as np

    from trainers.plots import confusion_png, curves_png

    os.chdir(cwd)            # a relative store or artifact path means the trainer's folder
    client = _client(uri, cwd)
    with tempfile.TemporaryDirectory() as tmp:
        if history:
            client.log_artifact(run_id, str(curves_png(history, Path(tmp) / "curves.png", title)))
        if confusion is not None:
            png = confusion_png(np.array(confusion, dtype=np.int64), tuple(classes),
                                Path(tmp) / "confusion_matrix.png", title)
            client.log_artifact(run_id, str(png))


def main() -> None:
    # Before any import that takes time: Ctrl-C is for the trainer (which waits for us), and whatever
    # a library prints must not reach the answers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    from trainers.process.children import die_with_parent, output_to

    die_with_parent()
    try:
        import trainers.plots  # noqa: F401  (matplotlib and seaborn, before the first job)
        broken = None
    except Exception as err:     # a broken install: every job says so, as drawing in the trainer would
        broken = f"figures: cannot import the plotting libraries: {type(err).__name__}: {err}"

    for line in sys.stdin:
        job = json.loads(line)
        number, log = job.pop("id"), job.pop("log", None)
        with output_to(log) if log else contextlib.nullcontext():
            try:
                if broken:
                    raise RuntimeError(broken)
                log_figures(**job)
                answer = {"id": number, "ok": True}
            except Exception as err:     # the trainer reports it as the trial's error
                traceback.print_exc()
                answer = {"id": number, "error": str(err) if broken else f"figures: {type(err).__name__}: {err}"}
        answers.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
