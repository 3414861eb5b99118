"""A stage on N GPUs: torchrun launches N copies of it, torch.distributed joins them.

World size 1 is the default and changes nothing: no process group, no subprocess, the same code path as
before this module existed. With `resources.gpus.<stage>` > 1 (or CYCLEJ_GPUS on a pod, which the RunPod
worker sets to the pod's gpu_count) `run_stage` keeps the stage's lease in its own process and runs the
stage under `python -m torch.distributed.run --standalone --nproc-per-node N -m cyclej.pipeline.rank_worker`:
every rank builds the same stage from the same config, joins the process group (NCCL on GPUs, gloo on
the CPU), and computes its share; rank 0 alone writes checkpoints, logs and the committed artifact.
When the launcher returns, the parent reads the committed artifact from the store like any other run.

Why a subprocess and not threads or in-process ranks: a CUDA context, an NCCL communicator and a vLLM
engine belong to one process each, and torchrun is the launcher the field's trainers (TRL, torchtune)
use, so a rank that dies ends the whole group (torchrun's elastic agent stops the others) and the stage
fails to be retried from its last checkpoint, as a single-process stage does.

The few collectives the stages need are here, so that the loops read as single-process code:
`any_rank` (the ranks agree on a flag: "someone ran out of memory"), `sum_tensors` (one all-reduce of
many small tensors, e.g. LoRA gradients, packed into one buffer), `gather_objects` (rank 0 collects
every rank's RNG state for a checkpoint), `broadcast_object`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cyclej.errors import BadInput, StageFailed

if TYPE_CHECKING:
    import torch

    from cyclej.config import PipelineConfig
    from cyclej.runtime.store import ArtifactRef, ArtifactStore

log = logging.getLogger("cyclej")

GPUS_ENV = "CYCLEJ_GPUS"
# Seconds a collective may wait for a missing rank before the group fails (torch's default is 10 min for
# NCCL, 30 min for gloo); tests set it to a few seconds so a hang fails fast.
TIMEOUT_ENV = "CYCLEJ_DIST_TIMEOUT"
# The stages that run on several GPUs: the training stages as one process group (their ranks share every
# step), paraphrase as N independent workers over its shards (one engine per GPU, no group: shard i goes to
# worker i mod N). data and merge are CPU work; eval runs on one GPU.
MULTI_GPU_STAGES = frozenset({"context", "paraphrase", "para_train", "domain_train", "rl"})
DATA_PARALLEL_STAGES = frozenset({"paraphrase"})


# ---- who am I ------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes checkpoints, logs and the artifact."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def gpus_for(cfg: PipelineConfig, stage: str) -> int:
    """How many GPUs (ranks) `stage` runs on: CYCLEJ_GPUS when set (the pod's GPU count, for every stage
    that can use several), else `resources.gpus.<stage>`, else 1."""
    env = os.environ.get(GPUS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise BadInput(f"{GPUS_ENV}={env!r}: give the number of GPUs, 1 or more")
        n = int(env) if stage in MULTI_GPU_STAGES else 1
    else:
        n = cfg.resources.gpus.get(stage, 1)
    if (
        stage == "paraphrase"
        and cfg.paraphrase.backend == "vllm"
        and cfg.paraphrase.vllm.tensor_parallel_size > 1
    ):
        return 1  # one engine over tensor_parallel_size GPUs already; its workers would each want them all
    if n > 1 and stage not in MULTI_GPU_STAGES:
        raise BadInput(
            f"resources.gpus.{stage}: {n}, but {stage} runs on one device "
            f"(several GPUs: {', '.join(sorted(MULTI_GPU_STAGES))})"
        )
    return n


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))


def init_process_group(device: torch.device) -> None:
    """Join the group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment): NCCL when
    the stage computes on CUDA, gloo on the CPU. Each rank takes GPU LOCAL_RANK."""
    import torch
    import torch.distributed as dist

    if is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timeout())


def pin_worker_gpu() -> None:
    """A data-parallel worker (no process group) sees only GPU LOCAL_RANK, as GPU 0: set before CUDA
    starts in this process, and inherited by an engine process it starts (vLLM)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(_device_count())]
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[local_rank() % len(gpus)]


def _device_count() -> int:
    """GPUs on this machine without starting CUDA in this process (nvidia-smi), 0 without a driver."""
    import shutil

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: GPU LOCAL_RANK in a group on CUDA, the device itself otherwise."""
    import torch

    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return device


# ---- collectives the loops use ---------------------------------------------------------------------------


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when `flag` is true on any (one all-reduce of one number)."""
    if not is_distributed():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_tensors(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> list[torch.Tensor]:
    """The element-wise sum over ranks of each tensor, in one all-reduce: the tensors are packed into one
    fp32 buffer (LoRA gradients are many small tensors; one call instead of hundreds) and unpacked into
    new tensors of their own shapes and dtypes."""
    if not is_distributed():
        return list(tensors)
    import torch
    import torch.distributed as dist

    where = _collective_device(device)
    flat = torch.cat([t.detach().reshape(-1).to(where, torch.float32) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, start = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[start : start + n].view(t.shape).to(t.device, t.dtype))
        start += n
    return out


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (pickled; for small state such as RNG states)."""
    if not is_distributed():
        return [obj]
    import io

    import torch
    import torch.distributed as dist

    # Through torch.save's bytes: all_gather_object's own pickling of tensors (an RNG state is a
    # ByteTensor) fails to load in torch 2.13 ("UntypedStorage has no attribute dtype").
    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=False) for b in out]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def _collective_device(device: torch.device | None) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu") if device is None or device.type != "cpu" else device


# ---- the launcher ----------------------------------------------------------------------------------------


def launch_stage(
    stage: str,
    cfg: PipelineConfig,
    inputs: dict[str, ArtifactRef],
    store: ArtifactStore,
    nproc: int,
    resume_point: Callable[[], str | None] = lambda: None,
) -> None:
    """Run `stage` on `nproc` ranks under torchrun, in a child process; returns when rank 0 has committed.
    A failed rank fails the stage: StageFailed naming the exit code and the checkpoint a retry resumes from
    (`resume_point()`, asked once the ranks are gone); the rank's own error is on stderr above it."""
    spec = {
        "stage": stage,
        # The store travels as its root and options (credentials included), not through cfg.storage.
        "config": cfg.model_dump(mode="json"),
        "inputs": {k: json.loads(v.to_json()) for k, v in inputs.items()},
        "store": {
            "root": _store_root(store),
            "storage_options": store.storage_options,
            "cache_dir": str(store.cache_dir),
        },
    }
    # The spec may hold storage credentials: a file only this user reads, gone when the launch ends.
    with tempfile.TemporaryDirectory(prefix="cyclej-launch-") as tmp:
        path = Path(tmp) / "stage.json"
        path.touch(mode=0o600)
        path.write_text(json.dumps(spec), encoding="utf-8")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            "-m",
            "cyclej.pipeline.rank_worker",
            str(path),
        ]
        log.info("%s: %d ranks under torchrun", stage, nproc)
        # OMP threads per rank: torchrun would set 1 and warn; the cores are shared between the ranks.
        env = {
            **os.environ,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
        }
        env.pop(GPUS_ENV, None)  # the ranks run the stage itself, not another launch
        done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise StageFailed(
            stage,
            f"a rank of the {nproc}-rank run exited with code {done.returncode} (its error is above)",
            resume_point(),
        )


def _store_root(store: ArtifactStore) -> str:
    return store.root if store.is_local else f"{store.protocol}://{store.root}"
