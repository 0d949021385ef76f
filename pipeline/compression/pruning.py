"""Structured pruning (attention heads, FFN neurons) and magnitude pruning (vocabulary trimming: vocabulary.py).

Structured pruning removes whole heads and neurons, so the saved model is genuinely smaller and
faster on a CPU; `from_pretrained` rebuilds it from config.json (`pruned_heads`, `intermediate_size`,
`vocab_size`). Magnitude pruning only zeroes weights: kept for comparison, it makes dense CPU
kernels no faster.
"""

from __future__ import annotations

import gzip
import itertools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback

from pipeline.architectures import architecture_for, encoder_layers

# Vocabulary trimming lives in its own module (the static reference member uses it too); the prune
# stage and the tests reach it through this one.
from pipeline.compression.vocabulary import (  # noqa: F401
    trim_vocabulary,
    unk_share,
    vocabulary_trim_problem,
)
from pipeline.errors import ConfigError, ModelError
from pipeline.kd.layer_map import uniform_layer_map

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


def drop_layers(model: PreTrainedModel, keep: int) -> tuple[PreTrainedModel, list[int]]:
    """`model` with `keep` of its encoder layers, evenly spaced and the last kept, and which (1-based);
    a clear error when it has fewer."""
    total = model.config.num_hidden_layers
    if keep > total:
        raise ConfigError(
            f"prune.num_layers={keep}: the source student has only {total} layers. Use at most {total}, or null "
            "to keep every layer"
        )
    kept = uniform_layer_map(keep, total)
    return (architecture_for(model).select_layers(model, kept) if keep < total else model), kept


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


def task_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss on a labelled batch (cross-entropy, or BCE when multi-label)."""
    return model(**{key: value for key, value in batch.items() if key != "teacher_logits"}).loss


def importance_scores(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    max_batches: int,
    loss_fn: Callable[[PreTrainedModel, dict[str, torch.Tensor]], torch.Tensor] = task_loss,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head importance (Michel et al., 2019) and FFN neuron importance, from `loss_fn` (by default
    the task loss on labelled batches; the prune stage may pass the distillation loss instead).

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
            batch = {key: value.to(device) for key, value in batch.items()}
            activations.clear()
            loss_fn(model, batch).backward()
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


def guide_head_index(student: PreTrainedModel, guide: PreTrainedModel, layer_map: list[int]) -> list[list[int]]:
    """Per student layer, where each of its heads sits among the heads of the guide layer it was
    (`layer_map`, 1-based): the student was cut and pruned from `guide`, and both configs record the
    original ids of the heads they removed (`pruned_heads`)."""
    arch, guide_arch = architecture_for(student), architecture_for(guide)
    guide_layers = guide_arch.layers(guide)
    index = []
    for position, (layer, source) in enumerate(zip(arch.layers(student), layer_map)):
        heads = _alive_heads(student, position, arch.head_count(layer))
        guide_heads = _alive_heads(guide, source - 1, guide_arch.head_count(guide_layers[source - 1]))
        missing = sorted(set(heads) - set(guide_heads))
        if missing:
            raise ModelError(
                f"student layer {position + 1} has heads {missing} that its guide's layer {source} does not: "
                "the guide is not the model this student was pruned from"
            )
        index.append([guide_heads.index(head) for head in heads])
    return index


def prune_ffn(model: PreTrainedModel, importance: torch.Tensor, keep: int) -> None:
    """Keep the `keep` most important intermediate neurons in every layer (one width for all layers)."""
    arch = architecture_for(model)
    for layer, scores in zip(arch.layers(model), importance):
        arch.remove_neurons(layer, torch.argsort(scores, descending=True)[:keep].sort().values)
    arch.set_ffn_width(model.config, keep)


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
