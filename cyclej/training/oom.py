"""Out of memory on the GPU: one classifier, one way to give the memory back, one halving loop.

Every path that can run out of GPU memory (the trainer's step and dev loss, RL's rollouts, gradient pass
and weight push, the discriminator, the reward embedder) handles it the same way:

    failure = None
    try:
        ...
    except Exception as exc:
        failure = oom_message(exc)  # None: not an out-of-memory error, re-raised as it is
        if failure is None:
            raise
    release_memory()  # outside the except block
    ... halve / retry / skip / fail, with `failure` (a string) in the log line

Why outside: inside `except … as exc` the exception's traceback holds the frames of the call that failed,
and with them every tensor it had made (the failed micro-batch's activations, its autograd graph), so
`torch.cuda.empty_cache()` there frees none of them. Python deletes `exc` when the except block ends;
`release_memory` then collects reference cycles (a frame that refers to its own exception) and hands the
allocator's free blocks back to the driver (an in-process vLLM engine or cuBLAS allocates outside
PyTorch's cache). Keep the exception itself nowhere (no `raise … from exc` after the fact, no list of
errors): only its first line.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from cyclej.errors import CyclejError, first_line
from cyclej.runtime.faults import maybe_fault

log = logging.getLogger("cyclej")

T = TypeVar("T")
R = TypeVar("R")

# RuntimeErrors that are allocation failures (not a bug in the call): the caching allocator's message
# when it is not raised as torch.OutOfMemoryError (older paths, re-raised by a library), cudaMalloc failing
# outside the cache ("CUDA error: out of memory", e.g. a CUDA context or NCCL buffer), cuBLAS failing to
# allocate its handle or workspace ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling
# `cublasCreate(handle)`", which torch raises as a plain RuntimeError) and cuDNN's workspace. Not
# CUDNN_STATUS_NOT_SUPPORTED: it names an unsupported shape or layout, and a smaller batch can hide that
# bug but not fix it; nor "CUBLAS_STATUS_EXECUTION_FAILED" or illegal memory accesses, which leave the
# CUDA context broken (nothing after them in this process can be trusted).
OOM_MESSAGES = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)


class OutOfMemory(CyclejError):
    """Out of GPU memory with nothing left to halve: the message is one line naming the setting to lower."""


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is a failed GPU allocation, which a smaller batch or a retry can get past."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MESSAGES)


def oom_message(exc: BaseException) -> str | None:
    """The first line of an out-of-memory error (for the log and the failure message), or None when `exc`
    is not one. A string, so that nothing keeps the exception (and its traceback's tensors) alive."""
    if not is_oom(exc):
        return None
    return first_line(exc) or type(exc).__name__


def release_memory() -> None:
    """Collect garbage and return the allocator's cached blocks to the driver. Call it after leaving the
    except block (module docstring). Safe without a GPU (empty_cache does nothing then)."""
    gc.collect()
    torch.cuda.empty_cache()


def map_halving(
    fn: Callable[[Sequence[T]], R],
    items: Sequence[T],
    size: int,
    *,
    point: str,
    knob: str,
) -> list[R]:
    """`fn` over consecutive chunks of `items`, `size` items at a time; an out-of-memory error releases the
    memory, halves the size and redoes the chunk that failed (finished chunks are kept). For work whose
    result does not depend on the chunking (no-grad scoring: dev loss, perplexity, embeddings, the
    discriminator's probabilities). At one item per chunk an OOM raises `OutOfMemory`, one line naming
    `knob`. `point`: this place's name in the log and for fault injection (`CYCLEJ_FAULT=<point>:<n>:oom`
    fails the n-th chunk of a call, once per process)."""
    out: list[R] = []
    start, chunk_no = 0, 0
    size = max(1, size)
    while start < len(items):
        chunk = items[start : start + size]
        chunk_no += 1
        failure = None
        try:
            maybe_fault(point, chunk_no)
            out.append(fn(chunk))
        except Exception as exc:
            failure = oom_message(exc)
            if failure is None:
                raise
        if failure is None:
            start += len(chunk)
            continue
        release_memory()
        if size == 1:
            raise OutOfMemory(f"{point}: out of memory at one item per batch ({failure}); lower {knob}")
        log.warning(
            "%s: out of memory at batch %d (%s); batch → %d and that part again",
            point,
            size,
            failure,
            size // 2,
        )
        size //= 2
    return out


def abort_engine_requests(backend: Any) -> int:
    """After an out-of-memory error inside an in-process vLLM engine (cyclej.generation.backends.VllmBackend):
    abort the requests the failed `generate` left in the engine. Why: vLLM's `LLM.generate` runs the engine
    until *every* unfinished request is done and returns all of them sorted by request id, so a retried call
    would get the failed call's requests back as well as its own. Returns how many were aborted; 0 for a
    backend without an engine (transformers)."""
    engine = getattr(getattr(backend, "llm", None), "llm_engine", None)
    states = getattr(getattr(engine, "output_processor", None), "request_states", None)
    if engine is None or not states:
        return 0
    ids = list(states)
    engine.abort_request(ids, internal=True)  # request_states is keyed by vLLM's internal ids
    return len(ids)
