"""The RL policy on N ranks with FSDP2 (torch.distributed.fsdp.fully_shard): what `RLTrainer` does instead
of its single-process optimizer when a process group is up (cyclej.runtime.distributed.world_size() > 1).

- `shard_policy`: each decoder layer, then the root, sharded over the ranks. The parameters stay fp32:
  sharded, they ARE the master weights (12 + 4 bytes per parameter over W ranks, instead of MasterAdamW's
  bf16 weights + fp32 masters + moments on every rank). With bf16 precision on a GPU the forward and
  backward run on bf16 copies gathered per layer (`MixedPrecisionPolicy(param_dtype=bf16)`) and the
  gradients are reduced in fp32; in fp32 (CPU, tests) nothing is cast, so world size N matches 1 closely.
- Gradients are reduce-scattered as a SUM, not FSDP's default mean: every rank's loss is already divided by
  the whole step's completion-token count, so the sum of the ranks' gradients is world size 1's gradient.
- `full_state_dict` / `full_optimizer_tensors` / `load_full_training_state`: the full (unsharded) weights
  and AdamW state through torch.distributed.checkpoint.state_dict, in the single-process checkpoint format
  of cyclej.reinforcement.policy_gradient (`<index>/master|exp_avg|exp_avg_sq`,
  index = the parameter's place in `parameters()`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from cyclej.errors import BadInput
from cyclej.runtime.distributed import is_main

# The optimizer hyper-parameters a single-process checkpoint holds (MasterAdamW's, plus the scheduler's
# initial_lr); torch.optim.AdamW's other group keys (foreach, fused, …) are not saved,
# so the format stays one.
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "initial_lr")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks HF says must not be split across devices (`_no_split_modules`: GPTJBlock,
    LlamaDecoderLayer, …): the natural FSDP units, one all-gather per layer."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise BadInput(
            f"rl on several GPUs: {type(model).__name__} names no decoder layer class "
            "(_no_split_modules) to shard by"
        )
    return layers


def shard_policy(model: torch.nn.Module, bf16: bool) -> None:
    """Shard `model` in place: every decoder layer, then the root (embeddings, final norm, head)."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # Each FSDP module holds its own param groups: the root's setting would not reach the layers.
            m.set_gradient_divide_factor(1.0)
            # A plain SUM (no PREMUL_SUM, which gloo lacks; and NCCL's zero-copy path wants SUM).
            m.set_force_sum_reduction_for_comms(True)


def full_state_dict(model: torch.nn.Module, cpu_offload: bool) -> dict[str, torch.Tensor]:
    """The full weights by their single-process names. A collective: every rank calls it. With
    `cpu_offload` only rank 0 gets them (in RAM, one tensor gathered at a time); without, every rank does
    (on its device), e.g. to refresh its own rollout copy."""
    # torch types the values as any state-dict value; a model's full state dict holds tensors.
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))
    return cast("dict[str, torch.Tensor]", sd)


def full_optimizer_tensors(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What cyclej.reinforcement.policy_gradient's `_optimizer_tensors` returns for a single-process run,
    built from the full fp32 weights (the masters) and AdamW moments gathered to rank 0's RAM (empty on the
    other ranks). A collective."""
    weights = full_state_dict(model, cpu_offload=True)
    osd = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not is_main():
        return {}, {}
    names = [n for n, _ in model.named_parameters()]  # parameters() order, tied weights once
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, int] = {}
    for i, name in enumerate(names):
        st = cast("dict[str, dict[str, Any]]", osd["state"]).get(name)  # per-parameter state, by name
        if not st:
            tensors[f"{i}/param"] = weights[name]
            continue
        tensors[f"{i}/master"] = weights[name]  # the fp32 parameter is its own master
        tensors[f"{i}/exp_avg"] = st["exp_avg"]
        tensors[f"{i}/exp_avg_sq"] = st["exp_avg_sq"]
        steps[str(i)] = int(st["step"])
    groups = [
        {k: list(g[k]) if isinstance(g[k], tuple) else g[k] for k in GROUP_KEYS if k in g}
        for g in optimizer.param_groups
    ]
    return tensors, {"groups": groups, "steps": steps, "params": len(names)}


def load_full_training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, src: Path, meta: Mapping[str, Any]
) -> None:
    """Restore a single-process-format checkpoint into the sharded model and optimizer. Rank 0 alone reads
    the shards (RAM for one full copy, not one per rank) and broadcasts each tensor; every rank keeps its
    shard (`broadcast_from_rank0`). A collective."""
    names = [n for n, _ in model.named_parameters()]
    if int(meta["params"]) != len(names):
        raise BadInput(
            f"{src}: the checkpoint holds {meta['params']} parameters, the policy has {len(names)}"
        )
    steps = {int(i): n for i, n in meta["steps"].items()}
    weights: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    if is_main():
        for name, *keys in meta["shards"]:
            with safe_open(str(src / name), framework="pt", device="cpu") as f:
                for key in keys:
                    i_text, what = key.split("/")
                    fqn = names[int(i_text)]
                    if what in ("param", "master"):
                        weights[fqn] = f.get_tensor(key)
                    else:
                        st = state.setdefault(fqn, {"step": torch.tensor(float(steps[int(i_text)]))})
                        st[what] = f.get_tensor(key)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    # strict=False: a tied head (Llama) is one parameter under two names; the checkpoint names it once.
    set_model_state_dict(model, cast("dict[str, Any]", weights), options=options)
    for group, saved in zip(optimizer.param_groups, meta["groups"], strict=True):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
    if steps:
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
            for g in optimizer.param_groups
        ]
        set_optimizer_state_dict(
            model,
            optimizer,
            {"state": cast("dict[str, Any]", state), "param_groups": groups} if is_main() else {},
            options=options,
        )
