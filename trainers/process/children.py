"""Child processes that never outlive the process that started them, and their output."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1     # linux/prctl.h
PARENT_ENV = "FER_PARENT_PID"


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that calls die_with_parent: names this process as its parent."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """First thing in a child started with child_env(): be killed when the parent dies, even by
    SIGKILL, so no trial or helper runs unowned; exit now if it already died. Called by the child
    itself, not as a preexec_fn, which is unsafe in a parent with threads. Linux only; elsewhere a
    child ends when its stdin closes."""
    parent = int(os.environ.pop(PARENT_ENV, 0))
    if not parent or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:      # it died before the line above
        os._exit(1)


@contextlib.contextmanager
def output_to(log: Path | str):
    """Send this process's stdout and stderr (file descriptors 1 and 2) to a log file, appending, then restore."""
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
