"""The `rl` stage (CYCLE-J): reinforcement learning from INTERMEDIATE-3 on cycle consistency and an
online discriminator (the loop itself is cyclej.reinforcement.policy_gradient).

1. Load the policy from the `merge` artifact's `model/` (cyclej.models.loading.load_model: markers kept,
   position interpolation re-applied), full weights; optionally a frozen copy as the KL reference.
2. Source texts and the discriminator's real text: the `data` artifact's train lines of both domains.
3. Rewards with a positive weight in `rl.rewards`: the embedder (`models.embedder`) for the cosine
   term, ROUGE-L and BLEU, and the discriminator (`models.discriminator`, 3-class head).
4. Resume from the newest complete checkpoint `step-%08d` under this stage's fingerprint; run the
   remaining steps, checkpointing every `rl.checkpoint_every_steps` steps or
   `rl.checkpoint_every_minutes` minutes (whichever comes first). A checkpoint is the optimizer's fp32
   masters and moments (12 bytes per parameter; the policy is derived from them) plus small state
   (`RLTrainer.save_state`); with an S3 store its local copy is deleted once uploaded, and the store keeps
   the newest `rl.keep_checkpoints`. `cyclej plan` sizes the interval against the upload time.
5. Write `model/` (plain HF directory), `discriminator/` (HF sequence classifier), `metrics.jsonl`
   (one line per step), `samples.jsonl` (source, translation, back-translation and each reward, every
   `rl.sample_every_steps` steps) and `metrics.json`; commit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from cyclej.config import DOMAIN_KEYS, DomainKey, PipelineConfig
from cyclej.evaluation.judge import train_judge
from cyclej.generation import engines
from cyclej.generation.backends import GenerationBackend, choose_backend, close_backend
from cyclej.models.embedder import load_embedder
from cyclej.models.loading import load_model, marker_token_ids, save_model
from cyclej.pipeline.registry import StageRun
from cyclej.reinforcement.discriminator import Discriminator
from cyclej.reinforcement.policy_gradient import CycleDiscriminatorReward, RLTrainer
from cyclej.runtime.distributed import any_rank, barrier, world_size
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef
from cyclej.training.diagnostics import TRAINING_PLOT, write_training_plot
from cyclej.training.precision import weights_dtype
from cyclej.training.schedule import CHECKPOINT_PREFIX, CheckpointClock, checkpoint_name

STAGE = "rl"
STYLE_JUDGE_LINES = 20_000  # train lines per domain for the style judge that watches the rollouts
log = logging.getLogger("cyclej.reinforcement.policy_gradient")


def run_rl(run: StageRun) -> ArtifactRef | None:
    cfg, rcfg, progress, device = run.cfg, run.cfg.rl, run.progress, run.device
    done = run.store.ref(run.name, run.fingerprint)
    if done is not None:
        return done
    work = run.workdir
    # bf16 weights on a GPU (full-weight RL of a 6B model does not fit in fp32 with AdamW; the optimizer
    # keeps fp32 masters, see cyclej.training.optim);
    # on a CPU the weights stay fp32 and bf16 only autocasts the forward.
    dtype = weights_dtype(rcfg.precision, device)
    # On N ranks the policy stays fp32: FSDP2 shards it and the shards are the masters; the bf16 compute
    # copies are FSDP's per-layer gathers and the rollout copy (cyclej.reinforcement.fsdp,
    # RLTrainer._setup_sharded).
    sharded = world_size() > 1
    if sharded:
        dtype = torch.float32

    sources: dict[DomainKey, list[str]] = {d: run.lines(d, "train") for d in DOMAIN_KEYS}
    weights = rcfg.rewards.model_dump()
    discriminator = None
    if weights["discriminator"] > 0:
        # Before the policy: a discriminator that cannot load (a bad models.discriminator, remote code
        # missing an import) fails in seconds as one BadInput line, not after minutes of loading GPT-J-6B.
        # Its head comes from its own seeded stream, so the order changes no number.
        discriminator = Discriminator(
            cfg.models.discriminator,
            sources["a"],
            sources["b"],
            lr=rcfg.discriminator_lr,
            batch_size=rcfg.discriminator_batch,
            buffer_size=rcfg.replay_buffer_size,
            max_tokens=rcfg.discriminator_max_tokens,
            trust_remote_code=rcfg.discriminator_trust_remote_code,
            seed=rcfg.seed,
            device=device,
        )

    markers = cfg.markers
    merged_dir = run.input_dir("merge") / "model"
    # Loaded in fp32 (the merge is stored in fp32) and those exact values become the optimizer's masters;
    # the bf16 copy the forward uses is made after (rounding the merge's small deltas only there).
    policy, tokenizer = load_model(str(merged_dir), markers=markers, dtype=torch.float32)
    exact: dict[torch.Tensor, torch.Tensor] = (
        {p: p.detach() for p in policy.parameters()} if dtype != torch.float32 else {}
    )
    # transformers types PreTrainedModel.to as @wraps(nn.Module.to): unbound, so mypy misreads it
    policy.to(device=device, dtype=dtype)  # type: ignore[call-arg]
    reference = None
    if rcfg.kl_coef > 0:
        # in the compute dtype on every rank (frozen, never sharded: its forward needs no communication)
        reference, _ = load_model(
            str(merged_dir), markers=markers, dtype=weights_dtype(rcfg.precision, device)
        )
        # transformers types PreTrainedModel.to as @wraps(nn.Module.to): unbound, so mypy misreads it
        reference.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    id_a, id_b = marker_token_ids(tokenizer, markers)

    embedder = load_embedder(cfg.models.embedder, device) if weights["embedding"] > 0 else None
    reward_fn = CycleDiscriminatorReward(weights, embedder, discriminator, rcfg.discriminator_reward)
    # The evaluation's style judge (TF-IDF + logistic regression, seconds to fit on a few thousand lines)
    # says which share of the rollouts is in the target style, step by step.
    style_judge = train_judge(
        sources["a"][:STYLE_JUDGE_LINES],
        sources["b"][:STYLE_JUDGE_LINES],
        run.lines("a", "dev"),
        run.lines("b", "dev"),
        seed=rcfg.seed,
    )
    trainer = RLTrainer(
        rcfg,
        policy,
        tokenizer,
        {"a": id_a, "b": id_b},
        sources,
        reward_fn,
        weights,
        discriminator=discriminator,
        backend=_backend(cfg, merged_dir),
        reference=reference,
        back_translate=reward_fn.needs_back_translation,
        log_dir=work,
        style_judge=style_judge,
    )
    if exact:
        trainer.optimizer.set_masters(exact)  # type: ignore[union-attr]  # MasterAdamW: one process only
    del exact
    if not trainer.owns_backend:  # a vLLM engine: shut down at the end, or before the next stage if we fail
        engines.hold(STAGE, lambda: close_backend(trainer.backend))

    # Rank 0 first: a remote store's checkpoint is downloaded once into the cache the ranks share.
    latest = run.checkpoints.latest(prefix=CHECKPOINT_PREFIX) if run.is_main else None
    if sharded:
        barrier()
        if not run.is_main:
            latest = run.checkpoints.latest(prefix=CHECKPOINT_PREFIX)
    resumed_from: list[str] = []  # shown in metrics so a retry visibly resumed rather than restarted
    warmup: dict[str, float] = {}
    if latest is not None:
        name, path = latest
        resumed_from.append(name)
        trainer.load_state(path)
        # Its local copy (an S3 store's download: 12 bytes per parameter) is not needed again: the next
        # checkpoint must not find the disk holding it too.
        if sharded:
            barrier()  # every rank has read it
        if run.is_main:
            run.store.drop_local_checkpoint(run.name, run.fingerprint, name)
        log.info("rl: resumed from checkpoint %s (step %d)", name, trainer.step_done)
        _push_weights(trainer)
    elif discriminator is not None and rcfg.discriminator_warmup_steps:
        # A resumed run has the warmed-up discriminator in its checkpoint; a fresh one warms it up first.
        warmup = warm_up_discriminator(
            discriminator,
            rcfg.discriminator_warmup_steps,
            run.lines("a", "dev"),
            run.lines("b", "dev"),
            progress,
        )

    clock = CheckpointClock(rcfg.checkpoint_every_steps, rcfg.checkpoint_every_minutes)
    with progress.bar("RL steps", total=rcfg.steps, initial=trainer.step_done) as bar:
        while trainer.step_done < rcfg.steps:
            m = trainer.step()
            bar.update(1, reward=m["reward/total/mean"], loss=m.get("pg_loss", 0.0))
            due, late = clock.on_step(trainer.step_done), clock.late()
            if sharded:  # the clocks differ: saving is a collective, so the ranks agree on it
                late = any_rank(late)
            if (due or late) and trainer.step_done < rcfg.steps:
                name = checkpoint_name(trainer.step_done)
                # On N ranks the state is gathered by all and written by rank 0 alone: only it (re)creates the
                # folder, which the others would clear under its feet.
                ckpt = run.checkpoints.workdir(name) if run.is_main else run.workdir / "unused-by-this-rank"
                trainer.save_state(ckpt)
                if run.is_main:
                    run.checkpoints.save(name, ckpt, keep=rcfg.keep_checkpoints)
                clock.saved()

    engines.release(STAGE)  # the engine's share of the GPU back before saving and before eval
    # Saved from the fp32 masters: bf16 weights would round away the updates smaller than half a bf16 step
    # (the card's RL steps are ~1e-8 per weight), i.e. nearly all of RL. The masters become the CPU model
    # in place (the moments freed first): the host never holds more than training did (cyclej.training.optim).
    final = trainer.final_policy()  # on N ranks a collective: the full weights gathered to rank 0
    if not run.is_main:
        return (
            None  # ranks 1…N-1: their share is done; rank 0 writes and commits (cyclej.pipeline.rank_worker)
        )
    assert final is not None
    save_model(final, tokenizer, work / "model")
    if discriminator is not None:
        discriminator.model.to("cpu")
        discriminator.save_pretrained(work / "discriminator")
    metrics = summarize_run(trainer.metrics_log)
    metrics["rollout_micro_batch"] = trainer.micro_batch
    metrics["resumed_from"] = resumed_from
    if warmup:
        metrics["discriminator_warmup"] = warmup
    write_training_plot(
        trainer.metrics_log, work / TRAINING_PLOT, "rl: rewards, update size, KL, style share"
    )
    summary = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    return run.commit(summary, metrics, drop_checkpoints=True)


def warm_up_discriminator(
    discriminator: Discriminator, steps: int, dev_a: list[str], dev_b: list[str], progress: Progress
) -> dict[str, float]:
    """`steps` discriminator updates on real A vs real B; its accuracy on the dev lines before and after."""
    before = discriminator.domain_accuracy(dev_a, dev_b)
    chunk = 10
    last: dict[str, float] = {}
    with progress.bar("discriminator warm-up", total=steps) as bar:
        for done in range(0, steps, chunk):
            n = min(chunk, steps - done)
            last = discriminator.warm_up(n)
            bar.update(n, loss=last["disc/loss"])
    after = discriminator.domain_accuracy(dev_a, dev_b)
    log.info(
        "rl: discriminator warmed up in %d steps on real text: dev accuracy (A vs B) %.3f -> %.3f",
        steps,
        before,
        after,
    )
    return {
        "steps": steps,
        "loss_last": last["disc/loss"],
        "dev_accuracy_before": before,
        "dev_accuracy_after": after,
    }


def rl_backend_kind(cfg: PipelineConfig, model_dir: Path) -> Literal["transformers", "vllm"]:
    """What `rl.backend` resolves to. `auto` on a CPU is transformers: there vLLM runs in its own process
    and reloads the whole policy after every update, which costs more than its faster decoding saves
    (measured on the demo preset, SmolLM2-135M on 2 AMD cores: 7.3 s of a 17.0 s step went to the push;
    with the transformers backend's own decoding loop the step took 12.5 s, and no engine starts). On a
    GPU, `auto` is the token rule of `choose_backend`."""
    r = cfg.rl
    if r.backend == "auto" and not torch.cuda.is_available():
        log.info("rl backend auto: transformers (on a CPU the engine would reload the policy every step)")
        return "transformers"
    # Rollouts and their back-translations, every step.
    expected_tokens = 2 * r.steps * r.prompts_per_step * r.rollouts * r.max_new_tokens
    return choose_backend(r.backend, str(model_dir), expected_tokens)


def _backend(cfg: PipelineConfig, model_dir: Path) -> GenerationBackend | None:
    """None: the trainer samples from the live policy with transformers. Otherwise a vLLM engine on the
    start model, which gets the policy's weights after every update (`_push_weights`)."""
    if rl_backend_kind(cfg, model_dir) != "vllm":
        return None
    r = cfg.rl
    from cyclej.generation.backends import VllmBackend

    v = r.vllm
    # The policy, its optimizer and the discriminator share the GPU with the engine (its own settings:
    # tensor parallel 1, short sequences, a third of the card; see `cyclej plan`).
    return VllmBackend(
        str(model_dir),
        tensor_parallel_size=v.tensor_parallel_size,
        max_model_len=v.max_model_len,
        gpu_memory_utilization=v.gpu_memory_utilization,
        seed=r.seed,
        enforce_eager=v.enforce_eager,
    )


def _push_weights(trainer: RLTrainer) -> None:
    if trainer.distributed:
        return  # load_state refreshed every rank's rollout copy or engine from the gathered weights
    push = getattr(trainer.backend, "load_weights", None)
    if push is not None:
        push(trainer.policy.state_dict())


def summarize_run(rows: list[dict[str, Any]], window: int = 10) -> dict[str, Any]:
    """Rewards of the first and last `window` steps (means; at most half the run each, so they do not
    overlap), steps run, and mean seconds per step and per phase of a step."""
    if not rows:
        return {"steps": 0}
    window = max(1, min(window, len(rows) // 2))
    first, last = rows[:window], rows[-window:]
    out: dict[str, Any] = {"steps": rows[-1]["step"]}
    for key in sorted(k for k in rows[0] if k.startswith("reward/") and k.endswith("/mean")):
        name = key.split("/")[1]
        out[f"reward_{name}_first"] = sum(r[key] for r in first) / len(first)
        out[f"reward_{name}_last"] = sum(r[key] for r in last) / len(last)
    out["seconds_per_step"] = sum(r["seconds/step"] for r in rows) / len(rows)
    # The step's phases (sample, back_translation, rewards, gradients, ...), mean seconds over the steps
    # that logged them (a run resumed from an older checkpoint may lack them on its first steps).
    for key in sorted({k for r in rows for k in r if k.startswith("seconds/")} - {"seconds/step"}):
        timed = [r[key] for r in rows if key in r]
        out[f"seconds_per_step_{key.split('/', 1)[1]}"] = sum(timed) / len(timed)
    return out
