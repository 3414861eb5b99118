"""The RunPod worker drill: a real Prefect server, a `runpod` work pool, `prefect worker start --type runpod`
and the RunPod API played by a local stand-in that runs each pod's command as a local process.

- a run of a deployment starts one pod with the pool's + deployment's + run's job variables, completes,
  and its pod is terminated;
- a run cancelled while running ends Cancelled and its pod is terminated;
- a run whose pod disappears (spot interruption) ends Crashed; so does one its pod never starts;
- a run cancelled before it started (no Prefect process in the pod to notice) gets its pod terminated;
- Prefect's pre-start cancellation hook (`kill_infrastructure`) terminates a pod, and a missing pod is
  `InfrastructureNotFound`.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow

REPO = Path(__file__).resolve().parents[1]
POOL = "gpu-test"
# Quotes, backslashes and JSON in an env value must survive the SDK's GraphQL string pasting.
TRICKY_VALUE = 'say "hi" \\ {"a": [1, 2]}'
# A job configuration's Prefect API for pods that are local processes (the stand-in's).
LOCAL: dict[str, Any] = {"env": {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, "allow_local_api_url": True}


@flow(name="runpod-quick")
def quick_flow(x: int = 1) -> int:
    return x + 1


@flow(name="runpod-sleepy")
def sleepy_flow(seconds: float = 300.0) -> None:
    time.sleep(seconds)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


class Stack:
    def __init__(
        self, env: dict[str, str], standin: Any, worker: subprocess.Popen[bytes], worker_log: Path
    ) -> None:
        self.env, self.standin, self.worker, self.worker_log = env, standin, worker, worker_log
        self.runs: dict[str, UUID] = {}

    async def _client_call(self, fn: Callable[[Any], Any]) -> Any:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.env["PREFECT_API_URL"]}):
            async with get_client() as client:
                return await fn(client)

    def call(self, fn: Callable[[Any], Any]) -> Any:
        return _run(self._client_call(fn))

    def wait_run(self, run_id: UUID, done: Callable[[Any], bool], timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            run = self.call(lambda c: c.read_flow_run(run_id))
            if done(run):
                return run
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"flow run {run_id} is {run.state and run.state.name} after {timeout:.0f} s\n"
                    f"worker log:\n{self.worker_log.read_text()[-4000:]}\n"
                    + "\n".join(f"pod {p}:\n{self.standin.pod_log(p)[-3000:]}" for p in self.standin.pods)
                )
            time.sleep(0.5)

    def wait_terminated(self, pod_id: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        # TERMINATED is set once the stand-in has stopped the pod's processes (SIGTERM, then SIGKILL).
        while not (
            any(r.input and r.input.get("podId") == pod_id for r in self.standin.ops("podTerminate"))
            and self.standin.pods[pod_id].desired_status == "TERMINATED"
        ):
            assert time.monotonic() < deadline, (
                f"pod {pod_id} never terminated:\n{self.worker_log.read_text()[-3000:]}"
            )
            time.sleep(0.3)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from prefect.client.schemas.actions import WorkPoolCreate

    from infra.runpod_worker import RunpodWorker
    from tests.helpers.local_prefect_server import VENV_BIN, shared_prefect_server
    from tests.helpers.runpod_standin import RunpodStandin

    tmp = tmp_path_factory.mktemp("runpod")
    env = shared_prefect_server()
    with RunpodStandin(VENV_BIN, tmp / "pods") as standin:
        (tmp / "pods").mkdir(exist_ok=True)
        template = RunpodWorker.get_default_base_job_template()
        props = template["variables"]["properties"]
        props["image"]["default"] = "cyclej-gpu:test"
        props["network_volume_id"]["default"] = "vol-standin"
        props["poll_interval_seconds"]["default"] = 0.5
        props["cancel_grace_seconds"]["default"] = 30
        props["allow_local_api_url"]["default"] = True  # the stand-in's pods are processes on this machine
        props["env"]["default"] = {"POOL_VAR": "from-pool", "TRICKY": TRICKY_VALUE}
        stack_env = {**env, "RUNPOD_API_BASE_URL": standin.url, "RUNPOD_API_KEY": standin.api_key}
        probe = Stack(stack_env, standin, None, tmp / "worker.log")  # type: ignore[arg-type]
        probe.call(
            lambda c: c.create_work_pool(WorkPoolCreate(name=POOL, type="runpod", base_job_template=template))
        )
        with open(tmp / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [
                    str(VENV_BIN / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    POOL,
                    "--type",
                    "runpod",
                    "--name",
                    "rp-test",
                ],
                env=stack_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                start_new_session=True,
            )
        try:
            st = Stack(stack_env, standin, worker, tmp / "worker.log")
            # All runs start at once (the worker runs them concurrently): the drill's wall time is the
            # slowest run's, not the sum.
            # The pod's RAM, vCPU, disk and host CUDA as `cyclej plan` would ask for an RL stage.
            quick = _deploy(
                st,
                quick_flow,
                "quick",
                {
                    "gpu_type_id": "NVIDIA A100 80GB PCIe",
                    "container_disk_gb": 150,
                    "min_memory_in_gb": 96,
                    "min_vcpu_count": 16,
                    "allowed_cuda_versions": ["13.0"],
                    "env": {"DEPLOYMENT_VAR": "from-deployment"},
                },
            )
            sleepy = _deploy(st, sleepy_flow, "sleepy", {"gpu_type_id": "NVIDIA A40"})
            st.runs = {
                "quick": st.call(
                    lambda c: c.create_flow_run_from_deployment(
                        quick, parameters={"x": 41}, job_variables={"gpu_count": 2}
                    )
                ).id,
                "cancel": st.call(lambda c: c.create_flow_run_from_deployment(sleepy)).id,
                "vanish": st.call(lambda c: c.create_flow_run_from_deployment(sleepy)).id,
            }
            # A pod whose command never starts the run (a broken image would do the same).
            hang = _deploy(st, sleepy_flow, "hang", {"command": "sleep 300", "cancel_grace_seconds": 1})
            st.runs["never_starts"] = st.call(
                lambda c: c.create_flow_run_from_deployment(hang, job_variables={"start_timeout_seconds": 5})
            ).id
            st.runs["cancel_pending"] = st.call(
                lambda c: c.create_flow_run_from_deployment(
                    hang, job_variables={"start_timeout_seconds": 300}
                )
            ).id
            yield st
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()


def _deploy(stack: Stack, fn: Any, name: str, job_variables: dict[str, Any]) -> UUID:
    entry = f"tests/test_runpod_worker.py:{fn.__name__}"

    async def create(c: Any) -> UUID:
        flow_id = await c.create_flow_from_name(fn.name)
        return await c.create_deployment(
            flow_id=flow_id,
            name=name,
            work_pool_name=POOL,
            entrypoint=entry,
            job_variables=job_variables,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}],
        )

    return stack.call(create)


def test_run_starts_pod_with_job_variables_completes_and_terminates_pod(stack: Stack) -> None:
    run_id = stack.runs["quick"]
    done = stack.wait_run(run_id, lambda r: r.state is not None and r.state.is_final(), timeout=90)
    assert done.state.is_completed(), done.state

    deploys = [
        r
        for r in stack.standin.ops("podFindAndDeployOnDemand")
        if any(e["key"] == "PREFECT__FLOW_RUN_ID" and e["value"] == str(run_id) for e in r.input["env"])
    ]
    assert len(deploys) == 1, "exactly one pod per flow run"
    spec = deploys[0].input
    env = {e["key"]: e["value"] for e in spec["env"]}
    assert spec["gpuTypeId"] == "NVIDIA A100 80GB PCIe"  # deployment job variable
    assert spec["gpuCount"] == 2  # flow-run job variable
    assert (
        env["CYCLEJ_GPUS"] == "2"
    )  # the stage in the pod runs one rank per GPU (cyclej.runtime.distributed)
    assert spec["imageName"] == "cyclej-gpu:test"  # pool default
    assert spec["networkVolumeId"] == "vol-standin"
    assert spec["dataCenterId"] == "EU-RO-1"  # looked up from the volume by the SDK
    assert spec["containerDiskInGb"] == 150 and spec["volumeMountPath"] == "/runpod-volume"
    assert spec["minMemoryInGb"] == 96 and spec["minVcpuCount"] == 16  # not the SDK's 1 GB / 1 vCPU
    assert spec["allowedCudaVersions"] == ["13.0"]
    assert stack.standin.pods[str(done.infrastructure_pid)].host_cuda == "13.0"
    assert spec["cloudType"] == "SECURE"
    assert spec["dockerArgs"] == f"prefect flow-run execute {run_id}"
    assert env["PREFECT_API_URL"] == stack.env["PREFECT_API_URL"]
    assert env["POOL_VAR"] == "from-pool" and env["DEPLOYMENT_VAR"] == "from-deployment"
    assert env["TRICKY"] == TRICKY_VALUE
    pod_id = str(done.infrastructure_pid)
    assert pod_id in stack.standin.pods
    stack.wait_terminated(pod_id)
    assert not stack.standin.process_alive(pod_id)


def test_cancelled_run_terminates_its_pod(stack: Stack) -> None:
    from prefect.states import Cancelling

    run_id = stack.runs["cancel"]
    running = stack.wait_run(
        run_id, lambda r: r.state is not None and (r.state.is_running() or r.state.is_final()), timeout=90
    )
    assert running.state.is_running(), running.state
    pod_id = str(running.infrastructure_pid)
    assert stack.standin.process_alive(pod_id)
    stack.call(lambda c: c.set_flow_run_state(run_id, Cancelling(), force=True))
    done = stack.wait_run(run_id, lambda r: r.state is not None and r.state.is_final(), timeout=45)
    assert done.state.is_cancelled(), done.state
    stack.wait_terminated(pod_id)
    assert not stack.standin.process_alive(pod_id)


def test_run_whose_pod_vanishes_is_crashed(stack: Stack) -> None:
    """A spot pod reclaimed (or deleted in RunPod's console) mid-run: the worker notices and the run is
    Crashed, so a retry can resume it, instead of the run staying Running forever."""
    run_id = stack.runs["vanish"]
    running = stack.wait_run(
        run_id, lambda r: r.state is not None and (r.state.is_running() or r.state.is_final()), timeout=90
    )
    assert running.state.is_running(), running.state
    pod_id = str(running.infrastructure_pid)
    # Deleted on RunPod's side: from then on RunPod answers queries about it with a generic error, which
    # the old worker took for an API blip, forever.
    stack.standin.delete_pod(pod_id)
    done = stack.wait_run(run_id, lambda r: r.state is not None and r.state.is_final(), timeout=45)
    assert done.state.is_crashed(), done.state
    assert "non-zero status code 3" in (done.state.message or "")


def test_run_never_started_by_its_pod_is_crashed_and_pod_terminated(stack: Stack) -> None:
    run_id = stack.runs["never_starts"]
    done = stack.wait_run(run_id, lambda r: r.state is not None and r.state.is_final(), timeout=90)
    assert done.state.is_crashed() and "non-zero status code 2" in (done.state.message or ""), done.state
    stack.wait_terminated(str(done.infrastructure_pid))


def test_run_cancelled_before_it_started_terminates_its_pod(stack: Stack) -> None:
    """No Prefect process in the pod sees this cancellation: Prefect's worker hook (kill_infrastructure)
    or the worker's Cancelling grace period must terminate the pod."""
    from prefect.states import Cancelling

    run_id = stack.runs["cancel_pending"]
    pending = stack.wait_run(run_id, lambda r: r.infrastructure_pid is not None, timeout=90)
    pod_id = str(pending.infrastructure_pid)
    assert pending.start_time is None and stack.standin.process_alive(pod_id)
    stack.call(lambda c: c.set_flow_run_state(run_id, Cancelling(), force=True))
    done = stack.wait_run(run_id, lambda r: r.state is not None and r.state.is_final(), timeout=45)
    assert done.state.is_cancelled(), done.state
    stack.wait_terminated(pod_id)
    assert not stack.standin.process_alive(pod_id)


def test_kill_infrastructure_terminates_pod_and_reports_a_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect calls kill_infrastructure for a run cancelled before it started (it has a pod id only)."""
    from prefect.exceptions import InfrastructureNotFound

    from infra.runpod_worker import RunpodJobConfiguration, RunpodWorker, create_pod
    from tests.helpers.local_prefect_server import VENV_BIN
    from tests.helpers.runpod_standin import RunpodStandin

    with RunpodStandin(VENV_BIN, tmp_path) as standin:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", standin.url)
        monkeypatch.setenv("RUNPOD_API_KEY", standin.api_key)
        cfg = RunpodJobConfiguration(
            gpu_type_id="NVIDIA RTX A6000", command="sleep 60", name="pending-run", **LOCAL
        )
        pod_id = create_pod(cfg)
        assert standin.process_alive(pod_id)
        worker = RunpodWorker(work_pool_name=POOL)
        _run(worker.kill_infrastructure(pod_id, cfg))
        assert [r.input["podId"] for r in standin.ops("podTerminate")] == [pod_id]
        assert not standin.process_alive(pod_id)
        with pytest.raises(InfrastructureNotFound):
            _run(worker.kill_infrastructure(pod_id, cfg))


def test_unknown_gpu_type_and_wrong_key_fail_before_any_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.runpod_worker import RunpodJobConfiguration, create_pod
    from tests.helpers.local_prefect_server import VENV_BIN
    from tests.helpers.runpod_standin import RunpodStandin

    with RunpodStandin(VENV_BIN, tmp_path) as standin:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", standin.url)
        monkeypatch.setenv("RUNPOD_API_KEY", standin.api_key)
        with pytest.raises(ValueError, match="NVIDIA B999"):
            create_pod(RunpodJobConfiguration(gpu_type_id="NVIDIA B999", command="true", **LOCAL))
        monkeypatch.setenv("RUNPOD_API_KEY", "wrong-key")
        with pytest.raises(Exception, match="Unauthorized"):
            create_pod(RunpodJobConfiguration(gpu_type_id="NVIDIA A40", command="true", **LOCAL))
        assert standin.pods == {}
