"""The streaming merge equals the naive two-model merge, tensor by tensor, and stays within its memory
bound."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from cyclej.config import load_config
from cyclej.errors import BadInput
from cyclej.merging.linear import load_adapter, merge_lora_adapters, merge_weights
from cyclej.models.catalog import resolve_model, tiny_tokenizer_dir
from cyclej.pipeline.registry import run_stage
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

MARKERS = ["<|A|>", "<|B|>"]
PI_KEY = "cyclej_position_interpolation"


# ---- fixtures: a sharded base with markers, and trained-looking adapters --------------------------------
def save_base(model: torch.nn.Module, tok: object, out: Path, max_shard_size: str) -> Path:
    """An INTERMEDIATE-1 look-alike: marker tokens added, the PI factor recorded, several shards."""
    setattr(model.config, PI_KEY, 2.0)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tok.save_pretrained(out)  # type: ignore[attr-defined]
    return out


def make_base(spec: str, out: Path) -> Path:
    src = resolve_model(spec)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    return save_base(model, tok, out, "60KB")


def make_adapter(
    base_dir: Path,
    stage_dir: Path,
    seed: int,
    r: int = 8,
    model: torch.nn.Module | None = None,
    **lora_kwargs: object,
) -> None:
    """What para_train / domain_train commit: adapter/ (PEFT) + marker_rows.safetensors (final rows).
    `model`: the base already in memory (it is given back unchanged)."""
    torch.manual_seed(seed)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    # init_lora_weights=False: A and B both random (PEFT's default B = 0 would make every delta zero).
    cfg = LoraConfig(
        r=r, lora_alpha=math.sqrt(8), target_modules="all-linear", init_lora_weights=False, **lora_kwargs
    )  # type: ignore[arg-type]
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(stage_dir / "adapter")
    model = peft_model.unload()
    ids = torch.tensor(tok.convert_tokens_to_ids(MARKERS), dtype=torch.int64)
    d = model.get_input_embeddings().weight.shape[1]
    rows = {"token_ids": ids, "input_embeddings": torch.randn(len(ids), d)}
    if not model.config.tie_word_embeddings:
        rows["output_embeddings"] = torch.randn(len(ids), d)
    save_file(rows, stage_dir / "marker_rows.safetensors")


def full_model_state(base_dir: Path, stage_dir: Path) -> dict[str, torch.Tensor]:
    """The naive full model of one stage: PEFT merge_and_unload into a fresh base, marker rows written in."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, stage_dir / "adapter").merge_and_unload()
    rows = load_file(stage_dir / "marker_rows.safetensors")
    with torch.no_grad():
        merged.get_input_embeddings().weight[rows["token_ids"]] = rows["input_embeddings"]
        if "output_embeddings" in rows:
            merged.get_output_embeddings().weight[rows["token_ids"]] = rows["output_embeddings"]
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_exact_merge(base_dir: Path, out_dir: Path, stages: list[Path], weights: list[float]) -> None:
    base = read_dir(base_dir)
    full = [full_model_state(base_dir, s) for s in stages]
    merged = read_dir(out_dir)
    assert set(merged) == set(base)
    n_changed = 0
    for key, b in base.items():
        ref = b.double() + sum(w * (f[key].double() - b.double()) for f, w in zip(full, weights, strict=True))
        got = merged[key]
        assert got.dtype == b.dtype and got.shape == b.shape, key
        rel = (got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        assert rel <= 1e-6, f"{key}: relative error {rel:.3g}"
        n_changed += int(not torch.equal(got, b))
    # Every LoRA'd linear and the embedding(s) moved: the test would notice a merge that did nothing.
    n_lora = len(load_adapter(stages[0]).factors)
    assert n_changed >= n_lora + 1


def base_and_adapters(tmp_path: Path, spec: str) -> tuple[Path, Path, Path]:
    base = make_base(spec, tmp_path / "base")
    assert len(list(base.glob("*.safetensors"))) >= 3, "the base should be sharded"
    make_adapter(base, tmp_path / "para_train", seed=1)
    make_adapter(base, tmp_path / "domain_train", seed=2)
    return base, tmp_path / "para_train", tmp_path / "domain_train"


# ---- exactness --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["tiny-gptj", "tiny-llama"])
def test_merge_equals_naive_reference(tmp_path: Path, spec: str) -> None:
    base, sa, sb = base_and_adapters(tmp_path, spec)
    a, b = load_adapter(sa), load_adapter(sb)
    assert all(f.b.abs().sum() > 0 for f in a.factors.values()), "B must be non-zero for a meaningful test"
    # all-linear: every attention and MLP projection of both layers (GPT-J 4+2, Llama 4+3), lm_head excluded.
    assert len(a.factors) == {"tiny-gptj": 12, "tiny-llama": 14}[spec]
    wa, wb = merge_weights(0.5)
    out = tmp_path / "merged"
    stats = merge_lora_adapters(base, out, [(a, wa), (b, wb)])
    assert stats.shards == len(list(base.glob("*.safetensors")))
    assert_exact_merge(base, out, [sa, sb], [wa, wb])

    # Llama ties lm_head to embed_tokens: it is not stored, and the marker rows live in embed_tokens only.
    merged = read_dir(out)
    if spec == "tiny-llama":
        assert "lm_head.weight" not in merged
        assert stats.marker_rows == 2
    else:
        assert "lm_head.weight" in merged
        assert stats.marker_rows == 4

    # Same shard names and index, config (PI factor) and tokenizer copied.
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in base.glob("*.safetensors")
    )
    assert (
        json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert json.loads((out / "config.json").read_text())[PI_KEY] == 2.0

    # Plain transformers loads it (every weight from the files) and generates.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    emb_key = "transformer.wte.weight" if spec == "tiny-gptj" else "model.embed_tokens.weight"
    assert torch.equal(model.get_input_embeddings().weight, merged[emb_key])
    ids = tok.convert_tokens_to_ids(MARKERS)
    assert ids == [1024, 1025]
    prompt = torch.tensor([[ids[0], 5, 6, 7, ids[1]]])
    gen = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 10)


def test_task_arithmetic_weights(tmp_path: Path) -> None:
    base, sa, sb = base_and_adapters(tmp_path, "tiny-llama")
    wa, wb = merge_weights(0.5, weight_a=1.0, weight_b=0.7)
    assert (wa, wb) == (1.0, 0.7)
    out = tmp_path / "merged"
    merge_lora_adapters(base, out, [(load_adapter(sa), wa), (load_adapter(sb), wb)])
    assert_exact_merge(base, out, [sa, sb], [wa, wb])
    # w = 1 gives exactly model 2A (the other delta has weight 0).
    only_a = tmp_path / "only_a"
    merge_lora_adapters(base, only_a, [(load_adapter(sa), 1.0), (load_adapter(sb), 0.0)])
    full_a = full_model_state(base, sa)
    for key, t in read_dir(only_a).items():
        torch.testing.assert_close(t, full_a[key], rtol=1e-6, atol=1e-7)


def test_conv1d_fan_in_fan_out_and_rslora(tmp_path: Path) -> None:
    """GPT-2 stores its projections as Conv1D ([in, out]): PEFT sets fan_in_fan_out and the delta is B@A
    transposed. rsLoRA scales by alpha/sqrt(r); a rank_pattern gives one module another rank."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    base = save_base(GPT2LMHeadModel(cfg), tok, tmp_path / "base", "30KB")
    make_adapter(base, tmp_path / "sa", seed=3, fan_in_fan_out=True, use_rslora=True)
    make_adapter(base, tmp_path / "sb", seed=4, r=4, rank_pattern={"c_fc": 2})
    a, b = load_adapter(tmp_path / "sa"), load_adapter(tmp_path / "sb")
    assert all(f.fan_in_fan_out for f in a.factors.values())
    assert a.factors["transformer.h.0.attn.c_attn"].scaling == pytest.approx(math.sqrt(8) / math.sqrt(8))
    assert b.factors["transformer.h.0.mlp.c_fc"].a.shape[0] == 2
    assert b.factors["transformer.h.0.mlp.c_fc"].scaling == pytest.approx(math.sqrt(8) / 2)
    out = tmp_path / "merged"
    merge_lora_adapters(base, out, [(a, 0.3), (b, 0.7)])
    assert_exact_merge(base, out, [tmp_path / "sa", tmp_path / "sb"], [0.3, 0.7])


def test_bf16_base_is_merged_into_fp32(tmp_path: Path) -> None:
    """A sharded bf16 base gives an fp32 merge (rounding the sum back to bf16 would drop about a third of
    the delta entries): the exact fp32 sum, every other tensor widened exactly, the index and config.json
    saying so, and transformers loads it."""
    src = resolve_model("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    model.resize_token_embeddings(len(tok))
    base = save_base(model, tok, tmp_path / "base", "60KB")
    make_adapter(base, tmp_path / "sa", seed=5)
    make_adapter(base, tmp_path / "sb", seed=6)
    a, b = load_adapter(tmp_path / "sa"), load_adapter(tmp_path / "sb")
    out = tmp_path / "merged"
    stats = merge_lora_adapters(base, out, [(a, 0.5), (b, 0.5)])
    assert stats.shards > 1 and any("fp32" in n for n in stats.notes)
    base_t, merged = read_dir(base), read_dir(out)
    assert set(merged) == set(base_t) and all(t.dtype == torch.float32 for t in merged.values())
    key = "model.layers.1.mlp.down_proj.weight"
    module = key.removesuffix(".weight")
    expected = base_t[key].float() + 0.5 * a.factors[module].delta() + 0.5 * b.factors[module].delta()
    assert torch.allclose(merged[key], expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.norm.weight"], base_t["model.norm.weight"].float())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in merged.values())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.state_dict()[key], merged[key])


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_adapters_are_refused_with_the_file_named(tmp_path: Path) -> None:
    base, sa, _ = base_and_adapters(tmp_path, "tiny-llama")
    with pytest.raises(BadInput, match="adapter_config.json: missing"):
        load_adapter(tmp_path / "nowhere")

    cfg_path = sa / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(BadInput, match="use_dora"):
        load_adapter(sa)
    cfg_path.write_text(json.dumps(cfg))

    # An adapter trained on another architecture names modules the base does not have.
    gptj = make_base("tiny-gptj", tmp_path / "gptj")
    with pytest.raises(BadInput, match="has no weight"):
        merge_lora_adapters(gptj, tmp_path / "out", [(load_adapter(sa), 1.0)])

    # Marker ids beyond the embedding.
    save_file(
        {"token_ids": torch.tensor([5000]), "input_embeddings": torch.randn(1, 64)},
        sa / "marker_rows.safetensors",
    )
    with pytest.raises(BadInput, match="fall outside"):
        merge_lora_adapters(base, tmp_path / "out2", [(load_adapter(sa), 1.0)])
    assert not list((tmp_path / "out2").glob("*.safetensors")), "checked before anything is written"


# ---- memory ------------------------------------------------------------------------------------------------
_MEASURE = textwrap.dedent(
    """
    import json, sys
    import psutil, torch, transformers.models.llama.modeling_llama  # imports belong to the baseline
    from cyclej.merging.linear import load_adapter, merge_lora_adapters, peak_rss_bytes
    baseline = psutil.Process().memory_info().rss
    base, sa, sb, out = sys.argv[1:5]
    adapters = [(load_adapter(sa), 0.5), (load_adapter(sb), 0.5)]
    stats = merge_lora_adapters(base, out, adapters)
    peak = peak_rss_bytes()
    print(json.dumps({"baseline": baseline, "peak": peak, **stats.as_dict()}))
    """
)


def test_peak_rss_stays_within_one_shard_plus_adapters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    # ≈ 37 M fp32 parameters ≈ 150 MB in 4+ shards of ≤ 40 MB: large enough that holding a second shard,
    # or a whole model, would break the bound.
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    base = save_base(model, tok, tmp_path / "base", "40MB")
    shards = list(base.glob("*.safetensors"))
    assert len(shards) >= 4
    total = sum(p.stat().st_size for p in shards)
    assert total > 100e6
    make_adapter(base, tmp_path / "sa", seed=1, model=model)
    make_adapter(base, tmp_path / "sb", seed=2, model=model)
    del model

    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(base), str(tmp_path / "sa"), str(tmp_path / "sb"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = got["baseline"] + 1.5 * (got["largest_shard_bytes"] + got["adapter_bytes"])
    print(
        f"peak {got['peak'] / 2**20:.0f} MiB, baseline {got['baseline'] / 2**20:.0f} MiB, "
        f"bound {bound / 2**20:.0f} MiB, model {total / 2**20:.0f} MiB"
    )
    assert got["peak"] <= bound
    # Sanity: the merge really happened (and the bound is below a whole model).
    assert got["tensors_changed"] == 8 * 7 + 2
    assert bound - got["baseline"] < total
    merged = load_file(next(p for p in out.glob("*.safetensors") if "00001" in p.name))
    original = load_file(next(p for p in shards if "00001" in p.name))
    assert any(not torch.equal(merged[k], original[k]) for k in original)


# ---- the stage ---------------------------------------------------------------------------------------------
def committed_inputs(tmp_path: Path, store: ArtifactStore) -> dict[str, ArtifactRef]:
    """context / para_train / domain_train / data artifacts as the upstream stages commit them."""
    ctx = tmp_path / "ctx"
    make_base("tiny-gptj", ctx / "model")
    make_adapter(ctx / "model", tmp_path / "pt", seed=1)
    make_adapter(ctx / "model", tmp_path / "dt", seed=2)
    data = tmp_path / "data"
    for domain, words in (("a", "bad awful slow cold"), ("b", "good great fast warm")):
        (data / domain).mkdir(parents=True)
        lines = [f"the food was {w} and the staff {v}" for w in words.split() for v in ("smiled", "left")]
        (data / domain / "dev.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (data / domain / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {
        "context": store.commit("context", "c0", ctx),
        "para_train": store.commit("para_train", "p0", tmp_path / "pt"),
        "domain_train": store.commit("domain_train", "d0", tmp_path / "dt"),
        "data": store.commit("data", "x0", data),
    }


def test_merge_stage_sweep_keeps_the_best_weight(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    inputs = committed_inputs(tmp_path, store)
    cfg = load_config(preset="tiny", overrides=["merge.sweep=[0.0, 0.5, 1.0]", "merge.sweep_examples=6"])
    ref = run_stage("merge", cfg, inputs, store, Progress(show_bar=False))
    out = store.fetch(ref)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["sweep"]
    assert [r["weight"] for r in rows] == [0.0, 0.5, 1.0]
    assert metrics["sweep_examples"] == {"para_style": 12, "domain_style": 6}  # 3 + 3 texts, 2A both ways
    scores = [r["score"] for r in rows]
    assert len(set(scores)) == 3, "each weight gives another model, so another loss"
    best = rows[scores.index(min(scores))]["weight"]
    assert metrics["weight_a"] == best and metrics["weight_b"] == pytest.approx(1 - best)
    assert ref.metrics["sweep"] == rows  # the Prefect layer posts this list as a table
    assert "**best**" in (out / "sweep.md").read_text() and metrics["sweep_markdown"].count("\n") == 5
    assert not (out / "sweep").exists()

    # The kept model is the merge at the best weight, byte for byte.
    direct = tmp_path / "direct"
    merge_lora_adapters(
        store.fetch(inputs["context"]) / "model",
        direct,
        [
            (load_adapter(store.fetch(inputs["para_train"])), best),
            (load_adapter(store.fetch(inputs["domain_train"])), 1 - best),
        ],
    )
    for shard in direct.glob("*.safetensors"):
        assert shard.read_bytes() == (out / "model" / shard.name).read_bytes()
    assert json.loads((out / "model" / "config.json").read_text())[PI_KEY] == 2.0
    # Cached: a second call returns the committed artifact.
    assert run_stage("merge", cfg, inputs, store).manifest_sha256 == ref.manifest_sha256


def test_merge_stage_task_arithmetic(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    inputs = committed_inputs(tmp_path, store)
    cfg = load_config(preset="tiny", overrides=["merge.weight_a=1.0", "merge.weight_b=0.5"])
    ref = run_stage("merge", cfg, inputs, store, Progress(show_bar=False))
    assert (ref.metrics["weight_a"], ref.metrics["weight_b"]) == (1.0, 0.5)
    out = store.fetch(ref) / "model"
    assert_exact_merge(
        store.fetch(inputs["context"]) / "model",
        out,
        [store.fetch(inputs["para_train"]), store.fetch(inputs["domain_train"])],
        [1.0, 0.5],
    )
    # A sweep and explicit task-arithmetic weights contradict each other: refused when the config loads.
    with pytest.raises(BadInput, match="merge: .*unset weight_a"):
        load_config(
            preset="tiny", overrides=["merge.weight_a=1.0", "merge.weight_b=0.5", "merge.sweep=[0.5]"]
        )
