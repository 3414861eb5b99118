"""The Prefect UI as the control room (issue 15), against a real local Prefect server: `cyclej run` runs
are deployment runs with readable names and tags; Retry (the UI's API call, and `prefect flow-run retry`
without --entrypoint) resumes them through `cyclej serve`; a killed run process is Crashed at once; a
cancel stops the run's processes within seconds; project log lines and the resume-point artifact reach
the server; `s3://` artifacts get links a browser opens; sample tables lead with the text columns; a
SIGKILLed CLI leaves no temporary server behind.

One server and one local store for the module; each test changes `context.max_steps` so it computes its
own `context` while `data` comes back from the cache.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest

from cyclej.config import PipelineConfig, load_config
from cyclej.pipeline.registry import fingerprints
from cyclej.runtime.store import ArtifactStore
from tests.conftest import task_run_states

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server_env() -> dict[str, str]:
    """Per test: shared_prefect_server() replaces a server that stopped answering (one probe request)."""
    from tests.helpers.local_prefect_server import shared_prefect_server

    return shared_prefect_server()


@pytest.fixture(scope="module")
def automation_server_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A server of their own for the automation tests: automations left on the shared server are evaluated
    against every event of every later test (bucket writes, 'database is locked' in its log), and in CI the
    shared server stopped answering at the automation test's `prefect automation create`."""
    from tests.helpers.local_prefect_server import prefect_server

    with prefect_server(tmp_path_factory.mktemp("automation-server") / "home") as env:
        yield env


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("control-room-store"))


@contextlib.contextmanager
def client_for(env: dict[str, str]) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        yield client


def run_env(server_env: dict[str, str], **extra: str) -> dict[str, str]:
    """The server's env plus this test's model cache (built tiny models are shared with the session)."""
    env = {**server_env, "CYCLEJ_CACHE": os.environ["CYCLEJ_CACHE"], "OMP_NUM_THREADS": "1", **extra}
    if "CYCLEJ_FAULT" not in extra:
        env.pop("CYCLEJ_FAULT", None)
    return env


def cyclej_args(store_root: str, context_steps: int) -> list[str]:
    return [
        "run",
        "--preset",
        "tiny",
        "--storage",
        store_root,
        "--until",
        "context",
        "--set",
        f"context.max_steps={context_steps}",
        "--set",
        "orchestration.retries=0",
    ]


def config(store_root: str, context_steps: int) -> PipelineConfig:
    return load_config(
        preset="tiny",
        storage=store_root,
        overrides=[f"context.max_steps={context_steps}", "orchestration.retries=0"],
    )


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cyclej.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def flow_run_id_from(stderr: str) -> UUID:
    m = re.search(r"cyclej: flow run '[^']+' \(([0-9a-f-]{36})\)", stderr)
    assert m is not None, stderr[-3000:]
    return UUID(m.group(1))


def wait_for_state(env: dict[str, str], flow_run_id: UUID, types: set[str], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    with client_for(env) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.type.value in types:
                return run
            if time.monotonic() > deadline:
                pytest.fail(
                    f"flow run {flow_run_id} still {run.state.name if run.state else None} after {timeout} s"
                )
            time.sleep(0.5)


def stage_states(env: dict[str, str], flow_run_id: UUID) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return task_run_states(flow_run_id)


def run_logs(env: dict[str, str], flow_run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    # Every page: the server's default page (200) ends long before a retried run's last lines. Prefect
    # ships logs in batches a few seconds apart, so a line just logged may need a moment to arrive.
    messages: list[str] = []
    with client_for(env) as client:
        while True:
            page = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(messages)
            )
            messages += [log.message for log in page]
            if len(page) < 200:
                return messages


def run_artifacts(env: dict[str, str], flow_run_id: UUID) -> dict[str, Any]:
    """key → the newest artifact of that key created by this flow run."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client_for(env) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in sorted(arts, key=lambda a: a.created) if a.key}


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those not ended (a zombie has ended: only its exit status waits for a reaper)."""
    running = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
    return running


def kill_all(launcher: subprocess.Popen[bytes]) -> None:
    """Whatever a test left: the launcher's process group and every process it started."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in psutil.Process(launcher.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launcher.pid, signal.SIGKILL)


def start_run_hung_in_context(
    server_env: dict[str, str], store_root: str, context_steps: int, log: Path
) -> subprocess.Popen[bytes]:
    """`cyclej run` in its own session with `context` hanging at step 3; returns once step 2 is
    checkpointed."""
    cfg = config(store_root, context_steps)
    store = ArtifactStore.from_config(cfg.storage)
    fp = fingerprints(cfg)["context"]
    with open(log, "w") as err:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "cyclej.cli", *cyclej_args(store_root, context_steps)],
            cwd=ROOT,
            env=run_env(server_env, CYCLEJ_FAULT="context:3:hang"),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while "step-00000002" not in store.list_checkpoints("context", fp):
        if launcher.poll() is not None or time.monotonic() > deadline:
            kill_all(launcher)
            raise AssertionError(log.read_text()[-3000:])
        time.sleep(0.5)
    return launcher


@pytest.mark.slow  # a failing run, its retry through the UI's API and through the CLI (~1 min)
def test_failed_run_is_named_tagged_logged_and_retried_from_the_ui_and_the_cli(
    server_env: dict[str, str], store_root: str, tmp_path: Path
) -> None:
    """`context` fails at step 3 (checkpoint at 2): Failed run named `tiny-<fp>` with tags, a resume-point
    artifact and the project's log lines. The UI's Retry call makes `cyclej serve` run it again: `data`
    Cached, `context` resumed from step 2. Then `prefect flow-run retry <id>` with no --entrypoint:
    everything Cached, and the cached stages' artifacts posted again. `cyclej serve` runs from the start:
    it must not execute the `cyclej run` run a second time."""
    serve_log = tmp_path / "serve.log"
    with open(serve_log, "wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "cyclej.cli", "serve"],
            cwd=tmp_path,
            env=run_env(server_env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        cfg = config(store_root, 4)
        fps = fingerprints(cfg)
        failed = run_cli(cyclej_args(store_root, 4), run_env(server_env, CYCLEJ_FAULT="context:3:error"))
        assert failed.returncode == 1, failed.stderr[-3000:]
        flow_run_id = flow_run_id_from(failed.stderr)
        with client_for(server_env) as client:
            run = client.read_flow_run(flow_run_id)
            deployment = client.read_deployment(run.deployment_id)
        assert run.state is not None and run.state.type.value == "FAILED"
        assert run.name == f"tiny-{fps['context'][:8]}"
        assert {"cyclej", "preset:tiny", "storage:local"} <= set(run.tags)
        assert deployment.name == "cyclej-run"  # a deployment run: the UI shows Retry
        assert run.parameters["config"]["storage"]["root"].startswith("file:///")
        assert stage_states(server_env, flow_run_id).get("context") == "Failed", stage_states(
            server_env, flow_run_id
        )
        # executed once: by the run process only, although `cyclej serve` polls this deployment's runs
        assert "\n".join(run_logs(server_env, flow_run_id)).count("Beginning flow run") == 1

        logs = "\n".join(run_logs(server_env, flow_run_id))
        assert "stage context: start" in logs, logs[-3000:]
        assert re.search(r"context: \w+ \d+/4 .*loss=", logs), logs[-3000:]  # a progress line with the loss
        arts = run_artifacts(server_env, flow_run_id)
        resume = arts.get("context-resume-point")
        assert resume is not None, sorted(arts)
        assert "step-00000002" in str(resume.data) and "injected error" in str(resume.data)

        from prefect.client.schemas.objects import StateType
        from prefect.states import State

        with client_for(server_env) as client:  # what the UI's Retry button sends
            result = client.set_flow_run_state(
                flow_run_id,
                State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"),
                force=False,
            )
        assert result.status.value == "ACCEPT", result
        done = wait_for_state(server_env, flow_run_id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=300)
        assert done.state.type.value == "COMPLETED", serve_log.read_text()[-4000:]
        states = stage_states(server_env, flow_run_id)
        assert states["data"] == "Cached" and states["context"] == "Completed", states
        ref = ArtifactStore.from_config(cfg.storage).ref("context", fps["context"])
        assert ref is not None and ref.metrics["resumed_from"] == ["step-00000002"]
        deadline = time.time() + 15
        while not any(
            "resuming from checkpoint step-00000002" in m for m in run_logs(server_env, flow_run_id)
        ):
            assert time.time() < deadline, "the resume line never reached the run's log"
            time.sleep(1)

        retried_at = time.time()
        cli_retry = subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), "flow-run", "retry", str(flow_run_id)],
            env=run_env(server_env),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli_retry.returncode == 0, cli_retry.stdout + cli_retry.stderr
        deadline = time.monotonic() + 300
        while True:  # the run passes through Scheduled/Running again, then ends
            run = wait_for_state(server_env, flow_run_id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=300)
            if run.state.timestamp.timestamp() > retried_at or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert run.state.type.value == "COMPLETED", serve_log.read_text()[-4000:]
        assert set(stage_states(server_env, flow_run_id).values()) == {"Cached"}
        metrics = run_artifacts(server_env, flow_run_id)["context-metrics"]
        assert "(from the cache)" in str(metrics.data)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


def test_killed_run_process_is_crashed_at_once(server_env: dict[str, str], store_root: str) -> None:
    """A `kill` fault (SIGKILL of the run process, like a lost pod): the CLI ends as killed and the run
    is Crashed by the time it has, not "Running" for good; its open task run too. (That a new run then
    resumes is the kill drill in test_drills.)"""
    killed = run_cli(cyclej_args(store_root, 6), run_env(server_env, CYCLEJ_FAULT="context:3:kill"))
    ended = time.monotonic()
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    flow_run_id = flow_run_id_from(killed.stderr)
    run = wait_for_state(server_env, flow_run_id, {"CRASHED"}, timeout=5)
    print(f"Crashed {time.monotonic() - ended:.1f} s after the CLI ended")
    assert "killed by SIGKILL" in (run.state.message or "")
    assert stage_states(server_env, flow_run_id)["context"] == "Crashed"
    # The terminal says so too, in one line (an out-of-memory kill ended the yelp run silently before).
    told = [line for line in killed.stderr.splitlines() if "the run process was killed by SIGKILL" in line]
    assert len(told) == 1 and "run the same command again to resume" in told[0], killed.stderr[-3000:]
    # The checkpoint it left names the Prefect run (what "reused S from run X" logs), not host:pid.
    cfg = config(store_root, 6)
    store = ArtifactStore.from_config(cfg.storage)
    assert store._committed_by("context", fingerprints(cfg)["context"], "step-00000002") == run.name


@pytest.mark.slow  # two runs of context (~110 s on 2 loaded cores)
def test_cancel_stops_the_run_within_seconds_and_the_next_run_resumes(
    server_env: dict[str, str], store_root: str, tmp_path: Path
) -> None:
    """`prefect flow-run cancel` (the UI's Cancel) while `context` is stuck at step 3: the run process and
    its children are gone within seconds, the run is Cancelled, and the next run resumes from step 2."""
    cfg = config(store_root, 8)
    store = ArtifactStore.from_config(cfg.storage)
    fp = fingerprints(cfg)["context"]
    log = tmp_path / "stderr.log"
    launcher = start_run_hung_in_context(server_env, store_root, 8, log)
    try:
        time.sleep(1.0)  # into the hang at step 3
        flow_run_id = flow_run_id_from(log.read_text())
        run_processes = psutil.Process(launcher.pid).children(recursive=True)
        assert run_processes, "no run process"
        start = time.monotonic()
        cancel = subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), "flow-run", "cancel", str(flow_run_id)],
            env=run_env(server_env),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        assert launcher.wait(timeout=30) == 130, log.read_text()[-3000:]
        _, alive = psutil.wait_procs(run_processes, timeout=5)
        gone = time.monotonic() - start
        assert not still_running(alive), alive
        run = wait_for_state(server_env, flow_run_id, {"CANCELLED"}, timeout=5)
        print(f"cancel → processes gone and run {run.state.name} in {gone:.1f} s")
        assert gone < 15
        assert stage_states(server_env, flow_run_id)["context"] == "Cancelled"
    finally:
        kill_all(launcher)

    resumed = run_cli(cyclej_args(store_root, 8), run_env(server_env))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = store.ref("context", fp)
    assert ref is not None and ref.metrics["resumed_from"] == ["step-00000002"]
    new_run = flow_run_id_from(resumed.stderr)
    assert stage_states(server_env, new_run) == {"data": "Cached", "context": "Completed"}
    assert "(from the cache)" in str(run_artifacts(server_env, new_run)["data-metrics"].data)


def test_what_a_killed_run_process_started_does_not_outlive_it(
    server_env: dict[str, str], store_root: str
) -> None:
    """The OOM killer SIGKILLs the run process, not what it started: after the yelp run was killed, its vLLM
    engine (5 GB) lived on, parented to init. The launcher's `supervise` ends the run process's group."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.launch import create_flow_run, supervise

    started_then_killed = (
        "import os, subprocess, time; p = subprocess.Popen(['sleep', '600']); "
        "print(p.pid, flush=True); time.sleep(0.5); os.kill(os.getpid(), 9)"
    )
    with temporary_settings({PREFECT_API_URL: server_env["PREFECT_API_URL"]}):
        flow_run = create_flow_run(config(store_root, 6), None)
        child = subprocess.Popen(
            [sys.executable, "-c", started_then_killed], stdout=subprocess.PIPE, text=True, process_group=0
        )  # as the launcher starts the run process
        assert child.stdout is not None
        engine = psutil.Process(int(child.stdout.readline()))
        try:
            assert supervise(child, flow_run.id) == -signal.SIGKILL
            _, alive = psutil.wait_procs([engine], timeout=10)
            assert not still_running(alive), "the run process's child outlived it"
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                engine.kill()
    assert wait_for_state(server_env, flow_run.id, {"CRASHED"}, timeout=5)


@pytest.mark.slow  # starts its own temporary Prefect server (~30 s)
def test_sigkilled_cli_leaves_no_temporary_server_behind(tmp_path: Path) -> None:
    """Issue 16: without PREFECT_API_URL the CLI starts a temporary server; SIGKILL the CLI (no atexit,
    no clean-up) mid-run and count what is left: no server process, nothing on its port, no run process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), CYCLEJ_FAULT="context:3:hang", OMP_NUM_THREADS="1"
    )
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cyclej.cli",
                "run",
                "--preset",
                "tiny",
                "--storage",
                str(tmp_path / "store"),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while "Beginning flow run" not in log.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        m = re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", log.read_text())
        assert m is not None
        port = int(m.group(1))
        descendants = psutil.Process(launcher.pid).children(recursive=True)
        servers = [p for p in descendants if "prefect.server.api.server:create_app" in " ".join(p.cmdline())]
        assert len(servers) == 1 and len(descendants) >= 2, [p.cmdline() for p in descendants]
        launcher.kill()  # the CLI only, not its process group: what is left is what it orphaned
        launcher.wait()
        _, alive = psutil.wait_procs(descendants, timeout=10)
        left = still_running(alive)
        assert not left, [p.cmdline() for p in left]
        with contextlib.closing(socket.socket()) as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, (
                f"something still listens on the server's port {port}"
            )
    finally:
        kill_all(launcher)


def test_automations_file_creates_crash_detection_and_a_failure_notification(
    automation_server_env: dict[str, str], tmp_path: Path
) -> None:
    """deployments/automations.yaml, with a real notification block's id put in, is accepted by the
    server through `prefect automation create --from-file`, as its header tells users to do."""
    import yaml
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server_env = automation_server_env

    with temporary_settings({PREFECT_API_URL: server_env["PREFECT_API_URL"]}):
        block_id = CustomWebhookNotificationBlock(name="cyclej-test", url="http://127.0.0.1:9/hook").save(
            "cyclej-test-notify", overwrite=True
        )
    spec = yaml.safe_load((ROOT / "deployments" / "automations.yaml").read_text())
    for automation in spec["automations"]:
        for action in automation["actions"]:
            if action["type"] == "send-notification":
                action["block_document_id"] = str(block_id)
    path = tmp_path / "automations.yaml"
    path.write_text(yaml.safe_dump(spec))
    created = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "automation", "create", "--from-file", str(path)],
        env=run_env(server_env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    with client_for(server_env) as client:
        automations = {a.name: a for a in client.read_automations()}
    crash = automations["cyclej-crashed-when-heartbeats-stop"]
    assert crash.trigger.posture.value == "Proactive" and crash.actions[0].state.value == "CRASHED"
    assert automations["cyclej-notify-on-failure"].actions[0].block_document_id == block_id


# Waits out the automation's 120 s heartbeat window (~2.5-3 min of wall clock): kept out of make test so CI
# stays well under 30 minutes; `pytest -m timing` runs it (passed: Crashed 113 s after the kill).
@pytest.mark.timing
@pytest.mark.slow
def test_heartbeat_automation_crashes_a_run_whose_processes_all_died(
    automation_server_env: dict[str, str], store_root: str, tmp_path: Path
) -> None:
    """The one case the launcher cannot cover: launcher and run process SIGKILLed together (a lost host).
    The crash-detection automation of deployments/automations.yaml, created on the server as its header
    says, marks the run Crashed once its heartbeats stop: within the automation's 120 s window plus the
    heartbeat interval (30 s) and the triggers service's evaluation period."""
    import yaml

    server_env = automation_server_env
    spec = yaml.safe_load((ROOT / "deployments" / "automations.yaml").read_text())
    crash = [a for a in spec["automations"] if a["name"] == "cyclej-crashed-when-heartbeats-stop"]
    path = tmp_path / "crash.yaml"
    path.write_text(yaml.safe_dump({"automations": crash}))
    created = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "automation", "create", "--from-file", str(path)],
        env=run_env(server_env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr

    log = tmp_path / "stderr.log"
    launcher = start_run_hung_in_context(server_env, store_root, 7, log)
    try:
        flow_run_id = flow_run_id_from(log.read_text())
        assert wait_for_state(server_env, flow_run_id, {"RUNNING"}, timeout=5)
        processes = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
        for p in processes:  # all at once: nobody is left to mark the run
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        killed = time.monotonic()
        launcher.wait()
        _, alive = psutil.wait_procs(processes, timeout=10)
        assert not still_running(alive)
    finally:
        kill_all(launcher)
    with client_for(server_env) as client:
        assert client.read_flow_run(flow_run_id).state.type.value == "RUNNING"  # nobody marked it yet
    run = wait_for_state(server_env, flow_run_id, {"CRASHED"}, timeout=240)
    print(f"Crashed by the automation {time.monotonic() - killed:.0f} s after the kill")
    assert "No heartbeat" in (run.state.message or ""), run.state.message
