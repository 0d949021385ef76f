"""The verified teacher's logits on the train split and the transfer texts, computed once on its own
tokenization; every KD student and the pruning recovery read them instead of recomputing them. When
`student.init` is a pretrained model with another tokenizer, the same pass also keeps the teacher's
mean-pooled hidden states of every layer, so students of any depth or layer map (and the search over
depth) read one cache."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.config import Params
from pipeline.data.prepared import load_prepared
from pipeline.errors import ModelError
from pipeline.io import atomic_dir
from pipeline.kd import teacher_logits
from pipeline.kd.students import init_tokenizer, same_tokenizer
from pipeline.models import load_trained_with_tokenizer, state_fingerprint
from pipeline.stage import Stage

log = logging.getLogger(__name__)


def run(params: Params) -> dict[str, Any]:
    """Read paths.prepared and paths.teacher; write paths.teacher_logits."""
    prepared = load_prepared(params.path(params.paths.prepared))
    teacher, tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), prepared.label_names)
    max_length = params.task.max_length
    texts = {"train": prepared.texts("train"), "transfer": prepared.transfer_texts()}
    texts = {split: values for split, values in texts.items() if values}
    own = init_tokenizer(params.student)  # None unless student.init is a pretrained model
    layers: list[int] = []
    if own is not None and not same_tokenizer(tokenizer, own, texts["train"], max_length):
        # Every layer (0: the embedding output), not only those one depth maps to: a hidden-state term
        # of any student depth, layer map or search trial then reads this cache, and the stage need
        # not re-run when they change. Size: texts x (layers + 1) x hidden x 2 bytes (float16).
        layers = list(range(teacher.config.num_hidden_layers + 1))
        log.info("student.init=%r has its own tokenizer: caching the teacher's pooled hidden states of all %d layers",
                 params.student.init, len(layers))
    outputs = {split: teacher_logits.compute(teacher, tokenizer, values, max_length, layers) for split, values in texts.items()}
    for split, (split_logits, split_pooled) in outputs.items():
        bad = [what for what, values in (("logits", split_logits), ("pooled hidden states", split_pooled))
               if values is not None and not np.isfinite(values).all()]
        if bad:
            raise ModelError(
                f"the teacher at {params.paths.teacher} gives non-finite {' and '.join(bad)} (NaN or infinity) for "
                f"{split} texts: its weights are broken. Retrain it: dvc repro -f train_teacher"
            )
    logits = {split: values[0] for split, values in outputs.items()}
    pooled = {split: values[1] for split, values in outputs.items()} if layers else None
    with atomic_dir(params.path(params.paths.teacher_logits)) as tmp:
        teacher_logits.save(tmp, texts, logits, max_length, state_fingerprint(teacher), pooled, layers)
    metrics = {"train_rows": len(texts["train"]), "transfer_rows": len(texts.get("transfer", []))}
    if layers:
        metrics["pooled_layers"] = len(layers)
    return metrics


STAGE = Stage("teacher_logits", run, outputs=("teacher_logits",))

if __name__ == "__main__":
    STAGE.main()
