"""Is the adaptive benchmark as trustworthy as a full-length one? Both on the same built family, side by
side in one session, each run `--repeats` times (alternating), then the speedups against the teacher,
their spread between repeats of the same harness, and how far the adaptive ones are from the full ones.

    python -m scripts.benchmark_stability [--params params.yaml] [--repeats 2] [--champion student_onnx_int8]

"Full length" is what the benchmark did before it became adaptive: 5 rounds, each visiting every member
for at least 40 runs and 1 s per thread setting and mode (so at least 200 runs and 5 s), 20 warm-up
calls. "Adaptive" is params' `benchmark` section. Same members, texts, throughput and layouts; the
load average is printed beside each run (latency figures are only comparable as ratios in one run).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_PARAMS_FILE, load_params
from pipeline.data.prepared import load_split
from pipeline.evaluation.family import REFERENCE
from pipeline.evaluation.latency import quiet_machine, run_benchmark
from pipeline.evaluation.stopping import Stopping, benchmark_stopping
from stages.benchmark import present_members

FULL_LENGTH = Stopping(min_runs=200, min_rounds=5, round_seconds=1.0)
FULL_LENGTH_WARMUP = 20


def speedups(result: dict[str, dict[str, Any]]) -> dict[str, float]:
    """p50 speedup of every member against the teacher, batch 1, 1 thread, model only."""
    teacher = result[REFERENCE]["latency_ms"]["1"]["p50"]
    return {name: teacher / timing["latency_ms"]["1"]["p50"] for name, timing in result.items()}


def spread(values: list[float]) -> float:
    """Largest over smallest, minus 1: 0.03 is a 3% spread."""
    return max(values) / min(values) - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark_stability", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="the built family's params file")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--champion", default="student_onnx_int8", help="the member whose speedup must hold")
    parser.add_argument("--out", type=Path, help="also write every run's figures here (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # rounds, phases
    params = load_params(args.params)
    cfg = params.benchmark
    texts = [row["text"] for row in load_split(params.path(params.paths.prepared), "test")]
    members = present_members(params)
    if args.champion not in {member.name for member in members}:
        print(f"error: {args.champion} is not in the built family at {params.root}", file=sys.stderr)
        return 1
    harnesses = {"full": (FULL_LENGTH, FULL_LENGTH_WARMUP), "adaptive": (benchmark_stopping(cfg), cfg.warmup_runs)}
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        # Alternate which goes first, so a trend in the machine's load does not favour one harness.
        order = list(harnesses) if repeat % 2 == 0 else list(reversed(harnesses))
        for name in order:
            rule, warmup = harnesses[name]
            with quiet_machine() as load:
                began = time.perf_counter()
                result = run_benchmark(members, texts, params.task.max_length, cfg.threads, rule, warmup,
                                       cfg.throughput_batch_size, cfg.throughput_batches, cfg.seed + repeat)
                seconds = time.perf_counter() - began
            runs.append({"harness": name, "repeat": repeat, "seconds": seconds, "load": load,
                         "speedups": speedups(result),
                         "runs": {member: timing["latency_ms"]["1"]["runs"] for member, timing in result.items()}})
            print(f"{name:>8} run {repeat + 1}: {seconds:6.1f} s, load average {load['load_average_before']} -> "
                  f"{load['load_average_after']}, {args.champion} speedup "
                  f"{runs[-1]['speedups'][args.champion]:.2f}x", flush=True)

    print()
    print(f"{'member':<26}" + "".join(f"{r['harness'][:4]}{r['repeat'] + 1:>7}" for r in runs)
          + f"{'spread full':>13}{'spread adapt':>14}{'adapt/full':>12}")
    for member in runs[0]["speedups"]:
        by = {name: [r["speedups"][member] for r in runs if r["harness"] == name] for name in harnesses}
        ratio = (sum(by["adaptive"]) / len(by["adaptive"])) / (sum(by["full"]) / len(by["full"])) - 1
        print(f"{member:<26}" + "".join(f"{r['speedups'][member]:10.2f}x" for r in runs)
              + f"{spread(by['full']):12.1%}{spread(by['adaptive']):14.1%}{ratio:+12.1%}")
    print()
    print("runs at 1 thread, model only: " + "; ".join(
        f"{r['harness']} {r['repeat'] + 1}: " + ", ".join(f"{m} {n}" for m, n in r["runs"].items()) for r in runs))
    print("seconds: " + ", ".join(f"{r['harness']} {r['repeat'] + 1} {r['seconds']:.0f}" for r in runs))
    if args.out:
        args.out.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
