"""OpenVINO against the served ONNX Runtime INT8 member, batch 1, one thread, side by side.

    pip install openvino          # not a project dependency: this script is how we decided it need not be
    python -m scripts.compare_openvino models/student_onnx [--static-dir models/student_onnx/int8_static]
        [--texts data.csv] [--static-length 32] [--rounds 6] [--fp16]

MEMBER_DIR is an export_onnx output (fp32/ and int8/ inside). Timed in alternating rounds over the same
texts (the last 120 of --texts), model call only (inputs built beforehand), as scripts/profile_onnx.py times ONNX Runtime:

- ort_int8: the served INT8 model (pipeline.export.onnx sessions, one intra-op thread);
- ort_fp32: the fp32 export in the same kind of session;
- ov_fp32 / ov_bf16: OpenVINO's CPU plugin on the fp32 export at that inference precision (bf16 runs on
  CPUs with AVX512_BF16 or AMX);
- with --fp16, for CPUs with AVX512_FP16: ov_fp16 (OpenVINO at f16 inference precision) and ort_fp16
  (ONNX Runtime on the fp32 export converted to fp16, inputs and outputs kept as they were);
- ov_int8: OpenVINO on a static QDQ INT8 export (`export_onnx.quantization: both` writes int8_static/),
  which OpenVINO runs with its own int8 kernels.

With --static-length N the OpenVINO models are reshaped to [1, N] and every text padded to N tokens
(OpenVINO's CPU plugin is faster on static shapes); ONNX Runtime keeps its unpadded inputs, as served.
Prints each runner's p50, its ratio to ort_int8, and its label agreement with ort_fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.export.onnx import MODEL_FILE, OnnxClassifier, session_options
from scripts.profile_onnx import DEMO, read_texts

Feed = dict[str, np.ndarray]


def openvino_runner(
    model_path: Path, precision: str, static_length: int | None
) -> Callable[[Feed], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(model_path))
    if static_length:
        model.reshape({port.get_any_name(): [1, static_length] for port in model.inputs})
    config = {
        "INFERENCE_NUM_THREADS": 1,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision,
    }
    request = core.compile_model(model, "CPU", config).create_infer_request()
    names = [port.get_any_name() for port in model.inputs]

    def run(feed: Feed) -> np.ndarray:
        request.infer({name: feed[name] for name in names})
        return request.get_output_tensor(0).data.copy()

    return run


def fp16_session(fp32_model: Path) -> Any:
    """A one-thread session like the served ones (`session_options`) on `fp32_model` converted to fp16
    in memory (ONNX Runtime's transformer converter; inputs and outputs keep their types)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_model)), keep_io_types=True)
    return ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])


def padded(feed: Feed, length: int) -> Feed:
    """The feed right-padded (id 0, mask 0) or cut to `length` tokens."""
    out = {}
    for name, array in feed.items():
        grown = np.zeros((1, length), dtype=array.dtype)
        grown[:, : min(length, array.shape[1])] = array[:, :length]
        out[name] = grown
    return out


Runners = dict[str, tuple[Callable[[Any], Any], list[Any]]]  # name -> (call one input, its inputs)


def time_interleaved(runners: Runners, rounds: int) -> dict[str, list[float]]:
    """Milliseconds of every call of each runner over its inputs, the runners taken in rounds whose
    order flips each time, so load on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(rounds):
        order = list(runners.items()) if round_index % 2 == 0 else list(runners.items())[::-1]
        for name, (run, inputs) in order:
            for item in inputs:
                tick = time.perf_counter_ns()
                run(item)
                times[name].append((time.perf_counter_ns() - tick) / 1e6)
    return times


def print_side_by_side(runners: Runners, times: dict[str, list[float]], reference: list[int], against: str) -> None:
    """Each runner's p50, its ratio to the first runner's (the served member) and how often its label
    (the argmax of what it returns, NumPy or torch) equals `reference`'s, computed by `against`."""
    base_name = next(iter(runners))
    base = statistics.median(times[base_name])
    for name, (run, inputs) in runners.items():
        agreement = np.mean([int(np.asarray(run(item)).argmax()) == label for item, label in zip(inputs, reference)])
        p50 = statistics.median(times[name])
        print(f"{name:14s} p50 {p50:.3f} ms  {p50 / base:.2f}x {base_name}  labels as {against}: {agreement:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("member_dir", type=Path, help="an export_onnx output with fp32/ and int8/")
    parser.add_argument(
        "--static-dir", type=Path, help="a static QDQ INT8 directory (OpenVINO runs it as int8)"
    )
    parser.add_argument("--texts", type=Path, default=DEMO, help="a CSV file with a `text` column")
    parser.add_argument("--static-length", type=int, help="reshape OpenVINO's models to [1, N] and pad to N")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--fp16", action="store_true", help="add OpenVINO f16 and ONNX Runtime on an fp16 conversion")
    args = parser.parse_args()

    texts = read_texts(args.texts)[-120:]
    ort_int8 = OnnxClassifier.load(args.member_dir / "int8", intra_op_threads=1)
    ort_fp32 = OnnxClassifier.load(args.member_dir / "fp32", intra_op_threads=1)
    feeds = [ort_fp32.feed([text]) for text in texts]
    ov_feeds = [padded(feed, args.static_length) for feed in feeds] if args.static_length else feeds
    runners: Runners = {
        "ort_int8": (lambda feed: ort_int8.session.run(None, feed)[0], feeds),
        "ort_fp32": (lambda feed: ort_fp32.session.run(None, feed)[0], feeds),
    }
    fp32_model = args.member_dir / "fp32" / MODEL_FILE
    openvino_models = [("ov_fp32", fp32_model, "f32"), ("ov_bf16", fp32_model, "bf16")]
    if args.fp16:
        ort_fp16 = fp16_session(fp32_model)
        runners["ort_fp16"] = (lambda feed: ort_fp16.run(None, feed)[0], feeds)
        openvino_models.append(("ov_fp16", fp32_model, "f16"))
    if args.static_dir:
        openvino_models.append(("ov_int8", args.static_dir / MODEL_FILE, "f32"))
    for name, path, precision in openvino_models:
        runners[name] = (openvino_runner(path, precision, args.static_length), ov_feeds)

    reference = [int(ort_fp32.session.run(None, feed)[0].argmax()) for feed in feeds]
    print_side_by_side(runners, time_interleaved(runners, args.rounds), reference, "ort_fp32")


if __name__ == "__main__":
    main()
