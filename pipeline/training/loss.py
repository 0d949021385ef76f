"""The loss of every training stage: a weighted sum of small terms, each an `nn.Module` (the shape of
torchtune's `modules/loss/kd_losses.py`) that declares its `name` (logged as `loss_<name>`), its
`weight` and what it needs from the models.

This module holds what the teacher needs: the term base (`KDTerm`, `KDBatch`), their sum (`KDLoss`)
and the hard-label term. With the hard-label term alone (`hard_labels_only`) the sum is plain
fine-tuning, which is how the teacher and the no-KD baseline are trained. The terms that read a
teacher (soft KL, relation, hidden states, attention maps) are student-only and live in
pipeline/kd/terms.py, so changing them never re-trains the teacher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers.utils import ModelOutput

from pipeline.config.data import TaskConfig
from pipeline.errors import ConfigError


def hard_loss(logits: torch.Tensor, labels: torch.Tensor, task_type: str, pos_weight: torch.Tensor | None = None):
    if task_type == "multi_label":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pos_weight)
    return F.cross_entropy(logits, labels)


def hard_loss_weighted(
    logits: torch.Tensor, labels: torch.Tensor, label_weight: torch.Tensor, pos_weight: torch.Tensor | None
) -> torch.Tensor:
    per_label = F.binary_cross_entropy_with_logits(
        logits, labels.float(), pos_weight=pos_weight, reduction="none"
    ).mean(dim=0)
    return (per_label * label_weight).mean()


@dataclass
class KDBatch:
    """What the terms may read at one training step (the trainer fills only what they asked for)."""

    student: ModelOutput  # logits; hidden_states / attentions when a term needs them
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pos_weight: torch.Tensor | None = None  # multi-label BCE weight of positives
    teacher_logits: torch.Tensor | None = None  # cached or live, in the student's dtype
    teacher_pooled: torch.Tensor | None = None  # cached pooled hidden states [batch, layers (x) teacher hidden]
    teacher: ModelOutput | None = None  # the live teacher's outputs, when internals are needed
    has_label: torch.Tensor | None = None  # per example: False for a transfer text (no label); None: all labelled


class KDTerm(nn.Module):
    """One weighted term of the student's loss.

    A subclass sets `name` (the curve column is `loss_<name>`) and says what it reads: the teacher
    (its logits, or its internals when it also needs hidden states or attentions) and the models'
    hidden states or attention maps. `forward` returns the unweighted value; the trainer multiplies
    it by `weight`, sums the terms and logs each value by name. `needs_teacher_internals`: the
    teacher must run live on the student's tokens (its hidden states or attention maps are read).
    `needs_teacher_pooled`: it reads the teacher's cached mean-pooled hidden states of the layers in
    its `teacher_layers` (a student with its own tokenizer).
    """

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    needs_attentions: ClassVar[bool] = False
    needs_teacher_internals: ClassVar[bool] = False
    needs_teacher_pooled: ClassVar[bool] = False

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, batch: KDBatch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward(batch)")

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class HardLabelLoss(KDTerm):
    """Cross-entropy with the true labels (per-label BCE, with pos_weight, for multi-label).

    `label_weight` (multi-label only) weighs the per-label BCE before averaging: with per-label
    alphas it is 1 - label_alpha.
    """

    name = "ce"
    needs_teacher = False

    def __init__(self, weight: float, task_type: str, label_weight: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        self.task_type = task_type
        self.register_buffer("label_weight", label_weight, persistent=False)

    def forward(self, batch: KDBatch) -> torch.Tensor:
        logits, labels = batch.student.logits, batch.labels
        if batch.has_label is not None:  # transfer texts have no label: the mean is over labelled rows only
            labelled = batch.has_label.bool()
            if not labelled.any():
                return logits.sum() * 0.0
            logits, labels = logits[labelled], labels[labelled]
        if self.label_weight is not None:
            return hard_loss_weighted(logits, labels, self.label_weight, batch.pos_weight)
        return hard_loss(logits, labels, self.task_type, batch.pos_weight)


class KDLoss(nn.Module):
    """The enabled terms of one stage: what they need from the models, and their weighted sum.
    `skipped`: the terms the params enable but that cannot apply here, with the reason."""

    def __init__(self, terms: list[KDTerm], task_type: str, skipped: dict[str, str] | None = None) -> None:
        super().__init__()
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"two KD terms log under the same name: {names}")
        self.terms = nn.ModuleList(terms)
        self.task_type = task_type
        self.skipped = dict(skipped or {})

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms)

    @property
    def needs_hidden_states(self) -> bool:
        return any(term.needs_hidden_states for term in self.terms)

    @property
    def needs_attentions(self) -> bool:
        return any(term.needs_attentions for term in self.terms)

    @property
    def needs_internals(self) -> bool:
        """The teacher must run live (its cached logits are not enough)."""
        return any(term.needs_teacher_internals for term in self.terms)

    @property
    def pooled_teacher_layers(self) -> list[int]:
        """The teacher layers (0: embedding output) whose cached pooled states a term reads, in its order."""
        return next((list(term.teacher_layers) for term in self.terms if term.needs_teacher_pooled), [])

    @property
    def has_projection(self) -> bool:
        return any(getattr(term, "projection", None) is not None for term in self.terms)

    def forward(self, batch: KDBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the terms, and every term's unweighted value by name (plus `total`)."""
        parts: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for term in self.terms:
            parts[term.name] = term(batch)
            weighted = term.weight * parts[term.name]
            total = weighted if total is None else total + weighted
        parts["total"] = total
        return total, parts

    def evaluation_loss(self, logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None):
        """The plain hard-label loss: evaluation losses stay comparable across every student."""
        return hard_loss(logits, labels, self.task_type, pos_weight)


def hard_labels_only(task_type: str) -> KDLoss:
    """The loss of the teacher and of the no-KD baseline: the hard-label term alone (plain fine-tuning)."""
    return KDLoss([HardLabelLoss(1.0, task_type)], task_type)


def pos_weight(task: TaskConfig, dataset: Dataset, label_names: list[str]) -> torch.Tensor | None:
    """Per-label BCE weight of positives (multi-label only), from params or the training split."""
    if task.type != "multi_label" or task.pos_weight == "none":
        return None
    if task.pos_weight == "auto":
        labels = np.asarray(dataset["labels"], dtype=np.float64)
        positives = labels.sum(axis=0)
        return torch.tensor((len(labels) - positives) / np.maximum(positives, 1), dtype=torch.float32)
    if len(task.pos_weight) != len(label_names):
        raise ConfigError(
            f"task.pos_weight has {len(task.pos_weight)} values for {len(label_names)} labels {label_names}"
        )
    return torch.tensor(task.pos_weight, dtype=torch.float32)
