"""Which precision to compute in: one rule for every stage.

`precision: auto` means bf16 autocast on CUDA, and on a CPU only when the CPU does bf16 natively
(AVX512-BF16 or AMX). Without those instructions PyTorch emulates bf16 and a training step gets an order
of magnitude *slower* (measured: SmolLM2 LoRA step 4×256 tokens, 15 s fp32 vs 238 s bf16 on an AMD EPYC
without avx512_bf16), while CPUs that have them run 1.6–1.7× faster in bf16.
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
    log.warning("precision bf16 on a CPU without native bf16 (avx512_bf16/amx): PyTorch emulates it and runs "
                "many times slower than fp32; set precision: auto or fp32")


def use_bf16(precision: str, device: torch.device, native_cpu_bf16: bool | None = None) -> bool:
    """True when computation should run under bf16 autocast for this precision setting and device.
    `native_cpu_bf16` defaults to what this machine's CPU reports."""
    native = cpu_has_native_bf16() if native_cpu_bf16 is None else native_cpu_bf16
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return True
    if precision == "bf16":
        if not native:
            _warn_emulated()
        return True
    return native
