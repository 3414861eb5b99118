"""Shared fixtures: every test runs offline, without Prefect analytics, with a private model cache."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nothing may download weights: the hub is off, and Prefect does not phone home."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("CYCLEJ_FAULT", raising=False)
    yield


@pytest.fixture(autouse=True)
def one_torch_thread(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny models are all per-operation overhead: one thread is faster, and on a shared 2-core machine
    far faster. Slow tests (real models) keep the default. Subprocesses inherit OMP_NUM_THREADS."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread_per_module() -> Iterator[None]:
    """One intra-op thread for a whole module, slow tests included: for modules whose module-scoped
    fixtures build and train tiny models (they start before the function-scoped fixture above) and
    whose bit-identical comparisons need one reduction order in every run. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of built tiny models for the whole session (built once, shared by every test)."""
    return tmp_path_factory.mktemp("cyclej-cache")


@pytest.fixture(autouse=True)
def cyclej_cache(monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> Path:
    """CYCLEJ_CACHE points at the session cache, never at the user's home."""
    monkeypatch.setenv("CYCLEJ_CACHE", str(model_cache))
    return model_cache


# ---- a real S3 endpoint on loopback (moto server), spoken to through s3fs ------------------------
S3_KEY, S3_SECRET = "testing-key", "testing-secret"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> str:
    """AWS_* variables pointing at the moto server (credentials moto accepts)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A fresh bucket; returns its s3:// URI."""
    import uuid

    import s3fs

    name = f"cyclej-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env}, use_listings_cache=False)
    fs.mkdir(name)
    return f"s3://{name}"


# ---- real Prefect: the test harness (a temporary local server + SQLite) for the whole session ------
@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    import os

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_run_states(flow_run_id: object) -> dict[str, str]:
    """stage → state name ('Completed', 'Cached', 'Failed', …) of the task runs of one flow run; after a
    retry of the flow run, the newest task run of each name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    runs = sorted((r for r in runs if r.state is not None), key=lambda r: r.created or r.expected_start_time)
    return {stage_of_run_name(r.name): r.state.name for r in runs}


def stage_of_run_name(name: str) -> str:
    """Stage task runs are named `<stage>-<8 hex digits of its fingerprint>`; the stage name alone."""
    head, _, tail = name.rpartition("-")
    return head if head and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail) else name


@pytest.fixture
def project_log() -> Iterator[list[logging.LogRecord]]:
    """Records of the project's `cyclej` logger, read straight off it: caplog listens on the root logger,
    which earlier tests of the session (Prefect's logging set-up, libraries that call logging.disable or
    detach loggers) can cut it off from, and then a test that reads the log sees nothing."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("cyclej")
    handler, saved = Collect(level=logging.DEBUG), (logger.level, logger.disabled)
    # Children (`cyclej.reinforcement.policy_gradient`, ...) too: a dictConfig with
    # disable_existing_loggers drops their records before they reach this handler.
    children = {n: logging.getLogger(n) for n in logging.root.manager.loggerDict if n.startswith("cyclej.")}
    saved_children = {n: (c.level, c.disabled) for n, c in children.items()}
    logging.disable(logging.NOTSET)
    logger.disabled = False
    logger.setLevel(logging.DEBUG)
    for child in children.values():
        child.disabled = False
        child.setLevel(logging.NOTSET)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.disabled = saved[1]
        for n, (level, disabled) in saved_children.items():
            children[n].setLevel(level)
            children[n].disabled = disabled
