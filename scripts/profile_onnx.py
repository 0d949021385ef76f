"""Where the time of an exported ONNX member goes: ONNX Runtime's profiler over real texts, batch 1.

    python scripts/profile_onnx.py MODEL_DIR [MODEL_DIR ...] [--texts data.csv] [--runs 300] [--threads 1]
    python scripts/profile_onnx.py MODEL_DIR [MODEL_DIR ...] --floor

With --floor it profiles nothing: it prints each directory's multiply-adds per text at the texts'
median token count (from config.json: a BERT-like encoder, pruned heads and FFN included) and the
compute floor that sets at the INT8 (u8 x s8) and fp32 GEMM rates ONNX Runtime reaches on one core of
this CPU, measured here on large MatMulInteger / MatMul products (the best of 30 tries).

For each directory (any export_onnx output: models/student_onnx/fp32, .../int8, .../int8_static, ...)
it prints, per session call at batch 1:

- the session call's p50 on a plain (unprofiled) session: the latency as served;
- how a profiled call splits: time inside op kernels, time in the executor between kernels (dispatch,
  allocation) and time outside the executor's run (Python binding, input and output copies);
- per op type as ONNX Runtime runs it (after its own load-time fusions, so e.g. MatMulIntegerToFloat,
  DynamicQuantizeLinear, QLinearMatMul): milliseconds per call, share of the kernel time, node count;
- the `--top` slowest nodes.

All directories are loaded first and timed in alternating rounds, so load on a shared machine hits
them alike; compare directories within one run only. Times are medians over calls (one preempted call
must not move them). The profiler adds a few microseconds per kernel, so a profiled call is slower than
the plain one and small ops look larger than they are: read the op times as shares, and the plain p50
as the latency. Texts: the `text` column of `--texts` (default: the bundled demo set), one per call.

A directory may end in `@KEY=VALUE`: an ONNX Runtime session config entry for its sessions only, on top
of the served ones (pipeline.export.onnx.session_options). E.g. `.../int8@optimization.disable_specified_optimizers=`
runs it with every ORT fusion on, as served before SkipLayerNormFusion was disabled.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from pipeline.errors import FinCompressError
from pipeline.export.onnx import MODEL_FILE, TOKENIZER_FILE, OnnxClassifier, session_options

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "financial_news_sentiment.csv"
KERNEL_SUFFIX = "_kernel_time"


@dataclass
class Profile:
    """One directory's timings: plain calls, and the profiled calls with their profiler events."""

    name: str
    call_ms: list[float] = field(default_factory=list)  # plain session
    feed_ms: list[float] = field(default_factory=list)  # tokenizer + int64 input arrays
    profiled_call_ms: list[float] = field(default_factory=list)
    run_ms: list[float] = field(default_factory=list)  # the profiler's model_run, per profiled call
    kernel_ms: list[float] = field(default_factory=list)  # sum of the kernels, per profiled call
    node_ms: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))  # (node, op type)

    def node_medians(self) -> dict[tuple[str, str], float]:
        return {key: float(np.median(values)) for key, values in self.node_ms.items()}

    def op_medians(self) -> dict[str, tuple[float, int]]:
        """Per op type: the sum of its nodes' median times, and how many nodes it has."""
        ops: dict[str, tuple[float, int]] = {}
        for (_, op), ms in self.node_medians().items():
            total, count = ops.get(op, (0.0, 0))
            ops[op] = (total + ms, count + 1)
        return ops


# --------------------------------------------------------------------------- the compute floor


def encoder_macs(config: dict[str, Any], tokens: int) -> int:
    """Multiply-adds of one text of `tokens` tokens through a BERT-like encoder classifier: per layer the
    Q, K, V and output projections over its attention width (heads kept x head size), the two
    attention products and the FFN; then the pooler and classifier on one token."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_size = hidden // heads
    pruned = config.get("pruned_heads") or {}
    macs = 0
    for layer in range(config["num_hidden_layers"]):
        width = (heads - len(pruned.get(str(layer), []))) * head_size
        macs += tokens * hidden * width * 4 + 2 * tokens * tokens * width + 2 * tokens * hidden * config["intermediate_size"]
    return macs + hidden * hidden + hidden * len(config.get("id2label", {0: 0, 1: 1}))


def gemm_peak(int8: bool, tries: int = 30, m: int = 256, k: int = 1024, n: int = 1024) -> float:
    """Multiply-adds per second of ONNX Runtime's MatMulInteger (u8 x s8) or fp32 MatMul on one thread,
    on an (m x k) by (k x n) product: the best of `tries` timings of 5 calls (a capacity: on a shared
    machine the best try is the one least disturbed)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        weight = numpy_helper.from_array(rng.integers(-128, 128, (k, n), dtype=np.int8), "w")
        node, x_type, x = helper.make_node("MatMulInteger", ["x", "w"], ["y"]), TensorProto.UINT8, rng.integers(0, 256, (m, k), dtype=np.uint8)
    else:
        weight = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
        node, x_type, x = helper.make_node("MatMul", ["x", "w"], ["y"]), TensorProto.FLOAT, rng.standard_normal((m, k), dtype=np.float32)
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("x", x_type, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32 if int8 else TensorProto.FLOAT, [m, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(tries):
        tick = time.perf_counter()
        for _ in range(5):
            session.run(None, {"x": x})
        best = min(best, (time.perf_counter() - tick) / 5)
    return m * k * n / best


def print_floor(model_dirs: list[Path], texts: list[str]) -> None:
    int8_peak, fp32_peak = gemm_peak(True), gemm_peak(False)
    print(f"one core: INT8 GEMM {int8_peak / 1e9:.0f} GMAC/s, fp32 GEMM {fp32_peak / 1e9:.0f} GMAC/s "
          "(ONNX Runtime MatMulInteger / MatMul, 256x1024x1024, best of 30)")
    for model_dir in model_dirs:  # any model directory with config.json and tokenizer.json (PyTorch ones too)
        tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        tokens = int(np.median([len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]))
        macs = encoder_macs(json.loads((model_dir / "config.json").read_text()), tokens)
        print(f"{model_dir}: {macs / 1e6:.1f} M multiply-adds at {tokens} tokens (the texts' median); floor "
              f"{macs / int8_peak * 1e3:.3f} ms at the INT8 rate, {macs / fp32_peak * 1e3:.3f} ms at the fp32 rate")


# --------------------------------------------------------------------------- the profile


def read_texts(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["text"] for row in csv.DictReader(handle) if row["text"].strip()]


def summarise_events(events: list[dict[str, Any]], skip_runs: int, profile: Profile) -> None:
    """Add the runs after the first `skip_runs` (warm-up) of a profile's events to `profile`."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    runs = runs[skip_runs:]
    if not runs:
        return
    starts = np.array([run["ts"] for run in runs])
    kernels = np.zeros(len(runs))
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith(KERNEL_SUFFIX):
            continue
        index = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if index < 0 or event["ts"] > runs[index]["ts"] + runs[index]["dur"]:
            continue  # a warm-up run's kernel
        node = event["name"][: -len(KERNEL_SUFFIX)]
        profile.node_ms[(node, event["args"].get("op_name", "?"))].append(event["dur"] / 1000)
        kernels[index] += event["dur"] / 1000
    profile.run_ms += [run["dur"] / 1000 for run in runs]
    profile.kernel_ms += kernels.tolist()


def report(profile: Profile, top: int) -> None:
    median = lambda values: float(np.median(values))  # noqa: E731
    call, profiled = median(profile.call_ms), median(profile.profiled_call_ms)
    run, kernels = median(profile.run_ms), median(profile.kernel_ms)
    print(f"\n== {profile.name}")
    print(f"session call p50 {call:.3f} ms (plain session, {len(profile.call_ms)} calls); "
          f"inputs built from the text in {median(profile.feed_ms):.3f} ms p50")
    print(f"profiled call p50 {profiled:.3f} ms: kernels {kernels:.3f} ({kernels / profiled:.0%}), executor between "
          f"kernels {run - kernels:.3f} ({(run - kernels) / profiled:.0%}), outside the run {profiled - run:.3f} "
          f"({(profiled - run) / profiled:.0%})")
    per_op = profile.op_medians()
    total = sum(ms for ms, _ in per_op.values())
    print(f"{len(profile.node_ms)} kernels per call")
    print(f"{'op type':<32}{'ms/call':>9}{'share':>8}{'nodes':>7}")
    for op, (ms, count) in sorted(per_op.items(), key=lambda item: -item[1][0]):
        print(f"{op:<32}{ms:>9.4f}{ms / total:>8.1%}{count:>7}")
    print(f"slowest {top} nodes (median ms per call):")
    for (node, op), ms in sorted(profile.node_medians().items(), key=lambda item: -item[1])[:top]:
        print(f"  {ms:8.4f} ms  {op:<28} {node}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR", help="exported directories [@KEY=VALUE]")
    parser.add_argument("--texts", type=Path, default=DEMO, help="a CSV file with a `text` column")
    parser.add_argument("--runs", type=int, default=300, help="timed calls per directory (each session)")
    parser.add_argument("--rounds", type=int, default=6, help="the calls are split into this many alternating rounds")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per session first")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: every core)")
    parser.add_argument("--top", type=int, default=15, help="slowest nodes to list")
    parser.add_argument("--keep-profiles", action="store_true", help="keep ONNX Runtime's profile JSON files")
    parser.add_argument("--floor", action="store_true", help="print multiply-adds and the compute floor instead")
    args = parser.parse_args(argv)
    texts = read_texts(args.texts)
    # MODEL_DIR[@KEY=VALUE]: a directory and, optionally, a session config entry to time it with.
    specs = [(Path(directory), entry) for directory, _, entry in (spec.partition("@") for spec in args.model_dirs)]
    if args.floor:
        print_floor([model_dir for model_dir, _ in specs], texts)
        return
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores; "
          f"onnxruntime {ort.__version__}; batch 1, {args.threads or os.cpu_count()} intra-op thread(s)")

    # Every directory is checked (its plain session, as served) before any profiled session exists: a
    # profiled session writes its profile file when it ends, also when a later directory fails to load.
    plain = [OnnxClassifier.load(model_dir, intra_op_threads=args.threads) for model_dir, _ in specs]
    loaded = []
    for spec, (model_dir, entry), classifier in zip(args.model_dirs, specs, plain):
        sessions = []
        for profiling in (False, True):
            options = session_options(args.threads)
            if entry:
                options.add_session_config_entry(*entry.split("=", 1))
            options.enable_profiling = profiling
            options.profile_file_prefix = f"onnx_profile_{model_dir.name}"
            sessions.append(ort.InferenceSession(str(model_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"]))
        classifier.session, profiled = sessions
        feeds = [classifier.feed([text]) for text in texts]
        for i in range(args.warmup):
            classifier.session.run(None, feeds[i % len(feeds)])
            profiled.run(None, feeds[i % len(feeds)])
        loaded.append((Profile(str(spec)), classifier, profiled, feeds))

    per_round = max(1, args.runs // args.rounds)
    for round_index in range(args.rounds):
        for profile, classifier, profiled, feeds in loaded if round_index % 2 == 0 else loaded[::-1]:
            for i in range(round_index * per_round, (round_index + 1) * per_round):
                tick = time.perf_counter_ns()
                classifier.feed([texts[i % len(texts)]])
                profile.feed_ms.append((time.perf_counter_ns() - tick) / 1e6)
                for session, samples in ((classifier.session, profile.call_ms), (profiled, profile.profiled_call_ms)):
                    tick = time.perf_counter_ns()
                    session.run(None, feeds[i % len(feeds)])
                    samples.append((time.perf_counter_ns() - tick) / 1e6)

    for profile, _, profiled, _ in loaded:
        path = Path(profiled.end_profiling())
        summarise_events(json.loads(path.read_text()), args.warmup, profile)
        if not args.keep_profiles:
            path.unlink()
        report(profile, args.top)
    print(f"\nload average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    try:
        main()
    except FinCompressError as error:
        raise SystemExit(f"error: profile_onnx: {error}") from None
