"""Stage `domain_train` (INTERMEDIATE-2B): LoRA on INTERMEDIATE-1 as a language model of each domain,
max p(text_A | "{DA}") + p(text_B | "{DB}").

Input artifacts: `context` (its `model/`) and `data` (`a/train.txt`, `b/train.txt`; the dev files give
the dev loss). Output: `adapter/` (PEFT), `marker_rows.safetensors`, `metrics.json`, `metrics.jsonl` —
the adapter and the trained marker rows, never a full model copy. Checkpoints and resume are the
trainer's (cyclej.train), under this stage's fingerprint; they are deleted once the artifact commits.
"""

from __future__ import annotations

from cyclej.config import PipelineConfig
from cyclej.corpus import read_lines
from cyclej.formats import domain_example
from cyclej.progress import Progress
from cyclej.stages.lora import interleave, prepare_lora_stage, train_and_commit_adapter
from cyclej.store import ArtifactRef, ArtifactStore

STAGE = "domain_train"


def run_domain_train(
    cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore, progress: Progress
) -> ArtifactRef:
    tcfg = cfg.domain_train
    st = prepare_lora_stage(STAGE, tcfg, cfg, inputs, store)
    tokenizer, marker_a, marker_b = st.tokenizer, st.marker_a, st.marker_b

    data = inputs["data"]
    train_examples = [domain_example(tokenizer, marker_a, t) for t in read_lines(store, data, "a", "train")]
    train_examples += [domain_example(tokenizer, marker_b, t) for t in read_lines(store, data, "b", "train")]
    dev_examples = interleave(
        [domain_example(tokenizer, marker_a, t) for t in read_lines(store, data, "a", "dev")],
        [domain_example(tokenizer, marker_b, t) for t in read_lines(store, data, "b", "dev")],
    )

    return train_and_commit_adapter(st, store, train_examples, dev_examples, progress, {
        "train_examples": len(train_examples), "dev_examples": len(dev_examples),
    })
