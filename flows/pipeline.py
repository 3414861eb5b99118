"""`cyclej_pipeline`: the whole DAG as one Prefect flow.

    data → {context, paraphrase} → {para_train, domain_train} → merge → rl → eval

Stages of one level may run at once (`orchestration.max_concurrent_stages`, or `dispatch` to run each
stage as its own deployment run on its own worker: the deployment runs of one level are submitted
together and run concurrently). Every stage task is cached by its fingerprint, so a
retry or a new run of the same config shows finished stages as `Cached` and resumes the broken one from
its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger

from cyclej.config import PipelineConfig
from cyclej.errors import CyclejError, StageFailed, StorageError
from cyclej.stages import SPECS, stage_fingerprint
from tasks.stages import (
    configured_stage_task,
    paraphrase_shard_task,
    post_artifacts,
    refs_from,
    stage_run_name,
    store_for,
)

LEVELS: tuple[tuple[str, ...], ...] = (
    ("data",),
    ("context", "paraphrase"),
    ("para_train", "domain_train"),
    ("merge",),
    ("rl",),
    ("eval",),
)


def _inputs(name: str, refs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: refs[k] for k in SPECS[name].inputs}


def _resume_point(cfg: PipelineConfig, name: str, inputs: dict[str, dict[str, Any]]) -> str | None:
    try:
        fp = stage_fingerprint(name, cfg, {k: v["fingerprint"] for k, v in inputs.items()})
        ckpts = store_for(cfg).list_checkpoints(name, fp)
    except Exception:  # noqa: BLE001 - best effort; the stage's own error is what the user needs
        return None
    return ckpts[-1] if ckpts else "the start of the stage"


def _submit(name: str, cfg: PipelineConfig, refs: dict[str, dict[str, Any]]) -> Any:
    inputs = _inputs(name, refs)
    if cfg.orchestration.dispatch:
        return dispatch_task.with_options(task_run_name=f"dispatch-{stage_run_name(name, cfg, inputs)}").submit(
            name, cfg, inputs)
    if name == "paraphrase":
        _paraphrase_shards(cfg, inputs)
    return configured_stage_task(name, cfg, inputs).submit(name, cfg, inputs)


def _paraphrase_shards(cfg: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> None:
    """Shards are mapped tasks so several workers can share the stage; each shard skips itself when
    already in the store. Skipped entirely when the stage's artifact is complete."""
    from cyclej.stages.paraphrase import plan_shards

    store = store_for(cfg)
    fp = stage_fingerprint("paraphrase", cfg, {k: v["fingerprint"] for k, v in inputs.items()})
    if store.exists("paraphrase", fp):
        return
    n = plan_shards(cfg, refs_from(inputs), store)
    if cfg.orchestration.max_concurrent_stages > 1:
        paraphrase_shard_task.map(cfg, inputs, list(range(n))).result()
    else:
        for i in range(n):
            paraphrase_shard_task(cfg, inputs, i)


@task(name="dispatch", retries=0)
def dispatch_task(name: str, cfg: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run the stage as its own deployment run; the store, not the flow result, says what it made.
    A task, so that the stages of one level are submitted together and their deployment runs (each on
    its own worker) run at once; `run_deployment` itself waits for its run."""
    deployment = f"{cfg.orchestration.deployment_prefix}{name}/{name}"
    kind = "s3" if cfg.storage.root.startswith("s3://") else "local"
    run = run_deployment(
        deployment, parameters={"config": json.loads(cfg.model_dump_json()), "inputs": inputs}, timeout=None,
        flow_run_name=stage_run_name(name, cfg, inputs),
        tags=["cyclej", f"stage:{name}", f"preset:{cfg.name}", f"storage:{kind}"],
    )
    if not run.state or not run.state.is_completed():
        raise StageFailed(name, f"deployment run {run.name} ended {run.state.name if run.state else 'unknown'}",
                          _resume_point(cfg, name, inputs))
    fp = stage_fingerprint(name, cfg, {k: v["fingerprint"] for k, v in inputs.items()})
    ref = store_for(cfg).ref(name, fp)
    if ref is None:
        raise StageFailed(name, f"deployment run {run.name} completed but left no committed artifact")
    return json.loads(ref.to_json())


def _result(name: str, cfg: PipelineConfig, refs: dict[str, dict[str, Any]], future: Any) -> dict[str, Any]:
    if isinstance(future, dict):
        return future
    try:
        ref: dict[str, Any] = future.result()
        if future.state.name == "Cached":  # the cached task posted nothing: show the stage's artifacts here
            from cyclej.store import ArtifactRef

            post_artifacts(ArtifactRef(**ref), store_for(cfg), cached=True)
        return ref
    except CyclejError as exc:
        if isinstance(exc, StageFailed):
            raise
        if exc.exit_code == 2 and not isinstance(exc, StorageError):
            raise  # bad input: the message already names the file or field
        # A store that fails mid-run (endpoint gone, disk turned read-only) is a stage failure, exit 1:
        # the inputs were checked before the run; the stage resumes once the store is back.
        resume = _resume_point(cfg, name, _inputs(name, refs))
        if resume is None and isinstance(exc, StorageError):
            resume = "its newest complete checkpoint in the store, once the store is reachable"
        raise StageFailed(name, str(exc), resume) from exc
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise StageFailed(name, reason, _resume_point(cfg, name, _inputs(name, refs))) from exc


@contextlib.contextmanager
def run_labelled() -> Iterator[None]:
    """Name the running Prefect flow run in the store's leases, checkpoints and manifests (`cyclej.store`
    knows nothing of Prefect), so two runs of one config log "waiting for run <name> (host, pid) computing
    stage S" and "reused S from run <name>" with the names the UI shows. Reset afterwards: a process that
    runs several flows (a test session, `cyclej serve`) must not lend one run's name to the next."""
    from prefect.runtime import flow_run

    from cyclej.store import set_run_label

    set_run_label(flow_run.name or None)
    try:
        yield
    finally:
        set_run_label(None)


def _post_report(cfg: PipelineConfig, eval_ref: dict[str, Any]) -> None:
    from cyclej.store import ArtifactRef

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
        for level in LEVELS:
            names = [n for n in level if until is None or list(SPECS).index(n) <= list(SPECS).index(until)]
            if config.orchestration.max_concurrent_stages > 1 or config.orchestration.dispatch:
                futures = {n: _submit(n, config, refs) for n in names}
                for n, fut in futures.items():
                    refs[n] = _result(n, config, refs, fut)
            else:
                for n in names:
                    refs[n] = _result(n, config, refs, _submit(n, config, refs))
        if "eval" in refs:
            _post_report(config, refs["eval"])
    return refs
