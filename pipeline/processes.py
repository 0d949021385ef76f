"""Processes end with the process that started them. A `dvc repro` killed with SIGKILL runs no cleanup,
so without this the stage it started would run on and write outputs DVC no longer tracks; and a
benchmark stage killed the same way would leave its worker processes timing on.

Linux's parent-death signal does it in the kernel: `die_with_parent()` asks for SIGTERM (stages: they
clean up, see pipeline/stage.py) or SIGKILL (workers: nothing to clean up) when the parent goes.
Elsewhere it is a no-op.

DVC runs a stage through `$SHELL -c` (or /bin/sh when SHELL is unset, as under CI). bash execs a
single command, so the stage's parent is dvc; dash does not, so the parent is a shell that outlives a
killed dvc. When the parent is such a shell, a daemon thread also watches the shell's own parent.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"})
WATCH_SECONDS = 0.5


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc, None once `pid` has ended."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def is_shell(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip() in SHELLS
    except OSError:
        return False


def _end_with_grandparent(shell: int, grandparent: int, sig: int) -> None:
    while parent_of(shell) == grandparent:
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), sig)


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
    if is_shell(parent) and (grandparent := parent_of(parent)) not in (None, 0, 1):
        threading.Thread(target=_end_with_grandparent, args=(parent, grandparent, sig), daemon=True,
                         name="die-with-parent").start()
    return True


def exit_process(code: int) -> NoReturn:
    """End a command's process with `code` without the interpreter's teardown of torch, transformers
    and onnxruntime, which writes nothing and took 1.0-1.6 s per process here (a stage, a benchmark
    worker): the atexit handlers (logging's flush, MLflow's) still run and the streams are flushed.
    While a non-daemon thread is alive the normal exit joins it first, so that exit is kept then."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others:
        sys.exit(code)
    atexit._run_exitfuncs()  # CPython's own call at exit; public API has no other way to run them
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced by a stream without flush
            pass
    os._exit(code)
