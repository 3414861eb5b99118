"""The tests' shared Prefect server replaces itself when it stops answering.

A CI run saw the shared server hang: every later request timed out after Prefect's retries, so every later
server test failed (11 of them, and ~35 minutes of waiting). Here the server is frozen with SIGSTOP (it
accepts connections and answers nothing, as the hung one did) and the next test asking for it gets a new one.
"""

from __future__ import annotations

import os
import signal
from urllib.parse import urlparse

import psutil
import pytest

from tests.helpers import local_prefect_server as lps


def _cmdline(process: psutil.Process) -> list[str]:
    """A child's command line; [] for one that exited and was not reaped yet (a CI run failed on a zombie
    left by an earlier test in the same process) or vanished while the children were listed."""
    try:
        return process.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return []


@pytest.mark.slow  # a 20 s probe timeout and a second server start (~30-60 s on 2 cores)
def test_a_server_that_stopped_answering_is_replaced() -> None:
    env = lps.shared_prefect_server()
    assert lps.answers(env)
    port = urlparse(env["PREFECT_API_URL"]).port
    server = next(
        p
        for p in psutil.Process().children(recursive=True)
        if "server" in _cmdline(p) and str(port) in _cmdline(p)
    )
    os.kill(server.pid, signal.SIGSTOP)
    try:
        assert not lps.answers(env, timeout=5)
        with pytest.warns(UserWarning, match="stopped answering"):
            replaced = lps.shared_prefect_server()
    finally:
        if server.is_running():
            os.kill(server.pid, signal.SIGCONT)
    assert replaced["PREFECT_API_URL"] != env["PREFECT_API_URL"] and lps.answers(replaced)
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE  # the frozen one is gone
    assert lps.shared_prefect_server() == replaced  # healthy: kept
