"""What every training loop shares: the trainer of the LoRA/context stages (cyclej.training.trainer) and RL
(cyclej.reinforcement.policy_gradient) both take their seeding, RNG state, LR schedule and checkpoint names
from here, so a resume restores the same things in both and a checkpoint is named the same way in both.

(The precision rule, which dtype to compute and to hold weights in, is cyclej.training.precision's:
generation, translation and the merge use it too, and they are not training.)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from typing import Any, Literal, cast

import numpy as np
import torch

# ---- checkpoint names -----------------------------------------------------------------------------------
CHECKPOINT_PREFIX = "step-"


class CheckpointClock:
    """When a long loop saves: every `every_steps` steps, or once `every_minutes` have passed since the last
    save, whichever comes first. Why both: the steps make checkpoints land on the same steps in every run
    (a resume is comparable), the minutes bound what a crash on a slow machine or a preempted pod loses."""

    def __init__(self, every_steps: int, every_minutes: float) -> None:
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60
        self.last_save = time.monotonic()

    def on_step(self, step: int) -> bool:
        """`step` is one of every `every_steps`."""
        return step % self.every_steps == 0

    def late(self) -> bool:
        """`every_minutes` have passed since the last save (or since the clock started)."""
        return time.monotonic() - self.last_save >= self.every_seconds

    def due(self, step: int) -> bool:
        return self.on_step(step) or self.late()

    def saved(self) -> None:
        self.last_save = time.monotonic()


def checkpoint_name(step: int) -> str:
    """`step-00000012`: zero-padded, so the store's sorted listing is also the order of the steps."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


# ---- seeding and RNG state ------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (CUDA's with torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG a loop may draw from, as tensors and plain values (torch.save/load weights_only)."""
    # The legacy (default) form: numpy's stubs type it as a tuple or a dict.
    name, keys, pos, has_gauss, cached = cast(
        "tuple[str, np.ndarray, int, int, float]", np.random.get_state()
    )
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` saved. RL checkpoints written before numpy was saved have no "numpy"
    entry: numpy's generator is then left as it is (RL did not restore it then either)."""
    random.setstate(state["python"])
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the LR schedule ------------------------------------------------------------------------------------
# One curve, linear warm-up then cosine to 0, but the two loops have always counted it slightly
# differently, and their results (and the artifacts cached under unchanged fingerprints) depend on it:
# - the trainer rounds the warm-up (`round(0.1 × 4)` = 0 warm-up steps for the tiny/demo context stage)
#   and its cosine counts the current step (the last step runs at LR 0);
# - RL rounds up (`ceil(0.1 × 4)` = 1 for the tiny preset) and its cosine counts the steps done before
#   the current one (the last step runs just above 0).
# Unifying them would change the context stage of the tiny and demo presets, or tiny's RL, under
# fingerprints that do not change: that needs a stage version bump, so it is not done here.
Rounding = Literal["round", "ceil"]


def warmup_steps(warmup_ratio: float, total_steps: int, rounding: Rounding) -> int:
    """How many of `total_steps` warm up: the ratio's share, rounded as the loop has always rounded it."""
    share = warmup_ratio * total_steps
    return round(share) if rounding == "round" else math.ceil(share)


def lr_factor(step: int, total_steps: int, warmup: int, decay_counts_current_step: bool = True) -> float:
    """The LR multiplier for optimizer step `step` (1-based): `step / warmup` while warming up, then
    cosine from 1 down to 0 over the remaining steps (see above for `decay_counts_current_step`)."""
    if step <= warmup:
        return step / warmup
    done = step if decay_counts_current_step else step - 1
    progress = (done - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, decay_counts_current_step: bool = True
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; LambdaLR passes the steps done so far, so step = done + 1."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: lr_factor(done + 1, total_steps, warmup, decay_counts_current_step)
    )
