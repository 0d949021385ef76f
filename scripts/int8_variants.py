"""Two INT8 variants the export stage does not build, written next to each other for scripts/profile_onnx.py.

    python -m scripts.int8_variants models/student_onnx/fp32 OUT_DIR
    python scripts/profile_onnx.py models/student_onnx/int8 OUT_DIR/mha_int8 OUT_DIR/head_fp32_int8

FP32_DIR is an export_onnx fp32 directory (model, config, tokenizer). Written to OUT_DIR:

- mha_int8: the transformer optimizer's MultiHeadAttention fusion instead of Attention. Q, K and V stay
  three MatMuls that dynamic INT8 quantizes, the attention core runs fp32 in one kernel; the served
  fused graph's QAttention does the QKV GEMM in INT8 inside the attention kernel.
- head_fp32_int8: the served fused graph with the pooler and the classifier (one-token GEMMs, where
  activation quantization costs more than the arithmetic) kept fp32.

Each is quantized as export_onnx quantizes (dynamic, per-channel, embeddings included) and printed with
its label agreement against FP32_DIR on the bundled demo texts (docs/performance.md has the measurements).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx

from pipeline.export.onnx_export import (
    MODEL_FILE,
    detect_isa,
    fuse_attention,
    quantize_int8,
)
from pipeline.export.predict import load_classifier
from scripts.profile_onnx import DEMO, read_texts


def head_nodes(model_dir: Path) -> list[str]:
    """The pooler's and the classifier's GEMM nodes of `model_dir`/model.onnx."""
    graph = onnx.load(str(model_dir / MODEL_FILE)).graph
    return [
        n.name for n in graph.node
        if n.op_type in ("MatMul", "Gemm") and ("pooler" in n.name or "classifier" in n.name)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32_dir", type=Path, metavar="FP32_DIR")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    args = parser.parse_args()
    isa = detect_isa()

    for multi_head, name in ((True, "mha_fp32"), (False, "fused_fp32")):
        fused = fuse_attention(args.fp32_dir, args.out_dir / name, multi_head=multi_head)
        if not fused:
            raise SystemExit(f"{args.fp32_dir}: no attention fused (not a BERT-like graph)")
        print(f"{name}:", fused)
    quantize_int8(args.out_dir / "mha_fp32", args.out_dir / "mha_int8", isa, per_channel=True, quantize_embeddings=True)

    excluded = head_nodes(args.out_dir / "fused_fp32")
    quantize_int8(
        args.out_dir / "fused_fp32", args.out_dir / "head_fp32_int8", isa, per_channel=True,
        quantize_embeddings=True, nodes_to_exclude=excluded,
    )
    print("kept fp32 in head_fp32_int8:", excluded)

    texts = read_texts(DEMO)
    reference = load_classifier(args.fp32_dir, threads=1).logits(texts).argmax(-1)
    for name in ("mha_int8", "head_fp32_int8"):
        labels = load_classifier(args.out_dir / name, threads=1).logits(texts).argmax(-1)
        agreement = float((labels == reference).mean())
        print(f"{name}: label agreement with fp32 {agreement:.3f} on {len(texts)} demo texts")


if __name__ == "__main__":
    main()
