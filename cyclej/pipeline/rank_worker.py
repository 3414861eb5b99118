"""One rank of a stage on N GPUs: what `python -m torch.distributed.run … -m cyclej.pipeline.rank_worker SPEC`
runs in each process that cyclej.runtime.distributed.launch_stage starts. It rebuilds the config, the inputs
and the store from the spec file, joins the process group and calls the stage function, as `run_stage` would
in a single process (whose lease covers this run). A sharded stage (paraphrase) joins no group: each rank is a
worker generating its share of the shards on its own GPU, and the launching process assembles them."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cyclej.errors import BadInput
from cyclej.runtime.distributed import (
    DATA_PARALLEL_STAGES,
    barrier,
    init_process_group,
    is_distributed,
    is_main,
    pin_worker_gpu,
)
from cyclej.runtime.progress import Progress

if TYPE_CHECKING:
    from cyclej.config import PipelineConfig
    from cyclej.pipeline.registry import PlannedStage
    from cyclej.runtime.store import ArtifactRef, ArtifactStore


def run_rank(spec_path: Path, progress: Progress | None = None) -> None:
    """One rank of a launched stage: rebuild config, inputs and store from the spec, join the group,
    run the stage function. Rank 0's progress bars and lines are the stage's; the others' are silent."""
    from cyclej.config import PipelineConfig
    from cyclej.pipeline.registry import GPU_STAGES, StageRun, plan_stage, stage_function
    from cyclej.runtime.store import ArtifactRef, ArtifactStore

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    cfg = PipelineConfig.model_validate(spec["config"])
    inputs = {k: ArtifactRef(**v) for k, v in spec["inputs"].items()}
    store = ArtifactStore(spec["store"]["root"], spec["store"]["storage_options"], spec["store"]["cache_dir"])
    name = spec["stage"]
    stage = plan_stage(name, cfg, {k: v.fingerprint for k, v in inputs.items()})
    main = int(os.environ.get("RANK", "0")) == 0
    progress = (progress or Progress(show_bar=main)).for_stage(name)
    if name in DATA_PARALLEL_STAGES:
        run_shards_of_worker(stage, cfg, inputs, store, progress)
        return
    if name in GPU_STAGES:
        from cyclej.runtime.device import resolve_device

        device = resolve_device(cfg.device, name)  # refuses a CPU-only host where a GPU was asked for
    else:
        import torch

        device = torch.device("cpu")
    init_process_group(device)
    # Inputs and a resume checkpoint are downloaded once, into the cache the ranks share: rank 0 first.
    if is_main():
        for k in inputs:
            store.fetch(inputs[k])
    barrier()
    run = StageRun(cfg, stage, inputs, store, progress)
    try:
        # Ranks 1…N-1 return once their share (the training) is done; rank 0 goes on alone to write and
        # commit the artifact, which may take longer than any collective's timeout, so nobody waits for it.
        stage_function(name)(run)
    finally:
        import torch.distributed as dist

        if is_distributed():
            dist.destroy_process_group()


def run_shards_of_worker(
    stage: PlannedStage,
    cfg: PipelineConfig,
    inputs: dict[str, ArtifactRef],
    store: ArtifactStore,
    progress: Progress,
) -> None:
    """Worker r of N of a sharded stage: shards r, r+N, … on its own GPU, each saved as the stage's
    checkpoint (a shard already saved, or leased by another run, is skipped or waited for)."""
    from cyclej.pipeline.registry import run_shard, shard_count

    pin_worker_gpu()
    worker, workers = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    for index in range(worker, shard_count(stage, cfg, inputs, store), workers):
        run_shard(stage, cfg, inputs, store, index, progress)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            "usage: python -m torch.distributed.run … -m cyclej.pipeline.rank_worker STAGE_SPEC.json",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("cyclej").setLevel(logging.WARNING)  # one rank speaks for the stage
    try:
        run_rank(Path(args[0]))
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
