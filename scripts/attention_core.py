"""ONNX Runtime's CPU attention core at batch 1, timed alone: one MultiHeadAttention node against the
leanest graph of standard ops that does the same (every head in one batched MatMul).

    python -m scripts.attention_core [--tokens 25] [--heads 12] [--head-size 32]

Both take Q, K and V ([1, tokens, heads x head size], random) and return the attention output; the
lean graph is Reshape + Transpose of each, FusedMatMul (Q K^T, scaled), Softmax, MatMul, Transpose,
Reshape: eleven kernels where MultiHeadAttention loops over the heads in one. It asks whether a
hand-built graph could beat the fused attention kernels of the served INT8 member (docs/performance.md):
the two are printed side by side with a graph that only copies its input (the session call's own cost).
One intra-op thread, alternating rounds.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from scripts.compare_openvino import Runners, time_interleaved


def value(name: str, width: int):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "tokens", width])


def model(nodes: list, inputs: list[str], width: int, initializers: tuple = ()) -> bytes:
    graph = helper.make_graph(nodes, "attention", [value(n, width) for n in inputs], [value("out", width)], list(initializers))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def multi_head(heads: int, width: int) -> bytes:
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=heads)
    return model([node], ["q", "k", "v"], width)


def lean(heads: int, head_size: int) -> bytes:
    width = heads * head_size
    split = helper.make_tensor("split", TensorProto.INT64, [4], [1, -1, heads, head_size])
    merge = helper.make_tensor("merge", TensorProto.INT64, [3], [1, -1, width])
    nodes = []
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):  # K comes out transposed
        nodes += [helper.make_node("Reshape", [name, "split"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=perm)]
    nodes += [
        helper.make_node("FusedMatMul", ["qt", "kt"], ["scores"], domain="com.microsoft", alpha=float(head_size ** -0.5)),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vt"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merge"], ["out"]),
    ]
    return model(nodes, ["q", "k", "v"], width, (split, merge))


def identity(width: int) -> bytes:
    return model([helper.make_node("Identity", ["q"], ["out"])], ["q"], width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=25, help="sequence length (the demo texts' median is 25)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200, help="calls per graph per round")
    args = parser.parse_args()
    width = args.heads * args.head_size
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    graphs = {
        "MultiHeadAttention (one kernel)": multi_head(args.heads, width),
        "lean graph (11 kernels)": lean(args.heads, args.head_size),
        "Identity (the session call alone)": identity(width),
    }
    sessions = {name: ort.InferenceSession(g, options, providers=["CPUExecutionProvider"]) for name, g in graphs.items()}
    rng = np.random.default_rng(0)
    feed = {name: rng.standard_normal((1, args.tokens, width)).astype(np.float32) for name in "qkv"}
    feeds = {name: {k: v for k, v in feed.items() if k in [i.name for i in s.get_inputs()]} for name, s in sessions.items()}
    reference, leaned = (sessions[n].run(None, feeds[n])[0] for n in list(sessions)[:2])
    print(f"{args.tokens} tokens, {args.heads} heads x {args.head_size}; largest difference of the two outputs "
          f"{np.abs(reference - leaned).max():.1e}")
    runners: Runners = {name: (lambda feed, s=session: s.run(None, feed), [feeds[name]] * args.calls)
                        for name, session in sessions.items()}
    for name, values in time_interleaved(runners, args.rounds).items():
        print(f"{name:36s} p50 {np.median(values) * 1e3:6.1f} us")


if __name__ == "__main__":
    main()
