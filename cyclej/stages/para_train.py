"""Stage `para_train` (INTERMEDIATE-2A): LoRA on INTERMEDIATE-1 to paraphrase across the markers,
max p(para | "{Dsrc}{text}{Dtgt}") + p(text | "{Dtgt}{para}{Dsrc}") for the pairs of both domains.

Input artifacts: `context` (its `model/`) and `paraphrase` (`pairs.jsonl`). A seeded slice of the pairs
is held out for the dev loss. Output: `adapter/` (PEFT), `marker_rows.safetensors`, `metrics.json`,
`metrics.jsonl` — never a full model copy. Checkpoints and resume are the trainer's (cyclej.train),
under this stage's fingerprint; they are deleted once the artifact commits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from cyclej.errors import BadInput
from cyclej.formats import Example, para_examples
from cyclej.paraphrase import match_surface
from cyclej.stages import StageRun
from cyclej.stages.lora import interleave, load_lora_base, train_and_commit_adapter
from cyclej.store import ArtifactRef

STAGE = "para_train"
MAX_DEV_FRACTION = 0.1


def run_para_train(run: StageRun) -> ArtifactRef:
    tcfg = run.cfg.para_train
    base = load_lora_base(run, tcfg)
    tokenizer = base.tokenizer
    # (source marker, target marker) by the domain the original text is in.
    direction = {"a": (base.marker_a, base.marker_b), "b": (base.marker_b, base.marker_a)}

    pairs = read_pairs(run.input_dir("paraphrase") / "pairs.jsonl")
    train_pairs, dev_pairs = split_dev(pairs, tcfg.eval_batches * tcfg.micro_batch_size, tcfg.seed)

    def examples(selected: list[dict[str, Any]]) -> list[Example]:
        return [ex for p in selected for ex in para_examples(tokenizer, *direction[p["domain"]], p["text"],
                                                             _surface(p))]

    def _surface(pair: dict[str, Any]) -> str:
        # Casing and tokenization are not the style being transferred: the paraphrase takes the source's.
        return match_surface(pair["text"], pair["paraphrase"]) if tcfg.match_source_surface else pair["paraphrase"]

    train_examples = examples(train_pairs)
    dev_examples = examples(dev_pairs)

    return train_and_commit_adapter(run, base, train_examples, dev_examples, {
        "train_pairs": len(train_pairs), "dev_pairs": len(dev_pairs), "train_examples": len(train_examples),
    })


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """The paraphrase artifact's pairs; BadInput naming the line of a malformed one."""
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except ValueError:
            raise BadInput(f"{path}:{n}: not a JSON object; re-run the paraphrase stage") from None
        if (not isinstance(pair, dict) or pair.get("domain") not in ("a", "b")
                or not isinstance(pair.get("text"), str) or not isinstance(pair.get("paraphrase"), str)):
            raise BadInput(f"{path}:{n}: needs domain 'a'|'b', text and paraphrase strings; "
                           "re-run the paraphrase stage")
        pairs.append(pair)
    if not pairs:
        raise BadInput(f"{path}: no pairs; the paraphrase stage kept nothing to train on")
    return pairs


def split_dev(pairs: list[dict[str, Any]], n_dev_examples: int, seed: int
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out a seeded slice of each domain's pairs (two examples each, at most 10 % of the pairs),
    interleaved so the dev slice holds both domains. Returns (train pairs, dev pairs)."""
    per_domain = max(1, n_dev_examples // 4)
    train_pairs: list[dict[str, Any]] = []
    dev_by_domain = []
    for domain in ("a", "b"):
        mine = [p for p in pairs if p["domain"] == domain]
        random.Random(f"{seed}-{domain}").shuffle(mine)
        k = min(per_domain, int(len(mine) * MAX_DEV_FRACTION))
        dev_by_domain.append(mine[:k])
        train_pairs.extend(mine[k:])
    return train_pairs, interleave(*dev_by_domain)
