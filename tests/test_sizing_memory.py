"""`cyclej plan`'s RL memory model against the memory the same code takes: one RL trainer, a 28M-parameter
Llama in fp32 on the CPU, the plan's prediction for that config within 20 % of the measured peak; and the
gptj preset planned onto one 80 GB card with the options it uses implemented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cyclej.config import load_config
from cyclej.pipeline.sizing import GiB, format_plan, plan

REPO = Path(__file__).resolve().parents[1]

MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from cyclej.config import load_config
    from cyclej.corpora.formats import encode_text
    from cyclej.models.loading import load_model, marker_token_ids
    from cyclej.models.catalog import tiny_tokenizer_dir
    from cyclej.pipeline.sizing import GiB, _rl_memory
    from cyclej.reinforcement.policy_gradient import CycleDiscriminatorReward, RLTrainer

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    out = sys.argv[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    tok.save_pretrained(out)
    texts = [f"the soup number {i} was cold and the staff were slow" for i in range(10, 30)]
    max_tokens = max(len(encode_text(tok, t)) for t in texts)
    pcfg = load_config(preset="tiny", overrides=[
        f"models.base={out}", f"data.max_tokens={max_tokens}", "rl.prompts_per_step=2", "rl.rollouts=4",
        "rl.rollout_micro_batch=2", "rl.max_new_tokens=16", "rl.backend=transformers", "rl.precision=fp32",
        "rl.rewards={embedding: 0, rouge: 1, bleu: 0, discriminator: 0}", "rl.temperature=1.0",
    ])
    gc.collect()
    before_model = rss("VmRSS")
    policy, tok = load_model(out, markers=["<|A|>", "<|B|>"], dtype=torch.float32)
    ida, idb = marker_token_ids(tok, ["<|A|>", "<|B|>"])
    weights = pcfg.rl.rewards.model_dump()
    trainer = RLTrainer(pcfg.rl, policy, tok, {"a": ida, "b": idb}, {"a": texts, "b": texts},
                        CycleDiscriminatorReward(weights, None, None), weights)
    trainer.step()  # the first step allocates the optimizer state
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    for _ in range(2):
        trainer.step()
    peak = rss("VmHWM")
    predicted = _rl_memory(pcfg, pcfg.rl.rollout_micro_batch, False, 0.0)
    json.dump({"measured": peak - before_model, "predicted": predicted,
               "params": sum(p.numel() for p in policy.parameters())}, sys.stdout)
    """
)


@pytest.mark.slow
def test_rl_plan_matches_the_measured_peak_of_the_same_code(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CYCLEJ_CACHE": str(tmp_path / "cache"),
    }
    env.pop("CYCLEJ_FAULT", None)
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "model")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    predicted = sum(result["predicted"].values())
    measured = result["measured"]
    assert result["params"] > 25_000_000
    # The plan is for exactly these parts: weights, gradients, AdamW moments, one chunk's activations and
    # the rollout KV cache (no discriminator, no embedder: their rewards have weight 0).
    assert set(result["predicted"]) == {"weights", "gradients", "optimizer", "activations", "kv_cache"}
    assert abs(predicted - measured) / measured < 0.20, (
        predicted / 2**20,
        measured / 2**20,
        result["predicted"],
    )


def test_gptj_rl_is_planned_onto_one_80gb_card_with_implemented_options() -> None:
    cfg = load_config(preset="gptj")
    plans = {p.stage: p for p in plan(cfg)}
    rl = plans["rl"]
    assert rl.gpu is not None and rl.gpu.memory_gb == 80 and rl.gpu_count == 1
    # The preset's own settings, read from the config the stage runs with.
    assert cfg.rl.optimizer_offload and cfg.rl.precision == "bf16" and cfg.rl.backend == "vllm"
    assert rl.memory["vllm"] == pytest.approx(cfg.rl.vllm.gpu_memory_utilization * 80 * GiB)
    assert "optimizer" not in rl.memory  # in CPU RAM
    assert rl.memory["gradients"] == rl.params * 2
    assert rl.total_bytes + GiB <= 0.95 * 80 * GiB
    text = format_plan(list(plans.values()))
    assert "CPU RAM for the offloaded optimizer" in text
    for gone in ("8-bit", "FSDP", "two GPUs"):  # options no code implements are not offered
        assert gone not in text


def test_without_offload_gptj_rl_fits_no_80gb_card_and_the_plan_names_the_setting() -> None:
    cfg = load_config(preset="gptj", overrides=["rl.optimizer_offload=false"])
    rl = {p.stage: p for p in plan(cfg)}["rl"]
    # bf16 weights + bf16 gradients + fp32 masters + fp32 moments = 16 bytes per parameter on the GPU.
    assert rl.alternatives[0].name == "as configured" and rl.alternatives[0].gpu is None
    assert rl.alternatives[0].memory["optimizer"] == rl.params * 12
    assert rl.gpu is not None and rl.gpu.memory_gb == 80
    assert any("set rl.optimizer_offload: true" in n for n in rl.notes)


def test_vllm_is_counted_as_its_share_of_each_card() -> None:
    small = load_config(preset="gptj", overrides=["rl.vllm.gpu_memory_utilization=0.5"])
    rl = {p.stage: p for p in plan(small)}["rl"]
    assert rl.gpu is not None
    assert rl.memory["vllm"] == pytest.approx(0.5 * rl.gpu.memory_gb * GiB)
