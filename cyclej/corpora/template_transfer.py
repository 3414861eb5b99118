"""Template style transfer from two unpaired corpora, and the back-translated pairs para_train learns from.

Why: a small model trained only on paraphrases (a text and a rewording of it in the *same* style) learns to
keep the source's style whatever the target marker says. On Yelp with SmolLM2-135M the merged model
(INTERMEDIATE-3) flipped the sentiment of ~14 % of lines, and RL cannot reward a flip it never samples
(docs/results/yelp-rl-rewards.md). These pairs show the model what a flip looks like.

The method is "TemplateBased" from Li, Jia, He and Liang, *Delete, Retrieve, Generate: a Simple Approach
to Sentiment and Style Transfer* (NAACL 2018), used here only to make training *sources*:

1. **Markers.** An n-gram u is a marker of domain d when its smoothed count ratio
   (count_d(u) + λ) / (count_other(u) + λ) is at least `min_salience` (counted on the train corpora).
2. **Delete.** A sentence's markers of its own domain are cut out (longest n-grams first); what is left
   is its content, with one slot per cut run of tokens.
3. **Retrieve.** The train sentence of the other domain whose content is nearest (TF-IDF cosine) and
   that has markers of its own.
4. **Template.** The slots are filled with the retrieved sentence's markers, in order.

The templates are often ungrammatical, so they are never training *targets*: a pair is (template of a
real sentence y of domain d into the other domain, y), and para_train learns
``{D_other} template {D_d}`` → y: a noisy source in the other style, a real sentence of the target
style as the answer (back-translation's rule: the clean side is the side the model learns to write).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from cyclej.config import DOMAIN_KEYS, OTHER, DomainKey, TemplatePairsConfig

SMOOTHING = 1.0  # λ of the salience ratio: an n-gram unseen in the other domain needs min_salience − 1 uses


def _ngrams(tokens: Sequence[str], max_n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1)]


@dataclass(frozen=True)
class Deleted:
    """A sentence with its markers cut out: `content` holds its tokens with None at each cut run,
    `slots` the cut runs (each a list of tokens), in order."""

    content: list[str | None]
    slots: list[list[str]]

    @property
    def content_text(self) -> str:
        return " ".join(t for t in self.content if t is not None)


class TemplateTransfer:
    """Markers, content retrieval and templates, fitted on the train corpora of both domains.
    Texts are split on whitespace, as the shipped corpora are tokenized."""

    def __init__(
        self,
        train: dict[DomainKey, Sequence[str]],
        min_salience: float = 5.0,
        max_ngram: int = 3,
        retrieve_top: int = 20,
    ) -> None:
        if min_salience <= 1.0:
            raise ValueError(f"min_salience must be above 1 (a ratio of counts), got {min_salience}")
        self.max_ngram = max_ngram
        self.retrieve_top = retrieve_top
        self.train = {d: [x for x in train[d] if x.split()] for d in DOMAIN_KEYS}
        counts = {
            d: Counter(g for x in self.train[d] for g in _ngrams(x.split(), max_ngram)) for d in DOMAIN_KEYS
        }
        self.markers: dict[DomainKey, set[tuple[str, ...]]] = {
            d: {
                g
                for g, c in counts[d].items()
                if (c + SMOOTHING) / (counts[OTHER[d]][g] + SMOOTHING) >= min_salience
            }
            for d in DOMAIN_KEYS
        }
        self.deleted = {d: [self.delete(x, d) for x in self.train[d]] for d in DOMAIN_KEYS}
        # Content retrieval: TF-IDF over the content words of both domains' train sentences.
        self.vectorizer = TfidfVectorizer(analyzer="word", token_pattern=r"\S+", sublinear_tf=True)
        self.vectorizer.fit([s.content_text for d in DOMAIN_KEYS for s in self.deleted[d]])
        self.content_matrix = {
            d: self.vectorizer.transform([s.content_text for s in self.deleted[d]]) for d in DOMAIN_KEYS
        }

    @classmethod
    def from_config(
        cls, train: dict[DomainKey, Sequence[str]], tpc: TemplatePairsConfig | None
    ) -> TemplateTransfer:
        """Fitted with `para_train.template_pairs`' markers and retrieval (its defaults when it is off)."""
        tpc = tpc or TemplatePairsConfig()
        return cls(train, tpc.min_salience, tpc.max_ngram, tpc.retrieve_top)

    def delete(self, text: str, domain: DomainKey) -> Deleted:
        """Cut `domain`'s markers out of `text`, longest n-grams first."""
        tokens = text.split()
        cut = [False] * len(tokens)
        for n in range(self.max_ngram, 0, -1):
            for i in range(len(tokens) - n + 1):
                if not any(cut[i : i + n]) and tuple(tokens[i : i + n]) in self.markers[domain]:
                    cut[i : i + n] = [True] * n
        content: list[str | None] = []
        slots: list[list[str]] = []
        i = 0
        while i < len(tokens):
            if not cut[i]:
                content.append(tokens[i])
                i += 1
                continue
            j = i
            while j < len(tokens) and cut[j]:
                j += 1
            slots.append(tokens[i:j])
            content.append(None)
            i = j
        return Deleted(content, slots)

    def transfer(self, text: str, to: DomainKey) -> str | None:
        """`text` (of the other domain) with its markers replaced by those of the nearest `to` sentence;
        None when it has no markers, or no near `to` sentence has any (nothing to swap)."""
        source = self.delete(text, OTHER[to])
        if not source.slots:
            return None
        query = self.vectorizer.transform([source.content_text])
        scores = (self.content_matrix[to] @ query.T).toarray().ravel()
        nearest = np.argsort(-scores, kind="stable")[: self.retrieve_top]
        fill = next((self.deleted[to][j].slots for j in nearest if self.deleted[to][j].slots), None)
        if fill is None:
            return None
        out: list[str] = []
        used = 0
        for token in source.content:
            if token is None:
                out.extend(fill[min(used, len(fill) - 1)])  # fewer markers than slots: repeat the last
                used += 1
            else:
                out.append(token)
        return " ".join(out)


@dataclass(frozen=True)
class BackTranslatedPair:
    """Train `{D_source} source {D_target}` → target: `target` is a real sentence of `target_domain`,
    `source` its template in the other domain."""

    target_domain: DomainKey
    source: str
    target: str

    @property
    def source_domain(self) -> DomainKey:
        return OTHER[self.target_domain]


def back_translated_pairs(
    transfer: TemplateTransfer,
    targets: dict[DomainKey, Sequence[str]],
    per_domain: int,
    seed: int | None = None,
) -> list[BackTranslatedPair]:
    """Up to `per_domain` pairs whose targets are lines of `targets[d]` for each domain, in order, or in a
    seeded shuffle when `seed` is given; lines whose template is empty or unchanged are skipped. Domains
    alternate (a, b, a, …)."""
    by_domain: dict[DomainKey, list[BackTranslatedPair]] = {}
    for d in DOMAIN_KEYS:
        lines = [y for y in targets[d] if y.split()]
        if seed is not None:
            random.Random(f"{seed}-template-{d}").shuffle(lines)
        pairs: list[BackTranslatedPair] = []
        for y in lines:
            if len(pairs) == per_domain:
                break
            x = transfer.transfer(y, OTHER[d])
            if x and x != y:
                pairs.append(BackTranslatedPair(d, x, y))
        by_domain[d] = pairs
    out: list[BackTranslatedPair] = []
    for i in range(max(len(p) for p in by_domain.values())):
        out.extend(by_domain[d][i] for d in DOMAIN_KEYS if i < len(by_domain[d]))
    return out


class TemplateSystem:
    """The template transfer as an evaluation row (a baseline with no model: does the neural translator
    beat string substitution?). A line with nothing to swap comes back unchanged."""

    def __init__(self, transfer: TemplateTransfer) -> None:
        self.transfer = transfer
        self.last_runaway: list[bool] = []

    def __call__(self, lines: list[str], to: DomainKey) -> list[str]:
        self.last_runaway = [False] * len(lines)
        return [self.transfer.transfer(x, to) or x for x in lines]
