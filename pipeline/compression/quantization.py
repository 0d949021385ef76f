"""PyTorch dynamic INT8 quantization (nn.Linear weights to int8) and its safe on-disk format.

Why not `torch.save`: a dynamically quantized Linear keeps its weight in packed params (an opaque
`torch.ops.quantized` object) that safetensors cannot hold and that `torch.save` can only write as
a pickle, while this project never unpickles weights. So the format is plain safetensors
(`model_int8.safetensors`):

- each quantized Linear `<name>` as plain tensors: `<name>.weight_int8` (the int8 values),
  `<name>.weight_scale` (float64, 0-d), `<name>.weight_zero_point` (int64, 0-d) and `<name>.bias`;
- every other tensor of the model (embeddings, LayerNorms) under its state_dict name, unchanged;
- header metadata: a format tag, the quantized engine, the names of the quantized modules.

Loading builds the architecture from config.json (pruned heads, FFN width and vocabulary size all
come from there), quantizes that skeleton to get the same module types, then packs the stored
integers and scales back into each Linear under the same engine. The packed params are rebuilt from
the very same numbers, so the logits are bit-identical to those of the model that was saved.

The file is deliberately not called `model.safetensors`: `from_pretrained` must not mistake it for
fp32 weights and silently load a randomly initialised model.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from pipeline.errors import ConfigError, ModelError
from pipeline.models import check_model_dir

INT8_WEIGHTS_FILE = "model_int8.safetensors"
FORMAT = "fincompress-torch-dynamic-int8/1"
ARM_MACHINES = ("arm64", "aarch64")


def resolve_engine(setting: str, machine: str | None = None) -> str:
    """`auto` -> fbgemm on x86, qnnpack on ARM; an explicit engine must exist in this torch build."""
    if setting == "auto":
        machine = (machine or platform.machine()).lower()
        setting = "qnnpack" if machine in ARM_MACHINES else "fbgemm"
    supported = torch.backends.quantized.supported_engines
    if setting not in supported:
        raise ConfigError(
            f"quantize.engine={setting}: this torch build supports the quantized engines {supported}; "
            "pick one of them (or auto)"
        )
    return setting


def _use_engine(engine: str) -> None:
    if engine not in torch.backends.quantized.supported_engines:
        raise ModelError(
            f"this model was quantized for the {engine} engine, which this torch build lacks "
            f"({torch.backends.quantized.supported_engines}); re-run the quantize stage on this machine"
        )
    torch.backends.quantized.engine = engine


def quantize_model(model: nn.Module, engine: str) -> nn.Module:
    """A dynamically quantized copy of `model` (every nn.Linear to qint8 weights), in eval mode."""
    _use_engine(engine)
    return torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8, inplace=False)


def _quantized_modules(model: nn.Module) -> dict[str, DynamicLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, DynamicLinear)}


def _float_state(model: nn.Module, quantized: list[str]) -> dict[str, torch.Tensor]:
    """The state_dict entries that do not belong to a quantized Linear."""
    prefixes = tuple(f"{name}." for name in quantized)
    return {
        key: value
        for key, value in model.state_dict().items()
        if not key.startswith(prefixes) and isinstance(value, torch.Tensor)
    }


def save_quantized(model: PreTrainedModel, out_dir: Path, engine: str) -> Path:
    """Write config.json and the INT8 weights (format in the module docstring); return the weights file."""
    modules = _quantized_modules(model)
    if not modules:
        raise ModelError("the model has no dynamically quantized Linear layers; quantize it first")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        weight, bias = module._packed_params._weight_bias()
        if weight.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise ModelError(f"{name}: unsupported weight quantization {weight.qscheme()} (expected per-tensor)")
        tensors[f"{name}.weight_int8"] = weight.int_repr()
        tensors[f"{name}.weight_scale"] = torch.tensor(weight.q_scale(), dtype=torch.float64)
        tensors[f"{name}.weight_zero_point"] = torch.tensor(weight.q_zero_point(), dtype=torch.int64)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()
    # Clones: safetensors refuses tensors that share storage (tied weights).
    tensors.update({key: value.detach().clone() for key, value in _float_state(model, list(modules)).items()})
    metadata = {"format": FORMAT, "engine": engine, "quantized_modules": json.dumps(sorted(modules))}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / INT8_WEIGHTS_FILE
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)
    model.config.save_pretrained(out_dir)
    return path


def load_quantized(model_dir: str | Path, attn_implementation: str | None = "eager") -> PreTrainedModel:
    """The model written by `save_quantized`, in eval mode, with exactly the saved model's logits
    (with the eager attention it was evaluated with; None: transformers' default, SDPA where available).

    Sets torch's quantized engine to the one the model was quantized with (a process-wide setting).
    """
    model_dir = Path(model_dir)
    path = model_dir / INT8_WEIGHTS_FILE
    check_model_dir(
        model_dir,
        INT8_WEIGHTS_FILE,
        hint="it is written by the quantize stage (dvc repro quantize); fp32 models load with "
        "pipeline.models.load_trained",
        kind="a torch INT8 model directory",
    )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ModelError(f"{path}: unreadable ({error}); re-run the quantize stage") from None
    if metadata.get("format") != FORMAT:
        raise ModelError(
            f"{path}: not written by save_quantized (format {metadata.get('format')!r}, expected {FORMAT})"
        )
    _use_engine(metadata["engine"])

    config = AutoConfig.from_pretrained(model_dir)
    skeleton = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation).eval()
    model = torch.ao.quantization.quantize_dynamic(skeleton, {nn.Linear}, dtype=torch.qint8, inplace=True)
    modules = _quantized_modules(model)
    stored = json.loads(metadata["quantized_modules"])
    if sorted(modules) != stored:
        raise ModelError(
            f"{path} does not match the architecture in {model_dir / 'config.json'} (quantized layers "
            f"differ: {sorted(set(modules) ^ set(stored))[:5]}); re-run the quantize stage"
        )
    for name, module in modules.items():
        # Built from the stored integers as they are (torch.quantize_per_tensor would round floats again).
        weight = torch._make_per_tensor_quantized_tensor(
            tensors.pop(f"{name}.weight_int8"),
            tensors.pop(f"{name}.weight_scale").item(),
            tensors.pop(f"{name}.weight_zero_point").item(),
        )
        module.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
    expected = set(_float_state(model, list(modules)))
    if set(tensors) != expected:
        raise ModelError(
            f"{path} does not match the architecture in {model_dir / 'config.json'}: missing "
            f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]}; "
            "re-run the quantize stage"
        )
    # Update the model's own state_dict (it carries the version metadata the quantized layers need
    # to load); their entries, set just above, round-trip unchanged.
    state = model.state_dict()
    state.update(tensors)
    model.load_state_dict(state)
    return model.eval()
