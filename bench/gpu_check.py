"""The first GPU check of the production path: one command, one table, under 8 minutes on one GPU.

    python bench/gpu_check.py                 # on a machine with one NVIDIA GPU (no network needed)
    python bench/gpu_check.py --dry-run       # CPU, tiny width: what the test suite runs so this cannot rot

It builds a GPT-J-architecture model in-process at GPT-J-6B's real width (4096 hidden, 16 heads, rotary 64,
16384 MLP, 50400 vocabulary) with only a few layers, and runs the project's own training code on it (no
copy of the loops here): the LoRA trainer of `context`/`para_train`/`domain_train`
(`cyclej.training.trainer`) and the RL trainer (`cyclej.reinforcement.policy_gradient.RLTrainer` with
`cyclej.training.optim.MasterAdamW`). It measures, and prints as one table:

- each training stage's peak GPU memory against `cyclej plan`'s prediction for that very shape;
- bf16 compute with fp32 masters: a 1e-8 step moves the masters (and leaves the bf16 copies);
- gradient checkpointing's memory saving (and that it changes no loss);
- a real CUDA out-of-memory (memory filled on purpose) halving the micro-batch, finishing with the same
  effective batch;
- a checkpoint written, resumed, and equal to an uninterrupted run (LoRA trainer; RL trainer state);
- tokens/s per stage;
- on a machine with N > 1 GPUs (a pod), the `domain_train` stage on N ranks (torchrun, NCCL) against one:
  the same adapter, and the throughput ratio (one skip line on one GPU).

What needs vLLM (paraphrase, vLLM rollouts, eval) or Prefect (flow runs) is skipped with one line each:
the check runs on a bare GPU machine with torch, transformers, peft, safetensors and sacrebleu. The
project's own pure-Python dependencies it imports (pydantic, PyYAML, rouge-score, ...) are checked first;
bench/README.md says how to carry them to a machine without a package registry.

Exit code 0 when every functional check passes (memory ratios are findings, reported, not failures),
1 otherwise, 2 when a needed package is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a plain checkout (no `pip install -e .` on a bare GPU machine)
    sys.path.insert(0, str(ROOT))

# What the project code this check runs imports beyond torch/transformers/peft (module name: wheel name).
NEEDED = {
    "pydantic": "pydantic",
    "yaml": "PyYAML",
    "fsspec": "fsspec",
    "rouge_score": "rouge-score",
    "nltk": "nltk",
    "sacrebleu": "sacrebleu",
    "safetensors": "safetensors",
    "peft": "peft",
    "transformers": "transformers",
    "numpy": "numpy",
    "tqdm": "tqdm",
}
GiB = 2**30
MARKERS = ["<|A|>", "<|B|>"]


# ---- the table ------------------------------------------------------------------------------------------
@dataclass
class Row:
    section: str
    check: str
    measured: str
    expected: str
    verdict: str  # ok | FAIL | finding | skip | info


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, section: str, check: str, measured: str, expected: str = "", verdict: str = "info") -> None:
        self.rows.append(Row(section, check, measured, expected, verdict))
        print(
            f"[{verdict}] {section}: {check}: {measured}" + (f" (expected {expected})" if expected else ""),
            flush=True,
        )

    @property
    def failed(self) -> bool:
        return any(r.verdict == "FAIL" for r in self.rows)

    def markdown(self) -> str:
        head = "| section | check | measured | expected / predicted | verdict |\n|---|---|---|---|---|\n"
        return head + "".join(
            f"| {r.section} | {r.check} | {r.measured} | {r.expected} | {r.verdict} |\n" for r in self.rows
        )


def block_imports(names: set[str]) -> None:
    """--block-imports: make packages look not installed, to prove the check runs where they are absent. A
    None in sys.modules is Python's own "not importable" mark: `import x` raises ModuleNotFoundError and
    `importlib.util.find_spec("x")` answers None, as for a package that is not installed."""
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]


# ---- sizes -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    hidden: int
    heads: int
    rotary: int
    layers: int
    vocab: int
    seq_len: int  # the LoRA stages' training length (gptj preset: 4096)
    rl_prompts: int
    rl_rollouts: int
    rl_new_tokens: int
    steps: int


REAL = Sizes(
    hidden=4096,
    heads=16,
    rotary=64,
    layers=2,
    vocab=50400,
    seq_len=4096,
    rl_prompts=4,
    rl_rollouts=8,
    rl_new_tokens=48,
    steps=3,
)
TINY = Sizes(
    hidden=64,
    heads=4,
    rotary=16,
    layers=2,
    vocab=1024,
    seq_len=64,
    rl_prompts=2,
    rl_rollouts=4,
    rl_new_tokens=8,
    steps=3,
)


def build_model(sizes: Sizes, folder: Path) -> None:
    """A random GPT-J at these sizes, saved as a plain HF folder with the project's tiny tokenizer (the
    token ids it produces are all below any of these vocabularies)."""
    import torch
    from transformers import AutoTokenizer, GPTJConfig, GPTJForCausalLM

    from cyclej.models.catalog import tiny_tokenizer_dir

    cfg = GPTJConfig(
        vocab_size=sizes.vocab,
        n_positions=max(4096, sizes.seq_len),
        n_embd=sizes.hidden,
        n_layer=sizes.layers,
        n_head=sizes.heads,
        rotary_dim=sizes.rotary,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # built on the GPU: initializing 800M parameters on a CPU takes a minute
        model = GPTJForCausalLM(cfg)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir()).save_pretrained(folder)
    del model
    _free()


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_reset() -> None:
    import torch

    _free()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> float:
    import torch

    return float(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0.0


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# ---- the LoRA trainer ------------------------------------------------------------------------------------
def lora_config(
    sizes: Sizes, micro_batch: int, batch: int, steps: int, checkpointing: bool | None, every: int = 1000
) -> Any:
    from cyclej.config import TrainConfig

    extra: dict[str, Any] = {}
    if checkpointing is not None:
        extra["gradient_checkpointing"] = checkpointing
    return TrainConfig(
        batch_size=batch,
        micro_batch_size=micro_batch,
        max_steps=steps,
        seq_len=sizes.seq_len,
        precision="bf16",
        lr=1e-4,
        warmup_ratio=0.0,
        eval_batches=1,
        eval_every_steps=1000,
        checkpoint_every_steps=every,
        checkpoint_every_minutes=1e6,
        **extra,
    )


def examples(sizes: Sizes, n: int) -> list[Any]:
    """Random-token examples of one `seq_len` each (packing makes one block of each)."""
    import torch

    from cyclej.corpora.formats import Example

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(5, min(sizes.vocab, 1000), (sizes.seq_len,), generator=g).tolist()
        out.append(Example(ids, ids))
    return out


def run_lora(folder: Path, sizes: Sizes, tcfg: Any, store_root: Path, stage: str, device: Any) -> Any:
    """The project's LoRA trainer on the model in `folder` (loaded as the stages load it)."""
    from cyclej.models.loading import load_model, marker_token_ids
    from cyclej.runtime.store import ArtifactStore, StageCheckpoints
    from cyclej.training.precision import weights_dtype
    from cyclej.training.trainer import train

    model, tok = load_model(str(folder), markers=MARKERS, dtype=weights_dtype("bf16", device))
    model.to(device)
    ids = marker_token_ids(tok, MARKERS)
    store = ArtifactStore(str(store_root))
    _peak_reset()
    try:
        result = train(
            model,
            train_examples=examples(sizes, 2 * tcfg.batch_size),
            tcfg=tcfg,
            checkpoints=StageCheckpoints(store, stage, "0" * 16),
            tokenizer=tok,
            marker_ids=ids,
            metrics_path=store_root / f"{stage}.jsonl",
        )
        peak = _peak()
        state = {k: v.detach().float().cpu().clone() for k, v in result.trainable_state.items()}
        return result.metrics, peak, state, _train_losses(store_root / f"{stage}.jsonl")
    finally:
        del model
        _free()


def _train_losses(path: Path) -> list[float]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if r.get("event") == "train"]


def predicted_lora(folder: Path, tcfg: Any, micro_batch: int) -> float | None:
    """`cyclej plan`'s bytes for this stage on this model (weights, gradients, optimizer, activations)."""
    from cyclej.pipeline import sizing as plan

    try:
        shape = plan.model_shape(str(folder))
        memory, _ = plan._train_memory(shape, tcfg, micro_batch)
    except Exception as exc:  # noqa: BLE001 - reported as a row, the check goes on
        print(f"  (plan prediction failed: {exc})", flush=True)
        return None
    return float(sum(memory.values()))


def _ratio_row(
    report: Report, section: str, check: str, measured: float, predicted: float | None, on_gpu: bool
) -> None:
    if not on_gpu:
        report.add(section, check, "n/a on CPU", f"plan {_gib(predicted)}" if predicted else "", "skip")
        return
    if predicted is None:
        report.add(section, check, _gib(measured), "no plan prediction", "FAIL")
        return
    ratio = measured / predicted
    verdict = "ok" if 0.6 <= ratio <= 1.1 else "finding"
    report.add(section, check, f"{_gib(measured)} ({ratio:.2f}× plan)", f"plan {_gib(predicted)}", verdict)


def check_lora(report: Report, folder: Path, sizes: Sizes, work: Path, device: Any, on_gpu: bool) -> float:
    """Peak memory vs plan with and without gradient checkpointing, tokens/s; returns the peak at
    micro-batch 1 without checkpointing (what the out-of-memory check sizes its filler by)."""
    from cyclej.config import TrainConfig

    section = f"LoRA stages (context/para_train/domain_train), seq {sizes.seq_len}"
    has_gc = "gradient_checkpointing" in TrainConfig.model_fields
    peaks: dict[bool, float] = {}
    losses: dict[bool, list[float]] = {}
    for checkpointing in (False, True):
        if checkpointing and not has_gc:
            report.add(
                section,
                "gradient checkpointing",
                "no gradient_checkpointing option in TrainConfig",
                "an option that saves activation memory",
                "FAIL",
            )
            break
        tcfg = lora_config(sizes, 1, 2, sizes.steps, checkpointing if has_gc else None)
        metrics, peak, _, loss = run_lora(
            folder,
            sizes,
            tcfg,
            work / f"lora-gc{int(checkpointing)}",
            f"gpu_check_lora_gc{int(checkpointing)}",
            device,
        )
        peaks[checkpointing], losses[checkpointing] = peak, loss
        label = "checkpointing on" if checkpointing else "checkpointing off"
        _ratio_row(
            report,
            section,
            f"peak GPU memory, micro-batch 1, {label}",
            peak,
            predicted_lora(folder, tcfg, 1),
            on_gpu,
        )
        report.add(section, f"tokens/s, {label}", f"{metrics['tokens_per_s']:.0f}")
    if True in peaks:
        if on_gpu:
            saving = 1 - peaks[True] / peaks[False]
            report.add(
                section,
                "gradient checkpointing's memory saving",
                f"{100 * saving:.0f}% of the peak",
                "> 0",
                "ok" if saving > 0 else "FAIL",
            )
        diff = max(
            (abs(a - b) for a, b in zip(losses[False], losses[True], strict=True)), default=float("nan")
        )
        tol = 2e-2  # bf16 compute: recomputation may reorder a reduction
        report.add(
            section,
            "gradient checkpointing changes no loss",
            f"max |Δloss| {diff:.2e} over {len(losses[True])} steps",
            f"≤ {tol}",
            "ok" if diff <= tol else "FAIL",
        )
    return peaks.get(False, 0.0)


def check_oom(
    report: Report, folder: Path, sizes: Sizes, work: Path, device: Any, on_gpu: bool, peak_mb1: float
) -> None:
    """Micro-batch 4 where memory for about one sequence is free: the trainer must halve and finish."""
    import torch

    from cyclej.runtime import faults

    section = "out of memory"
    batch = 4
    tcfg = lora_config(sizes, batch, batch, 2, None)
    filler = None
    stage = "gpu_check_oom"
    if on_gpu:
        # Weights take W; micro-batch 1 peaked at peak_mb1. Leave room for 1.6 micro-batches' activations.
        from cyclej.models.loading import load_model

        model, _ = load_model(str(folder), markers=MARKERS, dtype=torch.bfloat16)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        _free()
        free, _ = torch.cuda.mem_get_info()
        activations = max(peak_mb1 - weights, 256 * 2**20)
        fill = int(free - weights - 1.6 * activations)
        if fill <= 0:
            report.add(section, "memory filled on purpose", "not enough free memory to fill", "", "FAIL")
            return
        filler = torch.empty(fill, dtype=torch.uint8, device="cuda")
        how = f"real CUDA OOM: {_gib(fill)} filled, {_gib(free - fill)} left"
    else:
        os.environ["CYCLEJ_FAULT"] = f"{stage}:1:oom"
        faults._fired.clear()
        how = "injected OOM (CYCLEJ_FAULT; no CUDA here)"
    try:
        metrics, _, _, _ = run_lora(folder, sizes, tcfg, work / "oom", stage, device)
    except Exception as exc:  # noqa: BLE001 - the row says what went wrong
        report.add(
            section,
            f"micro-batch {batch} under memory pressure ({how})",
            f"failed: {str(exc)[:120]}",
            "halves and finishes",
            "FAIL",
        )
        return
    finally:
        os.environ.pop("CYCLEJ_FAULT", None)
        del filler
        _free()
    halved = metrics["oom_events"] >= 1 and metrics["micro_batch_size"] < batch
    same_batch = metrics["effective_batch"] == batch and metrics["steps"] == tcfg.max_steps
    report.add(
        section,
        f"micro-batch {batch} under memory pressure ({how})",
        f"{metrics['oom_events']} OOM(s), micro-batch {batch} → {metrics['micro_batch_size']}, "
        f"{metrics['steps']} steps at effective batch {metrics['effective_batch']}",
        f"halves, {tcfg.max_steps} steps at effective batch {batch}",
        "ok" if halved and same_batch else "FAIL",
    )


def check_lora_resume(report: Report, folder: Path, sizes: Sizes, work: Path, device: Any) -> None:
    """4 steps, checkpoint every 2; a run stopped at step 3 and resumed ends equal to one that never
    stopped."""
    from cyclej.runtime import faults
    from cyclej.runtime.faults import InjectedError

    section = "checkpoint and resume (LoRA trainer)"
    tcfg = lora_config(sizes, 1, 2, 4, None, every=2)
    _, _, straight, _ = run_lora(folder, sizes, tcfg, work / "resume-a", "gpu_check_resume", device)
    os.environ["CYCLEJ_FAULT"] = "gpu_check_resume:3:error"
    faults._fired.clear()
    try:
        with contextlib.suppress(InjectedError):
            run_lora(folder, sizes, tcfg, work / "resume-b", "gpu_check_resume", device)
    finally:
        os.environ.pop("CYCLEJ_FAULT", None)
    metrics, _, resumed, _ = run_lora(folder, sizes, tcfg, work / "resume-b", "gpu_check_resume", device)
    diff = max(float((straight[k] - resumed[k]).abs().max()) for k in straight)
    scale = max(float(v.abs().max()) for v in straight.values())
    ok = metrics["resumed_from"] == ["step-00000002"] and diff <= 1e-6 * max(scale, 1.0)
    same = "bit-identical" if diff == 0 else f"max |Δ| {diff:.1e} (scale {scale:.2f})"
    report.add(
        section,
        "stopped at step 3, resumed from step 2, vs never stopped",
        f"resumed from {metrics['resumed_from']}; adapters {same}",
        "resumed from step 2, equal",
        "ok" if ok else "FAIL",
    )


# ---- the RL trainer ----------------------------------------------------------------------------------------
def rl_config(sizes: Sizes, lr: float, checkpointing: bool | None, offload: bool) -> Any:
    from cyclej.config import RLConfig

    extra: dict[str, Any] = {}
    if checkpointing is not None:
        extra["gradient_checkpointing"] = checkpointing
    return RLConfig(
        steps=2,
        prompts_per_step=sizes.rl_prompts,
        rollouts=sizes.rl_rollouts,
        rollout_micro_batch=1,
        lr=lr,
        warmup_ratio=0.0,
        max_grad_norm=1.0,
        max_new_tokens=sizes.rl_new_tokens,
        backend="transformers",
        precision="bf16",
        optimizer_offload=offload,
        rewards={"embedding": 0.0, "rouge": 1.0, "bleu": 1.0, "discriminator": 0.0},
        **extra,
    )


SOURCES = {
    "a": [
        "the food was cold and the waiter ignored us",
        "terrible service , never again",
        "the soup was bland and overpriced",
        "we waited an hour for a table",
    ],
    "b": [
        "great food and a lovely staff",
        "best pasta in town , we will come back",
        "the dessert was perfect",
        "friendly people and quick service",
    ],
}


def make_rl_trainer(folder: Path, rcfg: Any, device: Any) -> Any:
    """As `cyclej.stages.rl` builds it: fp32 load, the exact values become the masters, bf16 on the device."""
    import torch

    from cyclej.models.loading import load_model, marker_token_ids
    from cyclej.reinforcement.policy_gradient import CycleDiscriminatorReward, RLTrainer
    from cyclej.training.precision import weights_dtype

    policy, tok = load_model(str(folder), markers=MARKERS, dtype=torch.float32)
    dtype = weights_dtype("bf16", device)
    exact = {p: p.detach() for p in policy.parameters()} if dtype != torch.float32 else {}
    policy.to(device=device, dtype=dtype)
    ida, idb = marker_token_ids(tok, MARKERS)
    weights = {**rcfg.rewards.model_dump(), "spread": 1.0}
    cycle = CycleDiscriminatorReward(weights, None, None)

    def reward(ro: Any) -> dict[str, list[float]]:
        # The project's cycle rewards, plus one that differs between the rollouts of a group whatever the
        # model writes (a random model's cycle rewards can tie, and a group that ties has no gradient).
        spread = [sum(t % 2 == 0 for t in c) / max(1, len(c)) for c in ro.completion_ids]
        return {**cycle(ro), "spread": spread}

    trainer = RLTrainer(
        rcfg,
        policy,
        tok,
        {"a": ida, "b": idb},
        SOURCES,
        reward,
        weights,
        back_translate=cycle.needs_back_translation,
    )
    trainer.optimizer.set_masters(exact)
    return trainer


def predicted_rl(folder: Path, rcfg: Any) -> float | None:
    import torch

    from cyclej.config import load_config
    from cyclej.pipeline import sizing as plan

    try:
        cfg = load_config(preset="gptj")
        cfg = cfg.model_copy(
            update={
                "models": cfg.models.model_copy(update={"base": str(folder)}),
                "rl": rcfg,
                "data": cfg.data.model_copy(update={"max_tokens": 16}),
            }
        )
        card = (
            float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else 80 * GiB
        )
        return float(
            sum(plan._rl_memory(cfg, rcfg.rollout_micro_batch, rcfg.optimizer_offload, card).values())
        )
    except Exception as exc:  # noqa: BLE001 - reported as a row
        print(f"  (plan prediction failed: {exc})", flush=True)
        return None


def _sample_params(trainer: Any) -> list[Any]:
    """A few big weight matrices to watch (all of them would copy the whole model)."""
    params = [p for p in trainer.policy.parameters() if p.ndim == 2]
    return params[2:5]


def check_masters(report: Report, sizes: Sizes, device: Any) -> None:
    """MasterAdamW on one bf16 weight matrix of the model's width, state offloaded to the CPU as in the
    gptj preset: a 1e-8 step moves the fp32 master and leaves the bf16 weight (on any device, so the
    dry run checks the bf16 path too; the RL section checks it inside the real trainer on a GPU)."""
    import torch

    from cyclej.training.optim import MasterAdamW

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(sizes.hidden, sizes.hidden, generator=g) * 0.02).to(
        device=device, dtype=torch.bfloat16
    )
    param = torch.nn.Parameter(weight)
    opt = MasterAdamW([param], lr=1e-8, betas=(0.9, 0.95), eps=1e-6, state_device="cpu")
    param.grad = torch.randn(param.shape, generator=g).to(device=device, dtype=torch.bfloat16)
    before = param.detach().clone()
    opt.step()
    master = opt.masters()[param]
    delta = (master - before.to(master.device, torch.float32)).abs()
    moved = float((delta > 0).float().mean())
    unchanged = float((param.detach() == before).float().mean())
    ok = moved > 0.99 and 0.5e-8 <= float(delta.median()) <= 2e-8 and unchanged > 0.99
    report.add(
        "bf16 + fp32 masters",
        f"MasterAdamW, a 1e-8 step on a {sizes.hidden}² bf16 weight (state in CPU RAM)",
        f"masters moved {100 * moved:.1f}% (median {float(delta.median()):.1e}); bf16 weights unchanged "
        f"{100 * unchanged:.1f}%",
        "masters ~100% moved by ~1e-8, bf16 ~100% unchanged",
        "ok" if ok else "FAIL",
    )


def _masters(trainer: Any) -> dict[Any, Any]:
    """Parameter -> its fp32 master; an fp32 parameter beside its state (CPU) is its own master."""
    separate = trainer.optimizer.masters()
    return {p: separate.get(p, p) for p in trainer.policy.parameters()}


def check_rl(report: Report, folder: Path, sizes: Sizes, work: Path, device: Any, on_gpu: bool) -> None:
    import torch

    from cyclej.config import RLConfig

    section = "RL (full weights, MasterAdamW, optimizer offloaded)"
    has_gc = "gradient_checkpointing" in RLConfig.model_fields
    if not has_gc:
        report.add(
            section,
            "gradient checkpointing",
            "no gradient_checkpointing option in RLConfig",
            "an option that saves activation memory",
            "FAIL",
        )
    # 1. a 1e-8 step: the masters move, the bf16 copies (mostly) do not.
    rcfg = rl_config(sizes, 1e-8, True if has_gc else None, offload=True)
    trainer = make_rl_trainer(folder, rcfg, device)
    watched = _sample_params(trainer)
    masters = _masters(trainer)
    before_m = [masters[p].detach().clone() for p in watched]
    before_w = [p.detach().clone() for p in watched]
    _peak_reset()
    t0 = time.perf_counter()
    m = trainer.step()
    step_s = time.perf_counter() - t0
    peak = _peak()
    moved = [(masters[p] - b).abs().float() for p, b in zip(watched, before_m, strict=True)]
    share_moved = sum(float((d > 0).float().sum()) for d in moved) / sum(d.numel() for d in moved)
    median = float(torch.cat([d.flatten() for d in moved]).median())
    bf16_changed = sum(
        float((p.detach() != b).float().sum()) for p, b in zip(watched, before_w, strict=True)
    ) / sum(b.numel() for b in before_w)
    compute = "bf16" if watched[0].dtype == torch.bfloat16 else str(watched[0].dtype).replace("torch.", "")
    ok = share_moved > 0.99 and 0.3e-8 <= median <= 3e-8 and (compute != "bf16" or bf16_changed < 0.05)
    report.add(
        section,
        f"a 1e-8 step ({compute} weights, fp32 masters)",
        f"masters moved: {100 * share_moved:.1f}%, median |Δ| {median:.1e}; {compute} copies changed: "
        f"{100 * bf16_changed:.2f}%",
        "masters ~100% moved by ~1e-8; bf16 copies ~unchanged",
        "ok" if ok else "FAIL",
    )
    _ratio_row(
        report, section, "peak GPU memory, one group per chunk", peak, predicted_rl(folder, rcfg), on_gpu
    )
    rollout_tokens = m["completion_tokens/mean"] * sizes.rl_prompts * sizes.rl_rollouts
    report.add(
        section,
        "rollout tokens/s (transformers backend; vLLM skipped)",
        f"{rollout_tokens / max(m['seconds/rollout'], 1e-9):.0f}",
    )
    report.add(
        section,
        "seconds per RL step (rollouts, back-translation, rewards, backward, offloaded AdamW)",
        f"{step_s:.2f} s",
        f"{sizes.rl_prompts} prompts × {sizes.rl_rollouts} rollouts",
    )

    # 2. checkpoint: save after step 1, step 2 straight; a fresh trainer loads the checkpoint and steps 2.
    ckpt = work / "rl-ckpt"
    trainer.save_state(ckpt)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    n_params = sum(p.numel() for p in trainer.policy.parameters())
    report.add(
        section,
        "checkpoint size",
        f"{size / n_params:.1f} bytes/parameter ({_gib(size)})",
        "≈ 12 (fp32 masters + 2 moments; bf16 weights derived)",
        "ok" if size / n_params < 13 else "finding",
    )
    trainer.step()
    straight = [_masters(trainer)[p].detach().clone() for p in _sample_params(trainer)]
    del trainer, masters, watched, before_m, before_w, moved
    _free()
    fresh = make_rl_trainer(folder, rcfg, device)
    fresh.load_state(ckpt)
    loaded_step = fresh.step_done
    fresh.step()
    resumed = [_masters(fresh)[p].detach() for p in _sample_params(fresh)]
    diff = max(float((a - b).abs().max()) for a, b in zip(straight, resumed, strict=True))
    same = "bit-identical" if diff == 0 else f"max |Δ| {diff:.1e}"
    report.add(
        section,
        "resumed from the step-1 checkpoint, step 2 vs never stopped",
        f"loaded step {loaded_step}; masters after step 2 {same}",
        "equal (≤ 1e-6)",
        "ok" if loaded_step == 1 and diff <= 1e-6 else "FAIL",
    )
    del fresh
    _free()


# ---- main --------------------------------------------------------------------------------------------------
def check_multi_gpu(report: Report, folder: Path, work: Path, device: Any, dry_run: bool) -> None:
    """The `domain_train` stage on every GPU of the machine (torchrun, NCCL) against one GPU: the same
    adapter, and the throughput ratio. On one GPU it says so and skips; the dry run uses 2 gloo ranks."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from safetensors.torch import load_file
    from scale_out import config as stage_config
    from scale_out import stage_inputs

    from cyclej.pipeline.registry import run_stage
    from cyclej.runtime.progress import Progress
    from cyclej.runtime.store import ArtifactStore

    n = 2 if dry_run else torch.cuda.device_count()
    section = f"multi-GPU ({n} ranks, domain_train under torchrun)"
    if n < 2:
        report.add(
            "multi-GPU",
            "data-parallel LoRA stage",
            f"{n} GPU here",
            "≥ 2 GPUs (a pod: gpu_count > 1)",
            "skip",
        )
        return
    kind = "cpu" if dry_run else "cuda"
    results: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    for ranks in (1, n):
        root = work / f"multi-gpu-{ranks}"
        store = ArtifactStore(str(root))
        refs = stage_inputs(store, str(folder), lines=64)
        # fp32: the comparison is of the gradient reduction, not of bf16 rounding
        cfg = stage_config(root, str(folder), ranks, steps=3, device=kind, precision="fp32")
        ref = run_stage("domain_train", cfg, refs, store, Progress(show_bar=False))
        out = store.fetch(ref)
        results[ranks] = (
            json.loads((out / "metrics.json").read_text()),
            load_file(str(out / "adapter" / "adapter_model.safetensors")),
        )
    (m1, a1), (mn, an) = results[1], results[n]
    diff = max(float((a1[k].float() - an[k].float()).abs().max()) for k in a1)
    report.add(
        section,
        f"adapter on {n} ranks vs 1 rank",
        f"max |Δ| {diff:.2e}",
        "≤ 1e-4",
        "ok" if diff <= 1e-4 and mn["world_size"] == n else "FAIL",
    )
    ratio = mn["tokens_per_s"] / m1["tokens_per_s"]
    report.add(
        section,
        "tokens/s, N ranks / 1 rank",
        f"{ratio:.2f}× ({mn['tokens_per_s']:.0f} vs {m1['tokens_per_s']:.0f})",
        f"near {n}× on {n} GPUs" + ("; below on shared CPU cores" if dry_run else ""),
    )


def environment(report: Report) -> Any:
    import torch
    import transformers

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        driver = "unknown"
        with contextlib.suppress(Exception):
            import subprocess

            driver = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                ).stdout.strip()
                or driver
            )
        report.add(
            "environment",
            "device",
            f"{props.name}, {_gib(props.total_memory)}, driver {driver}, "
            f"bf16 {torch.cuda.is_bf16_supported()}",
        )
        device = torch.device("cuda")
    else:
        report.add("environment", "device", "CPU (no CUDA)")
        device = torch.device("cpu")
    report.add(
        "environment",
        "stack",
        f"torch {torch.__version__} (CUDA build {torch.version.cuda}), "
        f"transformers {transformers.__version__}, python {sys.version.split()[0]}",
    )
    return device


def skipped(report: Report) -> None:
    for module, what in (
        ("vllm", "paraphrase, vLLM rollouts and eval through a vLLM engine"),
        ("prefect", "the pipeline as a Prefect flow run (tasks, caching, retries)"),
    ):
        present = importlib.util.find_spec(module) is not None
        why = "not part of this check (see bench/README.md)" if present else f"{module} is not installed"
        report.add("skipped", what, why, "", "skip")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny width (what the test suite runs)")
    ap.add_argument("--layers", type=int, default=None, help="GPT-J layers to build (default 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="LoRA training length (default 4096)")
    ap.add_argument("--out", type=Path, default=None, help="write gpu_check.md and gpu_check.json here")
    ap.add_argument("--block-imports", default="", help="comma-separated packages to make unimportable")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip the remaining sections after this")
    args = ap.parse_args(argv)
    blocked = {n.strip() for n in args.block_imports.split(",") if n.strip()}
    block_imports(blocked)
    missing = [wheel for module, wheel in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"gpu_check: missing packages: {', '.join(missing)}; on a machine without a registry carry "
            "them as wheels (bench/README.md, 'GPU check')",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    sizes = TINY if args.dry_run else REAL
    if args.layers or args.seq_len:
        sizes = Sizes(
            **{
                **sizes.__dict__,
                "layers": args.layers or sizes.layers,
                "seq_len": args.seq_len or sizes.seq_len,
            }
        )
    report = Report()
    device = environment(report)
    if args.dry_run:
        device = torch.device("cpu")
    on_gpu = device.type == "cuda"
    if not on_gpu and not args.dry_run:
        print("gpu_check: no CUDA device here; use --dry-run on a CPU", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cyclej-gpu-check-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("CYCLEJ_CACHE", str(work / "cache"))
        folder = work / "gptj"
        t0 = time.perf_counter()
        build_model(sizes, folder)
        n_params = sum(f.stat().st_size for f in folder.glob("*.safetensors")) // 4
        report.add(
            "model",
            "GPT-J architecture",
            f"{sizes.layers} layers × {sizes.hidden} hidden, {sizes.heads} heads,"
            f" vocab {sizes.vocab}: {n_params / 1e6:.1f}M parameters"
            f" (built in {time.perf_counter() - t0:.0f} s)",
        )
        sections = [
            ("lora", lambda: check_lora(report, folder, sizes, work, device, on_gpu)),
            ("oom", None),
            ("resume", lambda: check_lora_resume(report, folder, sizes, work, device)),
            ("masters", lambda: check_masters(report, sizes, device)),
            ("rl", lambda: check_rl(report, folder, sizes, work, device, on_gpu)),
            ("multi-GPU", lambda: check_multi_gpu(report, folder, work, device, args.dry_run)),
        ]
        peak_mb1 = 0.0
        for name, fn in sections:
            if time.monotonic() - started > args.budget_s:
                report.add("budget", name, f"skipped: {args.budget_s:.0f} s budget spent", "", "skip")
                continue
            t1 = time.perf_counter()
            try:
                if name == "lora":
                    peak_mb1 = float(fn())  # type: ignore[misc]
                elif name == "oom":
                    check_oom(report, folder, sizes, work, device, on_gpu, peak_mb1)
                else:
                    fn()  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - one section's failure is a row; the rest still run
                report.add(
                    name,
                    "section",
                    f"crashed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                    "",
                    "FAIL",
                )
            print(f"  ({name}: {time.perf_counter() - t1:.0f} s)", flush=True)
        skipped(report)
    report.add(
        "total",
        "wall time",
        f"{time.monotonic() - started:.0f} s",
        "≤ 480 s",
        "ok" if time.monotonic() - started <= 480 else "finding",
    )
    table = report.markdown()
    print("\n" + table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.md").write_text(table, encoding="utf-8")
        (args.out / "gpu_check.json").write_text(
            json.dumps([r.__dict__ for r in report.rows], indent=1), encoding="utf-8"
        )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
