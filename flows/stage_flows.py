"""One flow per stage, so each stage can be deployed to its own work pool (paraphrasing on a vLLM GPU,
training on another) and dispatched by `cyclej_pipeline` with `orchestration.dispatch: true`.

Deployment names: flow `cyclej-<stage>`, deployment `<stage>` (see deployments/prefect.yaml).
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, flow

from cyclej.config import STAGES, PipelineConfig
from cyclej.pipeline.registry import plan_stage
from flows.pipeline_flow import run_labelled, stage_result, submit_stage


def _make_stage_flow(name: str) -> Flow[..., dict[str, Any]]:
    @flow(name=f"cyclej-{name}", log_prints=True)
    def stage_flow(config: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        local = config.model_copy(
            update={"orchestration": config.orchestration.model_copy(update={"dispatch": False})}
        )
        # Planned from the inputs it was handed (their fingerprints), not from the whole config: the
        # corpora the `data` fingerprint hashes need not be on this worker.
        stage = plan_stage(name, local, {k: v["fingerprint"] for k, v in inputs.items()})
        with run_labelled():
            return stage_result(stage, local, submit_stage(stage, local, inputs))

    stage_flow.__doc__ = (
        f"Run (or resume) the `{name}` stage; inputs are the ArtifactRefs of {name}'s inputs."
    )
    return stage_flow


data_flow = _make_stage_flow("data")
context_flow = _make_stage_flow("context")
paraphrase_flow = _make_stage_flow("paraphrase")
para_train_flow = _make_stage_flow("para_train")
domain_train_flow = _make_stage_flow("domain_train")
merge_flow = _make_stage_flow("merge")
rl_flow = _make_stage_flow("rl")
eval_flow = _make_stage_flow("eval")

STAGE_FLOWS = {name: globals()[f"{name}_flow"] for name in STAGES}
