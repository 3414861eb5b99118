"""Shared bits of the benchmarks: run the `cyclej` CLI in a subprocess and time it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TOKENIZERS_PARALLELISM": "false", **extra}
    env.pop("CYCLEJ_FAULT", None)
    env.update({k: v for k, v in extra.items() if k == "CYCLEJ_FAULT"})
    return env


def timed_cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> tuple[float, int]:
    """Seconds and exit code of `python -m cyclej.cli ARGS` (output discarded)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cyclej.cli", *args], cwd=ROOT, env=env or cli_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise SystemExit(f"cyclej {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return dt, proc.returncode
