"""Which arithmetic a training run (and the teacher's labelling) uses: fp32, or mixed bf16 / fp16
(weights stay fp32, matrix products run in 16 bits under torch.autocast).

On CUDA, `auto` is AMP, as it always was. On a CPU, `auto` stays fp32: bf16 changes a run's numbers,
so it is asked for by name. It needs AMX or AVX512_BF16, and even then it does not always pay: a training
step of the MiniLM student (batch 32 x 40 tokens, eager attention, as every stage trains) ran ~2.2x
faster than fp32 on a Xeon with AMX and ~1.4x slower on a Xeon with AVX512_BF16 but no AMX
(`python -m scripts.torch_bf16_step --threads 2` times it on the machine at hand).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

from pipeline.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX tiles or AVX512_BF16); elsewhere torch emulates
    it, slower than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve(requested: str, key: str) -> Precision:
    """The precision a run uses for `requested` (auto | fp32 | bf16) on this machine; `key` names the
    setting in errors (e.g. student.precision)."""
    cuda = torch.cuda.is_available()
    if requested == "fp32":
        return "fp32"
    if requested == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{key}=bf16: this GPU has no bf16 (it needs an Ampere or newer NVIDIA GPU); "
                              f"use {key}=auto (fp16 AMP) or fp32")
        if not cuda and not cpu_has_bf16():
            raise ConfigError(f"{key}=bf16: this CPU has no native bf16 (AMX or AVX512_BF16), so bf16 would be "
                              f"emulated and slower than fp32; use {key}=fp32 (or auto)")
        return "bf16"
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    raise ConfigError(f"{key}={requested!r}: use auto, fp32 or bf16")


@contextlib.contextmanager
def autocast(precision: Precision, device: torch.device) -> Iterator[None]:
    """Run the block in `precision` on `device` (nothing changes for fp32)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
        yield


@contextlib.contextmanager
def unwrapped_forward(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, `model` runs its own forward: under mixed precision accelerate wraps a
    prepared model's forward in autocast and keeps the original as `_original_forward`."""
    original = getattr(model, "_original_forward", None)
    if original is None:
        yield
        return
    wrapped = model.forward
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped
