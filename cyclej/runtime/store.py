"""The artifact store: stage outputs and checkpoints as directories in object storage (fsspec).

Layout, under a root that is a local path, ``file://…`` or ``s3://bucket/prefix``::

    <root>/<stage>/<fingerprint>/MANIFEST.json        written last: the artifact is complete
    <root>/<stage>/<fingerprint>/<files…>
    <root>/<stage>/<fingerprint>/checkpoints/<name>/MANIFEST.json   (and its files)

A directory without its manifest is never trusted. Every manifest lists each file's size and sha256,
so a corrupt file is caught on read. Stages compute in a local working directory and `commit` it;
when the root is local the working directory *is* the artifact directory, so nothing is copied.
With a remote root, checkpoints are written in the local cache and that copy is deleted once uploaded
(as is a copy downloaded to resume, by `drop_local_checkpoint`): a pod's disk holds one in flight.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from cyclej.errors import CorruptArtifact, StorageError, first_line

log = logging.getLogger("cyclej")

MANIFEST = "MANIFEST.json"
LEASE = "LEASE.json"
CHECKPOINTS = "checkpoints"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArtifactRef:
    """What a stage returns and Prefect persists: a pointer to a committed artifact, never its bytes."""

    stage: str
    fingerprint: str
    uri: str
    manifest_sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArtifactRef:
        return cls(**json.loads(text))


def fingerprint(stage: str, version: int, config: Any, inputs: dict[str, str]) -> str:
    """hash(stage name, stage schema version, its config, the fingerprints of its inputs)."""
    payload = json.dumps(
        {"stage": stage, "version": version, "config": config, "inputs": dict(sorted(inputs.items()))},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _scan(local_dir: Path, exclude_top: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(local_dir.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(local_dir).as_posix()
        if rel in (MANIFEST, LEASE) or rel.split("/", 1)[0] in exclude_top:
            continue
        files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return files


class ArtifactStore:
    """Committed artifacts and checkpoints under one root, on any fsspec filesystem."""

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.storage_options = dict(storage_options or {})
        if "://" in root:
            protocol, _ = root.split("://", 1)
        else:
            protocol, root = "file", str(Path(root).expanduser().resolve())
        self.protocol = protocol
        try:
            self.fs: fsspec.AbstractFileSystem = fsspec.filesystem(protocol, **self.storage_options)
        except (ValueError, ImportError) as exc:  # an unknown scheme, or its fsspec back-end is missing
            raise StorageError(
                f"storage {root}: unsupported ({first_line(exc)}); use a local path, file://… "
                "or s3://bucket/prefix"
            ) from None
        self.root = self.fs._strip_protocol(root).rstrip("/")
        self.is_local = protocol in ("file", "local")
        default_cache = Path(os.environ.get("CYCLEJ_CACHE", Path.home() / ".cache" / "cyclej")) / "store"
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache
        self._checked = False

    @classmethod
    def from_config(cls, storage: Any) -> ArtifactStore:
        """Build from a `StorageConfig`; S3 endpoint/credentials fall back to the AWS_* variables."""
        opts: dict[str, Any] = {}
        if storage.root.startswith("s3://"):
            endpoint = (
                storage.endpoint_url
                or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL")
            )
            if endpoint:
                opts["client_kwargs"] = {"endpoint_url": endpoint}
            if storage.key is not None:
                opts["key"] = storage.key.get_secret_value()
            if storage.secret is not None:
                opts["secret"] = storage.secret.get_secret_value()
            # Fresh listings every time: another worker may have committed an artifact meanwhile.
            opts["use_listings_cache"] = False
            # Fail in seconds, not minutes, when the endpoint is down; botocore still retries throttling.
            opts["config_kwargs"] = {"connect_timeout": 5, "retries": {"max_attempts": 3, "mode": "standard"}}
        return cls(storage.root, opts, storage.cache_dir)

    # ---- paths --------------------------------------------------------------------------------
    @property
    def root_uri(self) -> str:
        return f"{self.protocol}://{self.root}" if not self.is_local else self.root

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def uri(self, stage: str, fp: str) -> str:
        p = self._path(stage, fp)
        return p if self.is_local else f"{self.protocol}://{p}"

    # ---- reachability ---------------------------------------------------------------------------
    def check(self) -> None:
        """Raise StorageError unless the root can be listed and written (credentials included)."""
        # unique per caller: concurrent first uses of one store must not delete each other's probe
        probe = self._path(f".cyclej-probe-{os.getpid()}-{threading.get_ident()}")
        try:
            if self.is_local:
                self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self._delete(probe)
        except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
            raise StorageError(
                f"storage {self.root_uri}: cannot write ({type(exc).__name__}: {first_line(exc)}); "
                "check storage.root, the endpoint and the AWS_* credentials"
            ) from None
        self._checked = True

    def _ensure_checked(self) -> None:
        if not self._checked:
            self.check()

    def _delete(self, path: str, recursive: bool = False) -> None:
        """Delete object by object (S3 DeleteObject): RunPod's S3 API for network volumes has no
        DeleteObjects, which s3fs's `rm` sends even for a single key."""
        if self.is_local:
            self.fs.rm(path, recursive=recursive)
            return
        for key in self.fs.find(path) if recursive else [path]:
            self.fs.rm_file(key)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run an fs call; anything but 'not found' is a StorageError, never a silent miss."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise StorageError(
                f"storage {self.root_uri}: {what} failed ({type(exc).__name__}: {first_line(exc)})"
            ) from None

    # ---- manifests ------------------------------------------------------------------------------
    def _read_manifest(self, dir_path: str) -> tuple[dict[str, Any], str] | None:
        try:
            raw = self._call("read manifest", self.fs.cat_file, f"{dir_path}/{MANIFEST}")
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw), hashlib.sha256(raw).hexdigest()
        except ValueError:
            return None  # a torn manifest is as good as none

    def exists(self, stage: str, fp: str) -> bool:
        """True only for a committed artifact (its manifest is present and readable)."""
        self._ensure_checked()
        return self._read_manifest(self._path(stage, fp)) is not None

    def ref(self, stage: str, fp: str) -> ArtifactRef | None:
        self._ensure_checked()
        got = self._read_manifest(self._path(stage, fp))
        if got is None:
            return None
        manifest, digest = got
        return ArtifactRef(stage, fp, self.uri(stage, fp), digest, manifest.get("metrics", {}))

    # ---- writing --------------------------------------------------------------------------------
    def workdir(self, stage: str, fp: str) -> Path:
        """The local directory a stage computes in. For a local root it is the artifact directory."""
        self._ensure_checked()
        if self.is_local:
            d = Path(self._path(stage, fp))
        else:
            d = self.cache_dir / "work" / _safe(self.root) / stage / fp
        self._local_write(f"create {d}", d.mkdir, parents=True, exist_ok=True)
        return d

    def _local_write(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A write to local disk (the store itself when it is local, or the work/cache folder): a
        read-only or full disk is the store's one-line error, like any remote failure."""
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            raise StorageError(
                f"storage {self.root_uri}: {what} failed ({type(exc).__name__}: "
                f"{exc.strerror or first_line(exc)}); check that it is writable and has space"
            ) from None

    def commit(
        self, stage: str, fp: str, local_dir: Path, metrics: dict[str, Any] | None = None
    ) -> ArtifactRef:
        """Upload `local_dir` (checkpoints excluded) and write the manifest last."""
        self._ensure_checked()
        files = _scan(Path(local_dir), exclude_top=(CHECKPOINTS,))
        dest = self._path(stage, fp)
        if not (self.is_local and _same_dir(local_dir, dest)):
            for rel in files:
                self._put(Path(local_dir) / rel, f"{dest}/{rel}")
        manifest = {
            "stage": stage,
            "fingerprint": fp,
            "files": files,
            "metrics": metrics or {},
            "created": time.time(),
            "run": run_label(),
        }
        raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self._write_bytes(f"{dest}/{MANIFEST}", raw)
        return ArtifactRef(stage, fp, self.uri(stage, fp), hashlib.sha256(raw).hexdigest(), metrics or {})

    def _put(self, local: Path, remote: str) -> None:
        if self.is_local:
            self._local_write(f"write {remote}", _copy_into_place, local, Path(remote))
        else:
            self._call(f"upload {remote}", self.fs.put_file, str(local), remote)

    def _write_bytes(self, remote: str, data: bytes) -> None:
        if self.is_local:
            self._local_write(f"write {remote}", _write_atomically, Path(remote), data)
        else:
            self._call(f"write {remote}", self.fs.pipe_file, remote, data)

    # ---- reading --------------------------------------------------------------------------------
    def fetch(self, ref: ArtifactRef | tuple[str, str], verify: bool = True) -> Path:
        """A local directory holding the committed artifact, every file checked against the manifest."""
        stage, fp = (ref.stage, ref.fingerprint) if isinstance(ref, ArtifactRef) else ref
        return self._fetch_dir(self._path(stage, fp), f"{stage}/{fp}", verify)

    def _fetch_dir(self, remote_dir: str, label: str, verify: bool) -> Path:
        self._ensure_checked()
        got = self._read_manifest(remote_dir)
        if got is None:
            raise FileNotFoundError(f"no committed artifact at {label}")
        manifest, digest = got
        if self.is_local:
            local = Path(remote_dir)
            if verify:
                self._verify(local, manifest, label)
            return local
        local = self.cache_dir / "fetched" / _safe(self.root) / label
        stamp = local / ".verified"
        if stamp.is_file() and stamp.read_text() == digest:
            return local
        for rel, meta in manifest["files"].items():
            target = local / rel
            if (
                target.is_file()
                and target.stat().st_size == meta["size"]
                and sha256_file(target) == meta["sha256"]
            ):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            # Download beside the target, then rename: another process (or thread) fetching the same
            # artifact may already be reading the file, and must never see it truncated or half-written.
            part = target.with_name(f".{target.name}.part-{os.getpid()}-{threading.get_ident()}")
            try:
                self._call(f"download {label}/{rel}", self.fs.get_file, f"{remote_dir}/{rel}", str(part))
                os.replace(part, target)
            finally:
                part.unlink(missing_ok=True)
        self._verify(local, manifest, label)
        stamp.write_text(digest)
        return local

    @staticmethod
    def _verify(local: Path, manifest: dict[str, Any], label: str) -> None:
        for rel, meta in manifest["files"].items():
            p = local / rel
            if not p.is_file():
                raise CorruptArtifact(f"{label}/{rel}: missing (listed in the manifest)")
            if p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
                raise CorruptArtifact(f"{label}/{rel}: checksum mismatch (the file is corrupt)")

    def read_text(self, ref: ArtifactRef, rel: str) -> str:
        return self.read_file(ref, rel).decode("utf-8")

    def read_file(self, ref: ArtifactRef, rel: str) -> bytes:
        """One file of a committed artifact, checked against the manifest, without fetching the rest
        (a model directory is not downloaded to read its metrics)."""
        dir_path = self._path(ref.stage, ref.fingerprint)
        got = self._read_manifest(dir_path)
        if got is None:
            raise FileNotFoundError(f"no committed artifact at {ref.stage}/{ref.fingerprint}")
        meta = got[0]["files"].get(rel)
        if meta is None:
            raise FileNotFoundError(f"{ref.stage}/{ref.fingerprint}/{rel}: not in the artifact")
        data = self._call(f"read {rel}", self.fs.cat_file, f"{dir_path}/{rel}")
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CorruptArtifact(
                f"{ref.stage}/{ref.fingerprint}/{rel}: checksum mismatch (the file is corrupt)"
            )
        return data

    # ---- leases: one writer per artifact, across processes and machines -------------------------
    @contextmanager
    def lease(
        self, stage: str, fp: str, ttl: float = 90.0, poll: float = 2.0, checkpoint: str | None = None
    ) -> Iterator[bool]:
        """Hold the right to compute `<stage>/<fp>` (or, with `checkpoint`, that one checkpoint of it, e.g.
        a paraphrase shard). Yields True when this process holds it, False when the artifact (or the
        checkpoint) was committed by someone else while we waited (the caller should just read it).

        A lease is a small JSON file renewed every ttl/3 s by a background thread; one that has not been
        renewed for `ttl` s belongs to a dead process and is taken over. Object stores have no atomic
        create, so the writer re-reads its lease after a pause and backs off if another won the race.
        """
        import uuid

        # A checkpoint's lease sits beside it; list_checkpoints ignores it (no manifest) and the commit
        # of the artifact leaves the checkpoints folder out.
        rel = (
            f"{stage}/{fp}/{LEASE}"
            if checkpoint is None
            else f"{stage}/{fp}/{CHECKPOINTS}/{checkpoint}.{LEASE}"
        )
        me = f"{_local_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        what = stage if checkpoint is None else f"{stage} {checkpoint}"
        waited_for: dict[str, Any] | None = None  # the last other holder we saw (for the logs)

        def done() -> bool:
            if self.exists(stage, fp):
                return True
            return checkpoint is not None and checkpoint in self.list_checkpoints(stage, fp)

        def reused() -> None:
            if waited_for is not None:
                by = self._committed_by(stage, fp, checkpoint) or _describe_run(waited_for)
                log.info("reused %s from run %s", what, by)

        def claim() -> dict[str, Any]:
            return {"owner": me, "expires": time.time() + ttl, "run": run_label()}

        while True:
            if done():
                reused()
                yield False
                return
            held = self.get_json(rel)
            if (
                held is None
                or held.get("owner") == me
                or held.get("expires", 0) < time.time()
                or _dead_local(held)
                or _orphaned_here(held)
            ):
                _HELD_LEASES.add(me)  # from the claim on: another thread of ours must not take it as orphaned
                try:
                    self.put_json(rel, claim())
                except BaseException:
                    _HELD_LEASES.discard(me)
                    raise
                time.sleep(min(poll, 0.5))
                held = self.get_json(rel)
                if held is not None and held.get("owner") == me:
                    if not done():
                        break
                    # the previous holder committed, then released, while we were looking
                    _HELD_LEASES.discard(me)
                    self.remove(rel)
                    reused()
                    yield False
                    return
                _HELD_LEASES.discard(me)
            if (
                held is not None
                and held.get("owner") != me
                and (waited_for is None or waited_for.get("owner") != held.get("owner"))
            ):
                waited_for = held
                log.info("waiting for run %s computing stage %s", _describe_run(held), what)
            time.sleep(poll)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(ttl / 3):
                try:
                    self.put_json(rel, claim())
                except Exception:  # noqa: BLE001 - a missed renewal only risks a takeover after ttl
                    pass

        renewer = threading.Thread(target=renew, daemon=True, name=f"lease-{stage}")
        renewer.start()
        try:
            yield True
        finally:
            stop.set()
            renewer.join(timeout=5)
            _HELD_LEASES.discard(me)
            # Best effort: the stage's own error (say, a store that turned read-only) is the one to
            # report, and a lease left behind is taken over at once (_orphaned_here, _dead_local).
            with contextlib.suppress(StorageError):
                self.remove(rel)

    def _committed_by(self, stage: str, fp: str, checkpoint: str | None = None) -> str | None:
        """The run that committed an artifact (or one checkpoint of it), from its manifest."""
        path = self._path(stage, fp) if checkpoint is None else self._path(stage, fp, CHECKPOINTS, checkpoint)
        got = self._read_manifest(path)
        return None if got is None else got[0].get("run")

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(
        self, stage: str, fp: str, name: str, local_dir: Path, keep: int | None = None
    ) -> None:
        """Commit `local_dir` as checkpoint `name` (names sort by age: 'step-00000012', 'shard-00003').

        With `keep`, older checkpoints of its series (the name without its trailing digits) beyond the
        newest `keep` are deleted after this one commits (on a local root: their directories). On a
        remote root, `local_dir`, when it is this checkpoint's `checkpoint_workdir`, is deleted once
        uploaded: the pod's disk holds one checkpoint in flight, not every checkpoint of the run.
        """
        self._ensure_checked()
        dest = self._path(stage, fp, CHECKPOINTS, name)
        files = _scan(Path(local_dir))
        if not (self.is_local and _same_dir(local_dir, dest)):
            for rel in files:
                self._put(Path(local_dir) / rel, f"{dest}/{rel}")
        raw = json.dumps(
            {"name": name, "files": files, "created": time.time(), "run": run_label()}, sort_keys=True
        ).encode()
        self._write_bytes(f"{dest}/{MANIFEST}", raw)
        if (
            not self.is_local
            and Path(local_dir).resolve() == self._checkpoint_work(stage, fp, name).resolve()
        ):
            self.drop_local_checkpoint(stage, fp, name)
        if keep is not None:
            # Within this name's series only ('step-…', 'bt-step-…'): a stage with two series (para_train's
            # back-translation phase) must not lose one to the other's keep.
            series = checkpoint_series(name)
            mine = [n for n in self.list_checkpoints(stage, fp) if checkpoint_series(n) == series]
            for old in mine[:-keep]:
                self.delete_checkpoint(stage, fp, old)

    def _checkpoint_work(self, stage: str, fp: str, name: str) -> Path:
        return self.cache_dir / "work" / _safe(self.root) / stage / fp / CHECKPOINTS / name

    def _checkpoint_fetched(self, stage: str, fp: str, name: str) -> Path:
        return self.cache_dir / "fetched" / _safe(self.root) / stage / fp / CHECKPOINTS / name

    def drop_local_checkpoint(self, stage: str, fp: str, name: str) -> None:
        """Delete a remote root's local copies of a checkpoint (the one written before its upload, the one
        downloaded to resume): the store holds it. Nothing to do on a local root, where the checkpoint's
        directory is the stored checkpoint."""
        if self.is_local:
            return
        for d in (self._checkpoint_work(stage, fp, name), self._checkpoint_fetched(stage, fp, name)):
            if d.exists():
                self._local_write(f"delete {d}", shutil.rmtree, d)

    def checkpoint_workdir(self, stage: str, fp: str, name: str) -> Path:
        """Where to write a checkpoint before `save_checkpoint` (in place for a local root)."""
        if self.is_local:
            d = Path(self._path(stage, fp, CHECKPOINTS, name))
        else:
            d = self._checkpoint_work(stage, fp, name)
        if d.exists():
            self._local_write(f"clear {d}", shutil.rmtree, d)
        self._local_write(f"create {d}", d.mkdir, parents=True)
        return d

    def list_checkpoints(self, stage: str, fp: str) -> list[str]:
        """Names of committed checkpoints, oldest first."""
        self._ensure_checked()
        base = self._path(stage, fp, CHECKPOINTS)
        try:
            entries = self._call("list checkpoints", self.fs.ls, base, detail=False)
        except FileNotFoundError:
            return []
        names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        # through _call like every other fs call: a raw EndpointConnectionError from here (the S3
        # endpoint gone mid-run) escaped as a "bug", without the stage's resume point
        return [n for n in names if self._call("list checkpoints", self.fs.exists, f"{base}/{n}/{MANIFEST}")]

    def load_checkpoint(self, stage: str, fp: str, name: str) -> Path:
        """A local, verified copy of one checkpoint (raises CorruptArtifact on a bad file)."""
        return self._fetch_dir(
            self._path(stage, fp, CHECKPOINTS, name), f"{stage}/{fp}/{CHECKPOINTS}/{name}", True
        )

    def latest_checkpoint(self, stage: str, fp: str, prefix: str = "") -> tuple[str, Path] | None:
        """The newest checkpoint that is complete and passes its checksums; corrupt ones are skipped."""
        for name in reversed(self.list_checkpoints(stage, fp)):
            if not name.startswith(prefix):
                continue
            try:
                return name, self.load_checkpoint(stage, fp, name)
            except CorruptArtifact as exc:
                import logging

                logging.getLogger("cyclej").warning("skipping checkpoint %s: %s", name, exc)
        return None

    def delete_checkpoint(self, stage: str, fp: str, name: str) -> None:
        """Delete a checkpoint from the store, and its local copies."""
        self.drop_local_checkpoint(stage, fp, name)
        path = self._path(stage, fp, CHECKPOINTS, name)
        # Manifest first: a half-deleted checkpoint must never look complete.
        try:
            self._call("delete checkpoint", self._delete, f"{path}/{MANIFEST}")
            self._call("delete checkpoint", self._delete, path, recursive=True)
        except FileNotFoundError:
            pass

    def delete_checkpoints(self, stage: str, fp: str) -> None:
        for name in self.list_checkpoints(stage, fp):
            self.delete_checkpoint(stage, fp, name)

    # ---- small files beside artifacts (leases, progress) ----------------------------------------
    def put_json(self, rel: str, obj: Any) -> None:
        self._write_bytes(self._path(rel), json.dumps(obj, sort_keys=True).encode())

    def get_json(self, rel: str) -> Any | None:
        try:
            return json.loads(self._call("read", self.fs.cat_file, self._path(rel)))
        except FileNotFoundError:
            return None

    def remove(self, rel: str) -> None:
        try:
            self._call("delete", self._delete, self._path(rel))
        except FileNotFoundError:
            pass


@functools.cache
def _local_host() -> str:
    """This host *and* PID namespace: containers can share a hostname (host networking) without sharing
    process ids, and a pid is only meaningful within its namespace."""
    try:
        ns = "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    except OSError:  # no /proc (macOS): the hostname alone
        ns = ""
    return f"{os.uname().nodename}.{ns}" if ns else os.uname().nodename


_HELD_LEASES: set[str] = set()  # owner ids of the leases this process holds at this moment
_run_label: str | None = None


def set_run_label(label: str | None) -> None:
    """Name this process's run in leases and manifests (the orchestrator's run name, e.g. Prefect's flow
    run), so logs can say which run computed a stage and which one waited for it."""
    global _run_label
    _run_label = label


def run_label() -> str:
    """This process's run: the label set by the orchestrator, $CYCLEJ_RUN, or host and pid."""
    return _run_label or os.environ.get("CYCLEJ_RUN") or f"{os.uname().nodename}:{os.getpid()}"


def _describe_run(lease: dict[str, Any]) -> str:
    """'<run> (<host>, pid <pid>)' for the logs, from a lease file."""
    host, _, rest = str(lease.get("owner", "")).partition(":")
    pid = rest.partition(":")[0]
    base, _, namespace = host.rpartition(".")
    if base and namespace.isdigit():  # without _local_host's PID-namespace suffix
        host = base
    return f"{lease.get('run') or '?'} ({host}, pid {pid})"


def _orphaned_here(lease: dict[str, Any]) -> bool:
    """A lease this very process wrote but no longer holds (its holder failed and could not delete it,
    e.g. on a store that turned read-only): stale at once. The process is alive, so neither its pid nor,
    for ttl seconds, the expiry would say so, and an in-process retry waited ~75 s on itself."""
    host, _, rest = str(lease.get("owner", "")).partition(":")
    return (
        host == _local_host()
        and rest.partition(":")[0] == str(os.getpid())
        and lease.get("owner") not in _HELD_LEASES
    )


def _dead_local(lease: dict[str, Any]) -> bool:
    """A lease held by a process of this host that no longer exists (killed, OOM-killed): stale at once,
    no need to wait for its TTL. Leases of other hosts (pods) expire by TTL."""
    host, _, rest = str(lease.get("owner", "")).partition(":")
    pid = rest.partition(":")[0]
    if host != _local_host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _same_dir(a: str | Path, b: str | Path) -> bool:
    """Whether two local paths name one folder: both resolved, so a store root reached through a symlink
    (or one turned into a symlink while a run was writing: the store moved to another disk) is still
    seen as in place, and a file is never copied onto itself."""
    return Path(a).resolve() == Path(b).resolve()


def _copy_into_place(local: Path, remote: Path) -> None:
    remote.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local, remote)


def _write_atomically(path: Path, data: bytes) -> None:
    """Atomic on a local disk: a crash never leaves a half-written manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a torn temporary file is never read; try not to leave it
            tmp.unlink(missing_ok=True)
        raise


def _safe(root: str) -> str:
    return root.strip("/").replace("/", "__").replace(":", "_")


def checkpoint_series(name: str) -> str:
    """'step-00000012' → 'step-', 'bt-step-00000040' → 'bt-step-': the checkpoints `keep` counts together."""
    return name.rstrip("0123456789")


@dataclass(frozen=True)
class StageCheckpoints:
    """The checkpoints of one stage run, `<stage>/<fingerprint>/checkpoints/<name>/` in `store`: the one
    way a stage saves, finds and reads its own checkpoints. A stage gets it as `run.checkpoints`
    (cyclej.pipeline.registry.StageRun) and hands it to what checkpoints for it: the LoRA trainer, the RL
    loop, the paraphrase shards. Write into `workdir(name)`, then `save(name, that folder)`: the upload is
    complete or absent, never half there (ArtifactStore.save_checkpoint)."""

    store: ArtifactStore
    stage: str
    fingerprint: str

    def names(self) -> list[str]:
        """The complete checkpoints, oldest first."""
        return self.store.list_checkpoints(self.stage, self.fingerprint)

    def latest(self, prefix: str = "") -> tuple[str, Path] | None:
        """The newest complete checkpoint whose name starts with `prefix`, and its local folder."""
        return self.store.latest_checkpoint(self.stage, self.fingerprint, prefix=prefix)

    def workdir(self, name: str) -> Path:
        """An empty local folder to write checkpoint `name` into before `save`."""
        return self.store.checkpoint_workdir(self.stage, self.fingerprint, name)

    def save(self, name: str, local_dir: Path, keep: int | None = None) -> None:
        """Upload `local_dir` as checkpoint `name`; with `keep`, only the newest `keep` checkpoints stay."""
        self.store.save_checkpoint(self.stage, self.fingerprint, name, local_dir, keep=keep)

    def load(self, name: str) -> Path:
        """The local folder of checkpoint `name` (downloaded from a remote store), checksums verified."""
        return self.store.load_checkpoint(self.stage, self.fingerprint, name)

    def delete_all(self) -> None:
        self.store.delete_checkpoints(self.stage, self.fingerprint)
