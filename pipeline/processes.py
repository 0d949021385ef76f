"""Processes end with the process that started them. A `dvc repro` killed with SIGKILL runs no cleanup,
so without this the stage it started would run on and write outputs DVC no longer tracks; and a
benchmark stage killed the same way would leave its worker processes timing on.

Linux's parent-death signal does it in the kernel: `die_with_parent()` asks for SIGTERM (stages: they
clean up, see pipeline/stage.py) or SIGKILL (workers: nothing to clean up) when the parent goes.
Elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent exits. Returns False where this
    cannot be arranged (not Linux), True otherwise; exits at once if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except OSError:
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return True
