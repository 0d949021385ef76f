"""torch.compile (Inductor, the CPU backend that fuses a layer's small ops into generated C++ kernels)
against the served ONNX Runtime INT8 member, batch 1, one thread, side by side.

    python -m scripts.compare_inductor models/student_pruned models/student_onnx [--static-length 32]
        [--texts data.csv] [--rounds 6]

TORCH_DIR is the PyTorch member the ONNX export was made from (the demo: models/student_pruned);
MEMBER_DIR an export_onnx output (fp32/ and int8/ inside). Timed in alternating rounds over the same
texts (the last 120 of --texts), model call only (inputs built beforehand), as scripts/profile_onnx.py
and scripts/compare_openvino.py time ONNX Runtime:

- ort_int8: the served INT8 model (pipeline.export.onnx sessions, one intra-op thread);
- torch_eager: the PyTorch member as the benchmark stage runs it (fp32, no compile);
- inductor_fp32 / inductor_bf16: torch.compile with weight freezing, fp32 or under bf16 autocast (AMX
  or AVX512_BF16 CPUs), every text padded to --static-length tokens (one compiled graph, no
  recompiles; ONNX Runtime keeps its unpadded inputs, as served).

Prints each runner's p50, its ratio to ort_int8 and its label agreement with the eager fp32 model.
Not a project dependency: this script is how the question "would another runtime's fusion beat ONNX
Runtime's INT8 here" gets answered with a number (docs/performance.md).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.export.onnx import OnnxClassifier
from pipeline.models import load_trained_with_tokenizer
from scripts.compare_openvino import Runners, padded, print_side_by_side, time_interleaved
from scripts.profile_onnx import DEMO, read_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("torch_dir", type=Path, metavar="TORCH_DIR")
    parser.add_argument("member_dir", type=Path, metavar="MEMBER_DIR", help="an export_onnx output with int8/")
    parser.add_argument("--texts", type=Path, default=DEMO, help="a CSV file with a `text` column")
    parser.add_argument("--static-length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights become constants: prepacked GEMMs, folded ops

    texts = read_texts(args.texts)[-120:]
    ort_int8 = OnnxClassifier.load(args.member_dir / "int8", intra_op_threads=1)
    feeds = [ort_int8.feed([text]) for text in texts]
    model, _ = load_trained_with_tokenizer(args.torch_dir)
    model.eval()
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in feeds[0]]
    eager_inputs = [{n: torch.from_numpy(feed[n]) for n in names} for feed in feeds]
    static_inputs = [{n: torch.from_numpy(feed[n]) for n in names}
                     for feed in (padded(f, args.static_length) for f in feeds)]

    def compiled(precision: str) -> Callable[[dict], torch.Tensor]:
        graph = torch.compile(model, dynamic=False)

        @torch.inference_mode()
        def run(inputs: dict) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                return graph(**inputs).logits.float()

        started = time.perf_counter()
        run(static_inputs[0])
        print(f"inductor_{precision}: compiled in {time.perf_counter() - started:.0f} s")
        return run

    @torch.inference_mode()
    def eager(inputs: dict) -> torch.Tensor:
        return model(**inputs).logits

    runners: Runners = {
        "ort_int8": (lambda feed: ort_int8.session.run(None, feed)[0], feeds),
        "torch_eager": (eager, eager_inputs),
        "inductor_fp32": (compiled("fp32"), static_inputs),
    }
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        runners["inductor_bf16"] = (compiled("bf16"), static_inputs)

    reference = [int(eager(inputs).argmax()) for inputs in eager_inputs]
    print_side_by_side(runners, time_interleaved(runners, args.rounds), reference, "torch fp32")


if __name__ == "__main__":
    main()
