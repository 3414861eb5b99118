"""Fluency in the target domain: a word-level Kneser-Ney n-gram LM of that domain's train lines.

Why not perplexity under a neural LM: the base model (SmolLM2, GPT-J) finds its own babble ("I'm not sure
I'm sure I'm the only one who's got it, but I'm") far likelier than real lower-cased, tokenized Yelp lines
("the food was cold and the staff was rude ."), and any causal LM finds repetition likely once it has seen
it in context. A small n-gram LM of the *target domain* has no such taste: it knows only the domain's
words, spelling and phrasing, so text in another register, another casing or on another topic meets
unseen words and unseen n-grams.

One sentence gets two scores, both per word with the end of the line counted as a word (an output that
stops mid-sentence pays for an unlikely end):

- `perplexity`: exp(−log p_LM(sentence) / (words + 1)). Off-domain text (code, a recipe, chat-model
  babble with capitals and contractions the domain never writes) meets unseen words and is high.
- `slor` (syntactic log-odds ratio, Lau et al. 2017): (log p_LM(sentence) − log p_unigram(sentence)) /
  (words + 1), how much better the n-gram model predicts the sentence than word frequencies alone do.
  Frequent words in an order the domain never uses ("the the the the", word salad) have a low
  perplexity but a negative SLOR; real sentences are far better predicted in context than out of it.

A sentence is fluent when its perplexity is at most the `percentile`-th percentile of the perplexities
of held-out real lines of the domain (lines the LM was not fitted on) and its SLOR at least the
(100 − `percentile`)-th percentile of theirs. An empty sentence is never fluent. Pure Python, fitted in
about a second on a few thousand lines, deterministic, no download.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOS = "<s>"
EOS = "</s>"


def words(line: str) -> list[str]:
    """Whitespace tokens as they are: the domain's own casing and tokenization are part of its style."""
    return line.split()


def _discount(counts: Counter[tuple[str, ...]]) -> float:
    """Ney's absolute discount n1 / (n1 + 2·n2) from the count-of-counts
    (0.75 when it cannot be estimated)."""
    histogram = Counter(counts.values())
    n1, n2 = histogram.get(1, 0), histogram.get(2, 0)
    return n1 / (n1 + 2 * n2) if n1 and n2 else 0.75


class KneserNeyLM:
    """Interpolated Kneser-Ney word n-gram LM (order 3 by default). Lower orders use continuation counts
    (how many distinct words precede an n-gram), except for n-grams that start with `<s>`, which nothing
    can precede and keep their raw counts (as KenLM does). The unigram level is interpolated with a
    uniform distribution over the vocabulary plus one unknown word, which every unseen word gets."""

    def __init__(self, lines: Sequence[str], order: int = 3) -> None:
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        self.order = order
        raw: Counter[tuple[str, ...]] = Counter()
        self.word_counts: Counter[str] = Counter()  # raw frequencies (with one end of line per line)
        for line in lines:
            seq = [BOS] * (order - 1) + words(line) + [EOS]
            self.word_counts.update(seq[order - 1 :])
            for i in range(order - 1, len(seq)):
                raw[tuple(seq[i - order + 1 : i + 1])] += 1
        # Counts per order: raw for the top order, continuation (or raw, after <s>) below.
        self.counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order + 1)]
        self.counts[order] = raw
        for n in range(order, 1, -1):
            for gram in self.counts[n]:
                lower = gram[1:]
                self.counts[n - 1][lower] += 1 if lower[0] != BOS else 0
            for gram, c in self.counts[n].items():
                if gram[1] == BOS:  # a lower n-gram that starts with <s> keeps its raw count
                    self.counts[n - 1][gram[1:]] += c
        self.vocab = {g[0] for g in self.counts[1]} - {BOS}
        self.discounts = [0.0] + [_discount(self.counts[n]) for n in range(1, order + 1)]
        # Per context (n−1 words) at each order: total count and number of distinct continuations.
        self.context_total: list[dict[tuple[str, ...], int]] = [dict() for _ in range(order + 1)]
        self.context_types: list[dict[tuple[str, ...], int]] = [dict() for _ in range(order + 1)]
        for n in range(1, order + 1):
            totals: defaultdict[tuple[str, ...], int] = defaultdict(int)
            types: defaultdict[tuple[str, ...], int] = defaultdict(int)
            for gram, c in self.counts[n].items():
                totals[gram[:-1]] += c
                types[gram[:-1]] += 1
            self.context_total[n], self.context_types[n] = dict(totals), dict(types)
        self._word_total = sum(self.word_counts.values())
        self._uniform = 1.0 / (len(self.vocab) + 1)  # + the unknown word

    def prob(self, word: str, context: tuple[str, ...]) -> float:
        """p(word | the last order−1 words of context), interpolated down to the uniform distribution."""
        context = tuple(context[len(context) - (self.order - 1) :]) if self.order > 1 else ()
        p = self._uniform
        for n in range(1, self.order + 1):
            ctx = context[len(context) - (n - 1) :] if n > 1 else ()
            total = self.context_total[n].get(ctx, 0)
            if total == 0:
                continue  # unseen context: the lower order's estimate as it is
            d = self.discounts[n]
            c = self.counts[n].get((*ctx, word), 0)
            p = max(c - d, 0.0) / total + d * self.context_types[n][ctx] / total * p
        return p

    def unigram_prob(self, word: str) -> float:
        """Word frequency alone (add-one over the vocabulary plus the unknown word): SLOR's reference."""
        return (self.word_counts.get(word, 0) + 1) / (self._word_total + len(self.vocab) + 1)

    def logprob(self, line: str) -> tuple[float, float, int]:
        """(log p_LM, log p_unigram, scored tokens = words + 1 for the end of the line), natural logs."""
        toks = words(line)
        context = [BOS] * (self.order - 1)
        lm = uni = 0.0
        for w in [*toks, EOS]:
            lm += math.log(self.prob(w, tuple(context)))
            uni += math.log(self.unigram_prob(w))
            context = [*context[1:], w] if self.order > 1 else context
        return lm, uni, len(toks) + 1


REPEAT_NGRAM = 3  # word n-gram length of the repetition check
REPEAT_LIMIT = 3  # a line in which one word 3-gram occurs this often is a loop, not a sentence


def is_loop(line: str) -> bool:
    """True when one word 3-gram occurs REPEAT_LIMIT times or more: an n-gram LM scores a loop by its
    local windows and finds "the food was the food was the food was …" likely; real lines of the Yelp
    sample do this in 3 of 6,000 ("again and again and again and again")."""
    toks = words(line)
    grams = Counter(tuple(toks[i : i + REPEAT_NGRAM]) for i in range(len(toks) - REPEAT_NGRAM + 1))
    return bool(grams) and max(grams.values()) >= REPEAT_LIMIT


@dataclass(frozen=True)
class SentenceFluency:
    logprob: float  # log p_LM(words, end of line), natural log
    unigram_logprob: float  # the same under word frequencies alone
    tokens: int  # scored tokens: words + 1 for the end of the line; 0 for an empty line
    loop: bool  # is_loop

    @property
    def perplexity(self) -> float:
        """Per scored token; inf for an empty line."""
        return math.exp(-self.logprob / self.tokens) if self.tokens else math.inf

    @property
    def slor(self) -> float:
        """(log p_LM − log p_unigram) per scored token; -inf for an empty line."""
        return (self.logprob - self.unigram_logprob) / self.tokens if self.tokens else -math.inf


def score(lm: KneserNeyLM, line: str) -> SentenceFluency:
    if not words(line):
        return SentenceFluency(0.0, 0.0, 0, False)
    lm_lp, uni_lp, n = lm.logprob(line)
    return SentenceFluency(lm_lp, uni_lp, n, is_loop(line))


HELD_OUT_EVERY = 10  # every 10th train line calibrates the thresholds instead of fitting the LM


@dataclass
class DomainFluency:
    """The fluency judge of one domain: its n-gram LM and the thresholds set on its held-out lines.

    fluent(line) ⇔ non-empty, perplexity ≤ max_perplexity, slor ≥ min_slor and not a loop, where
    max_perplexity is the `percentile`-th percentile of the held-out lines' perplexities and min_slor the
    (100 − percentile)-th percentile of their SLORs."""

    lm: KneserNeyLM
    percentile: float
    max_perplexity: float
    min_slor: float
    fitted_lines: int
    held_out_lines: int
    held_out_fluent: float  # share of the held-out lines the thresholds call fluent

    @classmethod
    def fit(
        cls, train_lines: Sequence[str], order: int = 3, percentile: float = 97.5, max_lines: int = 50_000
    ) -> DomainFluency:
        """Fit on the first `max_lines` non-empty train lines of the domain, all but every HELD_OUT_EVERY-th,
        which set the thresholds (lines the LM has not seen, as the dev lines and the outputs are not)."""
        lines = [x for x in train_lines if words(x)][:max_lines]
        held = lines[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
        fitted = [x for i, x in enumerate(lines) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        if not held or not fitted:
            raise ValueError(
                f"fluency LM: need at least {HELD_OUT_EVERY} non-empty train lines, got {len(lines)}"
            )
        lm = KneserNeyLM(fitted, order)
        scores = [score(lm, x) for x in held]
        judge = cls(
            lm=lm,
            percentile=percentile,
            max_perplexity=_percentile([s.perplexity for s in scores], percentile),
            min_slor=_percentile([s.slor for s in scores], 100.0 - percentile),
            fitted_lines=len(fitted),
            held_out_lines=len(held),
            held_out_fluent=0.0,
        )
        judge.held_out_fluent = float(np.mean([judge.is_fluent(s) for s in scores]))
        return judge

    def is_fluent(self, s: SentenceFluency) -> bool:
        return (
            math.isfinite(s.perplexity)
            and s.perplexity <= self.max_perplexity
            and s.slor >= self.min_slor
            and not s.loop
        )

    def score(self, lines: Sequence[str]) -> list[SentenceFluency]:
        return [score(self.lm, x) for x in lines]

    def fluent(self, lines: Sequence[str]) -> list[bool]:
        return [self.is_fluent(s) for s in self.score(lines)]

    def summary(self) -> dict[str, float | int]:
        return {
            "order": self.lm.order,
            "vocabulary": len(self.lm.vocab),
            "fitted_lines": self.fitted_lines,
            "held_out_lines": self.held_out_lines,
            "percentile": self.percentile,
            "max_perplexity": round(self.max_perplexity, 3),
            "min_slor": round(self.min_slor, 4),
            "held_out_fluent": round(self.held_out_fluent, 4),
        }


def corpus_perplexity(scores: Sequence[SentenceFluency]) -> float:
    """exp(−Σ log p_LM / Σ scored tokens); inf when nothing was scored."""
    total = sum(s.logprob for s in scores)
    n = sum(s.tokens for s in scores)
    return math.exp(-total / n) if n else math.inf


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
