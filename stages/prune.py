"""Make the distilled student smaller in ways a CPU notices: remove the least important attention
heads and FFN neurons (optionally over several steps), recover by distillation after each step
(by default the teacher's logits and the unpruned student's layers, `prune.recovery.distil_from:
source_layers`; or the teacher alone, `teacher`, or the unpruned student alone, `source`), then trim
the vocabulary to what the data uses.

The recovery distils as distill_intermediate does: the same texts (labelled, transfer, augmented),
the same token-level terms and the same schedule (pipeline/kd/phases.py). A student with its own
tokenizer is pruned and trimmed on its own tokenizer: the unpruned student's layers share its tokens,
and the teacher's terms map its ids into the teacher's vocabulary when the pieces are the same, or
read the teacher's cached logits and pooled hidden states by text, as its distillation did
(pipeline/kd/students.py). The pruned student should keep
its source's validation macro-F1 within prune.max_f1_drop: the stage says so, with the numbers, when
it does not."""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.compression import pruning
from pipeline.config import Params
from pipeline.config.data import TaskConfig
from pipeline.config.students import KDTerms
from pipeline.data.labels import decide
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.errors import ConfigError
from pipeline.evaluation.metrics import paired_bootstrap_difference
from pipeline.evaluation.record import ModelRecord, evaluate_and_record
from pipeline.io import atomic_dir
from pipeline.kd import teacher_logits
from pipeline.kd.layer_map import uniform_layer_map
from pipeline.kd.phases import plan, train_phases
from pipeline.kd.terms import build_kd_loss, match_guide_heads, soft_term
from pipeline.kd.texts import KDTexts, load_kd_texts
from pipeline.kd.token_map import Alignment
from pipeline.models import (
    count_parameters,
    decision_thresholds,
    load_trained_with_tokenizer,
    logits_fn,
    save_model,
    state_fingerprint,
    weights_size_mb,
)
from pipeline.not_built import not_built_reason
from pipeline.stage import Stage
from pipeline.training import checkpoints, encoding, loss, results
from pipeline.training.encoding import EXTRA_FLOAT_COLUMNS, ROW_COLUMN
from pipeline.training.loss import KDBatch, KDLoss
from pipeline.training.precision import resolve as resolve_precision

log = logging.getLogger(__name__)


def run(params: Params) -> dict[str, Any]:
    """Read the source student (prune.source) and the teacher; write paths.pruned."""
    cfg, task = params.prune, params.task
    prepared = load_prepared(params.path(params.paths.prepared))
    names = prepared.label_names
    source_dir = params.path(cfg.source)
    if reason := not_built_reason(source_dir):
        raise ConfigError(
            f"prune.source={cfg.source} was not built ({reason}): prune a student that was, e.g. "
            f"prune.source={params.paths.student_vanilla}, or build this one"
        )
    teacher, teacher_tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), names)
    student, tokenizer = load_trained_with_tokenizer(source_dir, names)
    # The source's validation answers, taken before anything is removed, for the drop's paired interval.
    source_logits_validation = logits_fn(student, tokenizer, task.max_length)(prepared.texts("validation"))
    source_answers = decide(source_logits_validation, task.type, decision_thresholds(student, task.threshold))
    texts = load_kd_texts(prepared, params.transfer.augment, params.path(params.paths.augmented))
    alignment = texts.align(teacher_tokenizer, tokenizer, params.task.max_length)
    shared = alignment.kind == "shared"
    student.train()
    params_before = count_parameters(student)
    layers_before = student.config.num_hidden_layers
    layers_kept = list(range(1, layers_before + 1))
    recovery = cfg.recovery
    # A frozen copy of the unpruned student, taken before anything is removed.
    source = copy.deepcopy(student).eval().requires_grad_(False) if recovery.distil_from != "teacher" else None
    if cfg.num_layers is not None:
        student, layers_kept = pruning.drop_layers(student, cfg.num_layers)
        log.info("kept %d of the source's %d layers: %s", len(layers_kept), layers_before, layers_kept)
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
    # Recovery distillation with nothing removed only moves the student away from the weights its own
    # distillation chose (1.5 validation points on the six-layer mpnet student): pass them through.
    nothing_removed = (
        structured and all(h == heads_final for h in heads_before) and width_final == width_before
        and student.config.num_hidden_layers == layers_before
    )
    if nothing_removed:
        log.info("prune.num_layers, heads_ratio and ffn_ratio keep every layer, head and FFN neuron: no recovery, "
                 "the source's weights pass through")
    vocab_problem = pruning.vocabulary_trim_problem(tokenizer) if cfg.vocab != "none" else None
    if cfg.vocab == "corpus" and vocab_problem:
        raise ConfigError(f"prune.vocab=corpus cannot trim this vocabulary: {vocab_problem}. Set prune.vocab=auto or none.")
    trim_vocab = cfg.vocab != "none" and not vocab_problem
    if vocab_problem:
        log.warning("prune.vocab=auto keeps the whole vocabulary: %s", vocab_problem)

    max_length = params.task.max_length
    datasets = encoding.encode_splits(prepared, tokenizer, max_length)
    collator = encoding.Collator(tokenizer)
    scratch_root = params.path(params.paths.checkpoints) / STAGE.name
    if source is None:
        guide, guide_alignment = teacher, alignment
        layer_map = uniform_layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    else:
        # The source reads the student's own tokens: every layer term is token-level, each kept layer
        # learns the source layer it was (same width: no projection).
        guide, guide_alignment, layer_map = source, Alignment("shared"), layers_kept

    def build(part: str):
        return build_kd_loss(
            recovery, task.type, label_names=names, key="prune.recovery", layer_map=layer_map,
            hidden_sizes=(student.config.hidden_size, guide.config.hidden_size), token_level=guide_alignment.token_level,
            part=part,
        )

    # Importance is measured on the labelled split; the recovery also learns from the unlabelled texts.
    phases = plan(recovery, recovery.epochs, build, "prune.recovery", scale=1 / cfg.steps)
    # source_layers: the guide serves the layer terms only; the soft term reads the teacher's cache.
    logits_from_teacher = recovery.distil_from == "source_layers"
    fingerprint = state_fingerprint(teacher if logits_from_teacher else guide)
    if source is not None:  # teacher_logits cached the teacher's internals, never the source's
        phases = [dataclasses.replace(phase, internals="live") for phase in phases]
    cache_dir = params.path(params.paths.teacher_logits)
    # Terms that read the guide's internals run it live and take its logits from the same pass; the
    # logit terms alone read a cache, which for the source is computed here, once.
    if recovery.distil_from == "source" and not nothing_removed and any(
        p.kd.needs_teacher and not p.kd.needs_internals for p in phases
    ):
        cache_dir = source_logits(source, fingerprint, tokenizer, texts, max_length, scratch_root / "source_logits",
                                  resolve_precision(recovery.precision, "prune.recovery.precision"))
    pos_weight = loss.pos_weight(task, datasets["train"], names)

    scoring, score_loss = datasets["train"], pruning.task_loss
    if structured and cfg.importance_from == "teacher" and not nothing_removed:
        scoring, score_loss = teacher_agreement(
            recovery, task.type, datasets["train"], texts, tokenizer, max_length,
            params.path(params.paths.teacher_logits), state_fingerprint(teacher), phases[-1].parts,
        )
    magnitude = None if structured else pruning.GradualMagnitudePruning(student, cfg.sparsity)
    removed: dict[int, list[int]] = {}
    heads_matched = False
    curve: list[dict[str, Any]] = []
    seconds = 0.0
    for step in range(0 if nothing_removed else cfg.steps):
        if structured:
            generator = torch.Generator().manual_seed(recovery.seed + step)
            loader = DataLoader(
                scoring, batch_size=recovery.batch_size, shuffle=True, collate_fn=collator, generator=generator,
            )
            head_scores, neuron_scores = pruning.importance_scores(student, loader, cfg.importance_batches, score_loss)
            for layer, heads in pruning.prune_heads(student, head_scores, heads_plan[step]).items():
                removed.setdefault(layer, []).extend(heads)
            pruning.prune_ffn(student, neuron_scores, width_plan[step])
            if source is not None and removed:  # each kept head learns the source head it was, not a head average
                guide_heads = pruning.guide_head_index(student, source, layer_map)
                heads_matched = any([match_guide_heads(phase.kd, guide_heads) for phase in phases])
            log.info(
                "step %d/%d: %s heads per layer, FFN width %d, %d parameters",
                step + 1, cfg.steps, pruning.heads_per_layer(student), width_plan[step], count_parameters(student),
            )
        scratch = scratch_root / f"step{step}"
        trained = train_phases(
            phases, student=student, tokenizer=tokenizer, teacher=guide, alignment=guide_alignment,
            labelled=datasets["train"], validation=datasets["validation"], texts=texts,
            cache_dir=cache_dir, teacher_fingerprint=fingerprint, budget=recovery,
            budget_section="prune.recovery",
            scratch=scratch, resume=None,  # a pruned architecture is not resumable mid-way
            max_length=max_length, task_type=task.type, threshold=task.threshold, collator=collator,
            pos_weight=pos_weight, callbacks=[magnitude] if magnitude else None, layer_map=layer_map,
            logits_from_cache=logits_from_teacher,
            # Magnitude pruning ends at its final sparsity; an earlier "best" epoch would be denser.
            load_best_model_at_end=structured,
        )
        seconds += trained.seconds
        offset = curve[-1]["step"] if curve else 0
        curve += [{**row, "step": row["step"] + offset, "prune_step": step + 1} for row in trained.curve]
        checkpoints.finish(trained.trainer, scratch)
    student = student.cpu().eval()

    info: dict[str, Any] = {
        "method": cfg.method, "source": cfg.source, "importance_from": cfg.importance_from, "tokenizer": "teacher" if shared else "own",
        "token_alignment": alignment.kind, "recovery_distils_from": recovery.distil_from,
        "recovery_phases": {phase.name: [t.name for t in phase.kd.terms] for phase in phases},
        **({"recovery_attention_heads": "each kept head against the source head it was"} if heads_matched else {}),
        **{f"{part}_texts": len(part_texts) for part, part_texts in texts.parts().items() if part != "train"},
    }
    if nothing_removed:
        info["recovery"] = "skipped: nothing was pruned"
    if any(phase.kd.pooled_teacher_layers for phase in phases):
        info["recovery_hidden_targets"] = "pooled"
    if phases[-1].kd.skipped:
        info["recovery_kd_skipped"] = phases[-1].kd.skipped
    if magnitude:
        magnitude.make_permanent()
        info["sparsity_encoder_linear"] = pruning.sparsity(magnitude.modules)
        info["note"] = (
            "Unstructured magnitude pruning zeroes weights but keeps dense matrices: dense CPU kernels "
            "are no faster and the safetensors file is no smaller; only compressed size shrinks."
        )

    evaluated = {split: prepared.texts(split) for split in prepared.evaluated_splits}
    unk_before = {split: pruning.unk_share(tokenizer, evaluated[split]) for split in evaluated}
    info["vocab_trimmed"] = trim_vocab
    info["heads_pruned"] = bool(removed)
    if structured and heads_problem and cfg.heads_ratio > 0:
        info["heads_note"] = f"attention heads kept: {heads_problem}"
    if trim_vocab:
        # Every text the student learned from (labelled, transfer, augmented), not the labelled ones
        # alone: on FPB the training texts alone kept 8,825 tokens and cost 2.0 validation points.
        corpus = texts.all_read_by(tokenizer)
        student, tokenizer, vocab_info = pruning.trim_vocabulary(student, tokenizer, corpus, cfg.vocab_keep_top)
        info.update(vocab_info)
    elif vocab_problem:
        info["vocab_note"] = f"vocabulary kept: {vocab_problem}"
    unk_after = {split: pruning.unk_share(tokenizer, evaluated[split]) for split in evaluated}

    params_after = count_parameters(student)
    info.update(
        {
            "params_before": params_before,
            "parameter_reduction": 1 - params_after / params_before,
            "layers_before": layers_before,
            "layers_kept": layers_kept,
            "heads_per_layer_before": heads_before,
            "heads_per_layer": pruning.heads_per_layer(student),
            "heads_removed": {str(k): sorted(v) for k, v in removed.items()},
            "ffn_width_before": width_before,
            "ffn_width": pruning.ffn_width(student),
            "vocab_size": student.config.vocab_size,
            "unk_share": {split: {"before": unk_before[split], "after": unk_after[split]} for split in evaluated},
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
        record, logits = evaluate_and_record(
            predict, prepared, params.evaluation, tmp, member=STAGE.member, stage=STAGE.name, source=cfg.source,
            max_length=max_length, num_parameters=params_after, size_mb=weights_size_mb(tmp),
            thresholds=thresholds, training_seconds=seconds, params={"prune": params.section("prune")}, details=info,
        )
        evaluation = params.evaluation
        interval = paired_bootstrap_difference(
            validation_labels(prepared, task), source_answers, decide(logits["validation"], task.type, thresholds),
            samples=evaluation.bootstrap_samples, confidence=evaluation.confidence, seed=evaluation.seed,
        )
        drop = source_f1_drop(ModelRecord.read(source_dir), record, cfg.max_f1_drop, interval, evaluation.confidence)
        record.details.update(drop)
        record.write(tmp)

    metrics = {
        **record.metrics(),
        **{key: value for key, value in drop.items() if key != "f1_drop_note"},
        "params_before": params_before,
        "parameter_reduction": info["parameter_reduction"],
        "vocab_size": info["vocab_size"],
        "vocab_trimmed": int(trim_vocab),
        "heads_pruned": int(bool(removed)),
        "ffn_width": info["ffn_width"],
        "num_layers": student.config.num_hidden_layers,
        "heads_per_layer": info["heads_per_layer"][0],
        **{f"{split}_unk_share_after": unk_after[split] for split in evaluated},
    }
    for key in ("sparsity_encoder_linear", "gzip_size_mb"):
        if key in info:
            metrics[key] = info[key]
    if not shared:
        metrics["shared_tokenizer"] = 0
        metrics["token_level_kd"] = int(alignment.token_level)
    results.record_curve(curve, params.path(params.paths.curves) / f"{STAGE.name}.csv")
    return metrics


def source_logits(
    source: Any, fingerprint: str, tokenizer: Any, texts: KDTexts, max_length: int, out: Path, precision: str
) -> Path:
    """The unpruned student's logits on every KD text, cached in `out` as teacher_logits caches the
    teacher's (the recovery reads them the same way, checked against the source's `fingerprint`)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    logits = {
        part: teacher_logits.compute(source, tokenizer, read, max_length, precision=precision)[0]
        for part, read in texts.read_by(tokenizer).items()
    }
    teacher_logits.save(out, texts.parts(), logits, max_length, fingerprint)
    log.info("prune.recovery.distil_from=source: the unpruned student's logits on %d texts in %s",
             sum(len(values) for values in logits.values()), out)
    return out


def validation_labels(prepared: Prepared, task: TaskConfig) -> np.ndarray:
    """The validation split's labels as the metrics read them (0/1 indicator rows when multi-label)."""
    labels = np.asarray(prepared.labels("validation"))
    return labels.astype(int) if task.type == "multi_label" else labels


def source_f1_drop(
    source: ModelRecord, pruned: ModelRecord, tolerance: float,
    interval: tuple[float, float] | None = None, confidence: float = 0.95,
) -> dict[str, Any]:
    """How far the pruned student fell below its source on the validation split (with the paired
    bootstrap `interval` of that drop, when given), and a warning with the numbers when that is more
    than `tolerance` (prune.max_f1_drop)."""
    before, after = source.validation["macro_f1"], pruned.validation["macro_f1"]
    drop = before - after
    out: dict[str, Any] = {"source_validation_macro_f1": before, "validation_f1_drop": drop, "within_max_f1_drop": int(drop <= tolerance)}
    if interval is not None:
        out["validation_f1_drop_ci95_low"], out["validation_f1_drop_ci95_high"] = interval
    if drop > tolerance:
        # How many sentences the drop is: on a small split one sentence moves macro-F1 by about a point,
        # and the source's score is its best epoch on this split (docs/distillation.md#pruning).
        examples = pruned.validation.get("examples")
        scale = f" (one of the {examples} validation texts is about {100 / examples:.1f} points)" if examples else ""
        spread = ""
        if interval is not None:
            low, high = (100 * bound for bound in interval)
            spread = f" The paired bootstrap {confidence:.0%} interval of the drop is {low:.1f} to {high:.1f} points"
            spread += ", which includes no drop at all: this split cannot tell the two apart." if low <= 0 else "."
        out["f1_drop_note"] = (
            f"the pruned student's validation macro-F1 is {after:.4f}, {drop * 100:.2f} points below its source's "
            f"{before:.4f}{scale}: more than prune.max_f1_drop={tolerance} ({tolerance * 100:.1f} points).{spread} Prune "
            "less (prune.heads_ratio, prune.ffn_ratio) or in more steps (prune.steps). A longer recovery "
            "(prune.recovery.epochs, learning_rate) raised validation but not test in our runs: check test before keeping one"
        )
        log.warning("%s", out["f1_drop_note"])
    return out


# Columns of a KD training row that are not model inputs.
NOT_INPUTS = ("labels", *EXTRA_FLOAT_COLUMNS, ROW_COLUMN)


def teacher_agreement(
    terms: KDTerms, task_type: str, train: Dataset, texts: KDTexts, tokenizer: PreTrainedTokenizerBase,
    max_length: int, cache_dir: Path, teacher_fingerprint: str, parts: tuple[str, ...],
) -> tuple[Dataset, Callable[[PreTrainedModel, dict[str, torch.Tensor]], torch.Tensor]]:
    """`prune.importance_from: teacher`: the texts the recovery trains on, with the teacher's cached
    logits, and the recovery's soft term against them: the task loss sees only the labelled texts, which
    a distilled student mostly fits already; this term is largest where the student still departs from
    the teacher, on every text KD taught it from."""
    soft = KDLoss([soft_term(terms, task_type == "multi_label", 1.0)], task_type)
    dataset = teacher_logits.kd_train_dataset(
        train, texts, tokenizer, max_length, soft, cache_dir, teacher_fingerprint, parts, logits_from_cache=True
    )

    def soft_against_teacher(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = model(**{key: value for key, value in batch.items() if key not in NOT_INPUTS})
        return soft(KDBatch(
            student=outputs, labels=batch["labels"], attention_mask=batch["attention_mask"],
            teacher_logits=batch["teacher_logits"].to(outputs.logits.dtype),
        ))[0]

    return dataset, soft_against_teacher


STAGE = Stage("prune", run, member="student_pruned", sections=("prune",),
              outputs=("pruned", "curves", "checkpoints"))

if __name__ == "__main__":
    STAGE.main()
