"""The RL loop: advantages, loss mask, a policy that learns, the `rl` stage end to end, OOM and kill/resume.

Tiny random models (tiny-gptj policy, tiny-bert embedder and discriminator) on the shipped Yelp sample.
The `data` artifact comes from the real data stage; the `merge` artifact is built by hand (tiny GPT-J
with the markers, saved as `model/` and committed): the real one needs every stage before it, minutes
of CPU, and the rl stage only reads `model/` from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cyclej.config import PipelineConfig, RLConfig, load_config
from cyclej.errors import StageFailed
from cyclej.models.loading import load_model, marker_token_ids, save_model
from cyclej.pipeline.registry import StageRun, run_stage
from cyclej.reinforcement.policy_gradient import (
    RLTrainer,
    Rollouts,
    build_batch,
    completion_logits,
    group_advantages,
    policy_gradient_loss,
    shared_prompt_completion_logits,
    token_logprobs,
)
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore
from cyclej.stages.rl import run_rl
from cyclej.training.optim import fp32_with_masters
from cyclej.training.schedule import lr_factor, rng_state, set_rng_state
from tests.helpers.tiny_models import tiny_gptj, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

MARKERS = ["<|A|>", "<|B|>"]
REPO = Path(__file__).resolve().parents[1]


# ---- pure functions ------------------------------------------------------------------------------------
def test_group_advantages_normalize_within_each_group() -> None:
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    adv = group_advantages(rewards, group_size=4, mode="group")
    # group 1: mean 2.5, population std sqrt(1.25); group 2: all equal → nothing to learn.
    s = 1.25**0.5
    assert torch.allclose(adv[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / s, atol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))
    # Shifting or scaling one group does not change its advantages nor the other group's.
    shifted = group_advantages([11.0, 12.0, 13.0, 14.0, 0.0, 0.0, 0.0, 1.0], 4)
    assert torch.allclose(shifted[:4], adv[:4], atol=1e-5)
    assert shifted[7] > 0 > shifted[4]

    loo = group_advantages(rewards, group_size=4, mode="loo")
    # r_i − mean of the other three: 1 − (2+3+4)/3 = −2, …
    assert torch.allclose(loo[:4], torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0]), atol=1e-5)
    assert torch.equal(loo[4:], torch.zeros(4))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, group_size=3)


def test_completion_mask_covers_exactly_the_completion_tokens() -> None:
    input_ids, attn, pos, comp = build_batch([[7, 8, 9], [7]], [[1, 2], [3, 4, 5]], pad_id=0)
    # Prompts left-padded to width 3, completions right-padded to width 3: completions start at column 3.
    assert input_ids.tolist() == [[7, 8, 9, 1, 2, 0], [0, 0, 7, 3, 4, 5]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert pos.tolist()[1][2:] == [0, 1, 2, 3]  # a left-padded row still starts at position 0
    assert comp.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_completion_logits_match_an_unpadded_forward() -> None:
    policy, _, _ = tiny_policy()
    input_ids, attn, pos, comp = build_batch([[5, 6, 7, 8], [9]], [[1, 2], [3, 4, 10]], pad_id=0)
    logprobs = token_logprobs(
        completion_logits(policy, input_ids, attn, pos, comp.shape[1]), input_ids[:, -3:]
    )
    with torch.no_grad():
        alone = policy(input_ids=torch.tensor([[9, 3, 4, 10]])).logits  # row 1 without padding
    expected = torch.log_softmax(alone[0, :-1], -1).gather(-1, torch.tensor([[3], [4], [10]])).squeeze(-1)
    assert torch.allclose(logprobs[1], expected, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gptj], ids=["llama", "gptj"])
def test_each_prompt_run_once_gives_the_padded_batchs_loss_and_gradient(build) -> None:  # type: ignore[no-untyped-def]
    """Two groups of three rollouts (prompts of different lengths, completions of 1-4 tokens): the
    gradient pass that runs each distinct prompt once gives the padded batch's log-probs and gradient,
    and runs the model on 2 prompt rows, not 6."""
    model = build()
    prompts = [[5, 6, 7, 8]] * 3 + [[9, 11]] * 3
    completions = [[1, 2], [3, 4, 10, 12], [13], [3, 4, 5], [14, 15], [16]]
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.7, -1.0])
    n_tokens = sum(len(c) for c in completions)

    def loss_and_grads(shared: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if shared:
            logits, targets, comp = shared_prompt_completion_logits(model, prompts, completions, pad_id=0)
        else:
            input_ids, attn, pos, comp = build_batch(prompts, completions, pad_id=0)
            logits = completion_logits(model, input_ids, attn, pos, comp.shape[1])
            targets = input_ids[:, -comp.shape[1] :]
        logprobs = token_logprobs(logits, targets)
        loss, _ = policy_gradient_loss(logprobs, comp, advantages, n_tokens)
        loss.backward()
        return (logprobs * comp).detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    padded_lp, padded_grads = loss_and_grads(shared=False)
    batch_sizes: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: batch_sizes.append(o.shape[0]))
    shared_lp, shared_grads = loss_and_grads(shared=True)
    hook.remove()
    assert batch_sizes == [2, 6]  # the prompts once each, then the completions on their copied cache
    assert torch.allclose(shared_lp, padded_lp, atol=1e-5)
    assert len(shared_grads) == len(padded_grads) > 0
    for a, b in zip(shared_grads, padded_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_loss_is_advantage_weighted_logprob_of_completion_tokens_only() -> None:
    torch.manual_seed(0)
    _, _, _, comp = build_batch([[5, 6, 7], [5, 6]], [[1, 2], [3]], pad_id=0)
    targets = torch.tensor([[1, 2], [3, 0]])
    logits = torch.randn(2, 2, 10, requires_grad=True)
    logprobs = token_logprobs(logits, targets)
    advantages = torch.tensor([2.0, -1.0])
    loss, stats = policy_gradient_loss(logprobs, comp, advantages, n_tokens=3)

    lp = torch.log_softmax(logits.detach(), -1)
    expected = -(2.0 * (lp[0, 0, 1] + lp[0, 1, 2]) - 1.0 * lp[1, 0, 3]) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["pg_loss"] == pytest.approx(expected.item(), rel=1e-5)

    loss.backward()
    grad = logits.grad.abs().sum(-1)  # [2, 2]
    # The padding column of row 1 gets no gradient; every completion token does.
    assert (grad[0] > 0).all() and grad[1, 0] > 0 and grad[1, 1] == 0


def test_kl_term_is_zero_at_the_reference_and_positive_away_from_it() -> None:
    comp = torch.ones(1, 2, dtype=torch.long)
    lp = token_logprobs(torch.randn(1, 2, 10), torch.tensor([[1, 2]]))
    _, at_ref = policy_gradient_loss(lp, comp, torch.zeros(1), 2, ref_logprobs=lp, kl_coef=0.1)
    _, away = policy_gradient_loss(lp, comp, torch.zeros(1), 2, ref_logprobs=lp - 0.5, kl_coef=0.1)
    assert at_ref["kl"] == pytest.approx(0.0, abs=1e-7)
    assert away["kl"] > 0.05


def test_lr_warms_up_then_decays_to_zero() -> None:
    def f(
        done: int,
    ) -> float:  # RL's count of the schedule (cyclej.training.schedule), by optimizer steps done
        return lr_factor(done + 1, 10, 2, decay_counts_current_step=False)

    values = [f(i) for i in range(10)]
    assert values[0] == 0.5 and values[1] == 1.0
    assert all(a >= b for a, b in zip(values[1:], values[2:], strict=False))
    assert f(10) == pytest.approx(0.0, abs=1e-12)


# ---- a policy that learns --------------------------------------------------------------------------------
SOURCES = {
    "a": ["the food was cold", "terrible service", "never again", "the soup was bland"],
    "b": ["great food", "lovely staff", "best pasta in town", "we will come back"],
}


def tiny_policy() -> tuple[torch.nn.Module, object, dict[str, int]]:
    policy, tok = load_model("tiny-gptj", markers=MARKERS)
    ida, idb = marker_token_ids(tok, MARKERS)
    return policy, tok, {"a": ida, "b": idb}


def test_policy_learns_a_token_frequency_reward() -> None:
    """Reward = share of completion tokens with an id in a fixed set (≈ 0.29 for the random model)."""
    policy, tok, markers = tiny_policy()
    target = set(range(3, 300))

    def target_share(ro: Rollouts) -> dict[str, list[float]]:
        return {"target": [sum(t in target for t in c) / max(1, len(c)) for c in ro.completion_ids]}

    cfg = RLConfig(
        steps=24,
        prompts_per_step=2,
        rollouts=8,
        rollout_micro_batch=1,
        lr=1e-2,
        max_grad_norm=1.0,
        warmup_ratio=0.0,
        max_new_tokens=6,
        backend="transformers",
        precision="fp32",
    )
    trainer = RLTrainer(
        cfg, policy, tok, markers, SOURCES, target_share, {"target": 1.0}, back_translate=False
    )
    means = [trainer.step()["reward/target/mean"] for _ in range(cfg.steps)]
    first, last = sum(means[:6]) / 6, sum(means[-6:]) / 6
    assert last > first + 0.12, means


def test_adaptive_prompt_mix_gives_the_lagging_direction_more_prompts() -> None:
    """Even until both directions have a logged style share; then prompts in proportion to each direction's
    miss rate, each direction kept between 1/4 and 3/4; `even` ignores the logs."""
    policy, tok, markers = tiny_policy()

    def const(ro: Rollouts) -> dict[str, list[float]]:
        return {"c": [0.0] * len(ro)}

    def trainer(mix: str) -> RLTrainer:
        cfg = RLConfig(
            prompts_per_step=4, rollouts=2, backend="transformers", precision="fp32", prompt_mix=mix
        )
        return RLTrainer(cfg, policy, tok, markers, SOURCES, const, {"c": 1.0}, back_translate=False)

    adaptive, even = trainer("adaptive"), trainer("even")
    assert adaptive.prompts_from_a() == 2  # nothing logged yet
    # to_b (rollouts of A prompts) hits 20 %, to_a 80 %: A's miss rate is 4× B's → 3 of 4 from A (capped)
    log = [{"style/target_share/to_b": 0.2, "style/target_share/to_a": 0.8}] * 10
    adaptive.metrics_log = even.metrics_log = list(log)
    assert adaptive.prompts_from_a() == 3 and even.prompts_from_a() == 2
    assert [d for d, _ in adaptive.pick_sources(7)] == ["a", "a", "a", "b"]
    adaptive.metrics_log = [{"style/target_share/to_b": 0.9, "style/target_share/to_a": 0.3}] * 10
    assert adaptive.prompts_from_a() == 1
    # only the last 10 steps count: old lag in front of them changes nothing
    adaptive.metrics_log = log + [{"style/target_share/to_b": 0.5, "style/target_share/to_a": 0.5}] * 10
    assert adaptive.prompts_from_a() == 2


def test_oom_at_one_row_per_micro_batch_fails_with_the_resume_point(monkeypatch: pytest.MonkeyPatch) -> None:
    policy, tok, markers = tiny_policy()
    cfg = RLConfig(
        steps=4,
        prompts_per_step=2,
        rollouts=2,
        rollout_micro_batch=2,
        max_new_tokens=3,
        backend="transformers",
        precision="fp32",
    )

    def const(ro: Rollouts) -> dict[str, list[float]]:
        return {"c": [float(i % 2) for i in range(len(ro))]}

    trainer = RLTrainer(cfg, policy, tok, markers, SOURCES, const, {"c": 1.0}, back_translate=False)
    from cyclej.runtime import faults

    monkeypatch.setattr(faults, "_fired", set())  # faults fire once per process: ours must not use up others'
    monkeypatch.setenv("CYCLEJ_FAULT", "rl:1:oom,rl:3:oom,rl:4:oom")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer.step()  # OOM → 2 groups per chunk becomes 1, the step runs again and succeeds
    assert trainer.micro_batch == 1 and trainer.step_done == 1
    assert trainer.metrics_log[-1]["rollout_micro_batch"] == 1
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    trainer.step()
    trainer.step()  # OOM at one group → the group's 2 rows split, one row per chunk
    assert trainer.micro_rows == 1 and trainer.metrics_log[-1]["rollout_micro_batch"] == 0.5
    with pytest.raises(StageFailed, match=r"out of memory at step 4 .*resumes from step 3"):
        trainer.step()  # with one row per micro-batch there is nothing left to halve
    assert trainer.step_done == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_checkpoint_holds_masters_and_moments_only_and_resumes_exactly(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """No bf16 copy of the policy: 12 bytes per parameter (fp32 master + two moments; an fp32 parameter is
    its own master and is saved once), and a fresh trainer loaded from it has the same weights, masters
    and moments to the bit and takes the same next step."""

    def make() -> RLTrainer:
        policy, tok, markers = tiny_policy()
        exact = {p: p.detach() for p in policy.parameters()}
        policy.to(dtype)
        cfg = RLConfig(
            steps=4,
            prompts_per_step=2,
            rollouts=2,
            rollout_micro_batch=2,
            max_new_tokens=3,
            lr=1e-2,
            warmup_ratio=0.0,
            backend="transformers",
            precision="bf16" if dtype == torch.bfloat16 else "fp32",
        )
        spread = lambda ro: {"c": [float(i % 2) for i in range(len(ro))]}  # noqa: E731
        trainer = RLTrainer(cfg, policy, tok, markers, SOURCES, spread, {"c": 1.0}, back_translate=False)
        if dtype != torch.float32:
            trainer.optimizer.set_masters(exact)
        return trainer

    first = make()
    first.step()
    first.step()
    ckpt = tmp_path / "step-2"
    first.save_state(ckpt)
    rng = rng_state()
    n = sum(p.numel() for p in first.policy.parameters())
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    assert not any(name.startswith("policy") for name in files), files
    tensor_bytes = sum(size for name, size in files.items() if name.endswith(".safetensors"))
    assert 12 * n <= tensor_bytes <= 12 * n + 64 * 1024, (tensor_bytes, 12 * n)
    assert sum(files.values()) <= 12 * n + 256 * 1024, files

    second = make()
    second.load_state(ckpt)
    assert second.step_done == 2
    for p, q in zip(first.policy.parameters(), second.policy.parameters(), strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q)
        a, b = first.optimizer.state[p], second.optimizer.state[q]
        assert a.keys() == b.keys() and a["step"] == b["step"]
        assert all(torch.equal(a[k], b[k]) for k in a if k != "step")
    assert second.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    m2 = second.step()
    set_rng_state(rng)
    m1 = first.step()
    assert {k: v for k, v in m1.items() if not k.startswith("seconds/")} == {
        k: v for k, v in m2.items() if not k.startswith("seconds/")
    }
    assert all(
        torch.equal(p, q) for p, q in zip(first.policy.parameters(), second.policy.parameters(), strict=True)
    )


def test_final_save_frees_the_moments_and_hands_the_masters_over_without_a_copy() -> None:
    """`fp32_with_masters` (the final save) used to run `model.float()` beside live masters and moments:
    16 bytes per parameter on the host (97 GB for GPT-J). Now the moments go first and every parameter
    takes its master's tensor itself, so nothing beyond the 12 bytes per parameter training held is ever
    allocated."""
    policy, tok, markers = tiny_policy()
    exact = {p: p.detach() for p in policy.parameters()}
    policy.to(torch.bfloat16)
    cfg = RLConfig(
        steps=2,
        prompts_per_step=2,
        rollouts=2,
        rollout_micro_batch=2,
        max_new_tokens=3,
        lr=1e-2,
        warmup_ratio=0.0,
        backend="transformers",
        precision="bf16",
        optimizer_offload=True,
    )
    trainer = RLTrainer(
        cfg,
        policy,
        tok,
        markers,
        SOURCES,
        lambda ro: {"c": [float(i % 2) for i in range(len(ro))]},
        {"c": 1.0},
        back_translate=False,
    )
    trainer.optimizer.set_masters(exact)
    trainer.step()
    masters = {id(p): (m.data_ptr(), m.clone()) for p, m in trainer.optimizer.masters().items()}
    assert len(masters) == len(list(policy.parameters()))
    saved = fp32_with_masters(policy, trainer.optimizer)
    assert not trainer.optimizer.state  # the moments (and the masters' references) are gone
    for p in saved.parameters():
        ptr, value = masters[id(p)]
        assert p.dtype == torch.float32 and p.device.type == "cpu"
        assert p.data_ptr() == ptr and torch.equal(p.detach(), value)  # the master itself, not a copy


def test_kl_to_the_reference_is_zero_until_the_policy_moves() -> None:
    policy, tok, markers = tiny_policy()
    reference, _, _ = tiny_policy()
    reference.requires_grad_(False)
    cfg = RLConfig(
        steps=2,
        prompts_per_step=2,
        rollouts=4,
        rollout_micro_batch=2,
        max_new_tokens=4,
        lr=1e-2,
        max_grad_norm=1.0,
        warmup_ratio=0.0,
        kl_coef=0.1,
        backend="transformers",
        precision="fp32",
    )

    def spread(ro: Rollouts) -> dict[str, list[float]]:
        return {"c": [float(i % 4) for i in range(len(ro))]}

    trainer = RLTrainer(
        cfg, policy, tok, markers, SOURCES, spread, {"c": 1.0}, reference=reference, back_translate=False
    )
    assert trainer.step()["kl"] == 0.0  # the same weights: the k3 estimate is exactly 0
    assert trainer.step()["kl"] > 0.0


# ---- the stage -------------------------------------------------------------------------------------------
def tiny_config(root: Path) -> PipelineConfig:
    cfg = load_config(preset="tiny", storage=str(root))
    # Four steps, a checkpoint every two (the preset's rl section), a short completion.
    cfg.rl.max_new_tokens = 8
    return cfg


def build_inputs(cfg: PipelineConfig, store: ArtifactStore) -> dict[str, ArtifactRef]:
    """The real `data` stage, and a hand-made `merge` artifact: tiny GPT-J with the markers."""
    data = run_stage("data", cfg, {}, store, Progress(show_bar=False))
    fp = "handmademerge001"
    work = store.workdir("merge", fp)
    policy, tok = load_model(cfg.models.base, markers=MARKERS)
    save_model(policy, tok, work / "model")
    (work / "metrics.json").write_text("{}", encoding="utf-8")
    merge = store.commit("merge", fp, work)
    return {"merge": merge, "data": data}


def run_in_subprocess(cfg: PipelineConfig, inputs: dict[str, ArtifactRef], fault: str, cache: Path) -> int:
    refs_json = json.dumps({k: v.to_json() for k, v in inputs.items()})
    script = textwrap.dedent(
        f"""
        import json, yaml
        from cyclej.config import PipelineConfig
        from cyclej.runtime.progress import Progress
        from cyclej.pipeline.registry import StageRun
        from cyclej.stages.rl import run_rl
        from cyclej.runtime.store import ArtifactRef, ArtifactStore
        cfg = PipelineConfig.model_validate(yaml.safe_load({cfg.to_yaml()!r}))
        refs = {{k: ArtifactRef.from_json(v) for k, v in json.loads({refs_json!r}).items()}}
        store = ArtifactStore.from_config(cfg.storage)
        run_rl(StageRun.start("rl", cfg, refs, store, Progress(show_bar=False)))
        """
    )
    env = {
        **os.environ,
        "CYCLEJ_FAULT": fault,
        "CYCLEJ_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, timeout=300).returncode


def weights(artifact: Path) -> dict[str, torch.Tensor]:
    return {
        **{f"policy.{k}": v for k, v in load_file(artifact / "model" / "model.safetensors").items()},
        **{f"disc.{k}": v for k, v in load_file(artifact / "discriminator" / "model.safetensors").items()},
    }


def deterministic_lines(path: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds/")} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> tuple[PipelineConfig, Path]:
    """One uninterrupted tiny run, shared by the stage tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CYCLEJ_CACHE", str(model_cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.delenv("CYCLEJ_FAULT", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config(tmp_path_factory.mktemp("rl-straight"))
        store = ArtifactStore.from_config(cfg.storage)
        ref = run_rl(StageRun.start("rl", cfg, build_inputs(cfg, store), store, Progress(show_bar=False)))
        return cfg, store.fetch(ref)
    finally:
        torch.set_num_threads(threads)
        mp.undo()


def test_rl_stage_writes_cycle_j_logs_and_samples(uninterrupted: tuple[PipelineConfig, Path]) -> None:
    cfg, art = uninterrupted
    policy, tok = load_model(str(art / "model"))
    assert marker_token_ids(tok, MARKERS)  # the markers are in the shipped tokenizer
    assert (art / "discriminator" / "config.json").is_file()
    assert not list(art.glob("checkpoints/*"))  # deleted once CYCLE-J is committed

    rows = deterministic_lines(art / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for name in ("embedding", "rouge", "bleu", "discriminator", "total"):
            assert f"reward/{name}/mean" in r and f"reward/{name}/std" in r
        assert 0.0 <= r["reward/discriminator/mean"] <= 1.0
        assert "disc/loss" in r and r["grad_norm"] > 0
        # The signal of the step: the update moved the weights; the style share and log-prob are logged.
        assert 1e-7 < r["update_size"] < 1e-1
        assert 0.0 <= r["style/target_share"] <= 1.0 and r["sampled_logprob/mean"] < 0
        # Per direction too (prompts are balanced: half go to each domain), and the overall is their mean.
        to_a, to_b = r["style/target_share/to_a"], r["style/target_share/to_b"]
        assert r["style/target_share"] == pytest.approx((to_a + to_b) / 2)
    assert (art / "training_signal.png").stat().st_size > 10_000
    # Rewards of the first step: the discriminator had not been trained yet (uniform over 3 classes).
    assert rows[0]["reward/discriminator/mean"] == pytest.approx(1 / 3, abs=0.05)

    samples = [json.loads(line) for line in (art / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted({s["step"] for s in samples}) == [2, 4]
    assert len(samples) == 2 * cfg.rl.prompts_per_step
    assert {s["direction"] for s in samples} == {"a->b", "b->a"}
    assert {"source", "translation", "back_translation", "reward/bleu", "reward/total"} <= set(samples[0])

    # Where each step's time went: every phase timed, none longer than the step they are parts of.
    phases = ("sample", "back_translation", "rewards", "gradients", "optimizer", "push_weights")
    phases += ("discriminator",)
    for r in (json.loads(line) for line in (art / "metrics.jsonl").read_text(encoding="utf-8").splitlines()):
        assert all(r[f"seconds/{p}"] > 0 for p in phases), r
        rollout = r["seconds/sample"] + r["seconds/back_translation"]
        assert rollout == pytest.approx(r["seconds/rollout"], abs=0.05)
        assert sum(r[f"seconds/{p}"] for p in phases) <= r["seconds/step"]

    metrics = json.loads((art / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 4
    assert set(phases) | {"rollout"} <= {k.removeprefix("seconds_per_step_") for k in metrics}
    totals = [r["reward/total/mean"] for r in rows]
    assert metrics["reward_total_first"] == pytest.approx(sum(totals[:2]) / 2)  # halves of a short run
    assert metrics["reward_total_last"] == pytest.approx(sum(totals[2:]) / 2)


def test_discriminator_warm_up_runs_before_the_first_step(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rl.discriminator_warmup_steps: the stage warms the discriminator up on real text before step 1, so
    step 1's discriminator reward is no longer the fresh head's 1/3; metrics.json records the warm-up."""
    monkeypatch.setenv("CYCLEJ_CACHE", str(model_cache))
    monkeypatch.delenv("CYCLEJ_FAULT", raising=False)
    cfg = tiny_config(tmp_path / "store")
    cfg.rl.steps, cfg.rl.discriminator_warmup_steps, cfg.rl.discriminator_lr = 1, 30, 1e-3
    store = ArtifactStore.from_config(cfg.storage)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_rl(StageRun.start("rl", cfg, build_inputs(cfg, store), store, Progress(show_bar=False)))
    finally:
        torch.set_num_threads(threads)
    art = store.fetch(ref)
    warmup = json.loads((art / "metrics.json").read_text(encoding="utf-8"))["discriminator_warmup"]
    assert warmup["steps"] == 30
    # A random tiny BERT does not learn Yelp sentiment in 30 steps (test_rewards shows the warm-up learning on
    # separable text); here: it ran on both real domains, so "generated" lost its third of the probability.
    assert 0.0 <= warmup["dev_accuracy_before"] <= 1.0 and 0.0 <= warmup["dev_accuracy_after"] <= 1.0
    first = deterministic_lines(art / "metrics.jsonl")[0]
    assert first["reward/discriminator/mean"] > 1 / 3 + 0.1


def test_kill_and_resume_is_bit_identical(
    uninterrupted: tuple[PipelineConfig, Path], tmp_path: Path, model_cache: Path
) -> None:
    straight_cfg, straight = uninterrupted
    cfg = tiny_config(tmp_path / "store")
    store = ArtifactStore.from_config(cfg.storage)
    inputs = build_inputs(cfg, store)

    code = run_in_subprocess(cfg, inputs, "rl:3:kill", model_cache)
    assert code == -9  # SIGKILL at step 3, after the step-2 checkpoint
    from cyclej.pipeline.registry import stage_fingerprint

    fp = stage_fingerprint("rl", cfg, {k: v.fingerprint for k, v in inputs.items()})
    assert store.list_checkpoints("rl", fp) == ["step-00000002"]
    assert not store.exists("rl", fp)

    steps_seen: list[int] = []
    listener = Progress(show_bar=False, min_interval=0.0, listeners=[lambda *a: steps_seen.append(a[2])])
    ref = run_rl(StageRun.start("rl", cfg, inputs, store, listener))
    assert steps_seen == [3, 4]  # resumed after step 2, did not start over
    resumed = store.fetch(ref)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert deterministic_lines(resumed / "metrics.jsonl") == deterministic_lines(straight / "metrics.jsonl")
    assert (resumed / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()


def test_injected_oom_halves_the_rollout_micro_batch_and_finishes(
    uninterrupted: tuple[PipelineConfig, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, straight = uninterrupted
    cfg = tiny_config(tmp_path / "store")
    store = ArtifactStore.from_config(cfg.storage)
    inputs = build_inputs(cfg, store)
    monkeypatch.setenv("CYCLEJ_FAULT", "rl:4:oom")
    ref = run_rl(StageRun.start("rl", cfg, inputs, store, Progress(show_bar=False)))
    rows = deterministic_lines(store.fetch(ref) / "metrics.jsonl")
    assert [r["rollout_micro_batch"] for r in rows] == [2, 2, 2, 1]
    assert json.loads((store.fetch(ref) / "metrics.json").read_text())["rollout_micro_batch"] == 1
    # Steps before the OOM are the uninterrupted run's, to the bit.
    assert rows[:3] == deterministic_lines(straight / "metrics.jsonl")[:3]


# RL rollouts on a vLLM engine: tests/test_backends_vllm.py.
