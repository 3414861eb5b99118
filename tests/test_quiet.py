"""Quiet by default (cyclej/runtime/quiet.py): third-party warnings and notices a user cannot act on are
filtered, `--verbose` shows them; progress bars and the project's own lines stay."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each kind of noise looks like in a terminal: Python's warning line, vLLM's import-time notice
# (through logging's last-resort handler) and transformers' LOAD REPORT (a logger warning).
PROBE = r"""
import logging, sys, warnings
from cyclej.runtime import quiet
quiet.configure(verbose=quiet.wants_verbose(sys.argv[1:]))
warnings.warn_explicit("torch thing is deprecated", FutureWarning, "/site-packages/torch/x.py", 1,
                       module="torch.x")
warnings.warn_explicit("ours", UserWarning, "/repo/cyclej/train.py", 2, module="cyclej.training.trainer")
warnings.warn_explicit("models is deprecated", DeprecationWarning, "/repo/cyclej/embedder.py", 3,
                       module="cyclej.models.embedder")
warnings.warn_explicit("Unclosed context <zmq.Context()>", ResourceWarning, "/repo/cyclej/generate.py", 4,
                       module="cyclej.generation.backends")
logging.getLogger("vllm.triton_utils.importing").warning(
    "Triton is installed, but doesn't include CPU backend.")
import transformers
transformers.utils.logging.get_logger("transformers.modeling_utils").warning("LOAD REPORT from: x")
"""
# Env a user may have set that would change what is filtered; the probe runs without them.
USER_KNOBS = (
    "PYTHONWARNINGS",
    "VLLM_LOGGING_LEVEL",
    "TRANSFORMERS_VERBOSITY",
    "TORCH_CPP_LOG_LEVEL",
    "CYCLEJ_QUIET",
)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in USER_KNOBS}


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_notices_are_filtered_unless_verbose(verbose: bool) -> None:
    args = ["--verbose"] if verbose else []
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "UserWarning: ours" in proc.stderr  # the project's own warning shows either way
    noise = ("FutureWarning: torch thing is deprecated", "Triton is installed", "LOAD REPORT")
    for needle in noise:
        assert (needle in proc.stderr) == verbose, (needle, proc.stderr)
    # A library's deprecation pointing at our line (sentence_transformers' at cyclej/models/embedder.py's
    # import): hidden although it names a project file (verbose leaves it to Python's default, which hides
    # it too).
    assert "DeprecationWarning: models is deprecated" not in proc.stderr
    assert "ResourceWarning: Unclosed context" not in proc.stderr  # zmq's, at vLLM engine shutdown


def test_a_users_own_warning_filters_are_left_alone() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**_clean_env(), "PYTHONWARNINGS": "default"},
        timeout=120,
    )
    assert "FutureWarning: torch thing is deprecated" in proc.stderr, proc.stderr


# A warning line as Python prints it: "<file>:<line>: <Category>Warning: <message>".
WARNING_LINE = re.compile(r"^(?P<file>\S+\.py):\d+: (?P<category>\w*Warning): ")


@pytest.mark.slow  # the whole tiny pipeline through Prefect: ~2.5 min on 2 loaded cores
def test_tiny_run_prints_no_third_party_warnings(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cyclej.cli", "run", "--preset", "tiny", "--storage", str(tmp_path / "store")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**_clean_env(), "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    print(f"tiny run: {took:.0f} s, {len(out.splitlines())} lines")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.split(r"[\r\n]", out)  # tqdm redraws with \r: every redraw is a line here
    third_party = [
        m.group(0)
        for line in lines
        if (m := WARNING_LINE.match(line)) and not re.search(r"/(cyclej|flows|tasks|infra)/", m.group("file"))
    ]
    assert third_party == []
    deprecations = [
        line
        for line in lines
        if re.search(r"\b(Deprecation|PendingDeprecation|Future|Resource)Warning: ", line)
    ]
    assert deprecations == []  # wherever they point (a library deprecating what our code calls)
    assert not any(line.startswith("[W") and "Warning:" in line for line in lines)  # torch's C++ warnings
    assert "LOAD REPORT" not in out  # transformers' report on the discriminator's new head (by design)
    # What stays: the project's lines, Prefect's task lines and the progress bars.
    for needle in (
        "stage context: start",
        "cyclej.runtime.progress - context: train 4/4",
        "context: train: 100%",
        "rl: RL steps: 100%",
        "Task run 'eval-",
        "Finished in state Completed()",
        "# CYCLE_J evaluation",
    ):
        assert needle in out, needle
