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

from pipeline.architectures import architecture_for, encoder_layers
from pipeline.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- how much to keep


def heads_per_layer(model: PreTrainedModel) -> list[int]:
    arch = architecture_for(model)
    return [arch.head_count(layer) for layer in arch.layers(model)]


def ffn_width(model: PreTrainedModel) -> int:
    arch = architecture_for(model)
    widths = {arch.ffn_width(layer) for layer in arch.layers(model)}
    if len(widths) != 1:
        raise ModelError(f"the FFN widths differ between layers ({sorted(widths)}); cannot prune uniformly")
    return widths.pop()


def head_pruning_problem(model: PreTrainedModel) -> str | None:
    """Why this architecture cannot remove attention heads (its config cannot describe it), or None."""
    return architecture_for(model).head_pruning_problem()


def check_structured(model: PreTrainedModel, heads_ratio: float, heads_keep: int) -> None:
    """Fail before any work when this architecture cannot remove heads the way the params ask."""
    problem = head_pruning_problem(model)
    if problem and heads_keep < heads_per_layer(model)[0]:
        raise ConfigError(
            f"prune.heads_ratio={heads_ratio}: attention heads cannot be removed from "
            f"{architecture_for(model).model_type} models ({problem}). Set prune.heads_ratio=0, or "
            "prune.head_pruning=auto to keep the heads and prune the rest (prune.ffn_ratio still removes "
            "FFN neurons)."
        )


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

    Heads: |dL/d g_h| for a gate of ones multiplying each head's share of the input of the attention
    output linear (the same gradient as Michel et al.'s head mask, without needing the model to take
    a `head_mask`), accumulated over batches and normalised per layer. Neurons: the first-order
    Taylor estimate |a * dL/da| of each input of the FFN output linear. A layer applied several times
    (ALBERT) sums over its applications. Returns ([layers, heads], [layers, ffn width]).
    """
    arch = architecture_for(model)
    layers = arch.layers(model)
    heads = heads_per_layer(model)
    if len(set(heads)) != 1:
        raise ModelError(f"layers have different head counts {heads}; head importance needs them equal")
    device = next(model.parameters()).device
    gates = torch.ones(len(layers), heads[0], device=device, requires_grad=True)
    head_importance = torch.zeros(len(layers), heads[0], device=device)
    neuron_importance = torch.zeros(len(layers), ffn_width(model), device=device)
    activations: list[tuple[int, torch.Tensor]] = []

    def gate_heads(index: int, size: int):
        def hook(_module, inputs):
            return (inputs[0] * gates[index].repeat_interleave(size).to(inputs[0].dtype), *inputs[1:])
        return hook

    def keep_activation(index: int):
        def hook(_module, inputs):
            inputs[0].retain_grad()
            activations.append((index, inputs[0]))
        return hook

    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(arch.attention_output_linear(layer).register_forward_pre_hook(gate_heads(index, arch.head_size(layer))))
        hooks.append(arch.ffn_output_linear(layer).register_forward_pre_hook(keep_activation(index)))
    was_training = model.training
    model.eval()  # no dropout: the scores should reflect the model as it will run
    try:
        for batch in itertools.islice(batches, max_batches):
            batch = {key: value.to(device) for key, value in batch.items() if key != "teacher_logits"}
            activations.clear()
            loss = model(**batch).loss
            loss.backward()
            head_importance += gates.grad.abs().detach()
            gates.grad = None
            for index, activation in activations:
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
    """Remove the least important heads of every layer so `keep` remain, by slicing the adapter's
    linears, and record the layout in the config; returns the original ids removed per layer."""
    arch = architecture_for(model)
    layers = arch.layers(model)
    to_prune: dict[int, list[int]] = {}
    for index, (layer, scores) in enumerate(zip(layers, importance)):
        attention = arch.attention_module(layer)
        alive = getattr(attention, "fincompress_original_heads", None) or _alive_heads(model, index, arch.head_count(layer))
        remove = len(alive) - keep
        if remove <= 0:
            continue
        current = sorted(torch.argsort(scores[: len(alive)])[:remove].tolist())
        arch.remove_heads(model, index, layer, current)
        attention.fincompress_original_heads = [h for i, h in enumerate(alive) if i not in set(current)]
        to_prune[index] = sorted(alive[i] for i in current)
    if to_prune:
        arch.record_heads(model, to_prune)
    return to_prune


def _alive_heads(model: PreTrainedModel, layer: int, count: int) -> list[int]:
    """Original ids of the heads a layer still has (config.pruned_heads lists those already gone)."""
    gone = set((model.config.pruned_heads or {}).get(layer, []))
    return [h for h in range(count + len(gone)) if h not in gone]


def prune_ffn(model: PreTrainedModel, importance: torch.Tensor, keep: int) -> None:
    """Keep the `keep` most important intermediate neurons in every layer (one width for all layers)."""
    arch = architecture_for(model)
    for layer, scores in zip(arch.layers(model), importance):
        arch.remove_neurons(layer, torch.argsort(scores, descending=True)[:keep].sort().values)
    arch.set_ffn_width(model.config, keep)


# --------------------------------------------------------------------------- vocabulary trimming


TRIMMABLE = "WordPiece, byte-level BPE and Unigram"


def vocabulary_trim_problem(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why the vocabulary of `tokenizer` cannot be trimmed, or None when it can."""
    if not getattr(tokenizer, "is_fast", False):
        return "the tokenizer is not a fast tokenizer (no tokenizer.json)"
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = state["model"]["type"]
    if kind == "BPE" and not _is_byte_level(state.get("pre_tokenizer")):
        return "its BPE tokenizer is not byte-level, so unseen characters could not be spelled with kept tokens"
    if kind not in ("WordPiece", "BPE", "Unigram"):
        return f"its tokenizer is {kind}; vocabulary trimming supports {TRIMMABLE}"
    return None


def _is_byte_level(pre_tokenizer: dict[str, Any] | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_is_byte_level(item) for item in pre_tokenizer.get("pretokenizers", []))
    return pre_tokenizer.get("type") == "ByteLevel"


def trim_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corpus: list[str], keep_top: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """Keep the special tokens, every token `corpus` uses, every token unseen words fall back to
    (WordPiece and Unigram: single characters; byte-level BPE: the 256 byte symbols) and `keep_top`
    other tokens in the vocabulary's own order. Byte-level BPE also keeps every merge whose result
    and parts survive, and the parts of every kept token, so the corpus splits exactly as before.
    The tokenizer and the embedding matrix are rebuilt together; ids are renumbered but every kept
    token keeps its embedding row, so the corpus gives the very same logits."""
    problem = vocabulary_trim_problem(tokenizer)
    if problem:
        raise ConfigError(f"prune.vocab=corpus cannot trim this vocabulary: {problem}. Set prune.vocab=auto or none.")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    spec = state["model"]
    kind = spec["type"]
    if kind == "Unigram":
        by_id = {index: piece for index, (piece, _score) in enumerate(spec["vocab"])}
    else:
        by_id = {index: token for token, index in spec["vocab"].items()}
    used = {i for ids in tokenizer(corpus, add_special_tokens=False)["input_ids"] for i in ids}
    kept = used | set(tokenizer.all_special_ids) | {t["id"] for t in state.get("added_tokens", [])}
    kept |= {i for i, token in by_id.items() if _is_fallback_piece(kind, token)}
    # Added tokens past the model's own vocabulary (an XLM-R <mask> after the Unigram pieces, domain
    # tokens a user added with add_tokens) are kept, all of them, and renumbered in their order right
    # after the kept vocabulary: the tokenizer numbers added tokens from the vocabulary's size on.
    beyond = sorted(i for i in kept if i not in by_id)
    kept = {i for i in kept if i in by_id}
    others = [i for i in sorted(by_id) if i not in kept and not by_id[i].startswith("[unused")]
    kept |= set(others[:keep_top])
    if kind == "BPE":
        kept = _close_under_merges(kept, by_id, spec)
    old_ids = sorted(kept) + beyond
    new_id = {old: new for new, old in enumerate(old_ids)}

    in_vocabulary = old_ids[: len(old_ids) - len(beyond)]
    if kind == "Unigram":
        spec["vocab"] = [spec["vocab"][old] for old in in_vocabulary]
        if spec.get("unk_id") is not None:
            spec["unk_id"] = new_id[spec["unk_id"]]
    else:
        spec["vocab"] = {by_id[old]: new for new, old in enumerate(in_vocabulary)}
    if kind == "BPE":
        survivors = {by_id[i] for i in in_vocabulary}
        spec["merges"] = [m for m in spec["merges"] if all(t in survivors for t in (*_merge_parts(m), "".join(_merge_parts(m))))]
    for token in state.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    _renumber_post_processor(state.get("post_processor"), new_id)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(json.dumps(state))
    trimmed = type(tokenizer)(
        tokenizer_object=backend,
        **{k: v for k, v in tokenizer.init_kwargs.items() if k not in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")},
    )

    old_embeddings = model.get_input_embeddings()
    index = torch.tensor(old_ids, device=old_embeddings.weight.device)
    config = model.config
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id"):
        if getattr(config, key, None) is not None and getattr(config, key) in new_id:
            setattr(config, key, new_id[getattr(config, key)])
    pad_id = config.pad_token_id if config.pad_token_id in range(len(old_ids)) else None
    embeddings = nn.Embedding(len(old_ids), old_embeddings.embedding_dim, padding_idx=pad_id)
    embeddings.weight.data = old_embeddings.weight.data[index].clone()
    model.set_input_embeddings(embeddings)
    base_embeddings = getattr(model.base_model, "embeddings", None)
    if base_embeddings is not None and hasattr(base_embeddings, "padding_idx"):
        base_embeddings.padding_idx = pad_id  # RoBERTa-style position ids count from the pad id
    config.vocab_size = len(old_ids)
    info = {
        "vocab_kind": kind, "vocab_size_before": len(by_id) + len(beyond), "vocab_size_after": len(old_ids),
        "corpus_tokens": len(used), "added_tokens_beyond_vocabulary": len(beyond),
    }
    return model, trimmed, info


def _is_fallback_piece(kind: str, token: str) -> bool:
    """Tokens unseen words fall back to: single characters (WordPiece, Unigram, with their
    continuation or word-start marks), byte pieces (Unigram byte_fallback), the byte alphabet (BPE)."""
    if kind == "BPE":
        return token in _byte_alphabet()
    if kind == "Unigram":
        return len(token) == 1 or (len(token) == 2 and token[0] == "\u2581") or (token.startswith("<0x") and len(token) == 6)
    return len(token) == 1 or (token.startswith("##") and len(token) == 3)


def _byte_alphabet() -> set[str]:
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


def _merge_parts(merge: str | list[str]) -> tuple[str, str]:
    """A merge as its two parts (tokenizers writes "a b" strings or, since 0.20, [a, b] pairs)."""
    first, second = merge.split(" ", 1) if isinstance(merge, str) else merge
    return first, second


def _close_under_merges(kept: set[int], by_id: dict[int, str], spec: dict[str, Any]) -> set[int]:
    """Add the parts of every kept token a merge produces, recursively: BPE builds a token only
    through its parts, so a token whose parts are gone could never be produced again."""
    ids = {token: index for index, token in by_id.items()}
    parts_of: dict[str, list[tuple[str, str]]] = {}
    for merge in spec["merges"]:
        first, second = _merge_parts(merge)
        parts_of.setdefault(first + second, []).append((first, second))
    kept = set(kept)
    todo = [by_id[i] for i in kept]
    while todo:
        for pair in parts_of.get(todo.pop(), []):
            for part in pair:
                if part in ids and ids[part] not in kept:
                    kept.add(ids[part])
                    todo.append(part)
    return kept


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
