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
from cyclej.store import ArtifactStore, _local_host, set_run_label


def _commit(store: ArtifactStore, stage: str, fp: str, text: str) -> None:
    work = store.workdir(stage, fp)
    (work / "out.txt").write_text(text)
    store.commit(stage, fp, work)


def test_own_leftover_lease_is_taken_over_at_once(tmp_path: Path) -> None:
    """An attempt that failed and could not delete its lease (read-only store) left one with this live
    process's pid: the in-process retry must not wait for the TTL (it waited ~75 s)."""
    store = ArtifactStore(str(tmp_path / "store"))
    store.put_json("data/fp/LEASE.json", {"owner": f"{_local_host()}:{os.getpid()}:earlier",
                                          "expires": time.time() + 3600})
    t0 = time.monotonic()
    with store.lease("data", "fp", poll=5.0) as mine:
        assert mine
    assert time.monotonic() - t0 < 3.0


def test_concurrent_lease_waits_and_reuse_are_logged_by_run(tmp_path: Path, caplog: pytest.LogCaptureFixture
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

    caplog.set_level(logging.INFO, logger="cyclej")
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
    messages = [r.getMessage() for r in caplog.records if r.name == "cyclej"]
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
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                        capture_output=True).returncode != 0:
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
