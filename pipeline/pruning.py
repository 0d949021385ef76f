"""Structured pruning (attention heads, FFN neurons), vocabulary trimming, and magnitude pruning.

Structured pruning removes whole heads and neurons, so the saved model is genuinely smaller and
faster on a CPU; `from_pretrained` rebuilds it from config.json (`pruned_heads`, `intermediate_size`,
`vocab_size`). Magnitude pruning only zeroes weights: kept for comparison, it makes dense CPU
kernels no faster.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast, TrainerCallback
from transformers.pytorch_utils import prune_linear_layer

from pipeline.errors import ConfigError, ModelError
from pipeline.models import encoder_layers

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- how much to keep


def heads_per_layer(model: PreTrainedModel) -> list[int]:
    return [layer.attention.self.num_attention_heads for layer in encoder_layers(model)]


def ffn_width(model: PreTrainedModel) -> int:
    widths = {layer.intermediate.dense.out_features for layer in encoder_layers(model)}
    if len(widths) != 1:
        raise ModelError(f"the FFN widths differ between layers ({sorted(widths)}); cannot prune uniformly")
    return widths.pop()


def keep_count(total: int, ratio: float, what: str, key: str) -> int:
    """How many of `total` units survive removing `ratio` of them; at least one, or a clear error."""
    keep = round(total * (1 - ratio))
    if keep < 1:
        allowed = (total - 1) / total
        raise ConfigError(
            f"{key}={ratio} would remove every one of the {total} {what} in a layer; "
            f"at least one must stay, so use at most {allowed:.3f}"
        )
    return keep


def schedule(start: int, final: int, steps: int) -> list[int]:
    """Units kept after each of `steps` equal pruning steps from `start` down to `final`."""
    return [start - round((start - final) * (step + 1) / steps) for step in range(steps)]


# --------------------------------------------------------------------------- importance


def importance_scores(
    model: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]], max_batches: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head importance (Michel et al., 2019) and FFN neuron importance, from the task loss.

    Heads: |dL/d mask_h| for a per-head mask of ones, accumulated over batches and normalised per
    layer. Neurons: the first-order Taylor estimate |a * dL/da| of each intermediate activation.
    Returns ([layers, heads], [layers, ffn width]).
    """
    layers = encoder_layers(model)
    heads = heads_per_layer(model)
    if len(set(heads)) != 1:
        raise ModelError(f"layers have different head counts {heads}; head importance needs them equal")
    device = next(model.parameters()).device
    head_mask = torch.ones(len(layers), heads[0], device=device, requires_grad=True)
    head_importance = torch.zeros(len(layers), heads[0], device=device)
    neuron_importance = torch.zeros(len(layers), ffn_width(model), device=device)
    activations: list[torch.Tensor] = []

    def keep_activation(_module, _inputs, output):
        output.retain_grad()
        activations.append(output)

    hooks = [layer.intermediate.register_forward_hook(keep_activation) for layer in layers]
    was_training = model.training
    model.eval()  # no dropout: the scores should reflect the model as it will run
    try:
        for batch in itertools.islice(batches, max_batches):
            batch = {key: value.to(device) for key, value in batch.items() if key != "teacher_logits"}
            activations.clear()
            loss = model(**batch, head_mask=head_mask).loss
            loss.backward()
            head_importance += head_mask.grad.abs().detach()
            head_mask.grad = None
            for index, activation in enumerate(activations):
                neuron_importance[index] += (activation * activation.grad).abs().sum(dim=(0, 1)).detach()
            model.zero_grad(set_to_none=True)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    norms = head_importance.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (head_importance / norms).cpu(), neuron_importance.cpu()


# --------------------------------------------------------------------------- structured pruning


def prune_heads(model: PreTrainedModel, importance: torch.Tensor, keep: int) -> dict[int, list[int]]:
    """Remove the least important heads of every layer so `keep` remain; returns the original ids removed."""
    already = {int(k): set(v) for k, v in (model.config.pruned_heads or {}).items()}
    original = model.config.num_attention_heads
    to_prune: dict[int, list[int]] = {}
    for layer, scores in enumerate(importance):
        alive = [h for h in range(original) if h not in already.get(layer, set())]  # current -> original id
        remove = len(alive) - keep
        if remove <= 0:
            continue
        order = torch.argsort(scores)[:remove].tolist()
        to_prune[layer] = sorted(alive[i] for i in order)
    if to_prune:
        model.prune_heads(to_prune)
    return to_prune


def prune_ffn(model: PreTrainedModel, importance: torch.Tensor, keep: int) -> None:
    """Keep the `keep` most important intermediate neurons in every layer (one width for all layers)."""
    for layer, scores in zip(encoder_layers(model), importance):
        index = torch.argsort(scores, descending=True)[:keep].sort().values.to(layer.intermediate.dense.weight.device)
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)
    model.config.intermediate_size = keep


# --------------------------------------------------------------------------- vocabulary trimming


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    return set(tokenizer.all_special_ids)


def trim_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corpus: list[str], keep_top: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """Keep the special tokens, every token `corpus` uses, every single-character piece (so unseen
    words still split into known pieces instead of [UNK]) and `keep_top` other tokens in the
    vocabulary's own order (frequency order for BERT's WordPiece). The tokenizer and the embedding
    matrix are rebuilt together; ids are renumbered but every kept token keeps its embedding row."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("prune.vocab=corpus needs a fast tokenizer (tokenizer.json); set prune.vocab=none")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "WordPiece":
        raise ConfigError(
            f"prune.vocab=corpus supports WordPiece tokenizers (BERT family); this one is "
            f"{state['model']['type']}. Set prune.vocab=none."
        )
    vocab: dict[str, int] = state["model"]["vocab"]
    by_id = {index: token for token, index in vocab.items()}
    used = {i for ids in tokenizer(corpus, add_special_tokens=False)["input_ids"] for i in ids}
    chars = {i for t, i in vocab.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    kept = used | chars | _special_ids(tokenizer)
    others = [i for i in sorted(by_id) if i not in kept and not by_id[i].startswith("[unused")]
    kept |= set(others[:keep_top])
    old_ids = sorted(kept)
    new_id = {old: new for new, old in enumerate(old_ids)}

    state["model"]["vocab"] = {by_id[old]: new for new, old in enumerate(old_ids)}
    for token in state.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    _renumber_post_processor(state.get("post_processor"), new_id)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(json.dumps(state))
    trimmed = type(tokenizer)(
        tokenizer_object=backend,
        **{k: v for k, v in tokenizer.init_kwargs.items() if k not in ("vocab_file", "tokenizer_file", "name_or_path")},
    )

    old_embeddings = model.get_input_embeddings()
    index = torch.tensor(old_ids, device=old_embeddings.weight.device)
    pad_id = new_id.get(model.config.pad_token_id) if model.config.pad_token_id is not None else None
    embeddings = nn.Embedding(len(old_ids), old_embeddings.embedding_dim, padding_idx=pad_id)
    embeddings.weight.data = old_embeddings.weight.data[index].clone()
    model.set_input_embeddings(embeddings)
    model.config.vocab_size = len(old_ids)
    model.config.pad_token_id = pad_id
    info = {"vocab_size_before": len(vocab), "vocab_size_after": len(old_ids), "corpus_tokens": len(used)}
    return model, trimmed, info


def _renumber_post_processor(processor: dict[str, Any] | None, new_id: dict[int, int]) -> None:
    """The [CLS]/[SEP] ids baked into the post-processor follow the renumbering."""
    if not processor:
        return
    if processor.get("type") == "Sequence":
        for item in processor.get("processors", []):
            _renumber_post_processor(item, new_id)
    if processor.get("type") == "TemplateProcessing":
        for special in processor.get("special_tokens", {}).values():
            special["ids"] = [new_id[i] for i in special["ids"]]
    for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing: [token, id]
        if key in processor and isinstance(processor[key], list):
            processor[key][1] = new_id[processor[key][1]]


def unk_share(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> float:
    """Share of [UNK] among the tokens of `texts`."""
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    return sum(1 for i in ids if i == tokenizer.unk_token_id) / max(1, len(ids))


# --------------------------------------------------------------------------- magnitude pruning


def encoder_linears(model: PreTrainedModel) -> list[nn.Linear]:
    return [module for layer in encoder_layers(model) for module in layer.modules() if isinstance(module, nn.Linear)]


class GradualMagnitudePruning(TrainerCallback):
    """Global unstructured magnitude pruning of the encoder's linear weights (torch.nn.utils.prune),
    raised at every epoch start along the cubic schedule of Zhu & Gupta (2017) to `final` sparsity."""

    def __init__(self, model: PreTrainedModel, final: float) -> None:
        self.modules = encoder_linears(model)
        self.final = final

    def on_epoch_begin(self, args, state, control, **kwargs):
        epochs = max(1, int(round(args.num_train_epochs)))
        progress = min(1.0, (int(state.epoch or 0) + 1) / epochs)
        self.apply(self.final * (1 - (1 - progress) ** 3))

    def apply(self, sparsity: float) -> None:
        from torch.nn.utils import prune

        total = sum(m.weight.numel() for m in self.modules)
        zero = sum(int((m.weight == 0).sum()) for m in self.modules)
        extra = int(round(sparsity * total)) - zero
        if extra > 0:
            prune.global_unstructured(
                [(m, "weight") for m in self.modules], pruning_method=prune.L1Unstructured, amount=extra
            )

    def make_permanent(self) -> None:
        from torch.nn.utils import prune

        for module in self.modules:
            if prune.is_pruned(module):
                prune.remove(module, "weight")


def sparsity(modules: list[nn.Module]) -> float:
    total = sum(m.weight.numel() for m in modules)
    return sum(int((m.weight == 0).sum()) for m in modules) / max(1, total)


def gzip_size_mb(path: Path) -> float:
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=6)) / 1e6
