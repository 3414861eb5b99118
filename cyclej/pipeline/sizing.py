"""`cyclej plan CONFIG`: per stage, the GPU memory it needs, the smallest RunPod GPU type that fits and
what that costs per hour. Nothing is downloaded: hub models come from a table of known shapes below,
local and built-in models from their config.json and safetensors headers (shapes only).

Memory model (bytes; GiB = 2**30 in the output, which is how "80GB" cards are counted):

- weights: parameters × 2 (bf16: `precision` bf16, or auto on a GPU) or × 4 (fp32).
- LoRA stages (context, para_train, domain_train with `lora` set): only the adapters train. Adapter
  parameters = rank × (in + out) for every attention and MLP projection of every layer; they are kept
  in fp32 (× 4), their gradients × 4, AdamW's two moments × 8. Full fine-tuning (`lora: null`):
  gradients in the weight dtype, AdamW moments in fp32 (× 8).
- RL (full weights): the bytes `cyclej.training.optim.optimizer_bytes_per_param` gives, which is what the
  trainer's MasterAdamW allocates: bf16 weights (2) + bf16 gradients (2) + fp32 masters (4) + fp32 AdamW
  moments (8) = 16 bytes per parameter on the GPU, or 4 on the GPU and 12 in CPU RAM with
  `rl.optimizer_offload`. A reference policy (kl_coef > 0) adds bf16 weights; the discriminator (only with a
  discriminator reward) trains in fp32 (16 bytes per parameter) at `rl.discriminator_max_tokens`; the embedder
  only runs (4).
- activations, per transformer layer, without activation recomputation (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", eq. 2, at 2-byte activations):
      34 · s · b · h · (k / 2)  +  6 · a · s² · b   (the second term only for eager attention)
  s = tokens per sequence, b = sequences per micro-batch, h = hidden size, a = attention heads, k =
  activation bytes (2 bf16, 4 fp32). GPT-J's attention is eager and keeps its softmax in fp32 (the s²
  term); SDPA/flash models (Llama, Mistral, Qwen, BERT-likes) keep no s² matrix. Plus the logits:
  s · b · vocab · (k + 8) (the logits, their fp32 copy for the loss, its gradient).
  With `gradient_checkpointing` (full recomputation of each layer in the backward pass, as HF's
  checkpointing of every decoder layer does): each layer keeps only its input, s · b · h · k, and one
  layer's activations above live while it is recomputed; the logits are the same.
- generation (paraphrase, RL rollouts, eval): KV cache = 2 · layers · kv_heads · head_dim · 2 bytes per
  token, for every sequence of a batch at prompt + new tokens. With vLLM the model, its KV cache and a
  1 GiB workspace must fit in `gpu_memory_utilization` of the card, and vLLM takes that fraction of the
  card whatever it needs: in RL the engine is counted as `rl.vllm.gpu_memory_utilization` × the card.
- a card fits when need + 1 GiB (CUDA context, allocator) ≤ 95 % of its memory.

The pod around the GPU (host RAM, vCPU, disk: what `StagePlan.job_variables` asks RunPod for, in GiB
rounded up; a GiB is the larger unit, so a request is never short):

- host RAM = the process (`PROCESS_RAM`: Python, torch/CUDA libraries, tokenizers, the corpus) + the
  largest of what a stage holds at once in RAM + 10 % headroom:
  * loading a model (`cyclej.models.loading.load_model` builds it on the CPU, then moves it): the published or
    committed weights read in (`stored_bytes`: GPT-J-6B's hub weights are fp32) + the model in its dtype;
  * a vLLM engine in the process: `VLLM_HOST_RAM` (its CPU swap space, 4 GiB by default, and its workers);
  * RL: MasterAdamW's host bytes (`cyclej.training.optim.optimizer_bytes_per_param`: fp32 masters + two
    moments = 12 per parameter with `rl.optimizer_offload`, 67.7 GiB for GPT-J-6B). The merge's fp32 weights
    the stage loads become the masters (no second copy); the final save
    (`cyclej.training.optim.fp32_with_masters`) frees the moments and hands the masters over as the CPU model,
    so it peaks at the same 12 bytes;
  * merge (CPU, streaming, cyclej.merging.linear): a few (`MERGE_TENSOR_COPIES`) fp32 copies of the largest
    tensor + both adapters in fp32, + one fp32 model per sweep candidate (scored with load_model).
- vCPU: not derived from bytes; `GPU_VCPUS` for every GPU stage (tokenizers, vLLM's scheduler and
  detokenizer, data loading), `RL_OFFLOAD_VCPUS` for RL with the optimizer in RAM (its AdamW step runs on
  the CPU over 12 bytes per parameter: torch's intra-op threads and memory bandwidth).
- disk (the container disk: `HF_HOME` and `CYCLEJ_CACHE` both live there when the pod has no network
  volume) = the image (`IMAGE_DISK`) + the hub models the stage downloads + its input artifacts as fetched
  (`stored`/committed bytes) + the checkpoints on disk at once + its output before the upload + logs.
  With an S3 store a checkpoint's local copy is deleted once uploaded (cyclej.runtime.store), so one is on
  disk at a time; with a local root `keep_checkpoints` + 1 (the new one is written before the oldest goes).
- checkpoint size: RL: 12 bytes per policy parameter (fp32 master + two moments; the bf16 weights are
  derived, cyclej.reinforcement.policy_gradient.RLTrainer.save_state) + the discriminator's fp32 weights and
  moments (12); LoRA stages: the adapters in fp32 + their two moments (12 per adapter parameter). Its cost in
  GPU time: written (`DISK_BYTES_PER_S`), checksummed for the manifest (`HASH_BYTES_PER_S`) and uploaded
  (`UPLOAD_BYTES_PER_S`, an assumption: s3fs's 10 concurrent 50 MiB parts to an S3 endpoint near the pod), one
  after the other, while the GPU waits. An interval (`checkpoint_every_minutes`) at which that exceeds
  `CHECKPOINT_BUDGET` of the time is flagged, with the interval (a multiple of 10 minutes) that keeps it
  under; a step interval shorter than the run is flagged for such large checkpoints too, since the plan does
  not know a step's time.

World size (`cyclej.runtime.distributed.gpus_for`: `resources.gpus.<stage>`, or CYCLEJ_GPUS where it is set):
a stage on N ranks runs on a pod of N GPUs of one type; memory is per GPU, the price the pod's (N × the hourly
price of the type). World size 1 is the single-process model above, unchanged.

- LoRA stages on N ranks (data parallel, cyclej.training.trainer): every rank holds the whole base and the
  adapters and trains on its share of a step's rows (⌈batch_size / N⌉), in micro-batches of at most
  `micro_batch_size`: per GPU, the single-GPU memory at that micro-batch, plus the one fp32 buffer the
  trainable gradients are packed into for their all-reduce (`cyclej.runtime.distributed.sum_tensors`).
- RL on N ranks (FSDP2): the fp32 parameters, sharded, are the masters; their gradients are
  reduce-scattered in fp32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`) and AdamW's
  moments are sharded with them: (4 + 4 + 8) / N bytes per parameter per GPU, on the GPU, so no optimizer
  offload. Plus the full weights in the compute dtype, gathered for the rollouts (generation, or the push
  into vLLM), which is more than the layers the forward and backward unshard at a time; plus each rank's
  activations, for a chunk of its share of the step's prompt groups (⌈prompts_per_step / N⌉). The
  reference policy, discriminator, embedder and vLLM engine are counted whole on every rank.
- the pod: every rank is a process that builds the stage at the same time, so the host RAM it takes
  (its libraries, its copy of the model loaded on the CPU, its engines) is counted N times, plus the
  launcher's process; vCPUs N times; disk once (the ranks share HF_HOME and CYCLEJ_CACHE, rank 0 writes).
- the smallest pod without optimizer offload (`StagePlan.smallest_pod`, the multi-GPU stages): the
  fewest GPUs of `WORLD_SIZES`, then the smallest card, on which the stage fits as planned above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from cyclej.config import STAGES, PipelineConfig, TrainConfig
from cyclej.errors import BadInput
from cyclej.models.shape import ModelShape, model_shape, stored_bytes
from cyclej.runtime.distributed import gpus_for
from cyclej.training.optim import optimizer_bytes_per_param

GiB = 2**30
CUDA_CONTEXT = 1 * GiB
USABLE_FRACTION = 0.95
VLLM_WORKSPACE = 1 * GiB
COMMON_MAX_GB = 80  # the largest cards most RunPod regions rent; above it, RL states its options
PROMPT_OVERHEAD_TOKENS = 64  # instruction + chat template around a paraphrase prompt
# The pod around the GPU (module docstring).
PROCESS_RAM = 6 * GiB
VLLM_HOST_RAM = 8 * GiB
RAM_HEADROOM = 0.10
MERGE_TENSOR_COPIES = 4
GPU_VCPUS = 8
RL_OFFLOAD_VCPUS = 16
IMAGE_DISK = 30 * GiB  # the GPU image unpacked (CUDA torch, vLLM, the code) on the container disk
LOGS_DISK = 1 * GiB  # the data artifact, metrics, samples, logs
DISK_BYTES_PER_S = 1e9
HASH_BYTES_PER_S = 1e9  # sha256 of every file for the checkpoint's manifest (cyclej.runtime.store._scan)
UPLOAD_BYTES_PER_S = 250e6
CHECKPOINT_BUDGET = 0.05  # the share of a stage's time its checkpoints may take
LARGE_CHECKPOINT = 1 * GiB  # below it a checkpoint costs seconds: its step interval is not flagged
WORLD_SIZES = (1, 2, 4, 8)  # the GPU counts of the pods the smallest-pod search rents (one GPU type each)
FSDP_PREFETCH_LAYERS = 2  # FSDP2 unshards the next layer while one computes


@dataclass(frozen=True)
class GpuType:
    id: str
    memory_gb: float
    hourly_usd: float


@dataclass(frozen=True)
class PriceTable:
    date: str
    source: str
    gpus: tuple[GpuType, ...]


def load_prices(path: str | Path | None = None) -> PriceTable:
    src = Path(path) if path else Path(str(resources.files("cyclej") / "assets" / "gpu_prices.yaml"))
    try:
        data = yaml.safe_load(src.read_text(encoding="utf-8"))
        gpus = tuple(
            GpuType(str(g["id"]), float(g["memory_gb"]), float(g["hourly_usd"])) for g in data["gpus"]
        )
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise BadInput(
            f"{src}: not a GPU price table ({type(exc).__name__}: {exc}); see cyclej/assets/gpu_prices.yaml"
        ) from None
    if not gpus:
        raise BadInput(f"{src}: the price table lists no GPUs")
    return PriceTable(str(data.get("date", "?")), str(data.get("source", "?")), gpus)


def fits(need_bytes: float, gpu: GpuType) -> bool:
    return need_bytes + CUDA_CONTEXT <= USABLE_FRACTION * gpu.memory_gb * GiB


def smallest_fitting(need_bytes: float, prices: PriceTable, max_gb: float = math.inf) -> GpuType | None:
    """The smallest card (the cheapest of equal memory) of at most `max_gb` that holds `need_bytes`."""
    ok = [g for g in prices.gpus if g.memory_gb <= max_gb and fits(need_bytes, g)]
    return min(ok, key=lambda g: (g.memory_gb, g.hourly_usd)) if ok else None


# ---- the plan ----------------------------------------------------------------------------------------
@dataclass
class Alternative:
    """Another way to run a stage that does not fit a common GPU as configured."""

    name: str
    memory: dict[str, float]  # bytes per GPU by part
    gpu_count: int = 1
    note: str = ""
    gpu: GpuType | None = None

    @property
    def need_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def hourly_usd(self) -> float | None:
        return None if self.gpu is None else self.gpu.hourly_usd * self.gpu_count


@dataclass
class StagePlan:
    stage: str
    model: str | None  # the spec whose shape sizes the stage
    device: Literal["gpu", "cpu"]
    params: int = 0
    trainable_params: int = 0
    memory: dict[str, float] = field(default_factory=dict)  # bytes per GPU by part
    gpu: GpuType | None = None
    gpu_count: int = 1
    micro_batch: int | None = None  # training stages: the micro-batch the estimate is for
    alternatives: list[Alternative] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    host: dict[str, float] = field(default_factory=dict)  # bytes of host RAM by part (module docstring)
    vcpus: int = 0
    disk: dict[str, float] = field(default_factory=dict)  # bytes of pod disk by part
    checkpoint_bytes: float = 0.0  # one checkpoint
    checkpoint_minutes: float | None = None  # the interval that keeps checkpoints under CHECKPOINT_BUDGET
    # Multi-GPU stages: the fewest GPUs (then the smallest card) on which it fits without optimizer offload.
    smallest_pod: Alternative | None = None

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def host_bytes(self) -> float:
        return sum(self.host.values())

    @property
    def disk_bytes(self) -> float:
        return sum(self.disk.values())

    @property
    def hourly_usd(self) -> float | None:
        return None if self.gpu is None else self.gpu.hourly_usd * self.gpu_count

    def job_variables(self) -> dict[str, str | int]:
        """What a `runpod` deployment of this stage should set (deployments/prefect.yaml; the RunPod
        worker passes them to the pod): the GPU, and the pod's RAM, vCPUs and container disk in GiB,
        rounded up."""
        if self.gpu is None:
            return {}
        return {
            "gpu_type_id": self.gpu.id,
            "gpu_count": self.gpu_count,
            "min_memory_in_gb": _gib_up(self.host_bytes),
            "min_vcpu_count": self.vcpus,
            "container_disk_gb": _gib_up(self.disk_bytes),
        }


def _gib_up(n: float) -> int:
    return math.ceil(n / GiB)


def _bf16(precision: str) -> bool:
    return precision in ("bf16", "auto")  # auto means bf16 on a GPU, which is what is being planned


def activation_bytes(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    act_bytes: int,
    lm_head: bool = True,
    logits_tokens: int | None = None,
    checkpointing: bool = False,
) -> float:
    """Stored activations of one micro-batch (see the module docstring); `logits_tokens`: the columns the
    LM head runs on when fewer than `seq_len` (RL keeps only the completion's); `checkpointing`: every
    layer recomputed in the backward pass (only its input kept, one layer's activations at a time)."""
    s, b = seq_len, micro_batch
    per_layer = 34 * s * b * shape.hidden * act_bytes / 2
    if shape.eager_attention:
        per_layer += 6 * shape.heads * s * s * b
    logits = (logits_tokens or s) * b * shape.vocab * (act_bytes + 8) if lm_head else 0
    if checkpointing:
        return shape.layers * s * b * shape.hidden * act_bytes + per_layer + logits
    return shape.layers * per_layer + logits


def _train_memory(
    shape: ModelShape, tcfg: TrainConfig, micro_batch: int, world: int = 1
) -> tuple[dict[str, float], int]:
    w = 2 if _bf16(tcfg.precision) else 4
    if tcfg.lora is not None:
        trainable = shape.lora_params(tcfg.lora.rank)
        mem: dict[str, float] = {
            "weights": shape.params * w + trainable * 4,
            "gradients": trainable * 4,
            "optimizer": trainable * 8,
        }
    else:
        trainable = shape.params
        mem = {"weights": shape.params * w, "gradients": shape.params * w, "optimizer": shape.params * 8}
    mem["activations"] = activation_bytes(
        shape, micro_batch, tcfg.seq_len, w, checkpointing=tcfg.gradient_checkpointing
    )
    if world > 1:  # sum_tensors packs every trainable gradient into one fp32 buffer for the all-reduce
        mem["all-reduce buffer"] = trainable * 4.0
    return mem, trainable


def _halvings(n: int) -> list[int]:
    """n, n/2, …, 1: the micro-batches the trainers fall back to on out-of-memory."""
    out = [n]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _rank_micro_batch(tcfg: TrainConfig, world: int) -> int:
    """A rank's micro-batch: its share of a step's rows (the rank with the most), at most micro_batch_size;
    one GPU: micro_batch_size, as the single-process plan always counted."""
    return (
        tcfg.micro_batch_size
        if world == 1
        else min(tcfg.micro_batch_size, math.ceil(tcfg.batch_size / world))
    )


def _fit_training(
    shape: ModelShape, tcfg: TrainConfig, prices: PriceTable, world: int
) -> tuple[GpuType | None, dict[str, float], int, int]:
    """(card, memory per GPU, micro-batch, trainable parameters): the rank's micro-batch on a common card if
    it fits; else the largest halved micro-batch that does (the effective batch is unchanged); else the
    largest card of the table at micro-batch 1."""
    for limit in (COMMON_MAX_GB, math.inf):
        for mb in _halvings(_rank_micro_batch(tcfg, world)):
            mem, trainable = _train_memory(shape, tcfg, mb, world)
            gpu = smallest_fitting(sum(mem.values()), prices, limit)
            if gpu is not None:
                return gpu, mem, mb, trainable
    return None, mem, mb, trainable


def _plan_training(stage: str, spec: str, tcfg: TrainConfig, prices: PriceTable, world: int = 1) -> StagePlan:
    """The stage on `world` GPUs (`_fit_training`), and the smallest pod it fits."""
    shape = model_shape(spec)
    plan = StagePlan(stage, spec, "gpu", params=shape.params, gpu_count=world)
    gpu, plan.memory, mb, plan.trainable_params = _fit_training(shape, tcfg, prices, world)
    plan.gpu, plan.micro_batch = gpu, mb
    kind = f"LoRA r={tcfg.lora.rank}" if tcfg.lora is not None else "full fine-tuning"
    plan.notes.append(
        f"{kind}, {tcfg.precision}, micro-batch {mb} × {tcfg.seq_len} tokens"
        + (" per rank" if world > 1 else "")
    )
    if world > 1:
        plan.notes.append(
            f"{world} ranks (data parallel): each holds the whole model, trains on ⌈{tcfg.batch_size} / "
            f"{world}⌉ = {math.ceil(tcfg.batch_size / world)} rows of a step and all-reduces the trainable "
            "gradients"
        )
    start = _rank_micro_batch(tcfg, world)
    if mb != start:
        plan.notes.append(
            f"micro-batch {start} fits no {COMMON_MAX_GB} GB card; the trainer halves it on "
            f"out-of-memory (accumulation doubles, the effective batch stays {tcfg.batch_size}): set "
            f"{stage}.micro_batch_size: {mb} to skip those retries"
        )
    if gpu is None:
        plan.notes.append(
            f"even micro-batch 1 needs {_gib(plan.total_bytes)} GiB: shorten {stage}.seq_len"
            + (
                " (GPT-J's eager attention keeps an s² fp32 matrix per head and layer)"
                if shape.eager_attention
                else ""
            )
        )
    for n in WORLD_SIZES:  # no optimizer offload in a LoRA stage: the smallest pod is the first that fits
        pod, mem, pod_mb, _ = _fit_training(shape, tcfg, prices, n)
        if pod is not None:
            plan.smallest_pod = Alternative(
                f"resources.gpus.{stage}: {n}", mem, gpu_count=n, gpu=pod, note=f"micro-batch {pod_mb}"
            )
            break
    return plan


def _generation_share(shape: ModelShape, sequences: int, tokens: int, vllm: bool) -> dict[str, float]:
    mem = {"weights": shape.params * 2.0, "kv_cache": float(sequences * tokens * shape.kv_bytes_per_token())}
    if vllm:
        mem["workspace"] = float(VLLM_WORKSPACE)
    return mem


def _plan_paraphrase(cfg: PipelineConfig, prices: PriceTable, workers: int = 1) -> StagePlan:
    """One engine (tensor parallel over `tensor_parallel_size` GPUs), or `workers` data-parallel engines
    over the shards (cyclej.runtime.distributed: one per GPU, each the one-engine memory)."""
    p = cfg.paraphrase
    shape = model_shape(cfg.models.paraphraser)
    tokens = cfg.data.max_tokens + PROMPT_OVERHEAD_TOKENS + p.max_new_tokens
    gen = _generation_share(shape, p.batch_size * p.n_candidates, tokens, p.backend == "vllm")
    plan = StagePlan("paraphrase", cfg.models.paraphraser, "gpu", params=shape.params)
    if p.backend == "vllm":
        # Tensor parallelism splits the weights and the KV cache over the GPUs; the workspace is per GPU.
        tp = p.vllm.tensor_parallel_size
        plan.gpu_count = tp
        plan.memory = {"vllm": (gen["weights"] + gen["kv_cache"]) / tp + gen["workspace"]}
        # vLLM takes gpu_memory_utilization of the card whatever it needs: size the card by that.
        need = plan.memory["vllm"] / p.vllm.gpu_memory_utilization
        plan.notes.append(
            f"vLLM (tensor parallel {tp}): weights + KV cache of {p.batch_size * p.n_candidates} sequences × "
            f"{tokens} tokens must fit in gpu_memory_utilization {p.vllm.gpu_memory_utilization} of each card"
        )
    else:
        plan.memory = gen
        need = sum(gen.values())
    if p.use_embedder:
        plan.memory["embedder"] = model_shape(cfg.models.embedder).params * 4.0
        need += plan.memory["embedder"]
    plan.gpu = smallest_fitting(need, prices)
    if workers > 1:
        plan.gpu_count *= workers
        plan.notes.append(
            f"{workers} data-parallel workers, one engine per GPU, shard i on worker i mod {workers}"
        )
    return plan


def _rl_memory(
    cfg: PipelineConfig, groups: int, offload: bool, card_bytes: float, world: int = 1
) -> dict[str, float]:
    """Bytes on one GPU of `card_bytes` for the RL stage with `groups` prompt groups per forward/backward
    chunk: what `cyclej.stages.rl` and `cyclej.reinforcement.policy_gradient.RLTrainer` allocate with these
    settings.

    - policy weights in the compute dtype; gradients in the same dtype; MasterAdamW's fp32 masters (when
      the weights are not fp32) and fp32 moments on the GPU, or in CPU RAM with `rl.optimizer_offload`
      (`cyclej.training.optim.optimizer_bytes_per_param`, shared with the optimizer).
    - activations of one chunk (groups × rollouts rows of prompt + completion tokens); logits only for the
      completion columns (the trainer passes `logits_to_keep`).
    - the reference policy (kl_coef > 0), the discriminator (fp32 AdamW, its own max_tokens) and the
      embedder only when their reward has a weight, as the stage loads them.
    - rollouts: vLLM takes `rl.vllm.gpu_memory_utilization` × the card, whatever it needs; the
      transformers backend a KV cache for one chunk of rows (its generation batch).
    - on `world` > 1 ranks (FSDP2, `offload` unused: the shards are on the GPU): one GPU's share, the
      module docstring's "RL on N ranks".
    """
    r = cfg.rl
    shape = model_shape(cfg.models.base)
    w = 2 if _bf16(r.precision) else 4
    seq = cfg.data.max_tokens + 2 + r.max_new_tokens
    if world > 1:
        # fp32 shards: the parameters (the masters), their fp32-reduced gradients, AdamW's two moments.
        mem = {
            "weights shard (fp32)": shape.params * 4.0 / world,
            "gradients shard (fp32)": shape.params * 4.0 / world,
            "optimizer shard": shape.params * 8.0 / world,
        }
        # Unsharded at once: the whole model in the compute dtype for the rollouts, or, in the forward and
        # backward, the prefetched layers' weights + their gradients + the fp32 copy reduce-scattered.
        unsharded_layers = FSDP_PREFETCH_LAYERS * shape.layer_params * (2.0 * w + 4.0)
        mem[f"gathered weights ({'bf16' if w == 2 else 'fp32'})"] = max(
            shape.params * float(w), unsharded_layers
        )
    else:
        per_param = optimizer_bytes_per_param(w, offload)
        mem = {"weights": shape.params * float(w), "gradients": shape.params * float(w)}
        if per_param["device"] > w:
            mem["optimizer"] = shape.params * (per_param["device"] - w)
    rows = groups * r.rollouts
    mem["activations"] = activation_bytes(
        shape, rows, seq, w, logits_tokens=r.max_new_tokens + 1, checkpointing=r.gradient_checkpointing
    )
    if r.kl_coef > 0:
        mem["reference"] = shape.params * float(w)
    if r.rewards.discriminator > 0:
        disc = model_shape(cfg.models.discriminator)
        mem["discriminator"] = disc.params * 16.0 + activation_bytes(
            disc, r.discriminator_batch, r.discriminator_max_tokens, 4, lm_head=False
        )
    if r.rewards.embedding > 0:
        mem["embedder"] = model_shape(cfg.models.embedder).params * 4.0
    if r.backend != "transformers":
        mem["vllm"] = r.vllm.gpu_memory_utilization * card_bytes
    else:
        mem["kv_cache"] = float(rows * seq * shape.kv_bytes_per_token(w))
    return mem


def _vllm_holds_rl(cfg: PipelineConfig, card_bytes: float) -> bool:
    """vLLM refuses to start when its share cannot hold the weights, its workspace and one full-length
    sequence's KV cache."""
    r = cfg.rl
    if r.backend == "transformers":
        return True
    shape = model_shape(cfg.models.base)
    need = shape.params * 2.0 + VLLM_WORKSPACE + r.vllm.max_model_len * shape.kv_bytes_per_token()
    return r.vllm.gpu_memory_utilization * card_bytes >= need


def _fit_rl(
    cfg: PipelineConfig, groups: int, offload: bool, prices: PriceTable, max_gb: float, world: int = 1
) -> tuple[GpuType | None, dict[str, float]]:
    """The smallest card (≤ max_gb) that holds the stage (per GPU on `world` ranks); vLLM's share depends
    on the card."""
    for gpu in sorted(prices.gpus, key=lambda g: (g.memory_gb, g.hourly_usd)):
        card = gpu.memory_gb * GiB
        mem = _rl_memory(cfg, groups, offload, card, world)
        if gpu.memory_gb <= max_gb and _vllm_holds_rl(cfg, card) and fits(sum(mem.values()), gpu):
            return gpu, mem
    return None, _rl_memory(cfg, groups, offload, COMMON_MAX_GB * GiB, world)


def _rank_groups(cfg: PipelineConfig, world: int) -> int:
    """Prompt groups per forward/backward chunk on a rank: its share of a step's prompts (the rank with
    the most), at most rl.rollout_micro_batch; one GPU: rl.rollout_micro_batch, as the single-process plan
    always counted."""
    r = cfg.rl
    return (
        r.rollout_micro_batch
        if world == 1
        else min(r.rollout_micro_batch, math.ceil(r.prompts_per_step / world))
    )


def _smallest_rl_pod(cfg: PipelineConfig, prices: PriceTable) -> Alternative | None:
    """The fewest GPUs, then the smallest card, that hold RL with its optimizer on the GPUs: MasterAdamW's
    16 bytes per parameter on one, FSDP2's shards on several; the groups per chunk halved as the trainer
    does on out-of-memory."""
    for n in WORLD_SIZES:
        for limit in (COMMON_MAX_GB, math.inf):
            for groups in _halvings(_rank_groups(cfg, n)):
                gpu, mem = _fit_rl(cfg, groups, False, prices, limit, n)
                if gpu is not None:
                    # On N > 1 ranks the trainer ignores optimizer_offload (FSDP2's shards are on the GPUs),
                    # so only one GPU needs it off (which re-runs RL: it is in the stage's fingerprint).
                    off = ", rl.optimizer_offload: false" if cfg.rl.optimizer_offload and n == 1 else ""
                    name = f"resources.gpus.rl: {n}{off}"
                    return Alternative(name, mem, gpu_count=n, gpu=gpu, note=f"{groups} group(s) per chunk")
    return None


def _plan_rl(cfg: PipelineConfig, prices: PriceTable, world: int = 1) -> StagePlan:
    """As configured on a common (≤ 80 GB) card if it fits, halving the groups per chunk as the trainer does
    on out-of-memory; otherwise with the optimizer state in CPU RAM (`rl.optimizer_offload: true`, which the
    trainer implements); otherwise the smallest card of the table that fits as configured. On `world` > 1
    ranks the optimizer state is sharded over the GPUs (the module docstring): no offload way."""
    r = cfg.rl
    shape = model_shape(cfg.models.base)
    w = 2 if _bf16(r.precision) else 4
    plan = StagePlan(
        "rl", cfg.models.base, "gpu", params=shape.params, trainable_params=shape.params, gpu_count=world
    )
    offload_cfg = r.optimizer_offload and world == 1
    ways = [(offload_cfg, "as configured")]
    if not offload_cfg and world == 1:
        ways.append((True, "rl.optimizer_offload: true (fp32 masters and AdamW moments in CPU RAM)"))
    start = _rank_groups(cfg, world)
    chosen: tuple[GpuType, dict[str, float], int, bool, str] | None = None
    for limit in (COMMON_MAX_GB, math.inf):
        for offload, name in ways:
            for groups in _halvings(start):
                gpu, mem = _fit_rl(cfg, groups, offload, prices, limit, world)
                if gpu is not None:
                    chosen = (gpu, mem, groups, offload, name)
                    break
            if limit == COMMON_MAX_GB or chosen is not None:  # each way once: on a common card, else bigger
                plan.alternatives.append(Alternative(name, mem, gpu_count=world, gpu=gpu))
            if chosen is not None:
                break
        if chosen is not None:
            break
    if world > 1:
        plan.notes.append(
            f"{world} ranks (FSDP2): fp32 weights, fp32 gradients and AdamW moments sharded, 16 / {world} "
            f"bytes per parameter = {_gib(shape.params * 16.0 / world)} GiB per GPU, + the {w}-byte weights "
            f"gathered for the rollouts ({_gib(shape.params * float(w))} GiB); ⌈{r.prompts_per_step} / "
            f"{world}⌉ prompt groups per rank"
        )
        if r.optimizer_offload:
            # MasterAdamW's offload is the one-GPU answer to 16 bytes per parameter; sharded they fit.
            plan.notes.append(
                f"rl.optimizer_offload is not counted on {world} ranks: the sharded fp32 weights and "
                "AdamW moments are on the GPUs"
            )
    else:
        per_param = optimizer_bytes_per_param(w, r.optimizer_offload)
        plan.notes.append(
            f"full weights: {w}-byte weights and gradients, fp32 masters and AdamW moments "
            f"({'in CPU RAM' if r.optimizer_offload else 'on the GPU'}): {per_param['device'] + w:.0f} bytes "
            f"per parameter on the GPU = {_gib(shape.params * (per_param['device'] + w))} GiB before "
            "activations"
        )
    if r.backend != "transformers":
        plan.notes.append(
            f"vLLM takes rl.vllm.gpu_memory_utilization {r.vllm.gpu_memory_utilization} of the card"
            + (" on every rank" if world > 1 else "")
        )
    plan.smallest_pod = _smallest_rl_pod(cfg, prices)
    if chosen is None:
        plan.memory = _rl_memory(cfg, start, offload_cfg, COMMON_MAX_GB * GiB, world)
        plan.notes.append(
            "nothing in the price table fits: lower rl.max_new_tokens, rl.rollouts or "
            "rl.vllm.gpu_memory_utilization"
        )
        return plan
    gpu, mem, groups, offload, name = chosen
    plan.memory, plan.gpu, plan.micro_batch = mem, gpu, groups
    plan.notes.append(f"{groups} group(s) × {r.rollouts} rollouts per forward/backward chunk")
    if offload:
        plan.notes.append(f"CPU RAM for the offloaded optimizer: {_gib(shape.params * 12.0)} GiB (pod RAM)")
    if name != "as configured":
        plan.notes.append(f"as configured it fits no {COMMON_MAX_GB} GB card; set {name.split(' (')[0]}")
    if groups != start:
        plan.notes.append(f"set rl.rollout_micro_batch: {groups} to skip the out-of-memory halvings")
    if len(plan.alternatives) == 1:
        plan.alternatives = []  # as configured fits: nothing else to show
    return plan


def _plan_eval(cfg: PipelineConfig, prices: PriceTable) -> StagePlan:
    e = cfg.eval
    shape = model_shape(cfg.models.base)
    tokens = cfg.data.max_tokens + 3 + e.max_new_tokens
    gen = _generation_share(shape, e.batch_size, tokens, e.backend == "vllm")
    plan = StagePlan("eval", cfg.models.base, "gpu", params=shape.params)
    plan.memory = {"vllm": sum(gen.values())} if e.backend == "vllm" else dict(gen)
    plan.memory["discriminator"] = model_shape(cfg.models.discriminator).params * 4.0
    plan.memory["embedder"] = model_shape(cfg.models.embedder).params * 4.0
    plan.gpu = smallest_fitting(plan.total_bytes, prices)
    plan.notes.append(
        f"translation of {e.batch_size} sequences × {tokens} tokens at a time, then n-gram fluency on the CPU"
    )
    return plan


# ---- the pod: host RAM, vCPU, disk, checkpoints (module docstring) ------------------------------------
def _remote_store(cfg: PipelineConfig) -> bool:
    root = cfg.storage.root
    return "://" in root and not root.startswith(("file://", "local://"))


def _checkpoint_seconds(nbytes: float, remote: bool) -> float:
    """GPU time one checkpoint costs: written, checksummed for its manifest, uploaded (remote store)."""
    return (
        nbytes / DISK_BYTES_PER_S
        + nbytes / HASH_BYTES_PER_S
        + (nbytes / UPLOAD_BYTES_PER_S if remote else 0.0)
    )


def _schedule_checkpoints(
    p: StagePlan,
    cfg: PipelineConfig,
    section: str,
    nbytes: float,
    every_steps: int,
    every_minutes: float,
    steps: int,
    keep: int,
) -> float:
    """Size the stage's checkpoints, flag an interval they would take more than CHECKPOINT_BUDGET of;
    returns the bytes of checkpoints on the pod's disk at once."""
    remote = _remote_store(cfg)
    p.checkpoint_bytes = nbytes
    cost = _checkpoint_seconds(nbytes, remote)
    need_minutes = cost / CHECKPOINT_BUDGET / 60
    p.checkpoint_minutes = max(10.0, math.ceil(need_minutes / 10) * 10.0)
    how = (
        f"written, checksummed and uploaded at {UPLOAD_BYTES_PER_S / 1e6:.0f} MB/s"
        if remote
        else "written and checksummed"
    )
    took = f"{cost / 60:.1f} min" if cost >= 120 else f"{cost:.0f} s"
    p.notes.append(f"a checkpoint is {_gib(nbytes)} GiB, ~{took} of GPU time ({how})")
    if every_minutes < need_minutes:
        p.notes.append(
            f"{section}.checkpoint_every_minutes {every_minutes:g} spends {cost / (every_minutes * 60):.0%} "
            f"of the stage on checkpoints: set {section}.checkpoint_every_minutes: {p.checkpoint_minutes:g} "
            f"(≤ {CHECKPOINT_BUDGET:.0%}) and keep_checkpoints: 1"
        )
    if nbytes >= LARGE_CHECKPOINT and every_steps < steps:
        p.notes.append(
            f"{section}.checkpoint_every_steps {every_steps} may checkpoint more often than every "
            f"{p.checkpoint_minutes:g} min (the plan does not know a step's time): set "
            f"{section}.checkpoint_every_steps: {steps} to checkpoint by time only"
        )
    # a remote store's local copy goes once uploaded; a local root holds `keep` + the one being written
    return nbytes * (1 if remote else keep + 1)


def _finish_pod(p: StagePlan, vcpus: int, ranks: int = 1) -> None:
    """The process and headroom around the stage's host parts (one process's), the image and logs on disk.
    On `ranks` > 1 every rank is its own process building the stage at the same moment: each loads its own
    copy of the model on the host (load_model builds it on the CPU before it, or its shard, goes to the
    rank's GPU) and starts its own engines, so every host part is counted once per rank, and the launcher
    (the flow's process, holding the lease while torchrun runs) is one more process; each rank tokenizes,
    loads data and drives a GPU, so vCPUs per rank too. Disk is counted once: the ranks share HF_HOME and
    CYCLEJ_CACHE (one download, one fetch) and rank 0 alone writes checkpoints and the output."""
    if ranks > 1:
        per_rank = {f"{k} × {ranks} ranks": v * ranks for k, v in p.host.items()}
        p.host = {f"processes: the launcher + {ranks} ranks": float(PROCESS_RAM * (ranks + 1)), **per_rank}
    else:
        p.host = {"process": float(PROCESS_RAM), **p.host}
    p.host["headroom"] = RAM_HEADROOM * sum(p.host.values())
    p.disk = {"image": float(IMAGE_DISK), **p.disk, "data and logs": float(LOGS_DISK)}
    p.vcpus = vcpus * ranks


def _load_peak(shape: ModelShape, read_bytes: float, dtype_bytes: float) -> float:
    """load_model on the CPU: the weights read in + the model in its dtype (then moved to the GPU)."""
    return shape.params * (read_bytes + dtype_bytes)


def _pod_training(p: StagePlan, cfg: PipelineConfig, stage: str, tcfg: TrainConfig, world: int = 1) -> None:
    shape = model_shape(cfg.models.base)
    w = 2.0 if _bf16(tcfg.precision) else 4.0
    if stage == "context":  # the base from the hub; writes the extended model in its training dtype
        read = stored_bytes(cfg.models.base)
        p.disk["hub: " + cfg.models.base] = shape.params * read
        p.disk["output: model"] = shape.params * w
    else:  # the context model from the store; writes the adapter (fp32)
        read = 2.0 if _bf16(cfg.context.precision) else 4.0
        p.disk["input: context model"] = shape.params * read
        p.disk["output: adapter"] = p.trainable_params * 4.0
    p.host["load the model"] = _load_peak(shape, read, w)
    trainable = p.trainable_params
    nbytes = trainable * 12.0  # fp32 trainable weights (LoRA: the adapters) + two AdamW moments
    p.disk["checkpoints"] = _schedule_checkpoints(
        p,
        cfg,
        stage,
        nbytes,
        tcfg.checkpoint_every_steps,
        tcfg.checkpoint_every_minutes,
        tcfg.max_steps,
        tcfg.keep_checkpoints,
    )
    bt = getattr(tcfg, "back_translation", None)
    if bt is not None:  # para_train's second phase keeps its own series of checkpoints beside the first's
        p.disk["checkpoints (back-translation phase)"] = p.disk["checkpoints"]  # same size, same keep
        emb = model_shape(cfg.models.embedder)  # it filters the rewrites
        p.disk["hub: " + cfg.models.embedder] = emb.params * stored_bytes(cfg.models.embedder)
        p.host["embedder"] = emb.params * 8.0
    _finish_pod(p, GPU_VCPUS, world)


def _pod_paraphrase(p: StagePlan, cfg: PipelineConfig, workers: int = 1) -> None:
    pc = cfg.paraphrase
    shape = model_shape(cfg.models.paraphraser)
    read = stored_bytes(cfg.models.paraphraser)
    p.disk["hub: " + cfg.models.paraphraser] = shape.params * read
    if pc.backend == "vllm":
        p.host["vllm engine"] = float(VLLM_HOST_RAM)  # it streams the weights to the GPU itself
    else:
        p.host["load the model"] = _load_peak(shape, read, 2.0)
    if pc.use_embedder:
        emb = model_shape(cfg.models.embedder)
        p.disk["hub: " + cfg.models.embedder] = emb.params * stored_bytes(cfg.models.embedder)
        p.host["embedder"] = emb.params * 8.0
    _finish_pod(p, GPU_VCPUS, workers)


def _pod_merge(p: StagePlan, cfg: PipelineConfig) -> None:
    shape = model_shape(cfg.models.base)
    ctx = 2.0 if _bf16(cfg.context.precision) else 4.0
    adapters = (
        shape.lora_params(cfg.para_train.lora.rank if cfg.para_train.lora else 0) * 4.0
        + shape.lora_params(cfg.domain_train.lora.rank if cfg.domain_train.lora else 0) * 4.0
    )
    largest = 4.0 * max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate)
    p.host["streaming merge"] = MERGE_TENSOR_COPIES * largest + adapters
    if cfg.merge.sweep:
        p.host["sweep: one candidate in fp32"] = shape.params * 4.0
    p.disk = {
        "input: context model": shape.params * ctx,
        "input: adapters": adapters,
        "output: model (fp32)": shape.params * 4.0,
    }
    _finish_pod(p, 4)
    p.disk.pop("image")  # the local pool: no pod image


def _pod_rl(p: StagePlan, cfg: PipelineConfig, world: int = 1) -> None:
    r = cfg.rl
    shape = model_shape(cfg.models.base)
    w = 2.0 if _bf16(r.precision) else 4.0
    offload = (
        r.optimizer_offload and world == 1
    )  # on several ranks the optimizer state is sharded on the GPUs
    if world == 1:
        host_opt = optimizer_bytes_per_param(int(w), offload)["host"]
        # The merge's fp32 weights (4) are loaded on the CPU and become the masters; with offload the moments
        # join them (12 in all), and the final save never holds more
        # (cyclej.training.optim.fp32_with_masters).
        p.host["policy: fp32 load, masters + moments"] = shape.params * max(4.0, host_opt)
    else:  # each rank loads the merge's fp32 weights, then keeps only its shard (on its GPU)
        p.host["policy: fp32 load"] = shape.params * 4.0
    if r.kl_coef > 0:
        p.host["reference policy load"] = shape.params * w
    if r.backend != "transformers":
        p.host["vllm engine"] = float(VLLM_HOST_RAM)
    p.disk["input: merge model (fp32)"] = shape.params * 4.0
    disc_bytes = 0.0
    if r.rewards.discriminator > 0:
        disc = model_shape(cfg.models.discriminator)
        read = stored_bytes(cfg.models.discriminator)
        p.host["discriminator load"] = _load_peak(disc, read, 4.0)
        p.disk["hub: " + cfg.models.discriminator] = disc.params * read
        disc_bytes = disc.params * 12.0  # fp32 weights + AdamW moments in its checkpoint
    if r.rewards.embedding > 0:
        emb = model_shape(cfg.models.embedder)
        p.disk["hub: " + cfg.models.embedder] = emb.params * stored_bytes(cfg.models.embedder)
        p.host["embedder"] = emb.params * 8.0
    nbytes = shape.params * 12.0 + disc_bytes
    p.disk["checkpoints"] = _schedule_checkpoints(
        p,
        cfg,
        "rl",
        nbytes,
        r.checkpoint_every_steps,
        r.checkpoint_every_minutes,
        r.steps,
        r.keep_checkpoints,
    )
    p.disk["output: model (fp32) + discriminator"] = shape.params * 4.0 + disc_bytes / 3
    _finish_pod(p, RL_OFFLOAD_VCPUS if offload else GPU_VCPUS, world)


def _pod_eval(p: StagePlan, cfg: PipelineConfig) -> None:
    shape = model_shape(cfg.models.base)
    ctx = 2.0 if _bf16(cfg.context.precision) else 4.0
    p.disk["input: context model"] = shape.params * ctx
    p.disk["input: merge and rl models (fp32)"] = shape.params * 8.0
    if cfg.para_train.lora is not None:
        p.disk["input: para_train adapter"] = shape.lora_params(cfg.para_train.lora.rank) * 4.0
    for spec in {cfg.models.embedder, cfg.models.discriminator}:
        p.disk["hub: " + spec] = model_shape(spec).params * stored_bytes(spec)
    # Each system is translated in turn. With vLLM the engine streams the weights to the GPU, and the
    # one system built with transformers is 2A (the context model + its adapter, bf16); without it, the
    # largest (an fp32 artifact) is loaded into a bf16 model.
    if cfg.eval.backend == "vllm":
        p.host["vllm engine"] = float(VLLM_HOST_RAM)
        p.host["load a model"] = _load_peak(shape, ctx, 2.0)
    else:
        p.host["load a model"] = _load_peak(shape, 4.0, 2.0)
    _finish_pod(p, GPU_VCPUS)


def plan(cfg: PipelineConfig, prices: PriceTable | None = None) -> list[StagePlan]:
    """One StagePlan per stage, in pipeline order."""
    prices = prices or load_prices()
    merge_shape = model_shape(cfg.models.base)
    # The world size each stage would run at here (resources.gpus, or CYCLEJ_GPUS where it is set); a
    # stage that cannot use several GPUs but is given them is refused now, as the run would refuse it.
    world = {s: gpus_for(cfg, s) for s in STAGES}
    plans = {
        "data": StagePlan(
            "data", None, "cpu", notes=["cleaning and tokenizing: CPU only (the process pool)"]
        ),
        "context": _plan_training("context", cfg.models.base, cfg.context, prices, world["context"]),
        "paraphrase": _plan_paraphrase(cfg, prices, world["paraphrase"]),
        "para_train": _plan_training(
            "para_train", cfg.models.base, cfg.para_train, prices, world["para_train"]
        ),
        "domain_train": _plan_training(
            "domain_train", cfg.models.base, cfg.domain_train, prices, world["domain_train"]
        ),
        "merge": StagePlan(
            "merge",
            cfg.models.base,
            "cpu",
            params=merge_shape.params,
            notes=["no training: a streaming merge, tensor by tensor (cyclej.merging.linear); CPU is enough"],
        ),
        "rl": _plan_rl(cfg, prices, world["rl"]),
        "eval": _plan_eval(cfg, prices),
    }
    _finish_pod(plans["data"], 4)
    plans["data"].disk.pop("image")  # the local pool
    for stage in ("context", "para_train", "domain_train"):
        _pod_training(plans[stage], cfg, stage, getattr(cfg, stage), world[stage])
    _pod_paraphrase(plans["paraphrase"], cfg, world["paraphrase"])
    _pod_merge(plans["merge"], cfg)
    _pod_rl(plans["rl"], cfg, world["rl"])
    _pod_eval(plans["eval"], cfg)
    return [plans[s] for s in STAGES]


# ---- output ------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / GiB:.1f}" if n >= 0.05 * GiB else f"{n / GiB:.2f}"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_plan(
    plans: list[StagePlan], prices: PriceTable | None = None, fingerprints: dict[str, str] | None = None
) -> str:
    """The table `cyclej plan` prints; with `fingerprints` (the pipeline plan's, cyclej.pipeline.registry),
    each stage's fingerprint beside its name."""
    prices = prices or load_prices()
    rows: list[tuple[str, ...]] = [
        (
            "stage",
            "model",
            "params",
            "trainable",
            "GiB/GPU",
            "GPU",
            "$/hour",
            "RAM GiB",
            "vCPU",
            "disk GiB",
            "ckpt GiB",
        )
    ]
    for p in plans:
        if p.device == "cpu":
            gpu, cost = "CPU (no GPU)", "-"
        elif p.gpu is None:
            gpu, cost = "none fits (see below)", "-"
        else:
            gpu, cost = f"{p.gpu_count}× {p.gpu.id}", f"{p.hourly_usd:.2f}"
        rows.append(
            (
                p.stage,
                p.model or "-",
                _count(p.params) if p.params else "-",
                _count(p.trainable_params) if p.trainable_params else "-",
                _gib(p.total_bytes) if p.memory else "-",
                gpu,
                cost,
                str(_gib_up(p.host_bytes)) if p.host else "-",
                str(p.vcpus) if p.vcpus else "-",
                str(_gib_up(p.disk_bytes)) if p.disk else "-",
                _gib(p.checkpoint_bytes) if p.checkpoint_bytes else "-",
            )
        )
    if fingerprints is not None:
        rows = [(rows[0][0], "fingerprint", *rows[0][1:])] + [
            (r[0], fingerprints[r[0]], *r[1:]) for r in rows[1:]
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for p in plans:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in p.memory.items())
        lines.append(f"{p.stage}: " + "; ".join(filter(None, [parts and f"GiB: {parts}", *p.notes])))
        for what, part in (("RAM", p.host), ("disk", p.disk)):
            if part:
                lines.append(f"    {what} GiB: " + ", ".join(f"{k} {_gib(v)}" for k, v in part.items()))
        for a in p.alternatives:
            where = f"{a.gpu_count}× {a.gpu.id} at ${a.hourly_usd:.2f}/h" if a.gpu else "no card fits"
            extra = f" ({a.note})" if a.note else ""
            lines.append(f"    option: {a.name}: {_gib(a.need_bytes)} GiB per GPU → {where}{extra}")
        pod = p.smallest_pod
        if pod is not None and pod.gpu is not None and (pod.gpu_count, pod.gpu) != (p.gpu_count, p.gpu):
            # Only where it is not the pod planned above (a LoRA stage on one GPU is its own smallest pod).
            what = "smallest pod without optimizer offload" if p.stage == "rl" else "smallest pod"
            lines.append(
                f"    {what}: {pod.gpu_count}× {pod.gpu.id} at ${pod.hourly_usd:.2f}/h, "
                f"{_gib(pod.need_bytes)} GiB per GPU ({pod.note}): set {pod.name}"
            )
    total = sum(p.hourly_usd or 0.0 for p in plans)
    lines.append("")
    lines.append(
        f"all GPU stages one after another: ${total:.2f} per hour of each; prices {prices.date}, "
        f"{prices.source}"
    )
    lines.append(
        f"RAM, vCPU and disk: what each stage's pod asks for (`job_variables`, GiB rounded up); disk "
        f"counts the image, no network volume; checkpoints at {UPLOAD_BYTES_PER_S / 1e6:.0f} MB/s upload, "
        f"≤ {CHECKPOINT_BUDGET:.0%} of a stage's time (cyclej/pipeline/sizing.py)"
    )
    return "\n".join(lines)
