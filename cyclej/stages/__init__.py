"""The stage registry: names, inputs, schema versions and the config each stage's fingerprint hashes.

Every stage is one function of the same shape, in its own file in this package::

    run_<stage>(cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: ArtifactStore,
                progress: Progress) -> ArtifactRef

It is handed the whole config (a stage needs the domains and the models besides its own section), but
its fingerprint hashes only the slice declared here, so changing one stage's section re-runs that
stage and the ones after it, nothing before. `run_stage` is the one entry point: it returns the
committed artifact when there is one and calls the stage otherwise (which resumes from its checkpoints).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cyclej import engines
from cyclej.config import STAGES, PipelineConfig
from cyclej.progress import Progress
from cyclej.store import ArtifactRef, ArtifactStore, fingerprint


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: int  # bump when the stage's output format or algorithm changes
    inputs: tuple[str, ...]
    config_slice: Callable[[PipelineConfig], Any]
    entry: str  # "module:function", imported lazily so `cyclej validate` stays light


def _dump(model: Any, exclude: set[str] | None = None) -> Any:
    return model.model_dump(mode="json", exclude=exclude)


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


def _markers(cfg: PipelineConfig) -> list[str]:
    return [cfg.domain_a.marker, cfg.domain_b.marker]


SPECS: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec(
            "data", 1, (),
            lambda c: {"domains": _domains(c), "data": _dump(c.data), "base": c.models.base},
            "cyclej.stages.data:run_data",
        ),
        StageSpec(
            "context", 1, ("data",),
            lambda c: {"base": c.models.base, "markers": _markers(c), "context": _dump(c.context)},
            "cyclej.stages.context:run_context",
        ),
        StageSpec(
            "paraphrase", 1, ("data",),
            lambda c: {
                "paraphraser": c.models.paraphraser,
                "embedder": c.models.embedder if c.paraphrase.use_embedder else None,
                # the backend changes speed, not the output we ask for
                "paraphrase": _dump(c.paraphrase, exclude={"backend", "vllm", "batch_size"}),
            },
            "cyclej.stages.paraphrase:run_paraphrase",
        ),
        StageSpec(
            "para_train", 1, ("context", "paraphrase"),
            lambda c: {"para_train": _dump(c.para_train)},
            "cyclej.stages.para_train:run_para_train",
        ),
        StageSpec(
            "domain_train", 1, ("context", "data"),
            lambda c: {"domain_train": _dump(c.domain_train)},
            "cyclej.stages.domain_train:run_domain_train",
        ),
        StageSpec(
            "merge", 1, ("context", "para_train", "domain_train", "data"),
            lambda c: {"merge": _dump(c.merge)},
            "cyclej.stages.merge:run_merge",
        ),
        StageSpec(
            "rl", 1, ("merge", "data"),
            lambda c: {
                "rl": _dump(c.rl, exclude={"backend"}),
                "embedder": c.models.embedder,
                "discriminator": c.models.discriminator,
            },
            "cyclej.stages.rl:run_rl",
        ),
        StageSpec(
            "eval", 1, ("data", "context", "para_train", "merge", "rl"),
            lambda c: {"eval": _dump(c.eval, exclude={"backend", "batch_size"}), "base": c.models.base,
                       "embedder": c.models.embedder},
            "cyclej.stages.eval:run_eval",
        ),
    ]
}
assert tuple(SPECS) == STAGES


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


def fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """Every stage's fingerprint, in DAG order (each from its inputs' fingerprints)."""
    fps: dict[str, str] = {}
    for name in STAGES:
        fps[name] = stage_fingerprint(name, cfg, fps)
    return fps


def stage_function(name: str) -> Callable[..., ArtifactRef]:
    module, func = SPECS[name].entry.split(":")
    return getattr(importlib.import_module(module), func)


def run_stage(
    name: str,
    cfg: PipelineConfig,
    inputs: dict[str, ArtifactRef],
    store: ArtifactStore,
    progress: Progress | None = None,
) -> ArtifactRef:
    """The committed artifact if there is one; otherwise run (or resume) the stage and commit it."""
    fp = stage_fingerprint(name, cfg, {k: v.fingerprint for k, v in inputs.items()})
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
        # No stage starts while another stage's generation engine holds the device (cyclej.engines).
        engines.release_all(starting=name)
        ref = stage_function(name)(cfg, {k: inputs[k] for k in SPECS[name].inputs}, store, progress)
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
    for name in STAGES:
        refs[name] = run_stage(name, cfg, {k: refs[k] for k in SPECS[name].inputs}, store, progress)
        if name == until:
            break
    return refs
