"""The `context` stage (INTERMEDIATE-1): the base model with both domain markers and a longer context.

1. Load `models.base` and add the two domain markers as special tokens (cyclej.models.loading).
2. Measure perplexity on held-out text at the old length (the untouched base, the reference).
3. Extend the context `context.factor` times by linear position interpolation.
4. Measure perplexity at the new length: `ppl_before` (interpolated, not yet trained).
5. LoRA-train on long sequences: the train lines of both domains, shuffled together, each followed by
   EOS, laid end to end and cut into rows of `context.seq_len` tokens. Every token of a row attends to
   everything before it, across line boundaries: learning to use distant positions is the point.
6. Merge the adapter into the weights, measure `ppl_after` at the new length and at the old length.
7. Save `model/` (plain HF directory, cyclej.models.loading.save_model, with `cyclej.json` naming the
   markers and domains), `metrics.json` and the trainer's per-step `metrics.jsonl`; commit.

Held-out rows are built the same way from both domains' dev lines; the old-length rows cut the very
same tokens into shorter rows, so every perplexity here scores the same tokens with more or less
context. Checkpoints and resume are the trainer's (cyclej.training.trainer), under this stage's fingerprint.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cyclej.corpora.formats import Example, encode_text, eos_id
from cyclej.errors import BadInput
from cyclej.models.card import write_model_info
from cyclej.models.loading import extend_context, load_model, marker_token_ids, save_model
from cyclej.pipeline.registry import StageRun
from cyclej.runtime.store import ArtifactRef
from cyclej.training.oom import map_halving
from cyclej.training.precision import autocast, weights_dtype

STAGE = "context"
log = logging.getLogger("cyclej")


def run_context(run: StageRun) -> ArtifactRef | None:
    cfg, ccfg, progress, device = run.cfg, run.cfg.context, run.progress, run.device
    work = run.workdir

    # On a GPU the frozen base sits in bf16 (LoRA's adapter weights stay fp32); on a CPU it stays fp32 and
    # `precision: bf16` means autocast, as in the trainer.
    markers = cfg.markers
    model, tokenizer = load_model(
        cfg.models.base, markers=markers, dtype=weights_dtype(ccfg.precision, device)
    )
    old_len = int(model.config.max_position_embeddings)
    new_len = int(math.ceil(old_len * ccfg.factor))
    seq_len = ccfg.seq_len
    if seq_len > new_len:
        raise BadInput(
            f"context.seq_len: {seq_len} tokens exceed the extended context ({old_len} × {ccfg.factor} = "
            f"{new_len}); lower context.seq_len or raise context.factor"
        )

    train_lines = run.lines("a", "train") + run.lines("b", "train")
    dev_lines = run.lines("a", "dev") + run.lines("b", "dev")
    train_rows = long_rows(tokenizer, train_lines, seq_len, seed=ccfg.seed)
    dev_stream = token_stream(tokenizer, dev_lines, seed=ccfg.seed + 1)
    eval_rows = [dev_stream[i : i + seq_len] for i in range(0, len(dev_stream) - seq_len + 1, seq_len)]
    if len(eval_rows) < ccfg.eval_sequences:
        log.warning(
            "context: the dev lines hold %d rows of %d tokens, fewer than context.eval_sequences=%d; "
            "perplexity uses %d",
            len(eval_rows),
            seq_len,
            ccfg.eval_sequences,
            len(eval_rows),
        )
    eval_rows = eval_rows[: ccfg.eval_sequences]
    if not train_rows or not eval_rows:
        which = "train" if not train_rows else "dev"
        raise BadInput(
            f"context: the {which} lines of both domains hold fewer tokens than one row of context.seq_len="
            f"{seq_len}; lower context.seq_len or add text"
        )
    # The same held-out tokens, cut at the old length (or left whole when the rows are not longer).
    eval_tokens = [t for row in eval_rows for t in row]
    old_eval_len = min(old_len, seq_len)
    old_rows = [
        eval_tokens[i : i + old_eval_len] for i in range(0, len(eval_tokens) - old_eval_len + 1, old_eval_len)
    ]

    # transformers types PreTrainedModel.to as @wraps(nn.Module.to): unbound, so mypy misreads it
    model.to(device)  # type: ignore[arg-type]
    batch = ccfg.micro_batch_size
    with progress.bar("perplexity before", total=2, unit="eval") as bar:
        ppl_base_old_len = perplexity(model, old_rows, batch, ccfg.precision)
        bar.update(1, ppl=ppl_base_old_len)
        extend_context(model, ccfg.factor)
        ppl_before = perplexity(model, eval_rows, batch, ccfg.precision)
        bar.update(1, ppl=ppl_before)

    train_examples = [Example(row, list(row)) for row in train_rows]
    dev_examples = [Example(row, list(row)) for row in eval_rows]
    model, train_metrics = _train(run, model, tokenizer, train_examples, dev_examples)
    if not run.is_main:  # on N GPUs, ranks 1…N-1 are done: rank 0 measures, writes and commits
        return None

    ppl_after = perplexity(model, eval_rows, batch, ccfg.precision)
    ppl_after_old_len = perplexity(model, old_rows, batch, ccfg.precision)

    # transformers types PreTrainedModel.to as @wraps(nn.Module.to): unbound, so mypy misreads it
    save_model(model.to("cpu"), tokenizer, work / "model")  # type: ignore[arg-type]
    # Marker tokens and domain names beside the weights, so `cyclej translate --model` needs no config.
    write_model_info(work / "model", markers, [cfg.domain_a.name, cfg.domain_b.name])
    metrics: dict[str, Any] = {
        "factor": ccfg.factor,
        "old_context": old_len,
        "old_eval_len": old_eval_len,
        "new_context": int(model.config.max_position_embeddings),
        "seq_len": seq_len,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "eval_tokens": len(eval_tokens),
        "ppl_base_old_len": ppl_base_old_len,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "ppl_after_old_len": ppl_after_old_len,
        "train": train_metrics,
    }
    summary = {k: metrics[k] for k in ("ppl_before", "ppl_after", "ppl_base_old_len", "ppl_after_old_len")}
    # resumed_from in the summary, as in the other training stages: the UI shows a retry resumed
    return run.commit(
        {
            **summary,
            "new_context": metrics["new_context"],
            "resumed_from": train_metrics.get("resumed_from", []),
        },
        metrics,
    )


# ---- data -------------------------------------------------------------------------------------------
def token_stream(tokenizer: PreTrainedTokenizerBase, lines: list[str], seed: int) -> list[int]:
    """The lines in a seeded random order, each tokenized on its own and followed by EOS, end to end."""
    order = list(lines)
    random.Random(seed).shuffle(order)
    eos = eos_id(tokenizer)
    stream: list[int] = []
    for line in order:
        stream.extend(encode_text(tokenizer, line))
        stream.append(eos)
    return stream


def long_rows(
    tokenizer: PreTrainedTokenizerBase, lines: list[str], seq_len: int, seed: int
) -> list[list[int]]:
    """The stream cut into full rows of `seq_len` tokens (the short tail is dropped)."""
    stream = token_stream(tokenizer, lines, seed)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


# ---- evaluation -------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(
    model: PreTrainedModel, rows: list[list[int]], batch_size: int, precision: str = "fp32"
) -> float:
    """exp(mean next-token loss) over every predicted token of the rows (all rows the same length)."""
    if not rows:
        raise ValueError("perplexity needs at least one row")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def score(chunk: Sequence[list[int]]) -> tuple[float, int]:
        ids = torch.tensor(list(chunk), dtype=torch.long, device=device)
        with autocast(precision, device):
            logits = model(input_ids=ids).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        return float(nll), ids[:, 1:].numel()

    # An out-of-memory error halves the batch and redoes only the chunk that failed: the sum does not
    # depend on the chunking (cyclej.training.oom.map_halving).
    parts = map_halving(score, rows, batch_size, point="perplexity", knob="context.seq_len")
    model.train(was_training)
    return math.exp(sum(n for n, _ in parts) / sum(t for _, t in parts))


# ---- training ----------------------------------------------------------------------------------------
def _train(
    run: StageRun,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: list[Example],
    dev_examples: list[Example],
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """LoRA (or full) training with the shared trainer; returns the merged model and the run's metrics."""
    from cyclej.training.trainer import train

    cfg = run.cfg
    # Every row is already one full `seq_len` block of the stream: packing has nothing to add, and its
    # 4D block mask would cost seq_len² memory per row and rule out the fused causal attention kernels.
    tcfg = cfg.context.model_copy(update={"packing": False})
    result = train(
        model,
        train_examples=train_examples,
        tcfg=tcfg,
        checkpoints=run.checkpoints,
        tokenizer=tokenizer,
        dev_examples=dev_examples,
        marker_ids=marker_token_ids(tokenizer, cfg.markers),
        progress=run.progress,
        metrics_path=run.workdir / "metrics.jsonl",
    )
    # LoRA merged into the weights and the trained marker rows written into the embeddings.
    return result.merged_model(), dict(result.metrics)
