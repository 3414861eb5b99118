"""Paraphrase prompts, output cleaning and filters (the `paraphrase` stage's building blocks).

Prompts use the paraphraser's own chat template. Some templates have no system role (Mistral-7B-Instruct
v0.1 raises on one); there the instruction is the whole user turn and the system prompt is left out. A
tokenizer without a chat template (base or tiny models) gets a plain completion prompt.

Every candidate is cleaned (preambles, quotes and labels stripped, first paragraph kept), then judged by
plain filters in a fixed order; the first that fails is its rejection reason:
  empty · refusal · commentary (the output talks about the text instead of rewriting it: "This sentence
  uses …", "In this context, …", a word such as "paraphrase" the source does not have) · copy (normalized
  equality or self-BLEU above a threshold) · runaway (length ratio outside bounds) · drift (embedding
  similarity below a threshold; only with an embedder).
Of the surviving candidates of one text the best is kept: highest similarity, else lowest self-BLEU.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cyclej.errors import StageFailed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cyclej.config import ParaphraseConfig

REASONS: tuple[str, ...] = ("empty", "refusal", "commentary", "copy", "runaway", "drift")
_SYSTEM_PROBE = "cyclej-system-role-probe"

# ---- prompts --------------------------------------------------------------------------------------


def supports_system_role(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the chat template renders a system message (not: raises on it, or drops it silently)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    from jinja2 import TemplateError

    messages = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hello"}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:  # Mistral v0.1: raise_exception('Only user and assistant roles are supported!')
        return False
    return _SYSTEM_PROBE in str(rendered)


def user_message(instruction: str, text: str) -> str:
    return f"{instruction}\n\nText: {text}"


def build_messages(
    text: str, instruction: str, system_prompt: str | None, system_role: bool
) -> list[dict[str, str]]:
    """The chat turns for one text: the instruction always in the user turn,
    a system turn only where allowed."""
    messages = []
    if system_role and system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_message(instruction, text)})
    return messages


class PromptBuilder:
    """Token-id prompts for one paraphraser tokenizer (the system-role check runs once)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, instruction: str, system_prompt: str | None
    ) -> None:
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.system_role = supports_system_role(tokenizer)

    def text(self, source: str) -> str:
        if not self.has_template:
            return f"{user_message(self.instruction, source)}\nParaphrase:"
        messages = build_messages(source, self.instruction, self.system_prompt, self.system_role)
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def ids(self, source: str) -> list[int]:
        # A rendered template already holds its BOS token as text; encoding must not add a second one.
        return list(self.tokenizer(self.text(source), add_special_tokens=not self.has_template)["input_ids"])


# ---- cleaning -------------------------------------------------------------------------------------

_OPENERS = re.compile(r"^(?:sure|certainly|of course|okay|ok|absolutely)\b[!,.]*\s*", re.IGNORECASE)
# "Here is a paraphrase of the text:", "Here's the rewritten version:" (a short lead-in ending in ':').
_HERE_IS = re.compile(r"^here(?:'s|’s| is| are)\b[^:\n]{0,80}:\s*", re.IGNORECASE)
# "I'll rephrase it to:", "I would rewrite it as:", "Let me paraphrase that:" (SmolLM2's habit; in
# the corpus's own tokenization "i 'll rephrase it to :"). A lead-in, not a sentence: it ends in ':'.
_I_WILL = re.compile(
    r"^(?:i\s*(?:'|’)\s*ll|i\s+(?:will|would|can|could)|let\s+me|we\s+(?:can|could))\s+"
    r"(?:re(?:phrase|word|write)|paraphrase)\b(?:\s+[^\s:]+){0,5}\s*:\s*",
    re.IGNORECASE,
)
# Labels: "Paraphrase:", "Paraphrased text:", "Rewritten version:", "Output:", "**Paraphrase:**",
# "The original text is:" (small models quote the source; stripped, it is then caught as a copy).
_LABEL = re.compile(
    r"^\**\s*(?:the\s+)?(?:paraphrase[sd]?|rewrite|output|answer|result|text|"
    r"(?:paraphrased|rewritten|original|new)(?:\s+(?:text|version|sentence|review))?"
    r"(?:\s+(?:is|reads|would be))?)\s*\**\s*:\s*\**\s*",
    re.IGNORECASE,
)
# The rewrite inside a comment: "The text could be rephrased to: It looked so disgusting!", "The original
# text does not convey …; the revised text would be: I'm aware mistakes are made." A lead of at most 120
# characters ending in a rewrite verb (+ to/as) and ':' is dropped; what follows is judged as usual.
_INNER_LEAD = re.compile(
    r"^[^:\n]{0,120}?\b(?:re(?:phras|word|writ)\w*|paraphras\w*|revised\s+(?:text|version))\b"
    r"(?:\s+(?:it|that|this|the\s+text))?(?:\s+(?:to|as|would\s+be|is))?\s*:\s*",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "„": "“", "`": "`"}


def strip_quotes(text: str) -> str:
    """Remove one pair of surrounding quotes (repeatedly: '"«text»"' → 'text')."""
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]]:
        text = text[1:-1].strip()
    return text


def leading_quote(text: str) -> str:
    """A quoted sentence that opens the text and is followed by more ('"The soup was cold." This
    paraphrase keeps …' → 'The soup was cold.'); the text itself otherwise."""
    if len(text) < 2 or text[0] not in _QUOTES:
        return text
    end = text.find(_QUOTES[text[0]], 1)
    quoted = text[1:end].strip() if end > 1 else ""
    # A whole sentence in quotes ('"Cold." This …'), not a quoted term that the sentence goes on about
    # ("'Twenty minutes' is a colloquial expression …") nor an apostrophe ('It's …).
    if not quoted or quoted[-1] not in ".!?":
        return text
    return quoted


def clean_output(raw: str) -> str:
    """The paraphrase proper: lead-ins and labels stripped, the first paragraph, a leading quote kept,
    quotes removed, one line."""
    text = _INNER_LEAD.sub("", raw.strip(), count=1).strip()
    for _ in range(3):  # "Sure! Here is a paraphrase: Paraphrase: …" peels in a few rounds
        before = text
        text = _OPENERS.sub("", text, count=1).strip()
        text = _HERE_IS.sub("", text, count=1).strip()
        text = _I_WILL.sub("", text, count=1).strip()
        text = _LABEL.sub("", text, count=1).strip()
        if text == before:
            break
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    text = paragraphs[0] if paragraphs else ""
    text = strip_quotes(leading_quote(" ".join(text.split())))
    return text


# ---- filters --------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Case, punctuation and spacing folded away: what 'the same text' means for the copy filter."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch if ch.isalnum() else " " for ch in text)
    return " ".join(text.split())


def self_bleu(source: str, candidate: str) -> float:
    """Sentence BLEU of the candidate against its source, in [0, 1] (1: a copy)."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(candidate, [source]).score) / 100.0


def length_ratio(source: str, candidate: str) -> float:
    return len(candidate) / max(len(source), 1)


def is_empty(candidate: str) -> bool:
    return not normalize(candidate)


_REFUSALS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\bI(?:'m|’m| am)\s+(?:so\s+|very\s+)?sorry\b",
        r"\bI\s+(?:cannot|can't|can’t|can not|won't|will not|am unable to|'m unable to|’m unable to)\b",
        r"\bI\s+apologi[sz]e\b",
        r"\bas an AI\b",
        r"\bas a (?:large )?language model\b",
        r"\bI(?:'m|’m| am) not (?:able|allowed|comfortable)\b",
    )
]


def is_refusal(source: str, candidate: str) -> bool:
    """A refusal phrase in the output that the source does not contain itself
    (a review may say 'I'm sorry')."""
    return any(p.search(candidate) and not p.search(source) for p in _REFUSALS)


# Commentary: the model describes or explains the text ("The original text conveys that …", "In this
# context, 'sloppy' is a more precise …"); kept as pairs, para_train learns to write them as translations
# (the yelp preset's 2A leaked "i 'll rephrase it to :"). SmolLM2-135M on the demo's 128 candidates:
# 43 on Yelp and 42 on Shakespeare are rejected as commentary, every one of them commentary by reading.
_COMMENTARY = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^(?:this|the|that|your|my)\s+(?:original\s+|given\s+|new\s+)?(?:sentence|text|phrase|"
        r"paraphrase|statement|review|passage|rewrite|version|wording)\s+(?:is|uses|has|was|means|"
        r"conveys|expresses|suggests|implies|describes|shows|maintains|keeps|captures|reads|sounds|"
        r"could|can|would|emphasi[sz]es|highlights)\b",
        r"^in\s+(?:this|the|that)\s+(?:context|sentence|text|case|paraphrase|version|review)\b",
        r"^(?:note|explanation|translation|meaning)\s*:",
        r"\b(?:paraphras\w*|rephras\w*|reword\w*|rewrit\w*)\b",
        r"\b(?:the|this)\s+(?:original\s+)?(?:sentence|text)\b",
        # Shakespeare: "… is a colloquial expression that is often used to describe …", "'Pompey'
        # represents …" (an explanation of a word, not a rewrite).
        r"\b(?:colloquial|idiomatic|figurative|informal|formal|common)\s+(?:expression|phrase|idiom|term)\b",
        r"\b(?:is|are)\s+(?:often\s+|commonly\s+)?used\s+to\s+(?:describe|express|convey|refer)\b",
        r"\b(?:represents|symboli[sz]es|refers\s+to)\b",
    )
]


def is_commentary(source: str, candidate: str) -> bool:
    """A commentary pattern in the output that the source does not match itself (a review may say
    'the text on the menu …')."""
    return any(p.search(candidate) and not p.search(source) for p in _COMMENTARY)


def is_copy(source: str, candidate: str, max_copy_bleu: float) -> bool:
    return normalize(source) == normalize(candidate) or self_bleu(source, candidate) > max_copy_bleu


def is_runaway(source: str, candidate: str, min_ratio: float, max_ratio: float) -> bool:
    return not min_ratio <= length_ratio(source, candidate) <= max_ratio


def is_drift(similarity: float, min_similarity: float) -> bool:
    return similarity < min_similarity


def cheap_rejection(source: str, candidate: str, cfg: ParaphraseConfig) -> str | None:
    """The first failing filter among those that need no model, or None."""
    if is_empty(candidate):
        return "empty"
    if is_refusal(source, candidate):
        return "refusal"
    if is_commentary(source, candidate):
        return "commentary"
    if is_copy(source, candidate, cfg.max_copy_bleu):
        return "copy"
    if is_runaway(source, candidate, cfg.min_length_ratio, cfg.max_length_ratio):
        return "runaway"
    return None


# ---- judging one text's candidates ----------------------------------------------------------------

Embed = Callable[[list[str]], Any]  # texts -> [n, d] unit-norm embeddings (numpy or torch)


@dataclass
class Judged:
    """The verdict on one source text: the kept paraphrase (or None) and every candidate's fate."""

    text: str
    paraphrase: str | None
    scores: dict[str, float]
    reasons: list[str]  # rejection reason of each rejected candidate
    rejected: list[tuple[str, str]]  # (reason, cleaned candidate)


def judge_candidates(
    sources: Sequence[str],
    candidates: Sequence[Sequence[str]],
    cfg: ParaphraseConfig,
    embed: Embed | None = None,
) -> list[Judged]:
    """Clean and filter each text's raw candidates and keep the best survivor.

    The embedder (when given) runs once over every source and every candidate that passed the cheap
    filters, so drift costs one batched encode per call, not one per pair.
    """
    cleaned = [[clean_output(c) for c in cands] for cands in candidates]
    verdicts: list[list[str | None]] = [
        [cheap_rejection(src, c, cfg) for c in cands] for src, cands in zip(sources, cleaned, strict=True)
    ]
    similarity: dict[tuple[int, int], float] = {}
    if embed is not None:
        todo = [(i, k) for i, v in enumerate(verdicts) for k, r in enumerate(v) if r is None]
        if todo:
            needed = sorted({i for i, _ in todo})
            vecs = embed([sources[i] for i in needed] + [cleaned[i][k] for i, k in todo])
            src_row = {i: n for n, i in enumerate(needed)}
            for n, (i, k) in enumerate(todo):
                sim = float((vecs[src_row[i]] * vecs[len(needed) + n]).sum())
                similarity[(i, k)] = sim
                if is_drift(sim, cfg.min_similarity):
                    verdicts[i][k] = "drift"
    out = []
    for i, src in enumerate(sources):
        survivors = []
        for k, cand in enumerate(cleaned[i]):
            if verdicts[i][k] is not None:
                continue
            scores = {
                "self_bleu": round(self_bleu(src, cand), 4),
                "length_ratio": round(length_ratio(src, cand), 4),
            }
            if (i, k) in similarity:
                scores["similarity"] = round(similarity[(i, k)], 4)
            survivors.append((cand, scores))
        best: tuple[str, dict[str, float]] | None = None
        if survivors:
            if embed is not None:
                best = max(survivors, key=lambda s: s[1]["similarity"])
            else:
                best = min(survivors, key=lambda s: s[1]["self_bleu"])
        rejected = [(r, c) for r, c in zip(verdicts[i], cleaned[i], strict=True) if r is not None]
        out.append(
            Judged(
                text=src,
                paraphrase=best[0] if best else None,
                scores=best[1] if best else {},
                reasons=[r for r, _ in rejected],
                rejected=rejected,
            )
        )
    return out


# ---- counting and the rejection limit -------------------------------------------------------------


@dataclass
class RejectionStats:
    """Counts over texts and candidates; `rejection_rate` is the share of texts left without a paraphrase."""

    texts: int = 0
    kept: int = 0
    candidates: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def add(self, judged: Sequence[Judged], n_candidates: int) -> None:
        self.texts += len(judged)
        self.kept += sum(j.paraphrase is not None for j in judged)
        self.candidates += len(judged) * n_candidates
        for j in judged:
            self.reasons.update(j.reasons)

    @property
    def rejected(self) -> int:
        return self.texts - self.kept

    @property
    def rejection_rate(self) -> float:
        return self.rejected / self.texts if self.texts else 0.0

    def top_reasons(self, k: int = 3) -> str:
        top = [(r, n) for r, n in self.reasons.most_common(k) if n > 0]
        return ", ".join(f"{r} {n}" for r, n in top) or "none"

    def as_dict(self) -> dict[str, Any]:
        return {
            "texts": self.texts,
            "kept": self.kept,
            "rejected": self.rejected,
            "rejection_rate": round(self.rejection_rate, 4),
            "candidates": self.candidates,
            "rejection_reasons": {r: int(self.reasons.get(r, 0)) for r in REASONS},
        }


def check_rejection_rate(stats: RejectionStats, max_rate: float, stage: str = "paraphrase") -> None:
    """Fail the stage, with the rate and the top reasons in the message, when too few texts survived."""
    rate = stats.rejection_rate
    if rate > max_rate:
        raise StageFailed(
            stage,
            f"rejection rate {rate:.2f} > {max_rate:.2f} (top reasons: {stats.top_reasons()}); "
            f"{stats.rejected} of {stats.texts} texts got no paraphrase: check the paraphraser and its "
            "prompt, or loosen the paraphrase filters or paraphrase.max_rejection_rate",
        )


# ---- the embedder ---------------------------------------------------------------------------------


def load_embedder(spec: str) -> Embed:
    """A sentence-transformers encoder (cyclej.models.embedder, as the RL reward and the evaluation load it)
    returning unit-norm embeddings."""
    from cyclej.models.embedder import load_embedder as load_sentence_transformer

    encoder = load_sentence_transformer(spec)

    def embed(texts: list[str]) -> Any:
        return encoder.encode(
            texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )

    return embed


# ---- surface form ------------------------------------------------------------------------------------
# English clitics and punctuation as tokenized corpora (Yelp, many MT sets) split them: "n't", "'s", ", ".
_CLITIC = re.compile(r"(\w)(n't|'s|'m|'re|'ve|'ll|'d)\b", re.IGNORECASE)
_PUNCT = re.compile(r"\s*([.,!?;:()\"])\s*")


def match_surface(source: str, paraphrase: str) -> str:
    """The paraphrase written in the source's surface form: lower-cased when the source is, punctuation and
    clitics split off by spaces when the source has them so ("should n't", "cold ."). Instruct models write
    standard prose; trained on it as is, the rewriter would learn to change casing and tokenization, which
    are not the style being transferred, and its outputs would no longer look like the domain's text."""
    out = paraphrase
    if source == source.lower():
        out = out.lower()
    if re.search(r"\w n't\b|\w '(s|m|re|ve|ll|d)\b", source) or re.search(r"\w [.,!?]( |$)", source):
        out = _CLITIC.sub(r"\1 \2", out)
        out = _PUNCT.sub(r" \1 ", out)
    return " ".join(out.split())
