"""Fine-tune the teacher with the Hugging Face Trainer; keep the best epoch by validation macro-F1.

Runs unchanged under `torchrun` / `accelerate launch` for data-parallel training.
"""

from __future__ import annotations

from typing import Any

from transformers import set_seed

from pipeline.config import Params
from pipeline.data import labels
from pipeline.data.prepared import load_prepared
from pipeline.models import check_max_length, load_pretrained_classifier, load_tokenizer, resolve_model_source
from pipeline.stage import Stage
from pipeline.training import checkpoints, encoding, loss, results
from pipeline.training.loss import hard_labels_only
from pipeline.training.trainer import DistillationTrainer, compute_metrics_fn, train, training_arguments


def run(params: Params) -> dict[str, Any]:
    """Read the prepared splits, write the fine-tuned teacher to paths.teacher."""
    cfg = params.teacher
    prepared = load_prepared(params.path(params.paths.prepared))
    names = prepared.label_names
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    set_seed(cfg.seed)  # the new classification head is initialised while loading: seed it first
    model = load_pretrained_classifier(
        source, names, labels.problem_type(params.task.type), cfg.trust_remote_code
    )
    check_max_length(model, params.task.max_length, "task.max_length")
    datasets = encoding.encode_splits(prepared, tokenizer, params.task.max_length)
    key = checkpoints.fingerprint(params.section("teacher"), params.section("task"), prepared.content_hash)
    scratch, resume = checkpoints.checkpoint_dir(params, STAGE.name, key)
    trainer = DistillationTrainer(
        model=model,
        args=training_arguments(cfg, scratch, section="teacher"),
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=encoding.Collator(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics_fn(params.task.type, params.task.threshold),
        kd=hard_labels_only(params.task.type),  # no teacher for the teacher
        pos_weight=loss.pos_weight(params.task, datasets["train"], names),
    )
    seconds = train(trainer, resume)
    record = results.save_trained(
        trainer, tokenizer, params.path(params.paths.teacher), prepared, params,
        member=STAGE.member, stage=STAGE.name, source=cfg.model, training_seconds=seconds,
        params={"teacher": params.section("teacher")},
    )
    if record is None:  # not the main process of a distributed run
        return {}
    results.record_curve(results.curve_rows(trainer.state.log_history), params.path(params.paths.curves) / f"{STAGE.name}.csv")
    checkpoints.finish(trainer, scratch)
    return record.metrics()


STAGE = Stage("train_teacher", run, member="teacher", sections=("teacher", "task"),
              outputs=("teacher", "curves", "checkpoints"))

if __name__ == "__main__":
    STAGE.main()
