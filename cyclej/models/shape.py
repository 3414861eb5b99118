"""What the planners need to know of a transformer without loading it: its shape (layers, widths,
parameters) from the published table, a local config.json or the safetensors headers, and the bytes
per parameter of its stored weights."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from cyclej.errors import BadInput


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a transformer."""

    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool = False  # Llama-style gate/up/down projections
    eager_attention: bool = False  # attention scores materialized (GPT-J: in fp32)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def lora_params(self, rank: int) -> int:
        """Adapters on every attention and MLP projection ("all-linear")."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        attn = [(h, h), (h, kv), (h, kv), (h, h)]
        mlp = [(h, i), (h, i), (i, h)] if self.gated_mlp else [(h, i), (i, h)]
        return self.layers * sum(rank * (a + b) for a, b in attn + mlp)

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer layer (attention + MLP projections; norms are negligible)."""
        kv = self.kv_heads * self.head_dim
        return (
            2 * self.hidden * self.hidden
            + 2 * self.hidden * kv
            + (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        )

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


_GPTJ = ModelShape(6_053_381_344, 28, 4096, 16, 16, 16384, 50400, eager_attention=True)
_MISTRAL = ModelShape(7_241_732_096, 32, 4096, 32, 8, 14336, 32000, gated_mlp=True)
_QWEN = ModelShape(7_615_616_512, 28, 3584, 28, 4, 18944, 152064, gated_mlp=True)
# As the discriminator loads it (cyclej.models.neobert, a 3-class head instead of the checkpoint's MLM
# decoder), with the SwiGLU width the checkpoint has: 2/3 of its config's intermediate_size 3072, i.e. 2048.
_NEOBERT = ModelShape(222_258_435, 28, 768, 12, 12, 2048, 30522, gated_mlp=True)
_MINILM = ModelShape(22_713_216, 6, 384, 12, 12, 1536, 30522)
_SMOLLM2 = ModelShape(134_515_008, 30, 576, 9, 3, 1536, 49152, gated_mlp=True)

# Published shapes of the hub models the recipe names (nothing is downloaded to plan).
KNOWN_MODELS: dict[str, ModelShape] = {
    "EleutherAI/gpt-j-6b": _GPTJ,
    "EleutherAI/gpt-j-6B": _GPTJ,
    "mistralai/Mistral-7B-Instruct-v0.1": _MISTRAL,
    "mistralai/Mistral-7B-v0.1": _MISTRAL,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN,
    "Qwen/Qwen2.5-7B": _QWEN,
    "chandar-lab/NeoBERT": _NEOBERT,
    "sentence-transformers/all-MiniLM-L6-v2": _MINILM,
    "minilm": _MINILM,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2,
    "smollm2": _SMOLLM2,  # known, so planning never triggers the GGUF conversion
}


# Bytes per parameter of the weights as published, for the hub models the recipe names that are not
# stored in 16 bits (a stage downloads them whole): GPT-J-6B's main revision is fp32 (24.2 GB).
STORED_FP32 = {
    "EleutherAI/gpt-j-6b",
    "EleutherAI/gpt-j-6B",
    "chandar-lab/NeoBERT",
    "sentence-transformers/all-MiniLM-L6-v2",
    "minilm",
}


def stored_bytes(spec: str) -> float:
    """Bytes per parameter of a model spec's published weights: the table above for hub ids (16-bit
    otherwise), the safetensors headers of a local or built-in model (fp32 when it has none)."""
    if spec in STORED_FP32:
        return 4.0
    if spec in KNOWN_MODELS:
        return 2.0
    from cyclej.models.catalog import resolve_model

    path = Path(resolve_model(spec))
    params, nbytes = _safetensors_sizes(path)
    return nbytes / params if params else 4.0


def model_shape(spec: str) -> ModelShape:
    """The shape of a model spec: the table for hub ids, config.json (+ safetensors headers for the exact
    parameter count) for local and built-in models."""
    if spec in KNOWN_MODELS:
        return KNOWN_MODELS[spec]
    from cyclej.models.catalog import resolve_model

    path = Path(resolve_model(spec))
    if not (path / "config.json").is_file():
        raise BadInput(
            f"model {spec}: unknown to `cyclej plan` (no local config.json and not one of "
            f"{', '.join(sorted(KNOWN_MODELS))}); give a local model directory"
        )
    return shape_from_config(json.loads((path / "config.json").read_text()), _safetensors_params(path))


def shape_from_config(cfg: dict, params: int | None = None) -> ModelShape:
    def get(*keys: str, default: int | None = None) -> int:
        for k in keys:
            if cfg.get(k) is not None:
                return int(cfg[k])
        if default is None:
            raise BadInput(f"config.json: none of {', '.join(keys)} is set")
        return default

    layers = get("num_hidden_layers", "n_layer")
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    kv_heads = get("num_key_value_heads", default=heads)
    intermediate = get("intermediate_size", "n_inner", default=4 * hidden)
    vocab = get("vocab_size")
    model_type = str(cfg.get("model_type", ""))
    gated = model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "neobert")
    if params is None:  # embeddings (+ an untied head) + attention + MLP per layer
        head_dim = hidden // heads
        attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
        mlp = (3 if gated else 2) * hidden * intermediate
        emb = vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
        params = emb + layers * (attn + mlp)
    return ModelShape(
        params, layers, hidden, heads, kv_heads, intermediate, vocab, gated, model_type == "gptj"
    )


def _safetensors_params(path: Path) -> int | None:
    """Exact parameter count from the safetensors headers (8-byte length + JSON; no tensor is read)."""
    params, _ = _safetensors_sizes(path)
    return params or None


def _safetensors_sizes(path: Path) -> tuple[int, int]:
    """(parameters, bytes of their data) in the safetensors headers of a model directory; (0, 0) without."""
    params = nbytes = 0
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, t in header.items():
            if k != "__metadata__":
                params += math.prod(t["shape"])
                nbytes += t["data_offsets"][1] - t["data_offsets"][0]
    return params, nbytes


# ---- GPU price table ---------------------------------------------------------------------------------
