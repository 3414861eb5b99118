"""Gradient checkpointing (`gradient_checkpointing` of the training stages and of RL): it is active — each
decoder layer runs its forward again in the backward pass — and it changes no loss and no gradient, on a
tiny GPT-J and a tiny Llama, in a LoRA training step and in an RL step (with dropout configured in the
policy, which RL must keep off all the same)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cyclej.config import RLConfig, TrainConfig
from cyclej.corpora.formats import domain_example
from cyclej.generation.backends import TransformersBackend
from cyclej.models.loading import load_model, marker_token_ids
from cyclej.reinforcement.policy_gradient import RLTrainer, Rollouts
from cyclej.runtime.store import ArtifactStore, StageCheckpoints
from cyclej.training.trainer import train
from tests.helpers.tiny_models import LINES, MARKERS, SOURCES

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def first_layer(model: torch.nn.Module) -> torch.nn.Module:
    """Decoder layer 0 of a GPT-J (transformer.h) or a Llama (model.layers), under peft or not."""
    for name, module in model.named_modules():
        if name.endswith((".h.0", ".layers.0")):
            return module
    raise AssertionError("no decoder layer 0")


def count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    # A pre-hook: the recompute stops as soon as it has the saved tensors, before a forward hook would run.
    first_layer(model).register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---- the trainer (LoRA) --------------------------------------------------------------------------------
def lora_step(
    spec: str, checkpointing: bool, tmp_path: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
    model, tok = load_model(spec, markers=MARKERS)
    ids = marker_token_ids(tok, MARKERS)
    examples = [domain_example(tok, ids[i % 2], t) for i, t in enumerate(LINES)] * 2
    calls = count_forwards(model)
    cfg = TrainConfig(
        batch_size=4,
        micro_batch_size=2,
        lr=1e-2,
        max_steps=1,
        seq_len=64,
        precision="fp32",
        packing=False,
        eval_batches=1,
        gradient_checkpointing=checkpointing,
    )
    store = ArtifactStore(str(tmp_path / f"store-{checkpointing}"))
    result = train(
        model,
        train_examples=examples,
        dev_examples=examples[:2],
        tcfg=cfg,
        checkpoints=StageCheckpoints(store, "domain_train", "fp"),
        tokenizer=tok,
        marker_ids=ids,
    )
    return result.metrics, {k: v.clone() for k, v in result.trainable_state.items()}, calls[0]


@pytest.mark.parametrize("spec", ["tiny-gptj", "tiny-llama"])
def test_lora_step_with_checkpointing_recomputes_the_layers_and_keeps_loss_and_update(
    spec: str, tmp_path: Path
) -> None:
    plain, plain_state, plain_calls = lora_step(spec, False, tmp_path)
    ckpt, ckpt_state, ckpt_calls = lora_step(spec, True, tmp_path)
    # One step of 2 micro-batches: each micro-batch's layers run again in the backward pass.
    assert ckpt_calls == plain_calls + 2
    assert ckpt["final_train_loss"] == pytest.approx(plain["final_train_loss"], rel=1e-6)
    assert ckpt["dev_loss_before"] == pytest.approx(plain["dev_loss_before"], rel=1e-6)
    assert plain_state.keys() == ckpt_state.keys()
    for key, value in plain_state.items():  # after AdamW: the gradients were the same
        torch.testing.assert_close(ckpt_state[key], value, rtol=1e-5, atol=1e-7)


# ---- RL -------------------------------------------------------------------------------------------------
def rl_step(
    spec: str, checkpointing: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int, torch.nn.Module]:
    policy, tok = load_model(spec, markers=MARKERS)
    for m in policy.modules():  # a policy with dropout configured: RL must not apply it either way
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    ida, idb = marker_token_ids(tok, MARKERS)
    cfg = RLConfig(
        steps=2,
        prompts_per_step=2,
        rollouts=4,
        rollout_micro_batch=1,
        max_new_tokens=5,
        lr=1e-3,
        max_grad_norm=1e6,
        warmup_ratio=0.0,
        backend="transformers",
        precision="fp32",
        gradient_checkpointing=checkpointing,
    )

    def spread(ro: Rollouts) -> dict[str, list[float]]:
        return {"c": [float(i % 3) for i in range(len(ro))]}

    backend = TransformersBackend(policy, tok, batch_size=8)
    trainer = RLTrainer(
        cfg,
        policy,
        tok,
        {"a": ida, "b": idb},
        SOURCES,
        spread,
        {"c": 1.0},
        backend=backend,
        back_translate=False,
    )
    assert trainer.share_prompts is not checkpointing  # each prompt once needs the KV cache
    # Both runs on the padded rows, so that the comparison is of the recompute alone.
    trainer.share_prompts = False
    grads: dict[str, torch.Tensor] = {}
    for name, p in policy.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
    calls = count_forwards(policy)
    metrics = trainer.step()
    return grads, metrics, calls[0], policy


@pytest.mark.parametrize("spec", ["tiny-gptj", "tiny-llama"])
def test_rl_step_with_checkpointing_recomputes_the_layers_and_keeps_the_gradient(spec: str) -> None:
    plain_grads, plain, plain_calls, _ = rl_step(spec, False)
    ckpt_grads, ckpt, ckpt_calls, policy = rl_step(spec, True)
    # 2 groups of 4 rows, one group per chunk: two gradient forwards, each run again in the backward.
    assert ckpt_calls == plain_calls + 2
    assert ckpt["pg_loss"] == pytest.approx(plain["pg_loss"], rel=1e-6, abs=1e-9)
    assert ckpt["sampled_logprob/mean"] == pytest.approx(plain["sampled_logprob/mean"], rel=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-5, atol=1e-8)
    # Back in eval for generation: no module is left in train mode (dropout, HF's cache switch).
    assert not any(m.training for m in policy.modules())
    assert policy.base_model.gradient_checkpointing


def test_the_trained_model_comes_back_without_checkpointing(tmp_path: Path) -> None:
    model, tok = load_model("tiny-gptj", markers=MARKERS)
    ids = marker_token_ids(tok, MARKERS)
    examples = [domain_example(tok, ids[i % 2], t) for i, t in enumerate(LINES)]
    cfg = TrainConfig(
        batch_size=2,
        micro_batch_size=2,
        max_steps=1,
        seq_len=64,
        precision="fp32",
        gradient_checkpointing=True,
    )
    result = train(
        model,
        train_examples=examples,
        tcfg=cfg,
        checkpoints=StageCheckpoints(ArtifactStore(str(tmp_path)), "domain_train", "fp"),
        tokenizer=tok,
        marker_ids=ids,
    )
    plain = result.merged_model()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.modules())
    assert not getattr(plain, "_require_grads_hooks", None)
