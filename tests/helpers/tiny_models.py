"""Tiny random models for tests, with logits sharp enough (initializer_range 0.2) that greedy output
depends on the prompt."""

from __future__ import annotations

import torch
from transformers import GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

# A few review-like lines of both domains, for trainer and RL tests on the tiny models.
MARKERS = ["<|A|>", "<|B|>"]
LINES = [
    "the food was cold and the staff was rude",
    "never again , not even for free",
    "great food and lovely staff",
    "the best pizza in town , we will be back",
    "slow service and a dirty table",
    "friendly people and fair prices",
]
SOURCES = {"a": LINES[:2] + LINES[4:5], "b": LINES[2:4] + LINES[5:]}


def tiny_llama(seed: int = 0, hidden_size: int = 64, num_attention_heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gptj(seed: int = 0) -> GPTJForCausalLM:
    torch.manual_seed(seed)
    cfg = GPTJConfig(
        vocab_size=1024,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=16,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return GPTJForCausalLM(cfg).eval()


def tiny_llama_for_vllm(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama that vLLM's CPU attention serves: head_dim 64 (it refuses 16, the size of the one
    above). Same vocabulary and sharp logits."""
    return tiny_llama(seed, hidden_size=128, num_attention_heads=2)
