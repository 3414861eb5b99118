"""RL's own vLLM settings (nothing borrowed from paraphrase.vllm), and `cyclej validate` refusing what the
RL engine cannot do with a one-line reason and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cyclej.config import load_config
from cyclej.errors import BadInput


def test_rl_has_its_own_engine_settings() -> None:
    cfg = load_config(
        preset="gptj",
        overrides=["paraphrase.vllm.tensor_parallel_size=4", "paraphrase.vllm.max_model_len=8192"],
    )
    assert cfg.rl.vllm.tensor_parallel_size == 1 and cfg.rl.vllm.max_model_len == 512
    assert cfg.rl.vllm.gpu_memory_utilization == 0.25  # the preset's, sized by `cyclej plan`


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("rl.vllm.tensor_parallel_size=2", "rl.vllm.tensor_parallel_size > 1 is not supported: RL pushes"),
        ("rl.vllm.max_model_len=128", "rl.vllm.max_model_len 128 is shorter than a rollout"),
    ],
)
def test_validate_refuses_what_the_rl_engine_cannot_do(override: str, reason: str) -> None:
    with pytest.raises(BadInput, match=reason):
        load_config(preset="gptj", overrides=[override])
    done = subprocess.run(
        [sys.executable, "-m", "cyclej.cli", "validate", "--preset", "gptj", "--set", override],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0]


def test_rl_on_transformers_may_use_any_engine_setting() -> None:
    cfg = load_config(preset="gptj", overrides=["rl.backend=transformers", "rl.vllm.tensor_parallel_size=2"])
    assert cfg.rl.backend == "transformers"
