"""A stage configured for a GPU never falls back to the CPU (issue 22, point 2).

gpu.lock's torch is its CUDA 13.0 build; on a host whose NVIDIA driver is older (< 580), or with no GPU,
`torch.cuda.is_available()` is False, and `StageRun.device` used to return `cpu` without a word: GPT-J
would train on the pod's CPU while the GPU billed. With `device: cuda` (the gptj preset) or
`CYCLEJ_DEVICE=cuda` (the GPU pods' env), the stage refuses to start, in one line naming the device and
the torch CUDA build / driver it found. This machine has no GPU, so the refusal is the real one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cyclej.config import PipelineConfig, load_config
from cyclej.errors import BadInput
from cyclej.pipeline.registry import StageRun, fingerprints
from cyclej.runtime.device import DEVICE_ENV, describe_cuda, nvidia_driver_version, resolve_device
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a GPU")


def _run(tmp_path: Path, device: str) -> StageRun:
    cfg = load_config(preset="tiny", overrides=[f"device={device}"], storage=str(tmp_path / "store"))
    return StageRun.start("data", cfg, {}, ArtifactStore.from_config(cfg.storage), Progress(show_bar=False))


@no_gpu
def test_a_stage_configured_for_a_gpu_refuses_to_start_on_a_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    with pytest.raises(BadInput) as err:
        _ = _run(tmp_path, "cuda").device
    msg = str(err.value)
    assert "\n" not in msg
    assert "stage 'data'" in msg and "device: cuda" in msg
    assert f"torch {torch.__version__}" in msg and "CPU-only build" in msg  # this venv's torch is +cpu
    assert "no NVIDIA driver" in msg  # no /proc/driver/nvidia/version, no nvidia-smi on this machine
    assert "device: cpu" in msg and f"{DEVICE_ENV}=cpu" in msg  # what to do


@no_gpu
def test_auto_keeps_falling_back_and_the_env_overrides_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert _run(tmp_path, "auto").device == torch.device("cpu")  # today's behaviour for CPU presets
    monkeypatch.setenv(DEVICE_ENV, "cuda")  # what the GPU pods set (deployments/prefect.yaml)
    with pytest.raises(BadInput, match=f"{DEVICE_ENV}=cuda"):
        _ = _run(tmp_path, "auto").device
    monkeypatch.setenv(DEVICE_ENV, "cpu")  # a person running a GPU preset on the CPU on purpose
    assert _run(tmp_path, "cuda").device == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(BadInput, match=f"{DEVICE_ENV}='gpu'.*auto, cuda or cpu"):
        resolve_device("auto")


@no_gpu
@pytest.mark.slow  # ~50 s: a temporary Prefect server and the tiny data stage first
def test_the_cli_run_of_a_gpu_config_on_a_cpu_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(DEVICE_ENV, None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cyclej.cli",
            "run",
            "--preset",
            "tiny",
            "--set",
            "device=cuda",
            "--storage",
            str(tmp_path / "store"),
            "--until",
            "context",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # The `data` stage ran (it needs no device); `context` refused before loading its model.
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cyclej: error:")]
    assert len(errors) == 1 and "stage 'context'" in errors[0] and "(device: cuda)" in errors[0], proc.stderr[
        -2000:
    ]
    assert "Traceback" not in proc.stderr


def test_gptj_asks_for_a_gpu_and_the_field_changes_no_fingerprint() -> None:
    assert load_config(preset="gptj").device == "cuda"
    for preset in ("tiny", "demo", "yelp", "gptj"):
        cfg = load_config(preset=preset)
        assert cfg.device == ("cuda" if preset == "gptj" else "auto")
        other = PipelineConfig.model_validate({**cfg.model_dump(mode="json"), "device": "cpu"})
        assert fingerprints(cfg) == fingerprints(other), preset  # where a stage runs, not what it computes


def test_the_gpu_pods_never_fall_back() -> None:
    gpu_vars = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["definitions"][
        "gpu_job_variables"
    ]
    assert gpu_vars["env"][DEVICE_ENV] == "cuda"


def test_the_driver_version_is_read_from_the_kernel_module() -> None:
    # /proc/driver/nvidia/version on a RunPod host with a CUDA 12.8 driver (too old for torch's cu130).
    text = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.124.06  Wed Feb 26 22:49:48 UTC 2025\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    assert nvidia_driver_version(text) == "570.124.06"
    assert nvidia_driver_version("") is None


def test_the_refusal_names_a_driver_too_old_for_the_locked_torch() -> None:
    # What the GPU image's torch (2.13.0+cu130) says on a host with a CUDA 12.8 driver, and on a good one.
    old = describe_cuda("2.13.0+cu130", "13.0", "570.124.06")
    assert old == (
        "torch 2.13.0+cu130 is built for CUDA 13.0; NVIDIA driver 570.124.06, older than the 580 that "
        "CUDA 13.0 needs"
    )
    assert "older" not in describe_cuda("2.13.0+cu130", "13.0", "580.65.06")
    assert describe_cuda("2.13.0+cpu", None, None) == (
        "torch 2.13.0+cpu is a CPU-only build; "
        "no NVIDIA driver (no /proc/driver/nvidia/version, no nvidia-smi)"
    )


@no_gpu
def test_stages_that_pick_their_device_inside_library_code_refuse_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paraphrase and eval choose their engine's device themselves (generate, eval_scorers): run_stage and
    run_shard resolve the stage's device first, so a GPU config refuses there as well; data runs anywhere."""
    from cyclej.pipeline.registry import plan_stage, run_shard, run_stage

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    cfg = load_config(preset="tiny", overrides=["device=cuda"], storage=str(tmp_path / "store"))
    store = ArtifactStore.from_config(cfg.storage)
    data = run_stage("data", cfg, {}, store, Progress(show_bar=False))  # CPU work: no refusal
    with pytest.raises(BadInput, match="stage 'paraphrase' is configured for a GPU"):
        run_stage("paraphrase", cfg, {"data": data}, store, Progress(show_bar=False))
    with pytest.raises(BadInput, match="stage 'paraphrase' is configured for a GPU"):
        run_shard(
            plan_stage("paraphrase", cfg, {"data": data.fingerprint}),
            cfg,
            {"data": data},
            store,
            0,
            Progress(show_bar=False),
        )
    assert (
        store.list_checkpoints(
            "paraphrase", plan_stage("paraphrase", cfg, {"data": data.fingerprint}).fingerprint
        )
        == []
    )
