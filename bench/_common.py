"""Shared bits of the benchmarks: run the `cyclej` CLI in a subprocess and time it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }
    env.pop("CYCLEJ_FAULT", None)
    env.update({k: v for k, v in extra.items() if k == "CYCLEJ_FAULT"})
    return env


def timed_cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> tuple[float, int]:
    """Seconds and exit code of `python -m cyclej.cli ARGS` (output discarded).

    Each run gets its own process group, removed afterwards: a run killed by a fault leaves Prefect's
    temporary server behind (its child), which would otherwise live on and hold the output pipes."""
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "cyclej.cli", *args],
            cwd=ROOT,
            env=env or cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        code = proc.wait()
        dt = time.perf_counter() - t0
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if check and code != 0:
            err.seek(0)
            raise SystemExit(f"cyclej {' '.join(args)} failed ({code}):\n{err.read()[-2000:]}")
    return dt, code
