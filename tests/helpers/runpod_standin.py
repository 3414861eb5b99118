"""A local stand-in for the RunPod GraphQL API, for tests of the `runpod` Prefect worker.

It answers the requests the `runpod` SDK (1.10) sends to `$RUNPOD_API_BASE_URL/graphql`:
`gpuTypes(input: {id})` (create_pod checks the GPU type exists), `myself { networkVolumes }` (create_pod
looks up a network volume's data center), `myself { pods }` (get_pods), `podFindAndDeployOnDemand(input:
{...})` (create a pod, with `containerRegistryAuthId` and env values referencing RunPod secrets as
`{{ RUNPOD_SECRET_name }}`, substituted from `secrets` when the pod starts), `pod(input: {podId})` (a
generic error for an id RunPod does not know, as the real API does), `podStop` and `podTerminate`.
`podFindAndDeployOnDemand` checks what RunPod's API checks of the pod's resources (`minMemoryInGb`,
`minVcpuCount`, `containerDiskInGb`, `gpuCount`: positive integers; `allowedCudaVersions`: RunPod's
CUDA versions) and places the pod on the first free host whose CUDA version (its driver's) the request
allows — any host when it names none, as RunPod does; `host_cuda_versions` lists the hosts, oldest
first. `delete_pod` plays a pod deleted in RunPod's console. A created "pod" runs its start command
(`dockerArgs`) as a local subprocess with only the pod's env (plus PATH/HOME), the way a container
sees only what RunPod injects; the image name is recorded, and the command's executables are looked up
in `bin_dir` (the local venv stands in for the image). Every request is recorded, parsed, so tests can
assert the job variables the worker sent.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

GPU_TYPES: dict[str, int] = {
    "NVIDIA RTX A5000": 24,
    "NVIDIA A40": 48,
    "NVIDIA RTX A6000": 48,
    "NVIDIA L40S": 48,
    "NVIDIA A100 80GB PCIe": 80,
    "NVIDIA H100 80GB HBM3": 80,
    "NVIDIA H200": 141,
}
# The message RunPod's API answers a query about a pod id it does not know (deleted in the console, or
# gone after termination) with: a generic GraphQL error, not `pod: null`.
UNKNOWN_POD_MESSAGE = "Something went wrong. Please try again later or contact support."
# RunPod substitutes secrets (Secrets in its console) into env values that reference them, when the pod
# starts: the pod spec and console show the reference only.
SECRET_REF = re.compile(r"\{\{\s*RUNPOD_SECRET_([A-Za-z0-9_.-]+)\s*\}\}")
# The values RunPod's API takes for allowedCudaVersions (its pod-creation reference: "a list of acceptable
# CUDA versions on the Pod. If not set, any CUDA version is acceptable").
CUDA_VERSIONS = (
    "13.0",
    "12.9",
    "12.8",
    "12.7",
    "12.6",
    "12.5",
    "12.4",
    "12.3",
    "12.2",
    "12.1",
    "12.0",
    "11.8",
)


# ---- a small parser for GraphQL input values (what the SDK writes inside `input: {...}`) ----------
_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[{}\[\]:,]))',
    re.S,
)


class _Parser:
    def __init__(self, text: str, pos: int) -> None:
        self.text, self.pos = text, pos

    def _next(self) -> tuple[str, str]:
        m = _TOKEN.match(self.text, self.pos)
        if not m:
            raise ValueError(f"cannot parse GraphQL at {self.text[self.pos : self.pos + 40]!r}")
        self.pos = m.end()
        kind = m.lastgroup or ""
        return kind, m.group(kind)

    def _peek(self) -> tuple[str, str]:
        pos = self.pos
        tok = self._next()
        self.pos = pos
        return tok

    def value(self) -> Any:
        kind, tok = self._next()
        if kind == "str":
            return json.loads(tok)  # GraphQL string escapes are JSON's
        if kind == "num":
            return float(tok) if "." in tok else int(tok)
        if kind == "name":
            return {"true": True, "false": False, "null": None}.get(tok, tok)  # enums stay strings
        if tok == "{":
            obj: dict[str, Any] = {}
            while self._peek()[1] != "}":
                _, key = self._next()
                self._next()  # ':'
                obj[key] = self.value()
                if self._peek()[1] == ",":
                    self._next()
            self._next()
            return obj
        if tok == "[":
            items: list[Any] = []
            while self._peek()[1] != "]":
                items.append(self.value())
                if self._peek()[1] == ",":
                    self._next()
            self._next()
            return items
        raise ValueError(f"unexpected {tok!r}")


def parse_input(query: str, field_name: str) -> dict[str, Any] | None:
    """The `input: {...}` argument of `field_name(...)` in a query, as a dict (None when absent)."""
    m = re.search(rf"\b{field_name}\s*\(\s*input\s*:\s*", query)
    if not m:
        return None
    return _Parser(query, m.end()).value()


# ---- the stand-in ------------------------------------------------------------------------------
@dataclass
class Pod:
    id: str
    spec: dict[str, Any]
    env: dict[str, str]
    command: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    desired_status: str = "RUNNING"
    host_cuda: str = ""  # the CUDA version of the host it landed on (its driver's)


@dataclass
class Request:
    op: str
    input: dict[str, Any] | None
    query: str


@dataclass
class RunpodStandin:
    """`with RunpodStandin(bin_dir, workdir) as api:` then `RUNPOD_API_BASE_URL=api.url`."""

    bin_dir: Path
    workdir: Path
    api_key: str = "standin-key"
    network_volumes: dict[str, str] = field(default_factory=lambda: {"vol-standin": "EU-RO-1"})
    secrets: dict[str, str] = field(default_factory=dict)  # RunPod secrets by name
    # The CUDA versions of the free hosts, in the order RunPod offers them (an old driver first).
    host_cuda_versions: tuple[str, ...] = ("12.8", "13.0")
    requests: list[Request] = field(default_factory=list)
    pods: dict[str, Pod] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def ops(self, op: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.op == op]

    # -- server --
    def __enter__(self) -> RunpodStandin:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") != "/graphql":
                    return self._send(404, {"errors": [{"message": f"no route {self.path}"}]})
                if self.headers.get("Authorization") != f"Bearer {standin.api_key}":
                    return self._send(401, {"errors": [{"message": "Unauthorized"}]})
                try:
                    payload = standin.handle(json.loads(body)["query"])
                except Exception as exc:  # noqa: BLE001 - reported to the SDK as a GraphQL error
                    payload = {"errors": [{"message": f"{type(exc).__name__}: {exc}"}]}
                self._send(200, payload)

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for pod in list(self.pods.values()):
            self._kill(pod)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- GraphQL operations --
    def handle(self, query: str) -> dict[str, Any]:
        for op in ("podFindAndDeployOnDemand", "podTerminate", "podStop", "gpuTypes", "pod"):
            inp = parse_input(query, op)
            if inp is not None:
                break
        else:
            op = "myself" if re.search(r"\bmyself\b", query) else "gpuTypes" if "gpuTypes" in query else "?"
            inp = None
        with self._lock:
            self.requests.append(Request(op, inp, query))
        if op == "gpuTypes":
            ids = [inp["id"]] if inp else list(GPU_TYPES)
            return {
                "data": {
                    "gpuTypes": [
                        {"id": i, "displayName": i, "memoryInGb": GPU_TYPES[i], "maxGpuCount": 8}
                        for i in ids
                        if i in GPU_TYPES
                    ]
                }
            }
        if op == "myself":
            vols = [
                {"id": k, "name": k, "size": 100, "dataCenterId": v} for k, v in self.network_volumes.items()
            ]
            pods = [self._describe(p) for p in self.pods.values() if p.desired_status != "TERMINATED"]
            return {
                "data": {"myself": {"id": "user-standin", "pubKey": "", "networkVolumes": vols, "pods": pods}}
            }
        if op == "podFindAndDeployOnDemand":
            assert inp is not None
            return {"data": {op: self._deploy(inp)}}
        if op == "pod":
            assert inp is not None
            pod = self.pods.get(inp["podId"])
            if pod is None or pod.desired_status == "TERMINATED":  # RunPod forgets terminated pods
                return {"errors": [{"message": UNKNOWN_POD_MESSAGE, "path": ["pod"]}], "data": {"pod": None}}
            return {"data": {"pod": self._describe(pod)}}
        if op in ("podTerminate", "podStop"):
            assert inp is not None
            pod = self.pods.get(inp["podId"])
            if pod is None or pod.desired_status == "TERMINATED":
                return {"errors": [{"message": f"pod {inp['podId']} not found"}]}
            self._kill(pod)
            pod.desired_status = "TERMINATED" if op == "podTerminate" else "EXITED"
            return {"data": {op: None if op == "podTerminate" else {"id": pod.id, "desiredStatus": "EXITED"}}}
        return {"errors": [{"message": "the stand-in does not know this query"}]}

    def _deploy(self, spec: dict[str, Any]) -> dict[str, Any]:
        gpu = spec.get("gpuTypeId")
        if gpu not in GPU_TYPES:
            raise ValueError(
                f"There are no longer any instances available with the requested specifications ({gpu})"
            )
        vol = spec.get("networkVolumeId")
        if vol is not None and vol not in self.network_volumes:
            raise ValueError(f"network volume {vol} not found")
        for key in ("minMemoryInGb", "minVcpuCount", "containerDiskInGb", "gpuCount"):
            value = spec.get(key)  # GraphQL Int: a float or a string is a query error
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{key}: expected a positive Int, got {value!r}")
        allowed = spec.get("allowedCudaVersions")
        if allowed is not None:
            unknown = [v for v in allowed if v not in CUDA_VERSIONS]
            if unknown or not allowed:
                raise ValueError(
                    f"allowedCudaVersions: {allowed!r} is not a list of {', '.join(CUDA_VERSIONS)}"
                )
        host = next((h for h in self.host_cuda_versions if allowed is None or h in allowed), None)
        if host is None:
            raise ValueError(
                f"There are no longer any instances available with the requested specifications ({allowed})"
            )
        pod_id = uuid.uuid4().hex[:14]
        env = {e["key"]: e["value"] for e in spec.get("env") or []}
        for value in env.values():
            for name in SECRET_REF.findall(value):
                if name not in self.secrets:
                    raise ValueError(f"secret {name} not found")
        command = shlex.split(spec.get("dockerArgs") or "")
        pod = Pod(pod_id, spec, env, command, self.workdir / f"pod-{pod_id}.log", host_cuda=host)
        self.pods[pod_id] = pod
        self._start(pod)
        return {
            "id": pod_id,
            "imageName": spec.get("imageName"),
            "env": [f"{k}={v}" for k, v in env.items()],
            "machineId": "machine-standin",
            "machine": {"podHostId": f"{pod_id}-host"},
        }

    def _start(self, pod: Pod) -> None:
        if not pod.command:
            return  # the image's own CMD: nothing to run locally
        cwd = self.workdir / f"pod-{pod.id}"
        cwd.mkdir(parents=True, exist_ok=True)
        path = f"{self.bin_dir}{os.pathsep}/usr/bin:/bin"
        # Secrets are resolved inside the container only.
        resolved = {k: SECRET_REF.sub(lambda m: self.secrets[m.group(1)], v) for k, v in pod.env.items()}
        env = {"PATH": path, "HOME": str(cwd), "LANG": "C.UTF-8", **resolved}
        exe = Path(self.bin_dir) / pod.command[0]
        argv = [str(exe) if exe.exists() else pod.command[0], *pod.command[1:]]
        with open(pod.log_path, "wb") as log:
            pod.process = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _kill(self, pod: Pod) -> None:
        proc = pod.process
        if proc is None or proc.poll() is not None:
            return
        try:  # the whole container goes: SIGTERM, then SIGKILL after a grace period
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def _describe(self, pod: Pod) -> dict[str, Any]:
        s = pod.spec
        return {
            "id": pod.id,
            "name": s.get("name"),
            "imageName": s.get("imageName"),
            "desiredStatus": pod.desired_status,
            "gpuCount": s.get("gpuCount"),
            "containerDiskInGb": s.get("containerDiskInGb"),
            "volumeInGb": s.get("volumeInGb"),
            "memoryInGb": s.get("minMemoryInGb"),
            "vcpuCount": s.get("minVcpuCount"),
            "volumeMountPath": s.get("volumeMountPath"),
            "dockerArgs": s.get("dockerArgs"),
            "env": [f"{k}={v}" for k, v in pod.env.items()],
            "costPerHr": 0.0,
            "machine": {"gpuDisplayName": s.get("gpuTypeId")},
        }

    def delete_pod(self, pod_id: str) -> None:
        """A pod deleted outside Prefect (RunPod console, spot reclaim): stopped and forgotten."""
        pod = self.pods[pod_id]
        self._kill(pod)
        pod.desired_status = "TERMINATED"

    def pod_log(self, pod_id: str) -> str:
        p = self.pods[pod_id].log_path
        return p.read_text(errors="replace") if p.exists() else ""

    def process_alive(self, pod_id: str) -> bool:
        proc = self.pods[pod_id].process
        return proc is not None and proc.poll() is None
