"""A real Prefect server for tests that need workers and deployments (the test harness's in-process
server is not reachable from a separate worker or pod process).

`prefect server start` in a subprocess on a free loopback port, SQLite and PREFECT_HOME in a temporary
directory; `env` is what every child process (CLI, worker, "pod") needs to talk to it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefect_env(home: Path, api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="0",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_WORKER_CANCELLATION_POLL_SECONDS="1",
        PREFECT_RUNNER_CANCELLATION_POLL_SECONDS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


@contextmanager
def prefect_server(home: Path, timeout: float = 90.0) -> Iterator[dict[str, str]]:
    """Start a server; yields the env for clients. The server's log is `home/server.log`."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(home, api_url)
    server_env = {
        **env,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_UI_ENABLED": "false",
        # Services on (task runs reach the database through the task-run recorder, automations through
        # the triggers and actions services), but not the ones that only cost CPU in a test.
        **{
            f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
            for name in ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "DB_VACUUM")
        },
    }
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


_shared_env: dict[str, str] | None = None
_shared_stack: ExitStack | None = None
_shared_home: Path | None = None


def answers(env: dict[str, str], timeout: float = 20.0) -> bool:
    """Does the server answer a request that needs its database (`/health` does not)?"""
    request = urllib.request.Request(
        f"{env['PREFECT_API_URL']}/flows/filter",
        data=b'{"limit": 1}',
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def shared_prefect_server() -> dict[str, str]:
    """One server per test process, started on first use and stopped at exit: starting one costs
    20-50 s on a loaded 2-core machine, so test files share it (each uses its own pool names).

    A server that stopped answering is replaced, with a warning that quotes the end of its log: a CI run
    saw the shared server hang (every later request timed out, so every later server test failed).
    CYCLEJ_TEST_SERVER_DIR keeps the server's home (database and `server.log`) after the session."""
    global _shared_env, _shared_stack, _shared_home
    if _shared_env is not None and not answers(_shared_env):
        assert _shared_stack is not None and _shared_home is not None
        tail = (_shared_home / "server.log").read_text(errors="replace")[-4000:]
        warnings.warn(
            f"the shared Prefect server stopped answering; starting a new one. Its log ends:\n{tail}",
            stacklevel=2,
        )
        _shared_stack.close()
        _shared_env = None
    if _shared_env is None:
        keep = os.environ.get("CYCLEJ_TEST_SERVER_DIR")
        root = Path(tempfile.mkdtemp(prefix="cyclej-prefect-", dir=keep))
        if not keep:
            atexit.register(shutil.rmtree, root, True)
        _shared_stack = ExitStack()
        _shared_home = root / "home"
        _shared_env = _shared_stack.enter_context(prefect_server(_shared_home))
        atexit.register(_shared_stack.close)  # runs before the rmtree (atexit is last-in, first-out)
    return dict(_shared_env)
