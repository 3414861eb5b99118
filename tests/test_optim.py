"""MasterAdamW: full-weight updates of bf16 parameters that are not rounded away (fp32 masters), the RL
trainer on them, an update cut short by out-of-memory, and resume from its state dict."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cyclej.config import RLConfig
from cyclej.reinforcement.policy_gradient import RLTrainer, Rollouts
from cyclej.training.optim import MasterAdamW, fp32_with_masters

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def gptj_like_weights(n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Weights ~N(0, 0.02): GPT-J's initializer range, the size of most of its trained weights."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02


def step_both(step: int, *sides: tuple[torch.nn.Module, torch.optim.Optimizer]) -> None:
    """One optimizer step of each (model, optimizer) on the same seeded batch and loss."""
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step))
    for model, opt in sides:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_fp32_parameters_step_exactly_like_torch_adamw() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(32, 16)
    b = copy.deepcopy(a)
    ours = MasterAdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    ref = torch.optim.AdamW(
        b.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, foreach=False
    )
    for step in range(5):
        step_both(step, (a, ours), (b, ref))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not ours.masters()  # fp32 parameters are their own master: no second copy


@pytest.mark.parametrize("state_device", [None, "cpu"])
def test_chunked_update_equals_torch_adamw_over_steps(state_device: str | None) -> None:
    """fp32 parameters, state beside them, chunks of 100 elements: the 32×16 weight is cut into pieces and the
    small tensors share chunks, two groups with their own lr and weight decay; every step bit-equal."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 3))
    b = copy.deepcopy(a)

    def groups(m: torch.nn.Module) -> list[dict]:
        return [{"params": m[0].parameters()}, {"params": m[1].parameters(), "lr": 3e-3, "weight_decay": 0.0}]

    ours = MasterAdamW(
        groups(a),
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-6,
        weight_decay=0.1,
        state_device=state_device,
        chunk_numel=100,
    )
    ref = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
    for step in range(6):
        step_both(step, (a, ours), (b, ref))
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), step
    assert not ours.masters()


def test_bf16_masters_equal_a_float64_reference_within_rounding() -> None:
    """bf16 parameters with fp32 masters, chunks of 700 (tensors cut and grouped), the same gradients fed to
    AdamW in float64: after 8 steps the masters are the float64 run to fp32 rounding, and every bf16
    parameter is its master rounded."""
    shapes = [(64, 48), (48,), (5, 64), (5,)]
    w0 = [gptj_like_weights(math.prod(s), seed=i).view(s).to(torch.bfloat16) for i, s in enumerate(shapes)]
    ps = [torch.nn.Parameter(w.clone()) for w in w0]
    qs = [torch.nn.Parameter(w.double()) for w in w0]
    ours = MasterAdamW(ps, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, chunk_numel=700)
    ref = torch.optim.AdamW(qs, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(8):
        for p, q in zip(ps, qs, strict=True):
            g = (torch.randn(p.shape, generator=gen) * 0.1).to(torch.bfloat16)
            p.grad, q.grad = g, g.double()
        ours.step()
        ref.step()
    for p, q in zip(ps, qs, strict=True):
        master = ours.masters()[p]
        assert master.dtype == torch.float32
        err = (master.double() - q.detach()).abs()
        # a few fp32 roundings of values ~0.02 + 8 steps of 1e-3 (fp32 eps 1.2e-7): ~1e-8 each, 8 steps
        assert err.max() < 1e-7, err.max()
        assert torch.equal(p.detach(), master.to(torch.bfloat16))


def test_step_temporaries_are_bounded_by_the_chunk() -> None:
    """A 1 Mi-element bf16 tensor, chunks of 16 Ki: no allocation during a step is larger than the three
    chunk-sized fp32 scratch buffers (the tensor-by-tensor update allocated a fp32 gradient copy, a clone
    and a denominator of the whole tensor: 4 MiB each)."""
    from torch.profiler import ProfilerActivity, profile

    chunk = 1 << 14
    p = torch.nn.Parameter(gptj_like_weights(1 << 20).to(torch.bfloat16))
    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    opt = MasterAdamW([p], lr=1e-3, state_device="cpu", chunk_numel=chunk)
    opt.step()  # the state's own allocation (the first step) is not a temporary
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= 3 * chunk * 4


def test_a_1e_8_step_is_kept_in_the_master_and_lost_by_plain_bf16_adamw() -> None:
    """The card's RL step (~1e-8 per weight): AdamW's first update is lr·sign(g)."""
    w0 = gptj_like_weights()
    grad = torch.where(torch.arange(w0.numel()) % 2 == 0, 1.0, -1.0)
    lr = 1e-8

    plain = torch.nn.Parameter(w0.to(torch.bfloat16))
    plain.grad = grad.to(torch.bfloat16)
    torch.optim.AdamW([plain], lr=lr, eps=1e-12, weight_decay=0.0).step()
    lost_plain = (plain.detach() == w0.to(torch.bfloat16)).float().mean().item()

    p = torch.nn.Parameter(w0.to(torch.bfloat16))
    p.grad = grad.to(torch.bfloat16)
    opt = MasterAdamW([p], lr=lr, eps=1e-12, weight_decay=0.0)
    opt.step()
    master = opt.masters()[p]
    moved = master - w0.to(torch.bfloat16).float()
    assert lost_plain > 0.99  # the old trainer: AdamW on bf16 parameters
    # Every weight moved the step's way, by the step to within fp32's own spacing (~2e-9 at 0.02).
    assert torch.equal(torch.sign(moved), -grad)
    spacing = torch.finfo(torch.float32).eps * w0.abs().clamp(min=1e-3)
    assert ((moved + lr * grad).abs() <= spacing).all()


def test_bf16_weights_track_an_fp32_reference_over_many_small_steps() -> None:
    """A regression on bf16 weights (bf16 forward) and the same in fp32: after 200 steps of 1e-5 the
    masters are within a few percent of the fp32 run's total movement; plain bf16 AdamW is not."""
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    target = torch.randn(64, 64)
    w0 = gptj_like_weights(128 * 64).view(64, 128)

    def run(kind: str) -> torch.Tensor:
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        w = torch.nn.Parameter(w0.to(dtype, copy=True))
        if kind == "master":
            opt: torch.optim.Optimizer = MasterAdamW([w], lr=1e-5, betas=(0.9, 0.95), eps=1e-6)
        else:
            opt = torch.optim.AdamW([w], lr=1e-5, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
        for _ in range(200):
            opt.zero_grad()
            ((x.to(dtype) @ w.T).float() - target).pow(2).mean().backward()
            opt.step()
        return opt.masters()[w] if kind == "master" else w.detach().float()

    ref, master, plain = run("fp32"), run("master"), run("plain")
    movement = (ref - w0).norm()
    assert (master - ref).norm() / movement < 0.05
    assert (plain - ref).norm() / movement > 0.3  # the old code: most of the movement rounded away


def test_state_dict_round_trip_keeps_the_fp32_masters() -> None:
    p = torch.nn.Parameter(gptj_like_weights().to(torch.bfloat16))
    opt = MasterAdamW([p], lr=1e-6)
    p.grad = torch.ones_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    master = opt.masters()[p].clone()

    q = torch.nn.Parameter(gptj_like_weights(seed=1).to(torch.bfloat16))  # a fresh process's parameter
    again = MasterAdamW([q], lr=1e-6)
    again.load_state_dict(saved)
    assert again.masters()[q].dtype == torch.float32  # torch's own loader would have cast it to bf16
    assert torch.equal(again.masters()[q], master)
    assert torch.equal(q, master.to(torch.bfloat16))
    q.grad = p.grad = torch.ones_like(p)
    opt.step()
    again.step()
    assert torch.equal(again.masters()[q], opt.masters()[p])


SOURCES = {"a": ["the food was cold", "never again"], "b": ["great food", "lovely staff"]}


def bf16_trainer(**over: object) -> tuple[RLTrainer, torch.nn.Module]:
    from cyclej.models.loading import load_model, marker_token_ids

    policy, tok = load_model("tiny-gptj", markers=["<|A|>", "<|B|>"], dtype=torch.bfloat16)
    ida, idb = marker_token_ids(tok, ["<|A|>", "<|B|>"])
    settings: dict = {
        "steps": 3,
        "prompts_per_step": 2,
        "rollouts": 2,
        "rollout_micro_batch": 2,
        "max_new_tokens": 3,
        "lr": 1e-8,
        "max_grad_norm": 1.0,
        "warmup_ratio": 0.0,
        "backend": "transformers",
        "precision": "bf16",
    }
    cfg = RLConfig(**{**settings, **over})

    def spread(ro: Rollouts) -> dict[str, list[float]]:
        return {"c": [float(i % 2) for i in range(len(ro))]}

    trainer = RLTrainer(
        cfg, policy, tok, {"a": ida, "b": idb}, SOURCES, spread, {"c": 1.0}, back_translate=False
    )
    return trainer, policy


def test_rl_trainer_on_bf16_weights_keeps_its_tiny_steps_and_saves_them_in_fp32() -> None:
    trainer, policy = bf16_trainer(optimizer_offload=True)
    assert isinstance(trainer.optimizer, MasterAdamW)
    before = {n: p.detach().float().clone() for n, p in policy.named_parameters()}
    trainer.step()
    names = {p: n for n, p in policy.named_parameters()}
    masters = trainer.optimizer.masters()
    assert all(m.dtype == torch.float32 and m.device.type == "cpu" for m in masters.values())
    moved = [(masters[p] != before[names[p]]).float().mean().item() for p in masters]
    changed = sum((p.detach().float() != before[n]).sum().item() for n, p in policy.named_parameters())
    total = sum(p.numel() for p in policy.parameters())
    assert changed / total < 0.05  # 1e-8 steps barely show in bf16 (only on weights near 0) …
    assert sum(moved) / len(moved) > 0.5  # … but the masters hold them
    saved = fp32_with_masters(policy, trainer.optimizer)
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    assert any(not torch.equal(p.detach(), before[n]) for n, p in saved.named_parameters())


def test_an_oom_inside_the_optimizer_step_is_retried_and_updates_each_piece_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunks of 500 elements: tensors are cut into pieces, so the OOM also falls inside a tensor."""
    trainer, policy = bf16_trainer()
    ref_trainer, _ = bf16_trainer(rollout_micro_batch=1)  # what the retry runs at
    trainer.optimizer.chunk_numel = ref_trainer.optimizer.chunk_numel = 500
    before = [p.detach().float().clone() for p in policy.parameters()]
    real_update = MasterAdamW._update_chunk
    calls = {"n": 0, "pieces": 0}
    done_before_oom: set[tuple[int, int]] = set()

    def flaky(self: MasterAdamW, pieces: list, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # two chunks updated, then the device runs out of memory
            done_before_oom.update(self._done)
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        calls["pieces"] += len(pieces)
        real_update(self, pieces, *args)

    monkeypatch.setattr(MasterAdamW, "_update_chunk", flaky)
    trainer.step()
    monkeypatch.setattr(MasterAdamW, "_update_chunk", real_update)
    ref_trainer.step()
    assert trainer.micro_batch == 1 and trainer.step_done == 1  # handled as an OOM: halved and re-run
    ours, ref = trainer.optimizer.masters(), ref_trainer.optimizer.masters()
    pieces = sum(-(-p.numel() // 500) for p in ours)
    assert len(ours) == len(ref) and calls["pieces"] == pieces  # each piece updated once
    assert 0 < len(done_before_oom) < pieces
    for i, ((p, m), r) in enumerate(zip(ours.items(), ref.values(), strict=True)):
        assert trainer.optimizer.state[p]["step"] == 1  # a tensor cut by the OOM still counts one step
        first_try = torch.zeros(p.numel(), dtype=torch.bool)
        for start in range(0, p.numel(), 500):
            if (id(p), start) in done_before_oom:
                first_try[start : start + 500] = True
        m, r, b = m.view(-1), r.view(-1), before[i].view(-1)
        # updated before the OOM (first attempt's gradient): one step of lr, not two
        assert ((m - b)[first_try].abs() <= 1.5e-8).all()
        # the retry's gradient, the same as an uninterrupted run at micro-batch 1
        assert torch.equal(m[~first_try], r[~first_try])
