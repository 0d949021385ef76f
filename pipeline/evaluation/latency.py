"""The CPU latency benchmark harness.

Every family member runs in a worker process of its own (so its peak resident memory is its own
and an ONNX member never imports torch). The parent keeps all workers alive and interleaves them:
each round visits the members in a fresh random order and asks each for a slice of its timed runs,
so drift in machine load hits every member alike. The rounds of a thread setting end once every
member's median there is stable or capped (`Stopping`): as long as the slowest member's p50 needs,
not a fixed amount, with short slices for the fast members. Thread counts are
set for torch (`torch.set_num_threads`) and ONNX Runtime (one session per intra-op thread count)
alike. Members that can run side by side (ONNX) are also timed on all N cores in both serving layouts:
one session with N intra-op threads, and N one-thread sessions running at once (threads of the
worker process: ONNX Runtime releases the GIL while it runs).

The workers (pipeline/evaluation/latency_worker.py) answer one JSON command per line. This module
imports neither torch nor transformers at module level.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import FinCompressError
from pipeline.evaluation import latency_worker
from pipeline.evaluation.family import Member
from pipeline.evaluation.stopping import Stopping, median_interval

log = logging.getLogger(__name__)



def all_cores() -> int:
    return os.cpu_count() or 1


def thread_settings(threads: list[int]) -> list[int]:
    """Params thread counts with 0 meaning every core, de-duplicated, ascending: 1 thread (which params
    require) comes first and all cores last, as the report reads them."""
    return sorted({count or all_cores() for count in threads})


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    values = np.asarray(samples_ms)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(values.mean()), "runs": len(values)}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    info = {
        "cpu": cpu,
        "cores": all_cores(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- the parent side

ONE_SESSION, SESSIONS = "one_session_n_threads", "n_sessions_one_thread"


def all_cores_layouts(cores: int, one_session: float, sessions: float) -> dict[str, Any]:
    """Sentences per second on `cores` cores for both serving layouts, and the faster one."""
    return {
        "cores": cores,
        ONE_SESSION: one_session,
        SESSIONS: sessions,
        "best_layout": SESSIONS if sessions > one_session else ONE_SESSION,
    }


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    imports_torch: bool = False

    @classmethod
    def spawn(cls, member: Member, texts: list[str], max_length: int, threads: list[int]) -> Worker:
        """Start the worker process and send it the member to load (answered by `loaded`)."""
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(threads))}
        process = subprocess.Popen(
            [sys.executable, "-m", latency_worker.__name__],  # imported: a DVC dependency of the benchmark
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[2],  # the project root: `pipeline` importable
        )
        worker = cls(member.name, process)
        worker.send(
            op="load", kind=member.kind, model_dir=str(member.path), texts=texts, max_length=max_length, threads=threads
        )
        return worker

    def loaded(self) -> None:
        self.imports_torch = self.receive()["imports_torch"]

    def send(self, **command: Any) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise FinCompressError(f"benchmark worker for {self.name} died (exit code {self.process.poll()})")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise FinCompressError(f"benchmark of {self.name} failed: {answer['error']}")
        return answer

    def ask(self, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.receive()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()


Timing = tuple[str, int, bool]  # (member, threads, end_to_end)


def timing_stats(samples_ms: list[float], stopped: str) -> dict[str, Any]:
    """Percentiles of one timing, its p50's 95% interval and why it stopped."""
    interval = median_interval(samples_ms)
    return {**percentiles(samples_ms), "p50_ci95": list(interval) if interval else None, "stopped": stopped}


CAPS = ("max_runs", "max_seconds")


def interleaved_latency(
    workers: list[Worker], texts: int, timings: list[tuple[int, bool]], stopping: Stopping, warmup_runs: int,
    rng: np.random.Generator, advance: Callable[[str], None] | None = None,
) -> tuple[dict[Timing, list[float]], dict[Timing, str]]:
    """Batch-1 latency samples per (member, threads, end_to_end) of loaded workers, for each of
    `timings` (threads, end_to_end), and why each stopped.

    Each round visits the members in a new random order, so a slow spell of the machine hits all of
    them alike. A setting's rounds end once every member's timing there is done (`stopping`: stable
    or capped); until then a member whose p50 is already stable keeps a quarter slice in every round,
    so all medians of a setting span the same stretch of time (a member timed only in the first
    rounds would be compared with one timed later, under another load). A capped member stops."""
    samples: dict[Timing, list[float]] = {(w.name, t, e2e): [] for w in workers for t, e2e in timings}
    stopped: dict[Timing, str] = {}  # the first reason each timing was done
    capped: set[Timing] = set()  # at a cap: no more visits
    finished: set[tuple[int, bool]] = set()  # settings whose every timing is done
    rounds = 0
    while len(finished) < len(timings):
        # Every member of a setting starts at the same text this round: their slices cover the same
        # sentences (paired), so a ratio between two members does not also measure two text mixes.
        starts = {setting: int(rng.integers(0, texts)) for setting in timings}
        for index in rng.permutation(len(workers)):
            worker = workers[index]
            for threads, end_to_end in timings:
                key = (worker.name, threads, end_to_end)
                if (threads, end_to_end) in finished or key in capped:
                    continue
                runs, seconds = stopping.visit(stable=key in stopped)
                answer = worker.ask(
                    op="latency", threads=threads, runs=runs, seconds=seconds,
                    warmup=warmup_runs if rounds == 0 else 2, end_to_end=end_to_end, start=starts[(threads, end_to_end)],
                )
                samples[key].extend(answer["samples"])
        rounds += 1
        for key, values in samples.items():
            reason = stopping.reason(values, rounds)
            if reason and key not in stopped:
                stopped[key] = reason
                if advance:
                    advance(f"round {rounds}: {key[0]} done")
            if reason in CAPS:  # also a stable timing kept in the rounds for its setting
                capped.add(key)
        finished |= {setting for setting in timings if all((w.name, *setting) in stopped for w in workers)}
        # A line per round too: a progress bar does not show in a log file or under DVC.
        log.info("benchmark round %d done: %d of %d timings done", rounds, len(stopped), len(samples))
    return samples, stopped


def one_thread_latency(
    members: list[Member], texts: list[str], max_length: int, min_runs: int, min_seconds: float,
    warmup_runs: int, rounds: int, seed: int = 0, stopping: Stopping | None = None,
) -> dict[str, dict[str, float]]:
    """Model-only batch-1 latency percentiles (ms) at 1 thread of each member, interleaved in one run:
    the short measurement of a search (a fixed number of rounds; no throughput, no end-to-end timing),
    or until `stopping` says so (the benchmark's adaptive rule)."""
    workers: list[Worker] = []
    try:
        for member in members:
            workers.append(Worker.spawn(member, texts, max_length, [1]))
        for worker in workers:
            worker.loaded()
        stopping = stopping or Stopping(min_runs=min_runs, min_rounds=rounds, round_seconds=min_seconds / rounds)
        samples, _ = interleaved_latency(
            workers, len(texts), [(1, False)], stopping, warmup_runs, np.random.default_rng(seed)
        )
        return {worker.name: percentiles(samples[(worker.name, 1, False)]) for worker in workers}
    finally:
        for worker in workers:
            worker.stop()


def run_benchmark(
    members: list[Member],
    texts: list[str],
    max_length: int,
    threads: list[int],
    stopping: Stopping,
    warmup_runs: int,
    throughput_batch_size: int,
    throughput_batches: int,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, dict[str, Any]]:
    """Time every member; returns per member its model-only latency percentiles per thread count and
    its end-to-end ones at 1 thread (each with its p50 interval and why its timing stopped), throughput
    per thread count and peak RSS; members that can run side-by-side sessions also get their all-core
    throughput in both serving layouts."""
    settings = thread_settings(threads)
    # End to end (tokenization included) at 1 thread only: the report shows no other, and the
    # tokenizer's cost does not depend on the model's thread count.
    timings = [(t, False) for t in settings] + [(1, True)]
    workers: list[Worker] = []
    rng = np.random.default_rng(seed)
    began = time.perf_counter()

    def phase(name: str) -> None:  # where the benchmark's time goes, in the log
        nonlocal began
        log.info("benchmark: %s in %.1f s", name, time.perf_counter() - began)
        began = time.perf_counter()

    try:
        # Load every member at once (timing starts only when all are ready).
        # Members that can run as side-by-side sessions are also timed on every core both ways:
        # one session with N threads, and N one-thread sessions at once.
        cores = all_cores()
        parallel = {member.name for member in members if member.parallel_sessions}
        for member in members:
            loaded = settings + [cores] if member.name in parallel and cores not in settings else settings
            workers.append(Worker.spawn(member, texts, max_length, loaded))
        for worker in workers:
            worker.loaded()
        phase(f"{len(workers)} workers started and loaded")
        tasks = len(workers) * len(timings) + len(workers) * len(settings) + len(parallel)
        task = progress.add_task("benchmark", total=tasks) if progress else None
        samples, stopped = interleaved_latency(
            workers, len(texts), timings, stopping, warmup_runs, rng,
            (lambda text: progress.update(task, advance=1, description=text)) if progress else None,
        )
        phase("latency")
        throughput: dict[tuple[str, int], float] = {}
        for index in rng.permutation(len(workers)):
            worker = workers[index]
            for threads in settings:
                throughput[(worker.name, threads)] = worker.ask(
                    op="throughput", threads=threads, batch_size=throughput_batch_size, batches=throughput_batches
                )["per_second"]
                if progress:
                    progress.update(task, advance=1, description=f"throughput: {worker.name}")
        phase("throughput")

        def stats(name: str, threads: int, end_to_end: bool) -> dict[str, Any]:
            key = (name, threads, end_to_end)
            return timing_stats(samples[key], stopped[key])

        results = {}
        for worker in workers:
            results[worker.name] = {
                "latency_ms": {str(t): stats(worker.name, t, False) for t in settings},
                "e2e_latency_ms": {"1": stats(worker.name, 1, True)},
                "throughput_per_second": {str(t): throughput[(worker.name, t)] for t in settings},
                # Before the side-by-side copies are loaded: the peak of the member as served alone.
                "peak_rss_mb": worker.ask(op="rss")["peak_rss_mb"],
                "imports_torch": worker.imports_torch,
            }
        batch = {"batch_size": throughput_batch_size, "batches": throughput_batches}
        for index in rng.permutation(len(workers)):
            worker = workers[index]
            if worker.name not in parallel:
                continue
            one_session = throughput.get((worker.name, cores)) or worker.ask(op="throughput", threads=cores, **batch)["per_second"]
            sessions = worker.ask(op="sessions_throughput", sessions=cores, **batch)["per_second"]
            results[worker.name]["all_cores_throughput"] = all_cores_layouts(cores, one_session, sessions)
            if progress:
                progress.update(task, advance=1, description=f"all-core layouts: {worker.name}")
        phase("all-core layouts")
        return results
    finally:
        for worker in workers:
            worker.stop()


# --------------------------------------------------------------------------- quiet machine

# Cores' worth of other work, per core, above which timings are likely disturbed by it.
BUSY_LOAD_PER_CORE = 0.5
BENCHMARK_LOCK = Path(tempfile.gettempdir()) / "fincompress-benchmark.lock"
# How long other processes' CPU use is sampled before timing starts.
OTHER_WORK_SAMPLE_SECONDS = 0.5


def load_average() -> list[float]:
    """The machine's 1, 5 and 15-minute load averages (empty where the OS has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def other_work_cores(seconds: float = OTHER_WORK_SAMPLE_SECONDS) -> float | None:
    """Cores' worth of CPU that other processes use now, sampled over `seconds` while this one sleeps
    (None where psutil cannot read it). Unlike the 1-minute load average, which decays for minutes and
    in `make run` still counts the export stage that ran just before the benchmark, it sees only work
    that is running when the timing starts."""
    import psutil

    try:
        return round(psutil.cpu_percent(interval=seconds) / 100 * all_cores(), 2)
    except (OSError, RuntimeError, psutil.Error):
        return None


@contextlib.contextmanager
def quiet_machine(lock_path: Path = BENCHMARK_LOCK) -> Iterator[dict[str, Any]]:
    """One benchmark per machine at a time (a second one waits), and the machine's load recorded beside
    the numbers: other processes' CPU use just before timing (which decides `busy` and the warning) and
    the load averages before and after."""
    from pipeline.io import exclusive_lock

    with exclusive_lock(lock_path, "its benchmark", wait=True):
        record: dict[str, Any] = {
            "other_work_cores_before": other_work_cores(),
            "load_average_before": load_average(),
            "cores": all_cores(),
        }
        yield record
        record["load_average_after"] = load_average()
    other, before = record["other_work_cores_before"], record["load_average_before"]
    # The load average only where the sample is missing: it counts the stage that ran just before.
    busy_cores = other if other is not None else (before[0] if before else 0.0)
    record["busy"] = busy_cores > BUSY_LOAD_PER_CORE * record["cores"]
    if record["busy"]:
        measured = (
            f"other processes used {other:.2f} of {record['cores']} cores in the "
            f"{OTHER_WORK_SAMPLE_SECONDS:g} s before timing"
            if other is not None
            else f"1-minute load average {busy_cores:.2f} on {record['cores']} cores"
        )
        log.warning(
            "the machine was busy when the benchmark started (%s): the timings are likely slower and noisier "
            "than on a quiet machine; re-run the benchmark when it is idle",
            measured,
        )
