"""Seconds per step of MasterAdamW with the state offloaded (fp32 masters + moments in host RAM, bf16
weights and gradients where the model is): the tensor-by-tensor update it had before (kept below as the
baseline, `OldMasterAdamW`) vs the chunked one in `cyclej.training.optim`, on the same GPT-J-shaped
parameters and the same gradients, with the masters of both compared at the end.

    .venv/bin/python bench/optim_step.py --params 200e6 --threads 2  # CPU: weights on the CPU too
    python bench/optim_step.py --params 1e9                          # + the GPU section when CUDA is there

The CPU section runs everywhere (weights, gradients and state on the CPU). The GPU section runs only with
CUDA: weights and gradients on the GPU, state in host RAM, the baseline copying each gradient to the host,
updating it there and copying the weight back; ours streaming the state through the GPU.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cyclej.training.optim import CPU_CHUNK, GPU_CHUNK, MasterAdamW  # noqa: E402


class OldMasterAdamW(torch.optim.Optimizer):
    """The update as it was (cyclej/training/optim.py before issue 22): tensor by tensor, synchronous
    copies, a clone and two norms per tensor. Same math (torch's single-tensor AdamW)."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_device: str | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.state_device = torch.device(state_device) if state_device is not None else None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        dev = self.state_device or p.device
        st = self.state.get(p)
        if st is None:
            st = self.state[p] = {
                "step": 0,
                "exp_avg": torch.zeros(p.shape, dtype=torch.float32, device=dev),
                "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32, device=dev),
                "master": p.detach().to(device=dev, dtype=torch.float32, copy=True),
            }
        master, exp_avg, exp_avg_sq = st["master"], st["exp_avg"], st["exp_avg_sq"]
        grad = p.grad.to(device=master.device, dtype=torch.float32)
        st["step"] += 1
        step = st["step"]
        before = master.clone()
        master.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        master.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        float(torch.linalg.vector_norm(before))
        float(torch.linalg.vector_norm(master - before))
        p.copy_(master)


def gptj_shapes(n_params: float, width: int) -> list[tuple[int, ...]]:
    """GPT-J's tensors per layer at `width` (q, k, v, out, fc_in, fc_out + biases and a LayerNorm), layers
    until `n_params` is reached."""
    layer = [(width, width)] * 4 + [
        (4 * width, width),
        (4 * width,),
        (width, 4 * width),
        (width,),
        (width,),
        (width,),
    ]
    per_layer = sum(math.prod(s) for s in layer)
    return layer * max(1, round(n_params / per_layer))


def alternated_steps(
    opts: list[torch.optim.Optimizer],
    params: list[list[torch.nn.Parameter]],
    grads: list[torch.Tensor],
    repeats: int,
    sync: bool,
) -> list[list[float]]:
    """Seconds of each optimizer's steps, the optimizers taking turns (a shared machine's load then weighs
    on both alike). Each has its own copy of the parameters; the gradients are the same tensors."""
    times: list[list[float]] = [[] for _ in opts]
    for i in range(repeats + 1):  # the first step allocates the state: not timed
        for k, (opt, ps) in enumerate(zip(opts, params, strict=True)):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if sync:
                torch.cuda.synchronize()
            if i:
                times[k].append(time.perf_counter() - t0)
    return times


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}"


def section(name: str, device: str, shapes: list[tuple[int, ...]], repeats: int, chunk: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    start = [(torch.randn(s, generator=gen) * 0.02).to(device, torch.bfloat16) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device, torch.bfloat16) for s in shapes]
    params = [[torch.nn.Parameter(w.clone()) for w in start] for _ in range(2)]
    del start
    n = sum(g.numel() for g in grads)
    sync = device == "cuda"
    labels = ["old (tensor by tensor)", f"new (chunks of {chunk or (GPU_CHUNK if sync else CPU_CHUNK)})"]
    opts: list[torch.optim.Optimizer] = [
        OldMasterAdamW(params[0], lr=1e-4, betas=(0.9, 0.95), state_device="cpu"),
        MasterAdamW(params[1], lr=1e-4, betas=(0.9, 0.95), state_device="cpu", chunk_numel=chunk),
    ]
    times = alternated_steps(opts, params, grads, repeats, sync)
    diff = max(
        float((opts[0].state[p]["master"] - opts[1].state[q]["master"]).abs().max())
        for p, q in zip(*params, strict=True)
    )
    print(
        f"\n## {name}: {n / 1e6:.0f}M bf16 parameters in {len(shapes)} tensors, state in host RAM, "
        f"{repeats} steps each, alternated"
    )
    for label, ts in zip(labels, times, strict=True):
        med = statistics.median(ts)
        print(f"{label:28s} median {med:8.3f} s/step ({med / n * 1e9:6.2f} ns/param), best {min(ts):8.3f} s")
    old, new = (statistics.median(ts) for ts in times)
    best_old, best_new = (min(ts) for ts in times)
    print(
        f"speed-up: median {old / new:.2f}x, best {best_old / best_new:.2f}x; masters after {repeats + 1} "
        f"steps: max |old - new| = {diff:.3g}"
    )
    del opts, params
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=200e6, help="parameters of the model (default 200e6)")
    ap.add_argument("--width", type=int, default=1024, help="hidden size of the GPT-J-shaped tensors")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument(
        "--chunk", type=int, default=None, help="chunk_numel of ours (default: CPU_CHUNK / GPU_CHUNK)"
    )
    ap.add_argument("--no-cpu", action="store_true", help="only the GPU section")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = gptj_shapes(args.params, args.width)
    print(f"machine: {machine()}")
    if not args.no_cpu:
        section("CPU", "cpu", shapes, args.repeats, args.chunk)
    if torch.cuda.is_available():
        section("GPU (weights and gradients on the GPU)", "cuda", shapes, args.repeats, args.chunk)
    else:
        print("\n## GPU: skipped (no CUDA here)")


if __name__ == "__main__":
    main()
