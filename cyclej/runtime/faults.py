"""Fault injection for tests and drills:
``CYCLEJ_FAULT=<point>:<step>:<oom|cublas|error|kill|hang>[@rank][,…]``.

When the named stage reaches that optimizer step (for `paraphrase`: that shard), `maybe_fault` raises a
CUDA out-of-memory error (`oom`, once per process), raises cuBLAS's allocation failure as torch does, a
plain RuntimeError (`cublas`, once per process), raises a plain error (`error`, once per process),
ends the process at once with no clean-up (`kill`, like a lost pod) or blocks forever (`hang`, like a
stuck GPU: for drills of what a SIGTERM or a timeout does to a stage that never finishes). Read only
from the environment; does nothing when the variable is unset. `@rank` limits a fault to one rank of a
stage on several GPUs (torchrun's RANK; cyclej.runtime.distributed): `context:3:oom@1` fails rank 1 alone.

Points besides the stages' steps (cyclej.training.oom lists the out-of-memory paths): `rl-push:<step>` (the
weight push into the engine), `discriminator:<update>` (its training step), and the chunked no-grad passes of
`cyclej.training.oom.map_halving`, whose step is the chunk of the call: `<stage>-dev_loss`, `embedder`,
`discriminator-scores`, `perplexity`.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from cyclej.errors import BadInput

_fired: set[tuple[str, int, str]] = set()
KINDS = ("oom", "cublas", "error", "kill", "hang")
# What torch raises when cuBLAS cannot allocate its handle or workspace: not an OutOfMemoryError.
CUBLAS_ALLOC_FAILED = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"


class InjectedError(RuntimeError):
    """The `error` fault: stands for a bug or a lost connection."""


def parse(spec: str) -> list[tuple[str, int, str, int | None]]:
    """(point, step, kind, rank or None for every rank) per item."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        kind, _, on_rank = parts[-1].partition("@") if len(parts) == 3 else ("", "", "")
        if (
            len(parts) != 3
            or kind not in KINDS
            or not parts[1].isdigit()
            or (on_rank and not on_rank.isdigit())
        ):
            raise BadInput(f"CYCLEJ_FAULT: '{item}' is not <stage>:<step>:<{'|'.join(KINDS)}>[@rank]")
        faults.append((parts[0], int(parts[1]), kind, int(on_rank) if on_rank else None))
    return faults


def maybe_fault(stage: str, step: int) -> None:
    spec = os.environ.get("CYCLEJ_FAULT")
    if not spec:
        return
    rank = int(os.environ.get("RANK", "0"))
    for f_stage, f_step, kind, f_rank in parse(spec):
        if f_stage != stage or f_step != step or (f_rank is not None and f_rank != rank):
            continue
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:
                time.sleep(60)
        if (f_stage, f_step, kind) in _fired:
            continue
        _fired.add((f_stage, f_step, kind))
        if kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by CYCLEJ_FAULT at {stage}:{step})")
        if kind == "cublas":
            raise RuntimeError(f"{CUBLAS_ALLOC_FAILED} (injected by CYCLEJ_FAULT at {stage}:{step})")
        raise InjectedError(f"injected error (CYCLEJ_FAULT at {stage}:{step})")
