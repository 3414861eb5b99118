"""Prefect tasks: one thin wrapper around `cyclej.stages.run_stage`, configured per stage from its plan
(`cyclej.stages.plan_pipeline`: fingerprint, run name, resume point; nothing here computes them).

Why the wrapper is this thin: every stage already resumes from the artifact store, so the Prefect layer
only adds what Prefect is for — a cache key equal to the stage fingerprint (so finished stages show as
`Cached` and do no work), results persisted as JSON `ArtifactRef`s on the same storage, retries, and the
UI artifacts (link, metrics table, progress, resume point on failure).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.parse
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
from prefect.context import FlowRunContext, TaskRunContext
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.logging import get_run_logger

from cyclej.config import PipelineConfig
from cyclej.errors import BadInput, StorageError, first_line
from cyclej.pipeline.registry import PlannedStage, run_shard, run_stage
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore, StageCheckpoints
from cyclej.training.diagnostics import TRAINING_PLOT, plot_markdown, signal_table

RESULTS_DIR = "_prefect/results"
PRESIGNED_LINK_SECONDS = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live


def forward_project_logs() -> None:
    """The library logs through the `cyclej` logger (stage start and resume, warnings) and knows nothing
    of Prefect: give that logger Prefect's API handler, as PREFECT_LOGGING_EXTRA_LOGGERS would, so its
    lines appear in the run's log in the UI. Only records made inside a flow or task run are sent (outside
    a run the handler would warn about a missing run id)."""
    project = logging.getLogger("cyclej")
    if project.level == logging.NOTSET:
        project.setLevel(logging.INFO)
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in project.handlers:
            handler.addFilter(
                lambda _record: FlowRunContext.get() is not None or TaskRunContext.get() is not None
            )
            project.addHandler(handler)


forward_project_logs()


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
    """The cache key *is* the stage fingerprint (from the plan). A Prefect record whose artifact has
    vanished from the store is deleted here, so Prefect misses and the stage runs again instead of
    returning a dead ref."""
    stage: PlannedStage = params["stage"]
    key = f"{stage.name}-{stage.fingerprint}"
    store = store_for(params["cfg"])
    if not store.exists(stage.name, stage.fingerprint):
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


LOG_EVERY_FRACTION = 10  # progress lines in the run log: every tenth of a loop …
LOG_EVERY_SECONDS = 60.0  # … or every minute, whichever comes first


def _progress_listener() -> Any:
    """Mirror the stage's progress bar into a Prefect progress artifact (throttled by `Progress`) and
    into the run log every tenth of the loop or minute, with the bar's metrics (loss, reward, …)."""
    artifact_ids: dict[str, Any] = {}
    logged: dict[str, tuple[int, float]] = {}  # bar -> (tenths logged, when)
    logger = logging.getLogger("cyclej.runtime.progress")

    def listener(stage: str, desc: str, done: int, total: int, metrics: dict[str, Any]) -> None:
        pct = 100.0 * done / max(total, 1)
        key = f"{stage}:{desc}"
        tenths = done * LOG_EVERY_FRACTION // max(total, 1)
        last_tenths, last_time = logged.get(key, (-1, 0.0))
        if tenths > last_tenths or time.monotonic() - last_time >= LOG_EVERY_SECONDS:
            logged[key] = (tenths, time.monotonic())
            shown = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            )
            logger.info("%s: %s %d/%d %s", stage, desc, done, total, shown)
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
# Sample tables show these columns first, in this order (the UI keeps the first row's key order).
LEADING_COLUMNS = ("direction", "domain", "source", "text", "translation", "paraphrase", "back_translation")


def _sample_rows(store: ArtifactStore, ref: ArtifactRef, rel: str) -> list[dict[str, Any]]:
    try:
        raw = store.read_file(ref, rel).decode("utf-8")
    except FileNotFoundError:
        return []
    rows = (
        json.loads(raw) if rel.endswith(".json") else [json.loads(x) for x in raw.splitlines() if x.strip()]
    )
    rows = [r for r in rows if isinstance(r, dict)][-MAX_TABLE_ROWS:]
    ordered = [{k: r[k] for k in LEADING_COLUMNS if k in r} | r for r in rows]
    # table cells must be scalars
    return [
        {
            k: (v if isinstance(v, int | float | str | bool) or v is None else json.dumps(v))
            for k, v in r.items()
        }
        for r in ordered
    ]


def browser_links(store: ArtifactStore, ref: ArtifactRef) -> dict[str, str]:
    """HTTP(S) links a browser can open for an `s3://` artifact (none for a local one): its manifest
    (file list, sizes, checksums) as a presigned URL, and the folder's listing on the S3 endpoint (or in
    the AWS console when there is no custom endpoint)."""
    if store.is_local:
        return {}
    bucket, _, key = ref.uri.removeprefix(f"{store.protocol}://").partition("/")
    links: dict[str, str] = {}
    try:
        links["manifest"] = store.fs.sign(f"{bucket}/{key}/MANIFEST.json", expiration=PRESIGNED_LINK_SECONDS)
    except Exception:  # noqa: BLE001 - a store that cannot presign still gets the listing link
        pass
    endpoint = (getattr(store.fs, "client_kwargs", None) or {}).get("endpoint_url") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    prefix = urllib.parse.quote(f"{key}/")
    if endpoint:
        links["listing"] = f"{endpoint.rstrip('/')}/{bucket}?list-type=2&prefix={prefix}"
    else:
        links["listing"] = f"https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={prefix}"
    return links


def post_training_signal(ref: ArtifactRef, store: ArtifactStore, key: str) -> None:
    """A training stage's per-step signal (update size, loss, rewards, KL, style share) as a table, and
    its plot, both written by the library (cyclej.training.diagnostics)."""
    try:
        log_text = store.read_file(ref, "metrics.jsonl").decode("utf-8")
    except FileNotFoundError:
        return
    records = [json.loads(x) for x in log_text.splitlines() if x.strip().startswith("{")]
    if rows := signal_table(records):
        create_table_artifact(
            key=f"{key}-training-signal",
            table=rows,
            description=f"{ref.stage}: per-step update size ‖Δθ‖/‖θ‖, loss, rewards, KL, style share",
        )
    try:
        png = store.read_file(ref, TRAINING_PLOT)
    except FileNotFoundError:
        return
    create_markdown_artifact(
        key=f"{key}-training-plot",
        markdown=plot_markdown(png, f"{ref.stage}: training signal"),
        description=f"{ref.stage}: training signal plot",
    )


def post_artifacts(ref: ArtifactRef, store: ArtifactStore, cached: bool = False) -> None:
    """The stage's UI artifacts: a link to it, its metrics and tables. Posted again by a run that got the
    stage from the cache (`cached`), so every run page shows what its stages made."""
    key = ref.stage.replace("_", "-")
    links = browser_links(store, ref)
    origin = " (from the cache)" if cached else ""
    create_link_artifact(
        key=f"{key}-uri",
        link=links.get("manifest", ref.uri),
        link_text=f"{ref.stage}/{ref.fingerprint}",
        description=f"Artifact of stage `{ref.stage}`{origin}: `{ref.uri}`",
    )
    where = f"`{ref.uri}`" + "".join(f" · [{name}]({url})" for name, url in links.items())
    scalars = {k: v for k, v in ref.metrics.items() if isinstance(v, int | float | str | bool)}
    lines = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()
    )
    metrics_md = f"| metric | value |\n|---|---|\n{lines}\n" if scalars else ""
    create_markdown_artifact(
        key=f"{key}-metrics",
        markdown=f"### {ref.stage}{origin}\n\n{where}\n\n{metrics_md}",
        description=f"Metrics of stage `{ref.stage}`",
    )
    for name, table in ref.metrics.items():
        if isinstance(table, list) and table and all(isinstance(r, dict) for r in table):
            create_table_artifact(
                key=f"{key}-{name.replace('_', '-')}", table=table, description=f"{ref.stage}: {name}"
            )
    post_training_signal(ref, store, key)
    for rel in SAMPLE_FILES:
        rows = _sample_rows(store, ref, rel)
        if rows:
            create_table_artifact(
                key=f"{key}-{rel.split('.')[0]}",
                table=rows,
                description=f"{ref.stage}: {rel} (last {len(rows)} rows)",
            )


def post_resume_point(stage: PlannedStage, cfg: PipelineConfig, error: BaseException) -> None:
    """Say in the UI where a retry will resume (the newest complete checkpoint) and why the stage failed.
    Called from the task body (a hook gets no parameters: Prefect's TaskRun has none)."""
    name = stage.name
    try:
        ckpts = StageCheckpoints(store_for(cfg), name, stage.fingerprint).names()
    except Exception as exc:  # noqa: BLE001 - an unreachable store is reported by the failure itself
        get_run_logger().warning("resume point of %s unknown: %s", name, exc)
        return
    point = ckpts[-1] if ckpts else "the beginning (no checkpoint yet)"
    reason = first_line(error, 10_000)
    create_markdown_artifact(
        key=f"{name.replace('_', '-')}-resume-point",
        markdown=(
            f"### `{name}` failed\n\n{type(error).__name__}: {reason}\n\nRetry resumes from **{point}**."
            f"\n\nCheckpoints: {', '.join(ckpts) or 'none'}"
        ),
        description=f"Where a retry of `{name}` resumes",
    )


@task(name="stage", persist_result=True, result_serializer="json")
def stage_task(stage: PlannedStage, cfg: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run (or resume) one planned stage; return its ArtifactRef as a plain JSON dict."""
    logger = get_run_logger()
    store = store_for(cfg)
    progress = Progress(listeners=[_progress_listener()])
    logger.info("stage %s: start (%s)", stage.name, store.uri(stage.name, stage.fingerprint))
    try:
        ref = run_stage(stage, cfg, refs_from(inputs), store, progress)
    except Exception as exc:
        post_resume_point(stage, cfg, exc)
        raise
    logger.info("stage %s → %s", stage.name, ref.uri)
    post_artifacts(ref, store)
    return json.loads(ref.to_json())


def retry_unless_bad_input(_task: Any, _task_run: Any, state: Any) -> bool:
    """retry_condition_fn: bad input (a config value the model cannot take, a corpus the stage refuses)
    fails the same way every time, so it is not retried (a retry reloaded the model only to refuse
    again); a store error is, since a store that blinked may be back."""
    try:
        state.result()
    except StorageError:
        return True
    except BadInput:
        return False
    except BaseException:  # noqa: BLE001 - anything else: Prefect's retries as configured
        return True
    return True


def configured_stage_task(stage: PlannedStage, cfg: PipelineConfig) -> Any:
    """`stage_task` with this config's cache policy, result storage, retries and the plan's run name."""
    orch = cfg.orchestration
    return stage_task.with_options(
        name=stage.name,
        task_run_name=stage.run_name,
        cache_policy=cache_policy_for(cfg),
        result_storage=result_storage_for(cfg),
        retries=orch.retries,
        retry_delay_seconds=orch.retry_delay_seconds,
        retry_condition_fn=retry_unless_bad_input,
        # No tags: a tagged task asks the server for tag concurrency slots on every run (~1.5 s each,
        # measured), which made a fully cached pipeline take 13 s instead of ~1 s.
    )


@task(name="shard", task_run_name="{stage.name}-shard-{shard}")
def shard_task(
    stage: PlannedStage, cfg: PipelineConfig, inputs: dict[str, dict[str, Any]], shard: int
) -> int:
    """One shard of a sharded stage (paraphrase); mapped so several workers can share the stage."""
    run_shard(stage, cfg, refs_from(inputs), store_for(cfg), shard, Progress())
    return shard


__all__ = [
    "configured_stage_task",
    "shard_task",
    "result_storage_for",
    "stage_task",
    "store_for",
]
