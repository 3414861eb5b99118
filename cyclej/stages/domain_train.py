"""Stage `domain_train` (INTERMEDIATE-2B): LoRA on INTERMEDIATE-1 as a language model of each domain,
max p(text_A | "{DA}") + p(text_B | "{DB}").

Input artifacts: `context` (its `model/`) and `data` (`a/train.txt`, `b/train.txt`; the dev files give
the dev loss). Output: `adapter/` (PEFT), `marker_rows.safetensors`, `metrics.json`, `metrics.jsonl` —
the adapter and the trained marker rows, never a full model copy. Checkpoints and resume are the
trainer's (cyclej.train), under this stage's fingerprint; they are deleted once the artifact commits.
"""

from __future__ import annotations

import torch

from cyclej.config import PipelineConfig
from cyclej.errors import BadInput
from cyclej.formats import domain_example
from cyclej.modeling import load_model, marker_token_ids
from cyclej.progress import Progress
from cyclej.stages import stage_fingerprint
from cyclej.stages.data import read_lines
from cyclej.store import ArtifactRef, ArtifactStore
from cyclej.train import base_dtype, commit_adapter, interleave, train

STAGE = "domain_train"


def run_domain_train(
    cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore, progress: Progress
) -> ArtifactRef:
    tcfg = cfg.domain_train
    if tcfg.lora is None:
        raise BadInput(f"{STAGE}.lora: null (full fine-tuning) is not supported here; the merge stage "
                       f"combines LoRA adapters, so set {STAGE}.lora (e.g. rank 8)")
    fp = stage_fingerprint(STAGE, cfg, {k: ref.fingerprint for k, ref in inputs.items()})
    work = store.workdir(STAGE, fp)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    markers = [cfg.domain_a.marker, cfg.domain_b.marker]
    base_dir = store.fetch(inputs["context"]) / "model"
    model, tokenizer = load_model(str(base_dir), markers=markers, dtype=base_dtype(tcfg.precision, device))
    marker_a, marker_b = marker_token_ids(tokenizer, markers)

    data = inputs["data"]
    train_examples = [domain_example(tokenizer, marker_a, t) for t in read_lines(store, data, "a", "train")]
    train_examples += [domain_example(tokenizer, marker_b, t) for t in read_lines(store, data, "b", "train")]
    dev_examples = interleave(
        [domain_example(tokenizer, marker_a, t) for t in read_lines(store, data, "a", "dev")],
        [domain_example(tokenizer, marker_b, t) for t in read_lines(store, data, "b", "dev")],
    )

    result = train(
        model.to(device),
        train_examples=train_examples,
        dev_examples=dev_examples,
        tcfg=tcfg,
        store=store,
        stage=STAGE,
        fp=fp,
        tokenizer=tokenizer,
        marker_ids=[marker_a, marker_b],
        progress=progress,
        metrics_path=work / "metrics.jsonl",
    )
    return commit_adapter(result, store, STAGE, fp, work, {"train_examples": len(train_examples),
                                                          "dev_examples": len(dev_examples)})
