"""Child processes that never outlive the process that started them."""
from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1     # linux/prctl.h


def die_with_parent() -> None:
    """In the child (a Popen preexec_fn): be killed when the parent dies, even by SIGKILL, so no
    trial or helper runs unowned. Linux only; elsewhere the child ends when its stdin closes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
