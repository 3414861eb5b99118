"""AdamW with fp32 master weights for full-weight updates of a bf16 model (the RL policy on a GPU).

Why: bf16 keeps 8 significant bits. A weight of ~0.02 has a spacing of ~1.2e-4 between representable
values, so an update smaller than half of that is rounded away: with AdamW directly on bf16 parameters an
update of 1e-5 leaves most weights unchanged and the card's RL steps (~1e-8 per weight) leave almost all of
them unchanged. Here the optimizer owns an fp32 copy of every parameter (the master) and fp32 moments; each
step updates the master in fp32 and writes it back, rounded, into the bf16 parameter the forward uses. The
small steps accumulate in the master until they move the bf16 value. Compute stays bf16.

Memory (bytes per parameter): bf16 weights 2 + bf16 gradients 2 on the device; fp32 master 4 + moments 8 on
`state_device` — the device itself, or the CPU (`offload`, ZeRO-Offload style: the GPU keeps 4 bytes per
parameter instead of 16). `cyclej.pipeline.sizing` counts exactly these bytes (`optimizer_bytes_per_param`).

The update runs in chunks of at most `chunk_numel` elements (large tensors are cut into pieces, small ones
grouped): the only temporaries are three chunk-sized fp32 buffers (gradients in fp32, the denominator,
the masters before the update for ‖Δθ‖), never a parameter-sized set of them. Where the state lives:
- beside the parameters (no offload, or a CPU run): updated in place, chunk by chunk (on a CPU, the
  chunk-sized scratch is reused from chunk to chunk instead of fresh tensor-sized temporaries per tensor).
- offloaded from a GPU (`state_device="cpu"`, parameters on CUDA): the state is in pinned host memory and
  streamed through the GPU — each chunk's masters and moments are copied in on one side stream, updated
  on the GPU (where the bf16 gradients and weights already are: nothing else crosses the bus), and copied
  back on another, so copies in, update and copies out of consecutive chunks overlap. That moves 24 bytes
  per parameter over PCIe (12 each way, full duplex) and needs no CPU threads: for GPT-J-6B ~3 s at
  25 GB/s, where the update on a pod's few vCPUs, DRAM-bound at ~30 bytes a parameter per step at best,
  would take several times that (and the previous tensor-by-tensor CPU update, with a clone and fresh
  parameter-sized temporaries per tensor, 10–30 s). Two sets of three `GPU_CHUNK` buffers live on the GPU
  during the step (`device_workspace_bytes`).

The math is torch.optim.AdamW's single-tensor algorithm (decoupled weight decay, bias-corrected moments,
eps added after the square root), the same ops on pieces of the tensors: elementwise, so on fp32
parameters it matches torch's AdamW to the last bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch

MASTER_KEY = "master"
MOMENTS = ("exp_avg", "exp_avg_sq")
# Elements per chunk. CPU: 1 Mi (4 MiB per fp32 buffer): few enough chunks for the per-op overhead to be
# small, small enough to stay near the cache (`bench/optim_step.py --chunk` compares sizes). GPU: 8 Mi
# (32 MiB per buffer), copies long enough for full PCIe speed.
CPU_CHUNK = 1 << 20
GPU_CHUNK = 1 << 23
log = logging.getLogger("cyclej.training.optim")


def optimizer_bytes_per_param(weight_bytes: int, offload: bool) -> dict[str, float]:
    """Bytes per trainable parameter of gradients and MasterAdamW's state, by place: "device" (the GPU)
    and "host" (CPU RAM). The one accounting `cyclej plan` and the trainer share."""
    grads = float(weight_bytes)  # gradients in the parameters' dtype, on the device
    if offload:  # master (always a separate fp32 copy in RAM) + two fp32 moments
        return {"device": grads, "host": 12.0}
    master = 0.0 if weight_bytes == 4 else 4.0  # fp32 parameters are their own master
    return {"device": grads + master + 8.0, "host": 0.0}


def device_workspace_bytes(offload: bool, chunk_numel: int = GPU_CHUNK) -> int:
    """GPU bytes a step holds besides the state itself: three fp32 scratch buffers of a chunk, plus, with
    the state offloaded, two sets of master + two moments being streamed (~288 MiB at GPU_CHUNK)."""
    return 4 * chunk_numel * (3 + (6 if offload else 0))


class _Piece(NamedTuple):
    """Elements [start, end) of a parameter (flattened): the unit of the update and of `_done`."""

    p: torch.Tensor
    start: int
    end: int

    @property
    def key(self) -> tuple[int, int]:
        return (id(self.p), self.start)

    @property
    def numel(self) -> int:
        return self.end - self.start


def _flat(t: torch.Tensor, piece: _Piece) -> torch.Tensor:
    return t.view(-1)[piece.start : piece.end]


class MasterAdamW(torch.optim.Optimizer):
    """AdamW whose state (fp32 master weights and moments) lives on `state_device` (None: beside each
    parameter). Works with LR schedulers like any torch optimizer; `state_dict()` holds the fp32 masters,
    so a resumed run continues from the exact fp32 weights, not their bf16 rounding. `chunk_numel` (None:
    CPU_CHUNK or GPU_CHUNK by where the update runs) bounds the step's temporaries."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_device: torch.device | str | None = None,
        chunk_numel: int | None = None,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.state_device = torch.device(state_device) if state_device is not None else None
        if chunk_numel is not None and chunk_numel < 1:
            raise ValueError(f"chunk_numel must be positive, got {chunk_numel}")
        self.chunk_numel = chunk_numel
        # Pieces (parameter id, first element) the current step has already updated: a step cut short (out of
        # memory) and called again finishes the rest, none twice.
        self._done: set[tuple[int, int]] = set()
        # Squared norms of the last step's change of the masters and of the masters before it (summed chunk
        # by chunk during the update): `relative_update`.
        self._update_sq = 0.0
        self._param_sq = 0.0
        self._pending: list[
            torch.Tensor
        ] = []  # per chunk of this call: (‖θ‖², ‖Δθ‖²), on the update's device

    # ---- where things live -----------------------------------------------------------------------------
    def _where(self, p: torch.Tensor) -> torch.device:
        return self.state_device or p.device

    def _own_master(self, p: torch.Tensor) -> bool:
        """An fp32 parameter on the state's device is its own master: no second copy."""
        return p.dtype == torch.float32 and self._where(p) == p.device

    def _streamed(self, p: torch.Tensor) -> bool:
        """State in host RAM for a parameter on a GPU: updated on the GPU, the state streamed through it."""
        return p.device.type == "cuda" and self._where(p).type == "cpu"

    def _chunk(self, p: torch.Tensor) -> int:
        return self.chunk_numel or (GPU_CHUNK if p.device.type == "cuda" else CPU_CHUNK)

    def _zeros(self, p: torch.Tensor) -> torch.Tensor:
        """An fp32 state tensor for `p`: pinned host memory when streamed (asynchronous copies need it;
        torch rounds each pinned block up to a power of two: GPT-J's tensors are powers of two but the
        embedding and head, ~2 % of its state more)."""
        if self._streamed(p):
            try:
                return torch.zeros(p.shape, dtype=torch.float32, pin_memory=True)
            except RuntimeError as exc:  # pinning refused (locked-memory limits): correct, only slower copies
                log.warning("optimizer state not pinned (%s): host<->GPU copies will be slower", exc)
        return torch.zeros(p.shape, dtype=torch.float32, device=self._where(p))

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        if not p.is_contiguous():
            raise ValueError(f"MasterAdamW updates contiguous parameters only (got strides {p.stride()})")
        st: dict[str, Any] = {"step": 0, **{k: self._zeros(p) for k in MOMENTS}}
        if not self._own_master(p):
            st[MASTER_KEY] = self._zeros(p)
            st[MASTER_KEY].copy_(p.detach())
        self.state[p] = st
        return st

    # ---- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._done:  # a new step, not the rest of one cut short
            self._update_sq = self._param_sq = 0.0
        try:
            for group in self.param_groups:
                # Chunks never span groups (one lr, betas, eps, weight decay per chunk) nor places.
                by_place: dict[tuple[torch.device, torch.device], list[torch.Tensor]] = {}
                for p in group["params"]:
                    if p.grad is not None:
                        if p not in self.state:
                            self._init_state(p)
                        by_place.setdefault((p.device, self._where(p)), []).append(p)
                for params in by_place.values():
                    chunks = self._chunks(params)
                    if chunks and self._streamed(params[0]):
                        self._step_streamed(chunks, group)
                    elif chunks:
                        self._step_in_place(chunks, group)
        finally:  # the chunks done so far count, also when an OOM cuts the step short
            for sums in self._pending:
                param_sq, update_sq = sums.tolist()
                self._param_sq += param_sq
                self._update_sq += update_sq
            self._pending.clear()
        self._done.clear()
        return loss

    def _chunks(self, params: list[torch.Tensor]) -> list[list[_Piece]]:
        """The pieces not updated yet, grouped into chunks of at most `_chunk` elements. A piece's bounds
        depend only on its parameter's size, so a re-entered step finds the same pieces."""
        chunks: list[list[_Piece]] = []
        room = 0
        for p in params:
            n, size = p.numel(), self._chunk(p)
            for start in range(0, n, size):
                piece = _Piece(p, start, min(n, start + size))
                if piece.key in self._done:
                    continue
                if piece.numel > room:
                    chunks.append([])
                    room = size
                chunks[-1].append(piece)
                room -= piece.numel
        return chunks

    def _step_in_place(self, chunks: list[list[_Piece]], group: dict[str, Any]) -> None:
        """State beside the update (the parameters' device, or the state device for a CPU run)."""
        first = chunks[0][0].p
        dev = self._where(first)
        scratch = torch.empty(3, self._chunk(first), dtype=torch.float32, device=dev)
        for pieces in chunks:
            st = [self.state[pc.p] for pc in pieces]
            masters = [_flat(s.get(MASTER_KEY, pc.p), pc) for s, pc in zip(st, pieces, strict=True)]
            moments = [[_flat(s[k], pc) for s, pc in zip(st, pieces, strict=True)] for k in MOMENTS]
            self._update_chunk(pieces, group, masters, moments[0], moments[1], scratch)

    def _step_streamed(self, chunks: list[list[_Piece]], group: dict[str, Any]) -> None:
        """State in pinned host memory, update on the GPU: chunk i+1 is copied in (stream `h2d`) while chunk
        i is updated (the current stream, where the gradients were made) and chunk i-1 copied out (`d2h`).
        Two buffer sets alternate; a set is refilled only after its previous chunk has been copied out."""
        dev = chunks[0][0].p.device
        size = self._chunk(chunks[0][0].p)
        compute, h2d, d2h = torch.cuda.current_stream(dev), torch.cuda.Stream(dev), torch.cuda.Stream(dev)
        scratch = torch.empty(3, size, dtype=torch.float32, device=dev)
        buffers = [torch.empty(3, size, dtype=torch.float32, device=dev) for _ in range(2)]
        copied_out: list[torch.cuda.Event | None] = [None, None]
        try:
            for i, pieces in enumerate(chunks):
                buf = buffers[i % 2]
                host = [[_flat(self.state[pc.p][k], pc) for pc in pieces] for k in (MASTER_KEY, *MOMENTS)]
                offsets = [0]
                for pc in pieces:
                    offsets.append(offsets[-1] + pc.numel)
                on_gpu = [[buf[k, a:b] for a, b in zip(offsets, offsets[1:], strict=False)] for k in range(3)]
                with torch.cuda.stream(h2d):
                    done = copied_out[i % 2]
                    if done is not None:
                        h2d.wait_event(done)
                    for k in range(3):  # one contiguous range of the buffer per kind
                        for dst, src in zip(on_gpu[k], host[k], strict=True):
                            dst.copy_(src, non_blocking=True)
                    loaded = h2d.record_event()
                compute.wait_event(loaded)
                self._update_chunk(pieces, group, on_gpu[0], on_gpu[1], on_gpu[2], scratch)
                updated = compute.record_event()
                with torch.cuda.stream(d2h):
                    d2h.wait_event(updated)
                    for k in range(3):
                        for dst, src in zip(host[k], on_gpu[k], strict=True):
                            dst.copy_(src, non_blocking=True)
                    copied_out[i % 2] = d2h.record_event()
        finally:  # also on an OOM: what was issued lands in host memory before the buffers are freed
            for stream in (compute, h2d, d2h):
                stream.synchronize()

    def _update_chunk(
        self,
        pieces: list[_Piece],
        group: dict[str, Any],
        masters: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        scratch: torch.Tensor,
    ) -> None:
        """One chunk of AdamW on same-device fp32 views: torch's single-tensor algorithm, op for op, piece by
        piece (`torch._foreach_*` would launch fewer kernels for many small pieces, but on a CPU its
        fallback runs each in-place op out of place plus a copy: a third more memory traffic). Writes the new
        masters into separate-master parameters and marks the pieces done."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        sums = []
        offset = 0
        for pc, master, exp_avg, exp_avg_sq in zip(pieces, masters, exp_avgs, exp_avg_sqs, strict=True):
            g_buf, denom, before = (scratch[k, offset : offset + pc.numel] for k in range(3))
            offset += pc.numel
            assert pc.p.grad is not None
            grad = _flat(pc.p.grad, pc)
            if grad.dtype != torch.float32 or grad.device != master.device:
                grad = g_buf.copy_(grad)  # bf16 -> fp32 is exact
            # The step number this piece's parameter reaches now (a parameter cut into pieces counts once).
            step = self.state[pc.p]["step"] + (0 if (id(pc.p), 0) in self._done else 1)
            before.copy_(master)
            if wd != 0:
                master.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            torch.sqrt(exp_avg_sq, out=denom).div_(bias_correction2_sqrt).add_(eps)
            master.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
            norm_before = torch.linalg.vector_norm(before)
            norm_delta = torch.linalg.vector_norm(before.sub_(master))
            sums.append(torch.stack([norm_before, norm_delta]))
            if MASTER_KEY in self.state[pc.p]:  # rounded once into the compute dtype (to nearest even)
                _flat(pc.p, pc).copy_(master)
        # Kept as tensors until the step ends: reading them here would wait for the GPU chunk by chunk.
        self._pending.append(torch.stack(sums).double().square().sum(dim=0))
        for pc in pieces:
            if pc.start == 0:
                self.state[pc.p]["step"] += 1
            self._done.add(pc.key)

    @property
    def relative_update(self) -> float:
        """‖Δθ‖/‖θ‖ of the last step over every parameter it updated, measured on the fp32 masters (what
        accumulates; the bf16 copy the forward uses moves only when they cross a bf16 step)."""
        return math.sqrt(self._update_sq / self._param_sq) if self._param_sq > 0 else 0.0

    def set_masters(self, exact: Mapping[torch.Tensor, torch.Tensor]) -> None:
        """Start the masters of these parameters from exact fp32 values (e.g. the fp32 checkpoint the bf16
        parameters were rounded from) instead of from the parameters themselves. A dict is consumed (each
        value dropped once copied), so host memory never holds both copies of the model."""
        for p in list(exact):
            value = exact.pop(p) if isinstance(exact, dict) else exact[p]
            if self._own_master(p):
                continue
            st = self.state.get(p) or self._init_state(p)
            st[MASTER_KEY].copy_(value)
            del value

    def masters(self) -> dict[torch.Tensor, torch.Tensor]:
        """Parameter → its separate fp32 master (parameters that have been stepped and are not fp32)."""
        return {p: st[MASTER_KEY] for p, st in self.state.items() if MASTER_KEY in st}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts every float state tensor to its parameter's dtype and device, which would
        round the fp32 masters to bf16: the state is restored here as saved, in fp32 on the state device
        (pinned host memory when it is streamed to a GPU)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        params: list[torch.Tensor] = []
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of "
                    "optimizer's group"
                )
            group.update({k: v for k, v in saved.items() if k != "params"})
            params += group["params"]
        flat_ids = [pid for saved in saved_groups for pid in saved["params"]]
        index = dict(zip(flat_ids, params, strict=True))
        self.state.clear()
        for pid, st in state_dict["state"].items():
            p = index[int(pid)]
            restored: dict[str, Any] = {}
            for k, v in st.items():
                if not isinstance(v, torch.Tensor):
                    restored[k] = v
                elif self._streamed(p):
                    restored[k] = self._zeros(p)
                    restored[k].copy_(v)
                else:
                    restored[k] = v.to(device=self._where(p), dtype=torch.float32)
            self.state[p] = restored
            if MASTER_KEY in restored:
                with torch.no_grad():
                    p.copy_(restored[MASTER_KEY])
        self._done.clear()


def fp32_with_masters(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """The model in fp32 on the CPU holding the optimizer's fp32 masters, for the final save (a bf16 copy
    would round away every update smaller than half a bf16 step). It ends the optimizer: the AdamW moments
    are freed first, and each parameter then takes its master's tensor itself (no copy), so the host
    memory never exceeds what training already held. Peak for GPT-J-6B with the optimizer offloaded: the
    12 bytes per parameter of masters + moments (72.6 GB, as during training), falling to 4 (the fp32
    model, 24.2 GB) as the moments go; `model.float()` beside live masters and moments, as before, held
    16 bytes per parameter (96.9 GB). Parameters keep their identity (only `.data` changes)."""
    masters: dict[torch.Tensor, torch.Tensor] = {}
    if isinstance(optimizer, MasterAdamW):
        for p, st in optimizer.state.items():
            st.pop("exp_avg", None)
            st.pop("exp_avg_sq", None)
            if MASTER_KEY in st:
                masters[p] = st.pop(MASTER_KEY)
        optimizer.state.clear()
        # Freed pinned moments go back to torch's pinned-host cache, not to the OS: hand them back, so the
        # RAM falls as the docstring says (CUDA builds only; the CPU build has no such cache).
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
        if empty_host_cache is not None and torch.cuda.is_available():
            empty_host_cache()
    with torch.no_grad():
        for p in model.parameters():
            master = masters.pop(p, None)
            if master is not None:
                # the master's own storage becomes the parameter (the bf16 tensor is freed)
                p.data = master.to(device="cpu", dtype=torch.float32)
    return model.to("cpu").float()
