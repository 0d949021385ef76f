"""Whether the teacher's ONNX export labels KD texts faster than the PyTorch teacher on this machine
(issue 24 allows the teacher_logits stage to use it where it is faster). Run in a workspace where
`make run` or `dvc repro` built models/teacher and models/teacher_onnx:

    python -m scripts.label_timing [--part transfer] [--threads 2] [--repeats 2] [--int8]

Both label the same texts in length-sorted batches of 128 with dynamic padding, through the project's
own batch predictors (pipeline.models.predict_logits, OnnxClassifier.logits, which sort by characters
and tokenize inside the timing), alternately; it prints each run's seconds and the largest logit
difference between the two. `--int8` adds a third labeller, the fp32 export quantized to dynamic INT8
as export_onnx quantizes the students (per channel, this CPU's instruction set), and prints the share
of its labels that equal PyTorch's: the export stage's parity gate asks 0.98.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data.prepared import load_prepared
from pipeline.export.onnx import OnnxClassifier
from pipeline.export.onnx_export import copy_serving_files, detect_isa, quantize_int8
from pipeline.models import load_trained_with_tokenizer, predict_logits

BATCH = 128  # the teacher_logits stage's batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    parser.add_argument("--onnx", type=Path, default=Path("models/teacher_onnx"))
    parser.add_argument("--part", choices=("train", "transfer"), default="transfer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--int8", action="store_true", help="also time a dynamic INT8 quantization of the export")
    args = parser.parse_args()
    prepared = load_prepared(args.prepared)
    texts = prepared.transfer_texts() if args.part == "transfer" else prepared.texts("train")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_trained_with_tokenizer(args.teacher, prepared.label_names)
    onnx = OnnxClassifier.load(args.onnx, intra_op_threads=args.threads)
    labellers = {
        "PyTorch": lambda: predict_logits(model, tokenizer, texts, args.max_length, batch_size=BATCH).numpy(),
        "ONNX Runtime": lambda: onnx.logits(texts, batch_size=BATCH),
    }
    if args.int8:
        scratch = tempfile.TemporaryDirectory(prefix="teacher_int8_")  # removed when main returns
        int8_dir = Path(scratch.name)
        quantize_int8(args.onnx, int8_dir, detect_isa(), per_channel=True, quantize_embeddings=False)
        copy_serving_files(args.onnx, int8_dir)
        int8 = OnnxClassifier.load(int8_dir, intra_op_threads=args.threads)
        labellers["ONNX INT8"] = lambda: int8.logits(texts, batch_size=BATCH)
    logits = {}
    print(f"{len(texts)} {args.part} texts, batches of {BATCH}, {args.threads} threads")
    for _ in range(args.repeats):
        for name, label in labellers.items():
            start = time.perf_counter()
            logits[name] = label()
            print(f"{name:13s} {time.perf_counter() - start:6.1f} s")
    print(f"largest logit difference {np.abs(logits['PyTorch'] - logits['ONNX Runtime']).max():.1e}")
    if args.int8:
        agreement = (logits["ONNX INT8"].argmax(1) == logits["PyTorch"].argmax(1)).mean()
        print(f"INT8: labels equal to PyTorch's {agreement:.3f}, "
              f"mean logit difference {np.abs(logits['PyTorch'] - logits['ONNX INT8']).mean():.3f}")


if __name__ == "__main__":
    main()
