"""The worker process of the latency benchmark (`python -m pipeline.evaluation.latency_worker`, started
by pipeline/evaluation/latency.py): it loads one family member and answers the parent's commands, one
JSON command per line on stdin, one JSON answer per line on stdout. A member travels as its kind's
registry name (`pipeline.evaluation.family.MEMBER_KINDS`) and its directory. This module imports
neither torch nor transformers at module level: an ONNX member's worker never loads torch."""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.evaluation.family import MEMBER_KINDS
from pipeline.processes import die_with_parent, exit_process

# --------------------------------------------------------------------------- the worker side


class Runner:
    """One loaded member: batch-1 inputs tokenized once, runnable at any of the thread settings."""

    def __init__(self, kind: str, model_dir: Path, texts: list[str], max_length: int, threads: list[int]) -> None:
        self.runnable = MEMBER_KINDS[kind].load_runnable(model_dir, max_length, threads)
        self.texts = texts
        self.inputs = [self.runnable.feed([text]) for text in texts]
        # One call before the parent is told what the member imports: a library importing torch only on
        # its first call must not pass for torch-free.
        with self.runnable.inference():
            self.runnable.run(self.inputs[0])

    def _call(self, index: int, end_to_end: bool) -> None:
        self.runnable.run(self.runnable.feed([self.texts[index]]) if end_to_end else self.inputs[index])

    def latency(self, threads: int, runs: int, seconds: float, warmup: int, end_to_end: bool, start: int) -> list[float]:
        """Batch-1 latencies in ms: at least `runs` calls and at least `seconds`, after `warmup` calls."""
        self.runnable.use_threads(threads)
        with self.runnable.inference():
            for i in range(warmup):
                self._call((start + i) % len(self.texts), end_to_end)
            samples: list[float] = []
            began = time.perf_counter()
            i = start
            while len(samples) < runs or time.perf_counter() - began < seconds:
                index = i % len(self.texts)
                tick = time.perf_counter_ns()
                self._call(index, end_to_end)
                samples.append((time.perf_counter_ns() - tick) / 1e6)
                i += 1
        return samples

    def _batch_feeds(self, batch_size: int, batches: int) -> list[Any]:
        groups = [
            [self.texts[(b * batch_size + j) % len(self.texts)] for j in range(batch_size)] for b in range(batches)
        ]
        return [self.runnable.feed(group) for group in groups]

    def throughput(self, threads: int, batch_size: int, batches: int) -> float:
        """Sentences per second at `batch_size` (inputs tokenized and padded beforehand)."""
        self.runnable.use_threads(threads)
        prepared = self._batch_feeds(batch_size, batches)
        with self.runnable.inference():
            self.runnable.run(prepared[0])  # warm-up
            began = time.perf_counter()
            for feed in prepared:
                self.runnable.run(feed)
            elapsed = time.perf_counter() - began
        return batch_size * batches / elapsed

    def sessions_throughput(self, sessions: int, batch_size: int, batches: int) -> float:
        """Sentences per second of `sessions` one-thread copies of the model running side by side, each
        over the same `batches` batches of `batch_size` (tokenized beforehand)."""
        copies = self.runnable.one_thread_copies(sessions)
        prepared = self._batch_feeds(batch_size, batches)
        for copy in copies:
            copy.run(prepared[0])  # warm-up
        start = threading.Barrier(sessions + 1)

        def serve(copy: Any) -> None:
            start.wait()
            for feed in prepared:
                copy.run(feed)

        with ThreadPoolExecutor(max_workers=sessions) as pool:
            done = [pool.submit(serve, copy) for copy in copies]
            start.wait()
            began = time.perf_counter()
            for future in done:
                future.result()
            elapsed = time.perf_counter() - began
        return sessions * batch_size * batches / elapsed


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB.

    Linux: VmHWM from /proc/self/status, the high-water mark of this process's own memory map.
    (getrusage's ru_maxrss survives exec, so a worker forked from a large parent would report the
    parent's size.) Elsewhere: ru_maxrss (macOS reports bytes).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024


def worker_main() -> None:
    """Serve commands for one member; answers go to the real stdout, everything else to stderr."""
    # A benchmark killed outright (SIGKILL, or its dvc killed) must not leave its workers timing on.
    die_with_parent(signal.SIGKILL)
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints and library warnings must not corrupt the protocol
    sys.stdout = sys.stderr
    runner: Runner | None = None
    for line in sys.stdin:
        command = json.loads(line)
        try:
            op = command.pop("op")
            if op == "load":
                runner = Runner(**{k: v for k, v in command.items() if k != "model_dir"}, model_dir=Path(command["model_dir"]))
                answer: Any = {"ok": True, "imports_torch": "torch" in sys.modules}
            elif op == "latency":
                answer = {"ok": True, "samples": runner.latency(**command)}
            elif op == "throughput":
                answer = {"ok": True, "per_second": runner.throughput(**command)}
            elif op == "sessions_throughput":
                answer = {"ok": True, "per_second": runner.sessions_throughput(**command)}
            elif op == "rss":
                answer = {"ok": True, "peak_rss_mb": peak_rss_mb()}
            elif op == "quit":
                exit_process(0)  # the parent waits for the exit: skip torch's teardown (~1.2 s a worker)
            else:
                answer = {"ok": False, "error": f"unknown op {op}"}
        except Exception as error:  # report it to the parent, which fails the stage with it
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        answers.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    worker_main()
