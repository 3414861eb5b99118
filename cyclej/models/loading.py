"""Load, extend and save the policy model: one place that knows about marker tokens and positions.

Every stage loads its base through `load_model`, so the domain markers get the same ids everywhere
and a context-extended GPT-J keeps its position interpolation, and writes through `save_model`, so
every model we ship is a plain Hugging Face directory (safetensors shards + tokenizer).

Position interpolation (Chen et al. 2023, "Extending context window ... via positional interpolation"):
to run a RoPE model at `factor` times its trained length, position p is fed to the rotary tables as
p / factor, so every position the model sees lies in the range it was trained on.

- Llama-family models have this natively: `config.rope_parameters = {"rope_type": "linear",
  "factor": f, ...}` (transformers v5's name for the old `rope_scaling`), and transformers re-applies
  it on every load.
- GPT-J in transformers has no rope scaling. Each attention layer holds its own sin/cos table
  `embed_positions` ([n_positions, rotary_dim], float), a *non-persistent* buffer rebuilt from
  `create_sinusoidal_positions(n_positions, rotary_dim)` whenever the model is built, so nothing we
  put in the table survives a save. We therefore rebuild the tables with scaled positions and record
  the factor as `cyclej_position_interpolation` in config.json; `load_model` re-applies it on every
  load. Plain `AutoModelForCausalLM.from_pretrained` does NOT: it loads the weights fine, but with
  un-interpolated positions (GPTJConfig has no knob for it), so use `load_model` for GPT-J.
  (Checked: GPTJConfig has no rope-scaling field, `create_sinusoidal_positions` hard-codes integer
  positions and base 10000, and a table shipped in the safetensors is dropped on load as an
  UNEXPECTED key, since the buffer is non-persistent. Only custom `trust_remote_code` modelling code
  could change that; we do not ship code with models.)
  We also write `rope_parameters` (linear, same factor) into the GPT-J config: transformers' GPT-J
  ignores it, but vLLM's GPT-J passes `config.rope_parameters` to its rotary embedding (read in vLLM's
  source, not run here), so vLLM serves the extended model with interpolated positions. vLLM also
  multiplies its derived maximum length by the factor, so pass `max_model_len` (the new length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cyclej.errors import BadInput, first_line
from cyclej.models.catalog import resolve_model

if TYPE_CHECKING:
    from transformers.quantizers import HfQuantizer

PI_KEY = "cyclej_position_interpolation"
GPTJ_ROPE_THETA = 10000.0  # hard-coded in transformers' create_sinusoidal_positions
# Modules that hold a GPT-J sin/cos table: per layer up to transformers 5.23, one shared from 5.24.
GPTJ_TABLE_HOLDERS = ("GPTJAttention", "GPTJRotaryEmbedding")


# ---- loading ----------------------------------------------------------------------------------------
def _model_folder_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a folder that is not a loadable model: missing or unreadable files
    (OSError, also for a config.json that is not JSON), values of the wrong type or shape (ValueError,
    huggingface_hub's strict-dataclass errors), weights that are not safetensors (SafetensorError).
    Not RuntimeError: out-of-memory and device errors are not the user's input."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return (OSError, ValueError, StrictDataclassError, SafetensorError)


MODEL_FOLDER_ERRORS = _model_folder_errors()


def cannot_load(spec: str, exc: BaseException) -> BadInput:
    """The one-line error for a model folder (or hub id) that does not load."""
    first = first_line(exc, 160) or type(exc).__name__
    return BadInput(
        f"model {spec}: cannot load ({type(exc).__name__}: {first}); give a local model directory, "
        "a built-in name or a hub id reachable from this machine"
    )


def load_model(
    path_or_spec: str,
    markers: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a built-in name, a local directory, a `.gguf` file or a hub id.

    Markers missing from the tokenizer are added as special tokens and the embeddings grow to fit
    (new rows = the mean of the existing rows); markers already there keep their ids, so loading a
    saved INTERMEDIATE-1 adds nothing. A GPT-J directory whose config records
    `cyclej_position_interpolation` gets its interpolated position tables back.
    """
    path, gguf_file = _locate(path_or_spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except MODEL_FOLDER_ERRORS as exc:
        raise cannot_load(path_or_spec, exc) from None
    if gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights are dequantized on load; drop the quantizer so save_pretrained writes plain tensors.
        cast("HfQuantizer", model.hf_quantizer).remove_quantization_config(model)

    factor = getattr(model.config, PI_KEY, None)
    if factor is not None and model.config.model_type == "gptj":
        _set_gptj_tables(model, float(factor))

    if tokenizer.pad_token is None:
        # Padding is always masked out; EOS is the one token every causal LM tokenizer has.
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if markers:
        add_markers(model, tokenizer, markers)
    return model, tokenizer


def _locate(spec: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None)."""
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent.resolve()), p.name
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p.resolve()), ggufs[0].name
        if len(ggufs) > 1:
            raise BadInput(f"model {spec}: several .gguf files in the folder; give the path of one of them")
    return resolve_model(spec), None


# ---- marker tokens ----------------------------------------------------------------------------------
def add_markers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, markers: Sequence[str]
) -> list[int]:
    """Add the missing markers as special tokens (once) and grow the embeddings; returns their ids."""
    missing = [m for m in markers if m not in tokenizer.get_vocab()]
    # A spelling that is in the vocabulary but not an added token could still be split by the
    # tokenizer's merges: register it as special too (it keeps its id, nothing grows).
    unregistered = [m for m in markers if m not in tokenizer.get_added_vocab()]
    old_len = len(tokenizer)
    if unregistered:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": unregistered}, replace_extra_special_tokens=False
        )
    ids = marker_token_ids(tokenizer, markers)
    new_ids = [i for m, i in zip(markers, ids, strict=True) if m in missing]

    if cast(torch.nn.Embedding, model.get_input_embeddings()).weight.shape[0] < len(tokenizer):
        # Some checkpoints pad the vocabulary (GPT-J: 50400 rows for 50257 tokens); grow only when
        # the new ids do not fit, never shrink.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if new_ids:
        _init_rows_to_mean(model, new_ids, n_real_rows=old_len)
    return ids


@torch.no_grad()
def _init_rows_to_mean(model: PreTrainedModel, row_ids: list[int], n_real_rows: int) -> None:
    """Rows of new tokens start at the mean of the real vocabulary's rows (input and untied output).

    The mean keeps a new token's logit in the range of the others, so the first loss is sane; the
    padding rows beyond the tokenizer (GPT-J) are left out of the mean.
    """
    idx = torch.tensor(row_ids)
    inp = cast(torch.nn.Embedding, model.get_input_embeddings()).weight
    inp[idx] = inp[:n_real_rows].mean(dim=0, keepdim=True).to(inp.dtype)
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() == inp.data_ptr():
        return
    out.weight[idx] = out.weight[:n_real_rows].mean(dim=0, keepdim=True)
    if getattr(out, "bias", None) is not None:
        out.bias[idx] = out.bias[:n_real_rows].mean()


def marker_token_ids(tokenizer: PreTrainedTokenizerBase, markers: Sequence[str]) -> list[int]:
    """The id of each marker; BadInput when a marker is not a single token of this tokenizer."""
    vocab = tokenizer.get_vocab()
    missing = [m for m in markers if m not in vocab]
    if missing:
        raise BadInput(
            f"marker tokens {missing} are not in the tokenizer; load the model with "
            "cyclej.models.loading.load_model(..., markers=[domain_a.marker, domain_b.marker])"
        )
    return [vocab[m] for m in markers]


# ---- context extension ------------------------------------------------------------------------------
def extend_context(model: PreTrainedModel, factor: float) -> None:
    """Stretch the context window `factor` times by linear position interpolation, in place.

    Sets `max_position_embeddings` (GPT-J: `n_positions`) to the new length. Extending an already
    extended model multiplies the factors (the interpolation is always relative to the trained length).
    """
    if factor < 1:
        raise BadInput(f"context.factor: must be >= 1 (got {factor})")
    if factor == 1:
        return
    cfg = model.config
    if cfg.model_type == "gptj":
        old = float(getattr(cfg, PI_KEY, None) or 1.0)
        total = old * factor
        trained_len = round(cfg.n_positions / old)
        cfg.n_positions = int(math.ceil(trained_len * total))
        setattr(cfg, PI_KEY, total)
        cfg.rope_parameters = {"rope_type": "linear", "factor": total, "rope_theta": GPTJ_ROPE_THETA}
        _set_gptj_tables(model, total)
        return
    rope = getattr(cfg, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:
        raise BadInput(
            f"context.factor: model type '{cfg.model_type}' has no RoPE parameters to scale; "
            "set context.factor: 1"
        )
    if rope["rope_type"] not in ("default", "linear"):
        raise BadInput(
            f"context.factor: the model already uses '{rope['rope_type']}' RoPE scaling; "
            "set context.factor: 1"
        )
    total = float(rope.get("factor", 1.0)) * factor if rope["rope_type"] == "linear" else factor
    cfg.rope_parameters = {**rope, "rope_type": "linear", "factor": total}
    cfg.max_position_embeddings = int(math.ceil(cfg.max_position_embeddings * factor))
    _rebuild_rotary_embeddings(model)


def _set_gptj_tables(model: PreTrainedModel, factor: float) -> None:
    """Give every GPT-J sin/cos table `n_positions` positions, position p at p/factor.

    Two layouts exist: up to transformers 5.23 each `GPTJAttention` holds its own `embed_positions`;
    from 5.24 one `GPTJRotaryEmbedding` (`model.transformer.rotary_emb`) holds it for all layers.
    Both keep the table in a non-persistent buffer with `pos_embd_dim` and `max_positions`.
    """
    n_positions = model.config.n_positions
    tables = 0
    for module in model.modules():
        if type(module).__name__ not in GPTJ_TABLE_HOLDERS or not hasattr(module, "embed_positions"):
            continue
        old = cast(torch.Tensor, module.embed_positions)
        # Built in float32 whatever the model dtype: the forward casts to the activations' dtype anyway.
        table = interpolated_sinusoidal_positions(n_positions, cast(int, module.pos_embd_dim), factor).to(
            old.device
        )
        module.embed_positions = table  # a registered (non-persistent) buffer: assignment replaces it
        module.max_positions = n_positions
        tables += 1
    if tables == 0:
        raise RuntimeError(
            "GPT-J position tables not found (neither GPTJAttention.embed_positions nor "
            "GPTJRotaryEmbedding.embed_positions): this transformers version moved them again"
        )


def interpolated_sinusoidal_positions(num_pos: int, dim: int, factor: float) -> torch.Tensor:
    """transformers' `create_sinusoidal_positions` with positions divided by `factor`: [num_pos, dim]."""
    inv_freq = 1.0 / (GPTJ_ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    positions = torch.arange(num_pos, dtype=torch.int64).float() / factor
    angles = positions[:, None] * inv_freq
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)


def _rebuild_rotary_embeddings(model: PreTrainedModel) -> None:
    """Llama-family: the rotary module caches inv_freq at build time; rebuild it from the new config."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not type(child).__name__.endswith("RotaryEmbedding") or not hasattr(child, "inv_freq"):
                continue
            fresh = type(child)(config=model.config)
            fresh.to(cast(torch.Tensor, child.inv_freq).device)
            setattr(parent, name, fresh)


def position_interpolation_factor(model: PreTrainedModel) -> float:
    """The total interpolation factor the model runs with (1.0 when not extended)."""
    cfg = model.config
    if cfg.model_type == "gptj":
        return float(getattr(cfg, PI_KEY, None) or 1.0)
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("factor", 1.0)) if rope.get("rope_type") == "linear" else 1.0


# ---- saving -----------------------------------------------------------------------------------------
def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    max_shard_size: str | int = "2GB",
) -> Path:
    """Write a plain HF directory: config.json, safetensors shards, tokenizer (markers included)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    # Long sequences are expected now; without this the tokenizer warns on every long encode.
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    tokenizer.save_pretrained(out)
    return out
