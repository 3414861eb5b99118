"""Rewrite lines into domain a or b with any stage's model: `{D_src}{line}{D_tgt}` → greedy completion.

A model is a local HF directory, an artifact directory (its `model/` is used), an `s3://…` artifact URI
(fetched through the artifact store) or a built-in spec. An adapter artifact (`para_train`,
`domain_train`) is applied to the `context` model it names in `base.json` and merged once into a plain HF
directory in the model cache, so it translates (and loads in vLLM) like any other stage's model. Its marker
tokens are read from `cyclej.json` beside the weights, else from the tokenizer's extra special tokens (the
markers are the last two added).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cyclej.config import DOMAIN_KEYS, DomainKey
from cyclej.corpora.formats import rl_prompt
from cyclej.errors import BadInput
from cyclej.generation.backends import (
    GenerationBackend,
    SamplingSettings,
    TransformersBackend,
    choose_backend,
    close_backend,
    make_backend,
    newline_token_ids,
)
from cyclej.models.card import MODEL_INFO, read_model_info, write_model_info
from cyclej.models.catalog import cache_root
from cyclej.models.loading import MODEL_FOLDER_ERRORS, cannot_load, load_model, marker_token_ids, save_model
from cyclej.runtime.store import ArtifactStore
from cyclej.training.precision import weights_dtype
from cyclej.training.trainer import ADAPTER_BASE, MARKER_ROWS_FILE


# ---- where a model is ---------------------------------------------------------------------------------
def local_model_dir(
    uri: str, storage_options: dict[str, Any] | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local directory with the model's weights, for a local path, a `file://` / `s3://` artifact URI
    (`<root>/<stage>/<fingerprint>[/model]`, fetched and checked through the artifact store) or a
    built-in model spec."""
    from cyclej.config import StorageConfig
    from cyclej.models.catalog import resolve_model

    text = uri.rstrip("/")
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if "://" in text:
        artifact = text.removesuffix("/model")
        parts = artifact.rsplit("/", 2)
        if len(parts) != 3 or "://" not in parts[0]:
            raise BadInput(
                f"model {uri}: expected an artifact URI like s3://bucket/prefix/<stage>/<fingerprint>"
            )
        root, stage, fp = parts
        if storage_options is None:
            # Endpoint and credentials from the AWS_* variables, exactly as the pipeline's store does.
            store = ArtifactStore.from_config(
                StorageConfig(root=root, cache_dir=str(cache_dir) if cache_dir else None)
            )
        else:
            store = ArtifactStore(root, storage_options, cache_dir)
        try:
            local = store.fetch((stage, fp))
        except FileNotFoundError:
            raise BadInput(f"model {uri}: no committed artifact there (check the URI)") from None
        if is_adapter_artifact(local):
            return merged_adapter_dir(local, uri, store)
        return _model_subdir(local, uri)
    p = Path(text).expanduser()
    if p.is_dir():
        if is_adapter_artifact(p):
            # an artifact folder of a local store: <root>/<stage>/<fingerprint>
            return merged_adapter_dir(p, uri, None)
        return _model_subdir(p, uri)
    # A built-in name or a hub id (resolved only where the hub is reachable).
    return Path(resolve_model(text))


def _model_subdir(p: Path, uri: str) -> Path:
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if (p / "config.json").is_file():
        return p
    raise BadInput(f"model {uri}: neither it nor its model/ folder has a config.json (not a model directory)")


# ---- adapter artifacts -----------------------------------------------------------------------------


def is_adapter_artifact(p: Path) -> bool:
    return (p / "adapter" / "adapter_config.json").is_file()


def adapter_base_dir(artifact: Path, uri: str, store: ArtifactStore | None) -> Path:
    """The model an adapter artifact was trained on: the `context` artifact its `base.json` names, in the
    same store (`store`; None for an artifact folder of a local store, read in place: no write probe, so
    a read-only store works); for artifacts written before `base.json` existed, the base folder peft
    recorded, if it is still there."""
    named = artifact / ADAPTER_BASE
    if named.is_file():
        try:
            base = json.loads(named.read_text(encoding="utf-8"))
            stage, fp = str(base["stage"]), str(base["fingerprint"])
        except (ValueError, KeyError, TypeError):
            raise BadInput(
                f"{named}: not a JSON object with stage and fingerprint; re-run the "
                f"{artifact.parent.name} stage"
            ) from None
        where = store.root_uri if store is not None else str(artifact.resolve().parent.parent)
        missing = BadInput(
            f"model {uri}: its base artifact {stage}/{fp} is not in {where}; translate with "
            "the merge or rl artifact instead"
        )
        if store is None:
            local = artifact.resolve().parent.parent / stage / fp
            if not (local / "MANIFEST.json").is_file():
                raise missing
            return _model_subdir(local, uri)
        try:
            return _model_subdir(store.fetch((stage, fp)), uri)
        except FileNotFoundError:
            raise missing from None
    config = json.loads((artifact / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path")
    if recorded and Path(recorded).is_dir():
        return _model_subdir(Path(recorded), uri)
    raise BadInput(
        f"model {uri}: an adapter artifact whose base model cannot be found (no {ADAPTER_BASE}); "
        "translate with the merge or rl artifact instead"
    )


def merged_adapter_dir(artifact: Path, uri: str, store: ArtifactStore | None) -> Path:
    """A plain HF directory of the adapter merged into its base, built once in the model cache and reused
    after that. Keyed by the adapter's files, which name its base too (base.json; for older artifacts the
    base path in adapter_config.json), so a cache hit fetches nothing and a re-trained adapter is merged
    again. Concurrent builders each write a private folder and the first to publish wins."""
    digest = hashlib.sha256()
    for rel in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        MARKER_ROWS_FILE,
        ADAPTER_BASE,
    ):
        if (artifact / rel).is_file():
            digest.update((artifact / rel).read_bytes())
    out = (
        cache_root() / "merged-adapters" / f"{artifact.parent.name}-{artifact.name}-{digest.hexdigest()[:16]}"
    )
    if (out / "config.json").is_file():
        return out
    base_dir = adapter_base_dir(artifact, uri, store)
    markers = model_markers(base_dir)
    # fp32 whatever the base's stored dtype: a LoRA delta merged into bf16 weights loses ~a third of its
    # entries.
    model, tokenizer, _ = load_adapter_model(base_dir, artifact, markers, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        save_model(model, tokenizer, tmp)
        info = read_model_info(base_dir) or {}
        write_model_info(tmp, markers, info.get("domains", ["a", "b"]))
        try:
            os.replace(tmp, out)  # whole or absent
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent builder's win: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_adapter_model(
    base_dir: str | Path,
    adapter_artifact: str | Path,
    markers: tuple[str, str],
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, tuple[str, str]]:
    """The base (INTERMEDIATE-1) with a `para_train`/`domain_train` artifact applied: its final marker rows
    written into the embeddings, then its LoRA merged into the weights (peft `merge_and_unload`)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    artifact = Path(adapter_artifact)
    adapter_dir = artifact / "adapter" if (artifact / "adapter").is_dir() else artifact
    if not (adapter_dir / "adapter_config.json").is_file():
        raise BadInput(
            f"adapter {artifact}: no adapter/adapter_config.json (not a para_train/domain_train artifact)"
        )
    model, tokenizer = load_model(str(base_dir), markers=list(markers), dtype=dtype)
    rows_file = next(
        (p for p in (artifact / MARKER_ROWS_FILE, adapter_dir / MARKER_ROWS_FILE) if p.is_file()), None
    )
    if rows_file is not None:
        rows = load_file(str(rows_file))
        ids = rows["token_ids"].long()
        with torch.no_grad():
            inp = cast(torch.nn.Embedding, model.get_input_embeddings()).weight
            inp[ids] = rows["input_embeddings"].to(inp.dtype)
            out = model.get_output_embeddings()
            if "output_embeddings" in rows and out is not None and out.weight.data_ptr() != inp.data_ptr():
                out.weight[ids] = rows["output_embeddings"].to(out.weight.dtype)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.eval()
    return model, tokenizer, markers


# ---- marker tokens ------------------------------------------------------------------------------------
def model_markers(model_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, str]:
    """The [A, B] marker tokens of a model directory."""
    info = read_model_info(model_dir)
    if info and len(info.get("markers", [])) == 2:
        return info["markers"][0], info["markers"][1]
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except MODEL_FOLDER_ERRORS as exc:
            raise cannot_load(str(model_dir), exc) from None
    extra = list(getattr(tokenizer, "extra_special_tokens", None) or [])
    extra = extra or list(getattr(tokenizer, "additional_special_tokens", None) or [])
    if len(extra) < 2:
        raise BadInput(
            f"model {model_dir}: cannot tell its domain marker tokens (no {MODEL_INFO} and fewer than two "
            "added special tokens); pass the markers explicitly"
        )
    # The pipeline adds A then B after whatever special tokens the base model already had.
    return extra[-2], extra[-1]


# ---- loading ----------------------------------------------------------------------------------------------
Backend = Literal["auto", "transformers", "vllm"]
# What a translator runs on: an in-memory model (wrapped in a TransformersBackend) or any generation backend.
Loaded = tuple[PreTrainedModel | GenerationBackend, PreTrainedTokenizerBase, tuple[str, str]]


def load_for_translation(
    model_dir: str | Path,
    markers: tuple[str, str] | list[str] | None = None,
    backend: Backend = "transformers",
    expected_tokens: int = 0,
) -> Loaded:
    """The model at `model_dir` ready to translate: through `cyclej.models.loading.load_model` (markers added
    if missing, GPT-J position interpolation re-applied) or, with backend vllm, a vLLM engine on the folder.
    `expected_tokens` (how much the caller will generate) decides `backend: auto`."""
    if markers is None:
        markers = model_markers(model_dir)
    pair = (markers[0], markers[1])
    if choose_backend(backend, str(model_dir), expected_tokens) == "vllm":
        from transformers import AutoTokenizer

        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model_dir))
        marker_token_ids(tokenizer, list(pair))  # vLLM cannot add tokens: they must be in the folder already
        # Short-lived engines: on a CPU, torch.compile would cost more than the whole job (minutes).
        return (
            make_backend("vllm", str(model_dir), enforce_eager=not torch.cuda.is_available()),
            tokenizer,
            pair,
        )
    on_gpu = torch.cuda.is_available()
    dtype = weights_dtype("auto", torch.device("cuda" if on_gpu else "cpu"))
    model, tokenizer = load_model(str(model_dir), markers=list(pair), dtype=dtype)
    if on_gpu:
        # transformers types PreTrainedModel.to as @wraps(nn.Module.to): unbound, so mypy misreads it
        model.to("cuda")  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer, pair


# ---- translating ----------------------------------------------------------------------------------------
class ModelTranslator:
    """A translation system over one model: `system(lines, to) -> lines`.

    Built either from a model (or a generation backend) or from a loader called on first use, so an
    evaluation holds one model in memory at a time; `release()` drops what the loader loaded.
    """

    def __init__(
        self,
        model: PreTrainedModel | GenerationBackend | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        markers: tuple[str, str] | list[str] | None = None,
        loader: Callable[[], Loaded] | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 64,
    ) -> None:
        if model is None and loader is None:
            raise ValueError("give a model (with tokenizer and markers) or a loader")
        self.loader = loader
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.backend: GenerationBackend | None = None
        # Per line of the last call: True when its generation ran to the token limit without ending.
        self.last_runaway: list[bool] = []
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.markers: tuple[str, str] | None = None
        if model is not None:
            assert tokenizer is not None and markers is not None, "a model needs its tokenizer and markers"
            self._set(model, tokenizer, (markers[0], markers[1]))

    def _set(
        self,
        model: PreTrainedModel | GenerationBackend,
        tokenizer: PreTrainedTokenizerBase,
        markers: tuple[str, str],
    ) -> None:
        self.backend = (
            TransformersBackend(model, tokenizer, batch_size=self.batch_size)
            if isinstance(model, torch.nn.Module)
            else model
        )
        self.tokenizer, self.markers = tokenizer, markers

    def release(self) -> None:
        if self.loader is not None:
            close_backend(self.backend)  # a vLLM engine frees its memory now, not at garbage collection
            self.backend = self.tokenizer = self.markers = None
            # The next system's model must fit: hand the freed memory back now (GPU caches included).
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __call__(self, lines: list[str], to: DomainKey) -> list[str]:
        if self.backend is None:
            assert self.loader is not None
            self._set(*self.loader())
        assert self.backend is not None and self.tokenizer is not None and self.markers is not None
        done = translate_detailed(self.backend, self.tokenizer, lines, to, self.markers, self.max_new_tokens)
        self.last_runaway = [t.runaway for t in done]
        return [t.text for t in done]


@dataclass(frozen=True)
class Translation:
    """One output line, and whether its generation ran away: no EOS and no line break before its token
    limit (for line-based text a sign of babble, reported by the evaluation)."""

    text: str
    runaway: bool


def output_token_limit(source_tokens: int, cap: int) -> int:
    """How many tokens a translation of a `source_tokens`-token line may take: twice the source plus a
    little (a rewrite of a line is about as long as the line), never more than `cap`."""
    return max(1, min(cap, 2 * source_tokens + 8))


def translate_detailed(
    backend: GenerationBackend,
    tokenizer: PreTrainedTokenizerBase,
    lines: list[str],
    to: DomainKey,
    markers: tuple[str, str] | list[str],
    max_new_tokens: int = 64,
) -> list[Translation]:
    """Greedy `{D_src}{line}{D_tgt}` completions, batched by the backend, one line each: generation stops
    at EOS or at a line break, and each line may take `output_token_limit` of its source's tokens."""
    if to not in DOMAIN_KEYS:
        raise BadInput(f"--to {to}: choose a or b")
    if not lines:
        return []
    a_id, b_id = marker_token_ids(tokenizer, list(markers))
    src_id, tgt_id = (a_id, b_id) if to == "b" else (b_id, a_id)
    prompts = [rl_prompt(tokenizer, src_id, line.strip(), tgt_id) for line in lines]
    limits = [output_token_limit(len(p) - 2, max_new_tokens) for p in prompts]
    settings = SamplingSettings(
        max_new_tokens=max(limits), temperature=0.0, stop_ids=newline_token_ids(tokenizer)
    )
    completions = backend.generate(prompts, settings)
    stopped = getattr(backend, "last_stopped", None) or [[False] for _ in prompts]
    out = []
    for per_prompt, ended, limit in zip(completions, stopped, limits, strict=True):
        tokens = per_prompt[0] if per_prompt else []
        # The batch ran to the longest limit; a line that went past its own limit ran away.
        runaway = len(tokens) > limit or (not ended[0] and len(tokens) >= limit)
        text = _one_line(cast(str, tokenizer.decode(tokens[:limit], skip_special_tokens=True)))
        out.append(Translation(text, runaway))
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def translate_lines(
    model_dir_or_spec: str,
    lines: list[str],
    to: DomainKey,
    markers: tuple[str, str] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    storage_options: dict[str, Any] | None = None,
    backend: Backend = "transformers",
) -> list[str]:
    """Rewrite `lines` into domain `to` with the model at `model_dir_or_spec` (see `local_model_dir`)."""
    model_dir = local_model_dir(model_dir_or_spec, storage_options)
    translator = ModelTranslator(
        loader=lambda: load_for_translation(model_dir, markers, backend, len(lines) * max_new_tokens),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    try:
        return translator(lines, to)
    finally:
        translator.release()
