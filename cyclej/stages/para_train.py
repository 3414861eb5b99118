"""Stage `para_train` (INTERMEDIATE-2A): LoRA on INTERMEDIATE-1 to paraphrase across the markers,
max p(para | "{Dsrc}{text}{Dtgt}") + p(text | "{Dtgt}{para}{Dsrc}") for the pairs of both domains.

Two options change what it learns from (both off in the card):
- `paraphrase_markers: same` trains the paraphrases as ``{Dsrc} text {Dsrc}`` → para (and back), so they
  teach rewording without teaching that the *other* marker keeps the source's style;
- `template_pairs` adds back-translated template pairs ``{Dsrc} template {Dtgt}`` → a real line of the
  target domain (cyclej/corpora/template_transfer.py), which show the model what a change of style looks like.

Input artifacts: `context` (its `model/`), `paraphrase` (`pairs.jsonl`) and `data` (the train lines the
template pairs come from). A seeded slice of the pairs is held out for the dev loss. Output: `adapter/`
(PEFT), `marker_rows.safetensors`, `metrics.json`, `metrics.jsonl`, `template_pairs.jsonl` when those are
on — never a full model copy. Checkpoints and resume are the trainer's (cyclej.training.trainer),
under this stage's fingerprint; they are deleted once the artifact commits.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cyclej.config import DOMAIN_KEYS, OTHER, DomainKey, TemplatePairsConfig
from cyclej.corpora.formats import Example, para_examples, translation_example
from cyclej.corpora.template_transfer import BackTranslatedPair, TemplateTransfer, back_translated_pairs
from cyclej.errors import BadInput
from cyclej.generation.paraphraser import match_surface
from cyclej.pipeline.registry import StageRun
from cyclej.runtime.store import ArtifactRef
from cyclej.stages.lora import interleave, load_lora_base, train_and_commit_adapter

STAGE = "para_train"
MAX_DEV_FRACTION = 0.1
TEMPLATE_PAIRS = "template_pairs.jsonl"


def run_para_train(run: StageRun) -> ArtifactRef | None:
    tcfg = run.cfg.para_train
    base = load_lora_base(run, tcfg)
    tokenizer = base.tokenizer
    marker = {"a": base.marker_a, "b": base.marker_b}
    direction = paraphrase_markers(marker, tcfg.paraphrase_markers)
    n_dev = tcfg.eval_batches * tcfg.micro_batch_size

    pairs = read_pairs(run.input_dir("paraphrase") / "pairs.jsonl")
    train_pairs, dev_pairs = split_dev(pairs, n_dev, tcfg.seed)

    def examples(selected: list[dict[str, Any]]) -> list[Example]:
        return [
            ex
            for p in selected
            for ex in para_examples(tokenizer, *direction[p["domain"]], p["text"], _surface(p))
        ]

    def _surface(pair: dict[str, Any]) -> str:
        # Casing and tokenization are not the style being transferred: the paraphrase takes the source's.
        return (
            match_surface(pair["text"], pair["paraphrase"])
            if tcfg.match_source_surface
            else pair["paraphrase"]
        )

    train_examples = examples(train_pairs)
    dev_examples = examples(dev_pairs)
    extra: dict[str, Any] = {"train_pairs": len(train_pairs), "dev_pairs": len(dev_pairs)}

    if tcfg.template_pairs is not None:
        templates = template_pairs(run, tcfg.template_pairs, tcfg.seed)
        # The first pairs (both domains, interleaved) are held out for the dev loss, at most 10 %.
        k = min(n_dev // 2, int(len(templates) * MAX_DEV_FRACTION))

        def bt_examples(selected: list[BackTranslatedPair]) -> list[Example]:
            return [
                translation_example(
                    tokenizer, marker[p.source_domain], p.source, marker[p.target_domain], p.target
                )
                for p in selected
            ]

        # Shuffled in among the paraphrase examples, so every batch holds both kinds.
        train_examples += bt_examples(templates[k:])
        random.Random(f"{tcfg.seed}-mix").shuffle(train_examples)
        dev_examples = interleave(dev_examples, bt_examples(templates[:k]))
        extra |= {"template_pairs": len(templates) - k, "template_dev_pairs": k}

    extra["train_examples"] = len(train_examples)
    return train_and_commit_adapter(run, base, train_examples, dev_examples, extra)


def paraphrase_markers(marker: dict[str, int], mode: str) -> dict[str, tuple[int, int]]:
    """(source marker, marker the paraphrase is trained under) by the domain the original text is in:
    the other domain's (`across`, the card) or its own (`same`)."""
    return {d: (marker[d], marker[d] if mode == "same" else marker[OTHER[d]]) for d in DOMAIN_KEYS}


def template_pairs(run: StageRun, tpc: TemplatePairsConfig, seed: int) -> list[BackTranslatedPair]:
    """The back-translated template pairs of the data stage's train lines, written beside the adapter
    (`template_pairs.jsonl`) so a reader can see what the model was shown."""
    with run.progress.bar("template pairs", total=1, unit="fit") as bar:
        train: dict[DomainKey, Sequence[str]] = {d: run.lines(d, "train") for d in DOMAIN_KEYS}
        transfer = TemplateTransfer.from_config(train, tpc)
        pairs = back_translated_pairs(transfer, train, tpc.per_domain, seed)
        bar.update(1)
    if not pairs:
        raise BadInput(
            "para_train.template_pairs: no train line has a marker n-gram; lower "
            "para_train.template_pairs.min_salience or set template_pairs: null"
        )
    if run.is_main:  # every rank builds the same pairs; rank 0 alone writes the artifact's copy
        with open(run.workdir / TEMPLATE_PAIRS, "w", encoding="utf-8") as out:
            for p in pairs:
                out.write(
                    json.dumps({"target_domain": p.target_domain, "source": p.source, "target": p.target})
                    + "\n"
                )
    return pairs


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
        if (
            not isinstance(pair, dict)
            or pair.get("domain") not in DOMAIN_KEYS
            or not isinstance(pair.get("text"), str)
            or not isinstance(pair.get("paraphrase"), str)
        ):
            raise BadInput(
                f"{path}:{n}: needs domain 'a'|'b', text and paraphrase strings; re-run the paraphrase stage"
            )
        pairs.append(pair)
    if not pairs:
        raise BadInput(f"{path}: no pairs; the paraphrase stage kept nothing to train on")
    return pairs


def split_dev(
    pairs: list[dict[str, Any]], n_dev_examples: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out a seeded slice of each domain's pairs (two examples each, at most 10 % of the pairs),
    interleaved so the dev slice holds both domains. Returns (train pairs, dev pairs)."""
    per_domain = max(1, n_dev_examples // 4)
    train_pairs: list[dict[str, Any]] = []
    dev_by_domain = []
    for domain in DOMAIN_KEYS:
        mine = [p for p in pairs if p["domain"] == domain]
        random.Random(f"{seed}-{domain}").shuffle(mine)
        k = min(per_domain, int(len(mine) * MAX_DEV_FRACTION))
        dev_by_domain.append(mine[:k])
        train_pairs.extend(mine[k:])
    return train_pairs, interleave(*dev_by_domain)
