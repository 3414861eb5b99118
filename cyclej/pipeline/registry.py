"""The stage registry: names, inputs, schema versions and the config each stage's fingerprint hashes.

Every stage is one function of the same shape, in its own file in this package::

    run_<stage>(run: StageRun) -> ArtifactRef

`StageRun` is the stage contract: the whole config (a stage needs the domains and the models besides its
own section), the stage's plan (name, fingerprint, inputs), its input artifacts, the store, the progress
bars, and the helpers every stage uses (work directory, device, input folders and data lines,
checkpoints, and `commit`, the ending they all share: metrics.json, commit, drop the checkpoints). A
stage file reads like a recipe: set up, loop, `run.commit(...)`.

Its fingerprint hashes only the slice declared here, so changing one stage's section re-runs that
stage and the ones after it, nothing before. `run_stage` is the one entry point: it returns the
committed artifact when there is one and calls the stage otherwise (which resumes from its checkpoints).

`plan_pipeline(cfg, until)` decides a run before anything runs: for every stage its fingerprint, the
stages it reads, its level in the DAG (derived from `SPECS.inputs`: the stages of one level may run at
once) and its run name. The Prefect layer takes its cache keys, run names, levels and resume points from
this plan, and `cyclej status` prints it; nothing else computes a fingerprint for the whole pipeline.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cyclej.config import STAGES, DomainKey, PipelineConfig
from cyclej.corpora.lines import Split, read_lines
from cyclej.errors import StageFailed
from cyclej.generation import engines
from cyclej.runtime.distributed import gpus_for, is_distributed, launch_stage
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore, StageCheckpoints, fingerprint

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: int  # bump when the stage's output format or algorithm changes
    inputs: tuple[str, ...]
    config_slice: Callable[[PipelineConfig], Any]
    entry: str  # "module:function", imported lazily so `cyclej validate` stays light
    # A stage computed in shards that several workers may share (paraphrase): "module:function" of
    # count(cfg, inputs, store) -> int and of run(cfg, inputs, store, index, progress), both lazy too.
    shards: tuple[str, str] | None = None


def _dump(model: Any, exclude: set[str] | None = None) -> Any:
    return model.model_dump(mode="json", exclude=exclude)


# RL options added after runs existed, with their "off" values: left out of the fingerprint while off,
# since then the stage computes exactly what it did before they existed and those runs' artifacts stay valid.
_OFF_BY_DEFAULT_RL: dict[str, object] = {
    "discriminator_warmup_steps": 0,
    "reward_combination": "sum",
    "discriminator_reward": "real_target",
    "content_floor": 0.0,
    "prompt_mix": "even",
    "rewards.self_bleu": 0.0,  # a dotted name: a field of a nested section
}


def _rl_slice(c: PipelineConfig) -> dict[str, Any]:
    rl = _dump(c.rl, exclude={"backend"} | _MEMORY_ONLY)
    for dotted, off in _OFF_BY_DEFAULT_RL.items():
        *parents, key = dotted.split(".")
        section = rl
        for name in parents:
            section = section[name]
        if section[key] == off:
            del section[key]
    return {**rl, **_RL_CHECKPOINTING_AS_FINGERPRINTED}


# Options that change memory (and speed), never what a stage computes: left out of every fingerprint.
_MEMORY_ONLY = {"gradient_checkpointing"}


def _para_train_slice(c: PipelineConfig) -> dict[str, Any]:
    """para_train's config; `back_translation` (added after runs existed) only when on, with the embedder
    that filters its pairs, so the runs without it keep their fingerprints."""
    out: dict[str, Any] = {"para_train": _dump(c.para_train, exclude=_MEMORY_ONLY | {"back_translation"})}
    if c.para_train.back_translation is not None:
        out["para_train"]["back_translation"] = _dump(c.para_train.back_translation)
        out["embedder"] = c.models.embedder
    return out


# How often RL checkpoints and how many it keeps change nothing it computes (a resume is bit-identical).
# They were in the RL slice when runs existed, all presets at these defaults: the slice records these
# values whatever is set, so those fingerprints stay and a new interval re-runs nothing.
# (`checkpoint_every_steps` stays in as set: the presets fingerprinted it with different values.)
_RL_CHECKPOINTING_AS_FINGERPRINTED: dict[str, object] = {
    "checkpoint_every_minutes": 10.0,
    "keep_checkpoints": 2,
}


def _domains(cfg: PipelineConfig) -> dict[str, Any]:
    """Domains by content, not path: the same corpus in another folder is the same input."""
    out = {}
    for key in ("domain_a", "domain_b"):
        d = getattr(cfg, key)
        out[key] = {
            **_dump(d, exclude={"train", "dev"}),
            "train": [corpus_digest(p) for p in d.train],
            "dev": [corpus_digest(p) for p in d.dev],
        }
    return out


SPECS: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec(
            "data",
            1,
            (),
            lambda c: {"domains": _domains(c), "data": _dump(c.data), "base": c.models.base},
            "cyclej.stages.data:run_data",
        ),
        StageSpec(
            "context",
            1,
            ("data",),
            lambda c: {
                "base": c.models.base,
                "markers": list(c.markers),
                "context": _dump(c.context, exclude=_MEMORY_ONLY),
            },
            "cyclej.stages.context:run_context",
        ),
        StageSpec(
            "paraphrase",
            2,  # 2: the commentary filter
            ("data",),
            lambda c: {
                "paraphraser": c.models.paraphraser,
                "embedder": c.models.embedder if c.paraphrase.use_embedder else None,
                # the backend changes speed, not the output we ask for
                "paraphrase": _dump(c.paraphrase, exclude={"backend", "vllm", "batch_size"}),
            },
            "cyclej.stages.paraphrase:run_paraphrase",
            shards=("cyclej.stages.paraphrase:plan_shards", "cyclej.stages.paraphrase:run_paraphrase_shard"),
        ),
        StageSpec(
            "para_train",
            1,
            ("context", "paraphrase", "data"),
            _para_train_slice,
            "cyclej.stages.para_train:run_para_train",
        ),
        StageSpec(
            "domain_train",
            1,
            ("context", "data"),
            lambda c: {"domain_train": _dump(c.domain_train, exclude=_MEMORY_ONLY)},
            "cyclej.stages.domain_train:run_domain_train",
        ),
        StageSpec(
            "merge",
            1,
            ("context", "para_train", "domain_train", "data"),
            lambda c: {"merge": _dump(c.merge)},
            "cyclej.stages.merge:run_merge",
        ),
        StageSpec(
            "rl",
            1,
            ("merge", "data"),
            lambda c: {
                "rl": _rl_slice(c),
                "embedder": c.models.embedder,
                "discriminator": c.models.discriminator,
            },
            "cyclej.stages.rl:run_rl",
        ),
        StageSpec(
            "eval",
            2,
            ("data", "context", "para_train", "merge", "rl"),  # 2: the template-baseline row
            lambda c: {
                "eval": _dump(c.eval, exclude={"backend", "batch_size"}),
                "base": c.models.base,
                "embedder": c.models.embedder,
            },
            "cyclej.stages.eval:run_eval",
        ),
    ]
}
assert tuple(SPECS) == STAGES
# The stages that compute on a GPU when there is one: with `device: cuda` they refuse to start without one
# (`StageRun.device`) before anything else, including those that pick their device inside library code
# (paraphrase and eval engines). data and merge are CPU work and run anywhere.
GPU_STAGES = frozenset({"context", "paraphrase", "para_train", "domain_train", "rl", "eval"})


def corpus_digest(path: str) -> str:
    """sha256 over a corpus file, or over every file of a folder (sorted by relative path)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        except OSError:
            h.update(b"<missing>")  # the data stage reports it properly
    return h.hexdigest()[:16]


def stage_fingerprint(name: str, cfg: PipelineConfig, input_fps: dict[str, str]) -> str:
    spec = SPECS[name]
    return fingerprint(name, spec.version, spec.config_slice(cfg), {k: input_fps[k] for k in spec.inputs})


def _level(name: str) -> int:
    """0 for a stage without inputs, else one more than its deepest input: every input of a stage is on
    a lower level, so the stages of one level can run at once."""
    inputs = SPECS[name].inputs
    return 1 + max(_level(k) for k in inputs) if inputs else 0


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a run, as decided before anything runs."""

    name: str
    fingerprint: str
    inputs: dict[str, str]  # the stages it reads -> their fingerprints
    level: int

    @property
    def run_name(self) -> str:
        """`<stage>-<short fingerprint>`: its Prefect run's name, and its artifact's folder `<stage>/<fp>`."""
        return f"{self.name}-{self.fingerprint[:8]}"

    @property
    def sharded(self) -> bool:
        return SPECS[self.name].shards is not None

    def resume_point(self, store: ArtifactStore) -> str | None:
        """The newest complete checkpoint a (re)run of this stage resumes from, None for the beginning."""
        checkpoints = StageCheckpoints(store, self.name, self.fingerprint).names()
        return checkpoints[-1] if checkpoints else None


def plan_stage(name: str, cfg: PipelineConfig, input_fps: dict[str, str]) -> PlannedStage:
    """One stage's plan from its inputs' fingerprints (a stage dispatched on its own has only those)."""
    inputs = {k: input_fps[k] for k in SPECS[name].inputs}
    return PlannedStage(name, stage_fingerprint(name, cfg, inputs), inputs, _level(name))


def plan_pipeline(cfg: PipelineConfig, until: str | None = None) -> dict[str, PlannedStage]:
    """Every stage up to and including `until` (all by default), in DAG order, each planned from the
    fingerprints of the stages before it."""
    plan: dict[str, PlannedStage] = {}
    for name in STAGES:
        plan[name] = plan_stage(name, cfg, {k: plan[k].fingerprint for k in SPECS[name].inputs})
        if name == until:
            break
    return plan


def levels(plan: dict[str, PlannedStage]) -> list[list[PlannedStage]]:
    """The plan's stages grouped by level, lowest first."""
    by_level: dict[int, list[PlannedStage]] = {}
    for stage in plan.values():
        by_level.setdefault(stage.level, []).append(stage)
    return [by_level[level] for level in sorted(by_level)]


def fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """Every stage's fingerprint, in DAG order (each from its inputs' fingerprints)."""
    return {name: stage.fingerprint for name, stage in plan_pipeline(cfg).items()}


@dataclass
class StageRun:
    """One run of one stage: everything `run_<stage>(run)` is handed, and the ending all stages share."""

    cfg: PipelineConfig
    stage: PlannedStage
    inputs: dict[str, ArtifactRef]  # the committed artifacts of the stage's inputs, by stage name
    store: ArtifactStore
    progress: Progress

    @classmethod
    def start(
        cls,
        name: str,
        cfg: PipelineConfig,
        inputs: dict[str, ArtifactRef],
        store: ArtifactStore,
        progress: Progress | None = None,
    ) -> StageRun:
        """A run of stage `name` planned from its inputs (for calling a stage directly, as tests do)."""
        stage = plan_stage(name, cfg, {k: v.fingerprint for k, v in inputs.items()})
        return cls(
            cfg,
            stage,
            {k: inputs[k] for k in stage.inputs},
            store,
            (progress or Progress(show_bar=False)).for_stage(name),
        )

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def fingerprint(self) -> str:
        return self.stage.fingerprint

    @functools.cached_property
    def workdir(self) -> Path:
        """The local directory the stage writes its artifact in (the artifact itself on a local store)."""
        return self.store.workdir(self.name, self.fingerprint)

    @functools.cached_property
    def device(self) -> torch.device:
        """The GPU when torch sees one (`device: auto`); with `device: cuda` or CYCLEJ_DEVICE=cuda (the GPU
        pods) no GPU is BadInput, before the stage computes anything, never a silent CPU run."""
        from cyclej.runtime.device import resolve_device
        from cyclej.runtime.distributed import rank_device

        return rank_device(resolve_device(self.cfg.device, self.name))

    @property
    def is_main(self) -> bool:
        """Whether this process writes the stage's checkpoints and artifact: always, but for ranks 1…N-1
        of a stage on N GPUs (cyclej.runtime.distributed), whose share ends with the training."""
        from cyclej.runtime.distributed import is_main

        return is_main()

    def input_dir(self, name: str) -> Path:
        """The local folder of input artifact `name` (downloaded once from a remote store)."""
        return self.store.fetch(self.inputs[name])

    def lines(self, domain: DomainKey, split: Split) -> list[str]:
        """The cleaned lines of one domain's split, from the `data` input."""
        return read_lines(self.store, self.inputs["data"], domain, split)

    # ---- checkpoints (names: cyclej.training.schedule.checkpoint_name) ----
    @property
    def checkpoints(self) -> StageCheckpoints:
        """This run's checkpoints: how the stage (and the trainer it hands them to) saves and resumes."""
        return StageCheckpoints(self.store, self.name, self.fingerprint)

    # ---- the ending ----
    def commit(
        self, summary: dict[str, Any], metrics: dict[str, Any] | None = None, drop_checkpoints: bool = False
    ) -> ArtifactRef:
        """Write `metrics` (the stage's whole record) as metrics.json into the work directory, commit the
        artifact with `summary` in its reference (what the UI shows), and with `drop_checkpoints` delete
        the checkpoints the committed artifact supersedes."""
        if metrics is not None:
            (self.workdir / "metrics.json").write_text(
                json.dumps(metrics, indent=1, sort_keys=True), encoding="utf-8"
            )
        ref = self.store.commit(self.name, self.fingerprint, self.workdir, metrics=summary)
        if drop_checkpoints:
            self.checkpoints.delete_all()
        return ref


def _load(entry: str) -> Callable[..., Any]:
    module, func = entry.split(":")
    return getattr(importlib.import_module(module), func)


def stage_function(name: str) -> Callable[..., ArtifactRef]:
    return _load(SPECS[name].entry)


def shard_count(
    stage: PlannedStage, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore
) -> int:
    """How many shards a sharded stage has (known once its inputs are committed)."""
    shards = SPECS[stage.name].shards
    assert shards is not None, f"stage {stage.name} has no shards"
    return int(_load(shards[0])(cfg, inputs, store))


def run_shard(
    stage: PlannedStage,
    cfg: PipelineConfig,
    inputs: dict[str, ArtifactRef],
    store: ArtifactStore,
    index: int,
    progress: Progress,
) -> None:
    """Compute one shard of a sharded stage (nothing to do when it is saved already)."""
    shards = SPECS[stage.name].shards
    assert shards is not None, f"stage {stage.name} has no shards"
    if stage.name in GPU_STAGES:
        from cyclej.runtime.device import resolve_device

        resolve_device(cfg.device, stage.name)  # refuse a CPU-only host before any engine starts
    _load(shards[1])(cfg, inputs, store, index, progress.for_stage(stage.name))


def run_stage(
    name: str | PlannedStage,
    cfg: PipelineConfig,
    inputs: dict[str, ArtifactRef],
    store: ArtifactStore,
    progress: Progress | None = None,
) -> ArtifactRef:
    """The committed artifact if there is one; otherwise run (or resume) the stage and commit it.
    `name`: the stage's name, or its plan (then its fingerprint is not computed again)."""
    stage = (
        name
        if isinstance(name, PlannedStage)
        else plan_stage(name, cfg, {k: v.fingerprint for k, v in inputs.items()})
    )
    got = {k: inputs[k].fingerprint for k in stage.inputs}
    assert got == stage.inputs, f"stage {stage.name} planned on inputs {stage.inputs}, given {got}"
    name, fp = stage.name, stage.fingerprint
    done = store.ref(name, fp)
    if done is not None:
        return done
    progress = (progress or Progress()).for_stage(name)
    # Two runs of the same config at once: the second waits here and reuses the first's artifact.
    with store.lease(name, fp) as mine:
        if not mine:
            ref = store.ref(name, fp)
            assert ref is not None
            return ref
        # No stage starts while another stage's generation engine holds the device
        # (cyclej.generation.engines).
        engines.release_all(starting=name)
        run = StageRun(cfg, stage, {k: inputs[k] for k in stage.inputs}, store, progress)
        if name in GPU_STAGES:
            run.device  # noqa: B018 - resolving it refuses a CPU-only host before the stage computes
        nproc = gpus_for(cfg, name)
        if nproc > 1 and not is_distributed():
            # N ranks under torchrun in a child process; this process keeps the lease
            # (cyclej.runtime.distributed).
            launch_stage(name, cfg, run.inputs, store, nproc, lambda: stage.resume_point(store))
            if stage.sharded:  # the workers saved every shard; this process assembles and commits them
                return stage_function(name)(run)
            launched = store.ref(name, fp)
            if launched is None:
                raise StageFailed(name, f"the {nproc}-rank run ended without committing its artifact")
            return launched
        ref = stage_function(name)(run)
        assert ref is not None, f"stage {name} returned no artifact"
    assert ref.fingerprint == fp, f"stage {name} wrote {ref.fingerprint}, expected {fp}"
    return ref


def run_all(
    cfg: PipelineConfig,
    store: ArtifactStore,
    progress: Progress | None = None,
    until: str | None = None,
) -> dict[str, ArtifactRef]:
    """The whole pipeline in-process, without Prefect (used by tests and benchmarks)."""
    refs: dict[str, ArtifactRef] = {}
    for name, stage in plan_pipeline(cfg, until).items():
        refs[name] = run_stage(stage, cfg, {k: refs[k] for k in stage.inputs}, store, progress)
    return refs
