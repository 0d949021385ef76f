"""Whether the teacher's ONNX export labels KD texts faster than the PyTorch teacher on this machine
(issue 24 allows the teacher_logits stage to use it where it is faster). Run in a workspace where
`make run` or `dvc repro` built models/teacher and models/teacher_onnx:

    python -m scripts.label_timing [--part transfer] [--threads 2] [--repeats 2]

Both label the same texts in length-sorted batches of 128 with dynamic padding, through the project's
own batch predictors (pipeline.models.predict_logits, OnnxClassifier.logits, which sort by characters
and tokenize inside the timing), alternately; it prints each run's seconds and the largest logit
difference between the two.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data.prepared import load_prepared
from pipeline.export.onnx import OnnxClassifier
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
    logits = {}
    print(f"{len(texts)} {args.part} texts, batches of {BATCH}, {args.threads} threads")
    for _ in range(args.repeats):
        for name, label in labellers.items():
            start = time.perf_counter()
            logits[name] = label()
            print(f"{name:13s} {time.perf_counter() - start:6.1f} s")
    print(f"largest logit difference {np.abs(logits['PyTorch'] - logits['ONNX Runtime']).max():.1e}")


if __name__ == "__main__":
    main()
