"""Evaluation: translate the dev sets both ways with each system and score style, content and fluency.

Per system and direction (a→b, b→a) and pooled over both ("overall"):

- style_acc   the share of outputs the style judge (cyclej.evaluation.judge, TF-IDF + logistic regression,
              trained on the train corpora, independent of the RL discriminator) assigns to the target
              domain;
- self_bleu   corpus BLEU (sacrebleu) of the outputs against their sources (content kept, or copied);
- similarity  mean cosine similarity of output and source sentence embeddings (cfg.models.embedder);
- ref_bleu    corpus BLEU against human references, when the dev sets are line-aligned translations;
- perplexity  per-word perplexity of the outputs under a Kneser-Ney trigram LM of the *target* domain's
              train lines (cyclej.evaluation.fluency), and `fluent`, the share of outputs that LM's calibrated
              thresholds call fluent (real held-out lines of the domain pass ~95 %; babble, loops,
              off-topic text and runaways do not);
- runaway     the share of outputs whose generation hit its token limit without ending (no EOS, no line
              break), for systems that report it (`last_runaway`, as ModelTranslator does);
- length_ratio mean over sentences of output words / source words;
- cycle_bleu  corpus BLEU of the back-translation (output translated back) against the source;
- J           mean over sentences of acc_i × sim_i × fluent_i (see J_DEFINITION).

Systems are callables `system(lines, to) -> lines` or model directories; models are loaded one at a time
and released before the next, then the embedder and the fluency LM are loaded once each.

This module runs the systems and gathers the per-sentence scores; the scorers are in
cyclej.evaluation.scorers, the report (tables, files, J's definition) in cyclej.evaluation.report, its plots
in cyclej.evaluation.plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cyclej.config import DOMAIN_KEYS, DomainKey, PipelineConfig
from cyclej.evaluation.fluency import DomainFluency, SentenceFluency, corpus_perplexity
from cyclej.evaluation.judge import StyleJudge, train_judge
from cyclej.evaluation.report import EvalReport
from cyclej.evaluation.scorers import Embedder, bleu, j_score, length_ratio
from cyclej.generation.translate import ModelTranslator, load_for_translation, local_model_dir
from cyclej.runtime.progress import Progress

System = Callable[[list[str], DomainKey], list[str]]

SYSTEM_COPY = "copy-input"
SYSTEM_TEMPLATE = "template-baseline"
SYSTEM_2A = "INTERMEDIATE-2A"
SYSTEM_3 = "INTERMEDIATE-3"
SYSTEM_RL = "CYCLE-J"


class CopySystem:
    """The baseline: every sentence returned unchanged (perfect content, no style change, always ends)."""

    def __init__(self) -> None:
        self.last_runaway: list[bool] = []

    def __call__(self, lines: list[str], to: DomainKey) -> list[str]:
        self.last_runaway = [False] * len(lines)
        return list(lines)


copy_system = CopySystem()


# ---- the evaluation ------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One system in one direction: sources, outputs, back-translations and per-sentence scores."""

    system: str
    direction: str  # "a->b" or "b->a"
    target: DomainKey
    sources: list[str]
    outputs: list[str]
    back: list[str]
    references: list[str] | None
    runaway: list[bool] | None  # None: the system does not report it
    acc: list[float] = field(default_factory=list)
    sim: list[float] = field(default_factory=list)
    fluency: list[SentenceFluency] = field(default_factory=list)
    fluent: list[float] = field(default_factory=list)


def _row(system: str, runs: list[_Run]) -> dict[str, Any]:
    sources = [s for r in runs for s in r.sources]
    outputs = [o for r in runs for o in r.outputs]
    back = [b for r in runs for b in r.back]
    acc = [x for r in runs for x in r.acc]
    sim = [x for r in runs for x in r.sim]
    fluent = [x for r in runs for x in r.fluent]
    runaway = None if any(r.runaway is None for r in runs) else [x for r in runs for x in r.runaway or []]
    with_refs = [r for r in runs if r.references is not None]
    ref_bleu = (
        bleu([o for r in with_refs for o in r.outputs], [x for r in with_refs for x in r.references or []])
        if with_refs
        else None
    )
    return {
        "system": system,
        "n": len(outputs),
        "style_acc": float(np.mean(acc)) if acc else 0.0,
        "self_bleu": bleu(outputs, sources),
        "similarity": float(np.mean(sim)) if sim else 0.0,
        "ref_bleu": ref_bleu,
        "perplexity": corpus_perplexity([x for r in runs for x in r.fluency]),
        "fluent": float(np.mean(fluent)) if fluent else 0.0,
        "runaway": float(np.mean(runaway)) if runaway else (None if runaway is None else 0.0),
        "length_ratio": length_ratio(outputs, sources),
        "cycle_bleu": bleu(back, sources),
        "J": j_score(acc, sim, fluent),
    }


def as_system(
    system: System | str | Path,
    markers: tuple[str, str],
    batch_size: int,
    max_new_tokens: int,
    backend: Literal["auto", "transformers", "vllm"] = "transformers",
    expected_tokens: int = 0,
) -> System:
    """A callable as is; a model directory (or artifact URI) becomes a lazily loaded ModelTranslator.
    `expected_tokens` (what the evaluation will generate with it) decides `backend: auto`."""
    if callable(system):
        return system
    path = str(system)
    return ModelTranslator(
        loader=lambda: load_for_translation(local_model_dir(path), markers, backend, expected_tokens),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )


def evaluate(
    systems: dict[str, System | str | Path],
    dev_a: list[str],
    dev_b: list[str],
    train_a: list[str],
    train_b: list[str],
    cfg: PipelineConfig,
    references: dict[DomainKey, list[str]] | None = None,
    progress: Progress | None = None,
    judge: StyleJudge | None = None,
    rl_log: list[dict[str, Any]] | None = None,
) -> EvalReport:
    """Translate the first `cfg.eval.max_examples` dev lines of each domain into the other domain with
    every system (and back), then score them. `references[d]` holds, line by line, the human translation
    of `dev_d` into the other domain (only when the dev sets are line-aligned)."""
    if not systems:
        raise ValueError("evaluate: no systems given")
    progress = progress or Progress(show_bar=False)
    ev = cfg.eval
    markers = cfg.markers
    n = ev.max_examples
    src = {"a": list(dev_a[:n]), "b": list(dev_b[:n])}
    refs = {d: list(references[d][:n]) for d in DOMAIN_KEYS if references and references.get(d)}
    if judge is None:
        judge = train_judge(train_a, train_b, dev_a, dev_b, seed=cfg.data.seed)

    # 1. Translations, one system (one model in memory) at a time.
    runs: list[_Run] = []
    with progress.bar("translate", total=4 * len(systems), unit="pass") as bar:
        for name, spec in systems.items():
            # Both directions, each translated and translated back.
            expected_tokens = 2 * (len(src["a"]) + len(src["b"])) * ev.max_new_tokens
            system = as_system(spec, markers, ev.batch_size, ev.max_new_tokens, ev.backend, expected_tokens)
            directions: tuple[tuple[DomainKey, DomainKey], ...] = (("a", "b"), ("b", "a"))
            for source_domain, target in directions:
                sources = src[source_domain]
                outputs = _checked(system(sources, target), sources, name)  # type: ignore[arg-type]
                runaway = _runaway_flags(system, len(outputs))
                bar.update(1)
                back = _checked(system(outputs, source_domain), outputs, name)  # type: ignore[arg-type]
                bar.update(1)
                runs.append(
                    _Run(
                        name,
                        f"{source_domain}->{target}",
                        target,
                        sources,
                        outputs,
                        back,  # type: ignore[arg-type]
                        refs.get(source_domain),
                        runaway,
                    )
                )  # type: ignore[arg-type]
            release = getattr(system, "release", None)
            if callable(release):
                release()

    # 2. Style and content.
    for r in runs:
        r.acc = judge.accuracy(r.outputs, r.target)
    embedder = Embedder(cfg.models.embedder)
    for r in runs:
        r.sim = embedder.similarity(r.outputs, r.sources)
    del embedder

    # 3. Fluency in the target domain: an n-gram LM per domain, thresholds from its held-out train lines.
    fluency = {
        d: DomainFluency.fit(lines, ev.fluency_order, ev.fluency_percentile, ev.fluency_max_lines)
        for d, lines in (("a", train_a), ("b", train_b))
    }
    for r in runs:
        judge_of_target = fluency[r.target]
        r.fluency = judge_of_target.score(r.outputs)
        ran_away = r.runaway or [False] * len(r.outputs)
        r.fluent = [
            1.0 if judge_of_target.is_fluent(s) and not gone else 0.0
            for s, gone in zip(r.fluency, ran_away, strict=True)
        ]

    rows = [_row(name, [r for r in runs if r.system == name]) for name in systems]
    direction_rows = [{**_row(r.system, [r]), "direction": r.direction} for r in runs]
    return EvalReport(
        rows=rows,
        direction_rows=direction_rows,
        judge_dev_accuracy=judge.dev_accuracy,
        judge_dev_accuracy_a=judge.dev_accuracy_a,
        judge_dev_accuracy_b=judge.dev_accuracy_b,
        fluency={d: f.summary() for d, f in fluency.items()},
        embedder=cfg.models.embedder,
        domains=(cfg.domain_a.name, cfg.domain_b.name),
        examples=_examples(runs, list(systems)),
        rl_log=list(rl_log or []),
    )


def model_label(model_dir: Path) -> str:
    """A row name for a model folder: `<stage>/<fingerprint>` for an artifact's model/,
    else the folder name."""
    p = Path(model_dir)
    return f"{p.parent.parent.name}/{p.parent.name}" if p.name == "model" else p.name


def _runaway_flags(system: System, n: int) -> list[bool] | None:
    """Which outputs of the system's last call ran away, when it says (ModelTranslator.last_runaway)."""
    flags = getattr(system, "last_runaway", None)
    return [bool(x) for x in flags] if isinstance(flags, list) and len(flags) == n else None


def _checked(outputs: list[str], inputs: list[str], name: str) -> list[str]:
    if len(outputs) != len(inputs):
        raise RuntimeError(f"system {name} returned {len(outputs)} lines for {len(inputs)} inputs")
    return [" ".join(o.split()) for o in outputs]


def _examples(runs: list[_Run], names: list[str]) -> list[dict[str, Any]]:
    """One record per source sentence and direction: every system's translation and back-translation."""
    out: list[dict[str, Any]] = []
    for direction in ("a->b", "b->a"):
        by_system = {r.system: r for r in runs if r.direction == direction}
        first = by_system[names[0]]
        for i, source in enumerate(first.sources):
            ex: dict[str, Any] = {"direction": direction, "source": source}
            if first.references is not None:
                ex["reference"] = first.references[i]
            ex["systems"] = {
                name: {
                    "translation": r.outputs[i],
                    "back_translation": r.back[i],
                    "style_ok": bool(r.acc[i]),
                    "similarity": round(r.sim[i], 4),
                    "perplexity": _finite(r.fluency[i].perplexity),
                    "slor": _finite(r.fluency[i].slor),
                    "runaway": None if r.runaway is None else r.runaway[i],
                    "fluent": bool(r.fluent[i]),
                }
                for name, r in by_system.items()
            }
            out.append(ex)
    return out


def _finite(v: float) -> float | None:
    return round(v, 3) if math.isfinite(v) else None
