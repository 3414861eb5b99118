"""Which precision to compute in, and which dtype to hold weights in: one rule for every stage.

`precision: auto` means bf16 autocast on a CUDA GPU that supports bf16 (Ampere and later), and on a CPU
only when the CPU does bf16 natively (AVX512-BF16 or AMX). Without those instructions PyTorch emulates bf16
and a training step gets an order of magnitude *slower* (measured: SmolLM2 LoRA step 4×256 tokens, 15 s fp32
vs 238 s bf16 on an AMD EPYC without avx512_bf16), while CPUs that have them run 1.6–1.7× faster in bf16.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger("cyclej")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust PyTorch's own dispatch level
        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


@functools.cache
def _warn_emulated() -> None:
    log.warning(
        "precision bf16 on a CPU without native bf16 (avx512_bf16/amx): PyTorch emulates it and runs "
        "many times slower than fp32; set precision: auto or fp32"
    )


def gpu_has_bf16() -> bool:
    """Whether this machine's GPU computes in bf16 (no GPU here: assume one that does, as `cyclej plan`
    sizes GPU workers from a CPU machine)."""
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def use_bf16(precision: str, device: torch.device, native_cpu_bf16: bool | None = None) -> bool:
    """True when computation should run under bf16 autocast for this precision setting and device.
    `native_cpu_bf16` defaults to what this machine's CPU reports."""
    native = cpu_has_native_bf16() if native_cpu_bf16 is None else native_cpu_bf16
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return precision == "bf16" or gpu_has_bf16()
    if precision == "bf16":
        if not native:
            _warn_emulated()
        return True
    return native


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The forward's autocast context for this precision setting and device (disabled for fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16(precision, device))


def weights_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype to hold a model's weights in: bf16 on a GPU that computes in bf16 (a frozen base, RL's
    policy, an inference model; trained LoRA weights and RL's optimizer masters stay fp32 regardless), fp32
    on a CPU, where bf16 is autocast only (the fp32 weights keep their exact values)."""
    return torch.bfloat16 if device.type == "cuda" and use_bf16(precision, device) else torch.float32
