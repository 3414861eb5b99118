"""Stage `merge` (INTERMEDIATE-3): the exact linear merge of 2A (`para_train`) and 2B (`domain_train`).

    INTERMEDIATE-3 = INTERMEDIATE-1 + w_a·Δ2A + w_b·Δ2B        (w_a, w_b) = (w, 1 − w), or merge.weight_a/_b

No training. Input artifacts: `context` (its `model/`, the base), `para_train` and `domain_train` (`adapter/`
+ `marker_rows.safetensors`), `data` (dev lines, for the sweep). Output: `model/` (plain HF directory, the
base's shards, tokenizer and config with its position interpolation) + `metrics.json` (+ `sweep.md`).

Sweep (merge.sweep non-empty): each w is merged and scored on `merge.sweep_examples` dev examples of each
style, built from the data artifact's dev lines (half from each domain):
- 2B style: the domain-LM examples, exactly as domain_train trains them: `{DX}` → text EOS;
- 2A style: the paraphrase pairs are not an input of this stage (and the paraphraser's output is not dev
  data), so the 2A format is scored with each dev text standing in for its own paraphrase, both directions:
  `{DX} text {DY}` → text EOS and `{DY} text {DX}` → text EOS. A paraphrase keeps the meaning, so this is
  the content-preservation half of 2A (and exactly the RL prompt `{DX} src {DY}`). With
  `para_train.template_pairs` on, 2A learned to change the style, so it is scored on that instead: the
  back-translated template pairs of the dev lines, `{DY} template {DX}` → the real dev line EOS.
The score is the mean of the two token-averaged losses; the lowest wins. The table goes to the artifact
reference's metrics (rows: the Prefect layer posts them as a table artifact), metrics.json and `sweep.md`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from cyclej.config import DOMAIN_KEYS, DomainKey
from cyclej.corpora.formats import Example, domain_examples, para_examples, translation_example
from cyclej.corpora.template_transfer import TemplateTransfer, back_translated_pairs
from cyclej.merging.linear import (
    load_adapter,
    merge_lora_adapters,
    merge_weights,
    sweep_markdown,
    sweep_weights,
)
from cyclej.models.loading import marker_token_ids
from cyclej.pipeline.registry import StageRun
from cyclej.runtime.store import ArtifactRef

STAGE = "merge"


def sweep_examples(run: StageRun, tokenizer: Any) -> tuple[list[Example], list[Example]]:
    """(2A-style, 2B-style) examples from the first dev lines of both domains (see the module docstring)."""
    cfg = run.cfg
    marker_a, marker_b = marker_token_ids(tokenizer, cfg.markers)
    n_a = (cfg.merge.sweep_examples + 1) // 2
    n_b = cfg.merge.sweep_examples - n_a
    texts = {"a": run.lines("a", "dev")[:n_a], "b": run.lines("b", "dev")[:n_b]}
    para_style: list[Example] = []
    tpc = cfg.para_train.template_pairs
    if tpc is not None:
        # 2A learned to change the style: score it on what it learned, template pairs of the dev lines.
        marker = {"a": marker_a, "b": marker_b}
        transfer = TemplateTransfer.from_config({d: run.lines(d, "train") for d in DOMAIN_KEYS}, tpc)
        dev: dict[DomainKey, Sequence[str]] = {d: run.lines(d, "dev") for d in DOMAIN_KEYS}
        for p in back_translated_pairs(transfer, dev, cfg.merge.sweep_examples):
            para_style.append(
                translation_example(
                    tokenizer, marker[p.source_domain], p.source, marker[p.target_domain], p.target
                )
            )
        para_style = para_style[: 2 * cfg.merge.sweep_examples]
    if not para_style:
        # No template pairs on (or no dev line with a marker to swap): the content-preservation format.
        for domain, (src, tgt) in (("a", (marker_a, marker_b)), ("b", (marker_b, marker_a))):
            for text in texts[domain]:
                para_style += para_examples(tokenizer, src, tgt, text, text)
    domain_style = domain_examples(tokenizer, marker_a, texts["a"]) + domain_examples(
        tokenizer, marker_b, texts["b"]
    )
    return para_style, domain_style


def run_merge(run: StageRun) -> ArtifactRef:
    mcfg, progress = run.cfg.merge, run.progress
    work = run.workdir
    model_dir, sweep_dir = work / "model", work / "sweep"
    # A merge has no checkpoints: an interrupted one starts over (it is a pass over the shards).
    for stale in (model_dir, sweep_dir):
        shutil.rmtree(stale, ignore_errors=True)

    base_dir = run.input_dir("context") / "model"
    adapter_a = load_adapter(run.input_dir("para_train"))
    adapter_b = load_adapter(run.input_dir("domain_train"))

    metrics: dict[str, Any] = {}
    if mcfg.sweep:
        from transformers import AutoTokenizer

        para_style, domain_style = sweep_examples(run, AutoTokenizer.from_pretrained(base_dir))
        rows, best_dir, stats = sweep_weights(
            base_dir, adapter_a, adapter_b, mcfg.sweep, para_style, domain_style, sweep_dir, progress
        )
        os.replace(best_dir, model_dir)
        shutil.rmtree(sweep_dir, ignore_errors=True)
        best = min(rows, key=lambda r: r.score)
        table = sweep_markdown(rows, best.weight)
        (work / "sweep.md").write_text(table, encoding="utf-8")
        metrics["sweep"] = [r.__dict__ for r in rows]
        metrics["sweep_markdown"] = table
        metrics["sweep_examples"] = {"para_style": len(para_style), "domain_style": len(domain_style)}
        weight_a, weight_b = best.weight, 1.0 - best.weight
    else:
        weight_a, weight_b = merge_weights(mcfg.weight, mcfg.weight_a, mcfg.weight_b)
        stats = merge_lora_adapters(
            base_dir, model_dir, [(adapter_a, weight_a), (adapter_b, weight_b)], progress
        )

    metrics.update(
        {
            "weight_a": weight_a,
            "weight_b": weight_b,
            "shards": stats.shards,
            "tensors": stats.tensors,
            "tensors_changed": stats.tensors_changed,
            "lora_modules": stats.lora_modules,
            "marker_rows": stats.marker_rows,
            "merge_seconds": stats.seconds,
            "largest_shard_mb": round(stats.largest_shard_bytes / 2**20, 2),
            "adapters_mb": round(stats.adapter_bytes / 2**20, 2),
            "notes": stats.notes,
        }
    )
    summary = {k: metrics[k] for k in ("weight_a", "weight_b", "tensors_changed", "merge_seconds")}
    if mcfg.sweep:
        # A list of row dicts: the Prefect layer posts it as a table artifact in the UI.
        summary["sweep"] = metrics["sweep"]
    return run.commit(summary, metrics)
