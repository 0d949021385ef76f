"""PyTorch dynamic INT8 of the pruned student: nn.Linear weights to qint8, activations quantized on the
fly. Evaluated on validation and test; saved as safetensors (see pipeline/compression/quantization.py for why and
how) and reloaded once to prove the saved model gives the very same logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from pipeline import tracking
from pipeline.compression.quantization import (
    FORMAT,
    INT8_WEIGHTS_FILE,
    load_quantized,
    quantize_model,
    resolve_engine,
    save_quantized,
)
from pipeline.config import Params
from pipeline.data.prepared import load_prepared
from pipeline.errors import ModelError
from pipeline.evaluation.record import INFO_FILE, evaluate_and_record
from pipeline.io import atomic_dir
from pipeline.models import (
    count_parameters,
    decision_thresholds,
    load_trained_with_tokenizer,
    logits_fn,
    predict_logits,
    weights_size_mb,
)
from pipeline.stage import Stage


def run(params: Params) -> dict[str, Any]:
    """Read paths.pruned, write its dynamic INT8 version to paths.quantized."""
    prepared = load_prepared(params.path(params.paths.prepared))
    source = params.path(params.paths.pruned)
    model, tokenizer = load_trained_with_tokenizer(source, prepared.label_names)
    engine = resolve_engine(params.quantize.engine)
    quantized = quantize_model(model, engine)
    max_length = params.task.max_length

    out = params.path(params.paths.quantized)
    with atomic_dir(out) as tmp:
        save_quantized(quantized, tmp, engine)
        tokenizer.model_max_length = max_length  # consumers tokenize as the evaluation did
        tokenizer.save_pretrained(tmp)
        check_reload(quantized, tmp, tokenizer, prepared.texts("validation")[:32], max_length)
        size_mb = (tmp / INT8_WEIGHTS_FILE).stat().st_size / 1e6
        source_size_mb = weights_size_mb(source)
        record, _ = evaluate_and_record(
            logits_fn(quantized, tokenizer, max_length), prepared, params.evaluation, tmp,
            member=STAGE.member, stage=STAGE.name, source=params.paths.pruned, max_length=max_length,
            # The source model's count: packed INT8 weights are not nn.Parameters.
            num_parameters=count_parameters(model), size_mb=size_mb,
            thresholds=decision_thresholds(model, params.task.threshold),
            params={"quantize": params.section("quantize")},
            details={
                "format": FORMAT,
                "weights_file": INT8_WEIGHTS_FILE,
                "engine": engine,
                "source_size_mb": round(source_size_mb, 3),
                "size_ratio_to_fp32": size_mb / source_size_mb,
            },
        )
    tracking.log_artifact(out / INFO_FILE, "student_int8_torch")
    return {
        **record.metrics(),
        "fp32_size_mb": record.details["source_size_mb"],
        "size_ratio_to_fp32": record.details["size_ratio_to_fp32"],
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


STAGE = Stage("quantize", run, member="student_int8_torch", sections=("quantize",), outputs=("quantized",))

if __name__ == "__main__":
    STAGE.main()
