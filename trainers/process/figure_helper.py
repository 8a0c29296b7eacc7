"""The figure helper: a process beside each trainer that draws a trial's curves and confusion matrix
and logs them to its run, while the trainer exports the model.

The trainer (trainers.tracking.FigureHelper) writes one `figures` job a line on the helper's stdin
(trainers.process.protocol.FigureJob); the helper answers each with a `figures_done` line on stdout
carrying the job's id and, if drawing failed, the error. Each job's messages go to its trial's log.
The helper ends when its stdin closes, or with its trainer.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from trainers.process.protocol import FigureJob, FiguresDone, ProtocolError, decode, encode


@functools.lru_cache(maxsize=8)
def _client(uri: str, cwd: str):
    """One client per store; cwd is part of the key because a relative URI means a different store there."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def log_figures(job: FigureJob) -> None:
    """Draw training curves and the confusion matrix (counts and normalised) and log them as PNGs."""
    import numpy as np

    from trainers.plots import confusion_png, curves_png

    os.chdir(job.cwd)        # a relative store or artifact path means the trainer's folder
    client = _client(job.uri, job.cwd)
    with tempfile.TemporaryDirectory() as tmp:
        if job.history:
            client.log_artifact(job.run_id, str(curves_png(job.history, Path(tmp) / "curves.png", job.title)))
        if job.confusion is not None:
            png = confusion_png(np.array(job.confusion, dtype=np.int64), tuple(job.classes),
                                Path(tmp) / "confusion_matrix.png", job.title)
            client.log_artifact(job.run_id, str(png))


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
        job = decode(line)       # a garbled job ends the helper: the trainer then draws the figures itself
        if not isinstance(job, FigureJob):
            raise ProtocolError(f"the figure helper takes 'figures' jobs, not '{job.kind}'")
        with output_to(job.log) if job.log else contextlib.nullcontext():
            try:
                if broken:
                    raise RuntimeError(broken)
                log_figures(job)
                answer = FiguresDone(job.id)
            except Exception as err:     # the trainer reports it as the trial's error
                traceback.print_exc()
                answer = FiguresDone(job.id, str(err) if broken else f"figures: {type(err).__name__}: {err}")
        answers.write(encode(answer))


if __name__ == "__main__":
    main()
