"""plan_pipeline: the run decided once, before anything runs (cyclej.pipeline.registry)."""

from __future__ import annotations

from pathlib import Path

from cyclej.config import STAGES, load_config
from cyclej.pipeline.registry import SPECS, fingerprints, levels, plan_pipeline, stage_fingerprint
from cyclej.runtime.store import ArtifactStore


def test_levels_follow_the_inputs_of_the_specs() -> None:
    plan = plan_pipeline(load_config(preset="tiny"))
    assert [[s.name for s in level] for level in levels(plan)] == [
        ["data"],
        ["context", "paraphrase"],
        ["para_train", "domain_train"],
        ["merge"],
        ["rl"],
        ["eval"],
    ]
    for stage in plan.values():
        assert all(plan[k].level < stage.level for k in stage.inputs)
        assert tuple(stage.inputs) == SPECS[stage.name].inputs


def test_plan_fingerprints_chain_the_inputs_and_stop_at_until() -> None:
    cfg = load_config(preset="tiny")
    plan = plan_pipeline(cfg)
    assert list(plan) == list(STAGES)
    for name, stage in plan.items():
        assert stage.fingerprint == stage_fingerprint(
            name, cfg, {k: plan[k].fingerprint for k in stage.inputs}
        )
        assert stage.inputs == {k: plan[k].fingerprint for k in SPECS[name].inputs}
        assert stage.run_name == f"{name}-{stage.fingerprint[:8]}"
    assert fingerprints(cfg) == {n: s.fingerprint for n, s in plan.items()}
    assert list(plan_pipeline(cfg, until="merge")) == list(STAGES[: STAGES.index("merge") + 1])


def test_tiny_fingerprints_are_unchanged_by_the_plan() -> None:
    """The same fingerprints as before the plan existed (62c75c4): a changed fingerprint re-runs stages
    for every user, so update these only on purpose."""
    plan = plan_pipeline(load_config(preset="tiny"))
    assert plan["data"].fingerprint == "c399249dbb0c7ce7"
    assert plan["context"].fingerprint == "19ace5d2d5abd9e5"


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    cfg = load_config(preset="tiny", storage=str(tmp_path))
    store = ArtifactStore.from_config(cfg.storage)
    stage = plan_pipeline(cfg)["context"]
    assert stage.resume_point(store) is None
    for name in ("step-00000002", "step-00000004"):
        d = store.checkpoint_workdir(stage.name, stage.fingerprint, name)
        (d / "state.json").write_text("{}")
        store.save_checkpoint(stage.name, stage.fingerprint, name, d, keep=3)
    assert stage.resume_point(store) == "step-00000004"
