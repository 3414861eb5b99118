"""What the two LoRA stages (`para_train`, `domain_train`) share: start from INTERMEDIATE-1 with its
markers, train an adapter with cyclej.train, write the adapter artifact and commit it.

Stage glue, so it lives among the stages: the trainer (cyclej.train) knows nothing of stages, configs
of the whole pipeline or fingerprints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cyclej.config import PipelineConfig, TrainConfig
from cyclej.errors import BadInput
from cyclej.modeling import load_model, marker_token_ids
from cyclej.precision import weights_dtype
from cyclej.progress import Progress
from cyclej.stages import stage_fingerprint
from cyclej.store import ArtifactRef, ArtifactStore
from cyclej.train import ADAPTER_BASE, TokenExample, train
from cyclej.training_signal import TRAINING_PLOT, read_metrics_log, write_training_plot


def interleave(*lists: Sequence[Any]) -> list[Any]:
    """a0, b0, a1, b1, …: a dev slice cut from the front holds both domains."""
    out: list[Any] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out



@dataclass
class LoraStage:
    """What both LoRA stages (para_train, domain_train) start from: INTERMEDIATE-1 with its markers."""

    stage: str
    tcfg: TrainConfig
    base: ArtifactRef  # the `context` artifact whose model the adapter is trained on
    fp: str
    work: Path
    model: nn.Module
    tokenizer: Any
    marker_a: int
    marker_b: int


def prepare_lora_stage(
    stage: str, tcfg: TrainConfig, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore
) -> LoraStage:
    """Refuse full fine-tuning (the merge combines LoRA deltas), locate the stage's work directory and
    load INTERMEDIATE-1 (the `context` artifact's model) with the two domain markers."""
    if tcfg.lora is None:
        raise BadInput(f"{stage}.lora: null (full fine-tuning) is not supported here; the merge stage "
                       f"combines LoRA adapters, so set {stage}.lora (e.g. rank 8)")
    fp = stage_fingerprint(stage, cfg, {k: ref.fingerprint for k, ref in inputs.items()})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    markers = [cfg.domain_a.marker, cfg.domain_b.marker]
    base_dir = store.fetch(inputs["context"]) / "model"
    model, tokenizer = load_model(str(base_dir), markers=markers, dtype=weights_dtype(tcfg.precision, device))
    marker_a, marker_b = marker_token_ids(tokenizer, markers)
    return LoraStage(stage, tcfg, inputs["context"], fp, store.workdir(stage, fp), model.to(device), tokenizer,
                     marker_a, marker_b)


def train_and_commit_adapter(
    st: LoraStage,
    store: ArtifactStore,
    train_examples: Sequence[TokenExample],
    dev_examples: Sequence[TokenExample],
    progress: Progress | None,
    extra: dict[str, Any],
) -> ArtifactRef:
    """The rest of both LoRA stages: train (resuming from the stage's checkpoints), write `adapter/`,
    `marker_rows.safetensors`, `base.json` (which `context` artifact it applies to, so `cyclej translate`
    can load it) and `metrics.json` (with `extra`) into the work dir, commit it, then drop the checkpoints
    (the committed artifact supersedes them)."""
    result = train(st.model, train_examples=train_examples, dev_examples=dev_examples, tcfg=st.tcfg,
                   store=store, stage=st.stage, fp=st.fp, tokenizer=st.tokenizer,
                   marker_ids=[st.marker_a, st.marker_b], progress=progress,
                   metrics_path=st.work / "metrics.jsonl")
    result.save_adapter(st.work)
    base = {"stage": st.base.stage, "fingerprint": st.base.fingerprint}
    (st.work / ADAPTER_BASE).write_text(json.dumps(base, indent=1) + "\n", encoding="utf-8")
    metrics = {**result.metrics, **extra}
    (st.work / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True), encoding="utf-8")
    write_training_plot(read_metrics_log(st.work / "metrics.jsonl"), st.work / TRAINING_PLOT,
                        f"{st.stage}: loss and update size")
    summary = {k: metrics[k] for k in ("dev_loss_before", "dev_loss_after", "final_train_loss", "steps",
                                       "resumed_from", "micro_batch_size")}
    ref = store.commit(st.stage, st.fp, st.work, metrics=summary)
    store.delete_checkpoints(st.stage, st.fp)
    return ref
