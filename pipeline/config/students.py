"""Params of the students: their shape and budget (`student`, shared by the three student stages) and
the KD terms of each distillation stage (`distill_vanilla`, `distill_intermediate`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section, TrainingBudget


class StudentConfig(TrainingBudget):
    # Transformer layers of the student; null: half of the teacher's (rounded up).
    num_layers: int | None = Field(3, ge=1, le=96)
    # Hidden size; null: the teacher's. A different size needs init: random or a pretrained model.
    hidden_size: int | None = Field(None, ge=8, le=8192)
    num_heads: int | None = Field(None, ge=1, le=128)
    intermediate_size: int | None = Field(None, ge=8, le=65536)
    # `teacher`: copy the embeddings and uniformly spaced layers of the fine-tuned teacher (DistilBERT);
    # `random`: fresh weights; anything else: a pretrained model (`minilm-l6`, an id or a directory)
    # whose uniformly spaced layers start the student, at its own width. When its tokenizer differs
    # from the teacher's it keeps it, and KD reads the teacher's cached outputs by text (README).
    init: str = "teacher"
    # Which layers of the init source (teacher or pretrained model) start the student, 1-based: evenly
    # (spaced, the last one kept: 2 of 6 -> [3, 6]), bottom (the first ones: [1, 2]; dropping the top
    # layers kept the most task accuracy in Sajjad et al. 2023) or a list, one source layer per student layer.
    init_layers: Literal["evenly", "bottom"] | list[int] = "evenly"
    # Students train for longer than the teacher does.
    epochs: float = Field(6, gt=0, le=1000)

    @field_validator("init_layers")
    @classmethod
    def _layers(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, list) and (not value or value[0] < 1 or any(b <= a for a, b in zip(value, value[1:]))):
            raise ValueError(f"init_layers must be 1-based source layers in increasing order, e.g. [1, 2]; got {value}")
        return value

    @model_validator(mode="after")
    def _layers_need_a_source(self) -> StudentConfig:
        if self.init == "random" and self.init_layers != "evenly":
            raise ValueError(
                f"init_layers={self.init_layers} chooses layers to copy, but init=random copies none; "
                "drop init_layers or set init to teacher or a pretrained model"
            )
        return self


class KDTerms(Section):
    # The soft term: kl (Hinton: KL of the temperature-softened distributions, scaled by T^2) or mse
    # (MSE between the raw logits; temperature unused).
    soft_loss: Literal["kl", "mse"] = "kl"
    # Softmax temperature T for the soft targets (the soft loss is scaled by T^2).
    temperature: float = Field(4.0, gt=0, le=100)
    # Weight of the soft (teacher) term; (1 - alpha) weighs the hard-label cross-entropy.
    # Convention: Hinton et al. and DistilBERT weigh the soft term; some papers swap them.
    alpha: float = Field(0.7, ge=0, le=1)
    # Optional relation term: MSE between the batch's pairwise cosine-similarity matrices of the
    # student and teacher logits (relational KD). 0 disables it.
    relation_weight: float = Field(0.0, ge=0)
    # multi_label only: a soft-term weight per label replacing alpha label by label (rare labels can
    # lean more on the teacher); null uses alpha for every label.
    label_alpha: list[float] | None = None

    @field_validator("label_alpha")
    @classmethod
    def _alphas(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(not 0 <= a <= 1 for a in value):
            raise ValueError(f"every label_alpha must be within [0, 1], got {value}")
        return value


class DistillVanillaConfig(KDTerms):
    pass


class LayerTerms(Section):
    """The terms that read the teacher's internals layer by layer, and when they train."""

    # Weight of the hidden-state MSE (embedding output included) over mapped layers.
    hidden_weight: float = Field(1.0, ge=0)
    # Weight of the attention-map MSE over mapped layers.
    attention_weight: float = Field(10.0, ge=0)
    # joint: every term at every step. two_phase (TinyBERT): first the layer terms alone for
    # phase1_epochs, then the logit terms (soft + hard) for the stage's epochs.
    schedule: Literal["joint", "two_phase"] = "joint"
    phase1_epochs: float = Field(3, gt=0, le=1000)
    # The texts the layer terms see: all (labelled, transfer and augmented) or original (without the
    # augmented ones). The teacher runs live for these terms, one pass per text and epoch: on a CPU
    # the many augmented texts are better left to the logit terms, which read the cached logits.
    layer_texts: Literal["all", "original"] = "all"
    # live: the layer terms run the teacher at every step. cached: stage teacher_logits stores its
    # per-token hidden states and attention maps of the mapped layers for the layer terms' texts
    # (float16, pipeline/kd/teacher_internals.py), read instead: the teacher runs once, not once per
    # epoch. Only for students whose tokens line up with the teacher's (otherwise: pooled states).
    # auto: cached where teacher_logits cached them (distill_intermediate.teacher_internals_max_mb), else live.
    teacher_internals: Literal["live", "cached", "auto"] = "auto"


class DistillIntermediateConfig(KDTerms, LayerTerms):
    # false: the stage writes only why (the family has no intermediate student; prune.source must name
    # another), for recipes whose champion comes from logit KD and need not pay for this training.
    enabled: bool = True
    # `auto`: student layer i (1-based) learns from teacher layer round(i * T / S); or an explicit
    # list with one teacher layer (1-based) per student layer.
    layer_map: Literal["auto"] | list[int] = "auto"
    # teacher_internals auto: stage teacher_logits caches the internals when they take at most this many
    # MB (estimated from the texts' token counts before any is computed), else the layer terms run live.
    teacher_internals_max_mb: float = Field(1000, gt=0)

    @field_validator("layer_map")
    @classmethod
    def _positive_layers(cls, value: Any) -> Any:
        if isinstance(value, list) and any(layer < 1 for layer in value):
            raise ValueError(f"teacher layers are numbered from 1, got {value}")
        return value
