"""One precision rule for every stage: auto uses bf16 only where it is fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cyclej.training import precision


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_follows_native_bf16(native: bool) -> None:
    cpu = torch.device("cpu")
    assert precision.use_bf16("auto", cpu, native) is native
    assert precision.use_bf16("fp32", cpu, native) is False
    assert (
        precision.use_bf16("bf16", cpu, native) is True
    )  # asked for explicitly: honoured (warned if emulated)


def test_cuda_auto_is_bf16() -> None:
    assert precision.use_bf16("auto", torch.device("cuda")) is True
    assert precision.use_bf16("fp32", torch.device("cuda")) is False


def test_this_machine_is_detected_consistently() -> None:
    flags = Path("/proc/cpuinfo").read_text()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert precision.cpu_has_native_bf16() == native
    assert precision.use_bf16("auto", torch.device("cpu")) == native
