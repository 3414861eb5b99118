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

import dataclasses
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cyclej.config import DOMAIN_KEYS, OTHER, DomainKey, TemplatePairsConfig
from cyclej.corpora.formats import Example, para_examples, translation_example
from cyclej.corpora.template_transfer import BackTranslatedPair, TemplateTransfer, back_translated_pairs
from cyclej.errors import BadInput
from cyclej.evaluation.judge import train_judge
from cyclej.generation.back_translation import BackTranslation, filter_rewrites, pick_lines, rewrite_lines
from cyclej.generation.paraphraser import match_surface
from cyclej.models.embedder import load_embedder
from cyclej.pipeline.registry import StageRun
from cyclej.reinforcement.rewards import embedding_similarity
from cyclej.runtime.distributed import broadcast_object, gather_objects, rank, world_size
from cyclej.runtime.jsonl import read_jsonl
from cyclej.runtime.store import ArtifactRef
from cyclej.stages.lora import (
    LoraModel,
    commit_adapter,
    interleave,
    load_lora_base,
    train_adapter,
    train_and_commit_adapter,
)
from cyclej.training.oom import release_memory
from cyclej.training.trainer import TrainResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STAGE = "para_train"
log = logging.getLogger("cyclej.stages.para_train")
MAX_DEV_FRACTION = 0.1
TEMPLATE_PAIRS = "template_pairs.jsonl"
BT_PAIRS = "bt-pairs"  # the checkpoint that holds the kept back-translations between the two phases
BT_PAIRS_FILE = "back_translation_pairs.jsonl"  # also in the artifact, for a reader
BT_PREFIX = "bt-"  # phase 2's checkpoints: bt-step-…
BT_METRICS = "metrics_back_translation.jsonl"
JUDGE_LINES = 20_000  # train lines per domain for the style judge that filters the rewrites


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
    if tcfg.back_translation is None:
        return train_and_commit_adapter(run, base, train_examples, dev_examples, extra)
    return train_with_back_translation(run, base, train_examples, dev_examples, extra)


def train_with_back_translation(
    run: StageRun,
    base: LoraModel,
    train_examples: list[Example],
    dev_examples: list[Example],
    extra: dict[str, Any],
) -> ArtifactRef | None:
    """Phase 1: `max_steps` on the examples. Then the adapter rewrites train lines of each domain into the
    other (cyclej.generation.back_translation); the kept rewrites become ``{Dother} rewrite {Dline}`` →
    line examples. Phase 2: `back_translation.steps` more on all of them, from phase 1's tensors.

    Resume: phase 1 ends on a checkpoint of its last step, so a retry gets its tensors back without a
    step; the kept pairs are checkpoint `bt-pairs`; phase 2 checkpoints as `bt-step-…`."""
    tcfg = run.cfg.para_train
    bt = tcfg.back_translation
    assert bt is not None
    first = train_adapter(run, base, train_examples, dev_examples)
    pairs, stats = back_translation_pairs(run, first, base.tokenizer)
    # Phase 2 trains the same base again (no second copy in memory), from phase 1's tensors.
    first_state = {k: v.detach().clone() for k, v in first.trainable_state.items()}
    first_metrics = dict(first.metrics)
    plain = first.unwrapped_model()
    del first
    release_memory()
    second = dataclasses.replace(base, tcfg=tcfg.model_copy(update={"max_steps": bt.steps}), model=plain)
    marker = {"a": second.marker_a, "b": second.marker_b}
    reverse = [
        translation_example(second.tokenizer, marker[OTHER[p.domain]], p.rewrite, marker[p.domain], p.line)
        for p in pairs
    ]
    rng = random.Random(f"{tcfg.seed}-back-translation-mix")
    examples = [*phase_one_sample(train_examples, len(reverse), bt.reverse_share, rng), *reverse]
    rng.shuffle(examples)
    result = train_adapter(
        run,
        second,
        examples,
        dev_examples,
        metrics_name=BT_METRICS,
        checkpoint_prefix=BT_PREFIX,
        initial_trainable=first_state,
    )
    extra |= {
        "back_translation": stats,
        "back_translation_pairs": len(pairs),
        "first_phase": {
            **{k: first_metrics.get(k) for k in ("steps", "dev_loss_before", "dev_loss_after")},
            "train_examples": len(train_examples),
        },
        "train_examples": len(examples),
        "reverse_examples": len(reverse),
    }
    # One curve: phase 2's steps after phase 1's.
    records = read_jsonl(run.workdir / "metrics.jsonl") if run.is_main else []
    offset = int(first_metrics["steps"])
    if run.is_main:
        records += [{**r, "step": r["step"] + offset} for r in read_jsonl(run.workdir / BT_METRICS)]
    return commit_adapter(run, result, extra, plot_records=records)


def phase_one_sample(
    examples: list[Example], n_reverse: int, reverse_share: float, rng: random.Random
) -> list[Example]:
    """Phase 1's examples to train on beside `n_reverse` reverse pairs, so that the pairs are
    `reverse_share` of phase 2's examples: a seeded sample, or all of them (no pairs kept, or too few
    phase-1 examples for the share)."""
    if n_reverse == 0:
        return list(examples)
    want = round(n_reverse * (1 - reverse_share) / reverse_share)
    return list(examples) if want >= len(examples) else rng.sample(examples, want)


def back_translation_pairs(
    run: StageRun, first: TrainResult, tokenizer: Any
) -> tuple[list[BackTranslation], dict[str, Any]]:
    """The kept back-translations of phase 1's adapter, from checkpoint `bt-pairs` when a previous try
    made them. On N ranks each rewrites a share of the lines; rank 0 filters, saves and sends the pairs."""
    cfg = run.cfg
    bt = cfg.para_train.back_translation
    assert bt is not None
    found = run.checkpoints.latest(prefix=BT_PAIRS) if run.is_main else None
    saved = None
    if found is not None:
        saved = _read_bt_checkpoint(found[1])
        log.info("para_train: back-translation pairs from checkpoint %s (%d pairs)", found[0], len(saved[0]))
    if world_size() > 1:
        saved = broadcast_object(saved)
    if saved is not None:
        if run.is_main:
            _write_pairs(run.workdir / BT_PAIRS_FILE, saved[0])
        return saved

    train = {d: run.lines(d, "train") for d in DOMAIN_KEYS}
    lines = pick_lines(train, bt.lines_per_domain, cfg.para_train.seed)
    markers = (cfg.markers[0], cfg.markers[1])
    # With the adapter as it is (LoRA layers, marker-row hooks): merging it would change the weights
    # that phase 2 trains on.
    model = cast("PreTrainedModel", first.model)  # peft-wrapped: it forwards and generates like one
    mine = rewrite_lines(model, tokenizer, markers, lines, bt, run.progress, (rank(), world_size()))
    shares = gather_objects(mine)
    out: tuple[list[BackTranslation], dict[str, Any]] | None = None
    if run.is_main:
        rewrites = {d: interleave(*(s[d] for s in shares)) for d in DOMAIN_KEYS}
        judge = train_judge(
            train["a"][:JUDGE_LINES],
            train["b"][:JUDGE_LINES],
            run.lines("a", "dev"),
            run.lines("b", "dev"),
            seed=cfg.para_train.seed,
        )
        embedder = load_embedder(cfg.models.embedder, run.device)
        out = filter_rewrites(
            lines,
            rewrites,
            judge.accuracy,
            lambda src, outs: embedding_similarity(embedder, src, outs),
            bt.min_similarity,
        )
        del embedder
        _write_pairs(run.workdir / BT_PAIRS_FILE, out[0])
        ckpt = run.checkpoints.workdir(BT_PAIRS)
        _write_pairs(ckpt / BT_PAIRS_FILE, out[0])
        (ckpt / "stats.json").write_text(json.dumps(out[1], indent=1) + "\n", encoding="utf-8")
        run.checkpoints.save(BT_PAIRS, ckpt)
        for direction, counts in out[1].items():
            log.info("para_train: back-translation %s: %s", direction, counts)
    if world_size() > 1:
        out = broadcast_object(out)
    assert out is not None
    return out


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


def _write_pairs(path: Path, pairs: list[BackTranslation]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for p in pairs:
            out.write(json.dumps(p.as_json()) + "\n")


def _read_bt_checkpoint(folder: Path) -> tuple[list[BackTranslation], dict[str, Any]]:
    pairs = [BackTranslation(**row) for row in read_jsonl(folder / BT_PAIRS_FILE)]
    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    return pairs, stats
