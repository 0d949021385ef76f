"""Make the distilled student smaller in ways a CPU notices: remove the least important attention
heads and FFN neurons (optionally over several steps), recover by distillation against the
teacher after each step, then trim the vocabulary to what the data uses.

A student with its own tokenizer (another than the teacher's) is pruned and trimmed on its own
tokenizer; its recovery reads the teacher's cached logits and pooled hidden states by text, as its
distillation did (pipeline/kd/students.py)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipeline.compression import pruning
from pipeline.config import Params
from pipeline.data.prepared import load_prepared
from pipeline.errors import ConfigError
from pipeline.evaluation.record import evaluate_and_record
from pipeline.io import atomic_dir
from pipeline.kd import teacher_logits
from pipeline.kd.layer_map import uniform_layer_map
from pipeline.kd.students import same_tokenizer
from pipeline.kd.terms import build_kd_loss
from pipeline.models import (
    count_parameters,
    load_trained_with_tokenizer,
    logits_fn,
    save_model,
    state_fingerprint,
    weights_size_mb,
)
from pipeline.stage import Stage
from pipeline.training import checkpoints, encoding, loss, results
from pipeline.training.trainer import DistillationTrainer, compute_metrics_fn, train, training_arguments

log = logging.getLogger(__name__)


def run(params: Params) -> dict[str, Any]:
    """Read the source student (prune.source) and the teacher; write paths.pruned."""
    cfg, task = params.prune, params.task
    prepared = load_prepared(params.path(params.paths.prepared))
    names = prepared.label_names
    source_dir = params.path(cfg.source)
    teacher, teacher_tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), names)
    student, tokenizer = load_trained_with_tokenizer(source_dir, names)
    shared = same_tokenizer(teacher_tokenizer, tokenizer, prepared.texts("train"), params.task.max_length)
    student.train()
    params_before = count_parameters(student)
    heads_before = pruning.heads_per_layer(student)
    width_before = pruning.ffn_width(student)

    # Validate everything against this model before any work: the ratios (fails with the allowed
    # maximum), whether this architecture can drop heads, whether this tokenizer can be trimmed.
    structured = cfg.method == "structured"
    heads_problem = None
    if structured:
        heads_final = pruning.keep_count(heads_before[0], cfg.heads_ratio, "attention heads", "prune.heads_ratio")
        width_final = pruning.keep_count(width_before, cfg.ffn_ratio, "FFN neurons", "prune.ffn_ratio")
        heads_problem = pruning.head_pruning_problem(student)
        if heads_problem and cfg.head_pruning == "auto" and heads_final < heads_before[0]:
            log.warning("prune.head_pruning=auto keeps every attention head: %s", heads_problem)
            heads_final = heads_before[0]
        pruning.check_structured(student, cfg.heads_ratio, heads_final)
        heads_plan = pruning.schedule(heads_before[0], heads_final, cfg.steps)
        width_plan = pruning.schedule(width_before, width_final, cfg.steps)
    vocab_problem = pruning.vocabulary_trim_problem(tokenizer) if cfg.vocab != "none" else None
    if cfg.vocab == "corpus" and vocab_problem:
        raise ConfigError(f"prune.vocab=corpus cannot trim this vocabulary: {vocab_problem}. Set prune.vocab=auto or none.")
    trim_vocab = cfg.vocab != "none" and not vocab_problem
    if vocab_problem:
        log.warning("prune.vocab=auto keeps the whole vocabulary: %s", vocab_problem)

    max_length = params.task.max_length
    datasets = encoding.encode_splits(prepared, tokenizer, max_length)
    collator = encoding.Collator(tokenizer)
    recovery = cfg.recovery
    layer_map = uniform_layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    kd = build_kd_loss(
        recovery, task.type, label_names=names, key="prune.recovery", layer_map=layer_map,
        hidden_sizes=(student.config.hidden_size, teacher.config.hidden_size), shared_tokenizer=shared,
    )
    # Importance is measured on the labelled split; the recovery also learns from the transfer texts.
    recovery_train = teacher_logits.kd_train_dataset(
        datasets["train"], prepared, tokenizer, max_length, kd, params.path(params.paths.teacher_logits),
        state_fingerprint(teacher),
    )
    pos_weight = loss.pos_weight(task, datasets["train"], names)

    magnitude = None if structured else pruning.GradualMagnitudePruning(student, cfg.sparsity)
    removed: dict[int, list[int]] = {}
    curve: list[dict[str, Any]] = []
    seconds = 0.0
    for step in range(cfg.steps):
        if structured:
            generator = torch.Generator().manual_seed(recovery.seed + step)
            loader = DataLoader(
                datasets["train"], batch_size=recovery.batch_size, shuffle=True, collate_fn=collator,
                generator=generator,
            )
            head_scores, neuron_scores = pruning.importance_scores(student, loader, cfg.importance_batches)
            for layer, heads in pruning.prune_heads(student, head_scores, heads_plan[step]).items():
                removed.setdefault(layer, []).extend(heads)
            pruning.prune_ffn(student, neuron_scores, width_plan[step])
            log.info(
                "step %d/%d: %s heads per layer, FFN width %d, %d parameters",
                step + 1, cfg.steps, pruning.heads_per_layer(student), width_plan[step], count_parameters(student),
            )
        scratch = params.path(params.paths.checkpoints) / STAGE.name / f"step{step}"
        trainer = DistillationTrainer(
            model=student,
            args=training_arguments(
                recovery,
                scratch,
                num_train_epochs=recovery.epochs / cfg.steps,
                # Magnitude pruning ends at its final sparsity; an earlier "best" epoch would be denser.
                load_best_model_at_end=structured,
            ),
            train_dataset=recovery_train,
            eval_dataset=datasets["validation"],
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=compute_metrics_fn(task.type, task.threshold),
            kd=kd,
            teacher=teacher if shared else None,  # another tokenizer: only the teacher's cached outputs
            pos_weight=pos_weight,
            callbacks=[magnitude] if magnitude else None,
        )
        seconds += train(trainer, None)  # a pruned architecture is not resumable mid-way
        offset = curve[-1]["step"] if curve else 0
        curve += [{**row, "step": row["step"] + offset, "prune_step": step + 1}
                  for row in results.curve_rows(trainer.state.log_history)]
        checkpoints.finish(trainer, scratch)
    student = student.cpu().eval()

    info: dict[str, Any] = {"method": cfg.method, "source": cfg.source, "tokenizer": "teacher" if shared else "own"}
    if kd.pooled_teacher_layers:
        info["recovery_hidden_targets"] = "pooled"
    if kd.skipped:
        info["recovery_kd_skipped"] = kd.skipped
    if len(recovery_train) > len(datasets["train"]):
        info["transfer_texts"] = len(recovery_train) - len(datasets["train"])
    if magnitude:
        magnitude.make_permanent()
        info["sparsity_encoder_linear"] = pruning.sparsity(magnitude.modules)
        info["note"] = (
            "Unstructured magnitude pruning zeroes weights but keeps dense matrices: dense CPU kernels "
            "are no faster and the safetensors file is no smaller; only compressed size shrinks."
        )

    texts = {split: prepared.texts(split) for split in prepared.evaluated_splits}
    unk_before = {split: pruning.unk_share(tokenizer, texts[split]) for split in texts}
    info["vocab_trimmed"] = trim_vocab
    info["heads_pruned"] = bool(removed)
    if structured and heads_problem and cfg.heads_ratio > 0:
        info["heads_note"] = f"attention heads kept: {heads_problem}"
    if trim_vocab:
        student, tokenizer, vocab_info = pruning.trim_vocabulary(student, tokenizer, prepared.texts("train"), cfg.vocab_keep_top)
        info.update(vocab_info)
    elif vocab_problem:
        info["vocab_note"] = f"vocabulary kept: {vocab_problem}"
    unk_after = {split: pruning.unk_share(tokenizer, texts[split]) for split in texts}

    params_after = count_parameters(student)
    info.update(
        {
            "params_before": params_before,
            "parameter_reduction": 1 - params_after / params_before,
            "heads_per_layer_before": heads_before,
            "heads_per_layer": pruning.heads_per_layer(student),
            "heads_removed": {str(k): sorted(v) for k, v in removed.items()},
            "ffn_width_before": width_before,
            "ffn_width": pruning.ffn_width(student),
            "vocab_size": student.config.vocab_size,
            "unk_share": {split: {"before": unk_before[split], "after": unk_after[split]} for split in texts},
        }
    )
    predict = logits_fn(student, tokenizer, max_length)
    thresholds = results.store_tuned_thresholds(student, task, predict, prepared)
    out = params.path(params.paths.pruned)
    with atomic_dir(out) as tmp:
        save_model(student, tokenizer, tmp)  # proves the pruned layout reloads to the same logits
        if magnitude:
            info["gzip_size_mb"] = round(pruning.gzip_size_mb(tmp / "model.safetensors"), 3)
            info["source_gzip_size_mb"] = round(pruning.gzip_size_mb(source_dir / "model.safetensors"), 3)
        record, _ = evaluate_and_record(
            predict, prepared, params.evaluation, tmp, member=STAGE.member, stage=STAGE.name, source=cfg.source,
            max_length=max_length, num_parameters=params_after, size_mb=weights_size_mb(tmp),
            thresholds=thresholds, training_seconds=seconds, params={"prune": params.section("prune")}, details=info,
        )

    metrics = {
        **record.metrics(),
        "params_before": params_before,
        "parameter_reduction": info["parameter_reduction"],
        "vocab_size": info["vocab_size"],
        "vocab_trimmed": int(trim_vocab),
        "heads_pruned": int(bool(removed)),
        "ffn_width": info["ffn_width"],
        "heads_per_layer": info["heads_per_layer"][0],
        **{f"{split}_unk_share_after": unk_after[split] for split in texts},
    }
    for key in ("sparsity_encoder_linear", "gzip_size_mb"):
        if key in info:
            metrics[key] = info[key]
    if not shared:
        metrics["shared_tokenizer"] = 0
    results.record_curve(curve, params.path(params.paths.curves) / f"{STAGE.name}.csv")
    return metrics


STAGE = Stage("prune", run, member="student_pruned", sections=("prune",),
              outputs=("pruned", "curves", "checkpoints"))

if __name__ == "__main__":
    STAGE.main()
