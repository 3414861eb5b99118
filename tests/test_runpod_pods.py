"""What a RunPod pod is given and what happens to it, against the stand-in speaking RunPod's GraphQL:
secrets only as RunPod secret references, registry credentials, an unreachable Prefect API refused before a
pod is rented, a deleted pod recognized as gone, the H200 the rl deployment asks for, the pod's RAM, vCPU,
disk and host CUDA versions as its job variables ask (and values RunPod would reject refused before any
pod), and a worker stopped with a run in flight terminating its pod and crashing the run."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from infra.runpod_worker import RunpodJobConfiguration, check_api_url, create_pod, pod_status
from tests.helpers.local_prefect_server import VENV_BIN
from tests.helpers.runpod_standin import RunpodStandin

REPO = Path(__file__).resolve().parents[1]
LOCAL_API = {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunpodStandin]:
    with RunpodStandin(
        VENV_BIN,
        tmp_path,
        secrets={"hf_token": "hf_s3cr3t", "s3_secret": "aws_s3cr3t", "prefect_api_key": "pnu_s3cr3t"},
    ) as api:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", api.url)
        monkeypatch.setenv("RUNPOD_API_KEY", api.api_key)
        yield api


def job(**kw: object) -> RunpodJobConfiguration:
    base: dict[str, object] = {"gpu_type_id": "NVIDIA A40", "command": "env", "allow_local_api_url": True}
    env = {**LOCAL_API, **kw.pop("env", {})}  # type: ignore[dict-item]
    return RunpodJobConfiguration(**{**base, **kw, "env": env})


def wait_exit(standin: RunpodStandin, pod_id: str) -> None:
    deadline = time.monotonic() + 20
    while standin.process_alive(pod_id):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_secrets_reach_the_pod_but_never_its_spec(standin: RunpodStandin) -> None:
    cfg = job(
        env={"AWS_ENDPOINT_URL": "https://s3api-eu-ro-1.runpod.io", "PREFECT_API_KEY": "pnu_s3cr3t"},
        secret_env={
            "HF_TOKEN": "hf_token",
            "AWS_SECRET_ACCESS_KEY": "s3_secret",
            "PREFECT_API_KEY": "prefect_api_key",
        },
    )
    pod_id = create_pod(cfg)
    (deploy,) = standin.ops("podFindAndDeployOnDemand")
    spec_env = {e["key"]: e["value"] for e in deploy.input["env"]}
    assert spec_env["HF_TOKEN"] == "{{ RUNPOD_SECRET_hf_token }}"
    assert (
        spec_env["PREFECT_API_KEY"] == "{{ RUNPOD_SECRET_prefect_api_key }}"
    )  # the worker's plain key dropped
    assert spec_env["AWS_ENDPOINT_URL"] == "https://s3api-eu-ro-1.runpod.io"
    assert "s3cr3t" not in deploy.query  # nothing secret on the wire to RunPod, nor in its console
    wait_exit(standin, pod_id)
    log = standin.pod_log(pod_id)  # the pod's command is `env`: what the container sees
    assert "HF_TOKEN=hf_s3cr3t" in log and "AWS_SECRET_ACCESS_KEY=aws_s3cr3t" in log
    assert "PREFECT_API_KEY=pnu_s3cr3t" in log


@pytest.mark.parametrize("key", ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_KEY"])
def test_a_plain_secret_is_refused_before_any_pod(standin: RunpodStandin, key: str) -> None:
    with pytest.raises(ValueError, match=f"{key} .*plain text.*secret_env"):
        create_pod(job(env={key: "oops"}))
    assert standin.pods == {} and not standin.ops("podFindAndDeployOnDemand")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:4200/api", "cannot reach"),
        ("http://localhost:4200/api", "cannot reach"),
        ("http://10.1.2.3:4200/api", "cannot reach"),
        ("http://prefect.no-such-host.invalid/api", "does not resolve"),
    ],
)
def test_an_unreachable_prefect_api_url_is_refused_before_any_pod(
    standin: RunpodStandin, url: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        create_pod(job(env={"PREFECT_API_URL": url}, allow_local_api_url=False))
    assert not standin.ops("podFindAndDeployOnDemand") and not standin.ops("gpuTypes")


def test_a_public_api_url_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    # No network here: the resolver answers what it would for Prefect Cloud (a public address).
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [(2, 1, 6, "", ("104.18.12.34", 0))])
    check_api_url("https://api.prefect.cloud/api/accounts/a/workspaces/w")


def test_registry_credentials_and_the_h200_the_rl_deployment_asks_for(standin: RunpodStandin) -> None:
    deployments = {
        d["name"]: d
        for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    }
    gpus = {d["work_pool"]["job_variables"].get("gpu_type_id") for d in deployments.values()} - {None}
    for gpu in sorted(gpus | {"NVIDIA H200"}):  # every GPU a deployment asks for exists on RunPod's side
        create_pod(job(gpu_type_id=gpu, command="true", container_registry_auth_id="reg-auth-123"))
    specs = [r.input for r in standin.ops("podFindAndDeployOnDemand")]
    assert {s["gpuTypeId"] for s in specs} == gpus | {"NVIDIA H200"}
    assert all(s["containerRegistryAuthId"] == "reg-auth-123" for s in specs)


def test_a_pod_deleted_outside_prefect_is_gone_not_an_api_blip(standin: RunpodStandin) -> None:
    pod_id = create_pod(job(command="sleep 60"))
    assert pod_status(pod_id) == "RUNNING"
    standin.delete_pod(pod_id)
    assert pod_status(pod_id) is None  # the old worker raised here on every poll, forever


def _from_job_variables(values: dict[str, object]) -> RunpodJobConfiguration:
    """The job configuration Prefect's worker builds from the `runpod` pool's default template and a
    deployment's job variables (what `prefect worker start --type runpod` does for each flow run)."""
    import asyncio

    from infra.runpod_worker import RunpodWorker

    template = RunpodWorker.get_default_base_job_template()
    values = {"allow_local_api_url": True, "env": LOCAL_API, "command": "true", **values}
    return asyncio.run(RunpodJobConfiguration.from_template_and_values(template, values))


def test_the_pods_ram_vcpu_disk_and_cuda_arrive_as_the_job_variables_ask(standin: RunpodStandin) -> None:
    import runpod

    cfg = _from_job_variables(
        {
            "gpu_type_id": "NVIDIA A100 80GB PCIe",
            "min_memory_in_gb": 96,
            "min_vcpu_count": 16,
            "container_disk_gb": 150,
            "allowed_cuda_versions": ["13.0"],
        }
    )
    pod_id = create_pod(cfg)
    (deploy,) = standin.ops("podFindAndDeployOnDemand")
    spec = deploy.input
    # The SDK's create_pod sends 1 GB / 1 vCPU unless told: RL's offloaded optimizer needs ~68 GiB.
    assert (spec["minMemoryInGb"], spec["minVcpuCount"], spec["containerDiskInGb"]) == (96, 16, 150)
    assert spec["allowedCudaVersions"] == ["13.0"]
    assert standin.pods[pod_id].host_cuda == "13.0"
    pod = runpod.get_pod(pod_id)  # what RunPod reports for the pod it rented
    assert (pod["memoryInGb"], pod["vcpuCount"], pod["containerDiskInGb"]) == (96, 16, 150)


def test_by_default_a_pod_lands_on_a_host_whose_driver_runs_the_locked_torch(standin: RunpodStandin) -> None:
    from infra.runpod_worker import TORCH_CUDA

    # Without allowedCudaVersions RunPod takes any host; the stand-in's first free one has CUDA 12.8,
    # where gpu.lock's CUDA 13.0 torch finds no GPU.
    pod_id = create_pod(_from_job_variables({}))
    (deploy,) = standin.ops("podFindAndDeployOnDemand")
    assert TORCH_CUDA in deploy.input["allowedCudaVersions"]
    assert standin.pods[pod_id].host_cuda == TORCH_CUDA


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"allowed_cuda_versions": ["12.8"]}, "allowed_cuda_versions.*12.8.*CUDA 13.0"),
        ({"allowed_cuda_versions": ["13"]}, "allowed_cuda_versions.*'13'"),
        ({"allowed_cuda_versions": ['13.0", other']}, "allowed_cuda_versions"),
        ({"allowed_cuda_versions": []}, "allowed_cuda_versions"),
        ({"min_memory_in_gb": 0}, "min_memory_in_gb"),
        ({"min_vcpu_count": 0}, "min_vcpu_count"),
        ({"min_memory_in_gb": 1.5}, "min_memory_in_gb"),
        ({"container_disk_gb": 0}, "container_disk_gb"),
    ],
)
def test_a_pod_request_runpod_would_reject_is_refused_before_any_pod(
    standin: RunpodStandin, values: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        create_pod(_from_job_variables(values))
    assert standin.pods == {} and not standin.ops("podFindAndDeployOnDemand")


def test_deployments_reference_secrets_not_values() -> None:
    text = (REPO / "deployments" / "prefect.yaml").read_text()
    gpu_vars = yaml.safe_load(text)["definitions"]["gpu_job_variables"]
    assert {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_KEY"} <= set(
        gpu_vars["secret_env"]
    )
    assert "container_registry_auth_id" in gpu_vars
    assert not any(
        k in gpu_vars.get("env", {}) for k in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_KEY")
    )


@pytest.mark.slow
def test_stopping_the_worker_terminates_in_flight_pods_and_crashes_their_runs(tmp_path: Path) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate

    from infra.runpod_worker import RunpodWorker
    from tests.helpers.local_prefect_server import shared_prefect_server
    from tests.test_runpod_worker import Stack, _deploy

    env = shared_prefect_server()
    pool = "gpu-stop-test"
    with RunpodStandin(VENV_BIN, tmp_path / "pods") as standin:
        (tmp_path / "pods").mkdir(exist_ok=True)
        template = RunpodWorker.get_default_base_job_template()
        props = template["variables"]["properties"]
        props["poll_interval_seconds"]["default"] = 0.5
        props["allow_local_api_url"]["default"] = True
        stack_env = {**env, "RUNPOD_API_BASE_URL": standin.url, "RUNPOD_API_KEY": standin.api_key}
        st = Stack(stack_env, standin, None, tmp_path / "worker.log")  # type: ignore[arg-type]
        st.call(
            lambda c: c.create_work_pool(
                WorkPoolCreate(name=pool, type="runpod", base_job_template=template), overwrite=True
            )
        )
        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "runpod"],
                env=stack_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                start_new_session=True,
            )
        st.worker = worker
        try:
            import tests.test_runpod_worker as drill

            old_pool, drill.POOL = drill.POOL, pool
            try:
                dep = _deploy(st, drill.sleepy_flow, "sleepy-stop", {"gpu_type_id": "NVIDIA H200"})
            finally:
                drill.POOL = old_pool
            run_id = st.call(lambda c: c.create_flow_run_from_deployment(dep)).id
            running = st.wait_run(
                run_id,
                lambda r: r.state is not None and (r.state.is_running() or r.state.is_final()),
                timeout=120,
            )
            assert running.state.is_running(), running.state
            pod_id = str(running.infrastructure_pid)
            assert standin.process_alive(pod_id)

            worker.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            worker.wait(timeout=30)
            assert time.monotonic() - t0 < 30
            assert [r.input["podId"] for r in standin.ops("podTerminate")] == [pod_id]
            assert not standin.process_alive(pod_id)
            done = st.wait_run(run_id, lambda r: r.state is not None and r.state.is_final(), timeout=30)
            assert done.state.is_crashed(), done.state
            assert "worker was stopped (SIGTERM)" in (done.state.message or "")
        finally:
            if worker.poll() is None:
                worker.kill()


def test_every_gpu_stage_pod_gets_what_cyclej_plan_prints_for_it(standin: RunpodStandin) -> None:
    """`cyclej plan --preset gptj` → the stage deployments' job variables (deployments/prefect.yaml, pinned
    to the plan by tests/test_deployments.py) → the pod RunPod is asked for: GPU, RAM, vCPU and disk."""
    from cyclej.config import load_config
    from cyclej.pipeline.sizing import plan

    planned = {p.stage: p.job_variables() for p in plan(load_config(preset="gptj")) if p.device == "gpu"}
    deployments = {
        d["name"]: d
        for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    }
    for stage, wanted in planned.items():
        job_variables = deployments[stage]["work_pool"]["job_variables"]
        asked = {k: v for k, v in job_variables.items() if k in (*wanted, "allowed_cuda_versions")}
        create_pod(_from_job_variables(asked))
        spec = standin.ops("podFindAndDeployOnDemand")[-1].input
        got = {
            "gpu_type_id": spec["gpuTypeId"],
            "gpu_count": spec["gpuCount"],
            "min_memory_in_gb": spec["minMemoryInGb"],
            "min_vcpu_count": spec["minVcpuCount"],
            "container_disk_gb": spec["containerDiskInGb"],
        }
        assert got == wanted, stage
    assert planned["rl"]["min_memory_in_gb"] >= 68 and planned["rl"]["min_vcpu_count"] >= 8
    # The 4-GPU RL deployment: the plan at world size 4, and a pod whose stage runs 4 ranks.
    wanted = {
        p.stage: p.job_variables()
        for p in plan(load_config(preset="gptj", overrides=["resources.gpus.rl=4"]))
    }["rl"]
    job_variables = deployments["rl-4gpu"]["work_pool"]["job_variables"]
    create_pod(
        _from_job_variables(
            {k: v for k, v in job_variables.items() if k in (*wanted, "allowed_cuda_versions")}
        )
    )
    spec = standin.ops("podFindAndDeployOnDemand")[-1].input
    assert (
        spec["gpuTypeId"],
        spec["gpuCount"],
        spec["minMemoryInGb"],
        spec["minVcpuCount"],
        spec["containerDiskInGb"],
    ) == (
        wanted["gpu_type_id"],
        4,
        wanted["min_memory_in_gb"],
        wanted["min_vcpu_count"],
        wanted["container_disk_gb"],
    )
    assert {e["key"]: e["value"] for e in spec["env"]}["CYCLEJ_GPUS"] == "4"


# What the stage inside a pod reads for its world size: cyclej.runtime.distributed.gpus_for, with the
# pod's env only.
RANKS_PROBE = (
    'python -c "from cyclej.config import load_config; from cyclej.runtime.distributed import gpus_for; '
    "cfg = load_config(preset='tiny', overrides=['resources.gpus.rl=4']); "
    "print('ranks', gpus_for(cfg, 'rl'), gpus_for(cfg, 'eval'))\""
)


def test_a_pod_of_four_gpus_runs_four_ranks_and_a_pod_of_one_runs_one(standin: RunpodStandin) -> None:
    """The worker's CYCLEJ_GPUS is the pod's gpu_count: the stage inside runs one rank per GPU, and a config's
    resources.gpus.rl: 4 cannot put 4 ranks on a 1-GPU pod."""
    import cyclej.runtime.distributed
    import infra.runpod_worker

    assert infra.runpod_worker.GPUS_ENV == cyclej.runtime.distributed.GPUS_ENV == "CYCLEJ_GPUS"
    four = create_pod(
        _from_job_variables(
            {
                "gpu_type_id": "NVIDIA A100 80GB PCIe",
                "gpu_count": 4,
                "env": {**LOCAL_API, "PYTHONPATH": str(REPO)},
                "command": RANKS_PROBE,
            }
        )
    )
    one = create_pod(
        _from_job_variables(
            {
                "gpu_type_id": "NVIDIA A40",
                "env": {**LOCAL_API, "PYTHONPATH": str(REPO)},
                "command": RANKS_PROBE,
            }
        )
    )
    specs = [r.input for r in standin.ops("podFindAndDeployOnDemand")]
    envs = [{e["key"]: e["value"] for e in s["env"]} for s in specs]
    assert [s["gpuCount"] for s in specs] == [4, 1]
    assert [e.get("CYCLEJ_GPUS", "1") for e in envs] == ["4", "1"]
    for pod_id, ranks in ((four, "ranks 4 1"), (one, "ranks 1 1")):
        wait_exit(standin, pod_id)
        assert ranks in standin.pod_log(pod_id), standin.pod_log(pod_id)[-2000:]


def test_a_deployments_own_cyclej_gpus_wins_when_the_pod_has_the_gpus(standin: RunpodStandin) -> None:
    create_pod(
        job(gpu_type_id="NVIDIA H100 80GB HBM3", gpu_count=4, command="true", env={"CYCLEJ_GPUS": "2"})
    )
    (deploy,) = standin.ops("podFindAndDeployOnDemand")
    assert deploy.input["gpuCount"] == 4
    assert {e["key"]: e["value"] for e in deploy.input["env"]}["CYCLEJ_GPUS"] == "2"


@pytest.mark.parametrize("value", ["8", "0", "four", ""])
def test_more_ranks_than_the_pods_gpus_is_refused_before_any_pod(standin: RunpodStandin, value: str) -> None:
    with pytest.raises(ValueError, match="CYCLEJ_GPUS.*gpu_count 4"):
        create_pod(
            job(gpu_type_id="NVIDIA H100 80GB HBM3", gpu_count=4, command="true", env={"CYCLEJ_GPUS": value})
        )
    assert standin.pods == {} and not standin.ops("podFindAndDeployOnDemand")
