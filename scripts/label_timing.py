"""Whether the teacher's ONNX export labels KD texts faster than the PyTorch teacher on this machine
(issue 24 allows the teacher_logits stage to use it where it is faster). Run in a workspace where
`make run` or `dvc repro` built models/teacher and models/teacher_onnx:

    python -m scripts.label_timing [--part transfer] [--threads 2] [--repeats 2]

Both label the same texts in the stage's way (length-sorted batches of 128, dynamic padding), timed
alternately; it prints each run's seconds and the largest logit difference between the two.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pipeline.data.prepared import load_prepared
from pipeline.export.onnx import MODEL_FILE
from pipeline.models import load_trained_with_tokenizer


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
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [[texts[i] for i in order[start:start + 128]] for start in range(0, len(order), 128)]
    torch.set_num_threads(args.threads)
    model, tokenizer = load_trained_with_tokenizer(args.teacher, prepared.label_names)
    model.eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.onnx / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]

    def encode(batch: list[str], kind: str):
        return tokenizer(batch, padding=True, truncation=True, max_length=args.max_length, return_tensors=kind)

    @torch.no_grad()
    def with_torch() -> np.ndarray:
        return np.concatenate([model(**encode(b, "pt")).logits.numpy() for b in batches])

    def with_onnx() -> np.ndarray:
        return np.concatenate([
            session.run(None, {k: v.astype(np.int64) for k, v in encode(b, "np").items() if k in inputs})[0] for b in batches
        ])

    logits = {}
    print(f"{len(texts)} {args.part} texts, {len(batches)} batches, {args.threads} threads")
    for _ in range(args.repeats):
        for name, label in (("PyTorch", with_torch), ("ONNX Runtime", with_onnx)):
            start = time.perf_counter()
            logits[name] = label()
            print(f"{name:13s} {time.perf_counter() - start:6.1f} s")
    print(f"largest logit difference {np.abs(logits['PyTorch'] - logits['ONNX Runtime']).max():.1e}")


if __name__ == "__main__":
    main()
