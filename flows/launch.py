"""How `cyclej run` runs the pipeline so that the Prefect UI can control it.

`cyclej run` is two processes:

* the **launcher** (the command the user started) makes sure there is a Prefect server (the one
  `PREFECT_API_URL` names, or a temporary one it owns), registers the pipeline as the served deployment
  `cyclej-pipeline/cyclej-run`, creates a flow run of it named `<config name>-<fingerprint>` with tags for
  the preset and the storage kind, and starts
* the **run process** (`cyclej run …` again, with `CYCLEJ_FLOW_RUN_ID` set), which executes exactly that
  flow run in-process, so stage errors map to the CLI's exit codes as before.

Why a deployment: a flow run of a deployment has a Retry button in the UI, and `prefect flow-run retry
<id>` needs no `--entrypoint`; `cyclej serve` (started by infra/start_local_stack.sh) is the Prefect
runner that executes such retries, resuming from the store. Why two processes: the launcher outlives
the run process, so it can do what a dead or stuck process cannot —

* mark the run **Crashed** the moment its process dies (a `kill` fault, the host's OOM killer), instead
  of leaving it "Running" for good;
* see a **cancel** from the UI or `prefect flow-run cancel`, kill the run process's whole process group
  within a second or two and mark the run Cancelled (the next run resumes from the last checkpoint);
* own the temporary server: it is started with a parent-death signal, so not even a SIGKILL of the
  launcher leaves it behind, and the run process gets one too.

A launcher killed outright on a long-lived server is the one case left to the server: the run process's
heartbeats stop and the crash-detection automation in deployments/automations.yaml marks it Crashed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from cyclej.config import STAGES, PipelineConfig

DEPLOYMENT_NAME = "cyclej-run"
FLOW_RUN_ENV = "CYCLEJ_FLOW_RUN_ID"  # set for the run process: the flow run it executes
SHORT_FP = 8  # fingerprint characters in run names
STATE_POLL_SECONDS = 1.0  # how often the launcher looks for a cancel request
HEARTBEAT_SECONDS = "30"  # the run process's heartbeats (Prefect's minimum), for the crash automation
PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_CANCELLED = 130  # like Ctrl-C: the run was stopped on purpose and resumes next time


# ---- names and tags --------------------------------------------------------------------------------
def short(fp: str) -> str:
    return fp[:SHORT_FP]


def run_name(cfg: PipelineConfig, until: str | None = None) -> str:
    """`<config name>-<fingerprint of the last stage run>`: that fingerprint covers every stage before it,
    so two runs share a name exactly when they compute the same thing."""
    from cyclej.pipeline.registry import plan_pipeline

    return f"{cfg.name}-{short(plan_pipeline(cfg, until)[until or STAGES[-1]].fingerprint)}"


def storage_kind(cfg: PipelineConfig) -> str:
    return "s3" if cfg.storage.root.startswith("s3://") else "local"


def run_tags(cfg: PipelineConfig) -> list[str]:
    return ["cyclej", f"preset:{cfg.name}", f"storage:{storage_kind(cfg)}"]


def flow_run_parameters(cfg: PipelineConfig, until: str | None) -> dict[str, Any]:
    """The config as the flow run's parameters, for the UI and for a retry by `cyclej serve`: secrets
    left out (they would be stored in Prefect's database; a retry takes them from AWS_* instead) and a
    local store's root made absolute (a retry may run from another directory)."""
    storage = cfg.storage
    root = storage.root
    if storage_kind(cfg) == "local":
        root = "file://" + os.path.abspath(os.path.expanduser(root.removeprefix("file://")))
    cfg = cfg.model_copy(
        update={"storage": storage.model_copy(update={"root": root, "key": None, "secret": None})}
    )
    return {"config": cfg.model_dump(mode="json"), "until": until}


# ---- a temporary server that cannot outlive its owner ------------------------------------------------
def die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs this child when the process that started it dies, however it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def owned_server(timeout: float = 180.0) -> Iterator[str]:
    """Prefect's temporary server (the same app and settings Prefect's own `SubprocessASGIServer` runs),
    but started with a parent-death signal: Prefect's is stopped by an atexit hook, which a SIGKILL never
    runs. Yields its API URL."""
    import prefect

    port = _free_port()
    address = f"http://127.0.0.1:{port}"
    print(f"Starting temporary server on {address}", file=sys.stderr, flush=True)
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(prefect.__module_path__.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],
        env=env,
        preexec_fn=die_with_parent,  # noqa: PLW1509 - prctl only; nothing else runs in the fork
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{address}/api/health", timeout=2) as resp,
            ):
                if resp.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server did not start (exit code {proc.poll()})")
            time.sleep(0.2)
        yield f"{address}/api"
    finally:
        print(f"Stopping temporary server on {address}", file=sys.stderr, flush=True)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The server named by PREFECT_API_URL (a long-lived one: the UI, automations), else an owned one."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    with owned_server() as url, temporary_settings({PREFECT_API_URL: url}):
        yield url


# ---- the launcher ----------------------------------------------------------------------------------
def pipeline_deployment() -> Any:
    """The served deployment every `cyclej run` run belongs to. Its entrypoint is the module path
    `flows.pipeline_flow:cyclej_pipeline`: it loads from any directory, and as a real module (loaded from its
    file path, the flow's string annotations did not resolve and parameter validation failed)."""
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline_flow import cyclej_pipeline

    return cyclej_pipeline.to_deployment(
        name=DEPLOYMENT_NAME,
        tags=["cyclej"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="Runs of `cyclej run`, and their retries (executed by `cyclej serve`).",
    )


def create_flow_run(cfg: PipelineConfig, until: str | None) -> Any:
    """Register (idempotently) the served deployment and create this run of it."""
    from prefect.client.orchestration import get_client

    deployment_id = pipeline_deployment().apply()
    from prefect.states import Pending

    with get_client(sync_client=True) as client:
        # Pending, not Scheduled: a runner serving the deployment (`cyclej serve`) picks up Scheduled
        # runs and would execute this one a second time, beside the run process.
        return client.create_flow_run_from_deployment(
            deployment_id,
            parameters=flow_run_parameters(cfg, until),
            name=run_name(cfg, until),
            tags=run_tags(cfg),
            state=Pending(message="started by cyclej run"),
        )


def _end_open_task_runs(client: Any, flow_run_id: UUID, state: Any) -> None:
    """Task runs of a process that was killed stay "Running" in the UI; give them the flow run's end.
    Cosmetic: a failure here must not change how the run ends."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    try:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        for tr in task_runs:
            if tr.state is not None and not tr.state.is_final():
                client.set_task_run_state(tr.id, state.model_copy(), force=True)
    except Exception as exc:  # noqa: BLE001
        print(f"cyclej: could not end the run's open task runs: {exc}", file=sys.stderr)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def supervise(child: subprocess.Popen[bytes], flow_run_id: UUID) -> int:
    """Wait for the run process, acting on a cancel request; end a run its process left open as Crashed.
    Returns the run process's return code, or EXIT_CANCELLED."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State
    from prefect.states import Cancelled, Crashed

    with get_client(sync_client=True) as client:
        while True:
            try:
                returncode = child.wait(timeout=STATE_POLL_SECONDS)
                # What the run process started lives on in its process group when it dies (a vLLM engine
                # of an OOM-killed run held 5 GB): nothing may outlive the run.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                break
            except subprocess.TimeoutExpired:
                pass
            try:
                state = client.read_flow_run(flow_run_id).state
            except Exception:  # noqa: BLE001 - a busy server: look again next second
                continue
            if state is not None and state.is_cancelling():
                # The whole group: the run process and whatever it started (generation workers, loaders).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                cancelled: State = Cancelled(
                    message="cancelled; the run process was stopped, the next run resumes "
                    "from the last checkpoint"
                )
                client.set_flow_run_state(flow_run_id, cancelled, force=True)
                _end_open_task_runs(client, flow_run_id, cancelled)
                print(
                    "cyclej: run cancelled from Prefect; the next run resumes from the last checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                return EXIT_CANCELLED
        state = client.read_flow_run(flow_run_id).state
        if state is None or not state.is_final():
            crashed: State = Crashed(
                message=f"the run process ended without finishing the run ({_describe_exit(returncode)})"
            )
            if state is not None and state.is_cancelling():
                crashed = Cancelled(message=f"cancelled ({_describe_exit(returncode)})")
            client.set_flow_run_state(flow_run_id, crashed, force=True)
            _end_open_task_runs(client, flow_run_id, crashed)
            if returncode < 0:  # nothing in the run process could say why: say it here, in one line
                print(f"cyclej: {crashed_message(returncode)}", file=sys.stderr, flush=True)
    return returncode


def crashed_message(returncode: int) -> str:
    """One line for a run process that a signal ended (it had no chance to explain itself)."""
    why = (
        " (the kernel's out-of-memory killer sends SIGKILL: `dmesg | grep -i oom` tells)"
        if returncode == -signal.SIGKILL
        else ""
    )
    return (
        f"the run process was {_describe_exit(returncode)}{why}; the run is marked Crashed. Finished stages "
        "and checkpoints are kept: run the same command again to resume from the last checkpoint"
    )


def launch(cfg: PipelineConfig, until: str | None, argv: list[str]) -> int:
    """The launcher: see the module docstring. `argv` is this command's own arguments, which the run
    process repeats. A run process killed by a signal ends the launcher by the same signal (after the
    server is stopped), so callers see the same status as before the split."""
    with prefect_api() as api_url:
        flow_run = create_flow_run(cfg, until)
        print(f"cyclej: flow run '{flow_run.name}' ({flow_run.id})", file=sys.stderr, flush=True)
        env = {**os.environ, "PREFECT_API_URL": api_url, FLOW_RUN_ENV: str(flow_run.id)}
        env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_SECONDS)
        child = subprocess.Popen(
            [sys.executable, "-m", "cyclej.cli", *argv], env=env, process_group=0, preexec_fn=die_with_parent
        )  # noqa: PLW1509 - prctl only
        # Ctrl-C and SIGTERM reach the launcher (the run process has its own process group, so the
        # cancel path can kill all of it): hand them on, and keep supervising until it has ended.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: _forward(child, signum))
        returncode = supervise(child, flow_run.id)
    if returncode < 0:
        if -returncode not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be handled anyway
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    return returncode


def _forward(child: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signum)


# ---- the run process -------------------------------------------------------------------------------
def expected_failure(exc: BaseException | None) -> bool:
    """A failure the CLI explains in one line (bad input, a store that went away, a corrupt file), as
    opposed to a bug, whose traceback is what a developer needs. A stage failure is expected when what
    caused it is (or nothing did: a dispatched stage's deployment run failed)."""
    from cyclej.errors import CyclejError, StageFailed

    if isinstance(exc, StageFailed):
        return exc.__cause__ is None or expected_failure(exc.__cause__)
    return isinstance(exc, CyclejError)


class QuietExpectedFailures(logging.Filter):
    """On the console handler only: Prefect logs the flow's exception with its traceback (and, when a
    task's retries run out, the task's too: ~100 lines) before the CLI prints its one-line error. For an
    expected failure those records, and the task's ERROR "Finished in state Failed('Task run encountered
    an exception BadInput: …')", stay off stderr; the run's log in the UI (Prefect's API handler) still
    has them in full, and `cyclej run --verbose` shows them here."""

    STATE_EXCEPTION = re.compile(r"encountered an exception:? (\w+):")

    def __init__(self) -> None:
        super().__init__()
        from cyclej.errors import CyclejError

        def subclasses(cls: type) -> list[type]:
            out: list[type] = [cls]
            children: list[type] = cls.__subclasses__()
            for child in children:
                out.extend(subclasses(child))
            return out

        # A task's state names only its exception's class; a task-level StageFailed (a dispatched
        # stage's deployment run that failed) has no cause, so every CyclejError class is expected there.
        self.expected_names = {cls.__name__ for cls in subclasses(CyclejError)}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return not expected_failure(exc)
        if record.levelno >= logging.ERROR and (m := self.STATE_EXCEPTION.search(record.getMessage())):
            return m.group(1) not in self.expected_names
        return True


def quiet_expected_failures() -> QuietExpectedFailures:
    """Install the filter on the console handlers (the root logger's: flow and task run records reach
    it by propagation, after their API handler has sent them to the server)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    quiet = QuietExpectedFailures()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(quiet)
    return quiet


def execute(
    cfg: PipelineConfig, until: str | None, flow_run_id: str, verbose: bool = False
) -> dict[str, dict[str, Any]]:
    """Execute the launcher's flow run here, with the config as loaded (secrets included). Unless
    `verbose`, Prefect's tracebacks of expected failures stay off stderr (QuietExpectedFailures)."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.pipeline_flow import cyclej_pipeline

    if not verbose:
        quiet_expected_failures()
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(UUID(flow_run_id))
    result = run_flow(cyclej_pipeline, flow_run=flow_run, parameters={"config": cfg, "until": until})
    assert isinstance(result, dict)
    return result


# ---- the runner that executes retries ------------------------------------------------------------------
def serve() -> None:
    """Serve the `cyclej-run` deployment: execute flow runs of it that the UI's Retry (or `prefect
    flow-run retry`) scheduled again. Prefect's runner handles cancel and crash for these."""
    from prefect import serve as serve_deployments

    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_SECONDS)
    # Not paused on shutdown: `cyclej run` keeps creating runs of this deployment without a runner.
    serve_deployments(pipeline_deployment(), pause_on_shutdown=False)
