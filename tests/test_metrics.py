"""Evaluation: the style judge, the metrics on hand-made systems, J, and the eval stage's report files
on tiny models built here (context model, a real PEFT adapter with marker rows, merge and RL models)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cyclej.config import PipelineConfig, load_config
from cyclej.evaluation.fluency import DomainFluency
from cyclej.evaluation.judge import StyleJudge, train_judge
from cyclej.evaluation.metrics import (
    SYSTEM_2A,
    SYSTEM_3,
    SYSTEM_COPY,
    SYSTEM_RL,
    SYSTEM_TEMPLATE,
    copy_system,
    evaluate,
)
from cyclej.evaluation.report import EvalReport
from cyclej.evaluation.scorers import j_score, length_ratio
from cyclej.generation.translate import load_adapter_model
from cyclej.models.loading import extend_context, load_model, save_model
from cyclej.pipeline.registry import StageRun
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore
from cyclej.stages.eval import run_eval

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

SAMPLE = Path(__file__).resolve().parents[1] / "cyclej" / "samples" / "yelp"
MARKERS = ("<|A|>", "<|B|>")


def _lines(name: str) -> list[str]:
    return [x.strip() for x in (SAMPLE / name).read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def yelp() -> dict[str, list[str]]:
    return {
        "train_a": _lines("train.0"),
        "train_b": _lines("train.1"),
        "dev_a": _lines("dev.0"),
        "dev_b": _lines("dev.1"),
    }


@pytest.fixture(scope="module")
def judge(yelp: dict[str, list[str]]) -> StyleJudge:
    return train_judge(yelp["train_a"], yelp["train_b"], yelp["dev_a"], yelp["dev_b"])


def _tiny_cfg(tmp_path: Path, max_examples: int = 16) -> PipelineConfig:
    cfg = load_config(preset="tiny", storage=str(tmp_path / "store"))
    cfg.eval.max_examples = max_examples
    cfg.eval.max_new_tokens = 8
    return cfg


def test_judge_is_well_above_chance_on_yelp(judge: StyleJudge, yelp: dict[str, list[str]]) -> None:
    print(
        f"style judge dev accuracy on the Yelp sample: {judge.dev_accuracy:.4f} "
        f"(negative {judge.dev_accuracy_a:.4f}, positive {judge.dev_accuracy_b:.4f})"
    )
    assert judge.dev_accuracy > 0.75
    assert judge.dev_accuracy_a > 0.75 and judge.dev_accuracy_b > 0.75
    assert judge.predict(["the food was amazing and the staff were wonderful !"]) == ["b"]
    assert judge.predict(["the food was cold and the staff were rude ."]) == ["a"]
    pooled = (sum(judge.accuracy(yelp["dev_a"], "a")) + sum(judge.accuracy(yelp["dev_b"], "b"))) / (
        len(yelp["dev_a"]) + len(yelp["dev_b"])
    )
    assert judge.dev_accuracy == pytest.approx(pooled)


def test_j_definition_pinned() -> None:
    # acc × max(0, sim) × fluent, averaged over sentences: only the first sentence counts fully.
    acc = [1.0, 1.0, 0.0, 1.0, 1.0]
    sim = [0.5, -0.2, 0.9, 1.0, 0.8]
    fluent = [1.0, 1.0, 1.0, 0.0, 1.0]
    assert j_score(acc, sim, fluent) == pytest.approx((0.5 + 0.0 + 0.0 + 0.0 + 0.8) / 5)
    assert j_score([], [], []) == 0.0
    assert length_ratio(["a b c", "", "x"], ["a b", "a b", ""]) == pytest.approx((1.5 + 0.0) / 2)


# ---- fluency in the target domain: babble cannot pass ----------------------------------------------------
BABBLE = [
    # what SmolLM2 answered the demo's first dev line with (a runaway, cut at the token limit)
    ". I'm not sure I'm sure I'm the only one who's got it, but I'm",
    "I'm not sure I'm sure I'm the only one who's got it, but I'm",
    "the the the the the the the the the the the the",
    "great great great great great great great great",
    "the food was the food was the food was the food was the food was",
    "was the and food . the was great , ! service the",
    "def main(): return sum(x * x for x in range(10)) if x else None",
    "import torch ; model = torch.nn.Linear ( 10 , 2 ) ; model.cuda ( )",
    "preheat the oven to 350 degrees , whisk two eggs with the flour and bake for 20 minutes .",
    "Sure! Here is a polite rewrite of your sentence:",
    "",
]


@pytest.fixture(scope="module")
def fluency(yelp: dict[str, list[str]]) -> dict[str, DomainFluency]:
    return {"a": DomainFluency.fit(yelp["train_a"]), "b": DomainFluency.fit(yelp["train_b"])}


def test_babble_is_not_fluent(fluency: dict[str, DomainFluency]) -> None:
    for domain, judge in fluency.items():
        scores = judge.score(BABBLE)
        for line, s in zip(BABBLE, scores, strict=True):
            print(f"{domain}: perplexity {s.perplexity:9.1f} SLOR {s.slor:6.2f} loop {s.loop!s:5} | {line}")
        assert not any(judge.is_fluent(s) for s in scores), domain
    # Each check catches something the others miss: capitals/contractions and code are unseen words (high
    # perplexity); a repeated frequent word is likely word by word but worse than word frequencies
    # (negative SLOR); a loop of seen 3-grams is likely by both and caught as a loop.
    a = fluency["a"]
    babble, repeated, loop = a.score([BABBLE[1], BABBLE[2], BABBLE[4]])
    assert babble.perplexity > a.max_perplexity
    assert repeated.perplexity <= a.max_perplexity and repeated.slor < a.min_slor
    assert loop.perplexity <= a.max_perplexity and loop.slor >= a.min_slor and loop.loop


def test_real_dev_lines_are_fluent(fluency: dict[str, DomainFluency], yelp: dict[str, list[str]]) -> None:
    for domain, dev in (("a", yelp["dev_a"]), ("b", yelp["dev_b"])):
        judge = fluency[domain]
        share = float(np.mean(judge.fluent(dev)))
        print(f"{domain}: {share:.1%} of {len(dev)} dev lines fluent; {judge.summary()}")
        assert share >= 0.9, domain
        # Calibrated on held-out train lines, not on the dev lines it is tested on.
        assert judge.held_out_lines == 300 and judge.fitted_lines == 2700
        assert 0.94 <= judge.held_out_fluent <= 0.97
    # Deterministic: the same lines give the same LM and thresholds.
    again = DomainFluency.fit(yelp["train_b"])
    assert again.summary() == fluency["b"].summary()


class _Babbler:
    """A system that answers every line with babble and says which of its outputs ran away."""

    def __init__(self) -> None:
        self.last_runaway: list[bool] = []

    def __call__(self, lines: list[str], to: str) -> list[str]:
        outputs = [BABBLE[i % len(BABBLE)] for i in range(len(lines))]
        self.last_runaway = [o.endswith("I'm") for o in outputs]
        return outputs


def test_babble_scores_below_the_copy_baseline(
    tmp_path: Path, judge: StyleJudge, yelp: dict[str, list[str]]
) -> None:
    cfg = _tiny_cfg(tmp_path, max_examples=200)
    report = evaluate(
        {"copy": copy_system, "babble": _Babbler()},
        yelp["dev_a"],
        yelp["dev_b"],
        yelp["train_a"],
        yelp["train_b"],
        cfg,
        judge=judge,
    )
    copy, babble = report.rows
    print(report.table_markdown(report.direction_rows))
    assert babble["fluent"] == 0.0 and babble["J"] == 0.0
    assert copy["J"] > babble["J"]
    assert babble["runaway"] == pytest.approx(2 / len(BABBLE), abs=0.02)
    assert babble["perplexity"] > 3 * copy["perplexity"]
    md = report.to_markdown()
    assert "| runaway | length_ratio |" in md and "SLOR" in md and "held-out" in md


def test_copy_and_oracle_systems(tmp_path: Path, judge: StyleJudge, yelp: dict[str, list[str]]) -> None:
    cfg = _tiny_cfg(tmp_path, max_examples=32)
    dev_a, dev_b = yelp["dev_a"], yelp["dev_b"]
    index = {line: i for i, line in enumerate(dev_a)} | {line: i for i, line in enumerate(dev_b)}

    def oracle(lines: list[str], to: str) -> list[str]:
        """Returns a real sentence of the target domain's dev set (the one with the same index)."""
        target = dev_b if to == "b" else dev_a
        return [target[index[x]] for x in lines]

    report = evaluate(
        {"copy": copy_system, "oracle": oracle},
        dev_a,
        dev_b,
        yelp["train_a"],
        yelp["train_b"],
        cfg,
        judge=judge,
    )
    copy, orc = report.rows
    n = cfg.eval.max_examples
    assert copy["n"] == orc["n"] == 2 * n
    assert copy["self_bleu"] == pytest.approx(100.0)
    assert copy["cycle_bleu"] == pytest.approx(100.0)
    assert copy["similarity"] == pytest.approx(1.0, abs=1e-4)
    # A copy is in the target style exactly where the judge is wrong about the source.
    judge_errors = 2 * n - sum(judge.accuracy(dev_a[:n], "a")) - sum(judge.accuracy(dev_b[:n], "b"))
    assert copy["style_acc"] == pytest.approx(judge_errors / (2 * n))
    assert copy["style_acc"] < 0.25
    # The oracle's outputs are real lines of the target domain: fluent there. A copy is real text of the
    # other domain, which the target domain's LM finds less likely (negative words in positive reviews).
    assert orc["fluent"] >= 0.9
    assert 0.5 <= copy["fluent"] < orc["fluent"]
    assert copy["runaway"] == 0.0 and orc["runaway"] is None  # a plain callable does not report it
    assert copy["length_ratio"] == pytest.approx(1.0)
    assert orc["style_acc"] > 0.8
    # Back to the source by index (a few dev sentences occur in both domains, so not always exactly).
    assert orc["self_bleu"] < 20 and orc["cycle_bleu"] > 90
    assert orc["J"] > copy["J"]
    assert copy["ref_bleu"] is None
    by_dir = {(r["system"], r["direction"]): r for r in report.direction_rows}
    assert set(by_dir) == {(s, d) for s in ("copy", "oracle") for d in ("a->b", "b->a")}

    # J in the table is the definition applied to the per-sentence scores in examples.jsonl.
    report.write(tmp_path / "out")
    examples = [json.loads(x) for x in (tmp_path / "out" / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 2 * n
    for name, row in (("copy", copy), ("oracle", orc)):
        per = [ex["systems"][name] for ex in examples]
        j = np.mean([float(p["style_ok"]) * max(0.0, p["similarity"]) * float(p["fluent"]) for p in per])
        assert row["J"] == pytest.approx(j, abs=2e-4)
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"Judge dev accuracy: {judge.dev_accuracy:.4f}" in text and "J = mean over" in text


def test_reference_bleu_with_aligned_dev(
    tmp_path: Path, judge: StyleJudge, yelp: dict[str, list[str]]
) -> None:
    cfg = _tiny_cfg(tmp_path, max_examples=8)
    dev_a, dev_b = yelp["dev_a"][:8], yelp["dev_b"][:8]
    perfect = {**dict(zip(dev_a, dev_b, strict=True)), **dict(zip(dev_b, dev_a, strict=True))}
    report = evaluate(
        {"perfect": lambda xs, to: [perfect[x] for x in xs]},
        dev_a,
        dev_b,
        yelp["train_a"],
        yelp["train_b"],
        cfg,
        references={"a": dev_b, "b": dev_a},
        judge=judge,
    )
    assert report.rows[0]["ref_bleu"] == pytest.approx(100.0)


# ---- the eval stage on hand-built tiny artifacts ----------------------------------------------------------
def _perturbed_copy(src: Path, out: Path, seed: int) -> Path:
    model, tok = load_model(str(src), markers=list(MARKERS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return save_model(model, tok, out)


def _para_artifact(context_model: Path, out: Path) -> Path:
    """A real PEFT LoRA adapter (random, non-zero B) + the marker rows file, as para_train writes them."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    model, tok = load_model(str(context_model), markers=list(MARKERS))
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.save_pretrained(out / "adapter")
    ids = torch.tensor(tok.convert_tokens_to_ids(list(MARKERS)), dtype=torch.int64)
    d = model.get_input_embeddings().weight.shape[1]
    save_file(
        {"token_ids": ids, "input_embeddings": torch.randn(2, d), "output_embeddings": torch.randn(2, d)},
        str(out / "marker_rows.safetensors"),
    )
    (out / "metrics.json").write_text("{}")
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hand-built")
    model, tok = load_model("tiny-gptj", markers=list(MARKERS))
    extend_context(model, 2.0)  # INTERMEDIATE-1 is context-extended: the PI factor travels to every model
    context = save_model(model, tok, root / "context" / "model")
    para = _para_artifact(context, root / "para_train")
    merge = _perturbed_copy(context, root / "merge" / "model", seed=2).parent
    rl = _perturbed_copy(context, root / "rl" / "model", seed=3).parent
    with open(rl / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "reward/total/mean": 0.1 * step,
                        "reward/total/std": 0.01,
                        "reward/embedding/mean": 0.05 * step,
                        "pg_loss": 1.0 / step,
                    }
                )
                + "\n"
            )
    return {"context": context.parent, "para_train": para, "merge": merge, "rl": rl}


def test_adapter_model_applies_marker_rows_and_lora(artifacts: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    base, tok = load_model(str(artifacts["context"] / "model"), markers=list(MARKERS))
    with_adapter, tok2, _ = load_adapter_model(
        artifacts["context"] / "model", artifacts["para_train"], MARKERS
    )
    rows = load_file(str(artifacts["para_train"] / "marker_rows.safetensors"))
    ids = rows["token_ids"]
    assert torch.equal(with_adapter.get_input_embeddings().weight[ids], rows["input_embeddings"])
    assert torch.equal(with_adapter.get_output_embeddings().weight[ids], rows["output_embeddings"])
    x = torch.tensor([tok("good food .").input_ids])
    with torch.no_grad():
        assert not torch.allclose(base(x).logits, with_adapter(x).logits)
    assert not any("lora" in n for n, _ in with_adapter.named_parameters())  # merged, plain model


def test_run_eval_writes_the_report_with_four_rows(
    tmp_path: Path, artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cyclej.pipeline.registry import run_stage, stage_fingerprint

    cfg = _tiny_cfg(tmp_path, max_examples=6)
    store = ArtifactStore(cfg.storage.root)
    refs: dict[str, ArtifactRef] = {"data": run_stage("data", cfg, {}, store, Progress(show_bar=False))}
    for stage, path in artifacts.items():
        refs[stage] = store.commit(stage, f"hand-{stage}", path)

    ref = run_eval(StageRun.start("eval", cfg, refs, store, Progress(show_bar=False)))
    assert ref.fingerprint == stage_fingerprint("eval", cfg, {k: v.fingerprint for k, v in refs.items()})
    out = store.fetch(ref)
    for name in (
        "report.md",
        "report.csv",
        "examples.jsonl",
        "metrics.json",
        "model_card.md",
        "metrics_by_stage.png",
        "rl_rewards.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    systems = [SYSTEM_COPY, SYSTEM_TEMPLATE, SYSTEM_2A, SYSTEM_3, SYSTEM_RL]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["system"] for r in metrics["table"]] == systems
    assert len(metrics["per_direction"]) == 10
    assert all(
        set(r)
        >= {
            "style_acc",
            "self_bleu",
            "similarity",
            "perplexity",
            "fluent",
            "runaway",
            "length_ratio",
            "cycle_bleu",
            "J",
        }
        for r in metrics["table"]
    )
    # Every system reports which outputs ran away (ModelTranslator.last_runaway; the copy never does).
    assert metrics["table"][0]["runaway"] == 0.0
    assert all(r["runaway"] is not None and 0.0 <= r["runaway"] <= 1.0 for r in metrics["table"])
    assert set(metrics["fluency"]) == {"a", "b"} and metrics["fluency"]["b"]["held_out_fluent"] >= 0.9
    assert 0.0 <= metrics["judge_dev_accuracy"] <= 1.0
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["system"] for r in rows if r["direction"] == "overall"] == systems
    md = (out / "report.md").read_text()
    assert all(f"| {s} |" in md for s in systems) and "Judge dev accuracy" in md
    examples = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 12
    # The template baseline swaps sentiment words: on the real Yelp dev lines it changes most of them.
    template = metrics["table"][1]
    assert template["self_bleu"] < 90.0 and template["style_acc"] > metrics["table"][0]["style_acc"]
    assert set(examples[0]["systems"]) == set(systems)
    assert all({"translation", "back_translation"} <= set(v) for v in examples[0]["systems"].values())
    # The copy row is exact; the models' rows are real translations, not copies.
    assert metrics["table"][0]["self_bleu"] == pytest.approx(100.0)
    assert metrics["table"][4]["self_bleu"] < 100.0
    assert ref.metrics["judge_dev_accuracy"] == pytest.approx(metrics["judge_dev_accuracy"], abs=1e-4)
    # The overall table rides on the ArtifactRef too (the Prefect layer posts it as a table artifact).
    assert [r["system"] for r in ref.metrics["table"]] == systems
    assert ref.metrics["table"][0]["J"] == pytest.approx(metrics["table"][0]["J"], abs=1e-4)
    # The model card sits in the final model's folder too.
    card = (store.fetch(refs["rl"]) / "model" / "README.md").read_text()
    assert "AutoModelForCausalLM" in card and "vllm" in card.lower() and "<|A|>" in card and SYSTEM_RL in card
    assert "rl:" in card and "negative" in card


def test_evaluate_model_dir(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    from cyclej.stages.eval import evaluate_model_dir

    cfg = _tiny_cfg(tmp_path, max_examples=4)
    store = ArtifactStore(cfg.storage.root)
    report = evaluate_model_dir(artifacts["rl"], cfg, store)
    assert isinstance(report, EvalReport)
    label = f"{artifacts['rl'].parent.name}/rl"  # <stage>/<fingerprint> for an artifact's model/
    assert [r["system"] for r in report.rows] == [SYSTEM_COPY, SYSTEM_TEMPLATE, label]
    assert f"| {label} |" in report.markdown
    assert report.rows[0]["self_bleu"] == pytest.approx(100.0)


def test_reward_curves_keep_the_means() -> None:
    from cyclej.evaluation.plots import _reward_curves

    log = [
        {
            "step": s,
            "reward/total/mean": 0.1 * s,
            "reward/total/std": 0.2,
            "reward/bleu/mean": s,
            "pg_loss": 1.0,
        }
        for s in (1, 2, 3)
    ]
    curves = _reward_curves(log)
    assert set(curves) == {"reward/total", "reward/bleu"}
    assert curves["reward/total"] == (
        [1.0, 2.0, 3.0],
        [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)],
    )
    assert set(_reward_curves([{"reward": 1.0}, {"reward": 2.0}])) == {"reward"}


def test_model_card_written_beside_the_weights_and_uploaded_to_s3(
    tmp_path: Path, artifacts: dict[str, Path], s3_bucket: str
) -> None:
    from cyclej.config import StorageConfig
    from cyclej.models.card import read_model_info
    from cyclej.stages.eval import _model_card

    cfg = _tiny_cfg(tmp_path)
    row = {
        "system": SYSTEM_RL,
        "n": 4,
        "style_acc": 0.5,
        "self_bleu": 12.0,
        "similarity": 0.7,
        "ref_bleu": None,
        "perplexity": 40.0,
        "fluent": 0.75,
        "cycle_bleu": 30.0,
        "J": 0.25,
    }
    fluency = {d: {"order": 3, "percentile": 97.5, "max_perplexity": 500.0, "min_slor": 0.1} for d in "ab"}
    report = EvalReport([row], [], 0.95, 0.96, 0.94, fluency, "tiny-bert", ("negative", "positive"))
    store = ArtifactStore.from_config(
        StorageConfig(root=f"{s3_bucket}/runs", cache_dir=str(tmp_path / "cache"))
    )
    rl_ref = store.commit("rl", "cafe", artifacts["rl"])
    local = store.fetch(rl_ref) / "model"
    card = _model_card(
        report, cfg, {"a": {"train": {"kept": 400}, "dev": {"kept": 32}}}, local, store, rl_ref
    )
    text = card.read_text()
    assert card == local / "README.md"
    for needle in (
        "AutoModelForCausalLM",
        "from vllm import LLM",
        "LLM(model=",
        "<|A|>the text to rewrite<|B|>",
        "| CYCLE-J | 4 | 0.5000 |",
        "Judge dev accuracy: 0.9500",
        "| negative | `<|A|>` | 400 | 32 |",
        "name: tiny",
        "position interpolation",
    ):
        assert needle in text, needle
    assert read_model_info(local) == {"markers": ["<|A|>", "<|B|>"], "domains": ["negative", "positive"]}
    # On S3 the card sits beside the weights; the artifact's manifest (and its checksums) is unchanged.
    assert store.fs.cat_file(f"{rl_ref.uri}/model/README.md").decode() == text
    assert store.ref("rl", "cafe") == rl_ref


def test_line_aligned_dev_files_give_references(tmp_path: Path) -> None:
    from cyclej.errors import BadInput
    from cyclej.stages.eval import eval_dev_sets

    (tmp_path / "dev.original").write_text("thou art a villain .\n\nwherefore art thou ?\n")
    (tmp_path / "dev.modern").write_text("you are a villain .\nhello\nwhy are you ?\n")
    cfg = _tiny_cfg(tmp_path)
    cfg.domain_a.dev = [str(tmp_path / "dev.original")]
    cfg.domain_b.dev = [str(tmp_path / "dev.modern")]
    cfg.eval.references = True
    store = ArtifactStore(cfg.storage.root)
    dev_a, dev_b, refs = eval_dev_sets(cfg, store, ArtifactRef("data", "unused", "", ""))
    # The pair with an empty side is dropped; each side is the other's reference.
    assert dev_a == ["thou art a villain .", "wherefore art thou ?"]
    assert dev_b == ["you are a villain .", "why are you ?"]
    assert refs == {"a": dev_b, "b": dev_a}
    (tmp_path / "dev.modern").write_text("you are a villain .\n")
    with pytest.raises(BadInput, match="line-aligned"):
        eval_dev_sets(cfg, store, ArtifactRef("data", "unused", "", ""))
