"""Evaluation: translate the dev sets both ways with each system and score style, content and fluency.

Per system and direction (a→b, b→a) and pooled over both ("overall"):

- style_acc   the share of outputs the style judge (cyclej.judge, TF-IDF + logistic regression, trained
              on the train corpora, independent of the RL discriminator) assigns to the target domain;
- self_bleu   corpus BLEU (sacrebleu) of the outputs against their sources (content kept, or copied);
- similarity  mean cosine similarity of output and source sentence embeddings (cfg.models.embedder);
- ref_bleu    corpus BLEU against human references, when the dev sets are line-aligned translations;
- perplexity  per-word perplexity of the outputs under a Kneser-Ney trigram LM of the *target* domain's
              train lines (cyclej.fluency), and `fluent`, the share of outputs that LM's calibrated
              thresholds call fluent (real held-out lines of the domain pass ~95 %; babble, loops,
              off-topic text and runaways do not);
- runaway     the share of outputs whose generation hit its token limit without ending (no EOS, no line
              break), for systems that report it (`last_runaway`, as ModelTranslator does);
- length_ratio mean over sentences of output words / source words;
- cycle_bleu  corpus BLEU of the back-translation (output translated back) against the source;
- J           mean over sentences of acc_i × sim_i × fluent_i (see J_DEFINITION).

Systems are callables `system(lines, to) -> lines` or model directories; models are loaded one at a time
and released before the next, then the embedder and the fluency LM are loaded once each.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sacrebleu
import torch

from cyclej.config import PipelineConfig
from cyclej.fluency import DomainFluency, SentenceFluency, corpus_perplexity
from cyclej.judge import StyleJudge, train_judge
from cyclej.progress import Progress
from cyclej.translate import ModelTranslator, load_for_translation, local_model_dir

Domain = Literal["a", "b"]
System = Callable[[list[str], Domain], list[str]]

J_DEFINITION = (
    "J = mean over translated sentences i of acc_i × sim_i × fluent_i, where acc_i = 1 if the style judge "
    "assigns output i to the target domain (else 0), sim_i = max(0, cosine similarity of the sentence "
    "embeddings of output i and its source), and fluent_i = 1 if output i is fluent text of the target "
    "domain: non-empty, its generation ended (not a runaway), no word 3-gram occurs 3 or more times in it, "
    "and under a Kneser-Ney {order}-gram LM of the target domain's train lines its per-word perplexity "
    "(the end of the line counted as a word) is at most the {pct:g}th percentile and its SLOR (per-word "
    "log-probability minus that under word frequencies alone) at least the {low:g}th percentile of those of "
    "held-out train lines of the domain, which the LM was not fitted on ({thresholds})."
)
METRICS: tuple[str, ...] = (
    "style_acc", "self_bleu", "similarity", "ref_bleu", "perplexity", "fluent", "runaway", "length_ratio",
    "cycle_bleu", "J",
)
SYSTEM_COPY = "copy-input"
SYSTEM_2A = "INTERMEDIATE-2A"
SYSTEM_3 = "INTERMEDIATE-3"
SYSTEM_RL = "CYCLE-J"


class CopySystem:
    """The baseline: every sentence returned unchanged (perfect content, no style change, always ends)."""

    def __init__(self) -> None:
        self.last_runaway: list[bool] = []

    def __call__(self, lines: list[str], to: Domain) -> list[str]:
        self.last_runaway = [False] * len(lines)
        return list(lines)


copy_system = CopySystem()


# ---- the report ---------------------------------------------------------------------------------------
@dataclass
class EvalReport:
    rows: list[dict[str, Any]]  # one per system, pooled over both directions
    direction_rows: list[dict[str, Any]]  # one per system × direction
    judge_dev_accuracy: float
    judge_dev_accuracy_a: float
    judge_dev_accuracy_b: float
    fluency: dict[str, dict[str, Any]]  # per target domain ("a", "b"): DomainFluency.summary()
    embedder: str
    domains: tuple[str, str]
    examples: list[dict[str, Any]] = field(default_factory=list)
    rl_log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def j_definition(self) -> str:
        first = next(iter(self.fluency.values()), {})
        pct = float(first.get("percentile", 0.0))
        thresholds = "; ".join(
            f"{name}: perplexity ≤ {f.get('max_perplexity', math.inf):.1f}, SLOR ≥ {f.get('min_slor', -math.inf):.3f}"
            for name, f in zip(self.domains, self.fluency.values(), strict=False)
        )
        return J_DEFINITION.format(order=first.get("order", 3), pct=pct, low=100.0 - pct, thresholds=thresholds)

    def table_markdown(self, rows: list[dict[str, Any]] | None = None) -> str:
        rows = self.rows if rows is None else rows
        with_dir = any("direction" in r for r in rows)
        cols = ["system", *(["direction"] if with_dir else []), "n", *METRICS]
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        return "\n".join(lines)

    @property
    def markdown(self) -> str:
        return self.to_markdown()

    def to_markdown(self) -> str:
        a, b = self.domains
        return "\n".join([
            "# CYCLE_J evaluation",
            "",
            f"Domains: **a** = {a}, **b** = {b}. Greedy translations of the dev sets, both directions.",
            "",
            "## Overall (both directions pooled)",
            "",
            self.table_markdown(),
            "",
            "## Per direction",
            "",
            self.table_markdown(self.direction_rows),
            "",
            "## Definitions",
            "",
            f"- **Style judge**: logistic regression on TF-IDF word (1–2-gram) and character (2–5-gram) features, "
            f"trained on the train corpora of both domains, independent of the RL discriminator. "
            f"**Judge dev accuracy: {self.judge_dev_accuracy:.4f}** ({a}: {self.judge_dev_accuracy_a:.4f}, "
            f"{b}: {self.judge_dev_accuracy_b:.4f}). style_acc = share of outputs judged to be in the target domain.",
            "- **self_bleu**: sacrebleu corpus BLEU of the outputs against their sources; **ref_bleu**: against "
            "line-aligned human references (empty when the dev sets have none); **cycle_bleu**: of the "
            "back-translations against the sources.",
            f"- **similarity**: mean cosine similarity of sentence embeddings of output and source ({self.embedder}).",
            "- **perplexity**: per-word perplexity (end of line counted) of the outputs under a Kneser-Ney "
            "n-gram LM of the target domain's train lines; **fluent**: share of outputs judged fluent text of "
            "the target domain (definition under J). Fluency LMs: "
            + "; ".join(f"{name}: {_fluency_text(f)}" for name, f in zip(self.domains, self.fluency.values(),
                                                                         strict=False)) + ".",
            "- **runaway**: share of outputs whose generation reached its token limit without an EOS or a line "
            "break (– for systems that do not report it); **length_ratio**: mean of output words / source words.",
            f"- **{self.j_definition}**",
            "",
        ])

    def write(self, out_dir: str | Path) -> list[Path]:
        """report.md, report.csv, examples.jsonl, metrics.json and the PNG plots."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "report.md", out / "report.csv", out / "examples.jsonl", out / "metrics.json"]
        written[0].write_text(self.to_markdown(), encoding="utf-8")
        with open(written[1], "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["system", "direction", "n", *METRICS])
            writer.writeheader()
            for r in self.rows + self.direction_rows:
                writer.writerow({k: r.get(k, "overall" if k == "direction" else None) for k in writer.fieldnames})
        with open(written[2], "w", encoding="utf-8") as f:
            for ex in self.examples:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
        written[3].write_text(json.dumps(self.metrics(), indent=1, default=_json_default), encoding="utf-8")
        written += write_plots(self, out)
        return written

    def metrics(self) -> dict[str, Any]:
        """metrics.json: the overall table (a list of dicts, one per system), the per-direction table,
        the judge's dev accuracy, the fluency threshold and the J definition."""
        return {
            "table": [_clean(r) for r in self.rows],
            "per_direction": [_clean(r) for r in self.direction_rows],
            "judge_dev_accuracy": self.judge_dev_accuracy,
            "judge_dev_accuracy_a": self.judge_dev_accuracy_a,
            "judge_dev_accuracy_b": self.judge_dev_accuracy_b,
            "fluency": self.fluency,
            "embedder": self.embedder,
            "j_definition": self.j_definition,
        }


def _fluency_text(f: dict[str, Any]) -> str:
    return (f"{f.get('order')}-gram, {f.get('vocabulary')} words, fitted on {f.get('fitted_lines')} train lines, "
            f"thresholds set on {f.get('held_out_lines')} held-out ones (of which {f.get('held_out_fluent', 0):.1%} "
            "are judged fluent)")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"
    return str(v)


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: inf/nan become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serializable: {type(v)}")


# ---- scorers ---------------------------------------------------------------------------------------------
def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """Sentence embeddings: a sentence-transformers folder as is, any other encoder with mean pooling."""

    def __init__(self, spec: str) -> None:
        from cyclej.embedder import load_embedder

        self.spec = spec
        # Loaded as the paraphrase filter and the RL reward load it (plain encoders get mean pooling).
        self.model = load_embedder(spec, _device())

    def similarity(self, xs: list[str], ys: list[str], batch_size: int = 64) -> list[float]:
        """Cosine similarity of each pair (xs[i], ys[i]); 0.0 where either side is empty."""
        if not xs:
            return []
        ex = self.model.encode(xs, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
        ey = self.model.encode(ys, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
        sims = (ex * ey).sum(-1).clamp(-1.0, 1.0).tolist()
        return [s if x.strip() and y.strip() else 0.0 for s, x, y in zip(sims, xs, ys, strict=True)]


def bleu(hyps: list[str], refs: list[str]) -> float:
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score) if hyps else 0.0


def length_ratio(outputs: list[str], sources: list[str]) -> float:
    """Mean over sentences of output words / source words (sources without words skipped)."""
    ratios = [len(o.split()) / len(s.split()) for o, s in zip(outputs, sources, strict=True) if s.split()]
    return float(np.mean(ratios)) if ratios else 0.0


def j_score(acc: list[float], sim: list[float], fluent: list[float]) -> float:
    """J = mean_i acc_i × max(0, sim_i) × fluent_i."""
    if not acc:
        return 0.0
    return float(np.mean([a * max(0.0, s) * f for a, s, f in zip(acc, sim, fluent, strict=True)]))


# ---- the evaluation ------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One system in one direction: sources, outputs, back-translations and per-sentence scores."""

    system: str
    direction: str  # "a->b" or "b->a"
    target: Domain
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
        if with_refs else None
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
    references: dict[Domain, list[str]] | None = None,
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
    markers = (cfg.domain_a.marker, cfg.domain_b.marker)
    n = ev.max_examples
    src = {"a": list(dev_a[:n]), "b": list(dev_b[:n])}
    refs = {d: list(references[d][:n]) for d in ("a", "b") if references and references.get(d)}
    if judge is None:
        judge = train_judge(train_a, train_b, dev_a, dev_b, seed=cfg.data.seed)

    # 1. Translations, one system (one model in memory) at a time.
    runs: list[_Run] = []
    with progress.bar("translate", total=4 * len(systems), unit="pass") as bar:
        for name, spec in systems.items():
            # Both directions, each translated and translated back.
            expected_tokens = 2 * (len(src["a"]) + len(src["b"])) * ev.max_new_tokens
            system = as_system(spec, markers, ev.batch_size, ev.max_new_tokens, ev.backend, expected_tokens)
            for source_domain, target in (("a", "b"), ("b", "a")):
                sources = src[source_domain]
                outputs = _checked(system(sources, target), sources, name)  # type: ignore[arg-type]
                runaway = _runaway_flags(system, len(outputs))
                bar.update(1)
                back = _checked(system(outputs, source_domain), outputs, name)  # type: ignore[arg-type]
                bar.update(1)
                runs.append(_Run(name, f"{source_domain}->{target}", target, sources, outputs, back,  # type: ignore[arg-type]
                                 refs.get(source_domain), runaway))  # type: ignore[arg-type]
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
        r.fluent = [1.0 if judge_of_target.is_fluent(s) and not gone else 0.0
                    for s, gone in zip(r.fluency, ran_away, strict=True)]

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
    """A row name for a model folder: `<stage>/<fingerprint>` for an artifact's model/, else the folder name."""
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


# ---- plots -----------------------------------------------------------------------------------------------
def write_plots(report: EvalReport, out_dir: Path) -> list[Path]:
    """metrics_by_stage.png always; rl_rewards.png when an RL log with reward columns is given."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    shown = [("style_acc", 1.0), ("similarity", 1.0), ("fluent", 1.0), ("runaway", 1.0), ("J", 1.0),
             ("self_bleu", 100.0), ("cycle_bleu", 100.0)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(report.rows))
    x = np.arange(len(shown))
    for k, row in enumerate(report.rows):
        vals = [(row.get(m) or 0.0) / scale for m, scale in shown]
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, label=row["system"])
    ax.set_xticks(x, [m if s == 1.0 else f"{m}/100" for m, s in shown])
    ax.set_ylim(0, 1.05)
    ax.set_title("Evaluation by stage (both directions pooled)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "metrics_by_stage.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    curves = _reward_curves(report.rl_log)
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, (steps, values) in curves.items():
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        ax.set_xlabel("RL step")
        ax.set_ylabel("reward")
        ax.set_title("RL rewards")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "rl_rewards.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def _reward_curves(log: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Every numeric column whose name mentions 'reward', against 'step' (or the record index). When the
    log has per-reward means (`reward/<name>/mean`, as cyclej.rl writes), only those are drawn."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for i, rec in enumerate(log):
        step = rec.get("step", i + 1)
        for key, val in _flatten(rec).items():
            if "reward" in key and isinstance(val, int | float) and not isinstance(val, bool):
                xs, ys = curves.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(float(val))
    means = {k.removesuffix("/mean"): v for k, v in curves.items() if k.endswith("/mean")}
    return means or curves


def _flatten(rec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line of a killed run
    return out
