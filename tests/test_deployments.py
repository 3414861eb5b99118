"""The deployment drill: a real local Prefect server, the `process` and `runpod` work pools,
`prefect deploy` from deployments/prefect.yaml, a process worker, and
`prefect deployment run cyclej-data/data --watch` on the tiny preset → Completed, artifact in the store.
`prefect deploy --all` against the server is the slow variant (-m slow, ~45 s more on 2 loaded cores).

Checked without a server: every entrypoint loads and names the flow the pipeline dispatches to, the
yaml's pipeline configs are the shipped presets, and every GPU stage's job variables are the GPU
`cyclej plan` picks for the gptj preset."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cyclej.config import STAGES, PipelineConfig, load_config
from cyclej.plan import plan

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def _deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def test_yaml_configs_are_the_presets_and_gpu_stages_use_the_plan() -> None:
    deps = _deployments()
    assert set(STAGES) <= set(deps) and {"pipeline", "demo"} <= set(deps)
    for name, preset in (("pipeline", "gptj"), ("demo", "demo")):
        cfg = PipelineConfig.model_validate(deps[name]["parameters"]["config"])
        ref = load_config(preset=preset)
        skip = {"domain_a", "domain_b", "orchestration"}
        assert cfg.model_dump(exclude=skip) == ref.model_dump(exclude=skip), name
        for dom in (cfg.domain_a, cfg.domain_b):  # repo-relative sample paths exist
            assert all((REPO / p).is_file() for p in dom.train + dom.dev)
    assert PipelineConfig.model_validate(deps["pipeline"]["parameters"]["config"]).orchestration.dispatch
    plans = {p.stage: p for p in plan(load_config(preset="gptj"))}
    for stage in STAGES:
        pool = deps[stage]["work_pool"]
        if plans[stage].device == "cpu":
            assert pool["name"] == "cyclej-local", stage
            continue
        assert pool["name"] == "cyclej-gpu", stage
        jv = pool["job_variables"]
        assert {k: jv[k] for k in ("gpu_type_id", "gpu_count")} == plans[stage].job_variables(), stage
        assert jv["image"] and jv["volume_mount_path"] == "/runpod-volume"
        # a GPU stage waits for a slot (ENQUEUE) rather than renting a pod beyond its limit
        assert deps[stage]["concurrency_limit"] == {"limit": 2, "collision_strategy": "ENQUEUE"}, stage
    assert deps["pipeline"]["concurrency_limit"]["limit"] == 1
    assert deps["pipeline"]["schedules"][0]["cron"] and deps["pipeline"]["schedules"][0]["active"] is False


def test_every_entrypoint_loads_the_flow_dispatch_expects() -> None:
    from prefect.flows import load_flow_from_entrypoint

    for name, dep in _deployments().items():
        path, func = dep["entrypoint"].split(":")
        assert (REPO / path).is_file(), dep["entrypoint"]
        fl = load_flow_from_entrypoint(f"{REPO / path}:{func}")
        expected = "cyclej-pipeline" if name in ("pipeline", "demo") else f"cyclej-{name}"
        assert fl.name == expected, (name, fl.name)  # _dispatch runs `cyclej-<stage>/<stage>`


def _prefect(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    from tests.local_prefect_server import VENV_BIN

    return subprocess.run([str(VENV_BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _create_pools(env: dict[str, str]) -> None:
    """The two pools of the yaml, the runpod one with the worker type's own base job template."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    from infra.runpod_worker import RunpodWorker

    async def create() -> None:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            async with get_client() as client:
                for name, worker in (("cyclej-local", ProcessWorker), ("cyclej-gpu", RunpodWorker)):
                    if name not in {p.name for p in await client.read_work_pools()}:
                        await client.create_work_pool(WorkPoolCreate(
                            name=name, type=worker.type, base_job_template=worker.get_default_base_job_template()))

    asyncio.run(create())


async def _read_deployments(env: dict[str, str]) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        async with get_client() as client:
            return {f"{d.name}@{d.work_pool_name}": d for d in await client.read_deployments()}


def test_deploy_and_run_the_data_stage_on_a_process_worker(tmp_path: Path) -> None:
    from cyclej.stages import stage_fingerprint
    from cyclej.store import ArtifactStore
    from tests.local_prefect_server import VENV_BIN, shared_prefect_server

    env = shared_prefect_server()
    _create_pools(env)
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:  # starts while `prefect deploy` runs
        worker = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "cyclej-local", "--name", "deploy-test"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        r = _prefect(env, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--name", "data")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        deployed = asyncio.run(_read_deployments(env))
        assert "data@cyclej-local" in deployed

        cfg = load_config(preset="tiny", storage=str(tmp_path / "store"))
        params = json.dumps({"config": cfg.model_dump(mode="json"), "inputs": {}})
        start = time.monotonic()
        r = _prefect(env, "deployment", "run", "cyclej-data/data", "--params", params, "--watch",
                     "--watch-interval", "1", "--watch-timeout", "200")
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:] + "\nworker:\n" + worker_log.read_text()[-4000:]
        assert "Completed" in out, out[-3000:]
        print(f"data stage deployment run: {time.monotonic() - start:.1f} s")
        store = ArtifactStore.from_config(cfg.storage)
        assert store.exists("data", stage_fingerprint("data", cfg, {}))
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()


@pytest.mark.slow
def test_deploy_all() -> None:
    from tests.local_prefect_server import shared_prefect_server

    env = shared_prefect_server()
    _create_pools(env)
    r = _prefect(env, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--all")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    deployed = asyncio.run(_read_deployments(env))
    expected = {f"{s}@{'cyclej-local' if s in ('data', 'merge') else 'cyclej-gpu'}" for s in STAGES}
    assert expected | {"pipeline@cyclej-local", "demo@cyclej-local"} <= set(deployed)
    assert deployed["rl@cyclej-gpu"].job_variables["gpu_type_id"] == "NVIDIA A100 80GB PCIe"
    limit = deployed["rl@cyclej-gpu"].global_concurrency_limit
    assert limit is not None and limit.limit == 2
    assert deployed["rl@cyclej-gpu"].concurrency_options.collision_strategy == "ENQUEUE"
    assert deployed["context@cyclej-gpu"].pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/cyclej"}}]
    schedule = deployed["pipeline@cyclej-local"].schedules[0]
    assert schedule.active is False and schedule.schedule.cron == "0 3 * * 1"
