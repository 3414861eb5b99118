"""The trainer: one plain PyTorch loop shared by the `context`, `para_train` and `domain_train` stages.

Read it top to bottom like nanoGPT's train.py:

1. make the model trainable: LoRA on every attention and MLP projection (peft, "all-linear") plus the
   marker tokens' embedding rows (`MarkerRows`), or every weight when `cfg.lora` is None;
2. turn the examples into training sequences: packed into `seq_len` blocks (formats.pack/collate) or,
   without packing, truncated and padded per micro-batch;
3. resume from the newest complete checkpoint in the store, if there is one;
4. for each optimizer step: the step's sequences come from a seeded permutation per epoch (so the data
   position is just the step index), split into micro-batches whose summed token losses are divided by
   the number of target tokens of the whole step (the micro-batch size does not change the math);
   a CUDA out-of-memory error (cyclej.training.oom: torch's, or cuBLAS's allocation failure) halves the
   micro-batch and retries the step from the state it started with, after the failed attempt's
   tensors are freed; clip, AdamW, warm-up + cosine LR; log a JSONL line; checkpoint every N steps / M
   minutes. With `gradient_checkpointing` each layer's activations are recomputed in the backward pass
   (HF's non-reentrant checkpointing; the loss and gradient are the same, memory is one layer's).

On N ranks (a stage with `resources.gpus` > 1, launched by cyclej.runtime.distributed): data parallel. Every
rank holds the whole base and the same adapter; the step's rows are split by rank (rank r takes rows r, r+N,
…), each rank accumulates its share's gradient of the same step-normalised loss over its micro-batches, and
one all-reduce sums the trainable gradients (a few MB for LoRA) together with an out-of-memory flag, so every
rank clips and steps on the same gradient and the weights stay equal without being sent. Why not DDP's
reducer: it all-reduces inside backward, so a rank that runs out of memory mid-backward would leave the others
blocked in a bucket's all-reduce; here nobody communicates until every rank has finished or failed its share,
then all of them halve the micro-batch together. Rank 0 alone logs and writes checkpoints, which hold every
rank's RNG state.

Exactness: everything that decides the next update (trainable weights, AdamW moments, the scheduler,
the python/numpy/torch RNGs, the step and the micro-batch) is in the checkpoint, and nothing else draws
random numbers, so on CPU a run resumed at any step ends bit-identical to one that never stopped.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

from cyclej.config import TrainConfig
from cyclej.corpora import formats
from cyclej.errors import BadInput, StageFailed
from cyclej.runtime.distributed import any_rank, gather_objects, is_main, rank, sum_tensors, world_size
from cyclej.runtime.faults import maybe_fault
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import StageCheckpoints
from cyclej.training.diagnostics import relative_update
from cyclej.training.oom import OutOfMemory, map_halving, oom_message, release_memory
from cyclej.training.precision import autocast
from cyclej.training.schedule import (
    CHECKPOINT_PREFIX,
    CheckpointClock,
    checkpoint_name,
    lr_scheduler,
    rng_state,
    seed_all,
    set_rng_state,
    warmup_steps,
)

log = logging.getLogger("cyclej")

IGNORE_INDEX = formats.IGNORE_INDEX
MARKER_ROWS_FILE = "marker_rows.safetensors"
ADAPTER_BASE = "base.json"  # in an adapter artifact: the `context` artifact it applies to


class TokenExample(Protocol):
    """What the trainer reads from a `formats.Example` (and from a packed sequence)."""

    # Read-only (properties), so that a frozen `formats.Example` matches.
    @property
    def input_ids(self) -> list[int]: ...
    @property
    def labels(self) -> list[int]: ...


# ---- marker rows --------------------------------------------------------------------------------------


class MarkerRows(nn.Module):
    """Trainable copies of the marker tokens' rows of the input embedding (and of an untied lm_head),
    spliced into the frozen matrices' outputs by forward hooks.

    Not peft's `trainable_token_indices`: on an untied lm_head it computes `F.linear` without the bias
    (GPT-J's lm_head has one) and it copies the whole embedding matrix at every forward; here only the
    marker positions / logit columns are touched. With tied embeddings (Llama, SmolLM2) the one set of
    rows serves both sides, as the tied matrix does.
    """

    # Buffers (register_buffer below); declared so that they read as tensors, not `Tensor | Module`.
    token_ids: Tensor
    slot: Tensor

    def __init__(self, model: nn.Module, token_ids: Sequence[int]) -> None:
        super().__init__()
        lm = cast("PreTrainedModel", model)
        embed = cast(nn.Embedding, lm.get_input_embeddings())
        head: nn.Linear | None = lm.get_output_embeddings()
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=embed.weight.device)
        self.register_buffer("token_ids", ids, persistent=False)
        # slot[token] = index of that token's row here, or -1: one gather finds the marker positions.
        slot = torch.full((embed.weight.shape[0],), -1, dtype=torch.long, device=ids.device)
        slot[ids] = torch.arange(len(ids), device=ids.device)
        self.register_buffer("slot", slot, persistent=False)
        # fp32 master copies whatever the model's dtype (like peft's adapter weights).
        self.input_rows = nn.Parameter(embed.weight.detach()[ids].clone().float())
        self.tied = head is None or head.weight is embed.weight
        # Untied means there is a head (`tied` is true when there is none).
        self.output_rows = (
            None if self.tied else nn.Parameter(cast(nn.Linear, head).weight.detach()[ids].clone().float())
        )
        self._embed, self._head = embed, head
        self._handles = [embed.register_forward_hook(self._embed_hook)]
        if head is not None:
            self._handles.append(head.register_forward_hook(self._head_hook))

    def _embed_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        slot = self.slot[args[0]]
        # F.embedding, not `input_rows[slot]`: the gradient of an index gather is an accumulating
        # index_put, which PyTorch runs on CPU threads with atomic float adds once it has ≥ 32768
        # elements (a 4×128-token micro-batch at width 64), so many positions adding into the same two
        # rows summed in a different order each run (domain_train's marker rows differed by ~1e-11
        # between two identical runs, and a resumed pipeline never matched). Embedding's backward sums
        # in index order. Forward values are the same copy either way.
        rows = F.embedding(slot.clamp(min=0), self.input_rows.to(output.dtype))
        return torch.where((slot >= 0).unsqueeze(-1), rows, output)

    def _head_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        hidden = args[0]
        rows = self.input_rows if self.output_rows is None else self.output_rows
        bias = (
            cast(Tensor, module.bias)[self.token_ids] if getattr(module, "bias", None) is not None else None
        )
        marker_logits = F.linear(
            hidden, rows.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
        )
        return output.index_copy(output.dim() - 1, self.token_ids, marker_logits.to(output.dtype))

    def state(self) -> dict[str, Tensor]:
        """The tensors of `marker_rows.safetensors` (interfaces: token_ids, input/output_embeddings)."""
        out = {"token_ids": self.token_ids.detach().cpu(), "input_embeddings": self.input_rows.detach().cpu()}
        if self.output_rows is not None:
            out["output_embeddings"] = self.output_rows.detach().cpu()
        return {k: v.contiguous() for k, v in out.items()}

    @torch.no_grad()
    def write_into_weights(self) -> None:
        """Copy the trained rows into the model's matrices and remove the hooks (for merging/saving)."""
        self._embed.weight[self.token_ids] = self.input_rows.to(self._embed.weight.dtype)
        if self.output_rows is not None:
            assert self._head is not None  # untied rows exist only with a head
            self._head.weight[self.token_ids] = self.output_rows.to(self._head.weight.dtype)
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def save_marker_rows(rows: MarkerRows, path: Path) -> None:
    save_file(rows.state(), str(path))


# ---- result ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """The trained model (peft-wrapped with LoRA; marker rows live in `marker_rows` until merged)."""

    model: nn.Module
    marker_rows: MarkerRows | None
    trainable_state: dict[str, Tensor]
    metrics: dict[str, Any]

    def save_adapter(self, out_dir: Path) -> None:
        """`adapter/` (peft save_pretrained) and `marker_rows.safetensors` into `out_dir` (interfaces).
        Without trained marker rows (lora.train_marker_rows false) there is no rows file: the merge then
        leaves the rows as they are in the base."""
        if not hasattr(self.model, "peft_config"):
            raise ValueError("save_adapter needs a LoRA run (cfg.lora set)")
        # The vocabulary is the base's (markers were added by the context stage): no embedding copy.
        cast("PeftModel", self.model).save_pretrained(str(out_dir / "adapter"), save_embedding_layers=False)
        if self.marker_rows is not None:
            save_marker_rows(self.marker_rows, out_dir / MARKER_ROWS_FILE)

    def unwrapped_model(self) -> nn.Module:
        """The frozen base without the LoRA layers and the marker-row hooks (its weights as before
        training): what a later phase of the same stage trains again, from `trainable_state`. Replaces
        `model`; copy `trainable_state` first, its tensors are the removed layers'."""
        if self.marker_rows is not None:
            self.marker_rows.remove_hooks()
        if hasattr(self.model, "peft_config"):
            self.model = cast("PeftModel", self.model).unload()
        return self.model

    def merged_model(self) -> PreTrainedModel:
        """A plain transformers model: LoRA merged into the weights, marker rows written into the
        embedding matrices. The result of this call replaces `model` (peft wrapper removed).

        The result is fp32 even when the base was trained in bf16: LoRA deltas (~1e-4) merged into bf16
        weights (~0.02, spacing ~1.2e-4) would lose about a third of their entries to rounding."""
        if any(p.dtype != torch.float32 for p in self.model.parameters()):
            self.model.float()  # the frozen base widened in place; the merge below then sums in fp32
        model = (
            cast("PeftModel", self.model).merge_and_unload()
            if hasattr(self.model, "peft_config")
            else self.model
        )
        if self.marker_rows is not None:
            self.marker_rows.write_into_weights()
        for p in model.parameters():
            p.requires_grad_(False)
        return cast("PreTrainedModel", model)


def _copy_trainable(named: Mapping[str, Tensor], saved: Mapping[str, Tensor]) -> None:
    """Saved trainable tensors into the live ones, by name; a name missing on either side is an error (a
    checkpoint of another LoRA config)."""
    if set(named) != set(saved):
        missing, extra = sorted(set(named) - set(saved)), sorted(set(saved) - set(named))
        raise ValueError(f"trainable tensors do not match: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, param in named.items():
            param.copy_(saved[key])


# ---- the data order --------------------------------------------------------------------


def trainer_warmup_steps(cfg: TrainConfig) -> int:
    """The trainer's warm-up: `warmup_ratio` of `max_steps`, rounded to nearest
    (cyclej.training.schedule says why RL rounds up)."""
    return warmup_steps(cfg.warmup_ratio, cfg.max_steps, "round")


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Indices of the sequences of optimizer step `step` (0-based): positions step·B … step·B+B−1 of
    the concatenation of one seeded permutation per epoch. No loader state beyond the step index."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(int(_epoch_permutation(seed, epoch, n)[i]))
    return out


# ---- batches and the loss -------------------------------------------------------------------------------


def count_targets(seq: Any) -> int:
    """Tokens the loss is taken on in one row (formats puts IGNORE_INDEX on each example's first token)."""
    return sum(1 for label in seq.labels if label != IGNORE_INDEX)


def prepare_sequences(examples: Sequence[TokenExample], seq_len: int, packing: bool, seed: int) -> list[Any]:
    """Training rows: examples shuffled once with the seed (so a packed row mixes both domains) and
    packed into rows of at most `seq_len` tokens, or one example per row cut to `seq_len`."""
    if packing:
        order = list(examples)
        random.Random(seed).shuffle(order)
        # The examples are `formats.Example`s (TokenExample is the trainer's read-only view of them).
        rows: list[Any] = formats.pack(cast("list[formats.Example]", order), seq_len)
    else:
        rows = [formats.single(cast(formats.Example, e), seq_len) for e in examples if len(e.input_ids)]
    return [r for r in rows if count_targets(r) > 0]


def _inner(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (or the model itself)."""
    inner = cast("PeftModel", model).get_base_model() if hasattr(model, "peft_config") else model
    return cast("PreTrainedModel", inner)


def _backbone(model: nn.Module) -> nn.Module:
    """The transformer body (GPTJModel, LlamaModel, …)."""
    return _inner(model).base_model


def target_loss_sum(
    model: nn.Module, batch: dict[str, Tensor], head_on_targets_only: bool = True
) -> tuple[Tensor, int]:
    """Summed cross-entropy over target tokens, and their count.

    With `head_on_targets_only` the LM head runs only on the positions that have a target: prompts and
    padding never get vocabulary-sized logits (most of the memory and time of the head on short targets).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    if head_on_targets_only:
        hidden = _backbone(model)(**inputs, use_cache=False).last_hidden_state
        logits = _inner(model).get_output_embeddings()(hidden[:, :-1][selected])
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][selected]
    return F.cross_entropy(logits.float(), targets[selected], reduction="sum"), int(selected.sum())


@torch.no_grad()
def logits_are_head_of_backbone(model: nn.Module, batch: dict[str, Tensor]) -> bool:
    """Whether the model's logits are exactly lm_head(body(x)) (GPT-J, Llama, …), so the head may run on
    target positions only; families that scale or soft-cap logits after the head are caught here and
    trained through their own forward instead."""
    was_training = model.training
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    full = model(**inputs, use_cache=False).logits.float()
    hidden = _backbone(model)(**inputs, use_cache=False).last_hidden_state
    ours = _inner(model).get_output_embeddings()(hidden).float()
    model.train(was_training)
    return bool(torch.allclose(full, ours, rtol=0.0, atol=1e-3 * (1.0 + float(full.abs().max()))))


# ---- checkpoint state --------------------------------------------------------------------------------------


@dataclass
class _LoopState:
    """What the loop carries between steps besides weights and optimizer (state.json)."""

    step: int = 0
    micro_batch_size: int = 1
    tokens_seen: int = 0
    train_seconds: float = 0.0
    last_loss: float | None = None
    dev_loss_before: float | None = None
    dev_loss_last: float | None = None
    oom_events: int = 0
    resumed_from: list[str] = field(default_factory=list)


class _Trainer:
    """The loop's state in one place; `run()` is the whole algorithm."""

    def __init__(
        self,
        model: nn.Module,
        examples: Sequence[TokenExample],
        dev_examples: Sequence[TokenExample],
        cfg: TrainConfig,
        checkpoints: StageCheckpoints,
        marker_token_ids: Sequence[int],
        progress: Progress,
        metrics_path: Path | None,
        pad_token_id: int,
        checkpoint_prefix: str = "",
        initial_trainable: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.cfg, self.checkpoints, self.stage = cfg, checkpoints, checkpoints.stage
        self.checkpoint_prefix = checkpoint_prefix
        # CYCLEJ_FAULT's point: the stage, or `para_train-bt` for a phase named by its checkpoint prefix.
        phase = checkpoint_prefix.rstrip("-")
        self.fault_point = f"{self.stage}-{phase}" if phase else self.stage
        self.progress, self.metrics_path, self.pad_token_id = progress, metrics_path, pad_token_id
        self.device = next(model.parameters()).device
        # Asked of the plain model (a real forward check), before peft wraps it.
        self.packing = cfg.packing and formats.supports_packing(model)
        self.mask_dtype = next(model.parameters()).dtype
        # Every RNG the loop saves in its checkpoints starts from the seed, not from whatever the process
        # did before (another stage, a resumed one): a stage's trajectory must not depend on its neighbours.
        seed_all(cfg.seed)
        self.model, self.marker_rows = _make_trainable(model, cfg, marker_token_ids)
        self.world, self.rank = world_size(), rank()
        if self.rank > 0:  # its own dropout stream (LoRA's init above is every rank's, from the seed)
            torch.manual_seed(cfg.seed + 7919 * self.rank)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, self.stage)
        self.named_trainable = _trainable_parameters(self.model, self.marker_rows)
        if initial_trainable is not None:  # a later phase goes on from an earlier one's tensors
            _copy_trainable(self.named_trainable, initial_trainable)
        self.params = list(self.named_trainable.values())
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        self.scheduler = lr_scheduler(self.optimizer, cfg.max_steps, trainer_warmup_steps(cfg))
        self.sequences = prepare_sequences(examples, cfg.seq_len, self.packing, cfg.seed)
        if not self.sequences:
            raise StageFailed(
                self.stage, "no training example has a target token (empty or all-prompt examples)"
            )
        # A fixed dev slice, independent of OOM changes to the micro-batch.
        n_dev = cfg.eval_batches * cfg.micro_batch_size
        self.dev_sequences = prepare_sequences(dev_examples, cfg.seq_len, self.packing, cfg.seed)[:n_dev]
        self.head_on_targets_only = logits_are_head_of_backbone(self.model, self._batch(self.sequences[:1]))
        self.state = _LoopState(micro_batch_size=cfg.micro_batch_size)
        self.last_checkpoint: str | None = None
        self.updating = False  # inside the optimizer update: an OOM there may have touched the weights

    # ---- logging ----
    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics_path is not None and is_main():
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # ---- checkpoints ----
    def save_checkpoint(self) -> None:
        name = self.checkpoint_prefix + checkpoint_name(self.state.step)
        # Every rank's RNG (its dropout stream) so that a resume on N ranks goes on as if never stopped;
        # one rank alone keeps the single-process format.
        rng = rng_state() if self.world == 1 else {"ranks": gather_objects(rng_state())}
        self.last_checkpoint = name
        if not is_main():
            return
        d = self.checkpoints.workdir(name)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.named_trainable.items()},
            str(d / "trainable.safetensors"),
        )
        torch.save(self.optimizer.state_dict(), d / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), d / "scheduler.pt")
        torch.save(rng, d / "rng.pt")
        (d / "state.json").write_text(json.dumps(self.state.__dict__))
        if self.metrics_path is not None and self.metrics_path.is_file():
            shutil.copyfile(self.metrics_path, d / "metrics.jsonl")
        self.checkpoints.save(name, d, keep=self.cfg.keep_checkpoints)
        self.last_checkpoint = name

    def resume(self) -> None:
        found = self.checkpoints.latest(prefix=self.checkpoint_prefix + CHECKPOINT_PREFIX)
        if found is None:
            # A fresh start: lines of a run that died before its first checkpoint are not ours.
            if self.metrics_path is not None and is_main():
                self.metrics_path.unlink(missing_ok=True)
            return
        name, d = found
        _copy_trainable(self.named_trainable, load_file(str(d / "trainable.safetensors")))
        self.optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(torch.load(d / "scheduler.pt"))
        set_rng_state(self._own_rng(torch.load(d / "rng.pt"), name))
        self.state = _LoopState(**json.loads((d / "state.json").read_text()))
        if self.metrics_path is not None and is_main():
            if (d / "metrics.jsonl").is_file():
                shutil.copyfile(d / "metrics.jsonl", self.metrics_path)
            else:
                self.metrics_path.unlink(missing_ok=True)
        self.state.resumed_from.append(name)
        self.last_checkpoint = name
        log.info(
            "%s: resuming from checkpoint %s (step %d, micro-batch %d)",
            self.stage,
            name,
            self.state.step,
            self.state.micro_batch_size,
        )
        self._log(
            {
                "event": "resume",
                "step": self.state.step,
                "checkpoint": name,
                "micro_batch": self.state.micro_batch_size,
            }
        )

    def _own_rng(self, saved: dict[str, Any], checkpoint: str) -> dict[str, Any]:
        """This rank's RNG state from a checkpoint (written by one rank or by N)."""
        ranks = saved.get("ranks")
        if ranks is None:
            ranks = [saved]
        if len(ranks) != self.world:
            log.warning(
                "%s: checkpoint %s was written by %d rank(s), resumed on %d: the data order and the "
                "weights go on exactly, the dropout streams do not",
                self.stage,
                checkpoint,
                len(ranks),
                self.world,
            )
        return ranks[self.rank % len(ranks)]

    def _batch(self, rows: Sequence[Any]) -> dict[str, Tensor]:
        """Packed rows get formats' block-diagonal 4D mask; unpacked ones a 2D padding mask."""
        batch = formats.collate(
            rows, pad_id=self.pad_token_id, four_d_mask=self.packing, mask_dtype=self.mask_dtype
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- evaluation ----
    @torch.no_grad()
    def dev_loss(self) -> float | None:
        """Mean target-token loss on the dev slice. An OOM halves the eval batch for the rest of this pass
        (the sum does not depend on it; the training micro-batch stays as it is: eval keeps no graph)."""
        if not self.dev_sequences:
            return None

        def loss_of(chunk: Sequence[Any]) -> tuple[float, int]:
            with autocast(self.cfg.precision, self.device):
                loss_sum, n = target_loss_sum(self.model, self._batch(chunk), self.head_on_targets_only)
            return float(loss_sum), n

        self.model.eval()
        failure = None
        try:  # on N ranks each scores its share of the slice; the sums are added below
            parts = map_halving(
                loss_of,
                self.dev_sequences[self.rank :: self.world],
                self.state.micro_batch_size,
                point=f"{self.stage}-dev_loss",
                knob=f"{self.stage}.seq_len",
            )
        except OutOfMemory as exc:
            failure, parts = str(exc), []
        finally:
            self.model.train()
        if any_rank(failure is not None):
            raise StageFailed(
                self.stage, failure or "out of memory in the dev loss on another rank", self.last_checkpoint
            )
        total = torch.tensor([sum(t for t, _ in parts), sum(n for _, n in parts)], dtype=torch.float64)
        loss_sum, n = (float(x) for x in sum_tensors([total], self.device)[0])
        return loss_sum / max(1.0, n)

    # ---- one optimizer step ----
    def train_step(self, batch_seqs: list[Any], step_no: int) -> dict[str, float]:
        """Forward/backward over micro-batches, then clip and update. Raises OutOfMemoryError with
        `self.updating` telling whether the weights may already have been touched."""
        targets = sum(count_targets(s) for s in batch_seqs)
        self.updating = False
        if self.world > 1:
            return self._train_step_of_rank(batch_seqs, step_no, targets)
        loss_total, tokens = self._accumulate(batch_seqs, targets)
        maybe_fault(self.fault_point, step_no)
        return self._update(loss_total, tokens, targets)

    def _accumulate(self, rows: Sequence[Any], targets: int) -> tuple[float, int]:
        """Forward/backward over `rows` in micro-batches; the summed loss and the tokens seen. Normalised
        by the step's target tokens: the gradient is the same for any micro-batch split (or rank split)."""
        loss_total, tokens = 0.0, 0
        for chunk in _chunks(rows, self.state.micro_batch_size):
            batch = self._batch(chunk)
            with autocast(self.cfg.precision, self.device):
                loss_sum, _ = target_loss_sum(self.model, batch, self.head_on_targets_only)
            (loss_sum / targets).backward()
            loss_total += float(loss_sum.detach())
            tokens += sum(len(row.input_ids) for row in chunk)
        return loss_total, tokens

    def _train_step_of_rank(self, batch_seqs: list[Any], step_no: int, targets: int) -> dict[str, float]:
        """`train_step` on one of N ranks: this rank's rows, then one all-reduce of the gradients, the
        loss, the token count and whether any rank ran out of memory (module docstring)."""
        loss_total, tokens, failure = 0.0, 0, None
        try:
            loss_total, tokens = self._accumulate(batch_seqs[self.rank :: self.world], targets)
            maybe_fault(self.fault_point, step_no)
        except Exception as exc:
            failure = oom_message(exc)
            if failure is None:
                raise  # anything but memory ends this rank; torchrun then stops the others
        # Outside the except: the failed micro-batch's tensors are gone before the all-reduce allocates.
        if failure is not None:
            release_memory()
        grads = [torch.zeros_like(p) if p.grad is None or failure else p.grad for p in self.params]
        extra = torch.tensor([loss_total, float(tokens), 1.0 if failure else 0.0], dtype=torch.float64)
        *summed, totals = sum_tensors([*grads, extra], self.device)
        if float(totals[2]) > 0:
            raise torch.OutOfMemoryError(failure or "CUDA out of memory on another rank (its log says which)")
        for p, g in zip(self.params, summed, strict=True):
            p.grad = g
        return self._update(float(totals[0]), int(totals[1]), targets)

    def _update(self, loss_total: float, tokens: int, targets: int) -> dict[str, float]:
        """Clip, step, schedule: the same on every rank, whose gradients are equal."""
        self.updating = True
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updating = False
        return {"loss": loss_total / targets, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens}

    def _snapshot(self) -> dict[str, Any]:
        """The state a step starts from, to retry it after an OOM in the update itself. Only for LoRA
        (a few MB); a full fine-tune would double its memory for it."""
        rng = rng_state()
        if self.marker_rows is None and not hasattr(self.model, "peft_config"):
            return {"rng": rng}
        return {
            "rng": rng,
            "params": [p.detach().clone() for p in self.params],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
        }

    def _restore(self, snap: dict[str, Any], step_no: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.updating:
            if "params" not in snap:
                raise StageFailed(
                    self.stage,
                    f"out of memory inside the optimizer update of step {step_no} (full fine-tuning keeps no "
                    "in-memory copy to retry from); rerun to resume, or lower the micro-batch/seq_len",
                    self.last_checkpoint,
                )
            with torch.no_grad():
                for p, saved in zip(self.params, snap["params"], strict=True):
                    p.copy_(saved)
            # A copy: load_state_dict keeps same-device tensors, and a second retry needs the snapshot intact.
            self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
            self.scheduler.load_state_dict(snap["scheduler"])
        set_rng_state(snap["rng"])

    def _halve_micro_batch(self, step_no: int, failure: str) -> None:
        old = self.state.micro_batch_size
        if old <= 1:
            checkpointing = (
                "" if self.cfg.gradient_checkpointing else f"set {self.stage}.gradient_checkpointing: true, "
            )
            raise StageFailed(
                self.stage,
                f"out of memory at micro-batch 1 (step {step_no}, seq_len {self.cfg.seq_len}, precision "
                f"{self.cfg.precision}: {failure}): {checkpointing}lower {self.stage}.seq_len, or set "
                f"{self.stage}.precision: bf16, or use a GPU with more memory",
                self.last_checkpoint,
            )
        self.state.micro_batch_size = old // 2
        self.state.oom_events += 1
        accumulation = math.ceil(self.cfg.batch_size / (self.state.micro_batch_size * self.world))
        who = f"{self.stage} (rank {self.rank} of {self.world})" if self.world > 1 else self.stage
        log.warning(
            "%s: out of memory at step %d (%s); micro-batch %d → %d, accumulation %d (effective batch %d)",
            who,
            step_no,
            failure,
            old,
            self.state.micro_batch_size,
            accumulation,
            self.cfg.batch_size,
        )
        self._log(
            {
                "event": "oom",
                "step": step_no,
                "micro_batch": self.state.micro_batch_size,
                "previous_micro_batch": old,
                "accumulation": accumulation,
                "effective_batch": self.cfg.batch_size,
            }
        )

    # ---- the loop ----
    def run(self) -> TrainResult:
        cfg = self.cfg
        self.resume()
        if self.state.step == 0 and not self.state.resumed_from:
            self.state.dev_loss_before = self.dev_loss()
            self.state.dev_loss_last = self.state.dev_loss_before
            self._log({"event": "eval", "step": 0, "dev_loss": self.state.dev_loss_before})
        self.model.train()
        clock = CheckpointClock(cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes)
        label = f"train ({self.checkpoint_prefix.rstrip('-')})" if self.checkpoint_prefix else "train"
        with self.progress.bar(label, total=cfg.max_steps, initial=self.state.step) as bar:
            while self.state.step < cfg.max_steps:
                step_no = self.state.step + 1
                batch_seqs = [
                    self.sequences[i]
                    for i in step_indices(self.state.step, cfg.batch_size, len(self.sequences), cfg.seed)
                ]
                snapshot = self._snapshot()
                started = time.perf_counter()
                while True:
                    failure = None
                    try:
                        stats = self.train_step(batch_seqs, step_no)
                        break
                    except Exception as exc:
                        failure = oom_message(exc)
                        if failure is None:
                            raise
                    # Out of the except block: the traceback (and the failed micro-batch's tensors) is gone.
                    release_memory()
                    self._restore(snapshot, step_no)
                    self._halve_micro_batch(step_no, failure)
                seconds = time.perf_counter() - started
                # ‖Δθ‖/‖θ‖ of the trainable tensors, against the pre-step copy a LoRA step keeps anyway (a
                # full fine-tune keeps none: copying every weight each step would double its memory).
                update_size = (
                    relative_update(snapshot["params"], self.params)
                    if snapshot is not None and "params" in snapshot
                    else None
                )
                self.state.step = step_no
                self.state.tokens_seen += int(stats["tokens"])
                self.state.train_seconds += seconds
                self.state.last_loss = stats["loss"]
                record = {
                    "event": "train",
                    "step": step_no,
                    "loss": stats["loss"],
                    "lr": stats["lr"],
                    "grad_norm": stats["grad_norm"],
                    "update_size": update_size,
                    "tokens": int(stats["tokens"]),
                    "tokens_per_s": stats["tokens"] / max(seconds, 1e-9),
                    "micro_batch": self.state.micro_batch_size,
                    "accumulation": math.ceil(cfg.batch_size / (self.state.micro_batch_size * self.world)),
                }
                if step_no % cfg.eval_every_steps == 0 or step_no == cfg.max_steps:
                    self.state.dev_loss_last = self.dev_loss()
                    record["dev_loss"] = self.state.dev_loss_last
                self._log(record)
                bar.update(1, loss=stats["loss"], lr=stats["lr"], mb=self.state.micro_batch_size)
                if clock.due(step_no) or step_no == cfg.max_steps:
                    self.save_checkpoint()
                    clock.saved()
        if cfg.gradient_checkpointing:  # the trained model goes on (merge, perplexity, saving) as a plain one
            disable_gradient_checkpointing(self.model)
        return TrainResult(
            model=self.model,
            marker_rows=self.marker_rows,
            # Views of the live tensors, not copies: a full fine-tune must not hold the model twice.
            trainable_state={k: v.detach() for k, v in self.named_trainable.items()},
            metrics=self.metrics(),
        )

    def metrics(self) -> dict[str, Any]:
        s = self.state
        return {
            "steps": s.step,
            "final_train_loss": s.last_loss,
            "dev_loss_before": s.dev_loss_before,
            "dev_loss_after": s.dev_loss_last,
            "tokens_seen": s.tokens_seen,
            "tokens_per_s": s.tokens_seen / s.train_seconds if s.train_seconds else None,
            "micro_batch_size": s.micro_batch_size,
            "effective_batch": self.cfg.batch_size,
            "oom_events": s.oom_events,
            "resumed_from": list(s.resumed_from),
            "world_size": self.world,
            "packing": self.packing,
            "head_on_targets_only": self.head_on_targets_only,
            "train_sequences": len(self.sequences),
            "trainable_parameters": sum(p.numel() for p in self.params),
        }


def enable_gradient_checkpointing(model: nn.Module, stage: str) -> None:
    """HF's checkpointing of every decoder layer (active in train mode only), non-reentrant: it needs no
    input that requires grad (peft's frozen embeddings give none; transformers adds the input hook
    anyway), keeps the RNG state for a recompute that draws the same dropout, and gives the same
    gradients as no checkpointing."""
    inner = _inner(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise BadInput(
            f"{stage}.gradient_checkpointing: {type(inner).__name__} does not support it; set it false"
        )
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo `enable_gradient_checkpointing`, the input hook transformers added with it included."""
    inner = _inner(model)
    inner.gradient_checkpointing_disable()
    inner.disable_input_require_grads()


def _make_trainable(
    model: nn.Module, cfg: TrainConfig, marker_token_ids: Sequence[int]
) -> tuple[nn.Module, MarkerRows | None]:
    """LoRA + marker rows, or every weight (full fine-tuning) when `cfg.lora` is None."""
    if cfg.lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    from peft import LoraConfig, get_peft_model

    # LoRA's A matrices are drawn from the torch RNG: seed it so every run starts from the same adapter.
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # peft annotates int; a float scale works
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    rows = MarkerRows(model, marker_token_ids) if cfg.lora.train_marker_rows and marker_token_ids else None
    return get_peft_model(model, lora), rows


def _trainable_parameters(model: nn.Module, rows: MarkerRows | None) -> dict[str, nn.Parameter]:
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if rows is not None:
        named["marker_rows.input_embeddings"] = rows.input_rows
        if rows.output_rows is not None:
            named["marker_rows.output_embeddings"] = rows.output_rows
    return named


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def train(
    model: nn.Module,
    *,
    train_examples: Sequence[TokenExample],
    tcfg: TrainConfig,
    checkpoints: StageCheckpoints,
    tokenizer: Any = None,
    dev_examples: Sequence[TokenExample] = (),
    marker_ids: Sequence[int] = (),
    progress: Progress | None = None,
    metrics_path: Path | None = None,
    checkpoint_prefix: str = "",
    initial_trainable: Mapping[str, Tensor] | None = None,
) -> TrainResult:
    """Train `model` (already on its device) on `train_examples` with the knobs of `tcfg`; resume from
    and checkpoint to `checkpoints` (a stage run's: `run.checkpoints`) as `step-NNNNNNNN`.

    `marker_ids`: the domain markers' token ids, whose embedding rows train with LoRA.
    `metrics_path`: the JSONL log (a "train" record per step; "eval", "resume" and "oom" events);
    default `metrics.jsonl` in the stage's work directory, so it is committed with the artifact.
    `checkpoint_prefix`, `initial_trainable`: a second training phase of one stage (para_train's
    back-translation) names its checkpoints `<prefix>step-…`, so it neither resumes from nor replaces the
    first phase's, and starts from the first phase's trainable tensors (`TrainResult.trainable_state`).
    Returns the trained model (peft-wrapped with LoRA: use `result.merged_model()` for a plain one or
    `result.save_adapter(dir)`), the final trainable tensors and summary metrics.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    if metrics_path is None:
        metrics_path = checkpoints.store.workdir(checkpoints.stage, checkpoints.fingerprint) / "metrics.jsonl"
    trainer = _Trainer(
        model,
        train_examples,
        dev_examples,
        tcfg,
        checkpoints,
        marker_ids,
        progress or Progress(checkpoints.stage, show_bar=False),
        metrics_path,
        int(pad),
        checkpoint_prefix,
        initial_trainable,
    )
    return trainer.run()
