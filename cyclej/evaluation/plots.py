"""The evaluation's plots: the overall metrics per system, and the RL reward curves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def write_plots(rows: list[dict[str, Any]], rl_log: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """metrics_by_stage.png (the overall table's `rows`) always; rl_rewards.png when an RL log with reward
    columns is given."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    shown = [
        ("style_acc", 1.0),
        ("similarity", 1.0),
        ("fluent", 1.0),
        ("runaway", 1.0),
        ("J", 1.0),
        ("self_bleu", 100.0),
        ("cycle_bleu", 100.0),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(shown))
    for k, row in enumerate(rows):
        vals = [(row.get(m) or 0.0) / scale for m, scale in shown]
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, label=row["system"])
    ax.set_xticks(x, [m if s == 1.0 else f"{m}/100" for m, s in shown])
    ax.set_ylim(0, 1.05)
    ax.set_title("Evaluation by stage (both directions pooled)")
    written.append(_save(fig, ax, out_dir / "metrics_by_stage.png"))

    curves = _reward_curves(rl_log)
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, (steps, values) in curves.items():
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        ax.set_xlabel("RL step")
        ax.set_ylabel("reward")
        ax.set_title("RL rewards")
        written.append(_save(fig, ax, out_dir / "rl_rewards.png"))
    return written


def _save(fig: Any, ax: Any, path: Path) -> Path:
    """Legend, tight layout, PNG at 100 dpi, figure closed (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _reward_curves(log: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Every numeric column whose name mentions 'reward', against 'step' (or the record index). When the
    log has per-reward means (`reward/<name>/mean`, as cyclej.reinforcement.policy_gradient writes),
    only those are drawn."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for i, rec in enumerate(log):
        step = rec.get("step", i + 1)
        for key, val in _flatten(rec).items():
            if "reward" in key and isinstance(val, int | float) and not isinstance(val, bool):
                xs, ys = curves.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(float(val))
    means = {k.removesuffix("/mean"): v for k, v in curves.items() if k.endswith("/mean")}
    return means or curves


def _flatten(rec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
