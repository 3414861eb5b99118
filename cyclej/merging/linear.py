"""The exact, streaming linear merge of LoRA adapters into their base (INTERMEDIATE-3).

    merged = base + Σ_i w_i · Δ_i          Δ_i = scaling_i · (B_i @ A_i)   for every LoRA'd linear
    merged_row = base_row + Σ_i w_i · (row_i − base_row)                   for every trained marker row

With two adapters and w_a + w_b = 1 this is exactly the weighted average of the two full fine-tuned models
(base + Δ_a and base + Δ_b). PEFT's `add_weighted_adapter(..., "linear")` is not used on purpose: it mixes the
A and B factors separately, and (Σ w B)(Σ w A) ≠ Σ w (B A).

Streaming: the base's safetensors shards are walked one at a time and each output shard is written tensor by
tensor with the input's exact header (same names, dtypes, shapes, byte offsets), so peak memory is a few
copies of the largest changed tensor plus the adapters, never a whole model. Deltas are computed in fp32.

The output is fp32 when the base is stored in bf16/fp16: a LoRA delta of ~1e-4 on a weight of ~0.02 is
below half of bf16's spacing there (~1.2e-4) for about a third of the entries, and casting the exact sum
back to bf16 would drop them. Every 16-bit float tensor is widened (not only the changed ones), so the
checkpoint has one dtype and config.json says float32; an fp32 base keeps its exact header.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cyclej.errors import BadInput
from cyclej.runtime.progress import Progress
from cyclej.training.precision import weights_dtype
from cyclej.training.trainer import MARKER_ROWS_FILE

ADAPTER_DIR = "adapter"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PEFT_PREFIX = "base_model.model."
_COPY_CHUNK = 16 << 20

# LoRA options whose merge is not `base + scaling · B @ A`; refused rather than merged wrongly.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
}
# Adapter-file keys that carry nothing the merge needs: marker_rows.safetensors holds the final marker rows
# (PEFT's trainable-token deltas and resized-embedding copies describe the same rows).
_IGNORED_KEY = re.compile(
    r"(\.token_adapter\.trainable_tokens_\w+$)|((embed_tokens|wte|lm_head|embed_out)\.weight$)"
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA'd linear of one adapter: Δ = scaling · B @ A (transposed for Conv1D-style fan_in_fan_out)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    fan_in_fan_out: bool

    def shape(self) -> tuple[int, int]:
        out_in = (self.b.shape[0], self.a.shape[1])
        return (out_in[1], out_in[0]) if self.fan_in_fan_out else out_in

    def delta(self) -> torch.Tensor:
        d = self.b.float() @ self.a.float()
        if self.fan_in_fan_out:
            d = d.T
        return d * self.scaling

    def add_to(self, acc: torch.Tensor, weight: float) -> None:
        """acc += weight · Δ in one fused fp32 matmul-add, without materializing Δ."""
        b, a = self.b.float(), self.a.float()
        if self.fan_in_fan_out:  # (B A)ᵀ = Aᵀ Bᵀ
            acc.addmm_(a.T, b.T, alpha=weight * self.scaling)
        else:
            acc.addmm_(b, a, alpha=weight * self.scaling)


@dataclass
class Adapter:
    """A trained stage's output: LoRA factors by module name, plus the final values of its marker rows."""

    source: str
    factors: dict[str, LoraFactors]  # module name in the base model, e.g. "transformer.h.0.attn.q_proj"
    marker_ids: torch.Tensor | None = None  # int64 [n]
    input_rows: torch.Tensor | None = None  # [n, d]: final rows of the input embedding
    output_rows: torch.Tensor | None = None  # [n, d]: final rows of lm_head (untied models only)
    ignored_keys: list[str] = field(default_factory=list)

    def nbytes(self) -> int:
        tensors = [t for f in self.factors.values() for t in (f.a, f.b)]
        tensors += [t for t in (self.marker_ids, self.input_rows, self.output_rows) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class MergeStats:
    shards: int
    tensors: int
    tensors_changed: int
    lora_modules: int
    marker_rows: int
    weights: list[float]
    seconds: float
    largest_shard_bytes: int
    adapter_bytes: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def merge_weights(
    weight: float, weight_a: float | None = None, weight_b: float | None = None
) -> tuple[float, float]:
    """(w_a, w_b): the task-arithmetic pair when given, otherwise (w, 1 − w)."""
    if weight_a is not None and weight_b is not None:
        return float(weight_a), float(weight_b)
    return float(weight), 1.0 - float(weight)


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    VmHWM from /proc (Linux) rather than getrusage's ru_maxrss: a child started by fork+exec inherits its
    parent's ru_maxrss, so a merge measured in a subprocess of a big process would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ---- reading adapters ---------------------------------------------------------------------------------
def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): a key matches a module
    name that ends with it after a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(stage_dir: str | Path) -> Adapter:
    """Read a `para_train`/`domain_train` artifact: `adapter/` (PEFT save_pretrained)
    + `marker_rows.safetensors`.

    A stage directory without `marker_rows.safetensors` (marker rows not trained) contributes no row changes.
    """
    stage_dir = Path(stage_dir)
    adapter_dir = stage_dir / ADAPTER_DIR
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise BadInput(f"{p}: missing; a LoRA stage must save its adapter with PEFT save_pretrained")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BadInput(f"{config_path}: not valid JSON ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise BadInput(
            f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA merges exactly"
        )
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise BadInput(f"{config_path}: {option} is set; the merge does not support {what}")
    if config.get("bias", "none") != "none":
        raise BadInput(f"{config_path}: bias={config['bias']!r}; the merge supports bias='none' only")
    if config.get("modules_to_save"):
        raise BadInput(
            f"{config_path}: modules_to_save {config['modules_to_save']} is not supported by the merge"
        )

    state = load_file(str(weights_path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    ignored: list[str] = []
    for key, tensor in state.items():
        m = _LORA_KEY.match(key)
        if m is None:
            if _IGNORED_KEY.search(key):
                ignored.append(key)
                continue
            raise BadInput(
                f"{weights_path}: unexpected tensor {key!r} (only lora_A/lora_B weights can be merged)"
            )
        module = m["module"].removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[m["which"]] = tensor

    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    factors: dict[str, LoraFactors] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise BadInput(f"{weights_path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        r = int(_pattern_value(rank_pattern, module, r_default))
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise BadInput(
                f"{weights_path}: {module} has rank {ab['A'].shape[0]} but adapter_config.json says r={r}"
            )
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[module] = LoraFactors(ab["A"], ab["B"], scaling, bool(config.get("fan_in_fan_out")))
    if not factors:
        raise BadInput(f"{weights_path}: no LoRA weights found")

    adapter = Adapter(source=str(stage_dir), factors=factors, ignored_keys=ignored)
    rows_path = stage_dir / MARKER_ROWS_FILE
    if rows_path.is_file():
        rows = load_file(str(rows_path))
        if "token_ids" not in rows or "input_embeddings" not in rows:
            raise BadInput(f"{rows_path}: needs tensors 'token_ids' and 'input_embeddings'")
        ids = rows["token_ids"].to(torch.int64)
        n = ids.numel()
        for name in ("input_embeddings", "output_embeddings"):
            if name in rows and (rows[name].ndim != 2 or rows[name].shape[0] != n):
                raise BadInput(f"{rows_path}: {name} has shape {tuple(rows[name].shape)}, expected [{n}, d]")
        adapter.marker_ids = ids
        adapter.input_rows = rows["input_embeddings"]
        adapter.output_rows = rows.get("output_embeddings")
    return adapter


# ---- the base checkpoint --------------------------------------------------------------------------------
def base_shards(base_dir: Path) -> dict[str, list[str]]:
    """Shard file name → tensor names, from the index (or the single model.safetensors)."""
    index = base_dir / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return shards
    single = base_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {SINGLE_FILE: list(f.keys())}
    raise BadInput(f"{base_dir}: no {SINGLE_FILE} or {INDEX_FILE}; the base must be saved as safetensors")


# (input embedding, lm_head) checkpoint names of the common causal-LM layouts: GPT-J/GPT-2, Llama-family,
# GPT-NeoX. Anything else is asked of the architecture itself.
_KNOWN_EMBEDDINGS = (
    ("transformer.wte.weight", "lm_head.weight"),
    ("model.embed_tokens.weight", "lm_head.weight"),
    ("gpt_neox.embed_in.weight", "embed_out.weight"),
)


def embedding_keys(base_dir: Path, stored: set[str]) -> tuple[str, str | None]:
    """Checkpoint names of the input embedding and of lm_head (None when tied, i.e. not stored)."""
    for inp, out in _KNOWN_EMBEDDINGS:
        if inp in stored:
            return inp, (out if out in stored else None)
    # Unknown layout: build the architecture on the meta device (no memory) and ask it.
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    inp = names[id(model.get_input_embeddings())] + ".weight"
    out_module = model.get_output_embeddings()
    out_name = names[id(out_module)] + ".weight" if out_module is not None else None
    if inp not in stored:
        raise BadInput(f"{base_dir}: the input embedding {inp} is not in the checkpoint")
    return inp, (out_name if out_name in stored else None)


def _read_header(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The raw safetensors prefix (8-byte length + JSON header) and the parsed header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    return struct.pack("<Q", n) + raw, json.loads(raw)


WIDENED = {"BF16": "F32", "F16": "F32"}  # safetensors dtype names: 16-bit floats are merged into fp32


def _widened_header(header: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The output header when 16-bit floats become fp32: same names, order and shapes, new offsets; the
    JSON padded with spaces to a multiple of 8 bytes as safetensors writes it (aligned tensor data)."""
    out: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    offset = 0
    for key, info in sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
    ):
        dtype = WIDENED.get(info["dtype"], info["dtype"])
        begin, end = info["data_offsets"]
        size = (end - begin) * (2 if dtype != info["dtype"] else 1)
        out[key] = {"dtype": dtype, "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(out, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, out


# ---- the merge ------------------------------------------------------------------------------------------
def _row_plan(
    adapters: Sequence[tuple[Adapter, float]], attr: str
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, float]]] | None:
    """All marker ids touched by any adapter, and per adapter (positions into those ids, its rows, weight)."""
    # An adapter with marker rows has their marker ids.
    parts = cast(
        "list[tuple[torch.Tensor, torch.Tensor, float]]",
        [(a.marker_ids, getattr(a, attr), w) for a, w in adapters if getattr(a, attr) is not None],
    )
    if not parts:
        return None
    ids = torch.unique(torch.cat([p[0] for p in parts]))
    plan = [(torch.searchsorted(ids, pid), rows, w) for pid, rows, w in parts]
    return ids, plan


def _mix_rows(
    tensor: torch.Tensor,
    base_rows: torch.Tensor,
    plan: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, float]]],
) -> torch.Tensor:
    """Marker rows = base_row + Σ w·(row − base_row), from the base's rows (fp32), cast once."""
    ids, per_adapter = plan
    mixed = base_rows.clone()
    for pos, rows, w in per_adapter:
        mixed[pos] += w * (rows.float() - base_rows[pos])
    tensor[ids] = mixed.to(tensor.dtype)
    return tensor


@dataclass
class MergePlan:
    """What a merge will write, checked before the first byte is (as mergekit plans, then executes)."""

    base_dir: Path
    adapters: Sequence[tuple[Adapter, float]]
    shards: dict[str, list[str]]  # shard file -> its tensor names
    headers: dict[str, tuple[bytes, dict[str, Any]]]  # shard file -> (raw header bytes, parsed header)
    updates: dict[str, list[tuple[LoraFactors, float]]]  # base weight -> its LoRA factors and weights
    row_updates: dict[str, Any]  # embedding matrix -> (marker token ids, rows per adapter)
    widen: bool  # a 16-bit base is written in fp32, so the deltas survive
    notes: list[str]

    @property
    def tensors(self) -> int:
        return sum(len(keys) for keys in self.shards.values())


def plan_merge(base_dir: str | Path, adapters: Sequence[tuple[Adapter, float]]) -> MergePlan:
    """Read the base's shard headers and check every adapter against them: each LoRA'd module must exist
    in the base with the delta's shape, and the marker rows must fit the embedding matrices (or the
    adapter was not trained on this base). Nothing is written."""
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise BadInput(f"{base_dir}: no config.json (not a Hugging Face model folder)")
    shards = base_shards(base_dir)
    stored = {k for keys in shards.values() for k in keys}
    inp_key, out_key = embedding_keys(base_dir, stored)

    headers = {name: _read_header(base_dir / name) for name in shards}
    shapes = {k: tuple(v["shape"]) for _, h in headers.values() for k, v in h.items() if k != "__metadata__"}

    # Module name → base key: every LoRA'd module must exist in the base with the delta's shape.
    updates: dict[str, list[tuple[LoraFactors, float]]] = {}
    for adapter, w in adapters:
        for module, factors in adapter.factors.items():
            key = f"{module}.weight"
            if key not in stored:
                raise BadInput(
                    f"{adapter.source}: LoRA module {module} has no weight {key} in the base {base_dir}"
                )
            if factors.shape() != shapes[key]:
                raise BadInput(
                    f"{adapter.source}: the LoRA delta of {module} has shape {factors.shape()}, "
                    f"the base's {key} has {shapes[key]}"
                )
            updates.setdefault(key, []).append((factors, w))
    row_updates: dict[str, Any] = {}
    notes = [
        f"{a.source}: ignored {len(a.ignored_keys)} non-LoRA adapter tensors"
        for a, _ in adapters
        if a.ignored_keys
    ]
    if (rows := _row_plan(adapters, "input_rows")) is not None:
        row_updates[inp_key] = rows
    if (rows := _row_plan(adapters, "output_rows")) is not None:
        if out_key is None:
            notes.append("lm_head is tied to the input embedding: output marker rows follow the input rows")
        else:
            row_updates[out_key] = rows
    if out_key is not None and inp_key in row_updates and out_key not in row_updates:
        notes.append("lm_head is not tied but no adapter has output marker rows: lm_head rows unchanged")
    for key, (ids, per_adapter) in row_updates.items():
        n_rows, width = shapes[key]
        if int(ids.max()) >= n_rows or int(ids.min()) < 0:
            raise BadInput(
                f"marker_rows.safetensors: token ids {ids.tolist()} fall outside {key} ({n_rows} rows)"
            )
        if any(rows.shape[1] != width for _, rows, _ in per_adapter):
            raise BadInput(
                f"marker_rows.safetensors: rows of width {per_adapter[0][1].shape[1]}, {key} has {width}"
            )
    widen = any(
        v["dtype"] in WIDENED for _, h in headers.values() for k, v in h.items() if k != "__metadata__"
    )
    return MergePlan(base_dir, adapters, shards, headers, updates, row_updates, widen, notes)


def write_merge(plan: MergePlan, out_dir: str | Path, progress: Progress | None = None) -> MergeStats:
    """Stream the planned merge into `out_dir`, shard by shard: tensors without an update are copied byte
    for byte, the others are merged one at a time (peak memory: the largest merged tensor)."""
    base_dir, out_dir = plan.base_dir, Path(out_dir)
    updates, row_updates, widen = plan.updates, plan.row_updates, plan.widen
    notes = list(plan.notes)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in base_dir.iterdir():  # config, tokenizer, generation config, index: unchanged (but see below)
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, out_dir / item.name)
    out_bytes = 0

    changed, largest = 0, 0
    bar = (progress or Progress(show_bar=False)).bar("merge shards", total=len(plan.shards), unit="shard")
    for shard_name in sorted(plan.shards):
        src, dst = base_dir / shard_name, out_dir / shard_name
        largest = max(largest, src.stat().st_size)
        prefix, header = plan.headers[shard_name]
        out_prefix, out_header = _widened_header(header) if widen else (prefix, header)
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"),
            key=lambda kv: kv[1]["data_offsets"][0],
        )
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fout.write(
                out_prefix
            )  # same names, shapes and order; dtypes and offsets widened for 16-bit bases
            for key, info in entries:
                begin, end = out_header[key]["data_offsets"]
                out_bytes += end - begin
                merge_here = key in updates or key in row_updates
                if merge_here or out_header[key]["dtype"] != info["dtype"]:
                    merged = _merge_tensor(src, key, updates.get(key, []), row_updates.get(key), widen)
                    data = merged.contiguous().view(torch.uint8).numpy()
                    if data.nbytes != end - begin:
                        raise RuntimeError(
                            f"{key}: merged tensor has {data.nbytes} bytes, expected {end - begin}"
                        )
                    # A numpy array exports the buffer protocol; numpy's stubs do not declare it.
                    fout.write(memoryview(data))  # type: ignore[arg-type]
                    changed += merge_here
                    del merged, data
                else:
                    begin, end = info["data_offsets"]
                    fin.seek(len(prefix) + begin)
                    remaining = end - begin
                    while remaining:
                        chunk = fin.read(min(_COPY_CHUNK, remaining))
                        fout.write(chunk)
                        remaining -= len(chunk)
        bar.update(1)
    bar.close()
    if widen:
        _record_fp32(out_dir, out_bytes)
        notes.append(
            "the base is stored in 16-bit floats: the merge is written in fp32 so its deltas survive"
        )
    n_rows = sum(len(p[0]) for p in row_updates.values())
    return MergeStats(
        shards=len(plan.shards),
        tensors=plan.tensors,
        tensors_changed=changed,
        lora_modules=len(updates),
        marker_rows=n_rows,
        weights=[w for _, w in plan.adapters],
        seconds=0.0,  # set by merge_lora_adapters, which also times the planning
        largest_shard_bytes=largest,
        adapter_bytes=sum(a.nbytes() for a, _ in plan.adapters),
        notes=notes,
    )


def merge_lora_adapters(
    base_dir: str | Path,
    out_dir: str | Path,
    adapters: Sequence[tuple[Adapter, float]],
    progress: Progress | None = None,
) -> MergeStats:
    """Write base + Σ w·Δ (and the mixed marker rows) to `out_dir` as a plain HF directory, shard by shard:
    `plan_merge` checks everything before the first byte is written, then `write_merge` streams it.

    `out_dir` gets the same shard files and index as the base, and every other file of the base directory
    (config.json with its position-interpolation key, tokenizer, generation config) copied unchanged.
    """
    started = time.monotonic()
    stats = write_merge(plan_merge(base_dir, adapters), out_dir, progress)
    stats.seconds = round(time.monotonic() - started, 3)
    return stats


def _merge_tensor(
    shard: Path,
    key: str,
    lora: list[tuple[LoraFactors, float]],
    rows: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, float]]] | None,
    widen: bool = False,
) -> torch.Tensor:
    # A fresh handle per tensor: safe_open memory-maps the file, and every page read through one open handle
    # stays resident (counted in RSS) until it closes. Reopening keeps only this tensor's pages mapped.
    with safe_open(str(shard), framework="pt") as f:
        tensor = f.get_tensor(key)  # a private copy: safe to update in place
    if widen and tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # the exact base + delta is what gets written
    dtype = tensor.dtype
    base_rows = tensor[rows[0]].float() if rows is not None else None
    if lora:
        acc = tensor.float()
        for factors, w in lora:
            factors.add_to(acc, w)
        tensor = acc.to(dtype)
        del acc
    if rows is not None and base_rows is not None:
        tensor = _mix_rows(tensor, base_rows, rows)
    return tensor


def _record_fp32(out_dir: Path, total_size: int) -> None:
    """config.json and the shard index say what the widened shards hold."""
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    index_path = out_dir / INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index.setdefault("metadata", {})["total_size"] = total_size
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# ---- the weight sweep -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepRow:
    weight: float  # w: INTERMEDIATE-3 = base + w·Δ2A + (1 − w)·Δ2B
    para_loss: float  # mean target-token loss on 2A-style examples
    domain_loss: float  # … on 2B-style examples
    score: float  # the mean of the two: the sweep keeps the lowest


@torch.no_grad()
def dev_loss(model: torch.nn.Module, examples: Sequence[Any], batch_size: int = 8) -> float:
    """Mean cross-entropy per target token, one example per row (right-padded, 2D mask)."""
    from cyclej.corpora import formats
    from cyclej.training.trainer import target_loss_sum

    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    rows = sorted((formats.single(e) for e in examples), key=len)  # similar lengths share a batch
    for start in range(0, len(rows), batch_size):
        batch = formats.collate(rows[start : start + batch_size], four_d_mask=False)
        loss_sum, n = target_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss_sum), count + n
    if count == 0:
        raise BadInput("merge sweep: the dev examples have no target tokens")
    return total / count


def sweep_weights(
    base_dir: str | Path,
    adapter_a: Adapter,
    adapter_b: Adapter,
    weights: Sequence[float],
    para_style: Sequence[Any],
    domain_style: Sequence[Any],
    work_dir: str | Path,
    progress: Progress | None = None,
) -> tuple[list[SweepRow], Path, MergeStats]:
    """Merge at each w into `work_dir/w=<w>`, score it on both example sets, keep the best directory.

    Only the best candidate so far stays on disk. Returns the table (in `weights` order), the best
    directory and its merge stats.
    """
    from cyclej.models.loading import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = weights_dtype("auto", device)
    work_dir = Path(work_dir)
    rows: list[SweepRow] = []
    best: tuple[float, Path, MergeStats] | None = None
    bar = (progress or Progress(show_bar=False)).bar("merge sweep", total=len(weights), unit="w")
    for w in weights:
        candidate = work_dir / f"w={w:g}"
        shutil.rmtree(candidate, ignore_errors=True)
        stats = merge_lora_adapters(base_dir, candidate, [(adapter_a, w), (adapter_b, 1.0 - w)])
        model, _ = load_model(str(candidate), dtype=dtype)  # load_model re-applies GPT-J's interpolation
        # transformers types PreTrainedModel.to as @wraps(nn.Module.to): unbound, so mypy misreads it
        model.to(device)  # type: ignore[arg-type]
        para, domain = dev_loss(model, para_style), dev_loss(model, domain_style)
        del model
        row = SweepRow(w, para, domain, (para + domain) / 2)
        rows.append(row)
        if best is None or row.score < best[0]:
            if best is not None:
                shutil.rmtree(best[1], ignore_errors=True)
            best = (row.score, candidate, stats)
        else:
            shutil.rmtree(candidate, ignore_errors=True)
        bar.update(1, w=w, score=row.score)
    bar.close()
    if best is None:
        raise BadInput("merge.sweep: no weights to try")
    return rows, best[1], best[2]


def sweep_markdown(rows: Sequence[SweepRow], best: float) -> str:
    lines = [
        "| w (2A) | 1 − w (2B) | 2A-style loss | 2B-style loss | score | |",
        "|---:|---:|---:|---:|---:|:---|",
    ]
    for r in rows:
        mark = "**best**" if r.weight == best else ""
        lines.append(
            f"| {r.weight:g} | {1 - r.weight:g} | {r.para_loss:.4f} | {r.domain_loss:.4f} | {r.score:.4f} | "
            f"{mark} |"
        )
    return "\n".join(lines) + "\n"
