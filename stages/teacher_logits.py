"""The verified teacher's logits on the train split and the transfer texts, computed once on its own
tokenization; every KD student and the pruning recovery read them instead of recomputing them."""

from __future__ import annotations

from typing import Any

from pipeline import teacher_logits
from pipeline.config import Params
from pipeline.io import atomic_dir
from pipeline.models import load_trained_with_tokenizer, state_fingerprint
from pipeline.prepared import load_prepared
from pipeline.stage import Stage


def run(params: Params) -> dict[str, Any]:
    """Read paths.prepared and paths.teacher; write paths.teacher_logits."""
    prepared = load_prepared(params.path(params.paths.prepared))
    teacher, tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), prepared.label_names)
    max_length = params.task.max_length
    texts = {"train": prepared.texts("train"), "transfer": prepared.transfer_texts()}
    texts = {split: values for split, values in texts.items() if values}
    logits = {split: teacher_logits.compute(teacher, tokenizer, values, max_length) for split, values in texts.items()}
    with atomic_dir(params.path(params.paths.teacher_logits)) as tmp:
        teacher_logits.save(tmp, texts, logits, max_length, state_fingerprint(teacher))
    return {"train_rows": len(texts["train"]), "transfer_rows": len(texts.get("transfer", []))}


STAGE = Stage("teacher_logits", run)

if __name__ == "__main__":
    STAGE.main()
