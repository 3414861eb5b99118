"""What the two LoRA stages (`para_train`, `domain_train`) share: start from INTERMEDIATE-1 with its
markers, train an adapter with cyclej.training.trainer, write the adapter artifact and commit it.

Stage glue, so it lives among the stages: the trainer (cyclej.training.trainer) knows nothing of stages,
configs of the whole pipeline or fingerprints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from cyclej.config import TrainConfig
from cyclej.errors import BadInput
from cyclej.models.loading import load_model, marker_token_ids
from cyclej.pipeline.registry import StageRun
from cyclej.runtime.jsonl import read_jsonl
from cyclej.runtime.store import ArtifactRef
from cyclej.training.diagnostics import TRAINING_PLOT, write_training_plot
from cyclej.training.precision import weights_dtype
from cyclej.training.trainer import ADAPTER_BASE, TokenExample, TrainResult, train


def interleave(*lists: Sequence[Any]) -> list[Any]:
    """a0, b0, a1, b1, …: a dev slice cut from the front holds both domains."""
    out: list[Any] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


@dataclass
class LoraModel:
    """What both LoRA stages (para_train, domain_train) start from: INTERMEDIATE-1 with its markers."""

    tcfg: TrainConfig
    model: nn.Module
    tokenizer: Any
    marker_a: int
    marker_b: int


def load_lora_base(run: StageRun, tcfg: TrainConfig) -> LoraModel:
    """Refuse full fine-tuning (the merge combines LoRA deltas) and load INTERMEDIATE-1 (the `context`
    artifact's model) with the two domain markers."""
    if tcfg.lora is None:
        raise BadInput(
            f"{run.name}.lora: null (full fine-tuning) is not supported here; the merge stage "
            f"combines LoRA adapters, so set {run.name}.lora (e.g. rank 8)"
        )
    cfg = run.cfg
    markers = cfg.markers
    base_dir = run.input_dir("context") / "model"
    model, tokenizer = load_model(
        str(base_dir), markers=markers, dtype=weights_dtype(tcfg.precision, run.device)
    )
    marker_a, marker_b = marker_token_ids(tokenizer, markers)
    # transformers types PreTrainedModel.to as @wraps(nn.Module.to): unbound, so mypy misreads it
    return LoraModel(tcfg, model.to(run.device), tokenizer, marker_a, marker_b)  # type: ignore[arg-type]


def train_and_commit_adapter(
    run: StageRun,
    base: LoraModel,
    train_examples: Sequence[TokenExample],
    dev_examples: Sequence[TokenExample],
    extra: dict[str, Any],
) -> ArtifactRef | None:
    """The rest of both LoRA stages: train (resuming from the stage's checkpoints), then `commit_adapter`.
    None on ranks 1…N-1 of a stage on N GPUs."""
    result = train_adapter(run, base, train_examples, dev_examples)
    return commit_adapter(run, result, extra)


def train_adapter(
    run: StageRun,
    base: LoraModel,
    train_examples: Sequence[TokenExample],
    dev_examples: Sequence[TokenExample],
    *,
    metrics_name: str = "metrics.jsonl",
    checkpoint_prefix: str = "",
    initial_trainable: Mapping[str, Tensor] | None = None,
) -> TrainResult:
    """cyclej.training.trainer.train with the stage's checkpoints, progress and markers; its log is
    `metrics_name` in the work dir. A second phase (para_train's back-translation) passes its own log,
    checkpoint prefix and the first phase's tensors."""
    return train(
        base.model,
        train_examples=train_examples,
        dev_examples=dev_examples,
        tcfg=base.tcfg,
        checkpoints=run.checkpoints,
        tokenizer=base.tokenizer,
        marker_ids=[base.marker_a, base.marker_b],
        progress=run.progress,
        metrics_path=run.workdir / metrics_name,
        checkpoint_prefix=checkpoint_prefix,
        initial_trainable=initial_trainable,
    )


def commit_adapter(
    run: StageRun,
    result: TrainResult,
    extra: dict[str, Any],
    plot_records: list[dict[str, Any]] | None = None,
) -> ArtifactRef | None:
    """Write `adapter/`, `marker_rows.safetensors`, `base.json` (which `context` artifact it applies to, so
    `cyclej translate` can load it) and `metrics.json` (with `extra`) into the work dir, commit it, then
    drop the checkpoints (the committed artifact supersedes them). The training plot shows
    `plot_records` (default: the work dir's `metrics.jsonl`). None on ranks 1…N-1."""
    work = run.workdir
    if not run.is_main:  # on N GPUs, ranks 1…N-1 are done: rank 0 writes and commits the adapter
        return None
    result.save_adapter(work)
    context = run.inputs["context"]
    adapter_base = {"stage": context.stage, "fingerprint": context.fingerprint}
    (work / ADAPTER_BASE).write_text(json.dumps(adapter_base, indent=1) + "\n", encoding="utf-8")
    metrics = {**result.metrics, **extra}
    write_training_plot(
        plot_records if plot_records is not None else read_jsonl(work / "metrics.jsonl"),
        work / TRAINING_PLOT,
        f"{run.name}: loss and update size",
    )
    summary = {
        k: metrics[k]
        for k in (
            "dev_loss_before",
            "dev_loss_after",
            "final_train_loss",
            "steps",
            "resumed_from",
            "micro_batch_size",
        )
    }
    return run.commit(summary, metrics, drop_checkpoints=True)
