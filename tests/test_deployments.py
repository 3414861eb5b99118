"""The deployment drill: a real local Prefect server, the `process` and `runpod` work pools,
`prefect deploy` from deployments/prefect.yaml, a process worker, and
`prefect deployment run cyclej-data/data --watch` on the tiny preset → Completed, artifact in the store.
`prefect deploy --all` against the server is the slow variant (-m slow, ~45 s more on 2 loaded cores).

Checked without a server: every entrypoint loads and names the flow the pipeline dispatches to, the
yaml's pipeline configs are the shipped presets, and every GPU stage's job variables are the GPU
`cyclej plan` picks for the gptj preset."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cyclej.config import STAGES, PipelineConfig, load_config
from cyclej.pipeline.sizing import plan

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
        # the GPU and the pod's RAM, vCPUs and disk: exactly what `cyclej plan` prints for the stage
        keys = ("gpu_type_id", "gpu_count", "min_memory_in_gb", "min_vcpu_count", "container_disk_gb")
        assert set(plans[stage].job_variables()) == set(keys), stage
        assert {k: jv.get(k) for k in keys} == plans[stage].job_variables(), stage
        assert jv["image"] and jv["volume_mount_path"] == "/runpod-volume"
        # a GPU stage waits for a slot (ENQUEUE) rather than renting a pod beyond its limit
        assert deps[stage]["concurrency_limit"] == {"limit": 2, "collision_strategy": "ENQUEUE"}, stage
    assert deps["pipeline"]["concurrency_limit"]["limit"] == 1
    assert deps["pipeline"]["schedules"][0]["cron"] and deps["pipeline"]["schedules"][0]["active"] is False


def _multi_gpu(name: str) -> tuple[str, int] | None:
    """`rl-4gpu` → ("rl", 4): a stage's deployment on a pod of several GPUs."""
    m = re.fullmatch(r"(\w+)-(\d+)gpu", name)
    return (m.group(1), int(m.group(2))) if m else None


def test_multi_gpu_deployments_ask_for_the_pod_cyclej_plan_prints_at_their_world_size() -> None:
    """`<stage>-<n>gpu`: the job variables of `cyclej plan --preset gptj --set resources.gpus.<stage>=<n>`,
    and a pod whose CYCLEJ_GPUS (the worker's default, or the deployment's own) is n."""
    from infra.runpod_worker import GPUS_ENV

    multi = {name: _multi_gpu(name) for name in _deployments()}
    multi = {k: v for k, v in multi.items() if v is not None}
    assert multi.get("rl-4gpu") == ("rl", 4)
    deps = _deployments()
    for name, (stage, n) in multi.items():
        dep = deps[name]
        assert dep["entrypoint"] == deps[stage]["entrypoint"] and dep["pull"] == deps[stage]["pull"], name
        assert dep["work_pool"]["name"] == "cyclej-gpu", name
        jv = dep["work_pool"]["job_variables"]
        planned = {
            p.stage: p for p in plan(load_config(preset="gptj", overrides=[f"resources.gpus.{stage}={n}"]))
        }
        assert {k: jv.get(k) for k in planned[stage].job_variables()} == planned[stage].job_variables(), name
        assert jv["gpu_count"] == n and jv.get("env", {}).get(GPUS_ENV, str(n)) == str(n), name
        single = deps[stage]["work_pool"]["job_variables"]
        # n ranks: n processes each loading the model on the host; one shared disk
        assert (
            jv["min_memory_in_gb"] > single["min_memory_in_gb"]
            and jv["container_disk_gb"] == single["container_disk_gb"]
        )
        assert dep["concurrency_limit"]["collision_strategy"] == "ENQUEUE", name
    # 4 ranks of RL shard the optimizer onto the GPUs: no offload, so 80 GB cards and no 68 GiB of masters
    # in RAM
    rl4 = {p.stage: p for p in plan(load_config(preset="gptj", overrides=["resources.gpus.rl=4"]))}["rl"]
    assert (
        rl4.gpu is not None
        and rl4.gpu.memory_gb == 80
        and rl4.job_variables()
        == {k: deps["rl-4gpu"]["work_pool"]["job_variables"][k] for k in rl4.job_variables()}
    )
    assert "optimizer" not in rl4.memory and not any("offloaded optimizer" in n for n in rl4.notes)


def test_dispatch_sends_a_stage_given_n_gpus_to_its_n_gpu_deployment() -> None:
    from cyclej.config import load_config
    from flows.pipeline_flow import deployment_name

    deps = _deployments()
    cfg = load_config(preset="gptj")
    assert deployment_name(cfg, "rl") == "cyclej-rl/rl" and "rl" in deps
    multi = [(name, _multi_gpu(name)) for name in deps if _multi_gpu(name)]
    assert multi, "no <stage>-<n>gpu deployment in deployments/prefect.yaml"
    for name, (stage, n) in multi:
        given = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"gpus": {stage: n}})})
        assert deployment_name(given, stage) == f"cyclej-{stage}/{name}"


def test_every_entrypoint_loads_the_flow_dispatch_expects() -> None:
    from prefect.flows import load_flow_from_entrypoint

    for name, dep in _deployments().items():
        # Module paths (`package.module:flow`), not file paths: a flow loaded from its file is a second
        # copy of the module, whose string annotations could fail parameter validation on 3.7.7 ("... not
        # fully defined"). Not Prefect's dotted form (`package.module.flow`): `prefect deploy` 3.7.7
        # cannot parse it ("not enough values to unpack").
        module, _, func = dep["entrypoint"].partition(":")
        assert func and "/" not in module and not module.endswith(".py"), dep["entrypoint"]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), dep["entrypoint"]
        fl = load_flow_from_entrypoint(dep["entrypoint"])
        stage = (_multi_gpu(name) or (name, 1))[0]  # `rl-4gpu` runs the `rl` stage's flow
        expected = "cyclej-pipeline" if name in ("pipeline", "demo") else f"cyclej-{stage}"
        assert fl.name == expected, (name, fl.name)  # _dispatch runs `cyclej-<stage>/<stage>`


def _prefect(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    from tests.helpers.local_prefect_server import VENV_BIN

    return subprocess.run(
        [str(VENV_BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


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
                        await client.create_work_pool(
                            WorkPoolCreate(
                                name=name,
                                type=worker.type,
                                base_job_template=worker.get_default_base_job_template(),
                            )
                        )

    asyncio.run(create())


async def _read_deployments(env: dict[str, str]) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        async with get_client() as client:
            return {f"{d.name}@{d.work_pool_name}": d for d in await client.read_deployments()}


@pytest.mark.slow  # `prefect deploy`, a process worker and one deployment run (~30 s)
def test_deploy_and_run_the_data_stage_on_a_process_worker(tmp_path: Path) -> None:
    from cyclej.pipeline.registry import stage_fingerprint
    from cyclej.runtime.store import ArtifactStore
    from tests.helpers.local_prefect_server import VENV_BIN, shared_prefect_server

    env = shared_prefect_server()
    _create_pools(env)
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:  # starts while `prefect deploy` runs
        worker = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "cyclej-local", "--name", "deploy-test"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        r = _prefect(env, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--name", "data")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        deployed = asyncio.run(_read_deployments(env))
        assert "data@cyclej-local" in deployed

        cfg = load_config(preset="tiny", storage=str(tmp_path / "store"))
        params = json.dumps({"config": cfg.model_dump(mode="json"), "inputs": {}})
        start = time.monotonic()
        r = _prefect(
            env,
            "deployment",
            "run",
            "cyclej-data/data",
            "--params",
            params,
            "--watch",
            "--watch-interval",
            "1",
            "--watch-timeout",
            "200",
        )
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
    from tests.helpers.local_prefect_server import shared_prefect_server

    env = shared_prefect_server()
    _create_pools(env)
    r = _prefect(env, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--all")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    deployed = asyncio.run(_read_deployments(env))
    expected = {f"{s}@{'cyclej-local' if s in ('data', 'merge') else 'cyclej-gpu'}" for s in STAGES}
    assert expected | {"pipeline@cyclej-local", "demo@cyclej-local"} <= set(deployed)
    assert deployed["rl@cyclej-gpu"].job_variables["gpu_type_id"] == "NVIDIA A100 80GB PCIe"
    assert deployed["rl-4gpu@cyclej-gpu"].job_variables["gpu_count"] == 4
    assert deployed["rl@cyclej-gpu"].job_variables["gpu_count"] == 1
    limit = deployed["rl@cyclej-gpu"].global_concurrency_limit
    assert limit is not None and limit.limit == 2
    assert deployed["rl@cyclej-gpu"].concurrency_options.collision_strategy == "ENQUEUE"
    assert deployed["context@cyclej-gpu"].pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/cyclej"}}
    ]
    schedule = deployed["pipeline@cyclej-local"].schedules[0]
    assert schedule.active is False and schedule.schedule.cron == "0 3 * * 1"


# It once failed on a loaded 2-core machine because the worker's default 10 s poll picked the two runs up
# 11 s apart and the tiny `context` had finished by then. The worker now polls every second, and the part
# the pipeline controls (both runs submitted before either ends) is asserted from the runs' creation times.
@pytest.mark.slow  # a worker and three deployment runs, ~2-3 min on 2 loaded cores
def test_dispatched_stages_of_one_level_run_concurrently(tmp_path: Path) -> None:
    """Issue 15: with `orchestration.dispatch: true` the stages of one level (`context`, `paraphrase`)
    are separate deployment runs on a process worker, submitted together: their run windows overlap.
    (`run_deployment` waits for its run; called one after the other, the windows were disjoint.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    from cyclej.pipeline.registry import fingerprints
    from flows.stage_flows import STAGE_FLOWS
    from tests.helpers.local_prefect_server import VENV_BIN, shared_prefect_server

    # PREFECT_WORKER_QUERY_SECONDS: the worker looks for scheduled runs every second (default 10 s), so two
    # runs submitted together start together instead of one poll apart.
    env = {**shared_prefect_server(), "OMP_NUM_THREADS": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    pool = "cyclej-dispatch-test"
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            if pool not in {p.name for p in client.read_work_pools()}:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=pool,
                        type=ProcessWorker.type,
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
        for name in ("data", "context", "paraphrase"):  # `cyclej-<stage>/<stage>`, as dispatch names them
            # `test_deploy_all` may have deployed these names from prefect.yaml onto the GPU pool, whose job
            # variables (CYCLEJ_DEVICE=cuda: no CPU fallback) the upsert below would keep: start clean.
            with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
                client.delete_deployment(
                    client.read_deployment_by_name(f"{STAGE_FLOWS[name].name}/{name}").id
                )
            deployment = STAGE_FLOWS[name].to_deployment(
                name=name, work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH
            )
            deployment.entrypoint = (
                f"flows.stage_flows.{name}_flow"  # the yaml's; derived, it names the factory's inner function
            )
            deployment.apply()
    import os

    env["CYCLEJ_CACHE"] = os.environ["CYCLEJ_CACHE"]
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--name", "dispatch"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        store = str(tmp_path / "store")
        sets = ["orchestration.dispatch=true", "orchestration.retries=0"]
        run = subprocess.run(
            [
                str(VENV_BIN / "python"),
                "-m",
                "cyclej.cli",
                "run",
                "--preset",
                "tiny",
                "--storage",
                store,
                "--until",
                "paraphrase",
                *(x for s in sets for x in ("--set", s)),
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=540,
        )
        assert run.returncode == 0, run.stderr[-3000:] + "\nworker:\n" + worker_log.read_text()[-3000:]
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
    fps = fingerprints(load_config(preset="tiny", storage=store, overrides=sets))
    windows, created = {}, {}
    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        for name in ("context", "paraphrase"):
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{name}-{fps[name][:8]}"]))
            )
            assert len(runs) == 1 and runs[0].state is not None and runs[0].state.is_completed(), runs
            assert runs[0].deployment_id is not None  # a deployment run (on the worker), not a subflow
            windows[name] = (runs[0].start_time, runs[0].end_time)
            created[name] = runs[0].created
        diagnostics = {
            r.name: (f"{r.created:%H:%M:%S}", r.state.name if r.state else None)
            for r in client.read_flow_runs()
            if r.created is not None
        }
    (c0, c1), (p0, p1) = windows["context"], windows["paraphrase"]
    print(f"context {c0:%H:%M:%S}-{c1:%H:%M:%S}, paraphrase {p0:%H:%M:%S}-{p1:%H:%M:%S}")
    # Submitted together: each run was created before the other one ended (called one after the other,
    # `run_deployment` would create the second run only after the first had finished).
    assert created["paraphrase"] < c1 and created["context"] < p1, (created, windows, diagnostics)
    assert c0 < p1 and p0 < c1, (windows, diagnostics)  # and the worker ran them at the same time
