"""The verified teacher's logits on every text a KD student learns from (the train split, the
transfer texts, the augmented texts), computed once on its own tokenization; every KD student and the
pruning recovery read them instead of recomputing them. When `student.init` is a pretrained model
whose tokens do not line up with the teacher's (other pieces, pipeline/kd/token_map.py), the same pass
also keeps the teacher's mean-pooled hidden states of every layer, so students of any depth or layer
map (and the search over depth) read one cache."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pipeline.config import Params
from pipeline.data.prepared import load_prepared
from pipeline.errors import ModelError
from pipeline.io import atomic_dir
from pipeline.kd import teacher_internals, teacher_logits
from pipeline.kd.layer_map import resolve_layer_map
from pipeline.kd.students import init_tokenizer, student_layer_count
from pipeline.kd.texts import ORIGINAL, PARTS, load_kd_texts
from pipeline.models import load_trained_with_tokenizer, state_fingerprint
from pipeline.stage import Stage
from pipeline.training.precision import resolve as resolve_precision

log = logging.getLogger(__name__)


def run(params: Params) -> dict[str, Any]:
    """Read paths.prepared, paths.augmented and paths.teacher; write paths.teacher_logits."""
    prepared = load_prepared(params.path(params.paths.prepared))
    teacher, tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), prepared.label_names)
    max_length = params.task.max_length
    texts = load_kd_texts(prepared, params.transfer.augment, params.path(params.paths.augmented))
    alignment = texts.align(tokenizer, init_tokenizer(params.student), max_length)
    layers: list[int] = []
    if not alignment.token_level:
        # Every layer (0: the embedding output), not only those one depth maps to: a hidden-state term
        # of any student depth, layer map or search trial then reads this cache, and the stage need
        # not re-run when they change. Size: texts x (layers + 1) x hidden x 2 bytes (float16).
        layers = list(range(teacher.config.num_hidden_layers + 1))
        log.info("student.init=%r: %s; caching the teacher's pooled hidden states of all %d layers",
                 params.student.init, alignment.describe(), len(layers))
    metrics: dict[str, Any] = {}
    read_by_teacher = texts.read_by(tokenizer)
    internal_layers, internal_parts = cached_internals(params, teacher, alignment.token_level)
    if internal_layers and params.distill_intermediate.teacher_internals == "auto":
        internal_layers, internal_parts = fitting_cache(
            params.distill_intermediate.teacher_internals_max_mb, internal_layers, internal_parts, read_by_teacher,
            tokenizer, max_length, teacher.config, metrics,
        )
    # The teacher labels in the precision it trained in (teacher.precision: bf16 about 2.3x faster on AMX).
    labelling = resolve_precision(params.teacher.precision, "teacher.precision")
    outputs, collected = {}, {}
    for part, read in read_by_teacher.items():
        start = time.perf_counter()
        collector = teacher_internals.Collector(internal_layers) if part in internal_parts else None
        outputs[part] = teacher_logits.compute(teacher, tokenizer, read, max_length, layers, collector, labelling)
        if collector is not None:
            collected[part] = collector
        metrics[f"{part}_rows"] = len(read)
        metrics[f"{part}_seconds"] = round(time.perf_counter() - start, 1)
    logits = {part: values[0] for part, values in outputs.items()}
    pooled = {part: values[1] for part, values in outputs.items()} if layers else None
    for part, (part_logits, part_pooled) in outputs.items():
        bad = [what for what, values in (("logits", part_logits), ("pooled hidden states", part_pooled))
               if values is not None and not np.isfinite(values).all()]
        if bad:
            raise ModelError(
                f"the teacher at {params.paths.teacher} gives non-finite {' and '.join(bad)} (NaN or infinity) for "
                f"{part} texts: its weights are broken. Retrain it: dvc repro -f train_teacher"
            )
    with atomic_dir(params.path(params.paths.teacher_logits)) as tmp:
        teacher_logits.save(tmp, texts.parts(), logits, max_length, state_fingerprint(teacher), pooled, layers)
        if collected:
            teacher_internals.save(tmp, collected, {part: teacher_logits.texts_sha256(texts.parts()[part]) for part in collected})
            metrics["internals_layers"] = len(internal_layers)
            metrics["internals_mb"] = round(sum(f.stat().st_size for f in tmp.glob("*.hidden.npy")) / 1e6
                                            + sum(f.stat().st_size for f in tmp.glob("*.attention.npy")) / 1e6, 1)
    metrics.setdefault("transfer_rows", 0)
    if layers:
        metrics["pooled_layers"] = len(layers)
    return metrics


def cached_internals(params: Params, teacher: Any, token_level: bool) -> tuple[list[int], tuple[str, ...]]:
    """The teacher layers and the text parts whose per-token internals distill_intermediate reads
    from this cache (`teacher_internals: cached` or `auto`), or none."""
    cfg = params.distill_intermediate
    if not cfg.enabled or cfg.teacher_internals == "live" or not token_level:
        return [], ()
    teacher_layers = teacher.config.num_hidden_layers
    layer_map = resolve_layer_map(cfg.layer_map, student_layer_count(params.student, teacher_layers), teacher_layers)
    parts = ORIGINAL if cfg.schedule == "two_phase" and cfg.layer_texts == "original" else PARTS
    return teacher_internals.hidden_layers(layer_map), parts


def fitting_cache(
    max_mb: float, layers: list[int], parts: tuple[str, ...], texts: dict[str, list[str]], tokenizer: Any,
    max_length: int, config: Any, metrics: dict[str, Any],
) -> tuple[list[int], tuple[str, ...]]:
    """`teacher_internals: auto`: the layers and parts to cache if their internals take at most
    `max_mb` (counted from the texts' token counts before any is computed), else none (live)."""
    lengths = [len(ids) for part in parts if texts.get(part)
               for ids in tokenizer(texts[part], truncation=True, max_length=max_length)["input_ids"]]
    megabytes = teacher_internals.estimated_mb(lengths, layers, config.hidden_size, config.num_attention_heads)
    metrics["internals_estimated_mb"] = round(megabytes, 1)
    if megabytes > max_mb:
        log.info("teacher_internals=auto: the teacher's internals of %d texts would take %.0f MB, over "
                 "distill_intermediate.teacher_internals_max_mb=%g: the layer terms run the teacher live",
                 len(lengths), megabytes, max_mb)
        return [], ()
    log.info("teacher_internals=auto: caching the teacher's internals of %d texts (%.0f MB)", len(lengths), megabytes)
    return layers, parts


STAGE = Stage("teacher_logits", run, outputs=("teacher_logits",))

if __name__ == "__main__":
    STAGE.main()
