"""Generation engines held by a stage beyond its own call, released before any other stage starts.

A vLLM engine takes `gpu_memory_utilization` of the GPU for as long as it lives. The paraphrase stage
keeps its engine between shards (loading a 7B model takes minutes), and an engine that is merely
unreferenced is freed whenever the garbage collector gets to its reference cycles, so a single-process
run would start `para_train` beside 85 % of the GPU still taken. Stages register what they hold here;
`cyclej.stages.run_stage` calls `release_all` before a stage runs, which shuts the engines down (the
backend's `close()`: engine shutdown, `del`, `gc`, CUDA cache), so no stage starts while another stage's
engine holds the device.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("cyclej")


@dataclass
class _Held:
    release: Callable[[], None]
    reusable: bool  # kept for the same stage's next call (paraphrase shards share one engine)


_HELD: dict[str, _Held] = {}


def hold(owner: str, release: Callable[[], None], reusable: bool = False) -> None:
    """`owner` (a stage name) holds an engine; `release()` frees it. A new hold by the same owner replaces
    the previous registration (the owner shuts its old engine down itself, before starting a new one)."""
    _HELD[owner] = _Held(release, reusable)


def held() -> list[str]:
    return list(_HELD)


def release_all(starting: str | None = None) -> list[str]:
    """Release every held engine before stage `starting` runs, except a reusable one of that same stage.
    Returns the owners released."""
    released = []
    for owner in list(_HELD):
        entry = _HELD[owner]
        if owner == starting and entry.reusable:
            continue
        del _HELD[owner]
        try:
            entry.release()
        except Exception as exc:  # a failed shutdown must not stop the next stage; its memory is the risk
            log.warning("releasing the %s engine failed: %s", owner, exc)
        released.append(owner)
    if released:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("released the generation engine(s) of %s before %s", ", ".join(released), starting or "exit")
    return released


def release(owner: str) -> None:
    """Release what `owner` holds now (a stage at its end)."""
    entry = _HELD.pop(owner, None)
    if entry is not None:
        entry.release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
