"""Loading, saving and building models: sources, students, layer maps, sizes and parameter counts."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.config import StudentConfig
from pipeline.errors import ConfigError, ModelError
from pipeline.packaged_models import PACKAGED_MODELS, WEIGHTS_FILE

log = logging.getLogger(__name__)


def resolve_model_source(name: str) -> str:
    """A packaged model's alias (`minilm-l6`, `mpnet-base`: pipeline/packaged_models.py) -> its
    directory; a local directory; or a Hub id as given."""
    if name in PACKAGED_MODELS:
        return str(PACKAGED_MODELS[name].path(name))
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{name} is a file; a model must be a directory with config.json and weights")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model directory not found: {name}")
    return name  # a Hugging Face Hub id


def _load_error(source: str, error: Exception) -> ModelError:
    return ModelError(
        f"could not load model {source!r}: {type(error).__name__}: {error}. Use a local directory with "
        "config.json and model.safetensors, `minilm-l6`, or a Hub id that has safetensors weights "
        "(the Hub must be reachable)."
    )


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises OSError/ValueError/... for the same problem
        raise _load_error(source, error) from None


def load_pretrained_classifier(
    source: str,
    label_names: list[str],
    problem_type: str = "single_label_classification",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A pretrained encoder with a fresh classification head for `label_names`."""
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            problem_type=problem_type,
            use_safetensors=True,  # never unpickle weights
            trust_remote_code=trust_remote_code,
            attn_implementation="eager",  # attention maps are needed for KD and head pruning
        )
    except Exception as error:
        raise _load_error(source, error) from None


def load_trained(
    model_dir: str | Path, label_names: list[str] | None = None, attn_implementation: str | None = "eager"
) -> PreTrainedModel:
    """A model directory written by one of our stages (safetensors only), in eval mode.

    Eager attention by default: distillation and head pruning need the attention maps. The benchmark
    passes None, transformers' default: SDPA where the architecture has it, eager otherwise.
    """
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, use_safetensors=True, attn_implementation=attn_implementation
        )
    except Exception as error:
        raise ModelError(f"{model_dir}: could not load the model: {type(error).__name__}: {error}") from None
    if label_names is not None and model.config.num_labels != len(label_names):
        raise ModelError(
            f"{model_dir} predicts {model.config.num_labels} classes but the data has {len(label_names)} "
            f"({label_names}); retrain it on this data (dvc repro)"
        )
    return model.eval()


def load_trained_with_tokenizer(
    model_dir: str | Path, label_names: list[str] | None = None, attn_implementation: str | None = "eager"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model directory and its tokenizer, checked to belong together."""
    model = load_trained(model_dir, label_names, attn_implementation)
    tokenizer = load_tokenizer(str(model_dir))
    if len(tokenizer) > model.config.vocab_size:
        raise ModelError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
            f"{model.config.vocab_size}: they come from different models. Re-run the stage that wrote it."
        )
    return model, tokenizer


def check_model_dir(
    model_dir: Path,
    weights_file: str = WEIGHTS_FILE,
    hint: str = "run the stage that produces it (dvc repro)",
    kind: str = "a complete model directory (weights are read from safetensors only)",
) -> None:
    """Fail with what is missing and how to get it, before any loader's own cryptic error."""
    if not model_dir.is_dir():
        raise ModelError(f"model directory not found: {model_dir}; {hint}")
    missing = [name for name in ("config.json", weights_file) if not (model_dir / name).is_file()]
    if missing:
        raise ModelError(f"{model_dir} is not {kind}: missing {missing}; {hint}")


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_size_mb(model_dir: Path) -> float:
    return (model_dir / WEIGHTS_FILE).stat().st_size / 1e6


def state_fingerprint(model: nn.Module) -> str:
    """A hash of every weight, to prove a frozen model was not changed."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def decision_thresholds(model: PreTrainedModel, default: float) -> float | list[float]:
    """Multi-label decision thresholds saved with the model (tuned on validation), else `default`."""
    return getattr(model.config, "label_thresholds", None) or default


# --------------------------------------------------------------------------- students


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks of a BERT-like encoder (BERT, RoBERTa, ELECTRA, DistilBERT, ...)."""
    base = model.base_model
    for path in ("encoder.layer", "transformer.layer", "layers"):
        module: Any = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ModelError(
        f"{type(model).__name__}: cannot find its transformer layers; layer selection supports BERT-like "
        "encoders. Use student.init=random."
    )


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (1-based) for each student layer, evenly spaced and ending at the last layer.

    A 3-layer student of a 6-layer teacher gets [2, 4, 6].
    """
    if student_layers > teacher_layers:
        raise ConfigError(
            f"a {student_layers}-layer student cannot map onto a {teacher_layers}-layer teacher uniformly; "
            "give distill_intermediate.layer_map explicitly"
        )
    return [math.ceil((i + 1) * teacher_layers / student_layers - 1e-9) for i in range(student_layers)]


def keep_layers(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of `model` with only the given encoder layers (1-based), in order."""
    student = copy.deepcopy(model)
    blocks = encoder_layers(student)
    kept = nn.ModuleList([blocks[i - 1] for i in layers])
    blocks._modules.clear()
    for index, block in enumerate(kept):
        blocks.add_module(str(index), block)
    student.config.num_hidden_layers = len(layers)
    return student


def build_student(
    teacher: PreTrainedModel, cfg: StudentConfig, label_names: list[str], trust_remote_code: bool = False
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Construct the student from params; return it and a description for checkpoint_info.json."""
    t_cfg = teacher.config
    t_layers, t_hidden = t_cfg.num_hidden_layers, t_cfg.hidden_size
    layers = cfg.num_layers or math.ceil(t_layers / 2)
    torch.manual_seed(cfg.seed)
    if cfg.init == "teacher":
        differs = {
            key: (value, getattr(t_cfg, name))
            for key, value, name in (
                ("hidden_size", cfg.hidden_size, "hidden_size"),
                ("num_heads", cfg.num_heads, "num_attention_heads"),
                ("intermediate_size", cfg.intermediate_size, "intermediate_size"),
            )
            if value is not None and value != getattr(t_cfg, name)
        }
        if differs:
            raise ConfigError(
                f"student.init=teacher copies the teacher's weights, so the student must keep the teacher's "
                f"widths; these differ (student, teacher): {differs}. Use student.init=random to change them."
            )
        if layers > t_layers:
            raise ConfigError(
                f"student.num_layers={layers} is deeper than its init source, the {t_layers}-layer teacher"
            )
        chosen = uniform_layer_map(layers, t_layers)
        student = keep_layers(teacher, chosen)
        return student.train(), {"init": "teacher", "init_layers": chosen}
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
        config.intermediate_size = cfg.intermediate_size or (
            t_cfg.intermediate_size if hidden == t_hidden else 4 * hidden
        )
        student = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
        return student.train(), {"init": "random"}
    # A pretrained model id or directory.
    source = resolve_model_source(cfg.init)
    student = load_pretrained_classifier(
        source, label_names, teacher.config.problem_type or "single_label_classification", trust_remote_code
    )
    s_cfg = student.config
    if s_cfg.vocab_size != t_cfg.vocab_size:
        raise ConfigError(
            f"student.init={cfg.init!r} has a vocabulary of {s_cfg.vocab_size} tokens but the teacher's has "
            f"{t_cfg.vocab_size}; students share the teacher's tokenizer, so pick a model with the same one"
        )
    if cfg.hidden_size is not None and cfg.hidden_size != s_cfg.hidden_size:
        raise ConfigError(
            f"student.hidden_size={cfg.hidden_size} differs from {cfg.init!r}'s {s_cfg.hidden_size}; "
            "leave it null to use the pretrained width"
        )
    source_layers = s_cfg.num_hidden_layers
    if layers > source_layers:
        raise ConfigError(
            f"student.num_layers={layers} is deeper than its init source {cfg.init!r} ({source_layers} layers)"
        )
    chosen = uniform_layer_map(layers, source_layers)
    if layers < source_layers:
        student = keep_layers(student, chosen)
    return student.train(), {"init": cfg.init, "init_layers": chosen}


# --------------------------------------------------------------------------- inference


def logits_fn(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int):
    """texts -> logits as a NumPy array: how the record of a PyTorch member is evaluated."""
    return lambda texts: predict_logits(model, tokenizer, texts, max_length).numpy()


@torch.no_grad()
def predict_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Logits for `texts` in their order; batches sorted by length to waste little on padding."""
    model.eval()
    run_device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.num_labels)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in index], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(run_device)
        out[index] = model(**batch).logits.float().cpu()
    return out
