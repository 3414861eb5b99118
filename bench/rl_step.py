"""Seconds per RL step, in one run: CYCLE_J's loop (policy_gradient.RLTrainer) vs TRL's GRPOTrainer.

Same model (the tiny random GPT-J or SmolLM2-135M, markers added), same prompts (`{DX} src {DY}` from
the shipped Yelp sample), same step (8 prompts × 16 rollouts = 128 completions, one optimizer step,
all 128 rows in one forward/backward), same sampling (temperature 1, top-p 1, no top-k), same loss
family (token-level, normalized by the step's completion tokens — TRL's default `dapo` — group-scaled
advantages, no KL), same optimizer (AdamW lr 1e-5, betas (0.9, 0.95), eps 1e-6, clip 1e-4), and the
same reward functions: ROUGE-L and smoothed BLEU of the translation against its source
(cyclej.reinforcement.rewards). Cycle rewards need a back-translation, which GRPOTrainer has no place
for, so the comparison scores y against x; `--full` also times CYCLE_J's real step (back-translation,
MiniLM cosine, discriminator) on its own, outside the ratio.

The first step of each (warm-up, lazy init) is not timed. Prints the seconds per step of both and the
ratio TRL / ours (> 1: ours is faster); `--repeats` alternates the two runs and reports medians.

    .venv/bin/python bench/rl_step.py --model tiny --steps 3
    .venv/bin/python bench/rl_step.py --model smollm2 --steps 2 --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from cyclej.config import RLConfig  # noqa: E402
from cyclej.models.embedder import load_embedder  # noqa: E402
from cyclej.models.loading import load_model, marker_token_ids  # noqa: E402
from cyclej.reinforcement import rewards as R  # noqa: E402
from cyclej.reinforcement.policy_gradient import CycleDiscriminatorReward, RLTrainer, Rollouts  # noqa: E402

MARKERS = ["<|A|>", "<|B|>"]
SAMPLES = Path(__file__).resolve().parents[1] / "cyclej" / "samples" / "yelp"
MODELS = {"tiny": "tiny-gptj", "smollm2": "smollm2"}


def yelp(n: int) -> dict[str, list[str]]:
    out = {}
    for d, f in (("a", "train.0"), ("b", "train.1")):
        lines = [x.strip() for x in (SAMPLES / f).read_text(encoding="utf-8").splitlines() if x.strip()]
        out[d] = lines[:n]
    return out


def rl_config(args: argparse.Namespace, steps: int) -> RLConfig:
    return RLConfig(
        steps=steps,
        prompts_per_step=args.prompts,
        rollouts=args.rollouts,
        rollout_micro_batch=args.prompts,
        lr=1e-5,
        max_grad_norm=1e-4,
        warmup_ratio=0.0,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        backend="transformers",
        precision="fp32",
    )


# The compared steps' seconds per phase (seconds/<phase> of the metrics), timed steps only.
PHASES: dict[str, list[float]] = {}


def seconds_per_step(
    trainer: RLTrainer, steps: int, phases: dict[str, list[float]] | None = None
) -> list[float]:
    """Wall seconds of each step but the first (warm-up: allocator, first-call overheads); with `phases`,
    each timed step's seconds per phase are appended there."""
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        metrics = trainer.step()
        times.append(time.perf_counter() - t0)
        if phases is None or i == 0:
            continue
        for key, value in metrics.items():
            if key.startswith("seconds/") and key not in ("seconds/step", "seconds/rollout"):
                phases.setdefault(key.removeprefix("seconds/"), []).append(value)
    return times[1:]


def time_ours(args: argparse.Namespace, sources: dict[str, list[str]]) -> list[float]:
    policy, tok = load_model(MODELS[args.model], markers=MARKERS)
    ida, idb = marker_token_ids(tok, MARKERS)

    def text_rewards(ro: Rollouts) -> dict[str, list[float]]:
        return {"rouge": R.rouge_l(ro.sources, ro.translations), "bleu": R.bleu(ro.sources, ro.translations)}

    cfg = rl_config(args, args.steps + 1)
    trainer = RLTrainer(
        cfg,
        policy,
        tok,
        {"a": ida, "b": idb},
        sources,
        text_rewards,
        {"rouge": 1.0, "bleu": 1.0},
        back_translate=False,
    )
    return seconds_per_step(trainer, cfg.steps, PHASES)


def time_ours_full(args: argparse.Namespace, sources: dict[str, list[str]]) -> list[float]:
    """The real CYCLE_J step: back-translation, MiniLM cosine, ROUGE-L, BLEU and the discriminator."""
    from cyclej.reinforcement.discriminator import Discriminator

    policy, tok = load_model(MODELS[args.model], markers=MARKERS)
    ida, idb = marker_token_ids(tok, MARKERS)
    weights = {"embedding": 1.0, "rouge": 0.5, "bleu": 0.5, "discriminator": 1.0}
    disc = Discriminator("minilm", sources["a"], sources["b"], batch_size=32, buffer_size=1024)
    reward_fn = CycleDiscriminatorReward(weights, load_embedder("minilm"), disc)
    cfg = rl_config(args, args.steps + 1)
    trainer = RLTrainer(
        cfg, policy, tok, {"a": ida, "b": idb}, sources, reward_fn, weights, discriminator=disc
    )
    return seconds_per_step(trainer, cfg.steps)


def time_trl(args: argparse.Namespace, sources: dict[str, list[str]]) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    policy, tok = load_model(MODELS[args.model], markers=MARKERS)
    other = {"a": "b", "b": "a"}
    marker = {"a": MARKERS[0], "b": MARKERS[1]}
    rows = [(d, s) for d in ("a", "b") for s in sources[d]]
    # The same `{DX} src {DY}` prompt as ours: the markers are special tokens, so the strings encode to them.
    dataset = Dataset.from_dict(
        {
            "prompt": [f"{marker[d]}{s}{marker[other[d]]}" for d, s in rows],
            "source": [s for _, s in rows],
        }
    )

    def rouge(prompts: list[str], completions: list[str], source: list[str], **_: object) -> list[float]:
        return R.rouge_l(source, [c.strip() for c in completions])

    def bleu(prompts: list[str], completions: list[str], source: list[str], **_: object) -> list[float]:
        return R.bleu(source, [c.strip() for c in completions])

    step_ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: object, **k: object) -> None:
            if not step_ends:
                step_ends.append(time.perf_counter())

        def on_step_end(self, *a: object, **k: object) -> None:
            step_ends.append(time.perf_counter())

    completions = args.prompts * args.rollouts
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            max_steps=args.steps + 1,
            per_device_train_batch_size=completions,
            gradient_accumulation_steps=1,
            num_generations=args.rollouts,
            max_completion_length=args.max_new_tokens,
            learning_rate=1e-5,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_epsilon=1e-6,
            weight_decay=0.0,
            max_grad_norm=1e-4,
            lr_scheduler_type="constant",
            warmup_steps=0,
            beta=0.0,
            num_iterations=1,
            loss_type="dapo",
            scale_rewards="group",
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            reward_weights=[1.0, 1.0],
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            fp16=False,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            seed=0,
            disable_dropout=True,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=[rouge, bleu],
            args=config,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[StepTimer()],
        )
        trainer.train()
    durations = [b - a for a, b in zip(step_ends, step_ends[1:], strict=False)]
    return durations[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--steps", type=int, default=3, help="timed steps (one more is run first, untimed)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rollouts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=1, help="alternate ours/TRL this many times")
    p.add_argument("--full", action="store_true", help="also time CYCLE_J's full step (not in the ratio)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = yelp(64)
    print(
        f"model={args.model} step={args.prompts}x{args.rollouts} max_new_tokens={args.max_new_tokens} "
        f"threads={torch.get_num_threads()} timed_steps={args.steps}"
    )
    # Alternate the two, `--repeats` times: on a shared machine the load drifts, and both should see it.
    ours: list[float] = []
    trl: list[float] = []
    for _ in range(args.repeats):
        ours += time_ours(args, sources)
        trl += time_trl(args, sources)
    print(f"cyclej RLTrainer : {statistics.median(ours):8.2f} s/step (median)  {[round(t, 2) for t in ours]}")
    print(f"TRL GRPOTrainer  : {statistics.median(trl):8.2f} s/step (median)  {[round(t, 2) for t in trl]}")
    print(
        f"ratio TRL / cyclej = {statistics.median(trl) / statistics.median(ours):.2f}  "
        f"(> 1: cyclej is faster; it takes {statistics.median(ours) / statistics.median(trl):.2f} of "
        "TRL's time)"
    )
    print(
        "cyclej step by phase (median s): "
        + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in PHASES.items())
    )
    if args.full:
        full = time_ours_full(args, sources)
        print(
            f"cyclej full step (back-translation + MiniLM cosine + ROUGE/BLEU + discriminator): "
            f"{statistics.mean(full):.2f} s/step"
        )


if __name__ == "__main__":
    main()
