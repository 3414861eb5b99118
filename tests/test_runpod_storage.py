"""The artifact store on an S3 API shaped like RunPod's network-volume endpoint: a real moto S3 server
whose client refuses DeleteObjects (RunPod's API does not have it). Checking the store, committing an
artifact, rotating checkpoints (old ones deleted) and removing small files must all work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.local_prefect_server import free_port


@pytest.fixture()
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="vol")
    try:
        yield url
    finally:
        server.stop()


def test_store_works_without_delete_objects(s3_endpoint: str, tmp_path: Path) -> None:
    from cyclej.config import StorageConfig
    from cyclej.runtime.store import ArtifactStore

    store = ArtifactStore.from_config(StorageConfig(root="s3://vol/runs", cache_dir=str(tmp_path / "cache")))
    calls: list[str] = []

    def refuse_bulk_delete(**kwargs: Any) -> None:
        raise RuntimeError("DeleteObjects is not supported by this endpoint (RunPod network volume S3 API)")

    def count(event_name: str, **kwargs: Any) -> None:
        calls.append(event_name.rsplit(".", 1)[-1])

    store.fs.connect()
    store.fs.s3.meta.events.register("before-call.s3.DeleteObjects", refuse_bulk_delete)
    store.fs.s3.meta.events.register("before-call.s3.DeleteObject", count)

    store.check()  # writes and deletes a probe
    for step in (1, 2, 3):
        work = store.checkpoint_workdir("rl", "fp1", f"step-{step:06d}")
        (work / "state.bin").write_bytes(bytes([step]) * 100)
        store.save_checkpoint("rl", "fp1", f"step-{step:06d}", work, keep=1)
    assert store.list_checkpoints("rl", "fp1") == ["step-000003"]  # the two older ones were deleted
    name, local = store.latest_checkpoint("rl", "fp1") or ("", Path())
    assert name == "step-000003" and (local / "state.bin").read_bytes() == bytes([3]) * 100
    assert store.fs.find("vol/runs/rl/fp1/checkpoints/step-000001") == []
    store.put_json("leases/x.json", {"a": 1})
    store.remove("leases/x.json")
    assert store.get_json("leases/x.json") is None
    assert calls and set(calls) == {"DeleteObject"}
