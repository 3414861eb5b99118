"""`cyclej plan`: the memory model, the GPU choice, the gptj RL options, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cyclej.config import STAGES, load_config
from cyclej.errors import BadInput
from cyclej.pipeline.sizing import (
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
    rl = plans["rl"]  # RL's fit on one 80 GB card: tests/test_sizing_memory.py
    assert rl.gpu is not None and rl.hourly_usd is not None
    # LoRA stages train ~16.5M adapter parameters of GPT-J; data and merge need no GPU.
    assert plans["context"].trainable_params == 28 * 8 * (4 * 8192 + 2 * (4096 + 16384))
    assert plans["data"].device == "cpu" and plans["merge"].device == "cpu"
    assert plans["paraphrase"].gpu is not None and plans["paraphrase"].gpu.memory_gb <= 48


def test_vllm_tensor_parallel_splits_the_paraphraser_over_gpus() -> None:
    one = {p.stage: p for p in plan(load_config(preset="gptj"))}["paraphrase"]
    two = {
        p.stage: p
        for p in plan(load_config(preset="gptj", overrides=["paraphrase.vllm.tensor_parallel_size=2"]))
    }
    assert two["paraphrase"].gpu_count == 2 and one.gpu_count == 1
    assert two["paraphrase"].memory["vllm"] < 0.6 * one.memory["vllm"]
    assert two["paraphrase"].job_variables()["gpu_count"] == 2


def test_micro_batch_that_fits_no_card_is_halved_and_said() -> None:
    cfg = load_config(preset="gptj", overrides=["para_train.gradient_checkpointing=false"])
    p = {s.stage: s for s in plan(cfg)}["para_train"]
    assert cfg.para_train.micro_batch_size == 4
    assert p.micro_batch is not None and p.micro_batch < 4
    assert p.gpu is not None and p.gpu.memory_gb <= 80
    assert any("para_train.micro_batch_size" in n for n in p.notes)


def test_gradient_checkpointing_lets_the_gptj_lora_stages_train_at_their_micro_batch() -> None:
    """Without recomputation GPT-J's eager attention keeps 4096² fp32 scores per head and layer (~59 GiB
    at one 4k row): the preset's micro-batch 4 fit no 80 GB card. With it (the gptj preset) it fits."""
    off = {
        s.stage: s
        for s in plan(
            load_config(
                preset="gptj",
                overrides=[
                    f"{k}.gradient_checkpointing=false"
                    for k in ("context", "para_train", "domain_train", "rl")
                ],
            )
        )
    }
    on = {s.stage: s for s in plan(load_config(preset="gptj"))}
    for stage in ("context", "para_train", "domain_train"):
        assert on[stage].micro_batch == load_config(preset="gptj").model_dump()[stage]["micro_batch_size"]
        assert on[stage].gpu is not None and on[stage].gpu.memory_gb <= 80
        assert not any("micro_batch_size" in n for n in on[stage].notes)
    assert off["context"].memory["activations"] > 50 * 2**30  # micro-batch 1 × 4096 without recomputation
    assert on["context"].memory["activations"] < off["context"].memory["activations"] / 8
    assert on["rl"].memory["activations"] < off["rl"].memory["activations"]


def test_lora_and_param_counts_match_the_real_model() -> None:
    """Adapter count = peft's on all-linear (tiny GPT-J, real peft); parameter count = the model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cyclej.models.catalog import resolve_model

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
    eager_ratio = activation_bytes(gptj, 1, 2048, 2, lm_head=False) / activation_bytes(
        gptj, 1, 1024, 2, lm_head=False
    )
    assert eager_ratio > 2.5
    # fp32 activations cost twice the bf16 ones for the linear term.
    assert activation_bytes(llama, 1, 512, 4, lm_head=False) == pytest.approx(2 * no_logits / 4)


def test_smallest_fitting_card_and_price_table(tmp_path: Path) -> None:
    table = PriceTable(
        "today",
        "test",
        (
            GpuType("BIG", 80, 2.0),
            GpuType("MID-CHEAP", 48, 0.4),
            GpuType("MID", 48, 0.5),
            GpuType("SMALL", 24, 0.2),
        ),
    )
    assert smallest_fitting(10 * GiB, table).id == "SMALL"
    assert smallest_fitting(30 * GiB, table).id == "MID-CHEAP"
    assert smallest_fitting(23.5 * GiB, table).id == "MID-CHEAP"  # 1 GiB context + 5 % headroom
    assert smallest_fitting(100 * GiB, table) is None
    assert smallest_fitting(60 * GiB, table, max_gb=48) is None
    shipped = load_prices()
    assert shipped.date and "approximate" in shipped.source
    assert {"NVIDIA A40", "NVIDIA RTX A6000", "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"} <= {
        g.id for g in shipped.gpus
    }
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


def test_gptj_pods_get_the_ram_disk_and_vcpus_their_stage_needs() -> None:
    """Host RAM, vCPU and disk per stage, from the same accounting as the code (cyclej.pipeline.sizing
    docstring)."""
    cfg = load_config(preset="gptj")
    plans = {p.stage: p for p in plan(cfg)}
    rl, params = plans["rl"], plans["rl"].params
    # RL: the offloaded fp32 masters + two moments (12 bytes per parameter, 67.7 GiB) live in the pod's RAM
    assert rl.host_bytes >= 68 * GiB and rl.job_variables()["min_memory_in_gb"] >= 68
    assert rl.vcpus >= 16  # its AdamW step runs on the CPU
    # a checkpoint is the masters and moments (no bf16 policy copy) plus the discriminator's state
    assert 12 * params <= rl.checkpoint_bytes <= 12 * params + 4 * GiB
    # disk: the fp32 merge input + one checkpoint in flight (S3 store) + the fp32 output (+ the image)
    assert rl.disk_bytes >= 4 * params + rl.checkpoint_bytes + 4 * params
    assert rl.job_variables()["container_disk_gb"] * GiB >= rl.disk_bytes
    # the preset checkpoints as seldom as the plan asks (by time only) and keeps the newest one
    assert cfg.rl.checkpoint_every_minutes >= rl.checkpoint_minutes and cfg.rl.keep_checkpoints == 1
    assert cfg.rl.checkpoint_every_steps >= cfg.rl.steps
    assert not any("checkpoint_every" in n for n in rl.notes), rl.notes
    # LoRA checkpoints: the adapters and their moments, 12 bytes per adapter parameter
    assert plans["para_train"].checkpoint_bytes == 12 * plans["para_train"].trainable_params
    # the context stage downloads GPT-J's fp32 hub weights (24.2 GB) and writes the bf16 model
    assert plans["context"].disk_bytes >= 6 * params
    for p in plans.values():
        if p.device == "gpu":
            jv = p.job_variables()
            assert list(jv) == [
                "gpu_type_id",
                "gpu_count",
                "min_memory_in_gb",
                "min_vcpu_count",
                "container_disk_gb",
            ]
            assert all(isinstance(jv[k], int) and jv[k] > 0 for k in list(jv)[1:]), (p.stage, jv)
        assert p.host_bytes > 0 and p.disk_bytes > 0 and p.vcpus > 0, p.stage


def test_a_checkpoint_interval_that_costs_more_than_a_few_percent_is_flagged() -> None:
    cfg = load_config(
        preset="gptj", overrides=["rl.checkpoint_every_minutes=10", "rl.checkpoint_every_steps=10"]
    )
    rl = {p.stage: p for p in plan(cfg)}["rl"]
    assert any("set rl.checkpoint_every_minutes:" in n for n in rl.notes), rl.notes
    assert any("set rl.checkpoint_every_steps: 500" in n for n in rl.notes), rl.notes


def test_cli_plan_shows_ram_vcpu_disk_and_checkpoint_columns() -> None:
    from cyclej.cli import app

    result = CliRunner().invoke(app, ["plan", "--preset", "gptj"])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0].split()
    for column in ("RAM", "vCPU", "disk", "ckpt"):
        assert column in header, header
    rl = next(line for line in result.output.splitlines() if line.startswith("rl "))
    ram, vcpu, disk = (int(x) for x in rl.split()[-4:-1])
    jv = {p.stage: p for p in plan(load_config(preset="gptj"))}["rl"].job_variables()
    assert (ram, vcpu, disk) == (jv["min_memory_in_gb"], jv["min_vcpu_count"], jv["container_disk_gb"])
    assert "    RAM GiB:" in result.output and "    disk GiB:" in result.output


def test_back_translation_sizes_its_second_checkpoint_series_and_the_embedder() -> None:
    off = {p.stage: p for p in plan(load_config(preset="gptj"))}["para_train"]
    cfg = load_config(preset="gptj", overrides=["para_train.back_translation.steps=100"])
    on = {p.stage: p for p in plan(cfg)}["para_train"]
    assert on.disk["checkpoints (back-translation phase)"] == off.disk["checkpoints"] > 0
    assert on.disk_bytes > off.disk_bytes and on.host_bytes > off.host_bytes
    assert "hub: " + cfg.models.embedder in on.disk
