"""The flow the three student stages share: build the student from the verified teacher, train it
with the distillation Trainer (KD terms from the stage's params, none for the baseline), evaluate,
save. The stages differ only in the KD terms they pass.

Building a student (`build_student`) lives here too: layer selection goes through the teacher's
architecture adapter (pipeline/architectures.py).

A pretrained `student.init` whose tokenizer differs from the teacher's (`student_tokenizer`) keeps
its own tokenizer, and every member made from it (pruned, quantized, ONNX, served) uses it too. When
that tokenizer cuts every training text into the teacher's pieces under other ids, the ids are mapped
and KD stays token by token (`mapped`, pipeline/kd/token_map.py); otherwise KD works on texts: the
teacher's logits and its mean-pooled hidden states come from the teacher_logits cache (every teacher
layer's, so any depth reads the same cache), looked up by text, and the attention term is skipped and
recorded (pipeline/kd/terms.py). The schedule of the terms (one joint phase or two) is
pipeline/kd/phases.py."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.architectures import architecture_for, ffn_width_key
from pipeline.config import Params
from pipeline.config.students import KDTerms, StudentConfig
from pipeline.data.prepared import load_prepared
from pipeline.errors import ConfigError, ModelError
from pipeline.kd import teacher_logits
from pipeline.kd.layer_map import init_layer_choice, resolve_layer_map
from pipeline.kd.phases import plan, train_phases
from pipeline.kd.terms import build_kd_loss
from pipeline.kd.texts import KDTexts, load_kd_texts
from pipeline.kd.token_map import TOKENIZER_SAMPLE, Alignment
from pipeline.models import (
    check_max_length,
    load_pretrained_classifier,
    load_tokenizer,
    load_trained_with_tokenizer,
    resolve_model_source,
    state_fingerprint,
)
from pipeline.training import checkpoints, encoding, loss, results

log = logging.getLogger(__name__)

def keep_layers(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of `model` with only the given encoder layers (1-based), in order; how depends on the
    architecture (copied modules, a rebuild for position-dependent layers, fewer ALBERT repetitions)."""
    return architecture_for(model).select_layers(model, layers)


def build_student(
    teacher: PreTrainedModel, cfg: StudentConfig, label_names: list[str], trust_remote_code: bool = False
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Construct the student from params; return it and a description for checkpoint_info.json."""
    t_cfg = teacher.config
    t_layers, t_hidden = t_cfg.num_hidden_layers, t_cfg.hidden_size
    layers = student_layer_count(cfg, t_layers)
    torch.manual_seed(cfg.seed)
    if cfg.init == "teacher":
        differs = {
            key: (value, getattr(t_cfg, name))
            for key, value, name in (
                ("hidden_size", cfg.hidden_size, "hidden_size"),
                ("num_heads", cfg.num_heads, "num_attention_heads"),
                ("intermediate_size", cfg.intermediate_size, ffn_width_key(t_cfg)),
            )
            if value is not None and value != getattr(t_cfg, name)
        }
        if differs:
            raise ConfigError(
                f"student.init=teacher copies the teacher's weights, so the student must keep the teacher's "
                f"widths; these differ (student, teacher): {differs}. Use student.init=random to change them."
            )
        chosen = init_layer_choice(cfg.init_layers, layers, t_layers, "the teacher")
        shared = architecture_for(t_cfg).shared_layers
        if shared and cfg.init_layers != "evenly":
            raise ConfigError(
                f"student.init_layers={cfg.init_layers}: this teacher shares one layer across its depth "
                "(ALBERT), so there is no layer to choose; leave init_layers at evenly"
            )
        student = keep_layers(teacher, chosen).train()
        if shared:
            return student, {"init": "teacher", "shared_layer_repetitions": layers}
        return student, {"init": "teacher", "init_layers": chosen}
    if cfg.init == "random":
        hidden = cfg.hidden_size or t_hidden
        heads = cfg.num_heads or t_cfg.num_attention_heads
        if hidden % heads:
            raise ConfigError(
                f"student.hidden_size={hidden} is not divisible by {heads} attention heads; set student.num_heads"
            )
        config = copy.deepcopy(t_cfg)
        config.num_hidden_layers = layers
        config.hidden_size = hidden
        config.num_attention_heads = heads
        width_key = ffn_width_key(t_cfg)  # a random student needs no adapter: any architecture works
        setattr(config, width_key, cfg.intermediate_size or (getattr(t_cfg, width_key) if hidden == t_hidden else 4 * hidden))
        config.pruned_heads = {}  # a fresh model has every head
        if getattr(config, "attention_head_size", None) is not None:
            config.attention_head_size = hidden // heads
        student = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
        return student.train(), {"init": "random"}
    # A pretrained model id or directory.
    source = resolve_model_source(cfg.init)
    student = load_pretrained_classifier(
        source, label_names, teacher.config.problem_type or "single_label_classification", trust_remote_code
    )
    s_cfg = student.config
    if cfg.hidden_size is not None and cfg.hidden_size != s_cfg.hidden_size:
        raise ConfigError(
            f"student.hidden_size={cfg.hidden_size} differs from {cfg.init!r}'s {s_cfg.hidden_size}; "
            "leave it null to use the pretrained width"
        )
    source_layers = s_cfg.num_hidden_layers
    chosen = init_layer_choice(cfg.init_layers, layers, source_layers, repr(cfg.init))
    if chosen != list(range(1, source_layers + 1)):
        student = keep_layers(student, chosen)
    return student.train(), {"init": cfg.init, "init_layers": chosen}


# The student.init values that are not a pretrained model (they read text with the teacher's tokenizer).
BUILT_FROM_TEACHER = ("teacher", "random")


def student_layer_count(cfg: StudentConfig, teacher_layers: int) -> int:
    """The depth `build_student` gives the student."""
    return cfg.num_layers or math.ceil(teacher_layers / 2)


def init_tokenizer(cfg: StudentConfig) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a pretrained `student.init` (None for `teacher` and `random`, which use the
    teacher's); a clear error naming the param when the init model has none that loads."""
    if cfg.init in BUILT_FROM_TEACHER:
        return None
    try:
        return load_tokenizer(resolve_model_source(cfg.init))
    except ModelError as error:
        raise ConfigError(
            f"student.init={cfg.init!r}: its tokenizer could not be loaded ({error}). A pretrained student "
            "reads text through its own tokenizer when it differs from the teacher's, so the init model "
            "must come with its tokenizer files (tokenizer.json or a vocabulary), or use student.init=teacher"
        ) from None


def student_tokenizer(
    cfg: StudentConfig,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student: PreTrainedModel,
    texts: KDTexts,
    max_length: int,
) -> tuple[PreTrainedTokenizerBase, Alignment]:
    """The tokenizer the student reads text with, and how its tokens line up with the teacher's.

    A pretrained init with the same tokenizer (same vocabulary, same ids on a sample of the texts)
    uses the teacher's, exactly as before; another tokenizer is kept, after checking it can encode
    the task for this student (a pad token, ids inside its embeddings, not only unknown tokens)."""
    own = init_tokenizer(cfg)
    alignment = texts.align(teacher_tokenizer, own, max_length)
    if alignment.kind == "shared":
        return teacher_tokenizer, alignment
    key = f"student.init={cfg.init!r}"
    if own.pad_token is None:
        raise ConfigError(f"{key}: its tokenizer has no padding token, so texts cannot be batched; pick a model whose tokenizer has one")
    sample = own(list(texts.train[:TOKENIZER_SAMPLE]), truncation=True, max_length=max_length)["input_ids"]
    ids = [i for row in sample for i in row]
    if max(ids, default=0) >= student.config.vocab_size:
        raise ConfigError(
            f"{key}: its tokenizer gives token id {max(ids)} but the model's embeddings have only "
            f"{student.config.vocab_size} rows: the tokenizer and the weights come from different models"
        )
    special = set(own.all_special_ids) - {own.unk_token_id}
    words = [i for i in ids if i not in special]
    if not words or all(i == own.unk_token_id for i in words):
        raise ConfigError(f"{key}: its tokenizer cannot encode the task's texts (every token is unknown); pick a model for this language")
    check_max_length(student, max_length, "task.max_length")
    log.info("%s has its own tokenizer: %s", key, alignment.describe())
    return own, alignment


def train_student(params: Params, stage: str, member: str, out_path: str, terms: KDTerms | None) -> dict[str, Any]:
    """Train one student; `terms` None means hard labels only (the no-KD baseline)."""
    prepared = load_prepared(params.path(params.paths.prepared))
    names, task_type = prepared.label_names, params.task.type
    teacher_dir = params.path(params.paths.teacher)
    teacher, teacher_tokenizer = load_trained_with_tokenizer(teacher_dir, names)
    student, init_info = build_student(teacher, params.student, names)
    t_cfg, s_cfg = teacher.config, student.config
    max_length = params.task.max_length
    # The baseline learns from the labelled split only: no transfer or augmented texts to read.
    texts = load_kd_texts(prepared, params.transfer.augment, params.path(params.paths.augmented)) if terms else KDTexts(
        prepared.texts("train"), [], [])
    tokenizer, alignment = student_tokenizer(params.student, teacher_tokenizer, student, texts, max_length)
    init_info["tokenizer"] = "teacher" if alignment.kind == "shared" else "own"

    layer_map: list[int] = []
    if terms is not None and getattr(terms, "layer_map", None) is not None:
        layer_map = resolve_layer_map(terms.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)

    def build(part: str):
        return build_kd_loss(
            terms, task_type, label_names=names, key=stage, layer_map=layer_map,
            hidden_sizes=(s_cfg.hidden_size, t_cfg.hidden_size), token_level=alignment.token_level, part=part,
        )

    phases = plan(terms, params.student.epochs, build, stage)
    datasets = encoding.encode_splits(prepared, tokenizer, max_length)
    pos_weight = loss.pos_weight(params.task, datasets["train"], names)  # from the labelled texts only
    before = state_fingerprint(teacher)
    key = checkpoints.fingerprint(
        stage, params.section("student"), terms.model_dump() if terms else None, prepared.content_hash, before,
        *[teacher_logits.texts_sha256(part_texts) for part, part_texts in texts.parts().items() if part != "train"],
    )
    scratch, resume = checkpoints.checkpoint_dir(params, stage, key)
    trained = train_phases(
        phases, student=student, tokenizer=tokenizer, teacher=teacher, alignment=alignment,
        labelled=datasets["train"], validation=datasets["validation"], texts=texts,
        cache_dir=params.path(params.paths.teacher_logits), teacher_fingerprint=before, budget=params.student,
        budget_section="student",
        scratch=scratch, resume=resume, max_length=max_length, task_type=task_type, threshold=params.task.threshold,
        collator=encoding.Collator(tokenizer), pos_weight=pos_weight, layer_map=layer_map,
    )
    if state_fingerprint(teacher) != before:  # cannot happen unless the freezing is broken
        raise RuntimeError("the teacher's weights changed during distillation")
    kd_terms = [term for phase in phases for term in phase.kd.terms]
    record = results.save_trained(
        trained.trainer, tokenizer, params.path(out_path), prepared, params,
        member=member, stage=stage, source=params.paths.teacher, training_seconds=trained.seconds,
        params={"student": params.section("student"), stage: terms.model_dump() if terms else {}},
        details={
            "student": {**init_info, "num_layers": s_cfg.num_hidden_layers, "hidden_size": s_cfg.hidden_size},
            "kd": {
                **(terms.model_dump() if terms else {}),
                # The resolved map: the params may say `auto`.
                "layer_map": layer_map, "projection": any(getattr(t, "projection", None) is not None for t in kd_terms),
                "token_alignment": alignment.kind,
                "phases": {phase.name: {"terms": [t.name for t in phase.kd.terms], "texts": trained.rows.get(phase.name, 0)}
                           for phase in phases},
                **({"hidden_targets": "pooled"} if any(p.kd.pooled_teacher_layers for p in phases) else {}),
                **({"skipped": phases[-1].kd.skipped} if phases[-1].kd.skipped else {}),
            },
            **{f"{part}_texts": len(part_texts) for part, part_texts in texts.parts().items() if part != "train"},
        },
    )
    if record is None:  # not the main process of a distributed run
        return {}
    results.record_curve(trained.curve, params.path(params.paths.curves) / f"{stage}.csv")
    checkpoints.finish(trained.trainer, scratch)
    return {**record.metrics(), **alignment_flags(alignment, phases[-1].kd.skipped),
            **{f"{part}_texts": len(part_texts) for part, part_texts in texts.parts().items() if part != "train"}}


def alignment_flags(alignment: Alignment, skipped: dict[str, str]) -> dict[str, int]:
    """Stage metrics of a student with its own tokenizer (none for a shared one: its metrics stay as they were)."""
    if alignment.kind == "shared":
        return {}
    return {"shared_tokenizer": 0, "token_level_kd": int(alignment.token_level), **{f"{name}_kd_skipped": 1 for name in skipped}}
