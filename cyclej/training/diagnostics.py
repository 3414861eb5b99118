"""Is training moving the model? The update size per step, a check of the optimizer settings before a run,
and the plots of a stage's metrics.jsonl.

- `relative_update(before, after)`: ‖Δθ‖/‖θ‖ over a set of tensors (the trainer logs it per step for its
  trainable parameters; RL reads it from its MasterAdamW, measured on the fp32 masters).
- `update_size_warnings(cfg)`: what the configured lr / eps / max_grad_norm imply per weight. AdamW moves a
  weight by about lr · |g| / (|g| + eps) per step once its moments settle. With the gradient clipped to a
  norm g_max and spread over N trainable weights, |g| ≈ g_max / √N, so with eps ≫ |g| the step is
  ≈ lr · g_max / (√N · eps). A step below half the spacing of the weight's dtype at a typical weight
  (|w| ≈ 0.02) is rounded away; `steps` such steps that add up to less than 0.1 % of |w| cannot change
  what the model does. `cyclej validate` prints these warnings (stderr) and exits 2 unless --allow-warnings.
- `write_training_plot(records, path, title)`: loss, update size and (RL) rewards, KL and style share
  against the step, from a stage's metrics.jsonl records.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cyclej.config import PipelineConfig

TYPICAL_WEIGHT = 0.02  # |w| of a typical weight of a trained transformer (init std of GPT-J, Llama, BERT)
MIN_RELATIVE_CHANGE = 1e-3  # a run whose steps add up to less than this share of |w| changes nothing
SIGNIFICAND_BITS = {"fp32": 23, "bf16": 7}
TRAINING_PLOT = "training_signal.png"


def relative_update(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """‖after − before‖ / ‖before‖ over all tensors together (0 when `before` is all zeros)."""
    if not before:
        return 0.0
    deltas = torch._foreach_sub([a.detach().float() for a in after], [b.detach().float() for b in before])
    update = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(deltas)))
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([b.detach().float() for b in before])))
    return float(update / norm) if float(norm) > 0 else 0.0


def half_spacing(value: float, dtype: str) -> float:
    """Half the distance between neighbouring representable numbers of `dtype` at `value`: smaller
    updates of a weight of that size round back to it."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - SIGNIFICAND_BITS[dtype]) / 2


@dataclass(frozen=True)
class StepEstimate:
    stage: str
    params: int  # trainable weights N
    lr: float
    eps: float
    max_grad_norm: float
    steps: int
    dtype: str  # where the updates accumulate: the trainable weights' or the fp32 masters' dtype
    compute_dtype: str  # what the forward uses

    @property
    def grad_per_weight(self) -> float:
        return self.max_grad_norm / math.sqrt(self.params)

    @property
    def step_per_weight(self) -> float:
        g = self.grad_per_weight
        return self.lr * g / (g + self.eps)

    @property
    def total_change(self) -> float:
        """Every step in the same direction: an upper bound on how far a weight can move in the run."""
        return self.steps * self.step_per_weight

    def warnings(self) -> list[str]:
        s, g = self.step_per_weight, self.grad_per_weight
        head = (
            f"{self.stage}: lr {self.lr:g}, eps {self.eps:g}, max_grad_norm {self.max_grad_norm:g} over "
            f"{self.params:,} trainable weights: per-weight |g| <= {g:.2g}"
            + (f" (<< eps, so AdamW steps ~ lr*|g|/eps = {s:.2g})" if g < self.eps else f", steps ~ {s:.2g}")
        )
        reasons = []
        resolution = half_spacing(TYPICAL_WEIGHT, self.dtype)
        if s < resolution:
            reasons.append(
                f"below half a {self.dtype} step at |w| = {TYPICAL_WEIGHT} ({resolution:.2g}), every "
                "update is rounded away"
            )
        if self.total_change < MIN_RELATIVE_CHANGE * TYPICAL_WEIGHT:
            reasons.append(
                f"{self.steps} steps move a weight by at most {self.total_change:.2g} = "
                f"{self.total_change / TYPICAL_WEIGHT:.2g} of |w| = {TYPICAL_WEIGHT}: the model cannot "
                "change (raise max_grad_norm or lr, or lower eps)"
            )
        compute_resolution = half_spacing(TYPICAL_WEIGHT, self.compute_dtype)
        if self.compute_dtype != self.dtype and self.total_change < compute_resolution:
            reasons.append(
                f"that is below half a {self.compute_dtype} step at |w| = {TYPICAL_WEIGHT} "
                f"({compute_resolution:.2g}): the {self.compute_dtype} weights the forward uses never change"
            )
        return [f"{head}; " + "; ".join(reasons)] if reasons else []


def step_estimates(cfg: PipelineConfig) -> list[StepEstimate]:
    """One estimate per training stage whose model size is known without downloading anything."""
    from cyclej.errors import BadInput
    from cyclej.models.shape import model_shape

    try:
        shape = model_shape(cfg.models.base)
    except (BadInput, OSError, ValueError):
        return []
    out = []
    for stage in ("context", "para_train", "domain_train"):
        t = getattr(cfg, stage)
        if not getattr(t, "enabled", True):
            continue
        params = shape.lora_params(t.lora.rank) if t.lora is not None else shape.params
        # LoRA adapters train in fp32; a full fine-tune updates the weights in the precision it runs in.
        dtype = "bf16" if t.lora is None and t.precision == "bf16" else "fp32"
        out.append(StepEstimate(stage, params, t.lr, t.eps, t.max_grad_norm, t.max_steps, dtype, dtype))
    r = cfg.rl
    # RL updates fp32 masters (cyclej.training.optim.MasterAdamW);
    # the forward runs on bf16 weights with precision bf16.
    compute = "bf16" if r.precision == "bf16" else "fp32"
    out.append(StepEstimate("rl", shape.params, r.lr, r.eps, r.max_grad_norm, r.steps, "fp32", compute))
    return out


def update_size_warnings(cfg: PipelineConfig) -> list[str]:
    return [w for e in step_estimates(cfg) for w in e.warnings()]


# ---- plots ---------------------------------------------------------------------------------------------
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "dev_loss", "pg_loss")),
    ("relative update ‖Δθ‖/‖θ‖", ("update_size",)),
    ("reward (mean)", ()),  # every reward/<name>/mean column
    # kl: to the start model (the frozen reference, loaded when rl.kl_coef > 0); without it, the policy's
    # mean log-prob of its own samples, a drift indicator, not a KL.
    ("KL to the start model / sampled-token log-prob", ("kl", "sampled_logprob/mean")),
    (
        "share of rollouts in the target style",
        ("style/target_share", "style/target_share/to_a", "style/target_share/to_b"),
    ),
)


def training_curves(
    records: Sequence[dict[str, Any]],
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Panel title → {column: (steps, values)} for the columns present in per-step records."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for rec in records:
        if "step" not in rec or rec.get("event") not in (None, "train"):
            continue
        for title, keys in PANELS:
            cols = keys or tuple(k for k in rec if k.startswith("reward/") and k.endswith("/mean"))
            for key in cols:
                val = rec.get(key)
                if isinstance(val, int | float) and not isinstance(val, bool) and math.isfinite(val):
                    xs, ys = panels.setdefault(title, {}).setdefault(key, ([], []))
                    xs.append(float(rec["step"]))
                    ys.append(float(val))
    return panels


def write_training_plot(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """One figure, one panel per kind of curve present; None when the records hold no per-step values."""
    panels = training_curves(records)
    if not panels:
        return None
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False, sharex=True)
    for ax, (name, curves) in zip(axes[:, 0], panels.items(), strict=True):
        for key, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
        if name.startswith("relative update") and all(y > 0 for _, ys in curves.values() for y in ys):
            ax.set_yscale("log")
        ax.set_ylabel(name, fontsize=8)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- for the UI ----------------------------------------------------------------------------------------
SIGNAL_COLUMNS = (
    "step",
    "loss",
    "dev_loss",
    "update_size",
    "grad_norm",
    "kl",
    "sampled_logprob/mean",
    "style/target_share",
)


def signal_table(records: Sequence[dict[str, Any]], max_rows: int = 100) -> list[dict[str, Any]]:
    """Per-step rows (step, loss, update size, rewards, KL, style share), evenly thinned to `max_rows`
    (the last step always kept): the stage's training signal as a table."""
    rows = []
    for rec in records:
        if "step" not in rec or rec.get("event") not in (None, "train"):
            continue
        keys = [*SIGNAL_COLUMNS, *sorted(k for k in rec if k.startswith("reward/") and k.endswith("/mean"))]
        rows.append({k: rec[k] for k in keys if k in rec})
    if len(rows) > max_rows:
        stride = math.ceil(len(rows) / max_rows)
        rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    return rows


def plot_markdown(png: bytes, title: str) -> str:
    """A markdown image of a PNG, inline (the UI cannot read the artifact store)."""
    import base64

    return f"### {title}\n\n![{title}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})\n"
