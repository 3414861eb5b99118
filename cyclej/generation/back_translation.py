"""Back-translation pairs (the pre-training of DualRL and of unsupervised MT): a model that has learned
some transfer rewrites real train lines of each domain into the other; the rewrites that the style judge
puts in the other domain and that stay close to their line in embedding space become pairs whose
*source* is synthetic and whose *target* is the real line, ``{Dother} rewrite {Dline}`` → line.

Why the real line as the target: the model then learns to write text as the corpus writes it (its words,
its tokenization, no corrupted words), from inputs as noisy as its own outputs — the direction a
translator is used in. The filters keep the pairs that show a change of style and not a change of topic:
a copy, an empty or runaway line, a rewrite the judge still puts in the line's own domain, or one whose
embedding moved away from the line teaches nothing or teaches babble.

Used by `para_train` (`para_train.back_translation`) between its two training phases; on N ranks each
translates a share of the lines with its copy of the model (cyclej.stages.para_train).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cyclej.config import DOMAIN_KEYS, OTHER, BackTranslationConfig, DomainKey
from cyclej.generation.backends import TransformersBackend
from cyclej.generation.translate import translate_detailed
from cyclej.runtime.progress import Progress

# Why a rewrite is not kept, in the order the filters are applied.
REASONS = ("empty", "runaway", "copy", "style", "similarity")


@dataclass(frozen=True)
class BackTranslation:
    """A real train `line` of `domain`, and the model's `rewrite` of it into the other domain."""

    domain: DomainKey
    line: str
    rewrite: str
    similarity: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def pick_lines(
    train: Mapping[DomainKey, Sequence[str]], per_domain: int, seed: int
) -> dict[DomainKey, list[str]]:
    """A seeded sample of at most `per_domain` distinct train lines of each domain."""
    out: dict[DomainKey, list[str]] = {}
    for d in DOMAIN_KEYS:
        lines = list(dict.fromkeys(line.strip() for line in train[d] if line.strip()))
        random.Random(f"{seed}-back-translation-{d}").shuffle(lines)
        out[d] = lines[:per_domain]
    return out


def rewrite_lines(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    markers: tuple[str, str],
    lines: Mapping[DomainKey, Sequence[str]],
    cfg: BackTranslationConfig,
    progress: Progress,
    share: tuple[int, int] = (0, 1),
) -> dict[DomainKey, list[tuple[str, bool]]]:
    """Greedy rewrites (text, ran away) of `lines[d]` into the other domain, for the lines i with
    i % W == r when `share` is (r, W): rank r of W translates its share."""
    r, world = share
    backend = TransformersBackend(model, tokenizer, batch_size=cfg.batch_size)
    out: dict[DomainKey, list[tuple[str, bool]]] = {}
    for d in DOMAIN_KEYS:
        mine = list(lines[d])[r::world]
        done: list[tuple[str, bool]] = []
        with progress.bar(f"back-translation {d}->{OTHER[d]}", total=len(mine), unit="line") as bar:
            for i in range(0, len(mine), cfg.batch_size):
                chunk = mine[i : i + cfg.batch_size]
                done += [
                    (t.text, t.runaway)
                    for t in translate_detailed(
                        backend, tokenizer, chunk, OTHER[d], markers, cfg.max_new_tokens
                    )
                ]
                bar.update(len(chunk))
        out[d] = done
    return out


def _words(text: str) -> list[str]:
    return text.lower().split()


def filter_rewrites(
    lines: Mapping[DomainKey, Sequence[str]],
    rewrites: Mapping[DomainKey, Sequence[tuple[str, bool]]],
    in_domain: Callable[[list[str], DomainKey], list[float]],
    similarity: Callable[[list[str], list[str]], list[float]],
    min_similarity: float,
) -> tuple[list[BackTranslation], dict[str, Any]]:
    """The kept pairs (domain a's, then b's) and counts per direction: translated, kept and each
    reason in `REASONS`. `in_domain(texts, d)`: 1.0 where a style judge puts the text in domain d
    (cyclej.evaluation.judge.StyleJudge.accuracy); `similarity(lines, rewrites)`: per pair, e.g. the
    embedding cosine (cyclej.reinforcement.rewards.embedding_similarity)."""
    kept: dict[DomainKey, list[BackTranslation]] = {}
    stats: dict[str, Any] = {}
    for d in DOMAIN_KEYS:
        src, outs = list(lines[d]), list(rewrites[d])
        texts = [t for t, _ in outs]
        sims = similarity(src, texts) if src else []
        styled = in_domain(texts, OTHER[d]) if src else []
        reasons: Counter[str] = Counter()
        mine: list[BackTranslation] = []
        for line, (text, runaway), sim, ok in zip(src, outs, sims, styled, strict=True):
            if not text.strip():
                reasons["empty"] += 1
            elif runaway:
                reasons["runaway"] += 1
            elif _words(text) == _words(line):
                reasons["copy"] += 1
            elif not ok:
                reasons["style"] += 1
            elif sim < min_similarity:
                reasons["similarity"] += 1
            else:
                mine.append(BackTranslation(d, line, text, round(float(sim), 4)))
        kept[d] = mine
        stats[f"{d}->{OTHER[d]}"] = {
            "translated": len(src),
            "kept": len(mine),
            **{f"rejected_{k}": reasons[k] for k in REASONS},
        }
    return kept["a"] + kept["b"], stats
