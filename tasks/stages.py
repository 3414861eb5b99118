"""Prefect tasks: one thin wrapper around `cyclej.stages.run_stage`, configured per stage.

Why the wrapper is this thin: every stage already resumes from the artifact store, so the Prefect layer
only adds what Prefect is for — a cache key equal to the stage fingerprint (so finished stages show as
`Cached` and do no work), results persisted as JSON `ArtifactRef`s on the same storage, retries, and the
UI artifacts (link, metrics table, progress, resume point on failure).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.logging import get_run_logger

from cyclej.config import PipelineConfig
from cyclej.progress import Progress
from cyclej.stages import SPECS, run_stage, stage_fingerprint
from cyclej.store import ArtifactRef, ArtifactStore

RESULTS_DIR = "_prefect/results"


_STORES: dict[str, ArtifactStore] = {}
_RESULT_BLOCKS: dict[str, LocalFileSystem | RemoteFileSystem] = {}


def store_for(cfg: PipelineConfig) -> ArtifactStore:
    """The config's store, checked once per process (unreachable storage is an error, never a silent
    cache miss); every later call fails loudly on its own if the store goes away."""
    key = cfg.storage.model_dump_json()
    if key not in _STORES:
        store = ArtifactStore.from_config(cfg.storage)
        store.check()
        _STORES[key] = store
    return _STORES[key]


def refs_from(inputs: dict[str, dict[str, Any]]) -> dict[str, ArtifactRef]:
    return {k: ArtifactRef(**v) for k, v in inputs.items()}


def stage_cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    """The cache key *is* the stage fingerprint. A Prefect record whose artifact has vanished from the
    store is deleted here, so Prefect misses and the stage runs again instead of returning a dead ref."""
    cfg: PipelineConfig = params["cfg"]
    name: str = params["name"]
    fp = stage_fingerprint(name, cfg, {k: v["fingerprint"] for k, v in params["inputs"].items()})
    key = f"{name}-{fp}"
    store = store_for(cfg)
    if not store.exists(name, fp):
        store.remove(f"{RESULTS_DIR}/{key}")
    return key


def result_storage_for(cfg: PipelineConfig) -> LocalFileSystem | RemoteFileSystem:
    """A saved Prefect filesystem block for task results beside the artifacts (blocks must be saved
    before a task can reference them). Credentials stay in the AWS_* environment, never in the block."""
    root = cfg.storage.root
    slug = "cyclej-results-" + hashlib.sha256(f"{root}|{cfg.storage.endpoint_url}".encode()).hexdigest()[:12]
    from prefect.settings import PREFECT_API_URL

    cache_key = f"{PREFECT_API_URL.value()}|{slug}"  # blocks live on one Prefect server
    if cache_key in _RESULT_BLOCKS:  # saved once per process and server; later stages reuse it
        return _RESULT_BLOCKS[cache_key]
    if root.startswith("s3://"):
        settings: dict[str, Any] = {}
        endpoint = cfg.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            settings["client_kwargs"] = {"endpoint_url": endpoint}
        if cfg.storage.key is not None and cfg.storage.secret is not None:
            os.environ.setdefault("AWS_ACCESS_KEY_ID", cfg.storage.key.get_secret_value())
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", cfg.storage.secret.get_secret_value())
        block: LocalFileSystem | RemoteFileSystem = RemoteFileSystem(
            basepath=f"{root.rstrip('/')}/{RESULTS_DIR}", settings=settings
        )
    else:
        local_root = Path(root.removeprefix("file://")).expanduser().resolve()
        block = LocalFileSystem(basepath=str(local_root / RESULTS_DIR))
    block.save(slug, overwrite=True)
    _RESULT_BLOCKS[cache_key] = block
    return block


def cache_policy_for(cfg: PipelineConfig) -> CachePolicy:
    """The fingerprint is the cache key. No Prefect lock manager: two runs of one config at once are
    serialized by the store's lease (`run_stage`), which works on every store and is taken over when its
    holder dies. Prefect's FileSystemLockManager writes locks that never expire, so a run killed mid-stage
    (a lost pod) left one behind and every later run of that config waited on it forever."""
    return CachePolicy.from_cache_key_fn(stage_cache_key)


def _progress_listener() -> Any:
    """Mirror the stage's progress bar into a Prefect progress artifact (throttled by `Progress`)."""
    artifact_ids: dict[str, Any] = {}

    def listener(stage: str, desc: str, done: int, total: int, metrics: dict[str, Any]) -> None:
        pct = 100.0 * done / max(total, 1)
        key = f"{stage}:{desc}"
        try:
            if key not in artifact_ids:
                artifact_ids[key] = create_progress_artifact(
                    progress=pct, key=f"{stage.replace('_', '-')}-progress", description=f"{stage}: {desc}"
                )
            else:
                update_progress_artifact(artifact_ids[key], progress=pct)
        except Exception:  # noqa: BLE001 - the UI is best-effort; never fail a stage over it
            pass

    return listener


# Files some stages write for people: shown as tables in the UI (at most this many rows).
SAMPLE_FILES = ("samples.json", "samples.jsonl", "examples.jsonl")
MAX_TABLE_ROWS = 50


def _sample_rows(store: ArtifactStore, ref: ArtifactRef, rel: str) -> list[dict[str, Any]]:
    try:
        raw = store.read_file(ref, rel).decode("utf-8")
    except FileNotFoundError:
        return []
    rows = json.loads(raw) if rel.endswith(".json") else [json.loads(x) for x in raw.splitlines() if x.strip()]
    rows = [r for r in rows if isinstance(r, dict)][-MAX_TABLE_ROWS:]
    # table cells must be scalars
    return [{k: (v if isinstance(v, int | float | str | bool) or v is None else json.dumps(v)) for k, v in r.items()}
            for r in rows]


def _post_artifacts(ref: ArtifactRef, store: ArtifactStore) -> None:
    key = ref.stage.replace("_", "-")
    create_link_artifact(key=f"{key}-uri", link=ref.uri, link_text=f"{ref.stage}/{ref.fingerprint}",
                         description=f"Artifact of stage `{ref.stage}`")
    scalars = {k: v for k, v in ref.metrics.items() if isinstance(v, int | float | str | bool)}
    if scalars:
        rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                         for k, v in scalars.items())
        create_markdown_artifact(key=f"{key}-metrics", markdown=f"### {ref.stage}\n\n| metric | value |\n|---|---|\n{rows}\n",
                                 description=f"Metrics of stage `{ref.stage}`")
    for name, table in ref.metrics.items():
        if isinstance(table, list) and table and all(isinstance(r, dict) for r in table):
            create_table_artifact(key=f"{key}-{name.replace('_', '-')}", table=table,
                                  description=f"{ref.stage}: {name}")
    for rel in SAMPLE_FILES:
        rows = _sample_rows(store, ref, rel)
        if rows:
            create_table_artifact(key=f"{key}-{rel.split('.')[0]}", table=rows,
                                  description=f"{ref.stage}: {rel} (last {len(rows)} rows)")


def record_resume_point(tsk: Any, task_run: Any, state: Any) -> None:
    """on_failure hook: say in the UI where a retry will resume (the newest complete checkpoint)."""
    params = task_run.parameters if hasattr(task_run, "parameters") else {}
    try:
        cfg = PipelineConfig.model_validate(params["cfg"]) if isinstance(params.get("cfg"), dict) else params["cfg"]
        name = params["name"]
        fp = stage_fingerprint(name, cfg, {k: v["fingerprint"] for k, v in params["inputs"].items()})
        ckpts = store_for(cfg).list_checkpoints(name, fp)
    except Exception:  # noqa: BLE001 - parameters may be unavailable; the failure itself is what matters
        return
    point = ckpts[-1] if ckpts else "the beginning (no checkpoint yet)"
    create_markdown_artifact(
        key=f"{name.replace('_', '-')}-resume-point",
        markdown=f"### `{name}` failed\n\nRetry resumes from **{point}**.\n\nCheckpoints: {', '.join(ckpts) or 'none'}",
    )


@task(name="stage", persist_result=True, result_serializer="json", on_failure=[record_resume_point])
def stage_task(name: str, cfg: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run (or resume) one stage; return its ArtifactRef as a plain JSON dict."""
    logger = get_run_logger()
    store = store_for(cfg)
    progress = Progress(listeners=[_progress_listener()])
    ref = run_stage(name, cfg, refs_from(inputs), store, progress)
    logger.info("stage %s → %s", name, ref.uri)
    _post_artifacts(ref, store)
    return json.loads(ref.to_json())


def configured_stage_task(name: str, cfg: PipelineConfig) -> Any:
    """`stage_task` with this config's cache policy, result storage, retries and a readable run name."""
    orch = cfg.orchestration
    return stage_task.with_options(
        name=f"{name}",
        task_run_name=f"{name}",
        cache_policy=cache_policy_for(cfg),
        result_storage=result_storage_for(cfg),
        retries=orch.retries,
        retry_delay_seconds=orch.retry_delay_seconds,
        # No tags: a tagged task asks the server for tag concurrency slots on every run (~1.5 s each,
        # measured), which made a fully cached pipeline take 13 s instead of ~1 s.
    )


@task(name="paraphrase-shard")
def paraphrase_shard_task(cfg: PipelineConfig, inputs: dict[str, dict[str, Any]], shard: int) -> int:
    """One shard of the paraphrase stage; mapped so several workers can share the stage."""
    from cyclej.stages.paraphrase import run_paraphrase_shard

    run_paraphrase_shard(cfg, refs_from(inputs), store_for(cfg), shard, Progress().for_stage("paraphrase"))
    return shard


__all__ = [
    "SPECS",
    "configured_stage_task",
    "paraphrase_shard_task",
    "result_storage_for",
    "stage_task",
    "store_for",
]
