"""The store under faults: leases its own process left behind, logs of who computed and who waited, and a
local store that cannot be written (one-line StorageError, never a raw OSError)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cyclej.errors import StorageError
from cyclej.runtime.store import ArtifactStore, _local_host, set_run_label


def _commit(store: ArtifactStore, stage: str, fp: str, text: str) -> None:
    work = store.workdir(stage, fp)
    (work / "out.txt").write_text(text)
    store.commit(stage, fp, work)


def test_own_leftover_lease_is_taken_over_at_once(tmp_path: Path) -> None:
    """An attempt that failed and could not delete its lease (read-only store) left one with this live
    process's pid: the in-process retry must not wait for the TTL (it waited ~75 s)."""
    store = ArtifactStore(str(tmp_path / "store"))
    store.put_json(
        "data/fp/LEASE.json",
        {"owner": f"{_local_host()}:{os.getpid()}:earlier", "expires": time.time() + 3600},
    )
    t0 = time.monotonic()
    with store.lease("data", "fp", poll=5.0) as mine:
        assert mine
    assert time.monotonic() - t0 < 3.0


def test_concurrent_lease_waits_and_reuse_are_logged_by_run(
    tmp_path: Path, project_log: list[logging.LogRecord]
) -> None:
    """One thread (run 'first') computes; another of the same process waits for it, which the log says
    with the run, host and pid, and then says whose artifact it reused. Same-process holders are live."""
    store = ArtifactStore(str(tmp_path / "store"))
    holding, release = threading.Event(), threading.Event()

    def first() -> None:
        set_run_label("first")
        with store.lease("merge", "fp", poll=0.1) as mine:
            assert mine
            holding.set()
            release.wait(30)
            _commit(store, "merge", "fp", "made by first")

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert holding.wait(30)
        threading.Timer(1.0, release.set).start()
        with store.lease("merge", "fp", poll=0.1) as mine:
            assert not mine  # waited, then found first's commit
    finally:
        release.set()
        worker.join(30)
        set_run_label(None)
    messages = [r.getMessage() for r in project_log]
    host = os.uname().nodename
    assert f"waiting for run first ({host}, pid {os.getpid()}) computing stage merge" in messages, messages
    assert "reused merge from run first" in messages, messages


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make `folder` unwritable for this process: permissions for a normal user; root ignores those, so
    for root the immutable attribute (chattr +i), where the filesystem has it."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield
        finally:
            os.chmod(folder, 0o755)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0
    ):
        pytest.skip("running as root on a filesystem without chattr +i: cannot make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_local_store_is_a_one_line_storage_error(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    work = store.workdir("data", "fp")
    (work / "out.txt").write_text("x")
    with read_only(work), pytest.raises(StorageError) as err:
        store.commit("data", "fp", work)
    message = str(err.value)
    assert "\n" not in message and "MANIFEST.json" in message, message
    assert "PermissionError" in message, message
    assert err.value.exit_code == 2


@pytest.mark.parametrize("root", ["foo://bucket/x", "gs://bucket/x"])
def test_unknown_storage_scheme_is_a_storage_error(root: str) -> None:
    with pytest.raises(StorageError, match="unsupported"):
        ArtifactStore(root)


@pytest.mark.slow  # ~65 s on 2 loaded cores (two CLI processes, context training, botocore giving up)
def test_s3_endpoint_dying_mid_run_is_a_stage_failure_naming_the_resume_point(
    tmp_path: Path, model_cache: Path
) -> None:
    """Issue 16: the S3 endpoint (a moto server process of this test's own) is SIGKILLed while `context`
    trains and checkpoints: `cyclej run` exits 1 with one `cyclej: error:` line naming the stage and where
    it resumes (not 2, the bad-input code), and no Prefect traceback on stderr (an outage is not a bug).
    A process, not the in-process ThreadedMotoServer: its stop() left open keep-alive connections served,
    so the stage could finish through the "dead" endpoint."""
    import re
    import signal
    import socket
    import sys
    import urllib.request

    import s3fs

    from tests.helpers.local_prefect_server import shared_prefect_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    endpoint = f"http://127.0.0.1:{port}"
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                break
            assert moto.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)
        aws = {
            "AWS_ACCESS_KEY_ID": "testing-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_MAX_ATTEMPTS": "2",
        }  # botocore's retries of a refused connection, shortened for the test
        fs = s3fs.S3FileSystem(
            key=aws["AWS_ACCESS_KEY_ID"],
            secret=aws["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": endpoint},
            use_listings_cache=False,
        )
        fs.mkdir("outage")
        env = {**shared_prefect_server(), **aws, "CYCLEJ_CACHE": str(model_cache), "OMP_NUM_THREADS": "1"}
        env.pop("CYCLEJ_FAULT", None)
        # Many short steps, each checkpointed: the endpoint dies after the second checkpoint, while ~38
        # steps remain, so the stage is certain to meet the outage on its next store call.
        args = [
            "run",
            "--preset",
            "tiny",
            "--storage",
            "s3://outage/tiny",
            "--until",
            "context",
            "--set",
            "context.max_steps=40",
            "--set",
            "context.checkpoint_every_steps=1",
            "--set",
            "orchestration.retries=0",
        ]
        log = tmp_path / "stderr.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cyclej.cli", *args],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + 300
        # (older checkpoints are pruned, keep_checkpoints=2: wait for any beyond the first)
        while not [
            p
            for p in fs.glob("outage/tiny/context/*/checkpoints/step-*/MANIFEST.json")
            if "step-00000001" not in p
        ]:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        moto.kill()
        moto.wait()
        code = proc.wait(timeout=300)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if moto.poll() is None:
            moto.kill()
    stderr = log.read_text()
    assert code == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("cyclej: error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert re.match(r"cyclej: error: stage 'context' failed: .*; resumes from .+", errors[0]), errors[0]
    assert "store" in errors[0].partition("; resumes from ")[2], errors[0]  # "… once the store is reachable"
    assert "Traceback" not in stderr, stderr[-3000:]
