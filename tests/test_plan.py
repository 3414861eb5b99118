"""`cyclej plan`: the memory model, the GPU choice, the gptj RL options, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cyclej.config import STAGES, load_config
from cyclej.errors import BadInput
from cyclej.plan import (
    GiB,
    GpuType,
    PriceTable,
    activation_bytes,
    load_prices,
    model_shape,
    plan,
    smallest_fitting,
)


def test_gptj_plans_every_stage() -> None:
    plans = {p.stage: p for p in plan(load_config(preset="gptj"))}
    assert list(plans) == list(STAGES)
    rl = plans["rl"]  # RL's fit on one 80 GB card: tests/test_plan_memory.py
    assert rl.gpu is not None and rl.hourly_usd is not None
    # LoRA stages train ~16.5M adapter parameters of GPT-J; data and merge need no GPU.
    assert plans["context"].trainable_params == 28 * 8 * (4 * 8192 + 2 * (4096 + 16384))
    assert plans["data"].device == "cpu" and plans["merge"].device == "cpu"
    assert plans["paraphrase"].gpu is not None and plans["paraphrase"].gpu.memory_gb <= 48


def test_vllm_tensor_parallel_splits_the_paraphraser_over_gpus() -> None:
    one = {p.stage: p for p in plan(load_config(preset="gptj"))}["paraphrase"]
    two = {p.stage: p for p in plan(load_config(preset="gptj", overrides=["paraphrase.vllm.tensor_parallel_size=2"]))}
    assert two["paraphrase"].gpu_count == 2 and one.gpu_count == 1
    assert two["paraphrase"].memory["vllm"] < 0.6 * one.memory["vllm"]
    assert two["paraphrase"].job_variables()["gpu_count"] == 2


def test_micro_batch_that_fits_no_card_is_halved_and_said() -> None:
    cfg = load_config(preset="gptj")
    p = {s.stage: s for s in plan(cfg)}["para_train"]
    assert cfg.para_train.micro_batch_size == 4
    assert p.micro_batch is not None and p.micro_batch < 4
    assert p.gpu is not None and p.gpu.memory_gb <= 80
    assert any("para_train.micro_batch_size" in n for n in p.notes)


def test_lora_and_param_counts_match_the_real_model() -> None:
    """Adapter count = peft's on all-linear (tiny GPT-J, real peft); parameter count = the model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cyclej.models import resolve_model

    shape = model_shape("tiny-gptj")
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-gptj"), dtype=torch.float32)
    assert shape.params == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape.lora_params(8) == trainable


def test_activation_estimate_scales_as_documented() -> None:
    gptj = model_shape("EleutherAI/gpt-j-6b")
    llama = model_shape("mistralai/Mistral-7B-Instruct-v0.1")
    # Linear in the micro-batch; GPT-J's eager attention adds an s² term that SDPA models do not have.
    assert activation_bytes(gptj, 2, 1024, 2) == pytest.approx(2 * activation_bytes(gptj, 1, 1024, 2))
    no_logits = activation_bytes(llama, 1, 2048, 2, lm_head=False)
    assert no_logits == pytest.approx(2 * activation_bytes(llama, 1, 1024, 2, lm_head=False))
    eager_ratio = activation_bytes(gptj, 1, 2048, 2, lm_head=False) / activation_bytes(gptj, 1, 1024, 2, lm_head=False)
    assert eager_ratio > 2.5
    # fp32 activations cost twice the bf16 ones for the linear term.
    assert activation_bytes(llama, 1, 512, 4, lm_head=False) == pytest.approx(2 * no_logits / 4)


def test_smallest_fitting_card_and_price_table(tmp_path: Path) -> None:
    table = PriceTable("today", "test", (
        GpuType("BIG", 80, 2.0), GpuType("MID-CHEAP", 48, 0.4), GpuType("MID", 48, 0.5), GpuType("SMALL", 24, 0.2),
    ))
    assert smallest_fitting(10 * GiB, table).id == "SMALL"
    assert smallest_fitting(30 * GiB, table).id == "MID-CHEAP"
    assert smallest_fitting(23.5 * GiB, table).id == "MID-CHEAP"  # 1 GiB context + 5 % headroom
    assert smallest_fitting(100 * GiB, table) is None
    assert smallest_fitting(60 * GiB, table, max_gb=48) is None
    shipped = load_prices()
    assert shipped.date and "approximate" in shipped.source
    assert {"NVIDIA A40", "NVIDIA RTX A6000", "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"} <= {g.id for g in shipped.gpus}
    bad = tmp_path / "prices.yaml"
    bad.write_text("gpus: [{id: X}]\n")
    with pytest.raises(BadInput, match="prices.yaml"):
        load_prices(bad)


def test_unknown_hub_model_is_bad_input() -> None:
    cfg = load_config(preset="gptj", overrides=["models.paraphraser=someone/unknown-70b"])
    with pytest.raises(BadInput, match="someone/unknown-70b"):
        plan(cfg)


def test_cli_plan_prints_every_stage() -> None:
    from cyclej.cli import app

    result = CliRunner().invoke(app, ["plan", "--preset", "gptj"])
    assert result.exit_code == 0, result.output
    for stage in STAGES:
        assert f"\n{stage}" in result.output
    assert "NVIDIA" in result.output and "$" in result.output
    tiny = CliRunner().invoke(app, ["plan", "--preset", "tiny"])
    assert tiny.exit_code == 0, tiny.output
    assert "tiny-gptj" in tiny.output
