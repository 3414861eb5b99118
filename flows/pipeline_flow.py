"""`cyclej_pipeline`: the whole DAG as one Prefect flow.

    data → {context, paraphrase} → {para_train, domain_train} → merge → rl → eval

The flow plans the run once (`cyclej.stages.plan_pipeline`: fingerprints, levels, run names, resume
points) and follows that plan. Stages of one level may run at once
(`orchestration.max_concurrent_stages`, or `dispatch` to run each stage as its own deployment run on its
own worker: the deployment runs of one level are submitted together and run concurrently). Every stage
task is cached by its fingerprint, so a retry or a new run of the same config shows finished stages as
`Cached` and resumes the broken one from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger

from cyclej.config import PipelineConfig
from cyclej.errors import CyclejError, StageFailed, StorageError, first_line
from cyclej.pipeline.registry import PlannedStage, levels, plan_pipeline, shard_count
from cyclej.runtime.distributed import gpus_for
from tasks.stage_tasks import configured_stage_task, post_artifacts, refs_from, shard_task, store_for


def _resume_point(stage: PlannedStage, cfg: PipelineConfig) -> str | None:
    """Where a retry resumes, for the failure message; None when the store cannot say."""
    try:
        return stage.resume_point(store_for(cfg)) or "the start of the stage"
    except Exception:  # noqa: BLE001 - best effort; the stage's own error is what the user needs
        return None


def submit_stage(stage: PlannedStage, cfg: PipelineConfig, refs: dict[str, dict[str, Any]]) -> Any:
    inputs = {k: refs[k] for k in stage.inputs}
    if cfg.orchestration.dispatch:
        return dispatch_task.with_options(task_run_name=f"dispatch-{stage.run_name}").submit(
            stage, cfg, inputs
        )
    if stage.sharded:
        _shards(stage, cfg, inputs)
    return configured_stage_task(stage, cfg).submit(stage, cfg, inputs)


def _shards(stage: PlannedStage, cfg: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> None:
    """Shards are mapped tasks so several workers can share the stage; each shard skips itself when
    already in the store. Skipped entirely when the stage's artifact is complete."""
    store = store_for(cfg)
    if store.exists(stage.name, stage.fingerprint) or gpus_for(cfg, stage.name) > 1:
        return  # done; or on N GPUs, where the stage task runs N workers over the shards itself
    n = shard_count(stage, cfg, refs_from(inputs), store)
    if cfg.orchestration.max_concurrent_stages > 1:
        shard_task.map(stage, cfg, inputs, list(range(n))).result()
    else:
        for i in range(n):
            shard_task(stage, cfg, inputs, i)


def deployment_name(cfg: PipelineConfig, stage: str) -> str:
    """`<prefix><stage>/<stage>`, or `…/<stage>-<n>gpu` when the config gives the stage n > 1 GPUs: the
    deployment whose pods have n GPUs (deployments/prefect.yaml), on which CYCLEJ_GPUS=n starts n ranks."""
    n = cfg.resources.gpus.get(stage, 1)
    return f"{cfg.orchestration.deployment_prefix}{stage}/{stage}" + (f"-{n}gpu" if n > 1 else "")


@task(name="dispatch", retries=0)
def dispatch_task(
    stage: PlannedStage, cfg: PipelineConfig, inputs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Run the stage as its own deployment run; the store, not the flow result, says what it made.
    A task, so that the stages of one level are submitted together and their deployment runs (each on
    its own worker) run at once; `run_deployment` itself waits for its run."""
    name = stage.name
    deployment = deployment_name(cfg, name)
    kind = "s3" if cfg.storage.root.startswith("s3://") else "local"
    # Called from sync code: prefect's async_dispatch gives the FlowRun itself, not a coroutine.
    run: FlowRun = run_deployment(  # type: ignore[assignment]
        deployment,
        parameters={"config": json.loads(cfg.model_dump_json()), "inputs": inputs},
        timeout=None,
        flow_run_name=stage.run_name,
        tags=["cyclej", f"stage:{name}", f"preset:{cfg.name}", f"storage:{kind}"],
    )
    if not run.state or not run.state.is_completed():
        raise StageFailed(
            name,
            f"deployment run {run.name} ended {run.state.name if run.state else 'unknown'}",
            _resume_point(stage, cfg),
        )
    ref = store_for(cfg).ref(name, stage.fingerprint)
    if ref is None:
        raise StageFailed(name, f"deployment run {run.name} completed but left no committed artifact")
    return json.loads(ref.to_json())


def stage_result(stage: PlannedStage, cfg: PipelineConfig, future: Any) -> dict[str, Any]:
    name = stage.name
    try:
        ref: dict[str, Any] = future.result()
        if future.state.name == "Cached":  # the cached task posted nothing: show the stage's artifacts here
            from cyclej.runtime.store import ArtifactRef

            post_artifacts(ArtifactRef(**ref), store_for(cfg), cached=True)
        return ref
    except CyclejError as exc:
        if isinstance(exc, StageFailed):
            raise
        if exc.exit_code == 2 and not isinstance(exc, StorageError):
            raise  # bad input: the message already names the file or field
        # A store that fails mid-run (endpoint gone, disk turned read-only) is a stage failure, exit 1:
        # the inputs were checked before the run; the stage resumes once the store is back.
        resume = _resume_point(stage, cfg)
        if resume is None and isinstance(exc, StorageError):
            resume = "its newest complete checkpoint in the store, once the store is reachable"
        raise StageFailed(name, str(exc), resume) from exc
    except Exception as exc:
        reason = f"{type(exc).__name__}: {first_line(exc, 10_000)}"
        raise StageFailed(name, reason, _resume_point(stage, cfg)) from exc


@contextlib.contextmanager
def run_labelled() -> Iterator[None]:
    """Name the running Prefect flow run in the store's leases, checkpoints and manifests
    (`cyclej.runtime.store` knows nothing of Prefect), so two runs of one config log "waiting for run
    <name> (host, pid) computing stage S" and "reused S from run <name>" with the names the UI shows.
    Reset afterwards: a process that runs several flows (a test session, `cyclej serve`) must not lend
    one run's name to the next."""
    from prefect.runtime import flow_run

    from cyclej.runtime.store import set_run_label

    set_run_label(flow_run.name or None)
    try:
        yield
    finally:
        set_run_label(None)


def _post_report(cfg: PipelineConfig, eval_ref: dict[str, Any]) -> None:
    from cyclej.runtime.store import ArtifactRef

    try:
        text = store_for(cfg).read_text(ArtifactRef(**eval_ref), "report.md")
    except FileNotFoundError:
        return
    create_markdown_artifact(key="cyclej-report", markdown=text, description="CYCLE_J evaluation report")


@flow(name="cyclej-pipeline", log_prints=True, validate_parameters=True)
def cyclej_pipeline(config: PipelineConfig, until: str | None = None) -> dict[str, dict[str, Any]]:
    """Train CYCLE-J from two folders of unpaired text: every stage, cached by fingerprint.

    `until`: stop after this stage (e.g. "merge"); the stages after it are not run.
    """
    logger = get_run_logger()
    store = store_for(config)
    logger.info("storage: %s", store.root_uri)
    refs: dict[str, dict[str, Any]] = {}
    with run_labelled():
        for level in levels(plan_pipeline(config, until)):
            if config.orchestration.max_concurrent_stages > 1 or config.orchestration.dispatch:
                futures = [(stage, submit_stage(stage, config, refs)) for stage in level]
                for stage, fut in futures:
                    refs[stage.name] = stage_result(stage, config, fut)
            else:
                for stage in level:
                    refs[stage.name] = stage_result(stage, config, submit_stage(stage, config, refs))
        if "eval" in refs:
            _post_report(config, refs["eval"])
    return refs
