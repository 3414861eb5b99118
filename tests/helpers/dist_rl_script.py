"""One RL run of a few steps for tests/test_fsdp.py, through the same RLTrainer on one process or on N
ranks; the test compares what the runs leave in OUT:

    python tests/helpers/dist_rl_script.py OUT …
    python -m torch.distributed.run --standalone --nproc-per-node N tests/helpers/dist_rl_script.py OUT …

OUT/rank<r>.json   every rank: its metrics log, micro-batch, a fingerprint of its discriminator's weights
                   and, at the start, whether the gathered full weights equalled the unsharded model's
OUT/policy/        rank 0: the final policy, saved with save_pretrained from `RLTrainer.final_policy`
OUT/ckpt/          with --save-at K: the trainer's checkpoint after step K (`save_state`)

--fault-rank R --fault-step S: an out-of-memory error injected (cyclej.runtime.faults,
CYCLEJ_FAULT=rl:S:oom) on rank R only, where the trainer's own injection point is (the first chunk's
forward).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch

import cyclej.reinforcement.policy_gradient as rl_module
from cyclej.config import RLConfig
from cyclej.models.catalog import resolve_model
from cyclej.models.loading import load_model, marker_token_ids
from cyclej.reinforcement.discriminator import Discriminator
from cyclej.reinforcement.policy_gradient import CycleDiscriminatorReward, RLTrainer, Rollouts
from cyclej.runtime.distributed import barrier, init_process_group, is_distributed, is_main, rank

MARKERS = ["<|A|>", "<|B|>"]
SOURCES = {
    "a": ["the food was cold", "terrible service", "never again", "the soup was bland"],
    "b": ["great food", "lovely staff", "best pasta in town", "we will come back"],
}
TARGET = set(range(3, 300))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="tiny-gptj")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--resume", type=Path, default=None)
    ap.add_argument("--fault-rank", type=int, default=-1)
    ap.add_argument("--fault-step", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        init_process_group(torch.device("cpu"))
    if args.fault_step:
        os.environ["CYCLEJ_FAULT"] = f"rl:{args.fault_step}:oom"
        if args.fault_rank >= 0 and rank() != args.fault_rank:
            # the other ranks: the injection point does nothing (the real one fires on the chosen rank)
            rl_module.maybe_fault = lambda stage, step: None  # type: ignore[assignment]

    if is_main():  # tiny models are built on first use into the shared cache: by one rank
        resolve_model(args.model)
        resolve_model("tiny-bert")
    barrier()
    policy, tok = load_model(args.model, markers=MARKERS)
    original = {k: v.clone() for k, v in policy.state_dict().items()}
    ida, idb = marker_token_ids(tok, MARKERS)
    cfg = RLConfig(
        steps=args.steps,
        prompts_per_step=4,
        rollouts=2,
        rollout_micro_batch=1,
        max_new_tokens=4,
        lr=1e-2,
        max_grad_norm=1.0,
        warmup_ratio=0.0,
        backend="transformers",
        precision="fp32",
        discriminator_batch=6,
    )
    # A real discriminator, updated every step (its reward weight 0: the policy's numbers do not depend on
    # its dropout masks, which differ between one process and a rank's share of its batch).
    disc = Discriminator("tiny-bert", SOURCES["a"], SOURCES["b"], lr=1e-3, batch_size=6, seed=0)
    cycle = CycleDiscriminatorReward({"rouge": 1.0}, None, None)

    def reward(ro: Rollouts) -> dict[str, list[float]]:
        share = [sum(t in TARGET for t in c) / max(1, len(c)) for c in ro.completion_ids]
        return {**cycle(ro), "target": share}

    trainer = RLTrainer(
        cfg,
        policy,
        tok,
        {"a": ida, "b": idb},
        SOURCES,
        reward,
        {"rouge": 1.0, "target": 1.0},
        discriminator=disc,
        back_translate=True,
    )
    gathered_equal = None
    if is_distributed():
        from cyclej.reinforcement.fsdp import full_state_dict

        full = full_state_dict(trainer.policy, cpu_offload=True)
        if is_main():
            gathered_equal = list(full) == list(original) and all(
                torch.equal(full[k], original[k]) for k in original
            )
    if args.resume is not None:
        trainer.load_state(args.resume)
    while trainer.step_done < cfg.steps:
        trainer.step()
        if trainer.step_done == args.save_at:
            trainer.save_state(args.out / "ckpt")
    digest = hashlib.sha256()
    for t in disc.model.state_dict().values():
        digest.update(t.detach().contiguous().numpy().tobytes())
    final = trainer.final_policy()
    if is_main():
        assert final is not None
        final.save_pretrained(args.out / "policy")
    report = {
        "metrics": [
            {k: v for k, v in m.items() if not k.startswith("seconds/")} for m in trainer.metrics_log
        ],
        "micro_rows": trainer.micro_rows,
        "disc_sha": digest.hexdigest(),
        "disc_updates": disc.updates,
        "gathered_equal": gathered_equal,
    }
    (args.out / f"rank{rank()}.json").write_text(json.dumps(report), encoding="utf-8")
    if is_distributed():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
