"""Scale-out: the `domain_train` stage's training throughput on 1 rank and on N ranks, same machine.

Both runs are the real stage through `run_stage` (N ranks: `resources.gpus.domain_train: N`, which
launches torchrun; gloo on the CPU, NCCL on GPUs), the same LoRA, data, effective batch and steps. The
throughput is the trainer's own: tokens trained on per second of step time on rank 0 (the stage's
`metrics.json` `tokens_per_s`; N ranks count the tokens of all ranks). On a CPU the ranks share the
machine's cores (each gets cores/N threads), so the honest ratio there is below N; on a pod with N GPUs
it is the number that says whether the GPUs are used.

    .venv/bin/python bench/scale_out.py [--model small|tiny-llama|smollm2] [--ranks 2] [--steps 6]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import build_small_llama  # noqa: E402

from cyclej.config import PipelineConfig  # noqa: E402
from cyclej.models.loading import load_model, save_model  # noqa: E402
from cyclej.pipeline.registry import run_stage  # noqa: E402
from cyclej.runtime.progress import Progress  # noqa: E402
from cyclej.runtime.store import ArtifactRef, ArtifactStore  # noqa: E402

MARKERS = ["<|A|>", "<|B|>"]
YELP = Path(str(resources.files("cyclej") / "samples" / "yelp"))


def stage_inputs(store: ArtifactStore, base: str, lines: int) -> dict[str, ArtifactRef]:
    """`context` (the base with the markers) and `data` (the shipped Yelp sample) artifacts."""
    model, tok = load_model(base, markers=MARKERS)
    work = store.workdir("context", "bench00000000000")
    save_model(model, tok, work / "model")
    context = store.commit("context", "bench00000000000", work)
    work = store.workdir("data", "benchdata0000000")
    for key, name in (("a", "0"), ("b", "1")):
        (work / key).mkdir(exist_ok=True)
        for split in ("train", "dev"):
            text = (YELP / f"{split}.{name}").read_text(encoding="utf-8").splitlines()[:lines]
            (work / key / f"{split}.txt").write_text("".join(f"{t}\n" for t in text), encoding="utf-8")
    return {"context": context, "data": store.commit("data", "benchdata0000000", work)}


def config(
    root: Path, base: str, ranks: int, steps: int, device: str, precision: str | None = None
) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "device": device,
            "storage": {"root": str(root)},
            "domain_a": {"name": "negative", "marker": MARKERS[0], "train": [str(YELP / "train.0")]},
            "domain_b": {"name": "positive", "marker": MARKERS[1], "train": [str(YELP / "train.1")]},
            "models": {"base": base},
            "domain_train": {
                "batch_size": 32,
                "micro_batch_size": 8,
                "max_steps": steps,
                "seq_len": 128,
                "precision": precision or ("fp32" if device == "cpu" else "bf16"),
                "lr": 1e-4,
                "checkpoint_every_steps": 10_000,
                "eval_every_steps": 10_000,
                "eval_batches": 1,
            },
            "resources": {"gpus": {"domain_train": ranks}},
        }
    )


def measure(base: str, ranks: int, steps: int, device: str) -> dict[str, Any]:
    import torch

    # The same machine either way: one rank gets every core, N ranks get cores/N threads each (torchrun's
    # OMP_NUM_THREADS, cyclej.runtime.distributed.launch_stage).
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        store = ArtifactStore(str(root))
        refs = stage_inputs(store, base, lines=400)
        t0 = time.perf_counter()
        ref = run_stage(
            "domain_train", config(root, base, ranks, steps, device), refs, store, Progress(show_bar=False)
        )
        wall = time.perf_counter() - t0
        metrics = json.loads((store.fetch(ref) / "metrics.json").read_text())
    return {
        "ranks": ranks,
        "tokens_per_s": metrics["tokens_per_s"],
        "wall_s": wall,
        "world_size": metrics["world_size"],
        "loss": metrics["final_train_loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="small", help="small (4-layer d=256 Llama), tiny-llama, smollm2, or a path"
    )
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = str(build_small_llama(Path(tmp) / "small")) if args.model == "small" else args.model
        one = measure(base, 1, args.steps, args.device)
        many = measure(base, args.ranks, args.steps, args.device)
    cores = os.cpu_count()
    print(f"domain_train, {args.model}, {args.steps} steps of 32 rows, {args.device} ({cores} cores)")
    print("| ranks | tokens/s | wall s (launch included) | final loss |")
    print("|---|---|---|---|")
    for r in (one, many):
        print(f"| {r['ranks']} | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} | {r['loss']:.4f} |")
    print(
        f"ratio {args.ranks} ranks / 1 rank: {many['tokens_per_s'] / one['tokens_per_s']:.2f}× "
        f"(ideal {args.ranks}×; on a CPU the ranks share its {cores} cores)"
    )


if __name__ == "__main__":
    main()
