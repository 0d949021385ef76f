"""Where each encoder family keeps its parts: one small adapter class per `config.model_type`.

Student layer selection, head/FFN importance and structured pruning only talk to an adapter, never to
`layer.attention.self` or `layer.intermediate.dense` directly, so adding an architecture is one class
here plus its tiny test checkpoint (tests/conftest.py). An adapter says:

- where the transformer layers are (`layers_path`, from the base model);
- in each layer, the attention module holding the head count, the linears whose outputs are grouped
  by head (query/key/value) and the output linear whose inputs are;
- the FFN's input linear(s) and output linear (ModernBERT's input is a gated GLU of two halves);
- whether removed heads can be written into config.json (`config.pruned_heads`, which
  `from_pretrained` applies) so the model rebuilds, and if not why not;
- whether layers depend on their position (ModernBERT: layer 0 has no attention norm and every
  `global_attn_every_n_layers`-th layer attends globally), in which case students are rebuilt from
  config and the chosen layers' weights loaded into them instead of copying modules.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.pytorch_utils import prune_linear_layer

from pipeline.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


class Architecture:
    """The BERT layout (BERT, RoBERTa, XLM-RoBERTa, ELECTRA); other families override what differs."""

    model_types: ClassVar[tuple[str, ...]] = ("bert", "roberta", "xlm-roberta", "electra")
    layers_path: ClassVar[str] = "encoder.layer"
    attention: ClassVar[str] = "attention.self"  # the module that knows the head count
    heads_attr: ClassVar[str] = "num_attention_heads"
    head_size_attr: ClassVar[str] = "attention_head_size"
    all_head_size_attr: ClassVar[str] = "all_head_size"
    head_linears: ClassVar[tuple[str, ...]] = ("attention.self.query", "attention.self.key", "attention.self.value")
    attention_output: ClassVar[str] = "attention.output.dense"
    ffn_in: ClassVar[str] = "intermediate.dense"
    ffn_gated: ClassVar[bool] = False  # ffn_in yields [input | gate] halves (GLU)
    ffn_out: ClassVar[str] = "output.dense"
    ffn_width_key: ClassVar[str] = "intermediate_size"
    # Whether config.json can record removed heads (as `pruned_heads`, which from_pretrained applies).
    # No family here has the other way, a fixed `attention_head_size` with fewer heads, because each
    # one's attention output layer or position bias is sized by the full head count.
    head_pruning: ClassVar[bool] = True
    no_head_pruning_reason: ClassVar[str] = ""
    position_dependent: ClassVar[bool] = False
    shared_layers: ClassVar[bool] = False  # ALBERT: one set of weights applied num_hidden_layers times

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type

    # ----------------------------------------------------------------- layers

    def layers(self, model: PreTrainedModel) -> list[nn.Module]:
        """The distinct transformer layers, in order (ALBERT: its shared layers, once each)."""
        return list(_get(model.base_model, self.layers_path))

    def select_layers(self, model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
        """A copy of `model` keeping only the given encoder layers (1-based), in order."""
        student = copy.deepcopy(model)
        blocks = _get(student.base_model, self.layers_path)
        kept = [blocks[i - 1] for i in layers]
        blocks._modules.clear()
        for index, block in enumerate(kept):
            blocks.add_module(str(index), block)
        student.config.num_hidden_layers = len(layers)
        if student.config.pruned_heads:  # keys are layer indices: follow the renumbering
            old = {int(k): v for k, v in student.config.pruned_heads.items()}
            student.config.pruned_heads = {new: old[i - 1] for new, i in enumerate(layers) if i - 1 in old}
        return student

    # ----------------------------------------------------------------- attention heads

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.attention)

    def attention_output_linear(self, layer: nn.Module) -> nn.Linear:
        return _get(layer, self.attention_output)

    def ffn_output_linear(self, layer: nn.Module) -> nn.Linear:
        return _get(layer, self.ffn_out)

    def head_count(self, layer: nn.Module) -> int:
        return int(getattr(_get(layer, self.attention), self.heads_attr))

    def head_size(self, layer: nn.Module) -> int:
        return int(getattr(_get(layer, self.attention), self.head_size_attr))

    def head_pruning_problem(self) -> str | None:
        """Why heads cannot be removed so that from_pretrained rebuilds the model, or None."""
        return None if self.head_pruning else self.no_head_pruning_reason

    def remove_heads(self, model: PreTrainedModel, index: int, layer: nn.Module, heads: list[int]) -> None:
        """Slice the current heads `heads` out of `layer` (the `index`-th distinct layer)."""
        if not self.head_pruning:
            raise ModelError(f"{self.model_type}: {self.no_head_pruning_reason}")
        size, count = self.head_size(layer), self.head_count(layer)
        keep = [h for h in range(count) if h not in set(heads)]
        rows = torch.cat([torch.arange(h * size, (h + 1) * size) for h in keep]).to(_get(layer, self.attention_output).weight.device)
        for path in self.head_linears:
            _set(layer, path, prune_linear_layer(_get(layer, path), rows, dim=0))
        _set(layer, self.attention_output, prune_linear_layer(_get(layer, self.attention_output), rows, dim=1))
        attention = _get(layer, self.attention)
        setattr(attention, self.heads_attr, len(keep))
        if self.all_head_size_attr:
            setattr(attention, self.all_head_size_attr, len(keep) * size)

    def record_heads(self, model: PreTrainedModel, removed: dict[int, list[int]]) -> None:
        """Write removed heads (original ids per distinct layer) into config.pruned_heads."""
        config = model.config
        merged = {int(k): set(v) for k, v in (config.pruned_heads or {}).items()}
        for layer, heads in removed.items():
            merged.setdefault(layer, set()).update(heads)
        config.pruned_heads = {layer: sorted(heads) for layer, heads in merged.items()}

    # ----------------------------------------------------------------- FFN

    def ffn_width(self, layer: nn.Module) -> int:
        return int(_get(layer, self.ffn_out).in_features)

    def remove_neurons(self, layer: nn.Module, keep: torch.Tensor) -> None:
        """Keep only the intermediate neurons `keep` (sorted indices) of `layer`'s FFN."""
        keep = keep.to(_get(layer, self.ffn_out).weight.device)
        rows = torch.cat([keep, keep + self.ffn_width(layer)]) if self.ffn_gated else keep
        _set(layer, self.ffn_in, prune_linear_layer(_get(layer, self.ffn_in), rows, dim=0))
        _set(layer, self.ffn_out, prune_linear_layer(_get(layer, self.ffn_out), keep, dim=1))

    def set_ffn_width(self, config: Any, width: int) -> None:
        setattr(config, self.ffn_width_key, width)


class DistilBert(Architecture):
    model_types = ("distilbert",)
    layers_path = "transformer.layer"
    attention = "attention"
    heads_attr = "n_heads"
    all_head_size_attr = "dim"
    head_linears = ("attention.q_lin", "attention.k_lin", "attention.v_lin")
    attention_output = "attention.out_lin"
    ffn_in = "ffn.lin1"
    ffn_out = "ffn.lin2"
    ffn_width_key = "hidden_dim"


class MPNet(Architecture):
    model_types = ("mpnet",)
    attention = "attention.attn"
    head_linears = ("attention.attn.q", "attention.attn.k", "attention.attn.v")
    attention_output = "attention.attn.o"
    head_pruning = False
    no_head_pruning_reason = (
        "MPNet's relative position bias is one table shared by all layers with one column per head, and "
        "its head size is always hidden_size / num_attention_heads"
    )


class DebertaV2(Architecture):
    model_types = ("deberta-v2",)
    head_linears = ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj")
    head_pruning = False
    no_head_pruning_reason = (
        "DeBERTa-v2's attention output layer is always hidden_size wide and its config has no "
        "pruned_heads, so fewer heads cannot be described in config.json"
    )


class Albert(Architecture):
    """ALBERT repeats shared layer groups: `num_hidden_layers` applications of `num_hidden_groups`
    groups. Students keep the shared weights and apply them fewer times."""

    model_types = ("albert",)
    layers_path = "encoder.albert_layer_groups"
    attention = "attention"
    head_linears = ("attention.query", "attention.key", "attention.value")
    attention_output = "attention.dense"
    ffn_in = "ffn"
    ffn_out = "ffn_output"
    shared_layers = True

    def layers(self, model: PreTrainedModel) -> list[nn.Module]:
        return [layer for group in _get(model.base_model, self.layers_path) for layer in group.albert_layers]

    def select_layers(self, model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
        groups = model.config.num_hidden_groups
        if groups != 1:
            raise ConfigError(
                f"ALBERT students keep the shared layer group and apply it fewer times; this teacher has "
                f"{groups} groups (num_hidden_groups), which is not supported. Use student.init=random."
            )
        student = copy.deepcopy(model)
        student.config.num_hidden_layers = len(layers)
        return student


class ModernBert(Architecture):
    model_types = ("modernbert",)
    layers_path = "layers"
    attention = "attn"
    heads_attr = "num_heads"
    head_size_attr = "head_dim"
    head_linears = ("attn.Wqkv",)
    attention_output = "attn.Wo"
    ffn_in = "mlp.Wi"
    ffn_gated = True
    ffn_out = "mlp.Wo"
    head_pruning = False
    no_head_pruning_reason = (
        "ModernBERT's config has no head-size setting (head_dim is always hidden_size / num_attention_heads) "
        "and no per-layer pruned_heads"
    )
    position_dependent = True

    def select_layers(self, model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
        """Rebuild from config (layer 0 has no attention norm, attention is global every n-th layer by
        position), then load each chosen layer's weights where the new position has the same shapes."""
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = len(layers)
        student = AutoModelForSequenceClassification.from_config(config, attn_implementation=config._attn_implementation)
        source = model.state_dict()
        state = {}
        pattern = re.compile(r"^(.*\blayers\.)(\d+)(\..*)$")
        for key, value in student.state_dict().items():
            match = pattern.match(key)
            if match:
                key_in_source = f"{match[1]}{layers[int(match[2])] - 1}{match[3]}"
            else:
                key_in_source = key
            if key_in_source in source and source[key_in_source].shape == value.shape:
                state[key] = source[key_in_source]
        missing = [k for k in student.state_dict() if k not in state]
        if missing:  # e.g. a layer moved to position 0, which has no attention norm
            log.info("ModernBERT student: %d tensors keep their fresh initialisation: %s", len(missing), missing)
        student.load_state_dict(state, strict=False)
        return student.to(next(model.parameters()).device)


ARCHITECTURES: dict[str, type[Architecture]] = {
    model_type: cls for cls in (Architecture, DistilBert, MPNet, DebertaV2, Albert, ModernBert) for model_type in cls.model_types
}
SUPPORTED = sorted(ARCHITECTURES)


def architecture_for(model_or_config: PreTrainedModel | Any) -> Architecture:
    """The adapter for a model (or its config); a clear error for an unknown `model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"model_type {model_type!r} is not supported for layer selection and pruning; supported: "
            f"{', '.join(SUPPORTED)}. Use student.init=random and prune.method=magnitude, or add an "
            "adapter in pipeline/architectures.py."
        )
    return ARCHITECTURES[model_type](model_type)


def ffn_width_key(config: Any) -> str:
    """The config key of the FFN width, also for architectures without an adapter."""
    model_type = getattr(config, "model_type", None)
    return ARCHITECTURES[model_type].ffn_width_key if model_type in ARCHITECTURES else "intermediate_size"


def encoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The distinct transformer layers of `model`, through its architecture adapter."""
    return architecture_for(model).layers(model)
