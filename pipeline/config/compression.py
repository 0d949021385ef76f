"""Params of the compression stages: `prune` (with its KD recovery), `quantize` and `export_onnx`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section, ShortLatency, TrainingBudget
from pipeline.config.students import KDTerms, LayerTerms


class RecoveryConfig(TrainingBudget, KDTerms, LayerTerms):
    """The distillation that follows pruning: the same terms and texts as distill_intermediate."""

    epochs: float = Field(3, gt=0, le=1000)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    # Whom the recovery distils from: `teacher` (the verified teacher, as the student's own
    # distillation did), `source` (the unpruned student, as Minitron recovers a pruned model: the
    # pruned one learns the outputs and layers it should keep, on the same tokens, layer for layer), or
    # `source_layers`: the teacher's logits (its cache) for the soft term and the unpruned student's
    # layers for the layer terms (Patient KD: a cut student learns the layers it was cut from; on the
    # demo it also kept more of a narrowed student's F1 than the teacher's layers behind a projection).
    distil_from: Literal["teacher", "source", "source_layers"] = "source_layers"

    @model_validator(mode="after")
    def _source_runs_live(self) -> RecoveryConfig:
        if self.distil_from != "teacher" and self.teacher_internals == "cached":
            raise ValueError(
                f"distil_from={self.distil_from} with teacher_internals=cached: the teacher_logits cache holds the "
                "teacher's internals, not the unpruned student's; set teacher_internals: auto or live (the source runs live)"
            )
        return self


class PruneConfig(Section):
    # The model directory to prune: normally a student from an earlier stage (a path, so DVC can
    # track exactly this dependency).
    source: str = "models/student_intermediate"
    # `structured`: remove whole heads and FFN neurons (faster on CPU); `magnitude`: global
    # unstructured magnitude pruning, for comparison only (dense kernels get no faster from it).
    method: Literal["structured", "magnitude"] = "structured"
    # Encoder layers to keep, evenly spaced and the last one kept (4 of 6: layers 2, 3, 5, 6), removed
    # before heads and FFN neurons; null keeps every layer. The student's own distillation is its
    # starting point, so the recovery has less to learn than a fresh student of that depth.
    num_layers: int | None = Field(None, ge=1)
    # Share of attention heads to remove in every layer (at least one head per layer always stays).
    heads_ratio: float = Field(0.0, ge=0, lt=1)
    # Architectures whose config cannot describe fewer heads (MPNet, DeBERTa-v2/v3, ModernBERT):
    # `auto` keeps their heads and says so in the log and the metrics; `required` fails before any
    # training instead.
    head_pruning: Literal["auto", "required"] = "auto"
    # Share of FFN intermediate neurons to remove; every layer keeps the same width.
    ffn_ratio: float = Field(0.5, ge=0, lt=1)
    # magnitude only: final share of zeroed weights in the encoder's linear layers.
    sparsity: float = Field(0.5, ge=0, lt=1)
    # Prune in this many equal steps, each followed by recovery with 1/steps of the budget.
    steps: int = Field(1, ge=1, le=20)
    # Batches over which head and neuron importance is accumulated.
    importance_batches: int = Field(32, ge=1)
    # What importance is the gradient of. `labels`: the task loss on the labelled training split
    # (Michel et al.). `teacher`: the recovery's soft term against the teacher's cached logits, on
    # every text the recovery trains on (labelled, transfer, augmented): what KD taught the source.
    importance_from: Literal["labels", "teacher"] = "labels"
    # `corpus`: keep only the tokens the training data uses (plus specials, single characters or
    # bytes, and vocab_keep_top others), an error if this tokenizer cannot be trimmed; `auto`: trim
    # when the tokenizer is WordPiece, byte-level BPE or Unigram, else keep it and say so; `none`: keep.
    vocab: Literal["auto", "none", "corpus"] = "none"
    vocab_keep_top: int = Field(2000, ge=0)
    recovery: RecoveryConfig = RecoveryConfig()
    # The pruned student should stay within this much validation macro-F1 of its source; beyond it
    # the stage says so, with the numbers (it does not fail: the report weighs the member).
    max_f1_drop: float = Field(0.005, ge=0, le=1)


class QuantizeConfig(Section):
    # Quantized engine for torch dynamic INT8: `auto` picks fbgemm on x86 and qnnpack on ARM.
    engine: Literal["auto", "fbgemm", "qnnpack", "x86"] = "auto"


class ExportOnnxConfig(Section):
    opset: int = Field(18, ge=13, le=21)
    # `auto`: from the CPU this stage runs on (AVX-512 VNNI, AVX-512, AVX2, ARM64).
    isa: Literal["auto", "avx512_vnni", "avx512", "avx2", "arm64"] = "auto"
    per_channel: bool = True
    # Also quantize the word-embedding Gather (roughly half the weights of a small model).
    quantize_embeddings: bool = True
    # INT8 scheme: dynamic (activations quantized per call), static (QDQ, calibrated ranges) or both.
    quantization: Literal["dynamic", "static", "both"] = "dynamic"
    # Dynamic INT8: the graph variants built, each gated on validation; of those passing, the one
    # fastest in a short side-by-side timing (batch 1, 1 thread, validation texts) is student_onnx_int8.
    # `fused`: ONNX Runtime's transformer optimizer fuses attention first (BERT-like graphs only;
    # skipped elsewhere); `unfused`: the exported graph as it is.
    int8_variants: list[Literal["fused", "unfused"]] = Field(["fused", "unfused"], min_length=1)
    # Where the ISA's config quantizes weights to u8 (AVX2 without VNNI, against VPMADDUBSW's saturation),
    # also build each variant with s8 weights ("fused_s8", ...): the u8 x s8 kernel is faster there
    # (docs/performance.md); the same gates and timing decide.
    int8_try_signed_weights: bool = True
    int8_timing: ShortLatency = ShortLatency(rounds=5)  # more rounds than a trial: two models alternate
    # Variants whose p50 is within this share of the fastest count as equally fast, and the first of them in
    # build order is kept: the same two graphs came out 1.5% one way and 4-14% the other in three exports
    # of the demo, so a smaller gap is the timing's noise and would flip the kept graph between re-locks.
    int8_timing_tie: float = Field(0.03, ge=0, lt=1)
    # Static INT8: at most this many training texts calibrate the activation ranges, with this method.
    calibration_texts: int = Field(256, ge=1)
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # INT8 failing its gates on validation: up to this many rounds, each keeping in fp32 the nodes that add the most error.
    # One node a round: every node kept fp32 costs latency, so the fallback stops at the fewest that pass
    # (docs/benchmark.md).
    fallback_rounds: int = Field(4, ge=0)
    fallback_nodes_per_round: int = Field(1, ge=1)
    # Parity gates (over the whole test split); failing any fails the stage.
    max_abs_logit_diff: float = Field(1e-3, gt=0)
    min_int8_label_agreement: float = Field(0.98, ge=0, le=1)
    max_int8_f1_drop: float = Field(0.01, ge=0, le=1)
    export_teacher: bool = True

    @field_validator("int8_variants")
    @classmethod
    def _distinct(cls, variants: list[str]) -> list[str]:
        if len(set(variants)) != len(variants):
            raise ValueError(f"lists a variant twice: {variants}")
        return variants
