"""The artifact store, with the same test code on a local folder and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cyclej.config import StorageConfig
from cyclej.errors import CorruptArtifact, StorageError
from cyclej.runtime.store import ArtifactRef, ArtifactStore, _local_host, fingerprint


@pytest.fixture(params=["local", "file-uri", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    if request.param == "file-uri":
        return ArtifactStore(f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache")
    bucket = request.getfixturevalue("s3_bucket")
    return ArtifactStore.from_config(StorageConfig(root=f"{bucket}/runs", cache_dir=str(tmp_path / "cache")))


def _raw_path(store: ArtifactStore, *parts: str) -> str:
    return "/".join([store.root, *parts])


def _write(store: ArtifactStore, stage: str, fp: str, files: dict[str, bytes]) -> Path:
    work = store.workdir(stage, fp)
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    return work


def test_write_commit_read_round_trip(store: ArtifactStore) -> None:
    work = _write(store, "data", "abc123", {"a/train.txt": b"one\ntwo\n", "stats.json": b"{}"})
    ref = store.commit("data", "abc123", work, metrics={"lines": 2})
    assert ref.uri == store.uri("data", "abc123") and ref.metrics == {"lines": 2}
    assert store.exists("data", "abc123")
    again = store.ref("data", "abc123")
    assert again == ref  # the manifest checksum identifies the commit
    assert ArtifactRef.from_json(ref.to_json()) == ref
    local = store.fetch(ref)
    assert (local / "a" / "train.txt").read_bytes() == b"one\ntwo\n"
    manifest = json.loads(store.fs.cat_file(_raw_path(store, "data", "abc123", "MANIFEST.json")))
    assert manifest["files"]["a/train.txt"]["size"] == 8
    assert set(manifest["files"]) == {"a/train.txt", "stats.json"}


def test_uncommitted_directory_is_not_an_artifact(store: ArtifactStore) -> None:
    work = _write(store, "merge", "f00", {"model/weights.bin": b"x" * 10})
    if not store.is_local:  # a remote artifact half-uploaded: files there, no manifest
        store.fs.put_file(
            str(work / "model/weights.bin"), _raw_path(store, "merge", "f00", "model/weights.bin")
        )
    assert not store.exists("merge", "f00")
    assert store.ref("merge", "f00") is None
    with pytest.raises(FileNotFoundError):
        store.fetch(("merge", "f00"))


def test_corrupt_file_is_detected_on_read(store: ArtifactStore) -> None:
    work = _write(store, "context", "c0ffee", {"model/w.bin": b"good weights"})
    ref = store.commit("context", "c0ffee", work)
    store.fs.pipe_file(_raw_path(store, "context", "c0ffee", "model/w.bin"), b"evil weights")
    # a fresh reader (no local cache) must notice
    fresh = ArtifactStore(
        store.root_uri if not store.is_local else store.root,
        store.storage_options,
        cache_dir=Path(store.cache_dir).parent / "cache2",
    )
    with pytest.raises(CorruptArtifact, match="model/w.bin: checksum mismatch"):
        fresh.fetch(ref)


def test_checkpoints_newest_complete_and_corrupt_skipped(store: ArtifactStore) -> None:
    for step in (1, 2, 3):
        d = store.checkpoint_workdir("para_train", "fp1", f"step-{step:08d}")
        (d / "state.pt").write_bytes(f"state {step}".encode())
        store.save_checkpoint("para_train", "fp1", f"step-{step:08d}", d, keep=3)
    # a checkpoint whose manifest was never written (process died mid-upload) is ignored
    d = store.checkpoint_workdir("para_train", "fp1", "step-00000004")
    (d / "state.pt").write_bytes(b"partial")
    if not store.is_local:
        store.fs.put_file(
            str(d / "state.pt"),
            _raw_path(store, "para_train", "fp1", "checkpoints", "step-00000004", "state.pt"),
        )
    assert store.list_checkpoints("para_train", "fp1") == [f"step-{s:08d}" for s in (1, 2, 3)]
    name, path = store.latest_checkpoint("para_train", "fp1")
    assert name == "step-00000003" and (path / "state.pt").read_bytes() == b"state 3"
    # corrupt the newest: the previous one is returned instead
    store.fs.pipe_file(
        _raw_path(store, "para_train", "fp1", "checkpoints", "step-00000003", "state.pt"), b"garbage"
    )
    fresh = ArtifactStore(
        store.root_uri if not store.is_local else store.root,
        store.storage_options,
        cache_dir=Path(store.cache_dir).parent / "cache3",
    )
    name, path = fresh.latest_checkpoint("para_train", "fp1")
    assert name == "step-00000002" and (path / "state.pt").read_bytes() == b"state 2"
    # keep=2 prunes the oldest after the next save
    d = store.checkpoint_workdir("para_train", "fp1", "step-00000005")
    (d / "state.pt").write_bytes(b"state 5")
    store.save_checkpoint("para_train", "fp1", "step-00000005", d, keep=2)
    assert store.list_checkpoints("para_train", "fp1") == ["step-00000003", "step-00000005"]


def test_commit_excludes_checkpoints(store: ArtifactStore) -> None:
    work = _write(store, "rl", "fp2", {"model/config.json": b"{}"})
    d = store.checkpoint_workdir("rl", "fp2", "step-00000001")
    (d / "big.pt").write_bytes(b"0" * 100)
    store.save_checkpoint("rl", "fp2", "step-00000001", d)
    ref = store.commit("rl", "fp2", work)
    manifest = json.loads(store.fs.cat_file(_raw_path(store, "rl", "fp2", "MANIFEST.json")))
    assert list(manifest["files"]) == ["model/config.json"]
    assert store.fetch(ref).joinpath("model/config.json").read_bytes() == b"{}"


@pytest.fixture
def s3_with_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, str]]:
    """A second moto server that enforces IAM auth (as AWS does), with one real user and key.
    Returns (endpoint, access key, secret)."""
    import boto3

    from tests.conftest import _free_port

    port = _free_port()
    # The first 4 requests are let through unauthenticated: they create the user, its key, policy, bucket.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x")
        iam.create_user(UserName="cyclej")
        key = iam.create_access_key(UserName="cyclej")["AccessKey"]
        iam.put_user_policy(
            UserName="cyclej",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x"
        ).create_bucket(Bucket="authed")
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_wrong_credentials_raise(s3_with_auth: tuple[str, str, str], tmp_path: Path) -> None:
    endpoint, key, secret = s3_with_auth
    good = ArtifactStore.from_config(
        StorageConfig(
            root="s3://authed/runs", endpoint_url=endpoint, key=key, secret=secret, cache_dir=str(tmp_path)
        )
    )
    good.check()  # the real key works
    assert not good.exists("data", "abc")
    bad = ArtifactStore.from_config(
        StorageConfig(
            root="s3://authed/runs",
            endpoint_url=endpoint,
            key=key,
            secret="not-the-secret",
            cache_dir=str(tmp_path),
        )
    )
    with pytest.raises(StorageError, match="cannot write"):
        bad.check()
    bad._checked = True  # even past the up-front check, a read is an error, never a silent "not cached"
    with pytest.raises(StorageError):
        bad.exists("data", "abc")


def test_unreachable_endpoint_raises_not_a_cache_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    dead = ArtifactStore.from_config(
        StorageConfig(root="s3://nowhere/runs", endpoint_url="http://127.0.0.1:9", cache_dir=str(tmp_path))
    )
    with pytest.raises(StorageError):
        dead.exists("data", "abc")


def test_missing_bucket_raises(s3_env: str, tmp_path: Path) -> None:
    store = ArtifactStore.from_config(
        StorageConfig(root="s3://no-such-bucket-here/x", cache_dir=str(tmp_path))
    )
    with pytest.raises(StorageError):
        store.check()


def test_fingerprint_depends_on_every_part() -> None:
    base = fingerprint("merge", 1, {"weight": 0.5}, {"context": "a", "para_train": "b"})
    assert base == fingerprint("merge", 1, {"weight": 0.5}, {"para_train": "b", "context": "a"})
    assert base != fingerprint("merge", 2, {"weight": 0.5}, {"context": "a", "para_train": "b"})
    assert base != fingerprint("merge", 1, {"weight": 0.6}, {"context": "a", "para_train": "b"})
    assert base != fingerprint("merge", 1, {"weight": 0.5}, {"context": "a", "para_train": "c"})
    assert base != fingerprint("rl", 1, {"weight": 0.5}, {"context": "a", "para_train": "b"})


def test_lease_lets_one_writer_compute_and_the_other_reuse(store: ArtifactStore) -> None:
    """Two runs of the same stage at once: one computes, the other waits and reads its artifact."""
    import threading

    computed: list[str] = []
    results: dict[str, str] = {}

    def worker(who: str) -> None:
        with store.lease("data", "samefp", ttl=30, poll=0.2) as mine:
            if mine:
                computed.append(who)
                time.sleep(1.0)  # the work
                work = _write(store, "data", "samefp", {"out.txt": who.encode()})
                results[who] = store.commit("data", "samefp", work).manifest_sha256
                return
        ref = store.ref("data", "samefp")
        assert ref is not None
        results[who] = ref.manifest_sha256

    threads = [threading.Thread(target=worker, args=(w,)) for w in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(computed) == 1
    assert results["first"] == results["second"]  # the same commit, read by both
    assert store.get_json("data/samefp/LEASE.json") is None  # released
    assert (
        "LEASE.json"
        not in json.loads(store.fs.cat_file(_raw_path(store, "data", "samefp", "MANIFEST.json")))["files"]
    )


def test_expired_lease_is_taken_over(store: ArtifactStore) -> None:
    store.put_json("merge/deadfp/LEASE.json", {"owner": "a-dead-pod", "expires": time.time() - 1})
    with store.lease("merge", "deadfp", poll=0.1) as mine:
        assert mine
        assert store.get_json("merge/deadfp/LEASE.json")["owner"] != "a-dead-pod"


def test_read_file_checks_one_file_without_fetching(store: ArtifactStore) -> None:
    work = _write(store, "eval", "e1", {"report.md": b"# table", "model/big.bin": b"0" * 1000})
    ref = store.commit("eval", "e1", work)
    assert store.read_text(ref, "report.md") == "# table"
    store.fs.pipe_file(_raw_path(store, "eval", "e1", "report.md"), b"# tampered")
    with pytest.raises(CorruptArtifact):
        store.read_file(ref, "report.md")
    with pytest.raises(FileNotFoundError):
        store.read_file(ref, "nope.md")


def test_lease_of_a_dead_local_process_is_taken_over_at_once(store: ArtifactStore) -> None:
    """A killed run leaves its lease behind; the next attempt on this host must not wait for the TTL."""
    import subprocess as sp

    dead = sp.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.put_json(
        "rl/killedfp/LEASE.json", {"owner": f"{_local_host()}:{dead.pid}:abcd", "expires": time.time() + 3600}
    )
    t0 = time.monotonic()
    with store.lease("rl", "killedfp", poll=5.0) as mine:
        assert mine
    assert time.monotonic() - t0 < 4.0
    # a live process's lease is respected (here: our own pid, under another lease id)
    store.put_json(
        "rl/livefp/LEASE.json",
        {"owner": f"{_local_host()}:{os.getpid()}:other", "expires": time.time() + 3600},
    )
    from cyclej.runtime.store import _dead_local

    assert not _dead_local(store.get_json("rl/livefp/LEASE.json"))


def test_checkpoint_lease_serializes_one_checkpoint_and_stays_out_of_listings(store: ArtifactStore) -> None:
    """Leases per checkpoint (paraphrase shards): a second holder waits, then sees the checkpoint saved."""
    import threading

    held = threading.Event()

    def first() -> None:
        with store.lease("paraphrase", "pfp", checkpoint="shard-00001", poll=0.1) as mine:
            assert mine
            held.set()
            assert store.list_checkpoints("paraphrase", "pfp") == []  # the lease file is not a checkpoint
            time.sleep(1.0)
            work = _write(store, "paraphrase", "pfp", {"shard.jsonl": b"{}\n"})
            store.save_checkpoint("paraphrase", "pfp", "shard-00001", work)

    t = threading.Thread(target=first)
    t.start()
    assert held.wait(30)
    with store.lease("paraphrase", "pfp", checkpoint="shard-00001", poll=0.1) as mine:
        assert not mine  # waited for the holder, then found its checkpoint
    t.join(30)
    with store.lease("paraphrase", "pfp", checkpoint="shard-00002", poll=0.1) as mine:
        assert mine  # another checkpoint: free
    assert store.list_checkpoints("paraphrase", "pfp") == ["shard-00001"]
    assert store.get_json("paraphrase/pfp/checkpoints/shard-00001.LEASE.json") is None  # released


def test_concurrent_fetches_never_show_a_partial_file(store: ArtifactStore) -> None:
    """Several readers fetch one artifact into the same cache at once (two `cyclej translate` runs, a
    merge built by two threads): each must read every file whole, never one another fetch is writing."""
    from concurrent.futures import ThreadPoolExecutor

    files = {f"model/shard-{i}.bin": os.urandom(512 * 1024) for i in range(8)}
    files["tokenizer_config.json"] = b'{"x": 1}'
    ref = store.commit("context", "fetchfp", _write(store, "context", "fetchfp", files))

    def fetch_and_read(i: int) -> bool:
        time.sleep(0.03 * i)  # staggered: early readers read while later fetches still download
        local = store.fetch(ref)
        return all((local / rel).read_bytes() == data for rel, data in files.items())

    for _ in range(3):
        if not store.is_local:  # a fresh cache each round, so the fetches really download at once
            shutil.rmtree(store.cache_dir / "fetched", ignore_errors=True)
        with ThreadPoolExecutor(6) as pool:
            assert all(pool.map(fetch_and_read, range(6)))


def test_uploaded_checkpoints_leave_no_local_copy(store: ArtifactStore, tmp_path: Path) -> None:
    """A remote store's checkpoint is written in the local cache, uploaded, and its local copy deleted (an
    RL checkpoint is 12 bytes per parameter: 73 GB for GPT-J on an 80 GB pod disk); the store itself keeps
    the newest `keep`; a checkpoint downloaded to resume goes once the stage has read it."""
    names = [f"step-{s:08d}" for s in (1, 2, 3)]
    for name in names:
        d = store.checkpoint_workdir("rl", "fp9", name)
        (d / "optimizer-00001.safetensors").write_bytes(name.encode() * 100)
        store.save_checkpoint("rl", "fp9", name, d, keep=1)
        assert d.exists() == store.is_local  # a local store's work directory is the checkpoint itself
    assert store.list_checkpoints("rl", "fp9") == names[-1:]
    name, path = store.latest_checkpoint("rl", "fp9")
    assert name == names[-1] and (path / "optimizer-00001.safetensors").read_bytes() == name.encode() * 100
    store.drop_local_checkpoint("rl", "fp9", name)
    assert path.exists() == store.is_local
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not cached, cached
    if store.is_local:  # pruned to `keep` on disk too
        assert (
            sorted(p.name for p in (Path(store.root) / "rl" / "fp9" / "checkpoints").iterdir()) == names[-1:]
        )


def test_a_store_moved_behind_a_symlink_mid_run_still_saves_in_place(tmp_path: Path) -> None:
    """A user moves a filling store to a bigger disk and leaves a symlink at the old path while the run
    goes on: the next checkpoint and commit resolve through the link. Comparing a resolved work folder
    with the unresolved destination took them for two places and copied each file onto itself
    (SameFileError, the run failed)."""
    store = ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    first = store.checkpoint_workdir("paraphrase", "fp", "shard-00000")
    (first / "shard.jsonl").write_text("one\n", encoding="utf-8")
    store.save_checkpoint("paraphrase", "fp", "shard-00000", first)

    (tmp_path / "bigger-disk").mkdir()
    shutil.move(tmp_path / "store", tmp_path / "bigger-disk" / "store")
    (tmp_path / "store").symlink_to(tmp_path / "bigger-disk" / "store")

    second = store.checkpoint_workdir("paraphrase", "fp", "shard-00001")
    (second / "shard.jsonl").write_text("two\n", encoding="utf-8")
    store.save_checkpoint("paraphrase", "fp", "shard-00001", second)
    assert store.list_checkpoints("paraphrase", "fp") == ["shard-00000", "shard-00001"]
    assert (store.load_checkpoint("paraphrase", "fp", "shard-00001") / "shard.jsonl").read_text() == "two\n"

    out = tmp_path / "store" / "paraphrase" / "fp"
    (out / "pairs.jsonl").write_text("pairs\n", encoding="utf-8")
    ref = store.commit("paraphrase", "fp", out)
    assert (store.fetch(ref) / "pairs.jsonl").read_text(encoding="utf-8") == "pairs\n"
