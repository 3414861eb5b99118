"""The RL trainer on 2 ranks (FSDP2, gloo, CPU) against one process: the same step, the gathered weights,
an out-of-memory error on one rank, and a resume. Each run is tests/helpers/dist_rl_script.py, launched
with torchrun (2 ranks) or plain python (world size 1: today's code path); the tests compare what the
runs wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "helpers" / "dist_rl_script.py"
# fp32 on CPU: the ranks' partial gradients are summed in another order than one process's micro-batches:
# weights agree to float rounding, ~1e-6 absolute, against per-step updates of ~1e-2.
ATOL, RTOL = 1e-5, 1e-5


def launch(out: Path, cache: Path, *args: str, ranks: int = 2) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPT), str(out), *args]
    if ranks > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "--max-restarts=0",
            *cmd[1:],
        ]
    env = {
        **os.environ,
        "CYCLEJ_DIST_TIMEOUT": "30",
        "CYCLEJ_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("CYCLEJ_FAULT", None)
    done = subprocess.run(cmd, cwd=REPO, env=env, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(ranks)]
    return {
        "ranks": reports,
        "weights": load_file(out / "policy" / "model.safetensors"),
        "dir": out,
        "log": done.stderr,
    }


def metrics(run: dict[str, Any], rank: int = 0) -> list[dict[str, Any]]:
    return run["ranks"][rank]["metrics"]


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.allclose(a[k], b[k], rtol=RTOL, atol=ATOL)]
    assert not bad, [(k, float((a[k] - b[k]).abs().max())) for k in bad[:5]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> dict[str, dict[str, Any]]:
    """Two steps of tiny GPT-J on one process and on 2 ranks (checkpointing after step 1); shared."""
    root = tmp_path_factory.mktemp("rl-fsdp")
    one = launch(root / "one", model_cache, ranks=1)
    two = launch(root / "two", model_cache, "--save-at", "1")
    return {"one": one, "two": two}


@pytest.mark.parametrize("model", ["tiny-gptj", pytest.param("tiny-llama", marks=pytest.mark.slow)])
def test_two_ranks_take_the_one_process_steps(
    model: str, runs: dict[str, dict[str, Any]], tmp_path: Path, model_cache: Path
) -> None:
    if model == "tiny-gptj":
        one, two = runs["one"], runs["two"]
    else:  # tied embeddings and head: one parameter under two names
        one = launch(tmp_path / "one", model_cache, "--model", model, ranks=1)
        two = launch(tmp_path / "two", model_cache, "--model", model)
    assert_close_weights(two["weights"], one["weights"])
    # The steps moved the weights far more than the two runs differ (the comparison is not vacuous).
    from cyclej.models.loading import load_model

    start = load_model(model, markers=["<|A|>", "<|B|>"])[0].state_dict()
    moved = max(float((w - start[k]).abs().max()) for k, w in one["weights"].items())  # tied head saved once
    assert moved > 1e-3
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [1, 2]
    for a, b in zip(m1, m2, strict=True):
        # The same samples (generation in the backend's own seeded batches, split by rank) and rewards …
        for key in ("reward/total/mean", "reward/target/mean", "reward/rouge/mean", "completion_tokens/mean"):
            assert b[key] == a[key], key
        # … and, reduced over the ranks, the same loss, norm and update as on one process.
        for key in ("sampled_logprob/mean", "grad_norm", "update_size", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        # The loss is Σ A·log π with group advantages that sum to ~0: it cancels to ~1e-2 out of terms of
        # ~1, so the ranks' other summation order shows at ~1e-7 absolute (1.1e-5 relative on AMD EPYC,
        # tiny-llama). A real reduction error (a rank's share lost or counted twice) is ~1e-3 here.
        assert b["pg_loss"] == pytest.approx(a["pg_loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] > 0
    # Both ranks log the global numbers, and their discriminators (gradients summed) stayed identical.
    assert metrics(two, 0) == metrics(two, 1)
    assert two["ranks"][0]["disc_sha"] == two["ranks"][1]["disc_sha"]
    assert two["ranks"][0]["disc_updates"] == 2


def test_gathered_weights_are_the_single_process_state_dict_and_load_with_transformers(
    runs: dict[str, dict[str, Any]],
) -> None:
    one, two = runs["one"], runs["two"]
    # Before training, the gathered FSDP2 weights were the unsharded model's, every key and value exactly.
    assert two["ranks"][0]["gathered_equal"] is True
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(two["dir"] / "policy")
    sd = loaded.state_dict()
    ref = AutoModelForCausalLM.from_pretrained(one["dir"] / "policy").state_dict()
    assert list(sd) == list(ref)
    assert all(sd[k].shape == ref[k].shape and sd[k].dtype == torch.float32 for k in ref)
    assert_close_weights({k: v.detach() for k, v in sd.items()}, {k: v.detach() for k, v in ref.items()})


@pytest.mark.slow
def test_oom_on_one_rank_halves_on_both_and_matches_one_process(
    runs: dict[str, dict[str, Any]], tmp_path: Path, model_cache: Path
) -> None:
    """Out of memory on rank 1 at step 2: both ranks drop the step, halve the micro-batch and take it again;
    the result is one process's with the same OOM, and step 1 is the uninterrupted run's."""
    two = launch(tmp_path / "two", model_cache, "--fault-rank", "1", "--fault-step", "2")
    one = launch(tmp_path / "one", model_cache, "--fault-step", "2", ranks=1)
    assert "out of memory on another rank" in two["log"] and "injected by CYCLEJ_FAULT" in two["log"]
    for r in (0, 1):
        assert [m["rollout_micro_batch"] for m in metrics(two, r)] == [1, 0.5]
        assert two["ranks"][r]["micro_rows"] == 1
    assert metrics(two, 0) == metrics(two, 1)
    assert metrics(two)[0] == metrics(runs["two"])[0]
    assert_close_weights(two["weights"], one["weights"])
    assert [m["rollout_micro_batch"] for m in metrics(one)] == [1, 0.5]


@pytest.mark.slow
def test_resume_on_two_ranks_is_bit_identical(
    runs: dict[str, dict[str, Any]], tmp_path: Path, model_cache: Path
) -> None:
    straight = runs["two"]
    ckpt = straight["dir"] / "ckpt"
    # The single-process format: 12 bytes per parameter in safetensors shards, rng.pt, plus every rank's RNG.
    n = sum(v.numel() for k, v in straight["weights"].items())
    tensor_bytes = sum(p.stat().st_size for p in ckpt.glob("optimizer-*.safetensors"))
    assert 12 * n <= tensor_bytes <= 12 * n + 64 * 1024
    assert {"state.json", "rng.pt", "rng-ranks.pt", "scheduler.pt", "discriminator.pt"} <= {
        p.name for p in ckpt.iterdir()
    }
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    assert state["step"] == 1 and state["format"] == 2 and state["world_size"] == 2
    assert len(torch.load(ckpt / "rng-ranks.pt", weights_only=True)) == 2

    resumed = launch(tmp_path / "resumed", model_cache, "--resume", str(ckpt))
    a, b = straight["weights"], resumed["weights"]
    assert sorted(a) == sorted(b)
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert [json.dumps(m, sort_keys=True) for m in metrics(resumed)] == [
        json.dumps(m, sort_keys=True) for m in metrics(straight)
    ]
    assert resumed["ranks"][0]["disc_sha"] == straight["ranks"][0]["disc_sha"]


@pytest.mark.slow
def test_rl_stage_on_two_ranks_commits_what_one_process_would(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole `rl` stage (tiny preset: discriminator reward, ROUGE/BLEU/embedding, a checkpoint at step 2)
    through run_stage with CYCLEJ_GPUS=2: torchrun, cyclej.pipeline.rank_worker, rank 0 commits. Step 1 is
    one process's to the float (the discriminator has not been updated yet: after that its dropout masks,
    drawn per rank's share of its batch, make the rewards differ in the 5th digit)."""
    from transformers import AutoModelForCausalLM

    from cyclej.pipeline.registry import run_stage
    from cyclej.runtime.progress import Progress
    from cyclej.runtime.store import ArtifactStore
    from tests.test_policy_gradient import build_inputs, deterministic_lines, tiny_config

    monkeypatch.setenv("CYCLEJ_DIST_TIMEOUT", "30")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    rows = {}
    for n in (1, 2):
        cfg = tiny_config(tmp_path / f"store{n}")
        store = ArtifactStore.from_config(cfg.storage)
        monkeypatch.delenv("CYCLEJ_GPUS", raising=False)
        inputs = build_inputs(cfg, store)
        monkeypatch.setenv("CYCLEJ_GPUS", str(n))
        art = store.fetch(run_stage("rl", cfg, inputs, store, Progress(show_bar=False)))
        rows[n] = deterministic_lines(art / "metrics.jsonl")
        assert not list(art.glob("checkpoints/*"))
        assert AutoModelForCausalLM.from_pretrained(art / "model").config.model_type == "gptj"
        assert (art / "discriminator" / "config.json").is_file()
    assert [r["step"] for r in rows[2]] == [1, 2, 3, 4]
    first1, first2 = rows[1][0], rows[2][0]
    for key in (
        "reward/total/mean",
        "reward/discriminator/mean",
        "reward/rouge/mean",
        "completion_tokens/mean",
    ):
        assert first2[key] == pytest.approx(first1[key], rel=1e-6), key
    assert first2["grad_norm"] == pytest.approx(first1["grad_norm"], rel=1e-5)
    for a, b in zip(rows[1], rows[2], strict=True):
        assert b["reward/total/mean"] == pytest.approx(a["reward/total/mean"], rel=1e-3)
