"""The flow the three student stages share: build the student from the verified teacher, train it
with the distillation Trainer (KD terms from the stage's params, none for the baseline), evaluate,
save. The stages differ only in the KD terms they pass."""

from __future__ import annotations

import logging
from typing import Any

from pipeline import training
from pipeline.config import KDTerms, Params
from pipeline.distill import DistillationTrainer, build_kd_loss, precompute_teacher_logits, resolve_layer_map
from pipeline.models import build_student, load_trained_with_tokenizer, state_fingerprint
from pipeline.prepared import load_prepared

log = logging.getLogger(__name__)


def train_student(params: Params, stage: str, member: str, out_path: str, terms: KDTerms | None) -> dict[str, Any]:
    """Train one student; `terms` None means hard labels only (the no-KD baseline)."""
    prepared = load_prepared(params.path(params.paths.prepared))
    names, task_type = prepared.label_names, params.task.type
    teacher_dir = params.path(params.paths.teacher)
    teacher, tokenizer = load_trained_with_tokenizer(teacher_dir, names)
    student, init_info = build_student(teacher, params.student, names)
    t_cfg, s_cfg = teacher.config, student.config

    layer_map: list[int] = []
    if terms is not None and getattr(terms, "layer_map", None) is not None:
        layer_map = resolve_layer_map(terms.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    kd = build_kd_loss(
        terms, task_type, label_names=names, key=stage, layer_map=layer_map,
        hidden_sizes=(s_cfg.hidden_size, t_cfg.hidden_size),
    )

    max_length = params.teacher.max_length
    datasets = training.encode_splits(prepared, tokenizer, max_length)
    collator = training.Collator(tokenizer)
    if kd.needs_teacher and not kd.needs_internals:
        datasets["train"] = precompute_teacher_logits(teacher, datasets["train"], collator)

    before = state_fingerprint(teacher)
    key = training.fingerprint(
        stage, params.section("student"), terms.model_dump() if terms else None, prepared.content_hash,
        before,
    )
    scratch, resume = training.checkpoint_dir(params, stage, key)
    trainer = DistillationTrainer(
        model=student,
        args=training.training_arguments(params.student, scratch),
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=training.compute_metrics_fn(task_type, params.task.threshold),
        kd=kd,
        teacher=teacher if kd.needs_teacher else None,
        pos_weight=training.pos_weight(params.task, datasets["train"], names),
    )
    seconds = training.train(trainer, resume)
    if state_fingerprint(teacher) != before:  # cannot happen unless the freezing is broken
        raise RuntimeError("the teacher's weights changed during distillation")
    record = training.save_trained(
        trainer, tokenizer, params.path(out_path), prepared, params,
        member=member, stage=stage, source=params.paths.teacher, training_seconds=seconds,
        params={"student": params.section("student"), stage: terms.model_dump() if terms else {}},
        details={
            "student": {**init_info, "num_layers": s_cfg.num_hidden_layers, "hidden_size": s_cfg.hidden_size},
            "kd": {"layer_map": layer_map, "projection": kd.has_projection, **(terms.model_dump() if terms else {})},
        },
    )
    if record is None:  # not the main process of a distributed run
        return {}
    training.record_curve(training.curve_rows(trainer.state.log_history), params.path(params.paths.curves) / f"{stage}.csv")
    training.finish(trainer, scratch)
    return record.metrics()
