"""Stage `paraphrase`: an instruct model paraphrases every training text of both domains (the 2A data).

Inputs: the `data` artifact. The train lines of domain a, then of domain b (each capped at
`paraphrase.max_texts_per_domain`), are cut into numbered shards of `paraphrase.shard_size` texts.
Each finished shard is saved as checkpoint `shard-NNNNN` (shard.jsonl + stats.json) under the stage's
fingerprint, so a restarted stage generates only the missing shards, and several workers can share the
stage (the Prefect layer maps `run_paraphrase_shard` over `range(plan_shards(...))`).

Output artifact: `pairs.jsonl` ({"domain", "text", "paraphrase", "scores"} per kept pair), `stats.json`
(counts, rejection reasons, tokens/s, which shards this run generated) and `samples.json` (20 pairs).
The stage fails when the share of texts left without a paraphrase exceeds `paraphrase.max_rejection_rate`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cyclej.config import DOMAIN_KEYS, PipelineConfig
from cyclej.corpora.lines import read_lines
from cyclej.errors import StageFailed
from cyclej.generation import engines
from cyclej.generation.backends import (
    GenerationBackend,
    SamplingSettings,
    TransformersBackend,
    choose_backend,
    close_backend,
    load_causal_lm,
    make_backend,
)
from cyclej.generation.paraphraser import (
    REASONS,
    Embed,
    PromptBuilder,
    RejectionStats,
    check_rejection_rate,
    judge_candidates,
    load_embedder,
)
from cyclej.models.catalog import resolve_model
from cyclej.pipeline.registry import StageRun, stage_fingerprint
from cyclej.runtime.faults import maybe_fault
from cyclej.runtime.jsonl import read_jsonl
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore, StageCheckpoints

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STAGE = "paraphrase"
log = logging.getLogger("cyclej")
N_SAMPLES = 20
REJECTED_EXAMPLES_PER_REASON = 3


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _fingerprint(cfg: PipelineConfig, inputs: dict[str, ArtifactRef]) -> str:
    return stage_fingerprint(STAGE, cfg, {k: v.fingerprint for k, v in inputs.items()})


def input_texts(
    cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore
) -> list[tuple[str, str]]:
    """(domain, text) for every text to paraphrase, in a fixed order: domain a's train lines, then b's."""
    cap = cfg.paraphrase.max_texts_per_domain
    items: list[tuple[str, str]] = []
    for domain in DOMAIN_KEYS:
        lines = read_lines(store, inputs["data"], domain, "train")  # type: ignore[arg-type]
        items.extend((domain, line) for line in lines[:cap])
    return items


def plan_shards(cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore) -> int:
    """How many shards the stage has (shard i holds texts [i·shard_size, (i+1)·shard_size))."""
    n = len(input_texts(cfg, inputs, store))
    return -(-n // cfg.paraphrase.shard_size)


# ---- the paraphraser and embedder, loaded once per process ---------------------------------------


@dataclass
class _Paraphraser:
    backend: GenerationBackend
    prompts: PromptBuilder
    tokenizer: Any


_PARAPHRASERS: dict[tuple[Any, ...], _Paraphraser] = {}
_EMBEDDERS: dict[str, Embed] = {}


def _paraphraser(cfg: PipelineConfig, n_texts: int) -> _Paraphraser:
    """Loading a 7B model takes minutes: every shard a process runs shares one. `n_texts` (the stage's
    texts) sizes the job for `backend: auto`."""
    pc = cfg.paraphrase
    backend_kind = choose_backend(
        pc.backend, resolve_model(cfg.models.paraphraser), n_texts * pc.n_candidates * pc.max_new_tokens
    )
    key = (
        cfg.models.paraphraser,
        backend_kind,
        pc.batch_size,
        pc.vllm.model_dump_json(),
        pc.instruction,
        pc.system_prompt,
    )
    if key not in _PARAPHRASERS:
        release_paraphrasers()  # one paraphraser in memory at a time: the old engine shut down first
        if backend_kind == "vllm":
            from transformers import AutoTokenizer

            tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
                resolve_model(cfg.models.paraphraser)
            )
            backend = make_backend(
                "vllm",
                cfg.models.paraphraser,
                tensor_parallel_size=pc.vllm.tensor_parallel_size,
                max_model_len=pc.vllm.max_model_len,
                gpu_memory_utilization=pc.vllm.gpu_memory_utilization,
                enforce_eager=pc.vllm.enforce_eager,
                seed=pc.seed,
            )
        else:
            model, tokenizer = load_causal_lm(cfg.models.paraphraser)
            backend = make_backend("transformers", model, tokenizer, batch_size=pc.batch_size)
        _PARAPHRASERS[key] = _Paraphraser(
            backend, PromptBuilder(tokenizer, pc.instruction, pc.system_prompt), tokenizer
        )
        # Kept for the next shard, released (engine shut down) before any other stage starts.
        engines.hold(STAGE, release_paraphrasers, reusable=True)
    return _PARAPHRASERS[key]


def release_paraphrasers() -> None:
    """Shut the cached paraphraser's engine down and drop it (vLLM frees its share of the GPU now)."""
    for para in _PARAPHRASERS.values():
        close_backend(para.backend)
    _PARAPHRASERS.clear()


def _embedder(cfg: PipelineConfig) -> Embed | None:
    if not cfg.paraphrase.use_embedder:
        return None
    spec = cfg.models.embedder
    if spec not in _EMBEDDERS:
        _EMBEDDERS[spec] = load_embedder(spec)
    return _EMBEDDERS[spec]


# ---- one shard ------------------------------------------------------------------------------------


def run_paraphrase_shard(
    cfg: PipelineConfig,
    inputs: dict[str, ArtifactRef],
    store: ArtifactStore,
    shard_index: int,
    progress: Progress,
) -> None:
    """Generate, clean and filter one shard and save it as a checkpoint (nothing to do if it is saved).
    The shard is leased while it is generated, so two runs of one config at once generate it once."""
    fp = _fingerprint(cfg, inputs)
    name = shard_name(shard_index)
    # The lease looks for the saved shard first (and writes nothing then), and again after any wait.
    with store.lease(STAGE, fp, checkpoint=name) as mine:
        if mine:
            _generate_shard(cfg, inputs, store, fp, name, shard_index, progress)


def _generate_shard(
    cfg: PipelineConfig,
    inputs: dict[str, ArtifactRef],
    store: ArtifactStore,
    fp: str,
    name: str,
    shard_index: int,
    progress: Progress,
) -> None:
    pc = cfg.paraphrase
    items = input_texts(cfg, inputs, store)
    shard = items[shard_index * pc.shard_size : (shard_index + 1) * pc.shard_size]
    if not shard:
        raise ValueError(f"paraphrase: shard {shard_index} is out of range ({len(items)} texts)")
    para = _paraphraser(cfg, len(items))
    settings = SamplingSettings(
        max_new_tokens=pc.max_new_tokens,
        temperature=pc.temperature,
        top_p=pc.top_p,
        n=pc.n_candidates,
        # Per shard, so a shard's samples do not depend on which shards ran before it in this process.
        seed=pc.seed * 1_000_003 + shard_index,
    )
    sources = [text for _, text in shard]
    started = time.perf_counter()
    completions, oom_retries = _generate_adapting(
        para.backend, [para.prompts.ids(t) for t in sources], settings, shard_index
    )
    seconds = time.perf_counter() - started
    generated_tokens = sum(len(c) for per_text in completions for c in per_text)
    raw = [[para.tokenizer.decode(c, skip_special_tokens=True) for c in per_text] for per_text in completions]
    judged = judge_candidates(sources, raw, pc, _embedder(cfg))

    counts = RejectionStats()
    counts.add(judged, pc.n_candidates)
    shards = StageCheckpoints(store, STAGE, fp)  # a shard is a checkpoint of the stage
    out = shards.workdir(name)
    with open(out / "shard.jsonl", "w", encoding="utf-8") as f:
        for (domain, _), j, cands in zip(shard, judged, raw, strict=True):
            record = {
                "domain": domain,
                "text": j.text,
                "paraphrase": j.paraphrase,
                "scores": j.scores,
                "rejected": [list(r) for r in j.rejected],
                "raw": cands,
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    shard_stats = {
        **counts.as_dict(),
        "shard": shard_index,
        "generated_tokens": generated_tokens,
        "generation_seconds": round(seconds, 3),
        "oom_retries": oom_retries,
        "batch_size": getattr(para.backend, "batch_size", None),
        # Which of N data-parallel workers (one per GPU, cyclej.runtime.distributed) generated it; 0 alone.
        "worker": int(os.environ.get("RANK", "0")),
    }
    (out / "stats.json").write_text(json.dumps(shard_stats, indent=1), encoding="utf-8")
    shards.save(name, out)
    with progress.bar(f"shard {shard_index}", total=len(shard), unit="text") as bar:
        bar.update(
            len(shard),
            kept=counts.kept,
            rejected=counts.rejected,
            tok_per_s=generated_tokens / max(seconds, 1e-9),
        )


def _generate_adapting(
    backend: GenerationBackend, prompts: list[list[int]], settings: SamplingSettings, shard_index: int
) -> tuple[list[list[list[int]]], int]:
    """Generate; on out-of-memory halve the transformers batch and try again (greedy output is unchanged).

    The halved batch size stays for the rest of the process. vLLM manages its own memory: an OOM there
    is a real failure and propagates.
    """
    retries = 0
    while True:
        try:
            maybe_fault(STAGE, shard_index)
            return backend.generate(prompts, settings), retries
        except torch.OutOfMemoryError:
            if not isinstance(backend, TransformersBackend) or backend.batch_size == 1:
                raise
            backend.batch_size //= 2
            retries += 1
            log.warning(
                "paraphrase shard %d: out of memory; batch size now %d", shard_index, backend.batch_size
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ---- the stage ------------------------------------------------------------------------------------


def _read_shard(shards: StageCheckpoints, index: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    d = shards.load(shard_name(index))
    records = read_jsonl(d / "shard.jsonl")
    return records, json.loads((d / "stats.json").read_text(encoding="utf-8"))


def _samples(pairs: list[dict[str, Any]], k: int = N_SAMPLES) -> list[dict[str, Any]]:
    """k pairs spread evenly over the dataset, half from each domain when both have enough."""
    by_domain = {d: [p for p in pairs if p["domain"] == d] for d in DOMAIN_KEYS}
    n_b = min(len(by_domain["b"]), k - min(len(by_domain["a"]), k // 2))
    n_a = min(len(by_domain["a"]), k - n_b)
    out: list[dict[str, Any]] = []
    for rows, n in ((by_domain["a"], n_a), (by_domain["b"], n_b)):
        out.extend(rows[i * len(rows) // n] for i in range(n))
    return out


def run_paraphrase(run: StageRun) -> ArtifactRef:
    """Generate the missing shards, assemble the pairs dataset and commit it (or fail on too many rejects)."""
    cfg, inputs, store, progress = run.cfg, run.inputs, run.store, run.progress
    n_shards = plan_shards(cfg, inputs, store)
    done = set(run.checkpoints.names())
    todo = [i for i in range(n_shards) if shard_name(i) not in done]
    with progress.bar("shards", total=n_shards, initial=n_shards - len(todo), unit="shard") as bar:
        for i in todo:
            run_paraphrase_shard(cfg, inputs, store, i, progress)
            bar.update(1)

    pairs: list[dict[str, Any]] = []
    counts = RejectionStats()
    tokens, seconds = 0, 0.0
    rejected_examples: dict[str, list[dict[str, str]]] = {r: [] for r in REASONS}
    for i in range(n_shards):
        records, shard_stats = _read_shard(run.checkpoints, i)
        tokens += shard_stats["generated_tokens"]
        seconds += shard_stats["generation_seconds"]
        counts.texts += shard_stats["texts"]
        counts.kept += shard_stats["kept"]
        counts.candidates += shard_stats["candidates"]
        counts.reasons.update(shard_stats["rejection_reasons"])
        for rec in records:
            if rec["paraphrase"] is not None:
                pairs.append({k: rec[k] for k in ("domain", "text", "paraphrase", "scores")})
            for reason, cand in rec["rejected"]:
                if len(rejected_examples[reason]) < REJECTED_EXAMPLES_PER_REASON:
                    rejected_examples[reason].append({"text": rec["text"], "output": cand})

    tokens_per_second = tokens / seconds if seconds > 0 else 0.0
    stats = {
        **counts.as_dict(),
        "pairs": len(pairs),
        "pairs_per_domain": {d: sum(p["domain"] == d for p in pairs) for d in DOMAIN_KEYS},
        "generated_tokens": tokens,
        "generation_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens_per_second, 2),
        "shards": n_shards,
        "shards_generated": todo,
        "shards_reused": [i for i in range(n_shards) if i not in todo],
        "paraphraser": cfg.models.paraphraser,
        "backend": cfg.paraphrase.backend,  # as configured; the log names what auto chose
        "rejected_examples": {r: ex for r, ex in rejected_examples.items() if ex},
    }
    work: Path = run.workdir
    # Written before the checks: on failure the local stats.json shows what went wrong (never committed).
    (work / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False), encoding="utf-8")
    check_rejection_rate(counts, cfg.paraphrase.max_rejection_rate, STAGE)
    if not pairs:
        raise StageFailed(STAGE, f"no paraphrase survived the filters ({counts.texts} texts)")
    with open(work / "pairs.jsonl", "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (work / "samples.json").write_text(
        json.dumps(_samples(pairs), indent=1, ensure_ascii=False), encoding="utf-8"
    )
    metrics = {
        "pairs": len(pairs),
        "rejection_rate": stats["rejection_rate"],
        "rejection_reasons": stats["rejection_reasons"],
        "tokens_per_second": stats["tokens_per_second"],
        "shards_generated": len(todo),
    }
    return run.commit(metrics)
