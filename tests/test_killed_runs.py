"""A killed `dvc repro` leaves nothing running (issue 30 class 7). A stage started as `python -m stages.<name>`
asks the kernel for SIGTERM when its parent dies (pipeline/processes.py), so SIGKILL to dvc ends the stage
before it writes outputs DVC no longer tracks; the benchmark's worker processes ask for SIGKILL when the
benchmark dies. The cases are rows of the bad-input matrix in tests/README.md."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scripts.tiny_project import GIT_IDENTITY, init_repo, sh, tiny_params_tree, write_project

REPO = Path(__file__).resolve().parents[1]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be collected


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")


@pytest.mark.slow
def test_sigkill_to_dvc_repro_ends_the_stage_it_started(tmp_path, tiny_bert):
    tree = tiny_params_tree(tiny_bert)
    tree["teacher"]["epochs"] = 500  # minutes: still training when dvc is killed
    root = init_repo(write_project(tmp_path / "project", tree))
    sh([sys.executable, "-m", "dvc", "repro", "prepare_data"], root)
    # SHELL=/bin/sh, as under CI (SHELL unset): dvc runs `sh -c <cmd>`, and dash, unlike bash, does not
    # exec the command, so the stage's parent is a shell that outlives a killed dvc.
    env = {**os.environ, **GIT_IDENTITY, "DVC_NO_ANALYTICS": "1", "SHELL": "/bin/sh",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train_teacher"], cwd=root, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        stage = wait_for(lambda: [p for p in children(dvc.pid) if "stages.train_teacher" in cmdline(p)], 120,
                         "dvc to start train_teacher")[0]
        # Into training: its scratch directory exists.
        wait_for(lambda: (root / ".cache" / "checkpoints" / "train_teacher").is_dir(), 180, "train_teacher to train")
        time.sleep(2.0)
        dvc.send_signal(signal.SIGKILL)
        dvc.wait()
        wait_for(lambda: not alive(stage), 30, f"the orphaned stage (pid {stage}) to end")
    finally:
        if dvc.poll() is None:
            dvc.kill()
        for pid in children(1):
            if "stages.train_teacher" in cmdline(pid) and str(root) in os.readlink(f"/proc/{pid}/cwd"):
                os.kill(pid, signal.SIGKILL)  # only if the test failed: never leave it running
    assert not (root / "models" / "teacher").exists(), "no output DVC does not track"


@pytest.mark.parametrize("through_shell", [False, True], ids=["direct", "sh -c"])
def test_a_stage_started_by_a_parent_that_dies_ends_with_it(tmp_path, through_shell):
    # The parent starts a stage (here a stand-in that would run for a minute) and is SIGKILLed; through
    # `sh -c` (dvc with SHELL unset) a dash shell that does not exec sits between them and lives on.
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text((REPO / "stages" / "__init__.py").read_text())
    (tmp_path / "stages" / "sleeper.py").write_text("import time\ntime.sleep(60)\nopen('written', 'w').write('x')\n")
    command = [sys.executable, "-m", "stages.sleeper"]
    if through_shell:
        command = ["/bin/sh", "-c", " ".join(command)]
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen({command!r}, cwd={str(tmp_path)!r},
                                 env={{"PYTHONPATH": {str(REPO)!r} + ":" + {str(tmp_path)!r}}})
        print(child.pid, flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    stage = int(parent.stdout.readline())
    time.sleep(1.0)
    assert alive(stage)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    wait_for(lambda: not alive(stage), 15, "the stage to end with its parent")
    assert not (tmp_path / "written").exists()


def test_benchmark_workers_end_with_a_killed_benchmark(tmp_path):
    # A stand-in for the benchmark stage: it starts two latency workers the way the harness does, then is SIGKILLed.
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys, time
        from pipeline.evaluation import latency_worker
        workers = [subprocess.Popen([sys.executable, "-m", latency_worker.__name__], stdin=subprocess.PIPE)
                   for _ in range(2)]
        print(" ".join(str(w.pid) for w in workers), flush=True)
        time.sleep(120)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    time.sleep(3.0)  # past their imports: blocked reading commands, as between measurements
    assert all(alive(pid) for pid in workers)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    wait_for(lambda: not any(alive(pid) for pid in workers), 15, "the workers to end with the benchmark")


EXITING = """
import atexit, sys, threading, time
from pathlib import Path
from pipeline.processes import exit_process

atexit.register(lambda: Path("atexit_ran").write_text("yes"))
log = open("log.txt", "w")  # a buffered file its owner closes at exit, as logging's handlers are
atexit.register(log.close)
log.write("logged")
print("buffered output", end="")  # stdout to a pipe is block-buffered: lost unless flushed
if sys.argv[1] == "with a worker thread":
    threading.Thread(target=lambda: (time.sleep(0.5), Path("thread_done").write_text("yes"))).start()
exit_process(3)
"""


@pytest.mark.parametrize("case", ["alone", "with a worker thread"])
def test_exit_process_runs_atexit_flushes_and_waits_for_threads(tmp_path, case):
    """A stage's and a benchmark worker's last call (it skips the interpreter's teardown of torch): the
    status, the atexit handlers, buffered output and a running non-daemon thread's work all survive."""
    result = subprocess.run([sys.executable, "-c", EXITING, case], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered output"
    assert (tmp_path / "atexit_ran").read_text() == "yes" and (tmp_path / "log.txt").read_text() == "logged"
    assert (tmp_path / "thread_done").exists() == (case == "with a worker thread")
