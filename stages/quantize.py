"""PyTorch dynamic INT8 of the pruned student: nn.Linear weights to qint8, activations quantized on the
fly. Evaluated on validation and test; saved as safetensors (see pipeline/quantization.py for why and
how) and reloaded once to prove the saved model gives the very same logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from pipeline import tracking
from pipeline.config import Params
from pipeline.data import load_manifest, load_split
from pipeline.errors import ModelError
from pipeline.io import atomic_dir, write_json
from pipeline.labels import encode
from pipeline.metrics import evaluate_logits, summary
from pipeline.models import (
    INFO_FILE,
    count_parameters,
    decision_thresholds,
    load_trained_with_tokenizer,
    predict_logits,
    weights_size_mb,
)
from pipeline.quantization import (
    FORMAT,
    INT8_WEIGHTS_FILE,
    load_quantized,
    quantize_model,
    resolve_engine,
    save_quantized,
)
from pipeline.stage import main

STAGE = "quantize"


def run(params: Params) -> dict[str, Any]:
    """Read paths.pruned, write its dynamic INT8 version to paths.quantized."""
    task = params.task
    prepared = params.path(params.paths.prepared)
    manifest = load_manifest(prepared)
    names = manifest["label_names"]
    source = params.path(params.paths.pruned)
    model, tokenizer = load_trained_with_tokenizer(source, names)
    engine = resolve_engine(params.quantize.engine)
    quantized = quantize_model(model, engine)

    max_length = params.teacher.max_length
    thresholds = decision_thresholds(model, task.threshold)
    results, texts = {}, {}
    for split in ("validation", "test"):
        rows = load_split(prepared, split)
        texts[split] = [row["text"] for row in rows]
        logits = predict_logits(quantized, tokenizer, texts[split], max_length).numpy()
        labels = np.asarray([encode(row["label"], names, task.type) for row in rows])
        results[split] = evaluate_logits(logits, labels, names, task.type, params.evaluation, thresholds)

    out = params.path(params.paths.quantized)
    with atomic_dir(out) as tmp:
        save_quantized(quantized, tmp, engine)
        tokenizer.model_max_length = max_length  # consumers tokenize as the evaluation did
        tokenizer.save_pretrained(tmp)
        check_reload(quantized, tmp, tokenizer, texts["validation"][:32], max_length)
        size_mb = (tmp / INT8_WEIGHTS_FILE).stat().st_size / 1e6
        source_size_mb = weights_size_mb(source)
        info = {
            "format": FORMAT,
            "weights_file": INT8_WEIGHTS_FILE,
            "engine": engine,
            "source": params.paths.pruned,
            # The source model's count: packed INT8 weights are not nn.Parameters.
            "num_parameters": count_parameters(model),
            "size_mb": round(size_mb, 3),
            "source_size_mb": round(source_size_mb, 3),
            "size_ratio_to_fp32": size_mb / source_size_mb,
            "max_length": max_length,
            "validation": results["validation"],
            "test": results["test"],
            "label_names": names,
            "task_type": task.type,
            "params": {"quantize": params.section("quantize")},
            "data_hash": manifest["content_hash"],
        }
        write_json(tmp / INFO_FILE, info)
    tracking.log_artifact(out / INFO_FILE, "student_int8_torch")
    return {
        **summary(results["validation"], "validation"),
        **summary(results["test"], "test"),
        "test_macro_f1_ci95_low": results["test"]["macro_f1_ci95"][0],
        "test_macro_f1_ci95_high": results["test"]["macro_f1_ci95"][1],
        "num_parameters": info["num_parameters"],
        "size_mb": info["size_mb"],
        "fp32_size_mb": info["source_size_mb"],
        "size_ratio_to_fp32": info["size_ratio_to_fp32"],
    }


def check_reload(
    model: nn.Module, directory: Path, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> None:
    """The saved directory must load back to exactly the same logits."""
    expected = predict_logits(model, tokenizer, texts, max_length)
    got = predict_logits(load_quantized(directory), tokenizer, texts, max_length)
    if not torch.equal(expected, got):
        raise ModelError(
            f"the saved INT8 model does not reload to the same logits (max diff {(expected - got).abs().max():.2e})"
        )


if __name__ == "__main__":
    main(run, stage=STAGE, member="student_int8_torch", sections=("quantize",))
