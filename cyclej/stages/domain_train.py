"""Stage `domain_train` (INTERMEDIATE-2B): LoRA on INTERMEDIATE-1 as a language model of each domain,
max p(text_A | "{DA}") + p(text_B | "{DB}").

Input artifacts: `context` (its `model/`) and `data` (`a/train.txt`, `b/train.txt`; the dev files give
the dev loss). Output: `adapter/` (PEFT), `marker_rows.safetensors`, `metrics.json`, `metrics.jsonl` —
the adapter and the trained marker rows, never a full model copy. Checkpoints and resume are the
trainer's (cyclej.training.trainer), under this stage's fingerprint;
they are deleted once the artifact commits.
"""

from __future__ import annotations

from cyclej.corpora.formats import domain_example
from cyclej.pipeline.registry import StageRun
from cyclej.runtime.store import ArtifactRef
from cyclej.stages.lora import interleave, load_lora_base, train_and_commit_adapter

STAGE = "domain_train"


def run_domain_train(run: StageRun) -> ArtifactRef | None:
    base = load_lora_base(run, run.cfg.domain_train)
    tokenizer, marker_a, marker_b = base.tokenizer, base.marker_a, base.marker_b

    train_examples = [domain_example(tokenizer, marker_a, t) for t in run.lines("a", "train")]
    train_examples += [domain_example(tokenizer, marker_b, t) for t in run.lines("b", "train")]
    dev_examples = interleave(
        [domain_example(tokenizer, marker_a, t) for t in run.lines("a", "dev")],
        [domain_example(tokenizer, marker_b, t) for t in run.lines("b", "dev")],
    )

    return train_and_commit_adapter(
        run,
        base,
        train_examples,
        dev_examples,
        {
            "train_examples": len(train_examples),
            "dev_examples": len(dev_examples),
        },
    )
