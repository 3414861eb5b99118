"""Out of GPU memory on every path (cyclej.training.oom), with faults injected through CYCLEJ_FAULT on
CPU: the classifier, the trainer (cuBLAS's allocation failure, the dev loss), RL below one group per
micro-batch (the same gradient as unsplit), the memory released only once the failed attempt's tensors
are gone, the weight push, the discriminator's update and scores, and the reward embedder."""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from cyclej.config import RLConfig, TrainConfig
from cyclej.corpora.formats import domain_example
from cyclej.errors import StageFailed
from cyclej.generation.backends import SamplingSettings, TransformersBackend
from cyclej.models.loading import load_model, marker_token_ids
from cyclej.reinforcement.discriminator import Discriminator
from cyclej.reinforcement.policy_gradient import RLTrainer, Rollouts
from cyclej.reinforcement.rewards import embedding_similarity
from cyclej.runtime import faults
from cyclej.runtime.store import ArtifactStore, StageCheckpoints
from cyclej.training.oom import OutOfMemory, is_oom
from cyclej.training.trainer import train
from tests.helpers.tiny_models import LINES, MARKERS, SOURCES

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def logged(records: list[logging.LogRecord]) -> str:
    """The messages conftest's `project_log` read straight off the `cyclej` loggers (caplog listens on the
    root, which earlier tests of a session can cut them off from)."""
    return "\n".join(r.getMessage() for r in records)


@pytest.fixture(autouse=True)
def fresh_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faults fire once per process: each test gets its own record of fired faults."""
    monkeypatch.setattr(faults, "_fired", set())


def test_the_classifier_knows_allocation_failures_from_other_errors() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_oom(
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    )
    assert not is_oom(
        RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed")
    )
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_oom(ValueError("CUDA out of memory"))  # not a RuntimeError: a message, not a failure


# ---- the trainer ------------------------------------------------------------------------------------------
def train_run(tmp_path: Path, name: str, **over: Any) -> tuple[dict[str, Any], list[str]]:
    model, tok = load_model("tiny-gptj", markers=MARKERS)
    ids = marker_token_ids(tok, MARKERS)
    examples = [domain_example(tok, ids[i % 2], t) for i, t in enumerate(LINES)] * 2
    cfg = TrainConfig(
        **{
            **dict(
                batch_size=4,
                micro_batch_size=4,
                lr=1e-2,
                max_steps=2,
                seq_len=64,
                precision="fp32",
                packing=False,
                eval_batches=2,
                eval_every_steps=1,
            ),
            **over,
        }
    )
    result = train(
        model,
        train_examples=examples,
        dev_examples=examples[:8],
        tcfg=cfg,
        checkpoints=StageCheckpoints(ArtifactStore(str(tmp_path / name)), "domain_train", "fp"),
        tokenizer=tok,
        marker_ids=ids,
    )
    return result.metrics, [k for k in faults._fired]


def test_trainer_halves_the_micro_batch_on_cublas_alloc_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, _ = train_run(tmp_path, "plain")
    monkeypatch.setenv("CYCLEJ_FAULT", "domain_train:1:cublas")
    m, fired = train_run(tmp_path, "cublas")
    assert fired == [("domain_train", 1, "cublas")]
    assert m["oom_events"] == 1 and m["micro_batch_size"] == 2 and m["effective_batch"] == 4
    assert m["final_train_loss"] == pytest.approx(plain["final_train_loss"], rel=1e-5)


def test_dev_loss_out_of_memory_halves_the_eval_batch_not_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, project_log: list[logging.LogRecord]
) -> None:
    plain, _ = train_run(tmp_path, "plain")
    monkeypatch.setenv("CYCLEJ_FAULT", "domain_train-dev_loss:1:oom")
    m, fired = train_run(tmp_path, "oom")
    assert fired == [("domain_train-dev_loss", 1, "oom")]
    assert "domain_train-dev_loss: out of memory at batch 4" in logged(project_log)
    assert m["dev_loss_before"] == pytest.approx(plain["dev_loss_before"], rel=1e-6)
    assert m["micro_batch_size"] == 4 and m["oom_events"] == 0  # training's micro-batch is not eval's


# ---- RL ----------------------------------------------------------------------------------------------------
class EngineCopy:
    """An engine with its own copy of the weights (as vLLM holds one): generates with a second model and
    takes the policy's weights through `load_weights` after each update."""

    def __init__(self, spec: str) -> None:
        self.model, tok = load_model(spec, markers=MARKERS)
        self.inner = TransformersBackend(self.model, tok, batch_size=8)
        self.pushes = 0

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[list[int]]]:
        return self.inner.generate(prompts, settings)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)
        self.pushes += 1


def rl_trainer(rollout_micro_batch: int = 1, engine: bool = False, **over: Any) -> tuple[RLTrainer, dict]:
    policy, tok = load_model("tiny-gptj", markers=MARKERS)
    ida, idb = marker_token_ids(tok, MARKERS)
    cfg = RLConfig(
        **{
            **dict(
                steps=3,
                prompts_per_step=2,
                rollouts=4,
                rollout_micro_batch=rollout_micro_batch,
                max_new_tokens=5,
                lr=1e-3,
                max_grad_norm=1e6,
                warmup_ratio=0.0,
                backend="transformers",
                precision="fp32",
            ),
            **over,
        }
    )

    def spread(ro: Rollouts) -> dict[str, list[float]]:
        return {"c": [float(i % 3) for i in range(len(ro))]}

    # The same generation batch whatever the micro-batch: the rollouts of both runs are the same.
    backend = EngineCopy("tiny-gptj") if engine else TransformersBackend(policy, tok, batch_size=8)
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
    grads: dict[str, torch.Tensor] = {}
    for name, p in policy.named_parameters():  # the step's final accumulated gradient
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
    return trainer, grads


def test_rl_at_one_group_per_micro_batch_splits_the_group_with_the_same_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain, plain_grads = rl_trainer()
    plain_metrics = plain.step()
    monkeypatch.setenv("CYCLEJ_FAULT", "rl:1:oom")
    split, split_grads = rl_trainer()
    metrics = split.step()  # one group of 4 rows per chunk → 2 rows per chunk, and the step again
    assert split.micro_rows == 2 and split.micro_batch == 0.5 and split.step_done == 1
    assert metrics["rollout_micro_rows"] == 2 and metrics["rollout_micro_batch"] == 0.5
    # Summed in float32 per chunk, of terms that cancel (advantages sum to 0 in a group): ~1e-7 apart.
    assert metrics["pg_loss"] == pytest.approx(plain_metrics["pg_loss"], abs=1e-6)
    assert split_grads.keys() == plain_grads.keys() and plain_grads
    # Float32 sum order only: each chunk runs its prompt once and sums its rows' gradients through it, so
    # the split sums in another order (measured: 7e-7 of the norm at worst; a wrong gradient is off by ~1).
    for name, g in plain_grads.items():
        assert float((split_grads[name] - g).norm()) <= 1e-5 * float(g.norm()) + 1e-9, name


def test_rl_fails_with_one_line_only_at_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, _ = rl_trainer(rollout_micro_batch=2, rollouts=2)  # 4 rows per chunk
    monkeypatch.setenv("CYCLEJ_FAULT", "rl:1:oom,rl:2:cublas,rl:3:oom")
    trainer.step()
    trainer.step()
    assert trainer.micro_rows == 1 and trainer.step_done == 2
    with pytest.raises(
        StageFailed,
        match=r"out of memory at step 3 with one rollout per micro-batch .*"
        r"rl.gradient_checkpointing.*resumes from step 2",
    ):
        trainer.step()


def test_rl_releases_memory_only_after_the_failed_attempts_tensors_are_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer, _ = rl_trainer(rollout_micro_batch=2)
    last_logits: list[weakref.ref] = []
    # The LM head's output of every forward; the fault fires right after the gradient pass's first one.
    trainer.policy.lm_head.register_forward_hook(
        lambda _m, _a, out: last_logits.__setitem__(slice(None), [weakref.ref(out)])
    )
    alive_at_release: list[bool] = []
    empty_cache = torch.cuda.empty_cache

    def watched() -> None:  # observes, then does what empty_cache does
        alive_at_release.append(last_logits[0]() is not None)
        empty_cache()

    monkeypatch.setattr(torch.cuda, "empty_cache", watched)
    monkeypatch.setenv("CYCLEJ_FAULT", "rl:1:oom")
    trainer.step()
    assert trainer.micro_rows == 4 and trainer.step_done == 1
    assert alive_at_release == [False]  # released once, when nothing held the failed forward's logits


def test_rl_weight_push_out_of_memory_is_retried_once_then_fails_naming_the_knob(
    monkeypatch: pytest.MonkeyPatch, project_log: list[logging.LogRecord]
) -> None:
    trainer, _ = rl_trainer(engine=True)
    monkeypatch.setenv("CYCLEJ_FAULT", "rl-push:1:oom,rl-push:2:oom,rl-push:2:cublas")
    trainer.step()
    assert "out of memory pushing the weights after step 1" in logged(project_log)
    engine = trainer.backend
    assert engine.pushes == 1 and trainer.step_done == 1
    for name, p in trainer.policy.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], p)
    with pytest.raises(
        StageFailed,
        match=r"pushing the weights into the engine after step 2, twice .*"
        r"rl.vllm.gpu_memory_utilization",
    ):
        trainer.step()


# ---- the discriminator and the embedder ------------------------------------------------------------------
def test_discriminator_update_out_of_memory_splits_the_batch_then_fails_at_one_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = Discriminator("tiny-bert", SOURCES["a"], SOURCES["b"], batch_size=6)
    before = {k: v.clone() for k, v in d.model.state_dict().items()}
    monkeypatch.setenv("CYCLEJ_FAULT", "discriminator:1:oom,discriminator:2:cublas")
    out = d.update(["a generated line", "another one"])
    assert d.micro_batch == 3 and d.updates == 1 and 0 <= out["disc/accuracy"] <= 1
    assert any(not torch.equal(before[k], v) for k, v in d.model.state_dict().items())
    d.update(["a third"])
    assert d.micro_batch == 1 and d.updates == 2
    monkeypatch.setenv("CYCLEJ_FAULT", "discriminator:3:oom")
    with pytest.raises(
        OutOfMemory, match=r"discriminator: out of memory at one text .*rl.discriminator_max_tokens"
    ):
        d.update(["a fourth"])
    assert d.updates == 2


def test_discriminator_scores_and_embedder_halve_their_batch_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch, project_log: list[logging.LogRecord]
) -> None:
    from cyclej.models.embedder import load_embedder

    d = Discriminator("tiny-bert", SOURCES["a"], SOURCES["b"])
    embedder = load_embedder("tiny-bert", "cpu")
    plain_probs = d.probabilities(LINES, batch_size=4)
    plain_sim = embedding_similarity(embedder, LINES, LINES[::-1])
    monkeypatch.setenv("CYCLEJ_FAULT", "discriminator-scores:1:oom,embedder:1:cublas")
    probs = d.probabilities(LINES, batch_size=4)
    sim = embedding_similarity(embedder, LINES, LINES[::-1])
    assert "discriminator-scores: out of memory at batch 4" in logged(project_log)
    assert "embedder: out of memory at batch 12" in logged(project_log)
    torch.testing.assert_close(probs, plain_probs, rtol=1e-5, atol=1e-6)
    assert sim == pytest.approx(plain_sim, abs=1e-5)
