"""The trainer (cyclej.training.trainer) and the `domain_train` stage on tiny random GPT-J and Llama models.

Real parts throughout: models from cyclej.models.loading, examples from cyclej.corpora.formats, a local
ArtifactStore, faults injected through CYCLEJ_FAULT exactly as a drill would.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cyclej.config import PipelineConfig, TrainConfig
from cyclej.corpora.formats import Example, domain_example
from cyclej.errors import StageFailed
from cyclej.models.loading import load_model, marker_token_ids, save_model
from cyclej.runtime import faults
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore, StageCheckpoints
from cyclej.training.schedule import lr_factor, warmup_steps
from cyclej.training.trainer import MarkerRows, step_indices, train

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

MARKERS = ["<|A|>", "<|B|>"]
YELP = Path(str(resources.files("cyclej") / "samples" / "yelp"))


def yelp_lines(name: str, n: int) -> list[str]:
    return (YELP / name).read_text(encoding="utf-8").splitlines()[:n]


@pytest.fixture
def fresh_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faults fire once per process: give this test its own record of fired faults."""
    monkeypatch.setattr(faults, "_fired", set())


def tiny(spec: str = "tiny-gptj") -> tuple[Any, Any, list[int]]:
    model, tok = load_model(spec, markers=MARKERS)
    return model, tok, marker_token_ids(tok, MARKERS)


def domain_examples(tok: Any, ids: list[int], n: int) -> list[Example]:
    a = [domain_example(tok, ids[0], t) for t in yelp_lines("train.0", n)]
    b = [domain_example(tok, ids[1], t) for t in yelp_lines("train.1", n)]
    return a + b


def tcfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        batch_size=8,
        micro_batch_size=4,
        lr=1e-2,
        max_steps=4,
        seq_len=128,
        precision="fp32",
        checkpoint_every_steps=100,
        eval_every_steps=100,
        eval_batches=2,
    )
    return TrainConfig(**{**base, **kw})


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- artifacts the LoRA stages read (built by hand: the stages under test only read them) --------------
def pipeline_config(tmp_path: Path, **sections: Any) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "storage": {"root": str(tmp_path / "store")},
            "domain_a": {"name": "negative", "marker": MARKERS[0], "train": [str(YELP / "train.0")]},
            "domain_b": {"name": "positive", "marker": MARKERS[1], "train": [str(YELP / "train.1")]},
            "models": {"base": "tiny-gptj"},
            **sections,
        }
    )


def build_inputs(store: ArtifactStore, n_lines: int = 24) -> dict[str, ArtifactRef]:
    """`context` (a tiny GPT-J with the markers as model/), `data` and `paraphrase` artifacts."""
    model, tok = load_model("tiny-gptj", markers=MARKERS)
    work = store.workdir("context", "ctx0000000000000")
    save_model(model, tok, work / "model")
    context = store.commit("context", "ctx0000000000000", work)

    work = store.workdir("data", "data000000000000")
    for key, name in (("a", "0"), ("b", "1")):
        (work / key).mkdir(exist_ok=True)
        (work / key / "train.txt").write_text("".join(f"{t}\n" for t in yelp_lines(f"train.{name}", n_lines)))
        (work / key / "dev.txt").write_text("".join(f"{t}\n" for t in yelp_lines(f"dev.{name}", 8)))
    data = store.commit("data", "data000000000000", work)

    work = store.workdir("paraphrase", "para000000000000")
    with open(work / "pairs.jsonl", "w", encoding="utf-8") as f:
        for key, name in (("a", "0"), ("b", "1")):
            for text in yelp_lines(f"train.{name}", n_lines):
                para = " ".join(reversed(text.split()))  # any distinct rewrite will do for the machinery
                f.write(json.dumps({"domain": key, "text": text, "paraphrase": para, "scores": {}}) + "\n")
    paraphrase = store.commit("paraphrase", "para000000000000", work)
    return {"context": context, "data": data, "paraphrase": paraphrase}


# ---- the loop ---------------------------------------------------------------------------------------------
def test_lora_training_lowers_dev_loss_and_writes_the_log(tmp_path: Path) -> None:
    model, tok, ids = tiny()
    examples = domain_examples(tok, ids, 8)  # a small corpus, seen many times
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = tcfg(max_steps=24, eval_every_steps=8, checkpoint_every_steps=8, lr=2e-2)
    result = train(
        model,
        train_examples=examples,
        dev_examples=examples,
        tcfg=cfg,
        checkpoints=StageCheckpoints(store, "domain_train", "fp"),
        tokenizer=tok,
        marker_ids=ids,
    )
    m = result.metrics
    assert m["steps"] == 24 and m["packing"] is True
    assert m["dev_loss_after"] < m["dev_loss_before"] - 0.3, m
    records = read_jsonl(store.workdir("domain_train", "fp") / "metrics.jsonl")
    steps = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 25))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "micro_batch"} <= set(r) for r in steps)
    # ‖Δθ‖/‖θ‖ of the LoRA parameters per step: it follows the schedule (the last step's lr is 0).
    sizes = [r["update_size"] for r in steps]
    assert all(0 < x < 1 for x in sizes[:-1]) and sizes[-1] == 0.0
    assert max(sizes) == sizes[1] and sizes[-2] < max(sizes) / 100
    assert [r["step"] for r in records if "dev_loss" in r] == [0, 8, 16, 24]
    # warm-up then cosine to 0 (lr is the one used by the step)
    assert steps[0]["lr"] == pytest.approx(cfg.lr * lr_factor(1, 24, warmup_steps(0.1, 24, "round")))
    assert max(r["lr"] for r in steps) == pytest.approx(cfg.lr)
    assert steps[-1]["lr"] < cfg.lr * 0.01
    # the marker rows trained; the frozen embedding matrix did not move
    frozen_rows = model.get_input_embeddings().weight[ids]
    assert not torch.equal(result.marker_rows.input_rows.detach(), frozen_rows)
    assert not model.get_input_embeddings().weight.requires_grad
    assert store.list_checkpoints("domain_train", "fp") == ["step-00000016", "step-00000024"]


def test_full_finetuning_trains_every_weight(tmp_path: Path) -> None:
    model, tok, ids = tiny("tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = domain_examples(tok, ids, 8)
    result = train(
        model,
        train_examples=examples,
        dev_examples=examples,
        tcfg=tcfg(lora=None, max_steps=6),
        checkpoints=StageCheckpoints(ArtifactStore(str(tmp_path / "s")), "context", "full"),
        tokenizer=tok,
        marker_ids=ids,
    )
    assert result.marker_rows is None and not hasattr(result.model, "peft_config")
    assert result.metrics["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert result.metrics["dev_loss_after"] < result.metrics["dev_loss_before"]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.embed_tokens.weight" in changed and any("mlp" in k for k in changed)


@pytest.mark.parametrize("spec", ["tiny-gptj", "tiny-llama"])
def test_marker_rows_splice_into_embedding_and_lm_head(spec: str) -> None:
    """The hooks give exactly the logits of a model whose matrices hold the rows (GPT-J: untied lm_head
    with a bias; Llama: tied), and `write_into_weights` makes that model."""
    model, tok, ids = tiny(spec)
    model.eval()
    rows = MarkerRows(model, ids)
    assert rows.tied == (spec == "tiny-llama")
    with torch.no_grad():
        rows.input_rows.add_(torch.randn_like(rows.input_rows))
        if rows.output_rows is not None:
            rows.output_rows.add_(torch.randn_like(rows.output_rows))
    x = torch.tensor([[ids[0], 5, 9, ids[1], 7]])
    with torch.no_grad():
        hooked = model(input_ids=x).logits
        rows.write_into_weights()
        merged = model(input_ids=x).logits
        assert not rows._handles
        assert torch.allclose(hooked, merged, atol=1e-5)
        rows2 = MarkerRows(model, ids)  # a fresh copy of the written rows changes nothing
        assert torch.allclose(model(input_ids=x).logits, merged, atol=1e-5)
        rows2.remove_hooks()


def test_result_saves_adapter_and_marker_rows_and_merges(tmp_path: Path) -> None:
    model, tok, ids = tiny("tiny-gptj")
    examples = domain_examples(tok, ids, 4)
    result = train(
        model,
        train_examples=examples,
        tcfg=tcfg(max_steps=2),
        checkpoints=StageCheckpoints(ArtifactStore(str(tmp_path / "s")), "domain_train", "fp"),
        tokenizer=tok,
        marker_ids=ids,
    )
    result.save_adapter(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == pytest.approx(8**0.5)
    assert {m.rsplit(".", 1)[-1] for m in cfg["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc_in",
        "fc_out",
    }
    saved = load_file(str(tmp_path / "out" / "marker_rows.safetensors"))
    assert saved["token_ids"].tolist() == ids and saved["token_ids"].dtype == torch.int64
    assert torch.equal(saved["input_embeddings"], result.marker_rows.input_rows.detach())
    assert torch.equal(saved["output_embeddings"], result.marker_rows.output_rows.detach())
    x = torch.tensor([[ids[0], 5, 9, 11, ids[1], 7]])
    with torch.no_grad():
        trained = result.model(input_ids=x).logits
        merged = result.merged_model()
        assert type(merged).__name__ == "GPTJForCausalLM"
        assert torch.allclose(merged(input_ids=x).logits, trained, atol=1e-4)
        assert torch.equal(merged.lm_head.weight[ids], saved["output_embeddings"])


def test_micro_batch_size_does_not_change_the_math(tmp_path: Path) -> None:
    """Loss normalised by the step's target tokens: micro 4 × 2 and micro 8 × 1 give the same weights
    (padding differs per micro-batch too: no packing here)."""
    finals = []
    for micro in (4, 8):
        model, tok, ids = tiny()
        r = train(
            model,
            train_examples=domain_examples(tok, ids, 12),
            tcfg=tcfg(micro_batch_size=micro, packing=False, max_steps=3),
            checkpoints=StageCheckpoints(ArtifactStore(str(tmp_path / f"s{micro}")), "domain_train", "fp"),
            tokenizer=tok,
            marker_ids=ids,
        )
        finals.append(r.trainable_state)
    assert finals[0].keys() == finals[1].keys()
    moved = 0
    for k in finals[0]:
        assert torch.allclose(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-6), k
        moved += int(finals[0][k].abs().sum() > 0)
    assert moved == len(finals[0])


def test_data_order_is_a_seeded_permutation_per_epoch() -> None:
    first = [i for s in range(5) for i in step_indices(s, 4, 10, seed=3)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]  # a new permutation each epoch
    assert step_indices(3, 4, 10, seed=3) == first[12:16]  # the step index is the whole loader state
    assert step_indices(0, 4, 10, seed=4) != first[:4]


def test_oom_at_micro_batch_one_names_the_knobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_faults: None
) -> None:
    model, tok, ids = tiny()
    monkeypatch.setenv("CYCLEJ_FAULT", "domain_train:1:oom")
    with pytest.raises(StageFailed, match=r"micro-batch 1 .*domain_train\.seq_len.*domain_train\.precision"):
        train(
            model,
            train_examples=domain_examples(tok, ids, 4),
            tcfg=tcfg(batch_size=2, micro_batch_size=1),
            checkpoints=StageCheckpoints(ArtifactStore(str(tmp_path / "s")), "domain_train", "fp"),
            tokenizer=tok,
            marker_ids=ids,
        )


# ---- the domain_train stage --------------------------------------------------------------------------------
def test_domain_train_stage_adapts_to_oom_and_keeps_the_effective_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_faults: None
) -> None:
    from cyclej.pipeline.registry import StageRun
    from cyclej.stages.domain_train import run_domain_train

    cfg = pipeline_config(
        tmp_path,
        domain_train={
            "batch_size": 32,
            "micro_batch_size": 8,
            "max_steps": 3,
            "seq_len": 64,
            "precision": "fp32",
            "checkpoint_every_steps": 1,
            "eval_every_steps": 3,
            "eval_batches": 1,
            "lr": 1e-3,
        },
    )
    store = ArtifactStore(cfg.storage.root)
    inputs = build_inputs(store)
    monkeypatch.setenv("CYCLEJ_FAULT", "domain_train:2:oom")
    ref = run_domain_train(
        StageRun.start(
            "domain_train",
            cfg,
            {"context": inputs["context"], "data": inputs["data"]},
            store,
            Progress(show_bar=False),
        )
    )

    out = store.fetch(ref)
    records = read_jsonl(out / "metrics.jsonl")
    ooms = [r for r in records if r["event"] == "oom"]
    assert ooms == [
        {
            "event": "oom",
            "step": 2,
            "micro_batch": 4,
            "previous_micro_batch": 8,
            "accumulation": 8,
            "effective_batch": 32,
        }
    ]
    steps = {r["step"]: r for r in records if r["event"] == "train"}
    assert [steps[s]["micro_batch"] for s in (1, 2, 3)] == [8, 4, 4]
    assert all(r["micro_batch"] * r["accumulation"] == 32 for r in steps.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["oom_events"] == 1 and metrics["micro_batch_size"] == 4 and metrics["effective_batch"] == 32
    )
    assert metrics["steps"] == 3 and metrics["train_examples"] == 48
    # the artifact: adapter + marker rows, no full model copy, no checkpoints left
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert set(load_file(str(out / "marker_rows.safetensors"))) == {
        "token_ids",
        "input_embeddings",
        "output_embeddings",
    }
    assert (
        not list(out.rglob("model.safetensors"))
        and store.list_checkpoints("domain_train", ref.fingerprint) == []
    )
    assert ref.metrics["steps"] == 3


def test_head_on_targets_only_matches_the_model_loss_or_falls_back() -> None:
    """The head runs on target positions only where the logits are lm_head(body(x)); a family that
    scales its logits after the head (Granite) is detected and trained through its own forward. Either
    way the loss is the model's own."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from cyclej.corpora.formats import collate, single
    from cyclej.training.trainer import logits_are_head_of_backbone, target_loss_sum

    model, tok, ids = tiny("tiny-gptj")
    torch.manual_seed(0)
    granite = GraniteForCausalLM(
        GraniteConfig(
            vocab_size=1026,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            logits_scaling=4.0,
        )
    )
    rows = [single(e) for e in domain_examples(tok, ids, 2)]
    batch = collate(rows, four_d_mask=False)
    for m, head_only in ((model, True), (granite, False)):
        m.eval()
        assert logits_are_head_of_backbone(m, batch) is head_only
        with torch.no_grad():
            loss_sum, n = target_loss_sum(m, batch, head_only)
            reference = m(**batch).loss  # transformers' mean over the (shifted) target tokens
        assert n == sum(sum(1 for x in r.labels if x != -100) for r in rows)
        assert float(loss_sum) / n == pytest.approx(float(reference), rel=1e-5)


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    """precision bf16: the matmuls run in bf16 under autocast (losses differ from fp32 in the low bits),
    the trainable weights stay fp32."""
    losses = {}
    for precision in ("fp32", "bf16"):
        model, tok, ids = tiny("tiny-llama")
        r = train(
            model,
            train_examples=domain_examples(tok, ids, 8),
            tcfg=tcfg(precision=precision, max_steps=2),
            checkpoints=StageCheckpoints(ArtifactStore(str(tmp_path / precision)), "domain_train", "fp"),
            tokenizer=tok,
            marker_ids=ids,
        )
        losses[precision] = r.metrics["final_train_loss"]
        assert all(t.dtype == torch.float32 for t in r.trainable_state.values())
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05) and losses["bf16"] != losses["fp32"]


def test_lora_without_marker_rows_saves_the_adapter_only(tmp_path: Path) -> None:
    model, tok, ids = tiny()
    cfg = tcfg(max_steps=1, lora={"train_marker_rows": False})
    r = train(
        model,
        train_examples=domain_examples(tok, ids, 4),
        tcfg=cfg,
        checkpoints=StageCheckpoints(ArtifactStore(str(tmp_path / "s")), "domain_train", "fp"),
        tokenizer=tok,
        marker_ids=ids,
    )
    assert r.marker_rows is None and not any(k.startswith("marker_rows") for k in r.trainable_state)
    r.save_adapter(tmp_path / "out")
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "marker_rows.safetensors").exists()


def test_para_pairs_bad_line_is_named(tmp_path: Path) -> None:
    from cyclej.errors import BadInput
    from cyclej.stages.para_train import read_pairs, split_dev

    good = {"domain": "a", "text": "the food was cold .", "paraphrase": "cold food .", "scores": {}}
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps(good) + "\n" + json.dumps({"domain": "c", "text": "x", "paraphrase": "y"}) + "\n"
    )
    with pytest.raises(BadInput, match=r"pairs\.jsonl:2: needs domain"):
        read_pairs(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(BadInput, match=r"pairs\.jsonl:2: not a JSON object"):
        read_pairs(path)
    pairs = [{**good, "domain": d, "text": f"{d}{i}"} for d in "ab" for i in range(40)]
    train_pairs, dev_pairs = split_dev(pairs, n_dev_examples=8, seed=0)
    assert len(dev_pairs) == 4 and [p["domain"] for p in dev_pairs] == ["a", "b", "a", "b"]
    assert len(train_pairs) == 76 and not {p["text"] for p in dev_pairs} & {p["text"] for p in train_pairs}
