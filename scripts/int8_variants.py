"""INT8 variants the export stage does not build, written next to each other for scripts/profile_onnx.py.

    python -m scripts.int8_variants models/student_onnx/fp32 OUT_DIR [--texts VALIDATION.csv TEST.csv]
    python scripts/profile_onnx.py models/student_onnx/int8 OUT_DIR/mha_int8 OUT_DIR/head_fp32_int8 ...

FP32_DIR is an export_onnx fp32 directory (model, config, tokenizer). Written to OUT_DIR:

- mha_int8: the transformer optimizer's MultiHeadAttention fusion instead of Attention. Q, K and V stay
  three MatMuls that dynamic INT8 quantizes, the attention core runs fp32 in one kernel; the served
  fused graph's QAttention does the QKV GEMM in INT8 inside the attention kernel.
- head_fp32_int8: the served fused graph with the pooler and the classifier (one-token GEMMs, where
  activation quantization costs more than the arithmetic) kept fp32.
- fastgelu_int8: the served fused graph with the optimizer's GELU approximation (FastGelu, tanh)
  instead of BiasGelu (erf).
- int4_embeddings_bN (N = 32, 64, 128): the fused graph without the embedding LayerNorm fusion, its
  MatMuls dynamic INT8 with s8 weights, then the embedding tables' Gathers int4 in blocks of N
  (ONNX Runtime's GatherBlockQuantized, symmetric): the word embeddings are most of a small member's
  size. Needs `pip install onnx_ir` (ONNX Runtime's weight-only quantizer imports it).

Each is quantized as export_onnx quantizes (dynamic, per-channel) and printed with its size and its
label agreement against FP32_DIR on each CSV of --texts (a `text` column; default: the bundled demo
texts). docs/performance.md has the measurements.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx

from pipeline.export.onnx import onnx_size_mb
from pipeline.export.onnx_export import (
    MODEL_FILE,
    copy_serving_files,
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


def int4_embeddings(int8_dir: Path, out_dir: Path, block_size: int) -> None:
    """`int8_dir` with every embedding table's Gather int4 (GatherBlockQuantized), written to `out_dir`."""
    from onnxruntime.quantization import QuantFormat

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
    except ModuleNotFoundError as error:  # onnx_ir: imported by the quantizer, not a FinCompress dependency
        raise SystemExit(f"int4 embeddings need ONNX Runtime's weight-only quantizer: {error}; pip install onnx_ir") from error

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),),  # blocks along the hidden axis
    )
    quantizer = MatMulNBitsQuantizer(onnx.load(str(int8_dir / MODEL_FILE)), algo_config=config)
    quantizer.process()
    copy_serving_files(int8_dir, out_dir)
    quantizer.model.save_model_to_file(str(out_dir / MODEL_FILE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32_dir", type=Path, metavar="FP32_DIR")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--texts", type=Path, nargs="+", default=[DEMO], help="CSV files with a text column")
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

    print("fastgelu_fp32:", fuse_attention(args.fp32_dir, args.out_dir / "fastgelu_fp32", gelu_approximation=True))
    quantize_int8(args.out_dir / "fastgelu_fp32", args.out_dir / "fastgelu_int8", isa, per_channel=True, quantize_embeddings=True)

    print("fused_gather_fp32:", fuse_attention(args.fp32_dir, args.out_dir / "fused_gather_fp32", embed_layer_norm=False))
    quantize_int8(
        args.out_dir / "fused_gather_fp32", args.out_dir / "int8_gather_fp32", isa, per_channel=True,
        quantize_embeddings=False, signed_weights=True,
    )
    blocks = (32, 64, 128)
    for block in blocks:
        int4_embeddings(args.out_dir / "int8_gather_fp32", args.out_dir / f"int4_embeddings_b{block}", block)

    built = ["mha_int8", "head_fp32_int8", "fastgelu_int8", "int8_gather_fp32"] + [f"int4_embeddings_b{block}" for block in blocks]
    fp32 = load_classifier(args.fp32_dir, threads=1)
    variants = {name: load_classifier(args.out_dir / name, threads=1) for name in built}
    for path in args.texts:
        texts = read_texts(path)
        reference = fp32.logits(texts).argmax(-1)
        for name, classifier in variants.items():
            differ = int((classifier.logits(texts).argmax(-1) != reference).sum())
            print(f"{name}: {onnx_size_mb(args.out_dir / name):.2f} MB, label agreement with fp32 "
                  f"{1 - differ / len(texts):.3f} ({differ} of {len(texts)} {path.name} texts differ)")


if __name__ == "__main__":
    main()
