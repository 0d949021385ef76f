"""Knowledge-distillation losses and the one distillation Trainer that serves every student stage.

The student's loss is

    alpha * T^2 * soft(teacher_T, student_T) + (1 - alpha) * hard(labels, student)
    + hidden_weight * hidden-state MSE + attention_weight * attention MSE + relation_weight * relation

where `soft` is KL(teacher || student) over a softmax (single-label) or the binary cross-entropy of
per-label sigmoids (multi-label). With alpha = 0 and no other term it is plain fine-tuning, which
is how the no-KD baseline is trained, by the same code.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, Trainer

from pipeline.config import KDTerms
from pipeline.errors import ConfigError, FinCompressError

log = logging.getLogger(__name__)

PROJECTION_FILE = "projection.safetensors"


@dataclass(frozen=True)
class KDConfig:
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the soft term; 0 disables the teacher's logits
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    relation_weight: float = 0.0
    # Teacher layer (1-based) for each student layer; needed by the hidden and attention terms.
    layer_map: list[int] = field(default_factory=list)
    task_type: str = "single_label"
    # multi_label: per-label weights of the soft term, replacing alpha label by label.
    label_alpha: list[float] | None = None

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.relation_weight > 0 or self.needs_internals

    @property
    def needs_internals(self) -> bool:
        return self.hidden_weight > 0 or self.attention_weight > 0

    @classmethod
    def from_terms(cls, terms: KDTerms | None, task_type: str, layer_map: list[int] = ()) -> KDConfig:
        if terms is None:
            return cls(task_type=task_type)
        return cls(
            temperature=terms.temperature,
            alpha=terms.alpha,
            hidden_weight=getattr(terms, "hidden_weight", 0.0),
            attention_weight=getattr(terms, "attention_weight", 0.0),
            relation_weight=terms.relation_weight,
            layer_map=list(layer_map),
            task_type=task_type,
            label_alpha=terms.label_alpha if task_type == "multi_label" else None,
        )


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


# --------------------------------------------------------------------------- the trainer


class DistillationTrainer(Trainer):
    """A Hugging Face Trainer whose loss is the KD objective above.

    The teacher is frozen (eval mode, no gradients). When only its logits are needed they come from
    the precomputed `teacher_logits` column; the hidden/attention terms run it live. A projection
    (student hidden -> teacher hidden) is trained with the student but saved apart from it.
    """

    def __init__(
        self,
        *args: Any,
        kd: KDConfig,
        teacher: PreTrainedModel | None = None,
        projection: nn.Module | None = None,
        pos_weight: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.kd = kd
        self.model_accepts_loss_kwargs = False  # our loss is a batch mean already
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.args.device)
        self.projection = projection.to(self.args.device) if projection is not None else None
        self.pos_weight = pos_weight.to(self.args.device) if pos_weight is not None else None
        self.label_alpha = (
            torch.tensor(kd.label_alpha, device=self.args.device) if kd.label_alpha is not None else None
        )
        self._sums: dict[str, float] = defaultdict(float)
        self._batches = 0

    # The projection trains with the student: one more parameter group in the same optimizer.
    def create_optimizer(self):  # noqa: D401 (Trainer API)
        optimizer = super().create_optimizer()
        if self.projection is not None and not any(
            group.get("name") == "projection" for group in optimizer.param_groups
        ):
            optimizer.add_param_group(
                {"params": list(self.projection.parameters()), "weight_decay": 0.0, "name": "projection"}
            )
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        cached = inputs.pop("teacher_logits", None)
        kd = self.kd
        training = model.training
        internals = training and kd.needs_internals
        outputs = model(
            **inputs,
            output_hidden_states=internals and kd.hidden_weight > 0,
            output_attentions=internals and kd.attention_weight > 0,
        )
        logits = outputs.logits
        hard = hard_loss(logits, labels, kd.task_type, self.pos_weight)
        if not training or not kd.needs_teacher:
            # Evaluation loss is the plain hard loss, comparable across every student.
            if training:
                check_finite(hard, self.state.global_step)
                self._accumulate({"ce": hard, "total": hard})
            return (hard, outputs) if return_outputs else hard
        teacher_out = None
        if cached is None or internals:
            with torch.no_grad():
                teacher_out = self.teacher(
                    **inputs,
                    output_hidden_states=internals and kd.hidden_weight > 0,
                    output_attentions=internals and kd.attention_weight > 0,
                )
        teacher_logits = cached if cached is not None else teacher_out.logits
        teacher_logits = teacher_logits.to(logits.dtype)
        parts: dict[str, torch.Tensor] = {"ce": hard}
        if kd.task_type == "multi_label":
            if self.label_alpha is not None:  # per-label alpha: rare labels may lean on the teacher more
                soft = soft_loss_multilabel(logits, teacher_logits, kd.temperature, self.label_alpha)
                hard_part = hard_loss_weighted(logits, labels, 1 - self.label_alpha, self.pos_weight)
                loss = soft + hard_part
                parts["kl"] = soft
            else:
                parts["kl"] = soft_loss_multilabel(logits, teacher_logits, kd.temperature)
                loss = kd.alpha * parts["kl"] + (1 - kd.alpha) * hard
        else:
            parts["kl"] = soft_loss(logits, teacher_logits, kd.temperature)
            loss = kd.alpha * parts["kl"] + (1 - kd.alpha) * hard
        if kd.relation_weight > 0:
            parts["relation"] = relation_loss(logits, teacher_logits)
            loss = loss + kd.relation_weight * parts["relation"]
        if internals:
            mask = inputs["attention_mask"]
            if kd.hidden_weight > 0:
                s_states, t_states = outputs.hidden_states, teacher_out.hidden_states
                pairs = [(0, 0)] + [(i + 1, t) for i, t in enumerate(kd.layer_map)]
                parts["hidden"] = sum(
                    hidden_mse(s_states[s], t_states[t], mask, self.projection) for s, t in pairs
                ) / len(pairs)
                loss = loss + kd.hidden_weight * parts["hidden"]
            if kd.attention_weight > 0:
                s_att, t_att = outputs.attentions, teacher_out.attentions
                parts["attention"] = sum(
                    attention_mse(s_att[i], t_att[t - 1], mask) for i, t in enumerate(kd.layer_map)
                ) / len(kd.layer_map)
                loss = loss + kd.attention_weight * parts["attention"]
        parts["total"] = loss
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
        """Add the mean of every loss component since the last log (one row per epoch)."""
        if "loss" in logs and self._batches:
            for name, total in self._sums.items():
                logs[f"loss_{name}"] = total / self._batches
            self._sums.clear()
            self._batches = 0
        super().log(logs, *args, **kwargs)

    # The projection is not part of the student, but a resumed run needs it.
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.projection is not None and self.is_world_process_zero():
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            if folder.is_dir():
                save_file(self.projection.state_dict(), str(folder / PROJECTION_FILE))

    def train(self, resume_from_checkpoint=None, **kwargs: Any):
        if self.projection is not None and resume_from_checkpoint:
            path = Path(resume_from_checkpoint) / PROJECTION_FILE
            if path.is_file():
                self.projection.load_state_dict(load_file(str(path), device=str(self.args.device)))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop at the first NaN/inf loss instead of training garbage to the end."""
    if not torch.isfinite(loss):
        raise FinCompressError(
            f"the training loss became {loss.item()} at step {step}; lower the learning rate of this stage, "
            "check the data for empty or extreme inputs, or disable AMP (fp16) on GPU"
        )


def hard_loss_weighted(
    logits: torch.Tensor, labels: torch.Tensor, label_weight: torch.Tensor, pos_weight: torch.Tensor | None
) -> torch.Tensor:
    per_label = F.binary_cross_entropy_with_logits(
        logits, labels.float(), pos_weight=pos_weight, reduction="none"
    ).mean(dim=0)
    return (per_label * label_weight).mean()


@torch.no_grad()
def precompute_teacher_logits(teacher: PreTrainedModel, dataset, collator, batch_size: int = 128):
    """The teacher's logits for every example, in dataset order: vanilla KD computes them once, not per epoch."""
    from torch.utils.data import DataLoader

    teacher.eval()
    device = next(teacher.parameters()).device
    columns = [c for c in dataset.column_names if c != "labels"]
    loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size, collate_fn=collator)
    chunks = []
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        chunks.append(teacher(**batch).logits.float().cpu())
    return dataset.add_column("teacher_logits", torch.cat(chunks).tolist())
