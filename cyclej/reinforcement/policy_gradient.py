"""The RL loop that turns INTERMEDIATE-3 into CYCLE-J: group policy gradient on cycle consistency and
an online discriminator. One file, plain PyTorch, read top to bottom.

One step (`RLTrainer.step`):

1. Pick `prompts_per_step` source texts, half from domain A (to be written as B), half from B (as A)
   (or, with `rl.prompt_mix: adaptive`, more from the direction that lags),
   from a generator seeded by (seed, step) — so a resumed run picks the same ones.
2. Prompt `{DX} src {DY}`; sample `rollouts` translations y per prompt (one *group*) through the
   generation backend, on the live policy (transformers) or on an engine the weights are pushed to
   after each update (vLLM).
3. Back-translate each y greedily: `{DY} y {DX}` → x̂.
4. Rewards (`reward_fn`, pluggable): by default the cycle terms of cyclej.reinforcement.rewards on (x, x̂) and
   the discriminator's p(real target-domain text | y), computed *before* the discriminator's update on this
   batch; weighted by `rl.rewards` into the total.
5. Advantages normalized within each group (`group_advantages`): (r − mean) / std of the group, or
   leave-one-out r − mean of the others.
6. Token-level policy-gradient loss on the completion tokens only (`policy_gradient_loss`):
   −Σ A·log π(y_t) / (number of completion tokens in the step), plus an optional KL penalty to the
   frozen INTERMEDIATE-3 (k3 estimator; off by default). One update per batch of fresh samples, so the
   PPO ratio is 1 and its clipped objective reduces to exactly this gradient. The batch is processed
   in micro-batches of rows (whole groups, or parts of one after an OOM: the advantages are the whole
   groups') with gradient accumulation; the normalizer is the whole step's token count, so the
   gradient does not depend on the micro-batch size. Each distinct prompt of a micro-batch runs through
   the model once and its KV cache is copied to its rollouts (`shared_prompt_completion_logits`). With
   `rl.gradient_checkpointing` the layers recompute their activations in the backward pass, dropout
   still off (`RLTrainer._checkpointing`), on padded `prompt | completion` rows (HF drops the cache there).
7. Clip the gradient norm to `rl.max_grad_norm`, AdamW step, warm-up + cosine LR.
8. Update the discriminator on real text of both domains vs the replay buffer of generated text.

Out of memory anywhere in the step (cyclej.training.oom: `torch.OutOfMemoryError` or cuBLAS's allocation
failure, also injected by `maybe_fault("rl", step)`): the gradients are dropped, the memory is released
outside the except block, the rollout micro-batch halves — in rows, below one group too, down to one row — and
the step runs again from its pre-step state (nothing is updated before the optimizer step, and the step's
samples are seeded by (seed, step), so the retry sees the same prompts). The weight push and the discriminator
handle their own OOMs.

The trainer's whole state — the optimizer's fp32 masters and moments (the policy's weights are derived
from the masters, not saved again), scheduler, discriminator and its optimizer, replay buffer, RNG
states, step, micro-batch and the logs so far — is saved by `save_state` (12 bytes per policy parameter,
safetensors) and restored by `load_state`; a resumed run is bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cyclej.config import OTHER, DomainKey, RLConfig
from cyclej.corpora.formats import encode_text, eos_id
from cyclej.errors import BadInput, StageFailed
from cyclej.generation.backends import (
    GenerationBackend,
    SamplingSettings,
    TransformersBackend,
    distinct_prompts,
    newline_token_ids,
)
from cyclej.reinforcement import rewards as R
from cyclej.reinforcement.discriminator import Discriminator, DiscriminatorRewardKind
from cyclej.runtime.distributed import gather_objects, is_main, rank, sum_tensors, world_size
from cyclej.runtime.faults import maybe_fault
from cyclej.runtime.jsonl import read_jsonl, write_jsonl
from cyclej.training.oom import abort_engine_requests, oom_message, release_memory
from cyclej.training.optim import MASTER_KEY, MasterAdamW
from cyclej.training.precision import use_bf16, weights_dtype
from cyclej.training.schedule import lr_scheduler, rng_state, set_rng_state, warmup_steps

if TYPE_CHECKING:
    from cyclej.evaluation.judge import StyleJudge

log = logging.getLogger("cyclej.reinforcement.policy_gradient")


# ---- rollouts and rewards -----------------------------------------------------------------------------
@dataclass
class Rollouts:
    """One step's rollouts, flat and group by group: rollout j of prompt i is at index i·G + j."""

    group_size: int
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)  # the trained tokens (EOS when it stopped)
    sources: list[str] = field(default_factory=list)
    source_domains: list[DomainKey] = field(default_factory=list)
    target_domains: list[DomainKey] = field(default_factory=list)
    translations: list[str] = field(default_factory=list)
    back_translations: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completion_ids)


# reward_fn(rollouts) -> {reward name: one value per rollout}; names must have a weight.
RewardFn = Callable[[Rollouts], dict[str, list[float]]]


class CycleDiscriminatorReward:
    """The recipe's rewards: cycle consistency of (x, x̂) and the discriminator's p(real target | y).

    Only rewards with a non-zero weight are computed (and logged)."""

    def __init__(
        self,
        weights: Mapping[str, float],
        embedder: R.SentenceTransformer | None,
        discriminator: Discriminator | None,
        discriminator_reward: DiscriminatorRewardKind = "real_target",
    ) -> None:
        self.cycle_names = [n for n in ("embedding", "rouge", "bleu") if weights.get(n, 0.0) > 0]
        self.use_self_bleu = weights.get("self_bleu", 0.0) > 0
        self.use_discriminator = weights.get("discriminator", 0.0) > 0
        if "embedding" in self.cycle_names and embedder is None:
            raise ValueError("the embedding reward has a weight but no embedder was given")
        if self.use_discriminator and discriminator is None:
            raise ValueError("the discriminator reward has a weight but no discriminator was given")
        self.embedder = embedder
        self.discriminator = discriminator
        self.discriminator_reward = discriminator_reward

    @property
    def needs_back_translation(self) -> bool:
        return bool(self.cycle_names)

    def __call__(self, rollouts: Rollouts) -> dict[str, list[float]]:
        out = R.cycle_rewards(self.embedder, rollouts.sources, rollouts.back_translations, self.cycle_names)
        if self.use_self_bleu:  # y against x, not x̂ against x: how much of the source the edit kept
            out["self_bleu"] = R.bleu(rollouts.sources, rollouts.translations)
        if self.use_discriminator:
            assert self.discriminator is not None
            out["discriminator"] = self.discriminator.reward(
                rollouts.translations, rollouts.target_domains, self.discriminator_reward, rollouts.sources
            )
        if not out:
            raise BadInput("rl.rewards: every reward weight is 0; give at least one reward a positive weight")
        return out


# ---- the pure parts: advantages, batch layout, loss --------------------------------------------------
def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_size: int,
    mode: Literal["group", "loo"] = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages normalized within each group of `group_size` consecutive rollouts.

    `group`: (r − mean) / (std + eps), population std of the group (a group whose rewards are all
    equal gets 0: nothing to learn from it). `loo`: r − mean of the *other* rollouts of the group
    (RLOO's baseline), unscaled.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.ndim != 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    if group_size < 2:
        raise ValueError("groups need at least 2 rollouts")
    g = r.view(-1, group_size)
    mean = g.mean(dim=1, keepdim=True)
    if mode == "group":
        adv = (g - mean) / (g.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif mode == "loo":
        adv = (g - mean) * group_size / (group_size - 1)  # = r_i − mean_{j≠i} r_j
    else:
        raise ValueError(f"unknown advantage mode {mode!r} (group or loo)")
    return adv.reshape(-1).float()


def build_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows `prompt | completion` with the prompts left-padded to one width P and the completions
    right-padded to one width C, so every completion starts at column P (as in generation).

    Returns (input_ids [B, P+C], attention_mask [B, P+C], position_ids [B, P+C], completion_mask [B, C]);
    `completion_mask[b, j]` is 1 exactly where column P+j of row b is a completion token: the tokens
    the loss trains. The logits needed are only those of columns P−1 .. P+C−2 (`logits_to_keep=C+1`,
    last column dropped), which skips the LM head on the prompts.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    input_ids = torch.full((len(prompts), P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), P + C), dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), C), dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[row, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        input_ids[row, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[row, P - len(p) : P + len(c)] = 1
        completion_mask[row, : len(c)] = 1
    # Each row's first real token is position 0, whatever its left padding.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, completion_mask


def completion_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    completion_width: int,
) -> torch.Tensor:
    """[B, C, V]: the logits that predict the C completion columns (the LM head skips the prompts when
    the model takes `logits_to_keep`)."""
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = completion_width + 1
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
    ).logits
    return logits[:, -(completion_width + 1) : -1]


def shared_prompt_completion_logits(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [B, C, V], targets [B, C], completion_mask [B, C]) as `build_batch` + `completion_logits`
    give them, but with each distinct prompt run through the model once.

    An RL step's rows come in groups of n rollouts of one prompt, and the padded batch runs every prompt
    n times; a prompt's activations do not depend on its completion (causal attention), so computing them
    once is the same forward. Pass 1 runs the distinct prompts (left-padded to width P) into a KV cache
    and keeps the logits of their last column (they predict each completion's first token); the cache
    rows are then copied to the rows that continue them (an indexing op, so the gradient of every row
    flows back into its prompt's one forward); pass 2 runs completion tokens 0..C−2 on that cache, at
    positions that continue each prompt. The model needs a KV cache in this mode (not HF's gradient
    checkpointing, which turns it off)."""
    from transformers import DynamicCache

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    row_prompt, prompt_ids, prompt_mask = distinct_prompts(prompts, pad_id)
    C = max(1, max(len(c) for c in completions))
    targets = torch.full((len(completions), C), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), C), dtype=torch.long)
    for row, c in enumerate(completions):
        targets[row, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[row, : len(c)] = 1
    expand = torch.tensor(row_prompt, dtype=torch.long)
    cache = DynamicCache(config=getattr(model, "config", None))
    out = model(
        input_ids=prompt_ids.to(device),
        attention_mask=prompt_mask.to(device),
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0).to(device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    first = out.logits[:, -1:].index_select(0, expand.to(device))  # [B, 1, V]
    if C == 1:
        return first, targets.to(device), completion_mask.to(device)
    cache.batch_select_indices(expand.to(device))
    mask = torch.cat([prompt_mask.index_select(0, expand), completion_mask[:, :-1]], dim=1)
    lengths = prompt_mask.sum(-1).index_select(0, expand)  # the first completion token's position
    positions = lengths[:, None] + torch.arange(C - 1)[None, :]
    rest = model(
        input_ids=targets[:, :-1].to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
    ).logits
    return torch.cat([first, rest], dim=1), targets.to(device), completion_mask.to(device)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t]) under logits[b, t] (already aligned: [B, C, V] and [B, C]), in fp32."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def policy_gradient_loss(
    logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    n_tokens: int,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level policy-gradient loss, summed over this micro-batch's completion tokens and divided by
    `n_tokens`, the completion tokens of the whole step (so micro-batches add up to the step's mean).

    `logprobs` and `completion_mask` are [B, C] (from `token_logprobs` and `build_batch`), `advantages`
    [B]. Optional KL to the reference, the k3 estimator exp(ref − lp) − (ref − lp) − 1 per token.
    """
    mask = completion_mask.to(logprobs.dtype)
    pg = -(advantages.to(logprobs.dtype)[:, None] * logprobs * mask).sum() / n_tokens
    stats = {"pg_loss": float(pg.detach())}
    loss = pg
    if ref_logprobs is not None and kl_coef > 0:
        delta = ref_logprobs.detach() - logprobs
        kl = ((torch.exp(delta) - delta - 1) * mask).sum() / n_tokens
        loss = loss + kl_coef * kl
        stats["kl"] = float(kl.detach())
    return loss, stats


# ---- the trainer ---------------------------------------------------------------------------------------
class RLTrainer:
    """Holds everything one RL run changes; `step()` runs one RL step, `save_state`/`load_state` resume."""

    def __init__(
        self,
        cfg: RLConfig,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        marker_ids: Mapping[DomainKey, int],
        sources: Mapping[DomainKey, Sequence[str]],
        reward_fn: RewardFn,
        weights: Mapping[str, float],
        *,
        discriminator: Discriminator | None = None,
        backend: GenerationBackend | None = None,
        reference: PreTrainedModel | None = None,
        back_translate: bool = True,
        log_dir: Path | None = None,
        style_judge: StyleJudge | None = None,
    ) -> None:
        for d in ("a", "b"):
            if not sources.get(d):
                raise BadInput(
                    f"rl: no source texts for domain {d} (the data artifact's {d}/train.txt is empty)"
                )
        if cfg.kl_coef > 0 and reference is None:
            raise ValueError("rl.kl_coef > 0 needs the reference policy")
        self.cfg = cfg
        self.policy = policy
        self.tokenizer = tokenizer
        self.marker_ids = dict(marker_ids)
        self.sources = {d: list(sources[d]) for d in ("a", "b")}
        self.reward_fn = reward_fn
        self.phase_seconds: dict[str, float] = {}  # this step's seconds per phase, logged as seconds/<phase>
        self.weights = dict(weights)
        self.discriminator = discriminator
        self.reference = reference
        self.back_translate = back_translate
        # The evaluation's style judge (cyclej.evaluation.judge),
        # to log the share of rollouts in the target style.
        self.style_judge = style_judge
        self.device = next(policy.parameters()).device
        self.autocast_bf16 = use_bf16(cfg.precision, self.device)
        self.eos = eos_id(tokenizer)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos)
        # Rows (rollouts) per forward/backward chunk: rl.rollout_micro_batch groups to start with, halved on
        # an OOM down to one row (advantages are computed on whole groups before the backward, and the loss
        # is normalized by the whole step's tokens, so any split of the rows gives the same gradient).
        self.micro_rows = cfg.rollout_micro_batch * cfg.rollouts
        # The gradient pass runs each prompt of a group once, not once per rollout (about half the tokens
        # of an RL step are prompts), where the forward can keep a KV cache: not under HF's gradient
        # checkpointing, which turns the cache off.
        self.share_prompts = not cfg.gradient_checkpointing
        # Dropout off: the log-probs we train must be those of the policy that sampled.
        self.policy.eval()
        # On N ranks (a process group is up): the policy is sharded with FSDP2 (cyclej.reinforcement.fsdp),
        # each rank trains on its share of the step's groups and generates from `rollout_policy`, see
        # `_setup_sharded`.
        self.world = world_size()
        self.distributed = self.world > 1
        self.rollout_policy: PreTrainedModel = self.policy
        if self.distributed:
            self._setup_sharded(policy)
        if cfg.gradient_checkpointing:
            from cyclej.training.trainer import enable_gradient_checkpointing

            enable_gradient_checkpointing(self.policy, "rl")
        if self.distributed:
            from cyclej.reinforcement.fsdp import shard_policy

            # After checkpointing is switched on (it wraps the layers' forward), before the optimizer (it
            # must hold the sharded parameters).
            shard_policy(self.policy, bf16=weights_dtype(cfg.precision, self.device) == torch.bfloat16)
        self.owns_backend = backend is None
        self.backend: GenerationBackend = backend or self._transformers_backend()
        self.optimizer: MasterAdamW | torch.optim.AdamW
        if self.distributed:
            # Sharded fp32 parameters are their own masters: torch's AdamW on the local shards (DTensors),
            # the single-tensor algorithm MasterAdamW reproduces; no offload (the state is already 1/W).
            self.optimizer = torch.optim.AdamW(
                self.policy.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0
            )
        else:
            # fp32 master weights and moments (bf16 parameters would round the card's ~1e-8 steps away), in
            # CPU RAM with rl.optimizer_offload; stepped tensor by tensor (no foreach temporary). On fp32
            # parameters it is torch's AdamW exactly.
            self.optimizer = MasterAdamW(
                self.policy.parameters(),
                lr=cfg.lr,
                betas=cfg.betas,
                eps=cfg.eps,
                weight_decay=0.0,
                state_device="cpu" if cfg.optimizer_offload else None,
            )
        self._relative_update = 0.0  # ‖Δθ‖/‖θ‖ of the last sharded step (MasterAdamW measures its own)
        # RL's count of the schedule: warm-up rounded up, cosine over the steps done
        # (cyclej.training.schedule).
        warmup = warmup_steps(cfg.warmup_ratio, cfg.steps, "ceil")
        self.scheduler = lr_scheduler(self.optimizer, cfg.steps, warmup, decay_counts_current_step=False)
        self.step_done = 0
        self.log_dir = log_dir
        self.metrics_log: list[dict[str, Any]] = []
        self.samples_log: list[dict[str, Any]] = []

    @property
    def micro_batch(self) -> int | float:
        """The micro-batch in rl.rollout_micro_batch's unit, groups: a fraction once an OOM split a group."""
        groups, rest = divmod(self.micro_rows, self.cfg.rollouts)
        return self.micro_rows / self.cfg.rollouts if rest else groups

    @micro_batch.setter
    def micro_batch(self, groups: float) -> None:
        self.micro_rows = max(1, round(groups * self.cfg.rollouts))

    def _transformers_backend(self) -> TransformersBackend:
        # Generation batch = the rollout micro-batch in rows, so an OOM halves both.
        return TransformersBackend(self.rollout_policy, self.tokenizer, batch_size=self.micro_rows)

    def _setup_sharded(self, policy: PreTrainedModel) -> None:
        """Checks and the rollout copy, before the policy is sharded.

        Rollouts come from a plain, unsharded copy of the policy in the compute dtype on every rank,
        refreshed from the gathered full weights after each update (`_push_weights`). Why not generate on
        the FSDP module: each forward of it all-gathers every layer, so ranks whose samples stop at different
        lengths would run different numbers of forwards and wait for each other forever. The copy costs 2
        bytes per parameter per rank (bf16), generation on it needs no communication at all, and a
        pushed engine (vLLM) gets the same gathered weights instead."""
        if self.cfg.prompts_per_step % self.world:
            raise BadInput(
                f"rl.prompts_per_step {self.cfg.prompts_per_step} on {self.world} GPUs: give a multiple "
                f"of {self.world}, so that every rank trains on as many groups (the same number of "
                "FSDP forwards and backwards on every rank)"
            )
        if any(p.dtype != torch.float32 for p in policy.parameters()):
            raise ValueError(
                "rl on several ranks: the policy's parameters must be fp32 (they are the masters)"
            )
        if self.cfg.optimizer_offload:
            log.warning(
                "rl: optimizer_offload is ignored on %d ranks (the sharded state is 1/%d per GPU)",
                self.world,
                self.world,
            )
        # transformers types PreTrainedModel.to as @wraps(nn.Module.to): unbound, so mypy misreads it
        self.rollout_policy = copy.deepcopy(policy).to(weights_dtype(self.cfg.precision, self.device))  # type: ignore[arg-type]
        self.rollout_policy.eval().requires_grad_(False)

    # ---- 1-3: prompts, rollouts, back-translations ---------------------------------------------------
    def pick_sources(self, step: int) -> list[tuple[DomainKey, str]]:
        """The step's prompts, without replacement within a domain, seeded by (seed, step): half from each
        domain, or with `rl.prompt_mix: adaptive` the share `prompts_from_a` gives."""
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        n_a = self.prompts_from_a()
        picked: list[tuple[DomainKey, str]] = []
        counts: dict[DomainKey, int] = {"a": n_a, "b": self.cfg.prompts_per_step - n_a}
        for d, n in counts.items():
            pool = self.sources[d]
            if len(pool) >= n:
                idx = rng.sample(range(len(pool)), n)
            else:  # a tiny corpus: with replacement
                idx = [rng.randrange(len(pool)) for _ in range(n)]
            picked += [(d, pool[i]) for i in idx]
        return picked

    def prompts_from_a(self, window: int = 10) -> int:
        """How many of the step's prompts come from domain A (to be written as B).

        Adaptive: in proportion to each direction's miss rate, 1 − the share of its rollouts the style
        judge put in the target domain over the last `window` steps, kept between 1/4 and 3/4 of the
        prompts. Why: with an even mix the yelp run's weak direction (negative → positive) was still
        climbing when the strong one had levelled off; its prompts are where the reward has room to move.
        The shares come from the logs, which a resumed run restores, so a resume picks the same prompts."""
        P = self.cfg.prompts_per_step
        recent = self.metrics_log[-window:]
        to_b = [m["style/target_share/to_b"] for m in recent if "style/target_share/to_b" in m]
        to_a = [m["style/target_share/to_a"] for m in recent if "style/target_share/to_a" in m]
        if self.cfg.prompt_mix == "even" or not to_a or not to_b:
            return P // 2
        miss_b, miss_a = 1 - sum(to_b) / len(to_b), 1 - sum(to_a) / len(to_a)
        share_a = 0.5 if miss_a + miss_b == 0 else miss_b / (miss_a + miss_b)
        share_a = min(0.75, max(0.25, share_a))
        return min(P - 1, max(1, round(P * share_a)))

    def rollout(self, step: int) -> Rollouts:
        cfg, G = self.cfg, self.cfg.rollouts
        picked = self.pick_sources(step)
        prompts = [
            [self.marker_ids[d], *encode_text(self.tokenizer, text), self.marker_ids[OTHER[d]]]
            for d, text in picked
        ]
        # A translation is one line: a line break ends it, as EOS does (and EOS is what gets trained).
        line_end = newline_token_ids(self.tokenizer)
        settings = SamplingSettings(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            n=G,
            seed=(cfg.seed * 1_000_003 + step) * 1009,
            stop_ids=line_end,
        )
        with self._timed("sample"):
            groups = self._generate(prompts, settings)
        ro = Rollouts(group_size=G)
        for (d, text), prompt, completions in zip(picked, prompts, groups, strict=True):
            for c in completions:
                ro.prompt_ids.append(prompt)
                # The backend strips EOS; a completion shorter than the limit stopped on it, and the
                # policy must learn to stop, so EOS is trained too.
                ro.completion_ids.append([*c, self.eos] if len(c) < cfg.max_new_tokens else list(c))
                ro.sources.append(text)
                ro.source_domains.append(d)
                ro.target_domains.append(OTHER[d])
                ro.translations.append(cast(str, self.tokenizer.decode(c, skip_special_tokens=True)).strip())
        if self.back_translate:
            back_prompts = [
                [self.marker_ids[t], *self._strip_eos(c), self.marker_ids[s]]
                for c, s, t in zip(ro.completion_ids, ro.source_domains, ro.target_domains, strict=True)
            ]
            greedy = SamplingSettings(
                max_new_tokens=cfg.max_new_tokens, temperature=0.0, n=1, stop_ids=line_end
            )
            with self._timed("back_translation"):
                back = self._generate(back_prompts, greedy)
            ro.back_translations = [
                cast(str, self.tokenizer.decode(b[0], skip_special_tokens=True)).strip() for b in back
            ]
        else:
            ro.back_translations = [""] * len(ro)
        return ro

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        """Time the block as this step's `phase` (logged as seconds/<phase>)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = time.perf_counter() - start

    def _strip_eos(self, completion: list[int]) -> list[int]:
        return completion[:-1] if completion and completion[-1] == self.eos else completion

    def _generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[list[int]]]:
        """The backend's completions of `prompts`. On N ranks each rank generates a share and every rank gets
        all of them (small: token ids): with transformers, the backend's own batches b ≡ rank (mod N), seeded
        as one process would, so the samples are world size 1's; with a pushed engine, prompts i ≡ rank.
        An out-of-memory error on any rank is raised on every rank (after the exchange, so none waits)."""
        if not self.distributed:
            return self.backend.generate(prompts, settings)
        r, n = rank(), settings.n
        failure, mine = None, None
        try:
            if isinstance(self.backend, TransformersBackend):
                mine = self.backend.generate(prompts, settings, batch_share=(r, self.world))
            else:
                own = range(r, len(prompts), self.world)
                out = self.backend.generate([prompts[i] for i in own], settings)
                mine = [[None] * n for _ in prompts]  # type: ignore[list-item]
                for i, completions in zip(own, out, strict=True):
                    mine[i] = completions
        except Exception as exc:
            failure = oom_message(exc)
            if failure is None:
                raise
        shares = gather_objects((failure, mine))
        self._agree(failure, [f for f, _ in shares])
        merged: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prompts]
        for _, share in shares:
            for i, completions in enumerate(share):
                for k, c in enumerate(completions):
                    if c is not None:
                        merged[i][k] = c
        return merged

    def _agree(self, failure: str | None, failures: Sequence[str | None] | None = None) -> None:
        """On N ranks: raise an out-of-memory error on every rank when any rank had one (`failure`, this
        rank's; `failures`, every rank's when already exchanged), so that all drop the step and halve
        together. Every rank must call it at the same point: it is a collective unless `failures` is given."""
        from cyclej.runtime.distributed import any_rank

        if failures is None:
            if not any_rank(failure is not None, self.device):
                return
            raise torch.OutOfMemoryError(failure or "out of memory on another rank")
        bad = [f"rank {i}: {f}" for i, f in enumerate(failures) if f is not None]
        if bad:
            raise torch.OutOfMemoryError("; ".join(bad))

    def _my_groups(self, n_groups: int) -> list[int]:
        """The step's groups this rank trains on: r, r + N, r + 2N, … (all of them on one process)."""
        return list(range(rank(), n_groups, self.world)) if self.distributed else list(range(n_groups))

    # ---- 6: the policy-gradient pass -----------------------------------------------------------------
    def accumulate_gradients(
        self, ro: Rollouts, advantages: torch.Tensor, step: int, n_tokens: int | None = None
    ) -> dict[str, float]:
        """Forward/backward in chunks of `micro_rows` rows (whole groups or parts of one: `advantages` are
        the whole groups'); returns the step's loss terms. `n_tokens`: the whole step's completion tokens (on
        N ranks `ro` is this rank's share, the normaliser the step's, so the ranks' gradients sum to world
        size 1's); by default those of `ro`."""
        rows_per_chunk = self.micro_rows
        if n_tokens is None:
            n_tokens = sum(len(c) for c in ro.completion_ids)
        totals: dict[str, float] = {}
        for start in range(0, len(ro), rows_per_chunk):
            sl = slice(start, start + rows_per_chunk)
            if self.distributed:
                # The forward's local part may run out of memory on one rank only: all ranks agree before any
                # backward (whose reduce-scatters a rank that left would never join).
                failure = None
                try:
                    loss, logprobs, comp, stats = self._chunk_loss(ro, advantages, sl, step, n_tokens)
                except Exception as exc:
                    failure = oom_message(exc)
                    if failure is None:
                        raise
                self._agree(failure)
            else:
                loss, logprobs, comp, stats = self._chunk_loss(ro, advantages, sl, step, n_tokens)
            with self._checkpointing():  # the recompute runs in the backward pass
                loss.backward()
            # The policy's mean log-prob of its own sampled tokens (free: computed for the loss anyway).
            stats["sampled_logprob/mean"] = (
                float((logprobs.detach() * comp.to(logprobs.dtype)).sum()) / n_tokens
            )
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
        if self.distributed:  # each rank's terms are its share of the step's (same normaliser): their sum
            keys = sorted(totals)
            summed = sum_tensors([torch.tensor([totals[k] for k in keys], dtype=torch.float64)])[0]
            totals = dict(zip(keys, summed.tolist(), strict=True))
        return totals

    def _completion_logits(
        self, model: PreTrainedModel, prompts: list[list[int]], completions: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, targets, completion mask) of these rows: each distinct prompt run once
        (`shared_prompt_completion_logits`) where the model keeps a KV cache in the gradient pass, the
        padded `prompt | completion` rows otherwise (HF's gradient checkpointing turns the cache off)."""
        if self.share_prompts:
            return shared_prompt_completion_logits(model, prompts, completions, self.pad_id)
        input_ids, attn, pos, comp = (
            t.to(self.device) for t in build_batch(prompts, completions, self.pad_id)
        )
        width = comp.shape[1]
        logits = completion_logits(model, input_ids, attn, pos, width)
        return logits, input_ids[:, -width:], comp

    def _chunk_loss(
        self, ro: Rollouts, advantages: torch.Tensor, sl: slice, step: int, n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """The forward of rows `sl` and their share of the step's loss:
        (loss, log-probs, completion mask, terms)."""
        prompts, completions = ro.prompt_ids[sl], ro.completion_ids[sl]
        with (
            self._checkpointing(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16),
        ):
            logits, targets, comp = self._completion_logits(self.policy, prompts, completions)
        logprobs = token_logprobs(logits, targets)
        del logits
        if sl.start == 0:
            # An injected OOM lands where a real one would: the chunk's activations and graph alive.
            maybe_fault("rl", step)
        ref_logprobs = None
        if self.reference is not None and self.cfg.kl_coef > 0:
            with (
                torch.no_grad(),
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16),
            ):
                ref_logits, _, _ = self._completion_logits(self.reference, prompts, completions)
                ref_logprobs = token_logprobs(ref_logits, targets)
        loss, stats = policy_gradient_loss(
            logprobs, comp, advantages[sl].to(self.device), n_tokens, ref_logprobs, self.cfg.kl_coef
        )
        return loss, logprobs, comp, stats

    # ---- one whole step --------------------------------------------------------------------------------
    def _rollout_and_gradients(
        self, step: int
    ) -> tuple[Rollouts, dict[str, list[float]], list[float], dict[str, float], float]:
        """Steps 2-6: sample, score (the discriminator has not seen this batch yet), accumulate gradients."""
        if self.distributed:
            return self._sharded_rollout_and_gradients(step)
        t0 = time.perf_counter()
        ro = self.rollout(step)
        t_rollout = time.perf_counter() - t0
        with self._timed("rewards"):
            parts = self.reward_fn(ro)
        if self.cfg.reward_combination == "product":
            total = R.combine_product(parts, self.weights, content_floor=self.cfg.content_floor)
        else:
            total = R.combine(parts, self.weights)
        advantages = group_advantages(total, ro.group_size, self.cfg.advantage)
        self.optimizer.zero_grad(set_to_none=True)
        with self._timed("gradients"):
            loss_terms = self.accumulate_gradients(ro, advantages, step)
        return ro, parts, total, loss_terms, t_rollout

    def _sharded_rollout_and_gradients(
        self, step: int
    ) -> tuple[Rollouts, dict[str, list[float]], list[float], dict[str, float], float]:
        """Steps 2-6 on N ranks: every rank ends with the whole step's rollouts and rewards (for the logs, the
        samples and the discriminator, as on one process) but scores and trains on its own groups only."""
        t0 = time.perf_counter()
        ro = self.rollout(step)  # the whole step's, generated in shares (`_generate`)
        t_rollout = time.perf_counter() - t0
        n_groups = len(ro) // ro.group_size
        mine = self._my_groups(n_groups)
        local = _select_groups(ro, mine)
        failure, local_parts = None, None
        t_rewards = time.perf_counter()
        try:
            local_parts = self.reward_fn(local)
        except Exception as exc:
            failure = oom_message(exc)
            if failure is None:
                raise
        shares = gather_objects((failure, mine, local_parts))
        self._agree(failure, [f for f, _, _ in shares])
        self.phase_seconds["rewards"] = time.perf_counter() - t_rewards
        # Every rank's rewards back in the step's row order: group g is row block g of the whole step.
        G = ro.group_size
        parts: dict[str, list[float]] = {}
        for _, groups, share in shares:
            for name, values in share.items():
                column = parts.setdefault(name, [0.0] * len(ro))
                for j, g in enumerate(groups):
                    column[g * G : (g + 1) * G] = values[j * G : (j + 1) * G]
        if self.cfg.reward_combination == "product":
            total = R.combine_product(parts, self.weights, content_floor=self.cfg.content_floor)
        else:
            total = R.combine(parts, self.weights)
        advantages = group_advantages(total, G, self.cfg.advantage)  # per group: the same as on one process
        rows = torch.tensor([g * G + j for g in mine for j in range(G)], dtype=torch.long)
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens = sum(len(c) for c in ro.completion_ids)  # the whole step's: every rank knows it
        with self._timed("gradients"):
            loss_terms = self.accumulate_gradients(local, advantages[rows], step, n_tokens)
        return ro, parts, total, loss_terms, t_rollout

    def _optimizer_step(self) -> None:
        """The AdamW update; on N ranks also ‖Δθ‖/‖θ‖ over the whole model (MasterAdamW measures its own)."""
        if not self.distributed:
            self.optimizer.step()
            return
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.policy.parameters()]
        before = [t.detach().clone() for t in local]
        self.optimizer.step()
        sq = torch.zeros(2, dtype=torch.float64)
        for b, t in zip(before, local, strict=True):
            sq[0] += float(b.double().square().sum())
            sq[1] += float((t.detach().double() - b.double()).square().sum())
        del before
        param_sq, update_sq = sum_tensors([sq])[0].tolist()
        self._relative_update = (update_sq / param_sq) ** 0.5 if param_sq > 0 else 0.0

    def step(self) -> dict[str, Any]:
        """Run RL step `step_done + 1`. An OOM anywhere up to and including the optimizer update (rollouts,
        rewards, the gradient pass, the in-process engine) halves the micro-batch, down to one row, and
        runs the step again from its pre-step state (same samples; an update cut short by the OOM finishes
        the tensors it had not reached, none is updated twice)."""
        step = self.step_done + 1
        t_step = time.perf_counter()
        self.phase_seconds = {}
        rng_before = rng_state()
        while True:
            failure = None
            try:
                ro, parts, total, loss_terms, t_rollout = self._rollout_and_gradients(step)
                with self._timed("optimizer"):
                    # On DTensor gradients (N ranks) the norm is the whole model's: one clip on every rank.
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self.policy.parameters(), self.cfg.max_grad_norm
                    )
                    lr = self.scheduler.get_last_lr()[0]
                    self._optimizer_step()
                break
            except Exception as exc:
                failure = oom_message(exc)
                if failure is None:
                    raise
            # Out of the except block, so the failed attempt's tensors are gone before the memory is released.
            self._recover_from_oom(step, failure)
            set_rng_state(rng_before)

        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with self._timed("push_weights"):
            self._push_weights(step)
        with self._timed("discriminator"):
            disc_metrics = (
                self.discriminator.update(ro.translations) if self.discriminator is not None else {}
            )
        self.step_done = step

        metrics: dict[str, Any] = {
            "step": step,
            "lr": lr,
            **loss_terms,
            "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
            # ‖Δθ‖/‖θ‖ of this step on the fp32 masters: does the optimizer move the model at all?
            "update_size": self._relative_update
            if self.distributed
            else cast(MasterAdamW, self.optimizer).relative_update,
            **R.summarize(parts, total),
            "completion_tokens/mean": sum(len(c) for c in ro.completion_ids) / len(ro),
            "rollout_micro_batch": self.micro_batch,
            "rollout_micro_rows": self.micro_rows,
            **self._style_share(ro),
            **disc_metrics,
            "seconds/rollout": t_rollout,
            # Where the step's time went (the last attempt's, after an OOM retry): sample, back_translation
            # (inside the rollout), rewards, gradients (forward + backward), optimizer, push_weights,
            # discriminator. What they leave of seconds/step is bookkeeping (logs, samples).
            **{f"seconds/{phase}": s for phase, s in self.phase_seconds.items()},
            "seconds/step": time.perf_counter() - t_step,
        }
        self.metrics_log.append(metrics)
        if step % self.cfg.sample_every_steps == 0 or step == self.cfg.steps:
            self.samples_log.extend(sample_rows(step, ro, parts, total))
        self._write_logs()
        return metrics

    def _checkpointing(self) -> contextlib.AbstractContextManager[None]:
        """With rl.gradient_checkpointing: train mode for exactly the modules that decide whether to
        checkpoint (HF's layers and body check `gradient_checkpointing and training`), around the gradient
        pass's forward and backward. Everything else stays in eval: no dropout (the log-probs trained must
        be those of the policy that sampled), and generation never runs in train mode, where HF turns the
        KV cache off under checkpointing."""
        if not self.cfg.gradient_checkpointing:
            return contextlib.nullcontext()
        return _training_flag(
            [m for m in self.policy.modules() if getattr(m, "gradient_checkpointing", False)]
        )

    def _recover_from_oom(self, step: int, failure: str) -> None:
        """After an OOM in the step (outside the except block): drop the gradients and whatever an in-process
        engine left running, give the memory back, halve the rows per chunk (or fail at one row)."""
        self.optimizer.zero_grad(set_to_none=True)
        abort_engine_requests(self.backend)
        release_memory()
        if self.micro_rows == 1:
            checkpointing = "" if self.cfg.gradient_checkpointing else "set rl.gradient_checkpointing: true, "
            raise StageFailed(
                "rl",
                f"out of memory at step {step} with one rollout per micro-batch ({failure}); {checkpointing}"
                "lower rl.max_new_tokens or rl.vllm.gpu_memory_utilization, set rl.optimizer_offload: true, "
                "or use a larger GPU (`cyclej plan` sizes it)",
                f"step {self.step_done}",
            )
        old = self.micro_rows
        self.micro_rows = old // 2
        if self.owns_backend:
            self.backend = self._transformers_backend()
        log.warning(
            "rl: out of memory at step %d (%s); rows per micro-batch %d → %d, the step again",
            step,
            failure,
            old,
            self.micro_rows,
        )

    def _push_weights(self, step: int) -> None:
        """The updated weights into an engine that holds its own copy (vLLM). An OOM there is retried once
        after the memory is released (the push is idempotent: the same tensors again), then fails with one
        line: it cannot be skipped (the engine would sample from stale weights, and the gradient would no
        longer be the sampling policy's) nor split (the engine reloads what it is given, its temporaries
        are its own)."""
        if self.distributed:
            self._sync_rollout_policy()
            return
        push = getattr(self.backend, "load_weights", None)
        if push is None:
            return
        for attempt in (1, 2):
            failure = None
            try:
                maybe_fault("rl-push", step)
                push(self.policy.state_dict())
                return
            except Exception as exc:
                failure = oom_message(exc)
                if failure is None:
                    raise
            release_memory()
            if attempt == 2:
                raise StageFailed(
                    "rl",
                    f"out of memory pushing the weights into the engine after step {step}, twice "
                    f"({failure}); lower rl.vllm.gpu_memory_utilization or rl.rollout_micro_batch",
                    f"step {self.step_done}",
                )
            log.warning("rl: out of memory pushing the weights after step %d (%s); again", step, failure)

    def _sync_rollout_policy(self) -> None:
        """N ranks: the updated full weights, gathered on every rank (a collective), into its rollout copy,
        or into its engine (vLLM) when it has one."""
        from cyclej.reinforcement.fsdp import full_state_dict

        full = full_state_dict(self.policy, cpu_offload=False)
        push = None if self.owns_backend else getattr(self.backend, "load_weights", None)
        if push is not None:
            push(full)
        else:
            with torch.no_grad():
                self.rollout_policy.load_state_dict(full)  # copy_: rounded once into the compute dtype
        del full

    def final_policy(self) -> PreTrainedModel | None:
        """The trained policy as a plain fp32 CPU model for `save_pretrained`. One process: the fp32 masters
        become the model (cyclej.training.optim.fp32_with_masters, no copy). N ranks: the full weights
        gathered to rank 0 into its rollout copy, which is a single-process model of the same layout (its
        names and shapes); None on the other ranks. A collective on N ranks."""
        if not self.distributed:
            from cyclej.training.optim import fp32_with_masters

            assert isinstance(self.optimizer, MasterAdamW)
            return cast(PreTrainedModel, fp32_with_masters(self.policy, self.optimizer))
        from cyclej.reinforcement.fsdp import full_state_dict

        full = full_state_dict(self.policy, cpu_offload=True)
        if not is_main():
            return None
        # transformers types PreTrainedModel.to as @wraps(nn.Module.to): unbound, so mypy misreads it
        model = self.rollout_policy.to(device="cpu", dtype=torch.float32)  # type: ignore[call-arg]
        with torch.no_grad():
            model.load_state_dict(full)
        return model

    def _style_share(self, ro: Rollouts) -> dict[str, float]:
        """The share of this step's rollouts the style judge assigns to their target domain, overall and
        per target domain (`style/target_share/to_a`, `/to_b`): one direction can lag the other."""
        if self.style_judge is None or not len(ro):
            return {}
        judged = self.style_judge.predict(ro.translations)
        hits = [j == t for j, t in zip(judged, ro.target_domains, strict=True)]
        out = {"style/target_share": sum(hits) / len(hits)}
        for domain in ("a", "b"):
            mine = [h for h, t in zip(hits, ro.target_domains, strict=True) if t == domain]
            if mine:
                out[f"style/target_share/to_{domain}"] = sum(mine) / len(mine)
        return out

    def _write_logs(self) -> None:
        if self.log_dir is None or not is_main():  # one rank writes; every rank holds the same logs
            return
        write_jsonl(self.log_dir / "metrics.jsonl", self.metrics_log)
        write_jsonl(self.log_dir / "samples.jsonl", self.samples_log)

    # ---- state --------------------------------------------------------------------------------------------
    def save_state(self, out: Path) -> None:
        """Everything a resume needs, in `out` (a checkpoint directory), and nothing it can derive.

        The policy is not saved as such: its weights are the optimizer's fp32 masters rounded to the compute
        dtype (`MasterAdamW` writes them back with `p.copy_(master)` after every update), so `load_state`
        derives them from the masters. A checkpoint holds per parameter its fp32 master (the parameter
        itself when it is its own master: an fp32 parameter beside its state, as on a CPU) and the two
        AdamW moments: 12 bytes per parameter, in safetensors shards (`optimizer-NNNNN.safetensors`, at most
        `STATE_SHARD_BYTES` each, written from the tensors in place: no pickle, no second copy in RAM
        when the state is on the CPU). For GPT-J-6B that is 72.6 GB (the bf16 policy copy it no longer
        holds was 12.1 GB more). Besides: the scheduler, the discriminator, the RNG states and the logs
        (small), and state.json (step, micro-batch, the optimizer's hyper-parameters and per-tensor
        step counts, and the shard index)."""
        ranks_rng: list[Any] | None = None
        if self.distributed:
            # N ranks (collectives, every rank calls save_state): the full state gathered to rank 0, in the
            # single-process format, plus each rank's RNG state; rank 0 alone writes.
            from cyclej.reinforcement.fsdp import full_optimizer_tensors

            tensors, meta = full_optimizer_tensors(self.policy, self.optimizer)
            ranks_rng = gather_objects(rng_state())
            if not is_main():
                return
        else:
            assert isinstance(self.optimizer, MasterAdamW)
            tensors, meta = _optimizer_tensors(self.optimizer)
        out.mkdir(parents=True, exist_ok=True)
        shards = _write_shards(tensors, out, "optimizer")
        torch.save(self.scheduler.state_dict(), out / "scheduler.pt")
        if self.discriminator is not None:
            # its weights, AdamW state and replay buffer (text): ~16 bytes per discriminator parameter
            torch.save(self.discriminator.state_dict(), out / "discriminator.pt")
        torch.save(rng_state() if ranks_rng is None else ranks_rng[0], out / "rng.pt")
        if ranks_rng is not None:  # beside rng.pt, which stays rank 0's: the single-process format unchanged
            torch.save(ranks_rng, out / RANKS_RNG)
        write_jsonl(out / "metrics.jsonl", self.metrics_log)
        write_jsonl(out / "samples.jsonl", self.samples_log)
        state: dict[str, Any] = {
            "step": self.step_done,
            "rollout_micro_batch": self.micro_batch,
            "format": STATE_FORMAT,
            "optimizer": {**meta, "shards": shards},
        }
        if ranks_rng is not None:
            state["world_size"] = self.world
        (out / "state.json").write_text(json.dumps(state), encoding="utf-8")

    def load_state(self, src: Path) -> None:
        state = json.loads((src / "state.json").read_text(encoding="utf-8"))
        if self.distributed:
            if state.get("format") != STATE_FORMAT:
                raise BadInput(
                    f"{src}: RL checkpoint format {state.get('format', 1)} cannot resume on several GPUs; "
                    "resume it on one GPU, or delete the stage's checkpoints to start over"
                )
            from cyclej.reinforcement.fsdp import load_full_training_state

            load_full_training_state(self.policy, self.optimizer, src, state["optimizer"])
        elif "format" not in state:  # written before STATE_FORMAT 2: the policy and the optimizer pickled
            self.policy.load_state_dict(_load(src / "policy.pt", self.device))
            self.optimizer.load_state_dict(_load(src / "optimizer.pt", self.device))
        elif state["format"] == STATE_FORMAT:
            assert isinstance(self.optimizer, MasterAdamW)
            _load_optimizer_tensors(self.optimizer, src, state["optimizer"])
        else:
            raise BadInput(
                f"{src}: RL checkpoint format {state['format']} is not known to this version; delete "
                "the stage's checkpoints to start it over, or resume with the version that wrote it"
            )
        self.scheduler.load_state_dict(_load(src / "scheduler.pt", "cpu"))
        if self.discriminator is not None:
            if not (src / "discriminator.pt").is_file():
                raise BadInput(f"{src}: the checkpoint has no discriminator state but this run trains one")
            self.discriminator.load_state_dict(_load(src / "discriminator.pt", self.discriminator.device))
        ranks_rng = (
            _load(src / RANKS_RNG, "cpu") if self.distributed and (src / RANKS_RNG).is_file() else None
        )
        if ranks_rng is not None and len(ranks_rng) == self.world:
            set_rng_state(ranks_rng[rank()])
        else:  # one process, or another world size: rank 0's
            set_rng_state(_load(src / "rng.pt", "cpu"))
        self.metrics_log = read_jsonl(src / "metrics.jsonl")
        self.samples_log = read_jsonl(src / "samples.jsonl")
        self.step_done = int(state["step"])
        if float(state["rollout_micro_batch"]) != self.micro_batch:  # a fraction once an OOM split a group
            self.micro_batch = float(state["rollout_micro_batch"])
            if self.owns_backend:
                self.backend = self._transformers_backend()
        if self.distributed:
            self._sync_rollout_policy()  # the rollout copy (or engine) samples from the loaded weights
        self._write_logs()


def _select_groups(ro: Rollouts, groups: Sequence[int]) -> Rollouts:
    """The rollouts of these groups (in this order), as a Rollouts of their own."""
    G = ro.group_size
    rows = [g * G + j for g in groups for j in range(G)]
    out = Rollouts(group_size=G)
    for name in (
        "prompt_ids",
        "completion_ids",
        "sources",
        "source_domains",
        "target_domains",
        "translations",
        "back_translations",
    ):
        values = getattr(ro, name)
        setattr(out, name, [values[i] for i in rows])
    return out


def sample_rows(
    step: int, ro: Rollouts, parts: Mapping[str, Sequence[float]], total: Sequence[float]
) -> list[dict[str, Any]]:
    """The first rollout of every group: source, translation, back-translation and each reward."""
    rows = []
    for i in range(0, len(ro), ro.group_size):
        rows.append(
            {
                "step": step,
                "direction": f"{ro.source_domains[i]}->{ro.target_domains[i]}",
                "source": ro.sources[i],
                "translation": ro.translations[i],
                "back_translation": ro.back_translations[i],
                **{f"reward/{k}": float(v[i]) for k, v in parts.items()},
                "reward/total": float(total[i]),
            }
        )
    return rows


# ---- small helpers ------------------------------------------------------------------------------------
def _load(path: Path | io.BytesIO, device: str | torch.device) -> Any:
    # Our own checkpoints (checksummed by the store); weights_only keeps unpickling to plain data.
    return torch.load(path, map_location=device, weights_only=True)


# ---- the optimizer's tensors in a checkpoint (save_state / load_state) ----------------------------------
STATE_FORMAT = 2  # 1 (no "format" key): policy.pt + optimizer.pt, pickled, with a bf16 copy of the policy
RANKS_RNG = "rng-ranks.pt"  # N ranks: every rank's RNG state, in rank order (rng.pt is rank 0's)
STATE_SHARD_BYTES = (
    4 * 2**30
)  # one shard's tensors at most (a GPU-resident state is copied to RAM shard by shard)


def _optimizer_tensors(opt: MasterAdamW) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors a resume needs, by "<index>/<what>" (index: the parameter's place in the optimizer's
    groups, which is `policy.parameters()` order): "master" (the separate fp32 master, or the parameter
    itself when it is its own master: saved once, not as weight and master), "exp_avg", "exp_avg_sq";
    "param" for a parameter without state yet (a run that has not stepped). Plus the metadata: each
    group's hyper-parameters (the LR as the scheduler left it) and each tensor's step count."""
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, int] = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if not st:
            tensors[f"{i}/param"] = p.detach()
            continue
        tensors[f"{i}/{MASTER_KEY}"] = st.get(MASTER_KEY, p).detach()
        tensors[f"{i}/exp_avg"] = st["exp_avg"]
        tensors[f"{i}/exp_avg_sq"] = st["exp_avg_sq"]
        steps[str(i)] = int(st["step"])
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
        for g in opt.param_groups
    ]
    return tensors, {"groups": groups, "steps": steps, "params": len(params)}


def _write_shards(tensors: Mapping[str, torch.Tensor], out: Path, prefix: str) -> list[list[str]]:
    """`tensors` as safetensors shards of at most STATE_SHARD_BYTES (a larger tensor gets a shard of its
    own): [[file, key, key, …], …]. CPU tensors are written from their memory (safetensors 0.8
    `save_file` takes their pointers); a device tensor is copied to RAM one shard at a time."""
    shards: list[list[str]] = []
    batch: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if batch:
            name = f"{prefix}-{len(shards) + 1:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in batch.items()}, str(out / name))
            shards.append([name, *batch])
        batch, size = {}, 0

    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if batch and size + n > STATE_SHARD_BYTES:
            flush()
        batch[key] = t
        size += n
    flush()
    return shards


def _load_optimizer_tensors(opt: MasterAdamW, src: Path, meta: Mapping[str, Any]) -> None:
    """Restore what `_optimizer_tensors` saved, tensor by tensor from the shards (never the whole file in
    RAM beside the live state: an existing state tensor is overwritten in place), and derive each
    parameter from its master exactly as `MasterAdamW` does after an update (`p.copy_(master)`)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if int(meta["params"]) != len(params):
        raise BadInput(
            f"{src}: the checkpoint holds {meta['params']} parameters, the policy has {len(params)}"
        )
    for group, saved in zip(opt.param_groups, meta["groups"], strict=True):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
    steps = {int(i): n for i, n in meta["steps"].items()}
    for i, p in enumerate(params):  # state only for the tensors that had it when saved
        if i not in steps:
            opt.state.pop(p, None)
    opt._done.clear()
    with torch.no_grad():
        for name, *keys in meta["shards"]:
            with safe_open(str(src / name), framework="pt", device="cpu") as f:
                for key in keys:
                    i_text, what = key.split("/")
                    p = params[int(i_text)]
                    value = f.get_tensor(key)
                    if what == "param":
                        p.copy_(value)
                        continue
                    # the optimizer's own tensors (where and how it allocates them: pinned when streamed),
                    # overwritten in place
                    st = opt.state.get(p) or opt._init_state(p)
                    st["step"] = steps[int(i_text)]
                    if what == MASTER_KEY and MASTER_KEY not in st:
                        p.copy_(value)  # an fp32 parameter beside its state: its own master
                        continue
                    st[what].copy_(value)
                    if what == MASTER_KEY:
                        p.copy_(st[what])  # the compute-dtype weights, rounded from the master


@contextlib.contextmanager
def _training_flag(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """`training = True` on exactly these modules (not their children, as `.train()` would), then False."""
    for m in modules:
        m.training = True
    try:
        yield
    finally:
        for m in modules:
            m.training = False
