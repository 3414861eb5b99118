"""Stage `eval`: what each stage adds, measured on the dev sets of both domains.

Rows: the copy-the-input baseline, the template baseline (`eval.template_baseline`: markers swapped by
string substitution, cyclej.corpora.template_transfer, no model), INTERMEDIATE-2A (the context model with the
paraphrase adapter and its trained marker rows applied), INTERMEDIATE-3 (the merge) and CYCLE-J (the RL
model). Metrics and the J definition: cyclej.evaluation.metrics and cyclej.evaluation.report. The artifact
holds report.md, report.csv, examples.jsonl, the PNG plots, metrics.json (the table as a list of dicts, for
the UI) and model_card.md; the card is also written as README.md (with cyclej.json) into the final model's
folder.

Also `evaluate_model_dir`, what `cyclej eval` runs: any model beside the copy baseline, on the dev sets of
the `data` stage (which it runs when the store does not have it yet). It lives here, not in
cyclej.evaluation.metrics, because it runs a stage: the scoring machinery never imports the stages.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cyclej.config import DomainKey, PipelineConfig
from cyclej.corpora.lines import read_corpus, read_lines
from cyclej.corpora.template_transfer import TemplateSystem, TemplateTransfer
from cyclej.errors import BadInput
from cyclej.evaluation.metrics import (
    SYSTEM_2A,
    SYSTEM_3,
    SYSTEM_COPY,
    SYSTEM_RL,
    SYSTEM_TEMPLATE,
    System,
    copy_system,
    evaluate,
    model_label,
)
from cyclej.evaluation.report import EvalReport
from cyclej.generation.translate import ModelTranslator, load_adapter_model, local_model_dir
from cyclej.models.card import write_model_card
from cyclej.pipeline.registry import StageRun, run_stage
from cyclej.runtime.jsonl import read_jsonl
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore


def baselines(cfg: PipelineConfig, train_a: list[str], train_b: list[str]) -> dict[str, System | str | Path]:
    """The rows without a model: the copy, and the template transfer when `eval.template_baseline`."""
    systems: dict[str, System | str | Path] = {SYSTEM_COPY: copy_system}
    if cfg.eval.template_baseline:
        transfer = TemplateTransfer.from_config({"a": train_a, "b": train_b}, cfg.para_train.template_pairs)
        systems[SYSTEM_TEMPLATE] = TemplateSystem(transfer)
    return systems


def pipeline_systems(
    context_model: Path,
    para_artifact: Path,
    merge_model: Path,
    rl_model: Path,
    cfg: PipelineConfig,
    train_a: list[str],
    train_b: list[str],
) -> dict[str, System | str | Path]:
    """The baselines and the three models, each model loaded only when its turn comes."""
    markers = cfg.markers
    return {
        **baselines(cfg, train_a, train_b),
        SYSTEM_2A: ModelTranslator(
            loader=lambda: load_adapter_model(context_model, para_artifact, markers),
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
        ),
        SYSTEM_3: merge_model,
        SYSTEM_RL: rl_model,
    }


# ---- dev sets ------------------------------------------------------------------------------------------
def eval_dev_sets(
    cfg: PipelineConfig, store: ArtifactStore, data: ArtifactRef
) -> tuple[list[str], list[str], dict[DomainKey, list[str]] | None]:
    """The cleaned dev sets of the data artifact; with `eval.references`, the users' dev files read as
    line-aligned pairs instead (pairs with an empty side dropped), each side the other's reference."""
    if not cfg.eval.references:
        return read_lines(store, data, "a", "dev"), read_lines(store, data, "b", "dev"), None
    if not cfg.domain_a.dev or not cfg.domain_b.dev:
        raise BadInput("eval.references: set domain_a.dev and domain_b.dev to the line-aligned dev files")
    sides = []
    for key, dom in (("domain_a", cfg.domain_a), ("domain_b", cfg.domain_b)):
        files = read_corpus(dom.dev, dom.text_field, cfg.data.max_bad_utf8_fraction, f"{key}.dev")
        sides.append([" ".join(line.split()) for f in files for line in f.lines])
    if len(sides[0]) != len(sides[1]):
        raise BadInput(
            f"eval.references: domain_a.dev has {len(sides[0])} lines and domain_b.dev {len(sides[1])}; "
            "line-aligned dev files must have the same number of lines (or set eval.references: false)"
        )
    pairs = [(x, y) for x, y in zip(sides[0], sides[1], strict=True) if x and y]
    dev_a, dev_b = [x for x, _ in pairs], [y for _, y in pairs]
    return dev_a, dev_b, {"a": dev_b, "b": dev_a}


# ---- `cyclej eval`: any model beside the baseline ------------------------------------------------
def evaluate_model_dir(
    model_dir: str | Path, cfg: PipelineConfig, store: ArtifactStore, progress: Progress | None = None
) -> EvalReport:
    """`cyclej eval --model URI CONFIG`: the report for any model directory (or artifact URI) on the
    config's data, beside the baselines. The `data` stage comes from the store (or runs)."""
    data = run_stage("data", cfg, {}, store, progress)
    train_a, train_b = read_lines(store, data, "a", "train"), read_lines(store, data, "b", "train")
    dev_a, dev_b, references = eval_dev_sets(cfg, store, data)
    local = local_model_dir(str(model_dir), None if store.is_local else store.storage_options)
    systems = {**baselines(cfg, train_a, train_b), model_label(local): local}
    return evaluate(systems, dev_a, dev_b, train_a, train_b, cfg, references=references, progress=progress)


# ---- the stage ---------------------------------------------------------------------------------------
def run_eval(run: StageRun) -> ArtifactRef:
    cfg, store, out = run.cfg, run.store, run.workdir
    train_a, train_b = run.lines("a", "train"), run.lines("b", "train")
    dev_a, dev_b, references = eval_dev_sets(cfg, store, run.inputs["data"])
    rl_artifact = run.input_dir("rl")
    systems = pipeline_systems(
        run.input_dir("context") / "model",
        run.input_dir("para_train"),
        run.input_dir("merge") / "model",
        rl_artifact / "model",
        cfg,
        train_a,
        train_b,
    )
    report = evaluate(
        systems,
        dev_a,
        dev_b,
        train_a,
        train_b,
        cfg,
        references=references,
        progress=run.progress,
        rl_log=read_jsonl(rl_artifact / "metrics.jsonl"),
    )
    report.write(out)  # its own metrics.json: the table as a list of dicts
    stats = json.loads((run.input_dir("data") / "stats.json").read_text(encoding="utf-8"))
    card = _model_card(report, cfg, stats, rl_artifact / "model", store, run.inputs["rl"])
    shutil.copyfile(card, out / "model_card.md")
    return run.commit(summary_metrics(report))


def summary_metrics(report: EvalReport) -> dict[str, Any]:
    """What the ArtifactRef carries: the judge's dev accuracy, J per system, and the overall table (one
    dict per system; the Prefect layer posts list-of-dict metrics as table artifacts). The per-direction
    table is in metrics.json."""
    out: dict[str, Any] = {"judge_dev_accuracy": round(report.judge_dev_accuracy, 4)}
    for row in report.rows:
        out[f"J/{row['system']}"] = round(row["J"], 4)
    out["table"] = [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        for row in report.metrics()["table"]
    ]
    return out


def _model_card(
    report: EvalReport,
    cfg: PipelineConfig,
    stats: dict[str, Any],
    model_dir: Path,
    store: ArtifactStore,
    rl_ref: ArtifactRef,
) -> Path:
    """README.md + cyclej.json into the final model's folder. For a local store that folder is the rl
    artifact itself; for a remote one they are also uploaded beside its weights (extra files, outside the
    manifest: the weights and their checksums are untouched)."""
    extra = f"\nJudge dev accuracy: {report.judge_dev_accuracy:.4f}. {report.j_definition}\n"
    card = write_model_card(model_dir, cfg, report.table_markdown(), stats, extra_md=extra)
    if not store.is_local:
        for name in ("README.md", "cyclej.json"):
            store.fs.put_file(str(model_dir / name), f"{rl_ref.uri}/model/{name}")
    return card
