"""NeoBERT (chandar-lab/NeoBERT, arXiv 2502.19587) in plain PyTorch: the `gptj` preset's discriminator,
loaded from the hub checkpoint without the hub's own code.

Why: the hub repository ships its model as remote code (`model.py`, `trust_remote_code`), and that file
imports xformers' SwiGLU at module level, outside any try block. transformers' `check_imports` imports
every such module before it runs the file and raises ImportError for a missing one; xformers is in none of
our locks (NeoBERT's README pins xformers 0.0.28.post3, a build for torch 2.5). So "chandar-lab/NeoBERT"
cannot load through remote code here. This module implements the same network with the same parameter
names, registered with transformers' Auto classes under the hub's `model_type` "neobert", and
`cyclej.reinforcement.discriminator` always loads a "neobert" checkpoint through it,
never through the hub's code.

The network, as the hub's model.py and rotary.py compute it (checked against a restatement of that code in
tests/test_neobert.py):
- `encoder`: token embedding only (no token types, no learned positions); positions come from RoPE.
- `transformer_encoder.N`, pre-norm blocks: x += wo(attention(attention_norm(x))); x += ffn(ffn_norm(x)),
  with bias-free `qkv` (hidden -> 3 * hidden, viewed per head as [q | k | v] of head_dim each, *then* split)
  and `wo`, and torch's RMSNorm (weight only, eps `norm_eps`).
- RoPE on q and k: consecutive pairs (x[2i], x[2i+1]) rotated by t / 10000^(2i / head_dim). The hub
  multiplies view_as_complex(x) by a complex buffer; here cos/sin are computed per forward in fp32 (the same
  rotation, and no complex non-persistent buffer for transformers' meta-device loading to leave unset).
- Attention: scaled_dot_product_attention, key padding mask (attention_mask 1 = attend), no dropout.
- `ffn`: xformers' SwiGLU with packed weights: `w12` (hidden -> 2f, first half w1, second half w2) and
  `w3`: w3(silu(w1 x) * w2 x), with f = 2/3 * intermediate_size rounded up to a multiple of 8 (3072 -> 2048).
- `layer_norm`: a final RMSNorm.
- NeoBERTForSequenceClassification: the first ([CLS]) token -> dropout -> `dense` -> tanh -> dropout ->
  `classifier` (dropout `classifier_dropout`, default 0.1). NeoBERTLMHead: an untied `decoder`, the
  checkpoint's own head (the hub's `architectures` is ["NeoBERTLMHead"]): the hub's model.safetensors holds
  `model.*` and `decoder.*`, so a classifier loads every `model.*` tensor by name and only `dense` and
  `classifier` start fresh.
Left out: the hub's packed-sequence path (cu_seqlens, flash-attn), position_ids and output_attentions.

The tokenizer is the hub's own files (bert-base-uncased WordPiece, `BertTokenizer`), loaded without code.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

MODEL_TYPE = "neobert"
ROPE_THETA = 10000.0  # the hub's precompute_freqs_cis default, not a config key


class NeoBERTConfig(PretrainedConfig):
    """The hub's config keys, with its NeoBERTConfig defaults (its config.json sets norm_eps 1e-5 and
    max_length 4096)."""

    model_type = MODEL_TYPE

    hidden_size: int = 768
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    embedding_init_range: float = 0.02
    decoder_init_range: float = 0.02
    norm_eps: float = 1e-6
    vocab_size: int = 30522
    pad_token_id: int | None = 0
    max_length: int = 1024
    dim_head: int | None = None  # derived; the hub's config.json stores it

    def __post_init__(self, **kwargs):  # type: ignore[no-untyped-def]
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("NeoBERT: hidden_size must be divisible by num_attention_heads")
        self.dim_head = self.hidden_size // self.num_attention_heads
        # The hub's auto_map points at its model.py (and its config.json carries a stray trust_remote_code);
        # a folder saved from this class has no such file, and a later load must not go looking for it.
        kwargs.pop("auto_map", None)
        kwargs.pop("trust_remote_code", None)
        super().__post_init__(**kwargs)

    @property
    def ffn_size(self) -> int:
        """The SwiGLU width: 2/3 of intermediate_size, rounded up to a multiple of 8
        (the hub's EncoderBlock)."""
        f = int(2 * self.intermediate_size / 3)
        return 8 * ((f + 7) // 8)


def rotary_cos_sin(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles t * theta^(-2i / head_dim), [length, head_dim / 2], in fp32."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each consecutive pair (x[2i], x[2i+1]) of x [B, L, H, D] by its angle: the complex product
    (a + ib)(cos + i sin) the hub computes, in real arithmetic, in fp32."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


class SwiGLU(nn.Module):
    """xformers.ops.SwiGLU with packed weights (its default), in plain torch: the same `w12`/`w3` names."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=False)
        self.w3 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class EncoderBlock(nn.Module):
    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = (
            config.num_attention_heads,
            config.hidden_size // config.num_attention_heads,
        )
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.ffn = SwiGLU(config.hidden_size, config.ffn_size, config.hidden_size)
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self._attention(self.attention_norm(x), key_mask, cos, sin)
        return x + self.ffn(self.ffn_norm(x))

    def _attention(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        b, n, _ = x.shape
        # Per head [q | k | v], as the checkpoint's qkv rows are laid out (not all q rows, then all k rows).
        q, k, v = self.qkv(x).view(b, n, self.heads, 3 * self.head_dim).chunk(3, dim=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask
        )
        return self.wo(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class NeoBERTPreTrainedModel(PreTrainedModel):
    config_class = NeoBERTConfig
    base_model_prefix = "model"
    _no_split_modules = ["EncoderBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        """The hub's init (uniform within the init ranges);
        only what a checkpoint did not provide is touched."""
        if isinstance(module, nn.Linear):
            init.uniform_(module.weight, -self.config.decoder_init_range, self.config.decoder_init_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -self.config.embedding_init_range, self.config.embedding_init_range)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)


class NeoBERT(NeoBERTPreTrainedModel):
    """The encoder: last_hidden_state [B, L, hidden] after the final RMSNorm."""

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__(config)
        self.encoder = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.transformer_encoder = nn.ModuleList(
            EncoderBlock(config) for _ in range(config.num_hidden_layers)
        )
        self.layer_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder = cast(nn.Embedding, value)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        x = self.encoder(input_ids)
        cos, sin = rotary_cos_sin(input_ids.shape[1], self.config.dim_head, input_ids.device)
        # [B, 1, 1, L]: every query of every head sees the same keys (the hub repeats it to [B, H, L, L]).
        key_mask = attention_mask[:, None, None, :].bool() if attention_mask is not None else None
        for layer in self.transformer_encoder:
            x = layer(x, key_mask, cos, sin)
        return BaseModelOutput(last_hidden_state=self.layer_norm(x))


class NeoBERTLMHead(NeoBERTPreTrainedModel):
    """The masked-LM model the hub checkpoint is (an untied `decoder`)."""

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__(config)
        self.model = NeoBERT(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        logits = self.decoder(self.model(input_ids, attention_mask).last_hidden_state)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return MaskedLMOutput(loss=cast("torch.FloatTensor | None", loss), logits=logits)


class NeoBERTForSequenceClassification(NeoBERTPreTrainedModel):
    """The hub's classification head on the first ([CLS]) token."""

    # The hub checkpoint's MLM decoder has no place here: dropping it is expected, anything else is reported.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: NeoBERTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = NeoBERT(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        assert config.num_labels is not None  # a classification config always has its labels
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The hub's head init: normal(0, classifier_init_range) weights, zero biases.
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=getattr(self.config, "classifier_init_range", 0.02))
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        x = self.dropout(hidden[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        logits = self.classifier(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=cast("torch.FloatTensor | None", loss), logits=logits)


# Importing this module makes "neobert" a model type transformers knows; exist_ok: re-imports are fine.
AutoConfig.register(MODEL_TYPE, NeoBERTConfig, exist_ok=True)
AutoModel.register(NeoBERTConfig, NeoBERT, exist_ok=True)
AutoModelForMaskedLM.register(NeoBERTConfig, NeoBERTLMHead, exist_ok=True)
AutoModelForSequenceClassification.register(NeoBERTConfig, NeoBERTForSequenceClassification, exist_ok=True)
# The hub's tokenizer_config names BertTokenizer itself; this covers a NeoBERT folder whose one does not.
AutoTokenizer.register(NeoBERTConfig, tokenizer_class=BertTokenizer, exist_ok=True)
