"""A LoRA stage on two ranks (cyclej.runtime.distributed): real torchrun, real gloo, two processes on
two cores.

Each test runs `run_stage` as a user's run does: `resources.gpus.domain_train: 2` makes it launch
`python -m torch.distributed.run --nproc-per-node 2 … cyclej.pipeline.rank_worker` in a child process,
whose ranks split every step's rows and sum their gradients; rank 0 commits. The one-rank runs are the
same call with one GPU. Distributed timeouts are 20 s, so a rank left waiting fails the test, not CI.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cyclej.config import PipelineConfig
from cyclej.errors import BadInput, StageFailed
from cyclej.models.loading import load_model, save_model
from cyclej.pipeline.registry import run_stage
from cyclej.runtime import distributed
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore

MARKERS = ["<|A|>", "<|B|>"]
YELP = Path(str(resources.files("cyclej") / "samples" / "yelp"))


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "20")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per rank: two ranks on two cores
    monkeypatch.delenv(distributed.GPUS_ENV, raising=False)
    monkeypatch.delenv("CYCLEJ_FAULT", raising=False)


def yelp_lines(name: str, n: int) -> list[str]:
    return (YELP / name).read_text(encoding="utf-8").splitlines()[:n]


def config(root: Path, base: str, gpus: int, **train: Any) -> PipelineConfig:
    section = {
        "batch_size": 8,
        "micro_batch_size": 4,
        "max_steps": 3,
        "seq_len": 64,
        "precision": "fp32",
        "lr": 1e-2,
        "checkpoint_every_steps": 100,
        "eval_every_steps": 3,
        "eval_batches": 1,
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        **train,
    }
    return PipelineConfig.model_validate(
        {
            "device": "cpu",
            "storage": {"root": str(root)},
            "domain_a": {"name": "negative", "marker": MARKERS[0], "train": [str(YELP / "train.0")]},
            "domain_b": {"name": "positive", "marker": MARKERS[1], "train": [str(YELP / "train.1")]},
            "models": {"base": base},
            "domain_train": section,
            "resources": {"gpus": {"domain_train": gpus}},
        }
    )


def inputs(store: ArtifactStore, base: str) -> dict[str, ArtifactRef]:
    """The `context` (the tiny base with markers) and `data` artifacts domain_train reads."""
    model, tok = load_model(base, markers=MARKERS)
    work = store.workdir("context", "ctx0000000000000")
    save_model(model, tok, work / "model")
    context = store.commit("context", "ctx0000000000000", work)
    work = store.workdir("data", "data000000000000")
    for key, name in (("a", "0"), ("b", "1")):
        (work / key).mkdir(exist_ok=True)
        (work / key / "train.txt").write_text("".join(f"{t}\n" for t in yelp_lines(f"train.{name}", 24)))
        (work / key / "dev.txt").write_text("".join(f"{t}\n" for t in yelp_lines(f"dev.{name}", 8)))
    return {"context": context, "data": store.commit("data", "data000000000000", work)}


def train_domain(root: Path, base: str, gpus: int, **train: Any) -> tuple[ArtifactStore, ArtifactRef]:
    cfg = config(root, base, gpus, **train)
    store = ArtifactStore(str(root))
    ref = run_stage("domain_train", cfg, inputs(store, base), store, Progress(show_bar=False))
    return store, ref


def adapter(store: ArtifactStore, ref: ArtifactRef) -> dict[str, torch.Tensor]:
    out = store.fetch(ref)
    return {
        **load_file(str(out / "adapter" / "adapter_model.safetensors")),
        **{f"rows.{k}": v for k, v in load_file(str(out / "marker_rows.safetensors")).items()},
    }


def train_log(store: ArtifactStore, ref: ArtifactRef) -> list[dict[str, Any]]:
    lines = (store.fetch(ref) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "train"]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


# tiny Llama in the slow tier: each two-rank launch is ~20 s of torchrun on two cores
@pytest.mark.parametrize("base", ["tiny-gptj", pytest.param("tiny-llama", marks=pytest.mark.slow)])
def test_two_ranks_train_the_adapter_one_rank_trains(tmp_path: Path, base: str) -> None:
    one_store, one = train_domain(tmp_path / "one", base, gpus=1)
    two_store, two = train_domain(tmp_path / "two", base, gpus=2)

    assert one.fingerprint == two.fingerprint  # where it ran is not what it computed
    metrics = json.loads((two_store.fetch(two) / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["effective_batch"] == 8
    # The ranks split the rows (the step's token count is the one rank's, not twice it) and summed their
    # gradients (the same loss, and adapter weights that moved the same way).
    log_one, log_two = train_log(one_store, one), train_log(two_store, two)
    assert [r["tokens"] for r in log_two] == [r["tokens"] for r in log_one]
    assert [r["micro_batch"] * r["accumulation"] * 2 for r in log_two] == [8, 8, 8]
    for a, b in zip(log_one, log_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    trained_one, trained_two = adapter(one_store, one), adapter(two_store, two)
    assert_close(trained_one, trained_two)
    start = load_file(str(one_store.fetch(one) / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in start.items())  # it trained


@pytest.mark.slow
def test_out_of_memory_on_one_rank_halves_both_and_keeps_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    one_store, one = train_domain(tmp_path / "one", "tiny-gptj", gpus=1)
    monkeypatch.setenv("CYCLEJ_FAULT", "domain_train:2:oom@1")
    store, ref = train_domain(tmp_path / "two", "tiny-gptj", gpus=2)

    err = capfd.readouterr().err
    # rank 1 ran out of memory, rank 0 learnt of it through the all-reduce: both halved, nobody hung
    assert "domain_train (rank 1 of 2): out of memory at step 2 (CUDA out of memory (injected" in err
    assert "domain_train (rank 0 of 2): out of memory at step 2 (CUDA out of memory on another rank" in err
    log = train_log(store, ref)
    assert [r["micro_batch"] for r in log] == [4, 2, 2]
    assert all(r["micro_batch"] * r["accumulation"] * 2 == 8 for r in log)
    metrics = json.loads((store.fetch(ref) / "metrics.json").read_text())
    assert metrics["oom_events"] == 1 and metrics["effective_batch"] == 8
    assert_close(adapter(store, ref), adapter(one_store, one))  # the retried step is the same step


@pytest.mark.slow
def test_a_killed_rank_fails_the_stage_and_the_rerun_resumes_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = {"max_steps": 4, "checkpoint_every_steps": 1}
    ref_store, whole = train_domain(tmp_path / "whole", "tiny-gptj", gpus=2, **train)

    monkeypatch.setenv("CYCLEJ_FAULT", "domain_train:3:kill@1")
    with pytest.raises(StageFailed, match="a rank of the 2-rank run exited with code") as failed:
        train_domain(tmp_path / "killed", "tiny-gptj", gpus=2, **train)
    assert "step-00000002" in str(failed.value)  # the resume point is named
    monkeypatch.delenv("CYCLEJ_FAULT")
    store, resumed = train_domain(tmp_path / "killed", "tiny-gptj", gpus=2, **train)

    metrics = json.loads((store.fetch(resumed) / "metrics.json").read_text())
    assert metrics["resumed_from"] == ["step-00000002"] and metrics["steps"] == 4
    a, b = adapter(store, resumed), adapter(ref_store, whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpus_come_from_the_pod_for_multi_gpu_stages_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = config(tmp_path, "tiny-gptj", gpus=1)
    assert distributed.gpus_for(cfg, "domain_train") == 1
    monkeypatch.setenv(distributed.GPUS_ENV, "4")
    assert distributed.gpus_for(cfg, "rl") == 4 and distributed.gpus_for(cfg, "merge") == 1
    monkeypatch.setenv(distributed.GPUS_ENV, "four")
    with pytest.raises(BadInput, match="CYCLEJ_GPUS='four'"):
        distributed.gpus_for(cfg, "rl")
    monkeypatch.delenv(distributed.GPUS_ENV)
    bad = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"gpus": {"merge": 2}})})
    with pytest.raises(BadInput, match=r"resources.gpus.merge: 2, but merge runs on one device"):
        distributed.gpus_for(bad, "merge")
    with pytest.raises(ValueError, match="resources.gpus.mrege: no such stage"):
        PipelineConfig.model_validate({**cfg.model_dump(mode="json"), "resources": {"gpus": {"mrege": 2}}})


@pytest.mark.slow
def test_paraphrase_on_two_gpus_is_two_workers_over_the_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data parallel: worker r generates shards r, r+2, … (its own engine); the launching process
    assembles the same pairs one process would have."""
    from transformers import AutoTokenizer

    from cyclej.config import load_config
    from cyclej.models.catalog import tiny_tokenizer_dir
    from tests.helpers.tiny_models import tiny_llama

    paraphraser = tmp_path / "paraphraser"
    tiny_llama(seed=0).save_pretrained(paraphraser)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir()).save_pretrained(paraphraser)
    results = {}
    for gpus in (1, 2):
        root = tmp_path / f"store{gpus}"
        cfg = load_config(
            preset="tiny",
            storage=str(root),
            overrides=[
                f"models.paraphraser={paraphraser}",
                "paraphrase.max_texts_per_domain=4",
                "paraphrase.shard_size=2",
                "paraphrase.max_new_tokens=6",
                "paraphrase.batch_size=4",
                "paraphrase.temperature=0.0",
                "paraphrase.max_rejection_rate=1.0",
                "device=cpu",
                f"resources.gpus.paraphrase={gpus}",
            ],
        )
        store = ArtifactStore(str(root))
        data = run_stage("data", cfg, {}, store, Progress(show_bar=False))
        ref = run_stage("paraphrase", cfg, {"data": data}, store, Progress(show_bar=False))
        workers = [
            json.loads(
                (store.load_checkpoint("paraphrase", ref.fingerprint, name) / "stats.json").read_text()
            )["worker"]
            for name in store.list_checkpoints("paraphrase", ref.fingerprint)
        ]
        results[gpus] = ((store.fetch(ref) / "pairs.jsonl").read_text(), workers)
    assert results[1][1] == [0] * len(results[1][1]) and len(results[1][1]) >= 2
    assert results[2][1] == [i % 2 for i in range(len(results[2][1]))]  # shard i by worker i mod 2
    assert results[2][0] == results[1][0] and results[1][0].strip()
