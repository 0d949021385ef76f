"""When the KD terms train: all at once (`joint`), or TinyBERT's two phases (`two_phase`): first the
layer terms alone (hidden states, attention maps: the student learns the teacher's internals), then
the logit terms (soft and hard: it learns the task from them). Shared by the student stages and the
pruning recovery.

The layer terms run the teacher live, a forward pass per text and epoch, while the logit terms read
the teacher_logits cache: with many augmented texts, two phases with `layer_texts: original` keep
the expensive terms on the original texts and give the augmented ones to the cheap terms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config.base import TrainingBudget
from pipeline.config.students import KDTerms
from pipeline.errors import ConfigError
from pipeline.kd import teacher_logits
from pipeline.kd.teacher_internals import InternalsStore, cache_holds
from pipeline.kd.texts import ORIGINAL, PARTS, KDTexts
from pipeline.kd.token_map import Alignment
from pipeline.training import results
from pipeline.training.loss import KDLoss
from pipeline.training.trainer import DistillationTrainer, compute_metrics_fn, train, training_arguments

log = logging.getLogger(__name__)

Part = Literal["all", "layers", "logits"]


@dataclass(frozen=True)
class Phase:
    name: str  # "layers", "logits" or "joint" (the curve's `phase` column)
    kd: KDLoss
    epochs: float
    parts: tuple[str, ...]  # the KD texts it trains on (pipeline/kd/texts.py)
    last: bool  # the phase whose best epoch on validation is kept
    # Where its layer terms get the teacher's internals: live, the teacher_logits cache (cached), or the
    # cache where that stage wrote one (auto).
    internals: str = "live"


def plan(
    section: KDTerms | None, epochs: float, build: Callable[[Part], KDLoss | None], key: str, scale: float = 1.0
) -> list[Phase]:
    """The phases of a stage's training: `build(part)` gives the terms of a part (build_kd_loss);
    `scale` multiplies every phase's epochs (a pruning step's share of the recovery)."""
    schedule = getattr(section, "schedule", "joint")
    layer_texts = getattr(section, "layer_texts", "all")
    internals = getattr(section, "teacher_internals", "live")
    if schedule == "joint":
        if layer_texts != "all":
            raise ConfigError(
                f"{key}.layer_texts={layer_texts} needs {key}.schedule=two_phase: in one joint phase every text "
                "trains every term"
            )
        return [Phase("joint", build("all"), epochs * scale, PARTS, last=True, internals=internals)]
    layers = build("layers")
    logits = Phase("logits", build("logits"), epochs * scale, PARTS, last=True)
    if layers is None:
        log.warning("%s.schedule=two_phase, but no layer term is on (hidden_weight and attention_weight are 0): "
                    "the logit phase alone runs", key)
        return [logits]
    parts = ORIGINAL if layer_texts == "original" else PARTS
    return [Phase("layers", layers, section.phase1_epochs * scale, parts, last=False, internals=internals), logits]


@dataclass
class Trained:
    trainer: DistillationTrainer  # the last phase's, holding the kept model
    seconds: float
    curve: list[dict[str, Any]]
    rows: dict[str, int]  # texts each phase trained on


def train_phases(
    phases: list[Phase],
    *,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel,
    alignment: Alignment,
    labelled: Dataset,
    validation: Dataset,
    texts: KDTexts,
    cache_dir: Path,
    teacher_fingerprint: str,
    budget: TrainingBudget,
    budget_section: str,
    scratch: Path,
    resume: str | None,
    max_length: int,
    task_type: str,
    threshold: float,
    collator: Any,
    layer_map: list[int] | None = None,
    pos_weight: Any = None,
    callbacks: list[Any] | None = None,
    logits_from_cache: bool = False,
    **overrides: Any,
) -> Trained:
    """Train `student` through the phases in order; the last keeps its best epoch on validation and
    may resume from `resume` (a checkpoint of an interrupted run: the earlier phases are then done).
    `logits_from_cache`: `teacher` serves the layer terms only; the soft term reads the teacher's
    logits from the teacher_logits cache (kd_train_dataset)."""
    seconds, curve, rows = 0.0, [], {}
    trainer = None
    for phase in phases:
        if not phase.last and resume:
            log.info("phase %s skipped: resuming the last phase from %s", phase.name, resume)
            continue
        store = cached_store(phase, texts, cache_dir, layer_map) if phase.internals != "live" and phase.kd.needs_internals else None
        dataset = teacher_logits.kd_train_dataset(
            labelled, texts, tokenizer, max_length, phase.kd, cache_dir, teacher_fingerprint, phase.parts, store,
            logits_from_cache,
        )
        rows[phase.name] = len(dataset)
        quiet = {} if phase.last else {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False}
        trainer = DistillationTrainer(
            model=student,
            args=training_arguments(budget, scratch if phase.last else scratch / phase.name, section=budget_section,
                                    **{"num_train_epochs": phase.epochs, **overrides, **quiet}),
            train_dataset=dataset,
            eval_dataset=validation if phase.last else None,
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=compute_metrics_fn(task_type, threshold) if phase.last else None,
            kd=phase.kd,
            # Tokens that do not line up with the teacher's: only its cached outputs, never its ids.
            teacher=teacher if phase.kd.needs_teacher and alignment.token_level else None,
            teacher_inputs=alignment.teacher_inputs(teacher),
            teacher_internals=store,
            pos_weight=pos_weight,
            callbacks=callbacks,
        )
        log.info("phase %s: %s on %d texts for %g epochs%s", phase.name, ", ".join(t.name for t in phase.kd.terms),
                 len(dataset), phase.epochs, " (the teacher's cached internals)" if store else "")
        seconds += train(trainer, resume if phase.last else None)
        offset = curve[-1]["step"] if curve else 0
        curve += [{**row, "step": row["step"] + offset, "phase": phase.name}
                  for row in results.curve_rows(trainer.state.log_history)]
    return Trained(trainer, seconds, curve, rows)


def cached_store(phase: Phase, texts: KDTexts, cache_dir: Path, layer_map: list[int] | None) -> InternalsStore | None:
    """The teacher's cached internals for a phase's texts, checked to hold the layers it reads; with
    `auto`, None (the teacher runs live) where teacher_logits cached none, or not these layers or texts."""
    parts = texts.parts(phase.parts)
    if phase.internals == "auto" and (
        layer_map is None or not cache_holds(cache_dir, parts, layer_map, teacher_logits.texts_sha256)
    ):
        log.info("teacher_internals=auto: the teacher runs live (teacher_logits cached no internals of these "
                 "layers and texts)")
        return None
    store = InternalsStore(cache_dir, parts, teacher_logits.texts_sha256)
    if layer_map is None or not store.covers(layer_map):
        raise ConfigError(
            f"teacher_internals=cached: {cache_dir} holds the teacher's layers {store.layers}, not those of the layer map "
            f"{layer_map} (plus the embedding output). The teacher_logits stage caches the layers of "
            "distill_intermediate's map at student.num_layers; set teacher_internals: live for other layers"
        )
    return store
