"""The student-only knowledge-distillation terms and `build_kd_loss`, which turns a params section into
the enabled terms. The term base, their sum and the hard-label term are in pipeline/training/loss.py
(the teacher needs them too); a new term is one `KDTerm` subclass here plus one line in
`build_kd_loss`. A student's loss:

    (1 - alpha) * hard-label CE + alpha * T^2 * soft(teacher_T, student_T)
    + relation_weight * relation + hidden_weight * hidden-state MSE + attention_weight * attention MSE

where `soft` is KL(teacher || student) over a softmax (single-label) or the binary cross-entropy of
per-label sigmoids (multi-label, where `label_alpha` may replace alpha label by label). With
`soft_loss: mse` the soft term is instead the MSE between the raw logits (no temperature). With alpha = 0
and no other term only the hard-label term is left: the no-KD baseline.

A student whose tokens do not line up with the teacher's (`token_level=False`) cannot read the teacher's token ids, so
every teacher signal comes from the `teacher_logits` cache, looked up by text: the logits, and for the
hidden term the teacher's mean-pooled hidden states of the mapped layers (`PooledHiddenMSE`, matching
sentence representations instead of token positions). The attention term compares maps token by
token: it is skipped, with the reason in `KDLoss.skipped`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.students import KDTerms
from pipeline.errors import ConfigError
from pipeline.training.loss import HardLabelLoss, KDBatch, KDLoss, KDTerm, hard_labels_only

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- losses


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch (Hinton et al.)."""
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def soft_loss_multilabel(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, label_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """T^2 * BCE(sigmoid(student/T), sigmoid(teacher/T)) per label, averaged (optionally label-weighted).

    Unlike KL it is not zero when the two agree (it is then the teacher's entropy); the gradients
    are the same as KL's.
    """
    per_label = F.binary_cross_entropy_with_logits(
        student / temperature, torch.sigmoid(teacher / temperature), reduction="none"
    ).mean(dim=0)
    if label_weight is not None:
        per_label = per_label * label_weight
    return per_label.mean() * temperature**2


def logit_mse(student: torch.Tensor, teacher: torch.Tensor, label_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between raw student and teacher logits (Ba & Caruana; Kim et al. 2021 found it
    a better soft term than KL for small students), averaged over the batch and the labels
    (optionally label-weighted)."""
    per_label = (student - teacher).pow(2).mean(dim=0)
    if label_weight is not None:
        per_label = per_label * label_weight
    return per_label.mean()


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the batch's pairwise cosine-similarity matrices of student and teacher logits."""
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher, dim=-1)
    return F.mse_loss(s @ s.T, t @ t.T)


def hidden_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, projection: nn.Module | None = None
) -> torch.Tensor:
    """MSE of hidden states [batch, seq, hidden] over non-padding positions only."""
    if projection is not None:
        student = projection(student)
    weights = mask.unsqueeze(-1).to(student.dtype)
    squared = (student - teacher).pow(2) * weights
    return squared.sum() / (weights.sum() * student.shape[-1]).clamp_min(1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The attention-mask-weighted mean over the sequence: [batch, seq, hidden] -> [batch, hidden]
    (padding excluded, special tokens included, as sentence-transformers pools)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


def relative_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE divided by the target's mean square: 1 for a prediction of zeros, 0 for a perfect one,
    whatever the scale of the target."""
    return F.mse_loss(prediction, target) / target.pow(2).mean().clamp_min(1e-12)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE of attention maps [batch, heads, seq, seq] over (query, key) pairs that are both real tokens.

    With different head counts (a narrower student, or pruned heads) the head-averaged maps are compared.
    """
    if student.shape[1] != teacher.shape[1]:
        student = student.mean(dim=1, keepdim=True)
        teacher = teacher.mean(dim=1, keepdim=True)
    m = mask.to(student.dtype)
    pair = (m[:, None, :, None] * m[:, None, None, :]).expand_as(student)
    squared = (student - teacher).pow(2) * pair
    return squared.sum() / pair.sum().clamp_min(1)


# --------------------------------------------------------------------------- the terms


class SoftLabelKL(KDTerm):
    """T^2 * KL(teacher || student) of the temperature-softened softmax (single-label)."""

    name = "kl"

    def __init__(self, weight: float, temperature: float) -> None:
        super().__init__(weight)
        self.temperature = temperature

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return soft_loss(batch.student.logits, batch.teacher_logits, self.temperature)


class SigmoidSoftLoss(KDTerm):
    """T^2 * BCE of the temperature-softened per-label sigmoids (multi-label); logged as `kl`.

    `label_weight` weighs the labels before averaging: the per-label alphas, when given.
    """

    name = "kl"

    def __init__(self, weight: float, temperature: float, label_weight: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        self.temperature = temperature
        self.register_buffer("label_weight", label_weight, persistent=False)

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return soft_loss_multilabel(batch.student.logits, batch.teacher_logits, self.temperature, self.label_weight)


class LogitMSE(KDTerm):
    """MSE between raw student and teacher logits (`soft_loss: mse`); logged as `mse`.

    `label_weight` weighs the labels before averaging: the per-label alphas (multi-label), when given.
    """

    name = "mse"

    def __init__(self, weight: float, label_weight: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        self.register_buffer("label_weight", label_weight, persistent=False)

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return logit_mse(batch.student.logits, batch.teacher_logits, self.label_weight)


class RelationLoss(KDTerm):
    """MSE between the batch's pairwise cosine-similarity matrices of student and teacher logits."""

    name = "relation"

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return relation_loss(batch.student.logits, batch.teacher_logits)


class HiddenStateMSE(KDTerm):
    """Masked hidden-state MSE averaged over the embedding output (0, 0) and the mapped layers.

    `layer_map[i]` is the teacher layer (1-based) for student layer i + 1. With a narrower student a
    projection (student hidden -> teacher hidden) trains with it but is not part of the saved student.
    """

    name = "hidden"
    needs_hidden_states = True
    needs_teacher_internals = True

    def __init__(self, weight: float, layer_map: list[int], projection: nn.Module | None = None) -> None:
        super().__init__(weight)
        self.pairs = [(0, 0)] + [(i + 1, t) for i, t in enumerate(layer_map)]
        self.projection = projection

    def forward(self, batch: KDBatch) -> torch.Tensor:
        student, teacher = batch.student.hidden_states, batch.teacher.hidden_states
        return sum(
            hidden_mse(student[s], teacher[t], batch.attention_mask, self.projection) for s, t in self.pairs
        ) / len(self.pairs)


class AttentionMSE(KDTerm):
    """Masked attention-map MSE averaged over the mapped layers (head-averaged if head counts differ).

    `guide_heads` (per student layer, the index of each of its heads among the guide layer's heads)
    compares head for head when the student's heads are a subset of its guide's: a student pruned from
    the guide (prune.recovery.distil_from source or source_layers), where head averages would blur
    which map each kept head had learned (`match_guide_heads`)."""

    name = "attention"
    needs_attentions = True
    needs_teacher_internals = True

    def __init__(self, weight: float, layer_map: list[int]) -> None:
        super().__init__(weight)
        self.layer_map = list(layer_map)
        self.guide_heads: list[list[int]] | None = None  # set after pruning, by match_guide_heads

    def forward(self, batch: KDBatch) -> torch.Tensor:
        student, teacher = batch.student.attentions, batch.teacher.attentions
        guide = [teacher[t - 1] for t in self.layer_map]
        if self.guide_heads is not None:
            guide = [maps[:, heads] for maps, heads in zip(guide, self.guide_heads)]
        return sum(attention_mse(student[i], maps, batch.attention_mask) for i, maps in enumerate(guide)) / len(guide)


def match_guide_heads(kd: KDLoss | None, guide_heads: list[list[int]]) -> bool:
    """Point `kd`'s attention term (if any) at the guide heads each student head was; whether it has one."""
    terms = [term for term in (kd.terms if kd else []) if isinstance(term, AttentionMSE)]
    for term in terms:
        term.guide_heads = guide_heads
    return bool(terms)


class PooledHiddenMSE(KDTerm):
    """Hidden-state KD across tokenizers: the relative MSE between the student's mean-pooled hidden
    states (embedding output and mapped layers), mapped into the teacher's space by a learned linear
    projection, and the teacher's mean-pooled states of the same text on its own tokenization,
    averaged over the pairs; logged as `hidden`.

    Token positions do not correspond across tokenizers, sentences do: pooling gives one vector per
    text on both sides. Relative MSE (the MSE over the batch divided by the mean square of the
    teacher's pooled states of that layer in the batch): pooling averages the per-token values away,
    so for all-mpnet-base-v2 the pooled states' mean square is only 0.003 (embedding output) to 0.025
    (layer 8); a plain MSE would weigh the layers 8x apart and stay ~0.03 beside a cross-entropy
    of ~1, so hidden_weight would mean nothing comparable. Relative, every layer counts alike and the
    term starts near 1 (predicting zeros scores exactly 1). The projection is always learned (a pretrained student's space is not the teacher's, even at
    equal width) and is not part of the saved student. The targets (`KDBatch.teacher_pooled`,
    [batch, pairs, teacher hidden] in the order of `teacher_layers`, or those rows flattened, as the
    dataset column holds them) come from the teacher_logits cache.
    """

    name = "hidden"
    needs_hidden_states = True
    needs_teacher_pooled = True

    def __init__(self, weight: float, layer_map: list[int], projection: nn.Module) -> None:
        super().__init__(weight)
        self.student_layers = list(range(len(layer_map) + 1))  # 0: the embedding output
        self.teacher_layers = [0] + list(layer_map)
        self.projection = projection

    def forward(self, batch: KDBatch) -> torch.Tensor:
        if batch.teacher_pooled is None:
            raise ValueError("the pooled hidden-state term needs the teacher's cached pooled states (teacher_pooled)")
        hidden, mask = batch.student.hidden_states, batch.attention_mask
        targets = batch.teacher_pooled.to(hidden[0].dtype)
        targets = targets.reshape(len(targets), len(self.teacher_layers), -1)
        return sum(
            relative_mse(self.projection(mean_pool(hidden[s], mask)), targets[:, i])
            for i, s in enumerate(self.student_layers)
        ) / len(self.student_layers)


# Why a term is left out when the student's tokenizer differs from the teacher's.
NEEDS_SHARED_TOKENIZER = (
    "attention maps are compared token by token, and the student's tokenizer cuts text into other pieces "
    "than the teacher's"
)


def build_kd_loss(
    section: KDTerms | None,
    task_type: str,
    *,
    label_names: Sequence[str] = (),
    key: str = "",
    layer_map: Sequence[int] = (),
    hidden_sizes: tuple[int, int] | None = None,
    token_level: bool = True,
    part: Literal["all", "layers", "logits"] = "all",
) -> KDLoss | None:
    """The terms a params section enables; None (the teacher, the baseline) is hard labels only.

    `key` names the section in error messages, `layer_map` pairs student and teacher layers for the
    hidden and attention terms, `hidden_sizes` (student, teacher) decide whether the hidden term
    needs a projection. When the student's token positions do not line up with the teacher's
    (`token_level` False, pipeline/kd/token_map.py) the hidden term matches pooled sentence states
    (relative MSE) and the attention term is skipped (logged, and listed in `KDLoss.skipped`).
    `part` keeps the layer terms only (hidden, attention: None when there are none) or the logit
    terms only (hard, soft, relation), for a two-phase schedule. A new term is one `KDTerm` subclass
    and one line here (in `extra`).
    """
    if section is None:
        return hard_labels_only(task_type)
    multi_label = task_type == "multi_label"
    if multi_label and section.label_alpha is not None and len(section.label_alpha) != len(label_names):
        raise ConfigError(
            f"{key}.label_alpha has {len(section.label_alpha)} values for {len(label_names)} labels {list(label_names)}"
        )
    # The terms beyond the hard/soft pair, each on when its weight is positive (in summation order).
    hidden_weight = getattr(section, "hidden_weight", 0.0)
    attention_weight = getattr(section, "attention_weight", 0.0)
    if (hidden_weight > 0 or attention_weight > 0) and not layer_map:
        raise ValueError("the hidden-state and attention terms need a layer_map")
    layers: list[KDTerm] = []
    skipped: dict[str, str] = {}
    if hidden_weight > 0 and not token_level:
        if hidden_sizes is None:
            raise ValueError("the pooled hidden-state term needs hidden_sizes for its projection")
        layers.append(PooledHiddenMSE(hidden_weight, list(layer_map), nn.Linear(*hidden_sizes)))
    elif hidden_weight > 0:
        projection = None
        if hidden_sizes is not None and hidden_sizes[0] != hidden_sizes[1]:
            # TinyBERT: a learned map from the student's hidden space into the teacher's.
            projection = nn.Linear(*hidden_sizes)
        layers.append(HiddenStateMSE(hidden_weight, list(layer_map), projection))
    if attention_weight > 0 and not token_level:
        skipped["attention"] = NEEDS_SHARED_TOKENIZER
        log.warning("%s.attention_weight=%s: the attention term is skipped: %s", key or "kd", attention_weight, NEEDS_SHARED_TOKENIZER)
    elif attention_weight > 0:
        layers.append(AttentionMSE(attention_weight, list(layer_map)))
    if part == "layers":
        return KDLoss(layers, task_type, skipped) if layers else None
    extra: list[KDTerm] = [RelationLoss(section.relation_weight)] if section.relation_weight > 0 else []
    if part == "all":
        extra += layers

    if section.alpha == 0 and not any(term.needs_teacher for term in extra):
        return KDLoss([HardLabelLoss(1.0, task_type), *extra], task_type, skipped)  # no teacher: the baseline
    # With the teacher, the hard and soft pair is always computed and logged, even at alpha 0 or 1.
    if multi_label and section.label_alpha is not None:
        # Per-label alpha: rare labels may lean on the teacher more; the weights live inside the terms.
        alpha = torch.tensor(section.label_alpha)
        pair: list[KDTerm] = [HardLabelLoss(1.0, task_type, label_weight=1 - alpha), soft_term(section, multi_label, 1.0, alpha)]
    else:
        pair = [HardLabelLoss(1 - section.alpha, task_type), soft_term(section, multi_label, section.alpha)]
    return KDLoss(pair + extra, task_type, skipped)


def soft_term(section: KDTerms, multi_label: bool, weight: float, label_weight: torch.Tensor | None = None) -> KDTerm:
    """The teacher's soft term the section asks for: logit MSE, or the temperature-softened KL (single-label)
    or sigmoid cross-entropy (multi-label)."""
    if section.soft_loss == "mse":
        return LogitMSE(weight, label_weight)
    if multi_label:
        return SigmoidSoftLoss(weight, section.temperature, label_weight=label_weight)
    return SoftLabelKL(weight, section.temperature)
