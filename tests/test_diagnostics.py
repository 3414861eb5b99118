"""Training signal: the update size the optimizers report, the plots/tables of a metrics log, and the
warning `cyclej validate` prints when a stage's lr / eps / clipping cannot move the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cyclej.training.diagnostics import (
    TRAINING_PLOT,
    half_spacing,
    relative_update,
    signal_table,
    write_training_plot,
)
from cyclej.training.optim import MasterAdamW

ROOT = Path(__file__).resolve().parents[1]


def test_master_adamw_reports_the_relative_update_of_its_masters() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32) * 0.02), torch.nn.Parameter(torch.randn(32) * 0.02)]
    opt = MasterAdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    measured = relative_update(before, params)
    assert opt.relative_update == pytest.approx(measured, rel=1e-4)
    # First Adam step: every weight moves by ~lr, so ‖Δθ‖/‖θ‖ ≈ lr·√N / ‖θ‖.
    n = sum(p.numel() for p in params)
    norm = float(torch.linalg.vector_norm(torch.cat([b.flatten() for b in before])))
    assert measured == pytest.approx(1e-3 * n**0.5 / norm, rel=0.01)
    # A gradient clipped so small that per-weight |g| (~1e-7/√N ≈ 2e-9) << eps 1e-6: the step is ~lr·|g|/eps.
    opt_card = MasterAdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    grads = [torch.randn_like(p) for p in params]
    scale = 1e-7 / float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    for p, g in zip(params, grads, strict=True):
        p.grad = g * scale
    opt_card.step()
    assert opt_card.relative_update < measured / 100


def test_half_spacing() -> None:
    assert half_spacing(0.02, "bf16") == pytest.approx(2.0**-13 / 2)
    assert half_spacing(0.02, "fp32") == pytest.approx(2.0**-29 / 2)
    w = torch.tensor(0.02, dtype=torch.bfloat16)
    assert float(w + half_spacing(0.02, "bf16") * 0.9) == float(w)  # rounded away


def test_signal_table_and_plot(tmp_path: Path) -> None:
    records = [{"event": "eval", "step": 0, "dev_loss": 3.0}] + [
        {
            "step": s,
            "loss": 3.0 - 0.01 * s,
            "update_size": 1e-3 / s,
            "reward/total/mean": 0.1 * s,
            "reward/total/std": 0.2,
            "kl": 0.001 * s,
            "style/target_share": s / 300,
            "seconds/step": 1.0,
        }
        for s in range(1, 251)
    ]
    rows = signal_table(records, max_rows=100)
    assert len(rows) <= 101 and rows[0]["step"] == 1 and rows[-1]["step"] == 250
    assert set(rows[0]) == {"step", "loss", "update_size", "kl", "style/target_share", "reward/total/mean"}
    path = write_training_plot(records, tmp_path / TRAINING_PLOT, "rl")
    assert path is not None and path.stat().st_size > 10_000
    assert write_training_plot([{"event": "resume"}], tmp_path / "none.png", "x") is None


def _validate(preset: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cyclej.cli",
            "validate",
            "--preset",
            preset,
            "--storage",
            str(tmp_path / preset),
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_validate_refuses_the_cards_rl_update_size_unless_allowed(tmp_path: Path) -> None:
    """The card's RL settings cannot move GPT-J: validate says why and exits 2 (a run of hours that changes
    nothing is not what anyone means); --allow-warnings accepts them with the same warning."""
    refused = _validate("gptj", tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "cyclej: error: rl: the settings cannot change the model (warning above); "
        "fix them or pass --allow-warnings"
    )
    proc = _validate("gptj", tmp_path, "--allow-warnings")
    print(proc.stderr)
    assert proc.returncode == 0, proc.stderr
    for out in (refused, proc):
        rl = [line for line in out.stderr.splitlines() if line.startswith("warning: rl:")]
        assert len(rl) == 1
        for needle in (
            "lr 1e-05",
            "eps 1e-06",
            "max_grad_norm 0.0001",
            "6,053,381,344",
            "1.3e-08",
            "500 steps move a weight by at most 6.4e-06",
            "bf16 weights the forward uses never change",
        ):
            assert needle in rl[0], needle
        assert "warning: para_train" not in out.stderr and "warning: domain_train" not in out.stderr
        assert out.stdout.startswith("ok: gptj")


@pytest.mark.parametrize("preset", ["tiny", "demo", "yelp"])
def test_validate_small_presets_print_no_update_size_warning(preset: str, tmp_path: Path) -> None:
    proc = _validate(preset, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" not in proc.stderr
