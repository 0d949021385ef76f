"""Loading and saving models (every save proven to reload to the same logits), sources, sizes and
parameter counts. Students are built, and their layers mapped, in pipeline/kd/ (students.py, layer_map.py)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

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
        if "size mismatch" in str(error):  # a classifier whose head has another number of labels
            raise ModelError(
                f"{source} is already a classifier, and its classification head does not fit the "
                f"{len(label_names)} classes of the data ({label_names}). Point teacher.model at the base "
                "encoder it was fine-tuned from, or prepare data with its labels"
            ) from None
        raise _load_error(source, error) from None


def check_max_length(model: PreTrainedModel, max_length: int, key: str) -> None:
    """Refuse a max_length beyond the model's position embeddings (a tensor-size error mid-training)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return  # no absolute position table: nothing to check
    if model.config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"):
        limit -= (model.config.pad_token_id or 0) + 1  # positions start after the padding index
    if max_length > limit:
        raise ConfigError(
            f"{key}={max_length} is longer than the model's position embeddings ({limit} tokens); set "
            f"{key} to at most {limit}"
        )


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


# Sentences the reload check runs through both copies: different lengths (so padding is exercised),
# digits, punctuation and words a small vocabulary may lack.
RELOAD_PROBE = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007.",
    "Shares fell.",
    "The Finnish company's net sales decreased, and it warned of further layoffs (about 5%).",
]


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Save `model` and `tokenizer` as safetensors and prove they reload to the same logits.

    Every stage that writes a torch model saves through here, so a model whose in-memory structure
    config.json cannot describe (a layer copied where from_pretrained builds a different one, a head
    count the config does not record) fails now, with the size of the difference, not later with
    silently different scores.
    """
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    verify_reload(model, tokenizer, out_dir)


def verify_reload(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, atol: float = 1e-4) -> None:
    """The directory must reload (model and tokenizer) to the very logits of the in-memory copy."""
    was_training = model.training
    try:
        reloaded = load_trained(out_dir, attn_implementation=model.config._attn_implementation or "eager")
        reloaded_tokenizer = load_tokenizer(str(out_dir))
        batch = tokenizer(RELOAD_PROBE, padding=True, return_tensors="pt")
        again = reloaded_tokenizer(RELOAD_PROBE, padding=True, return_tensors="pt")
        if not torch.equal(batch["input_ids"], again["input_ids"]):
            raise ModelError(f"{out_dir}: the saved tokenizer splits text differently from the one in memory")
        device = next(model.parameters()).device  # both copies on one device: same kernels, same numbers
        with torch.no_grad():
            expected = model.eval()(**batch.to(device)).logits.float().cpu()
            got = reloaded.to(device)(**again.to(device)).logits.float().cpu()
    finally:
        model.train(was_training)
    difference = (expected - got).abs().max().item()
    if not difference <= atol:
        raise ModelError(
            f"{out_dir}: the saved {model.config.model_type} model reloads to different logits (max |diff| "
            f"{difference:.3g} > {atol}): its config.json does not describe the model in memory. This is a bug "
            "in how the model was built or pruned (pipeline/architectures.py); nothing was published."
        )


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
