"""Knowledge-distillation loss terms and the one distillation Trainer that serves every training stage.

The loss is a weighted sum of small terms, each an `nn.Module` (the shape of torchtune's
`modules/loss/kd_losses.py`) that declares its `name` (logged as `loss_<name>`), its `weight` and
what it needs from the models:

    (1 - alpha) * hard-label CE + alpha * T^2 * soft(teacher_T, student_T)
    + relation_weight * relation + hidden_weight * hidden-state MSE + attention_weight * attention MSE

where `soft` is KL(teacher || student) over a softmax (single-label) or the binary cross-entropy of
per-label sigmoids (multi-label, where `label_alpha` may replace alpha label by label). With alpha = 0
and no other term only the hard-label term is left: plain fine-tuning, which is how the teacher and
the no-KD baseline are trained, by the same code. `build_kd_loss` turns a params section into the
enabled terms; a new term is one `KDTerm` subclass plus one line there.

A student with its own tokenizer (`shared_tokenizer=False`) cannot read the teacher's token ids, so
every teacher signal comes from the `teacher_logits` cache, looked up by text: the logits, and for the
hidden term the teacher's mean-pooled hidden states of the mapped layers (`PooledHiddenMSE`, matching
sentence representations instead of token positions). The attention term compares maps token by
token: it is skipped, with the reason in `KDLoss.skipped`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.utils import ModelOutput

from pipeline.config.students import KDTerms
from pipeline.errors import ConfigError, FinCompressError

log = logging.getLogger(__name__)

# The trainable parameters of the terms (the hidden-state projection), kept beside a resumable checkpoint.
KD_TERMS_FILE = "kd_terms.safetensors"


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


def resolve_layer_map(layer_map: str | list[int], student_layers: int, teacher_layers: int) -> list[int]:
    from pipeline.models import uniform_layer_map

    if layer_map == "auto":
        return uniform_layer_map(student_layers, teacher_layers)
    if len(layer_map) != student_layers:
        raise ConfigError(
            f"distill_intermediate.layer_map has {len(layer_map)} entries but the student has {student_layers} "
            "layers; give one teacher layer per student layer"
        )
    beyond = [layer for layer in layer_map if layer > teacher_layers]
    if beyond:
        raise ConfigError(
            f"distill_intermediate.layer_map {layer_map} points past the teacher's depth "
            f"({teacher_layers} layers): {beyond}"
        )
    return list(layer_map)




# --------------------------------------------------------------------------- the terms


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
    """

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    needs_attentions: ClassVar[bool] = False
    needs_teacher_internals: ClassVar[bool] = False

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
    """Masked attention-map MSE averaged over the mapped layers (head-averaged if head counts differ)."""

    name = "attention"
    needs_attentions = True
    needs_teacher_internals = True

    def __init__(self, weight: float, layer_map: list[int]) -> None:
        super().__init__(weight)
        self.layer_map = list(layer_map)

    def forward(self, batch: KDBatch) -> torch.Tensor:
        student, teacher = batch.student.attentions, batch.teacher.attentions
        return sum(
            attention_mse(student[i], teacher[t - 1], batch.attention_mask) for i, t in enumerate(self.layer_map)
        ) / len(self.layer_map)


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
    "attention maps are compared token by token, and the student's tokenizer differs from the teacher's"
)


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
        return next((list(term.teacher_layers) for term in self.terms if isinstance(term, PooledHiddenMSE)), [])

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


def build_kd_loss(
    section: KDTerms | None,
    task_type: str,
    *,
    label_names: Sequence[str] = (),
    key: str = "",
    layer_map: Sequence[int] = (),
    hidden_sizes: tuple[int, int] | None = None,
    shared_tokenizer: bool = True,
) -> KDLoss:
    """The terms a params section enables; None (the teacher, the baseline) is hard labels only.

    `key` names the section in error messages, `layer_map` pairs student and teacher layers for the
    hidden and attention terms, `hidden_sizes` (student, teacher) decide whether the hidden term
    needs a projection. Without a shared tokenizer the hidden term matches pooled sentence states
    (relative MSE) and the attention term is skipped (logged, and listed in `KDLoss.skipped`). A new term is one
    `KDTerm` subclass and one line here (in `extra`).
    """
    if section is None:
        return KDLoss([HardLabelLoss(1.0, task_type)], task_type)
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
    extra: list[KDTerm] = []
    skipped: dict[str, str] = {}
    if section.relation_weight > 0:
        extra.append(RelationLoss(section.relation_weight))
    if hidden_weight > 0 and not shared_tokenizer:
        if hidden_sizes is None:
            raise ValueError("the pooled hidden-state term needs hidden_sizes for its projection")
        extra.append(PooledHiddenMSE(hidden_weight, list(layer_map), nn.Linear(*hidden_sizes)))
    elif hidden_weight > 0:
        projection = None
        if hidden_sizes is not None and hidden_sizes[0] != hidden_sizes[1]:
            # TinyBERT: a learned map from the student's hidden space into the teacher's.
            projection = nn.Linear(*hidden_sizes)
        extra.append(HiddenStateMSE(hidden_weight, list(layer_map), projection))
    if attention_weight > 0 and not shared_tokenizer:
        skipped["attention"] = NEEDS_SHARED_TOKENIZER
        log.warning("%s.attention_weight=%s: the attention term is skipped: %s", key or "kd", attention_weight, NEEDS_SHARED_TOKENIZER)
    elif attention_weight > 0:
        extra.append(AttentionMSE(attention_weight, list(layer_map)))

    if section.alpha == 0 and not any(term.needs_teacher for term in extra):
        return KDLoss([HardLabelLoss(1.0, task_type), *extra], task_type, skipped)  # no teacher: the baseline
    # With the teacher, the hard and soft pair is always computed and logged, even at alpha 0 or 1.
    temperature = section.temperature
    if multi_label and section.label_alpha is not None:
        # Per-label alpha: rare labels may lean on the teacher more; the weights live inside the terms.
        alpha = torch.tensor(section.label_alpha)
        pair: list[KDTerm] = [
            HardLabelLoss(1.0, task_type, label_weight=1 - alpha),
            SigmoidSoftLoss(1.0, temperature, label_weight=alpha),
        ]
    else:
        soft = SigmoidSoftLoss if multi_label else SoftLabelKL
        pair = [HardLabelLoss(1 - section.alpha, task_type), soft(section.alpha, temperature)]
    return KDLoss(pair + extra, task_type, skipped)


# --------------------------------------------------------------------------- the trainer


class DistillationTrainer(Trainer):
    """A Hugging Face Trainer whose loss is the weighted sum of the KD terms in `kd`.

    It asks the student and the teacher for exactly what the terms need. The teacher is frozen (eval
    mode, no gradients) and only loaded when a term reads it; when only its logits are needed they
    come from the precomputed `teacher_logits` column, else it runs live. Pooled hidden-state targets
    (a student with its own tokenizer) come from the `teacher_pooled` column: such a student never
    runs the teacher (pass teacher=None). The terms' parameters (the hidden-state projection) train
    with the student in the same optimizer but are saved apart from it.
    """

    def __init__(
        self,
        *args: Any,
        kd: KDLoss,
        teacher: PreTrainedModel | None = None,
        pos_weight: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if kd.needs_internals and teacher is None:
            raise ValueError("these KD terms read the teacher's hidden states or attentions: pass teacher=")
        self.kd = kd.to(self.args.device)
        self.model_accepts_loss_kwargs = False  # our loss is a batch mean already
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.args.device)
        self.pos_weight = pos_weight.to(self.args.device) if pos_weight is not None else None
        self._sums: dict[str, float] = defaultdict(float)
        self._batches = 0

    # The terms' parameters train with the student: one more parameter group in the same optimizer.
    def create_optimizer(self):  # noqa: D401 (Trainer API)
        optimizer = super().create_optimizer()
        parameters = list(self.kd.parameters())
        if parameters and not any(group.get("name") == "kd_terms" for group in optimizer.param_groups):
            optimizer.add_param_group({"params": parameters, "weight_decay": 0.0, "name": "kd_terms"})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        cached = inputs.pop("teacher_logits", None)
        pooled = inputs.pop("teacher_pooled", None)
        has_label = inputs.pop("has_label", None)
        kd = self.kd
        training = model.training
        wants = {
            "output_hidden_states": training and kd.needs_hidden_states,
            "output_attentions": training and kd.needs_attentions,
        }
        outputs = model(**inputs, **wants)
        logits = outputs.logits
        if not training:
            loss = kd.evaluation_loss(logits, labels, self.pos_weight)
            return (loss, outputs) if return_outputs else loss
        batch = KDBatch(
            student=outputs, labels=labels, attention_mask=inputs["attention_mask"], pos_weight=self.pos_weight,
            has_label=has_label, teacher_pooled=pooled,
        )
        if kd.needs_teacher:
            if cached is None or kd.needs_internals:
                if self.teacher is None:
                    raise ValueError("the batch has no teacher_logits column and no teacher was given to compute them")
                with torch.no_grad():
                    batch.teacher = self.teacher(**inputs, **wants)
            teacher_logits = cached if cached is not None else batch.teacher.logits
            batch.teacher_logits = teacher_logits.to(logits.dtype)
        loss, parts = kd(batch)
        check_finite(loss, self.state.global_step)
        self._accumulate(parts)
        if return_outputs:
            outputs = type(outputs)(loss=loss, logits=logits)
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, parts: dict[str, torch.Tensor]) -> None:
        for name, value in parts.items():
            self._sums[name] += float(value.detach())
        self._batches += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the mean of every loss term since the last log (one row per epoch), as loss_<name>."""
        if "loss" in logs and self._batches:
            for name, total in self._sums.items():
                logs[f"loss_{name}"] = total / self._batches
            self._sums.clear()
            self._batches = 0
        super().log(logs, *args, **kwargs)

    # The terms' parameters are not part of the student, but a resumed run needs them.
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self.kd.state_dict()
        if state and self.is_world_process_zero():
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            if folder.is_dir():
                save_file(state, str(folder / KD_TERMS_FILE))

    def train(self, resume_from_checkpoint=None, **kwargs: Any):
        if resume_from_checkpoint and self.kd.state_dict():
            path = Path(resume_from_checkpoint) / KD_TERMS_FILE
            if path.is_file():
                self.kd.load_state_dict(load_file(str(path), device=str(self.args.device)))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop at the first NaN/inf loss instead of training garbage to the end."""
    if not torch.isfinite(loss):
        raise FinCompressError(
            f"the training loss became {loss.item()} at step {step}; lower the learning rate of this stage, "
            "check the data for empty or extreme inputs, or disable AMP (fp16) on GPU"
        )


def precompute_teacher_logits(teacher: PreTrainedModel, dataset, collator, batch_size: int = 128):
    """The dataset with the teacher's logits of every example as a `teacher_logits` column."""
    return dataset.add_column("teacher_logits", compute_teacher_logits(teacher, dataset, collator, batch_size).tolist())


def compute_teacher_logits(teacher: PreTrainedModel, dataset, collator, batch_size: int = 128) -> torch.Tensor:
    """The teacher's logits (float32) for every example, in dataset order."""
    return compute_teacher_outputs(teacher, dataset, collator, batch_size)[0]


@torch.no_grad()
def compute_teacher_outputs(
    teacher: PreTrainedModel, dataset, collator, batch_size: int = 128, pooled_layers: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's logits (float32) for every example, in dataset order, and, when `pooled_layers`
    are given (0: the embedding output), its mean-pooled hidden states of those layers
    [examples, layers, hidden] (float32), from the same forward pass. Batches are formed from
    examples sorted by length (little padding: about half the work on short texts of mixed length;
    padding never changes an example's outputs), and the rows are put back in dataset order."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    teacher.eval()
    device = next(teacher.parameters()).device
    columns = [c for c in dataset.column_names if c not in ("labels", "teacher_logits", "teacher_pooled", "has_label")]
    lengths = [len(ids) for ids in dataset["input_ids"]]
    by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
    loader = DataLoader(dataset.select_columns(columns).select(by_length), batch_size=batch_size, collate_fn=collator)
    chunks, pooled_chunks = [], []
    for batch in tqdm(loader, desc="teacher outputs", unit="batch", leave=False):
        batch = {key: value.to(device) for key, value in batch.items()}
        if not pooled_layers:
            chunks.append(teacher(**batch).logits.float().cpu())
            continue
        outputs = teacher(**batch, output_hidden_states=True)
        chunks.append(outputs.logits.float().cpu())
        mask = batch["attention_mask"]
        pooled_chunks.append(
            torch.stack([mean_pool(outputs.hidden_states[layer].float(), mask) for layer in pooled_layers], dim=1).cpu()
        )
    order = torch.tensor(by_length).argsort()  # each row's position in the sorted batches
    return torch.cat(chunks)[order], (torch.cat(pooled_chunks)[order] if pooled_layers else None)
