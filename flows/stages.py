"""One flow per stage, so each stage can be deployed to its own work pool (paraphrasing on a vLLM GPU,
training on another) and dispatched by `cyclej_pipeline` with `orchestration.dispatch: true`.

Deployment names: flow `cyclej-<stage>`, deployment `<stage>` (see deployments/prefect.yaml).
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, flow

from cyclej.config import STAGES, PipelineConfig
from flows.pipeline import _inputs, _result, _submit, run_labelled


def _make_stage_flow(name: str) -> Flow[..., dict[str, Any]]:
    @flow(name=f"cyclej-{name}", log_prints=True)
    def stage_flow(config: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        local = config.model_copy(update={"orchestration": config.orchestration.model_copy(update={"dispatch": False})})
        refs = dict(inputs)
        with run_labelled():
            return _result(name, local, refs, _submit(name, local, _inputs(name, refs) | refs))

    stage_flow.__doc__ = f"Run (or resume) the `{name}` stage; inputs are the ArtifactRefs of {name}'s inputs."
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
