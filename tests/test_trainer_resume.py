"""Exact resume: a `para_train` process killed outright (CYCLEJ_FAULT=…:kill, like a lost pod) and re-run
ends bit-identical to a run that never stopped; a corrupt newest checkpoint falls back to the previous one;
a resumed run keeps the micro-batch an OOM chose."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cyclej.runtime.faults import InjectedError
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactStore, StageCheckpoints
from cyclej.training.trainer import train
from tests.test_trainer import (
    build_inputs,
    domain_examples,
    fresh_faults,
    pipeline_config,
    read_jsonl,
    tcfg,
    tiny,
)

__all__ = ["fresh_faults"]  # a fixture shared with test_train

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

RUN_PARA_TRAIN = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from cyclej.config import PipelineConfig
    from cyclej.runtime.progress import Progress
    from cyclej.pipeline.registry import StageRun
    from cyclej.stages.para_train import run_para_train
    from cyclej.runtime.store import ArtifactRef, ArtifactStore

    cfg = PipelineConfig.model_validate_json(open(sys.argv[1]).read())
    refs = {k: ArtifactRef.from_json(v) for k, v in json.load(open(sys.argv[2])).items()}
    store = ArtifactStore(cfg.storage.root)
    ref = run_para_train(StageRun.start("para_train", cfg, refs, store, Progress(show_bar=False)))
    print(ref.to_json())
""")


def _tensors(artifact: Path) -> dict[str, torch.Tensor]:
    adapter = load_file(str(artifact / "adapter" / "adapter_model.safetensors"))
    rows = load_file(str(artifact / "marker_rows.safetensors"))
    return {**{f"adapter/{k}": v for k, v in adapter.items()}, **{f"rows/{k}": v for k, v in rows.items()}}


def test_killed_para_train_resumes_bit_identical(tmp_path: Path) -> None:
    from cyclej.pipeline.registry import StageRun
    from cyclej.stages.para_train import run_para_train

    section = {
        "batch_size": 4,
        "micro_batch_size": 2,
        "max_steps": 5,
        "seq_len": 64,
        "precision": "fp32",
        "checkpoint_every_steps": 2,
        "eval_every_steps": 5,
        "eval_batches": 1,
        "lr": 1e-3,
    }
    cfg = pipeline_config(tmp_path, para_train=section)
    store = ArtifactStore(cfg.storage.root)
    built = build_inputs(store, n_lines=12)
    inputs = {"context": built["context"], "paraphrase": built["paraphrase"], "data": built["data"]}
    # The same input artifacts in a second store, for the run that never stops.
    shutil.copytree(cfg.storage.root, tmp_path / "store-ref")

    config_file, refs_file, script = tmp_path / "cfg.json", tmp_path / "refs.json", tmp_path / "run.py"
    config_file.write_text(cfg.model_dump_json())
    refs_file.write_text(json.dumps({k: v.to_json() for k, v in inputs.items()}))
    script.write_text(RUN_PARA_TRAIN)
    env = {**os.environ, "CYCLEJ_FAULT": "para_train:3:kill", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(config_file), str(refs_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]

    fp_dirs = list((Path(cfg.storage.root) / "para_train").iterdir())
    assert len(fp_dirs) == 1
    fp = fp_dirs[0].name
    assert store.list_checkpoints("para_train", fp) == ["step-00000002"]
    assert store.ref("para_train", fp) is None  # nothing committed by the dead run

    # Re-run without the fault (in this process): it resumes from step 2.
    ref = run_para_train(StageRun.start("para_train", cfg, inputs, store, Progress(show_bar=False)))
    out = store.fetch(ref)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == ["step-00000002"] and metrics["steps"] == 5
    records = read_jsonl(out / "metrics.jsonl")
    assert [r for r in records if r["event"] == "resume"] == [
        {"event": "resume", "step": 2, "checkpoint": "step-00000002", "micro_batch": 2}
    ]
    # one record per step, the killed step 3 once (re-done after the resume), none lost or doubled
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5]
    assert store.list_checkpoints("para_train", fp) == []

    ref_cfg = cfg.model_copy(
        update={"storage": cfg.storage.model_copy(update={"root": str(tmp_path / "store-ref")})}
    )
    ref_store = ArtifactStore(ref_cfg.storage.root)
    uninterrupted = run_para_train(
        StageRun.start("para_train", ref_cfg, inputs, ref_store, Progress(show_bar=False))
    )
    assert uninterrupted.fingerprint == ref.fingerprint
    resumed_t, straight_t = _tensors(out), _tensors(ref_store.fetch(uninterrupted))
    assert resumed_t.keys() == straight_t.keys() and len(resumed_t) > 3
    for key in resumed_t:
        assert torch.equal(resumed_t[key], straight_t[key]), key
    assert json.loads((ref_store.fetch(uninterrupted) / "metrics.json").read_text())["resumed_from"] == []


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_faults: None
) -> None:
    cfg = tcfg(max_steps=5, checkpoint_every_steps=1, keep_checkpoints=3)
    store = ArtifactStore(str(tmp_path / "store"))

    def run() -> dict[str, torch.Tensor]:
        model, tok, ids = tiny()
        result = train(
            model,
            train_examples=domain_examples(tok, ids, 8),
            tcfg=cfg,
            checkpoints=StageCheckpoints(store, "domain_train", "fp"),
            tokenizer=tok,
            marker_ids=ids,
        )
        return result.trainable_state

    monkeypatch.setenv("CYCLEJ_FAULT", "domain_train:4:error")
    with pytest.raises(InjectedError):
        run()
    assert store.list_checkpoints("domain_train", "fp") == ["step-00000001", "step-00000002", "step-00000003"]
    newest = (
        Path(store.root) / "domain_train" / "fp" / "checkpoints" / "step-00000003" / "trainable.safetensors"
    )
    raw = bytearray(newest.read_bytes())
    raw[-8] ^= 0xFF  # one flipped byte in a weight
    newest.write_bytes(bytes(raw))

    monkeypatch.delenv("CYCLEJ_FAULT")
    resumed = run()
    log = read_jsonl(store.workdir("domain_train", "fp") / "metrics.jsonl")
    assert [r["checkpoint"] for r in log if r["event"] == "resume"] == ["step-00000002"]

    straight_store = ArtifactStore(str(tmp_path / "straight"))
    model, tok, ids = tiny()
    straight = train(
        model,
        train_examples=domain_examples(tok, ids, 8),
        tcfg=cfg,
        checkpoints=StageCheckpoints(straight_store, "domain_train", "fp"),
        tokenizer=tok,
        marker_ids=ids,
    ).trainable_state
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_resumed_run_keeps_the_micro_batch_an_oom_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_faults: None
) -> None:
    cfg = tcfg(batch_size=8, micro_batch_size=8, max_steps=4, checkpoint_every_steps=1)
    store = ArtifactStore(str(tmp_path / "store"))
    monkeypatch.setenv("CYCLEJ_FAULT", "domain_train:2:oom,domain_train:3:error")
    model, tok, ids = tiny()
    with pytest.raises(InjectedError):  # the injected plain error ends the run
        train(
            model,
            train_examples=domain_examples(tok, ids, 8),
            tcfg=cfg,
            checkpoints=StageCheckpoints(store, "domain_train", "fp"),
            tokenizer=tok,
            marker_ids=ids,
        )
    state = json.loads(
        (
            Path(store.root) / "domain_train" / "fp" / "checkpoints" / "step-00000002" / "state.json"
        ).read_text()
    )
    assert state["micro_batch_size"] == 4 and state["step"] == 2

    monkeypatch.delenv("CYCLEJ_FAULT")
    model, tok, ids = tiny()
    result = train(
        model,
        train_examples=domain_examples(tok, ids, 8),
        tcfg=cfg,
        checkpoints=StageCheckpoints(store, "domain_train", "fp"),
        tokenizer=tok,
        marker_ids=ids,
    )
    assert result.metrics["micro_batch_size"] == 4 and result.metrics["resumed_from"] == ["step-00000002"]
    steps = {
        r["step"]: r["micro_batch"]
        for r in read_jsonl(store.workdir("domain_train", "fp") / "metrics.jsonl")
        if r["event"] == "train"
    }
    assert steps == {1: 8, 2: 4, 3: 4, 4: 4}


def test_checkpoints_by_the_clock(tmp_path: Path) -> None:
    """checkpoint_every_minutes: with a tiny interval every step is due, whatever checkpoint_every_steps
    says."""
    store = ArtifactStore(str(tmp_path / "store"))
    model, tok, ids = tiny()
    train(
        model,
        train_examples=domain_examples(tok, ids, 4),
        tcfg=tcfg(max_steps=3, checkpoint_every_steps=100, checkpoint_every_minutes=1e-9, keep_checkpoints=5),
        checkpoints=StageCheckpoints(store, "domain_train", "fp"),
        tokenizer=tok,
        marker_ids=ids,
    )
    assert store.list_checkpoints("domain_train", "fp") == ["step-00000001", "step-00000002", "step-00000003"]


def test_resume_from_s3_after_the_local_disk_is_lost(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, fresh_faults: None
) -> None:
    """Checkpoints live in the object store: a new worker with an empty disk resumes from them."""
    from cyclej.config import StorageConfig

    cfg = tcfg(max_steps=4, checkpoint_every_steps=1)

    def run(cache: Path) -> Any:
        store = ArtifactStore.from_config(StorageConfig(root=f"{s3_bucket}/runs", cache_dir=str(cache)))
        model, tok, ids = tiny()
        return store, train(
            model,
            train_examples=domain_examples(tok, ids, 4),
            tcfg=cfg,
            checkpoints=StageCheckpoints(store, "domain_train", "fp"),
            tokenizer=tok,
            marker_ids=ids,
        )

    monkeypatch.setenv("CYCLEJ_FAULT", "domain_train:3:error")
    with pytest.raises(InjectedError):
        run(tmp_path / "worker-1")
    shutil.rmtree(tmp_path / "worker-1")
    monkeypatch.delenv("CYCLEJ_FAULT")
    store, result = run(tmp_path / "worker-2")
    assert result.metrics["resumed_from"] == ["step-00000002"] and result.metrics["steps"] == 4
    assert store.list_checkpoints("domain_train", "fp") == ["step-00000003", "step-00000004"]
    log = read_jsonl(store.workdir("domain_train", "fp") / "metrics.jsonl")
    assert [r["step"] for r in log if r["event"] == "train"] == [
        1,
        2,
        3,
        4,
    ]  # steps 1-2 came with the checkpoint
