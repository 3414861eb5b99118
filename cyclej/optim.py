"""AdamW with fp32 master weights for full-weight updates of a bf16 model (the RL policy on a GPU).

Why: bf16 keeps 8 significant bits. A weight of ~0.02 has a spacing of ~1.2e-4 between representable
values, so an update smaller than half of that is rounded away: with AdamW directly on bf16 parameters an
update of 1e-5 leaves most weights unchanged and the card's RL steps (~1e-8 per weight) leave almost all of
them unchanged. Here the optimizer owns an fp32 copy of every parameter (the master) and fp32 moments; each
step updates the master in fp32 and writes it back, rounded, into the bf16 parameter the forward uses. The
small steps accumulate in the master until they move the bf16 value. Compute stays bf16.

Memory (bytes per parameter): bf16 weights 2 + bf16 gradients 2 on the device; fp32 master 4 + moments 8 on
`state_device` — the device itself, or the CPU (`offload`, ZeRO-Offload style: the GPU keeps 4 bytes per
parameter instead of 16). The update runs tensor by tensor (no `foreach`), so the only temporaries are one
tensor's gradient copy and denominator, never a parameter-sized set of them. `cyclej.plan` counts exactly
these bytes (`optimizer_bytes_per_param`).

The update is torch.optim.AdamW's single-tensor algorithm (decoupled weight decay, bias-corrected moments,
eps added after the square root), so on fp32 parameters it matches torch's AdamW to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

MASTER_KEY = "master"


def optimizer_bytes_per_param(weight_bytes: int, offload: bool) -> dict[str, float]:
    """Bytes per trainable parameter of gradients and MasterAdamW's state, by place: "device" (the GPU)
    and "host" (CPU RAM). The one accounting `cyclej plan` and the trainer share."""
    grads = float(weight_bytes)  # gradients in the parameters' dtype, on the device
    if offload:  # master (always a separate fp32 copy in RAM) + two fp32 moments
        return {"device": grads, "host": 12.0}
    master = 0.0 if weight_bytes == 4 else 4.0  # fp32 parameters are their own master
    return {"device": grads + master + 8.0, "host": 0.0}


class MasterAdamW(torch.optim.Optimizer):
    """AdamW whose state (fp32 master weights and moments) lives on `state_device` (None: beside each
    parameter). Works with LR schedulers like any torch optimizer; `state_dict()` holds the fp32 masters,
    so a resumed run continues from the exact fp32 weights, not their bf16 rounding."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_device: torch.device | str | None = None,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.state_device = torch.device(state_device) if state_device is not None else None
        self._done: set[int] = set()  # ids of the parameters the current step has already updated
        # Squared norms of the last step's change of the masters and of the masters before it (summed
        # tensor by tensor during the update: one tensor's copy at a time): `relative_update`.
        self._update_sq = 0.0
        self._param_sq = 0.0

    def _where(self, p: torch.Tensor) -> torch.device:
        return self.state_device or p.device

    def _own_master(self, p: torch.Tensor) -> bool:
        """An fp32 parameter on the state's device is its own master: no second copy."""
        return p.dtype == torch.float32 and self._where(p) == p.device

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        dev = self._where(p)
        st: dict[str, Any] = {
            "step": 0,
            "exp_avg": torch.zeros(p.shape, dtype=torch.float32, device=dev),
            "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32, device=dev),
        }
        if not self._own_master(p):
            st[MASTER_KEY] = p.detach().to(device=dev, dtype=torch.float32, copy=True)
        self.state[p] = st
        return st

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._done:  # a new step, not the rest of one cut short
            self._update_sq = self._param_sq = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                # A step cut short (out of memory) and called again finishes the tensors it had not reached.
                if p.grad is None or id(p) in self._done:
                    continue
                self._update(p, group)
                self._done.add(id(p))
        self._done.clear()
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        st = self.state.get(p) or self._init_state(p)
        master = st.get(MASTER_KEY, p)  # fp32 parameters beside their state are their own master
        exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
        assert p.grad is not None
        grad = p.grad.to(device=master.device, dtype=torch.float32)  # one tensor's fp32 gradient at a time
        st["step"] += 1
        step = st["step"]
        before = master.clone()
        master.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        master.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        self._param_sq += float(torch.linalg.vector_norm(before)) ** 2
        self._update_sq += float(torch.linalg.vector_norm(master - before)) ** 2
        if master is not p:
            p.copy_(master)  # rounded once into the compute dtype (to nearest even)

    @property
    def relative_update(self) -> float:
        """‖Δθ‖/‖θ‖ of the last step over every parameter it updated, measured on the fp32 masters (what
        accumulates; the bf16 copy the forward uses moves only when they cross a bf16 step)."""
        return math.sqrt(self._update_sq / self._param_sq) if self._param_sq > 0 else 0.0

    def set_masters(self, exact: Mapping[torch.Tensor, torch.Tensor]) -> None:
        """Start the masters of these parameters from exact fp32 values (e.g. the fp32 checkpoint the bf16
        parameters were rounded from) instead of from the parameters themselves."""
        for p, value in exact.items():
            if self._own_master(p):
                continue
            st = self.state.get(p) or self._init_state(p)
            st[MASTER_KEY] = value.to(device=self._where(p), dtype=torch.float32)

    def masters(self) -> dict[torch.Tensor, torch.Tensor]:
        """Parameter → its separate fp32 master (parameters that have been stepped and are not fp32)."""
        return {p: st[MASTER_KEY] for p, st in self.state.items() if MASTER_KEY in st}


    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts every float state tensor to its parameter's dtype and device, which would
        round the fp32 masters to bf16: the state is restored here as saved, in fp32 on the state device."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        params: list[torch.Tensor] = []
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                                 "optimizer's group")
            group.update({k: v for k, v in saved.items() if k != "params"})
            params += group["params"]
        flat_ids = [pid for saved in saved_groups for pid in saved["params"]]
        index = dict(zip(flat_ids, params, strict=True))
        self.state.clear()
        for pid, st in state_dict["state"].items():
            p = index[int(pid)]
            dev = self._where(p)
            self.state[p] = {
                k: (v.to(device=dev, dtype=torch.float32) if isinstance(v, torch.Tensor) else v) for k, v in st.items()
            }
            if MASTER_KEY in self.state[p]:
                with torch.no_grad():
                    p.copy_(self.state[p][MASTER_KEY])
        self._done.clear()


def fp32_with_masters(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """The model in fp32 holding the optimizer's fp32 masters, for saving: a bf16 copy would round away
    every update smaller than half a bf16 step. Parameters keep their identity (`Module.float` replaces
    `.data`), so the optimizer still knows them."""
    masters = optimizer.masters() if isinstance(optimizer, MasterAdamW) else {}
    model.float()
    with torch.no_grad():
        for p, master in masters.items():
            p.copy_(master)
    return model
