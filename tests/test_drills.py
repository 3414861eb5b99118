"""Orchestration drills on the `tiny` preset: real Prefect (the test harness's server, shared with the
subprocesses), artifacts on a real S3 endpoint (moto server).

One store for the module: the drills change only the stage they break (its fingerprint), so every stage
before it comes back from the cache, exactly as a user's retry would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cyclej.config import PipelineConfig, load_config
from cyclej.pipeline.registry import fingerprints
from cyclej.runtime.store import ArtifactStore
from tests.conftest import task_run_states

ROOT = Path(__file__).resolve().parents[1]
# Several tiny pipelines through Prefect and a real S3 endpoint (~4 min): in CI (`make test`), not in the
# quick default subset.
pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


@pytest.fixture(scope="module")
def drill_store(s3_endpoint: str) -> str:
    """A bucket on the session's moto server, shared by the drills of this module."""
    import s3fs

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": s3_endpoint,
        }
    )
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("drills")
    return "s3://drills/tiny"


def _cli_env(**extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), **extra}
    if "CYCLEJ_FAULT" not in extra:
        env.pop("CYCLEJ_FAULT", None)
    return env


def _latest_flow_run_id() -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0].id


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cyclej.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_cli_env(**env),
        timeout=900,
    )


def _config(store: str, *sets: str) -> PipelineConfig:
    return load_config(preset="tiny", storage=store, overrides=[*sets, "orchestration.retries=0"])


def test_full_pipeline_then_all_cached(drill_store: str) -> None:
    from flows.pipeline_flow import cyclej_pipeline

    cfg = _config(drill_store)
    first = cyclej_pipeline(config=cfg, return_state=True)
    assert first.is_completed(), first.message
    refs = first.result()
    assert list(refs) == [
        "data",
        "context",
        "paraphrase",
        "para_train",
        "domain_train",
        "merge",
        "rl",
        "eval",
    ]
    assert {k: v["fingerprint"] for k, v in refs.items()} == fingerprints(cfg)
    store = ArtifactStore.from_config(cfg.storage)
    assert all(store.exists(name, ref["fingerprint"]) for name, ref in refs.items())
    states = task_run_states(first.state_details.flow_run_id)
    assert {states[name] for name in refs} == {"Completed"}

    second = cyclej_pipeline(config=cfg, return_state=True)
    states = task_run_states(second.state_details.flow_run_id)
    assert {states[name] for name in refs} == {"Cached"}, states
    assert not any(name.startswith("paraphrase-shard") for name in states)  # no shard work either
    assert second.result() == refs  # the same commits: nothing recomputed


def test_failure_drill_retry_resumes_rl(drill_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rl` raises at step 2 with retries off: the run fails. Retrying the same flow run (as the UI does)
    finds every earlier stage Cached and `rl` resuming from its checkpoint."""
    from flows.pipeline_flow import cyclej_pipeline

    cfg = _config(drill_store, "rl.checkpoint_every_steps=1")  # a different rl fingerprint: rl reruns
    monkeypatch.setenv("CYCLEJ_FAULT", "rl:2:error")
    failed = cyclej_pipeline(config=cfg, return_state=True)
    assert failed.is_failed()
    flow_run_id = failed.state_details.flow_run_id
    states = task_run_states(flow_run_id)
    assert states["rl"] == "Failed" and states["merge"] == "Cached"
    store = ArtifactStore.from_config(cfg.storage)
    rl_fp = fingerprints(cfg)["rl"]
    assert store.list_checkpoints("rl", rl_fp)[-1] == "step-00000001"
    monkeypatch.delenv("CYCLEJ_FAULT")

    retry = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "flow-run",
            "retry",
            str(flow_run_id),
            "--entrypoint",
            "flows.pipeline_flow:cyclej_pipeline",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_cli_env(),
        timeout=900,
    )
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    states = task_run_states(flow_run_id)  # the same flow run, now retried
    for name in ("data", "context", "paraphrase", "para_train", "domain_train", "merge"):
        assert states[name] == "Cached", (name, states)
    assert states["rl"] == "Completed" and states["eval"] == "Completed"
    rl_ref = store.ref("rl", rl_fp)
    assert rl_ref is not None and rl_ref.metrics["resumed_from"] == ["step-00000001"]


def test_kill_drill_new_run_resumes_domain_train(drill_store: str) -> None:
    """The pipeline process is killed during domain_train (like a lost pod); a new `cyclej run` of the
    same config completes, earlier stages cached, domain_train resumed from its checkpoint."""
    sets = ["--set", "domain_train.checkpoint_every_steps=1", "--set", "orchestration.retries=0"]
    killed = _cli(
        "run", "--preset", "tiny", "--storage", drill_store, *sets, CYCLEJ_FAULT="domain_train:3:kill"
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    cfg = _config(drill_store, "domain_train.checkpoint_every_steps=1")
    fp = fingerprints(cfg)["domain_train"]
    store = ArtifactStore.from_config(cfg.storage)
    assert not store.exists("domain_train", fp)
    assert store.list_checkpoints("domain_train", fp)[-1] == "step-00000002"

    resumed = _cli("run", "--preset", "tiny", "--storage", drill_store, *sets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "| CYCLE-J" in resumed.stdout or "CYCLE-J" in resumed.stdout  # the evaluation table is printed
    states = task_run_states(_latest_flow_run_id())
    for name in ("data", "context", "paraphrase", "para_train"):
        assert states[name] == "Cached", (name, states)
    assert states["domain_train"] == "Completed"
    ref = store.ref("domain_train", fp)
    assert ref is not None and ref.metrics["resumed_from"] == ["step-00000002"]
    status = _cli("status", "--preset", "tiny", "--storage", drill_store, *sets)
    assert all("complete" in line for line in status.stdout.strip().splitlines()), status.stdout
    assert json.loads(ref.to_json())["fingerprint"] == fp


def test_kill_drill_on_a_local_store_leaves_no_lock_behind(tmp_path: Path) -> None:
    """A run killed mid-stage on a local store (or a mounted network volume) must not leave anything that
    makes the next run wait: Prefect's file lock manager wrote never-expiring locks, and the re-run hung."""
    store_root = str(tmp_path / "store")
    args = ("run", "--preset", "tiny", "--storage", store_root, "--until", "context")
    killed = _cli(*args, CYCLEJ_FAULT="context:3:kill")
    assert killed.returncode == -9, killed.stderr[-3000:]
    try:
        resumed = subprocess.run(
            [sys.executable, "-m", "cyclej.cli", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=_cli_env(),
            timeout=400,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the run after a kill is stuck: {str(exc.stderr)[-2000:]}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    states = task_run_states(_latest_flow_run_id())
    assert states["data"] == "Cached" and states["context"] == "Completed", states
    cfg = load_config(preset="tiny", storage=store_root)
    ref = ArtifactStore.from_config(cfg.storage).ref("context", fingerprints(cfg)["context"])
    assert ref is not None and ref.metrics["resumed_from"] == ["step-00000002"]
