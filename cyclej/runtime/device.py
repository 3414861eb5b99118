"""Which device a stage computes on, and a refusal instead of a silent CPU run where a GPU was asked for.

`PipelineConfig.device` (`auto`, `cuda`, `cpu`), overridden by the env var `CYCLEJ_DEVICE` on the machine
that runs the stage (the GPU pods set `CYCLEJ_DEVICE=cuda`, deployments/prefect.yaml): `auto` takes the GPU
when torch sees one and the CPU otherwise; `cuda` refuses to start without one. Why the refusal: the GPU
image's torch is its CUDA 13.0 build (requirements/gpu.lock), which finds no GPU on a host whose NVIDIA
driver is older than 580; falling back there would train GPT-J on the pod's CPU while the GPU bills.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from cyclej.errors import BadInput

if TYPE_CHECKING:
    import torch

DEVICE_ENV = "CYCLEJ_DEVICE"
DEVICES = ("auto", "cuda", "cpu")
# The oldest NVIDIA driver that runs each CUDA major release (CUDA's minor-version compatibility).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}


def nvidia_driver_version(proc_text: str | None = None) -> str | None:
    """The loaded NVIDIA kernel driver's version ('570.124.06'), None when there is none: read from
    /proc/driver/nvidia/version (or `proc_text`), else asked of nvidia-smi."""
    if proc_text is None:
        proc = Path("/proc/driver/nvidia/version")
        proc_text = proc.read_text(errors="replace") if proc.is_file() else ""
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", proc_text)
    if m:
        return m.group(1)
    smi = shutil.which("nvidia-smi")
    if proc_text or smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out[0] if out else None


def describe_cuda(torch_version: str, cuda: str | None, driver: str | None) -> str:
    """Why torch sees no GPU, in a few words, from its version, its CUDA build (`torch.version.cuda`,
    None for a CPU build) and the NVIDIA driver found (None: none)."""
    built = (
        f"torch {torch_version} is built for CUDA {cuda}"
        if cuda
        else f"torch {torch_version} is a CPU-only build"
    )
    if driver is None:
        return f"{built}; no NVIDIA driver (no /proc/driver/nvidia/version, no nvidia-smi)"
    need = MIN_DRIVER.get(int(cuda.split(".")[0])) if cuda else None
    if need is not None and int(driver.split(".")[0]) < need:
        return f"{built}; NVIDIA driver {driver}, older than the {need} that CUDA {cuda} needs"
    return (
        f"{built}; NVIDIA driver {driver}, yet no usable GPU (CUDA_VISIBLE_DEVICES empty, or the GPU failed?)"
    )


def cuda_diagnosis() -> str:
    """`describe_cuda` for this machine's torch and driver."""
    import torch

    return describe_cuda(torch.__version__, torch.version.cuda, nvidia_driver_version())


def resolve_device(configured: str, stage: str | None = None) -> torch.device:
    """The device for a stage: `configured` (the config's `device`) unless CYCLEJ_DEVICE says otherwise.
    `cuda` without a GPU torch can use is BadInput (nothing has been computed yet)."""
    import torch

    env = os.environ.get(DEVICE_ENV, "").strip()
    if env and env not in DEVICES:
        raise BadInput(f"{DEVICE_ENV}={env!r}: the device must be auto, cuda or cpu")
    wanted = env or configured
    if wanted == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if wanted == "auto":
        return torch.device("cpu")
    source = f"{DEVICE_ENV}=cuda" if env else "device: cuda"
    who = f"stage '{stage}'" if stage else "this run"
    raise BadInput(
        f"{who} is configured for a GPU ({source}) but torch finds none: {cuda_diagnosis()}. Run it on a "
        "host whose NVIDIA driver runs torch's CUDA (on RunPod: the job variable allowed_cuda_versions), or "
        f"set device: cpu / {DEVICE_ENV}=cpu to run it on the CPU on purpose"
    )
