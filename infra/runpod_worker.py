"""A Prefect worker type `runpod`: one RunPod GPU pod per flow run.

    prefect work-pool create cyclej-gpu --type runpod
    RUNPOD_API_KEY=... prefect worker start --pool cyclej-gpu --type runpod

For each flow run the worker starts a pod with the `runpod` SDK (image, GPU type/count, cloud type,
network volume, container disk, host RAM and vCPUs, the host CUDA versions the image's torch runs on,
env), whose command is `prefect flow-run execute <flow-run-id>`: the pod
talks to the Prefect API itself (PREFECT_API_URL is copied from the worker's settings into the pod's env),
so it must be reachable from RunPod (Prefect Cloud, or a server with a public address): a loopback,
private or unresolvable PREFECT_API_URL is refused before any pod is rented.

Secrets never appear in the pod spec (which RunPod's console shows): the job variable `secret_env` maps
an env var to a RunPod secret (RunPod console → Secrets), written as `{{ RUNPOD_SECRET_<name> }}`, which
RunPod substitutes inside the container. The worker's PREFECT_API_KEY goes the same way
(`secret_env: {PREFECT_API_KEY: <secret>}`); a plain HF_TOKEN, AWS key or API key in `env` is refused.
A private image registry: `container_registry_auth_id` (RunPod console → Container Registry Auth).

A pod of `gpu_count` GPUs gets CYCLEJ_GPUS=<gpu_count> in its env, so the stage inside runs one rank per
GPU (cyclej.runtime.distributed.gpus_for; a config's `resources.gpus` cannot ask a 1-GPU pod for 4 ranks). A
deployment's own `env` CYCLEJ_GPUS wins when it asks for 1 to gpu_count ranks, and is refused otherwise.

Stopping the worker (SIGTERM, or Ctrl-C) terminates the pods of the runs it is watching and marks those
runs Crashed (a retry resumes them from their checkpoints), then exits: no pod is left billing.

A pod reports no exit code, so the worker watches the *flow run* through the Prefect API and terminates
the pod when the run reaches a final state (Completed, Failed, Crashed, Cancelled). A run cancelled while
running is stopped by `prefect flow-run execute` inside the pod (it observes its own cancellation); the
worker then sees `Cancelled` and terminates the pod, or terminates it itself when the run stays
`Cancelling` longer than `cancel_grace_seconds`. A run cancelled before it started is handled by
Prefect's own worker hook, `kill_infrastructure` below. A pod that vanishes (spot interruption, deleted in
RunPod's console: the API then answers queries about it with an error, so the worker checks the
account's pod list) or never starts the run (bad image, no capacity) ends the run as Crashed.

Registered through the `prefect.collections` entry point in pyproject.toml, so `--type runpod` finds it.
The `runpod` SDK is imported only when a pod is started: Prefect imports this module whenever it loads
its collections, and the SDK's import is slow.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import anyio
import anyio.abc
import httpx
from prefect.exceptions import InfrastructureNotFound
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field

if TYPE_CHECKING:
    from logging import LoggerAdapter
    from uuid import UUID

    from prefect.client.schemas.objects import FlowRun

DEFAULT_IMAGE = "ghcr.io/cyclej/cyclej-gpu:latest"
CloudType = Literal["ALL", "SECURE", "COMMUNITY"]
# Pod states in which the container can no longer run the flow.
POD_GONE_STATES = ("EXITED", "TERMINATED")
API_OUTAGE_SECONDS = 600
# requirements/gpu.lock's torch is its CUDA 13.0 build (cuda-toolkit 13.0.3, nvidia-*-cu13): on a host whose
# driver is older (CUDA < 13.0, driver < 580) torch.cuda.is_available() is False. tests/test_lock.py keeps
# this, the lock and infra/Dockerfile's base image in step.
TORCH_CUDA = "13.0"
# RunPod's values for allowedCudaVersions (its API reference for creating a pod), newest first: the CUDA
# version of the host's driver. Without the field RunPod rents any host.
RUNPOD_CUDA_VERSIONS = (
    "13.0",
    "12.9",
    "12.8",
    "12.7",
    "12.6",
    "12.5",
    "12.4",
    "12.3",
    "12.2",
    "12.1",
    "12.0",
    "11.8",
)


def _cuda(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


# Every RunPod CUDA version the locked torch runs on (minor-version compatibility within CUDA 13).
DEFAULT_CUDA_VERSIONS = [v for v in RUNPOD_CUDA_VERSIONS if _cuda(v) >= _cuda(TORCH_CUDA)]
# Floors for a stage whose deployment names none (`cyclej plan` says what each stage needs): the SDK's own
# default is 1 GB and 1 vCPU, too little to load a model, and any RunPod GPU host has this much.
DEFAULT_MIN_MEMORY_GB = 16
DEFAULT_MIN_VCPUS = 4
# How many ranks the stage in a pod runs: cyclej.runtime.distributed.GPUS_ENV (not imported: Prefect
# imports this module whenever it loads its collections; tests/test_runpod_pods.py checks the two names
# agree).
GPUS_ENV = "CYCLEJ_GPUS"
# Env vars that must reach a pod as RunPod secrets (`secret_env`), never as plain values in its spec.
SENSITIVE_ENV = (
    "PREFECT_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "RUNPOD_API_KEY",
)


class RunpodJobConfiguration(BaseJobConfiguration):
    """What the worker needs to start one pod; filled from the work pool's base job template and the
    deployment's / flow run's job variables."""

    image: str = Field(DEFAULT_IMAGE, description="container image (built from infra/Dockerfile)")
    gpu_type_id: str = Field("NVIDIA A40", description="RunPod GPU type id, e.g. 'NVIDIA A100 80GB PCIe'")
    gpu_count: int = Field(1, ge=1)
    cloud_type: CloudType = "SECURE"
    network_volume_id: str | None = Field(
        None, description="mounted at volume_mount_path; pins the data center"
    )
    data_center_id: str | None = None
    container_disk_gb: int = Field(50, ge=1)
    min_memory_in_gb: int = Field(
        DEFAULT_MIN_MEMORY_GB, ge=1, description="host RAM the pod gets at least (GB)"
    )
    min_vcpu_count: int = Field(DEFAULT_MIN_VCPUS, ge=1, description="vCPUs the pod gets at least")
    allowed_cuda_versions: list[str] = Field(
        list(DEFAULT_CUDA_VERSIONS),
        description="host CUDA (driver) versions to rent; the image's torch needs >= 13.0",
    )
    volume_in_gb: int = Field(0, ge=0, description="pod-local volume (0 when a network volume is used)")
    volume_mount_path: str = "/runpod-volume"
    poll_interval_seconds: float = Field(10.0, gt=0, description="how often the flow run's state is read")
    start_timeout_seconds: float = Field(
        1800.0,
        gt=0,
        description="a run not started by then (image pull, capacity) is Crashed and its pod terminated",
    )
    cancel_grace_seconds: float = Field(
        60.0, ge=0, description="a run still Cancelling after this long gets its pod terminated by the worker"
    )
    secret_env: dict[str, str] = Field(
        default_factory=dict, description="env var -> RunPod secret name, resolved by RunPod inside the pod"
    )
    container_registry_auth_id: str | None = Field(None, description="RunPod container registry auth id")
    allow_local_api_url: bool = Field(
        False, description="accept a loopback/private PREFECT_API_URL (only for pods on this machine: tests)"
    )

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: Any = None,
        flow: Any = None,
        work_pool: Any = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        configured = self.command is not None
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id)
        # The default `prefect flow-run execute` reads PREFECT__FLOW_RUN_ID; the explicit id makes the
        # pod's start command in RunPod's console say which run it serves.
        if not configured:
            self.command = f"{self._base_flow_run_command()} {flow_run.id}"


class RunpodVariables(BaseVariables):
    """The job variables a deployment may set (shown in the work pool's form in the UI)."""

    image: str = Field(DEFAULT_IMAGE, description="container image (built from infra/Dockerfile)")
    gpu_type_id: str = Field(
        "NVIDIA A40", description="RunPod GPU type id; `cyclej plan` suggests one per stage"
    )
    gpu_count: int = Field(1, ge=1)
    cloud_type: CloudType = Field("SECURE", description="SECURE, COMMUNITY or ALL")
    network_volume_id: str | None = Field(None, description="RunPod network volume id (artifacts, HF cache)")
    data_center_id: str | None = Field(None, description="defaults to the network volume's data center")
    container_disk_gb: int = Field(
        50, ge=1, description="the pod's container disk (GB); `cyclej plan` sizes it"
    )
    min_memory_in_gb: int = Field(
        DEFAULT_MIN_MEMORY_GB,
        ge=1,
        description="host RAM the pod gets at least (GB); `cyclej plan` says per stage",
    )
    min_vcpu_count: int = Field(
        DEFAULT_MIN_VCPUS, ge=1, description="vCPUs the pod gets at least; `cyclej plan`"
    )
    allowed_cuda_versions: list[str] = Field(
        list(DEFAULT_CUDA_VERSIONS),
        description=f"host CUDA (driver) versions RunPod may rent, from {', '.join(RUNPOD_CUDA_VERSIONS)}; "
        f"the image's torch (requirements/gpu.lock) needs {TORCH_CUDA} or newer",
    )
    volume_in_gb: int = Field(0, ge=0)
    volume_mount_path: str = "/runpod-volume"
    poll_interval_seconds: float = Field(10.0, gt=0)
    start_timeout_seconds: float = Field(1800.0, gt=0)
    cancel_grace_seconds: float = Field(60.0, ge=0)
    secret_env: dict[str, str] = Field(
        default_factory=dict,
        description="env var -> RunPod secret name (RunPod console → Secrets), e.g. {HF_TOKEN: hf_token, "
        "PREFECT_API_KEY: prefect_api_key}: the pod spec holds only {{ RUNPOD_SECRET_<name> }}",
    )
    container_registry_auth_id: str | None = Field(
        None, description="RunPod container registry auth id, for a private image (RunPod console → Settings)"
    )
    allow_local_api_url: bool = Field(
        False, description="accept a loopback/private PREFECT_API_URL: only for a RunPod stand-in (tests)"
    )


class RunpodWorkerResult(BaseWorkerResult):
    """identifier: the pod id; status_code 0 when the flow run reached a final state by itself."""


# The SDK reads its API key from a module global; one lock keeps concurrent runs of one worker from
# racing on it (every run of a worker uses the same key anyway).
_sdk_lock = threading.Lock()


def _runpod_sdk() -> Any:
    import runpod

    key = os.environ.get("RUNPOD_API_KEY") or runpod.api_key
    if not key:
        raise RuntimeError("RUNPOD_API_KEY is not set in the worker's environment (or `runpod config`)")
    runpod.api_key = key
    return runpod


def _graphql_str(value: str) -> str:
    """The SDK pastes strings into its GraphQL text unescaped; GraphQL string escapes are JSON's, so a
    value with quotes, backslashes or newlines (a JSON env var, a multi-line command) stays one string."""
    return json.dumps(value)[1:-1]


def pod_env(cfg: RunpodJobConfiguration) -> dict[str, str]:
    """The env the pod spec carries: plain values, CYCLEJ_GPUS (the pod's GPU count unless `env` sets it),
    and RunPod secret references for `secret_env`. Refuses a sensitive value in plain text (the spec is
    visible in RunPod's console), and more ranks than the pod has GPUs."""
    plain = {k: v for k, v in cfg.env.items() if v is not None}
    ranks = plain.setdefault(GPUS_ENV, str(cfg.gpu_count))
    if not ranks.isdigit() or not 1 <= int(ranks) <= cfg.gpu_count:
        # A rank beyond the GPUs would ask for a device the pod lacks (cuda:LOCAL_RANK), after the pod is
        # paid.
        raise ValueError(
            f"env {GPUS_ENV}={ranks!r} on a pod of gpu_count {cfg.gpu_count}: "
            f"give 1 to {cfg.gpu_count} ranks, or leave it out (the worker sets it to gpu_count)"
        )
    for key, secret in cfg.secret_env.items():
        if not secret or any(c in secret for c in "{} "):
            raise ValueError(f"secret_env.{key}: {secret!r} is not a RunPod secret name")
        plain.pop(key, None)  # e.g. the worker's own PREFECT_API_KEY: replaced by the secret
    for key in SENSITIVE_ENV:
        if plain.get(key):
            where = "the worker's Prefect settings" if key == "PREFECT_API_KEY" else "the job variable env"
            raise ValueError(
                f"{key} from {where} would be plain text in the RunPod pod spec; store it as a RunPod secret "
                f"and set the job variable secret_env: {{{key}: <secret name>}}"
            )
    refs = {k: f"{{{{ RUNPOD_SECRET_{name} }}}}" for k, name in cfg.secret_env.items()}
    return {**plain, **refs}


def check_api_url(url: str | None, allow_local: bool = False) -> None:
    """Refuse, before renting a pod, a PREFECT_API_URL a pod on RunPod cannot reach: the pod would bill
    until the start timeout, then the run would be Crashed."""
    if not url:
        raise ValueError(
            "PREFECT_API_URL is not set for the worker: a pod would have no Prefect API to report to"
        )
    if allow_local:
        return
    host = urlparse(url).hostname or ""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        raise ValueError(
            f"PREFECT_API_URL {url}: the host {host!r} does not resolve; pods could not reach it"
        ) from None
    for addr in addrs:
        ip = ipaddress.ip_address(addr.split("%")[0])
        if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified:
            raise ValueError(
                f"PREFECT_API_URL {url} is {addr}, which a RunPod pod cannot reach; use Prefect Cloud or a "
                "server with a public address (set PREFECT_API_URL for the worker)"
            )


def check_cuda_versions(versions: list[str]) -> None:
    """Refuse, before renting a pod, host CUDA versions RunPod does not know (its API rejects them) or whose
    driver cannot run the image's torch: the pod would start, torch would find no GPU, and the GPU would
    bill for a CPU run (a stage configured for a GPU refuses to start there, cyclej.runtime.device)."""
    if not versions:
        raise ValueError(
            f"allowed_cuda_versions is empty; RunPod would rent no host: use {DEFAULT_CUDA_VERSIONS}"
        )
    for v in versions:
        newer = re.fullmatch(r"\d+\.\d+", v) is not None and _cuda(v) > _cuda(RUNPOD_CUDA_VERSIONS[0])
        if (
            v not in RUNPOD_CUDA_VERSIONS and not newer
        ):  # a newer one: RunPod adds versions as drivers come out
            raise ValueError(
                f"allowed_cuda_versions: {v!r} is not a RunPod CUDA version "
                f"({', '.join(RUNPOD_CUDA_VERSIONS)})"
            )
        if _cuda(v) < _cuda(TORCH_CUDA):
            raise ValueError(
                f"allowed_cuda_versions: a CUDA {v} host cannot run the image's torch, "
                f"built for CUDA {TORCH_CUDA} (requirements/gpu.lock; NVIDIA driver >= 580): "
                f"torch would find no GPU. Allow only {TORCH_CUDA} and newer, e.g. {DEFAULT_CUDA_VERSIONS}"
            )


def create_pod(cfg: RunpodJobConfiguration) -> str:
    """Start the pod for one flow run; returns its id. Everything is checked before the pod is rented."""
    check_cuda_versions(cfg.allowed_cuda_versions)
    check_api_url(cfg.env.get("PREFECT_API_URL"), cfg.allow_local_api_url)
    env = {k: _graphql_str(v) for k, v in pod_env(cfg).items()}
    with _sdk_lock:
        runpod = _runpod_sdk()
        from runpod.api.graphql import run_graphql_query
        from runpod.api.mutations.pods import generate_pod_deployment_mutation

        try:
            runpod.get_gpu(cfg.gpu_type_id, cfg.gpu_count)
        except ValueError:
            raise ValueError(
                f"RunPod has no GPU type {cfg.gpu_type_id!r} (job variable gpu_type_id); "
                "ids look like 'NVIDIA A40' — list them with runpod.get_gpus()"
            ) from None
        data_center_id = cfg.data_center_id
        if cfg.network_volume_id and data_center_id is None:  # the volume pins the data center
            volumes = runpod.get_user()["networkVolumes"]
            data_center_id = next(
                (v["dataCenterId"] for v in volumes if v["id"] == cfg.network_volume_id), None
            )
        # The SDK's own mutation (what runpod.create_pod sends), plus the registry auth it has no argument
        # for.
        mutation = generate_pod_deployment_mutation(
            name=_graphql_str(cfg.name or "cyclej-flow-run"),
            image_name=cfg.image,
            gpu_type_id=cfg.gpu_type_id,
            cloud_type=cfg.cloud_type,
            support_public_ip=False,
            start_ssh=False,
            data_center_id=data_center_id,
            gpu_count=cfg.gpu_count,
            volume_in_gb=cfg.volume_in_gb,
            container_disk_in_gb=cfg.container_disk_gb,
            min_vcpu_count=cfg.min_vcpu_count,
            min_memory_in_gb=cfg.min_memory_in_gb,
            allowed_cuda_versions=cfg.allowed_cuda_versions,  # the SDK sends allowedCudaVersions: [...]
            docker_args=_graphql_str(cfg.command or ""),
            volume_mount_path=cfg.volume_mount_path,
            env=env,
            network_volume_id=cfg.network_volume_id,
        )
        if cfg.container_registry_auth_id:
            image_field = f'imageName: "{cfg.image}"'
            mutation = mutation.replace(
                image_field,
                f'{image_field}, containerRegistryAuthId: "{_graphql_str(cfg.container_registry_auth_id)}"',
                1,
            )
        pod = run_graphql_query(mutation)["data"]["podFindAndDeployOnDemand"]
    return str(pod["id"])


def pod_status(pod_id: str) -> str | None:
    """The pod's desiredStatus (RUNNING, EXITED, TERMINATED…), None when RunPod no longer knows it.

    RunPod answers a query about a pod it no longer knows (deleted in its console, reclaimed) with a
    generic error, which looks like an API blip: then the account's pod list decides."""
    with _sdk_lock:
        runpod = _runpod_sdk()
        try:
            pod = runpod.get_pod(pod_id)
        except runpod.error.QueryError:
            if any(p.get("id") == pod_id for p in runpod.get_pods() or []):
                raise  # it exists: a real blip
            return None
    return None if not pod else str(pod.get("desiredStatus") or "UNKNOWN")


def terminate_pod(pod_id: str) -> None:
    with _sdk_lock:
        _runpod_sdk().terminate_pod(pod_id)


class RunpodWorker(BaseWorker[RunpodJobConfiguration, RunpodVariables, RunpodWorkerResult]):
    type = "runpod"
    job_configuration = RunpodJobConfiguration
    job_configuration_variables = RunpodVariables
    _description = "Run each flow run in its own RunPod GPU pod, terminated when the run ends."
    _display_name = "RunPod"
    _documentation_url = "https://docs.runpod.io/pods/overview"
    _logo_url = "https://www.runpod.io/favicon.ico"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._terminated_pods: set[str] = set()
        self._in_flight: dict[UUID, str] = {}  # flow run id -> its pod, while the worker watches it

    async def start(self, *args: Any, **kwargs: Any) -> None:
        # After Prefect's CLI has set its own handlers (the first SIGTERM/SIGINT becomes a SIGINT to the
        # worker, which left pods and runs RUNNING): ours terminates the in-flight pods first.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._stop_on_signal)
        await super().start(*args, **kwargs)

    def _stop_on_signal(self, signum: int, frame: Any) -> None:
        """Terminate the pod of every run in flight, mark those runs Crashed, then exit (128 + signal)."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second signal ends the process at once
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        self.stop_in_flight(signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    def stop_in_flight(self, reason: str) -> list[str]:
        """Synchronous (runs in a signal handler): terminate the watched pods and crash their runs."""
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        stopped = []
        for run_id, pod_id in list(self._in_flight.items()):
            if pod_id not in self._terminated_pods:
                self._terminated_pods.add(pod_id)
                try:
                    terminate_pod(pod_id)
                except Exception as exc:  # noqa: BLE001 - named so a person can terminate it
                    self._logger.error(
                        f"Could not terminate pod {pod_id}: {exc}; terminate it in the RunPod console"
                    )
            try:
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(
                        run_id,
                        Crashed(
                            message=f"The RunPod worker was stopped ({reason}); pod {pod_id} terminated. "
                            "Retry the run to resume it from its last checkpoint."
                        ),
                        force=True,
                    )
            except Exception as exc:  # noqa: BLE001
                self._logger.error(f"Could not mark flow run {run_id} Crashed: {exc}")
            stopped.append(pod_id)
        if stopped:
            self._logger.warning(f"Worker stopped ({reason}): terminated pods {', '.join(stopped)}")
        return stopped

    async def run(
        self,
        flow_run: FlowRun,
        configuration: RunpodJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> RunpodWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        pod_id = await anyio.to_thread.run_sync(create_pod, configuration)
        logger.info(
            f"Started RunPod pod {pod_id} ({configuration.gpu_count}× {configuration.gpu_type_id}, "
            f"{configuration.cloud_type}, image {configuration.image})"
        )
        self._in_flight[flow_run.id] = pod_id
        if task_status is not None:
            task_status.started(pod_id)  # becomes the run's infrastructure_pid
        status_code = 1
        try:
            status_code = await self._watch(flow_run, pod_id, configuration, logger)
        finally:
            # Shielded: a worker shutting down must still not leave a paid GPU running.
            with anyio.CancelScope(shield=True):
                await self._terminate(pod_id, logger)
            self._in_flight.pop(flow_run.id, None)
        return RunpodWorkerResult(identifier=pod_id, status_code=status_code)

    async def _watch(
        self, flow_run: FlowRun, pod_id: str, cfg: RunpodJobConfiguration, logger: LoggerAdapter[Any]
    ) -> int:
        """Poll the flow run until it is final. 0: the run ended by itself (or was cancelled);
        non-zero: the pod died or never started the run, and the worker marks the run Crashed."""
        submitted = time.monotonic()
        cancelling_since: float | None = None
        api_down_since: float | None = None
        while True:
            try:
                run = await self.client.read_flow_run(flow_run.id)
                api_down_since = None
            except httpx.HTTPError as exc:
                # A Prefect API blip must not kill a pod mid-run; a long outage ends the watch.
                api_down_since = api_down_since or time.monotonic()
                if time.monotonic() - api_down_since > API_OUTAGE_SECONDS:
                    logger.error(
                        f"Prefect API unreachable for {API_OUTAGE_SECONDS} s ({exc}); "
                        f"terminating pod {pod_id}"
                    )
                    return 4
                logger.warning(f"Cannot read the flow run ({exc}); retrying")
                await anyio.sleep(cfg.poll_interval_seconds)
                continue
            state = run.state
            if state is not None and state.is_final():
                logger.info(f"Flow run reached {state.name}; terminating pod {pod_id}")
                return 0
            if state is not None and state.is_cancelling():
                cancelling_since = cancelling_since or time.monotonic()
                if time.monotonic() - cancelling_since > cfg.cancel_grace_seconds:
                    logger.warning(
                        f"Flow run still Cancelling after {cfg.cancel_grace_seconds:.0f} s; terminating pod"
                    )
                    await self._terminate(pod_id, logger)
                    await self._mark_flow_run_as_cancelled(
                        run,
                        state_updates={
                            "message": f"Cancelled: RunPod pod {pod_id} terminated by the worker."
                        },
                    )
                    return 0
            elif run.start_time is None and time.monotonic() - submitted > cfg.start_timeout_seconds:
                logger.error(
                    f"Pod {pod_id} did not start the flow run within {cfg.start_timeout_seconds:.0f} s"
                )
                return 2
            try:
                status = await anyio.to_thread.run_sync(pod_status, pod_id)
            except Exception as exc:  # noqa: BLE001 - a RunPod API blip; the flow run's state decides
                logger.warning(f"Cannot read pod {pod_id} ({exc}); retrying")
                status = "UNKNOWN"
            if status is None or status in POD_GONE_STATES:
                logger.error(
                    f"Pod {pod_id} is {status or 'gone'} while the flow run is {state and state.name}"
                )
                if status is None:  # RunPod no longer knows it: nothing left to terminate
                    self._terminated_pods.add(pod_id)
                return 3
            await anyio.sleep(cfg.poll_interval_seconds)

    async def _terminate(self, pod_id: str, logger: LoggerAdapter[Any]) -> None:
        if pod_id in self._terminated_pods:  # the cancel-grace path terminates before `run` does
            return
        self._terminated_pods.add(pod_id)
        try:
            await anyio.to_thread.run_sync(terminate_pod, pod_id)
            logger.info(f"Terminated pod {pod_id}")
        except Exception as exc:  # noqa: BLE001 - the message names the pod so a person can terminate it
            logger.error(f"Could not terminate pod {pod_id}: {exc}; terminate it in the RunPod console")

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: RunpodJobConfiguration, grace_seconds: int = 30
    ) -> None:
        """Prefect's hook for a run cancelled before it started: terminate its pod."""
        status = await anyio.to_thread.run_sync(pod_status, infrastructure_pid)
        if status is None:
            raise InfrastructureNotFound(f"RunPod pod {infrastructure_pid} not found")
        await anyio.to_thread.run_sync(terminate_pod, infrastructure_pid)
