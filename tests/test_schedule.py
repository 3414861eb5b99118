"""cyclej.training.schedule: the schedule, RNG state and checkpoint names both training loops share."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from cyclej.training.schedule import (
    checkpoint_name,
    lr_factor,
    rng_state,
    seed_all,
    set_rng_state,
    warmup_steps,
)


def _trainer_before(step: int, max_steps: int, warmup_ratio: float) -> float:
    """cyclej.training.trainer.lr_factor as it was before the schedule moved here (62c75c4)."""
    warmup = round(warmup_ratio * max_steps)
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _rl_before(done: int, total_steps: int, warmup_steps: int) -> float:
    """cyclej.reinforcement.policy_gradient.lr_lambda as it was before the schedule moved here (62c75c4)."""
    if done < warmup_steps:
        return (done + 1) / warmup_steps
    progress = (done - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@pytest.mark.parametrize("total", [1, 4, 6, 8, 20, 40, 60, 80, 120, 500])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25])
def test_both_loops_keep_their_schedules_to_the_bit(total: int, ratio: float) -> None:
    trainer_warmup = warmup_steps(ratio, total, "round")
    rl_warmup = warmup_steps(ratio, total, "ceil")
    assert rl_warmup == math.ceil(ratio * total)
    for step in range(1, total + 1):
        assert lr_factor(step, total, trainer_warmup) == _trainer_before(step, total, ratio)
        assert lr_factor(step, total, rl_warmup, decay_counts_current_step=False) == _rl_before(
            step - 1, total, rl_warmup
        )


def test_rng_state_round_trip_covers_python_numpy_and_torch() -> None:
    seed_all(7)
    saved = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_rng_state_without_numpy_restores_the_rest() -> None:
    """RL checkpoints written before numpy was saved have no "numpy" entry."""
    seed_all(3)
    saved = {k: v for k, v in rng_state().items() if k != "numpy"}
    first = (random.random(), float(torch.rand(1)))
    set_rng_state(saved)
    assert (random.random(), float(torch.rand(1))) == first


def test_checkpoint_names_sort_in_step_order() -> None:
    names = [checkpoint_name(s) for s in (2, 10, 100)]
    assert names == sorted(names) and names[0] == "step-00000002"


def test_checkpoint_clock_saves_every_n_steps_or_after_m_minutes() -> None:
    import time

    from cyclej.training.schedule import CheckpointClock

    slow = CheckpointClock(every_steps=4, every_minutes=60)
    assert [s for s in range(1, 13) if slow.due(s)] == [4, 8, 12]  # steps rule only: an hour never passes
    fast = CheckpointClock(every_steps=1000, every_minutes=0.05 / 60)  # 50 ms
    assert not fast.due(1)
    time.sleep(0.08)
    assert fast.late() and fast.due(2)  # minutes rule, off the step grid
    fast.saved()
    assert not fast.due(3)  # the clock restarts at each save
