"""The evaluation report (cyclej.evaluation.metrics computes it): the tables, report.md, report.csv,
examples.jsonl, metrics.json, the plots (cyclej.evaluation.plots) and the definition of J.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cyclej.evaluation.plots import write_plots

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
    "style_acc",
    "self_bleu",
    "similarity",
    "ref_bleu",
    "perplexity",
    "fluent",
    "runaway",
    "length_ratio",
    "cycle_bleu",
    "J",
)


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
            f"{name}: perplexity ≤ {f.get('max_perplexity', math.inf):.1f}, SLOR ≥ "
            f"{f.get('min_slor', -math.inf):.3f}"
            for name, f in zip(self.domains, self.fluency.values(), strict=False)
        )
        return J_DEFINITION.format(
            order=first.get("order", 3), pct=pct, low=100.0 - pct, thresholds=thresholds
        )

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
        return "\n".join(
            [
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
                "- **Style judge**: logistic regression on TF-IDF word (1–2-gram) and character (2–5-gram) "
                "features, trained on the train corpora of both domains, independent of the RL "
                f"discriminator. **Judge dev accuracy: {self.judge_dev_accuracy:.4f}** ({a}: "
                f"{self.judge_dev_accuracy_a:.4f}, {b}: {self.judge_dev_accuracy_b:.4f}). style_acc = share "
                "of outputs judged to be in the target domain.",
                "- **self_bleu**: sacrebleu corpus BLEU of the outputs against their sources; "
                "**ref_bleu**: against line-aligned human references (empty when the dev sets have none); "
                "**cycle_bleu**: of the back-translations against the sources.",
                "- **similarity**: mean cosine similarity of sentence embeddings of output and source "
                f"({self.embedder}).",
                "- **perplexity**: per-word perplexity (end of line counted) of the outputs under a "
                "Kneser-Ney n-gram LM of the target domain's train lines; **fluent**: share of outputs "
                "judged fluent text of the target domain (definition under J). Fluency LMs: "
                + "; ".join(
                    f"{name}: {_fluency_text(f)}"
                    for name, f in zip(self.domains, self.fluency.values(), strict=False)
                )
                + ".",
                "- **runaway**: share of outputs whose generation reached its token limit without an EOS "
                "or a line break (– for systems that do not report it); **length_ratio**: mean of output "
                "words / source words.",
                f"- **{self.j_definition}**",
                "",
            ]
        )

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
                writer.writerow(
                    {k: r.get(k, "overall" if k == "direction" else None) for k in writer.fieldnames}
                )
        with open(written[2], "w", encoding="utf-8") as f:
            for ex in self.examples:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
        written[3].write_text(json.dumps(self.metrics(), indent=1, default=_json_default), encoding="utf-8")
        written += write_plots(self.rows, self.rl_log, out)
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
    return (
        f"{f.get('order')}-gram, {f.get('vocabulary')} words, fitted on {f.get('fitted_lines')} train lines, "
        f"thresholds set on {f.get('held_out_lines')} held-out ones (of which "
        f"{f.get('held_out_fluent', 0):.1%} are judged fluent)"
    )


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
