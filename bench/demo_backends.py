"""The demo's wall time with vLLM vs without: `cyclej run --preset demo` from an empty store, once with the
generation backends on `auto` (vLLM where it repays its engine start: paraphrase, RL rollouts, eval) and
once forced to `transformers`, then prints both wall times, the ratio, when each stage finished, and the
evaluation table of both runs (the backends must not change what the demo makes beyond sampling noise).

    .venv/bin/python bench/demo_backends.py [--order auto,transformers] [--threads N]

Each run has its own fresh store; built models are shared through $CYCLEJ_CACHE, as on a user's machine
after the first run. About an hour on 2 CPU cores (two demos). Run it on a quiet machine: a second busy
process makes 2-thread matmuls several times slower and the ratio would measure the neighbour.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, cli_env, timed_cli  # noqa: E402

sys.path.insert(0, str(ROOT))  # run as a script: the project's packages come from the checkout
from cyclej.config import STAGES  # noqa: E402

GENERATING = ("paraphrase", "rl", "eval")  # the stages whose `backend` the comparison switches


def stage_finish_times(store: Path, started: float) -> dict[str, float]:
    """Seconds from the run's start to each stage's commit (the MANIFEST.json a stage writes last)."""
    finished = {}
    for stage in STAGES:
        manifests = list((store / stage).glob("*/MANIFEST.json"))
        if manifests:
            finished[stage] = max(m.stat().st_mtime for m in manifests) - started
    return finished


def eval_table(store: Path) -> str:
    reports = list((store / "eval").glob("*/report.md"))
    return reports[0].read_text(encoding="utf-8") if reports else "(no eval report)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--order", default="auto,transformers", help="backends in the order they run")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: unset)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the stores under this folder")
    args = ap.parse_args()

    extra = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    results: dict[str, tuple[float, dict[str, float], str]] = {}
    root = args.keep or Path(tempfile.mkdtemp(prefix="cyclej-demo-backends-"))
    for backend in args.order.split(","):
        store = root / f"store-{backend}"
        sets = [x for stage in GENERATING for x in ("--set", f"{stage}.backend={backend}")]
        started = time.time()
        seconds, _ = timed_cli(
            "run", "--preset", args.preset, "--storage", str(store), *sets, env=cli_env(**extra)
        )
        results[backend] = (seconds, stage_finish_times(store, started), eval_table(store))
        print(f"{backend}: {seconds / 60:.1f} min", flush=True)

    print(f"\nmachine: {os.cpu_count()} CPUs; preset {args.preset}; stores under {root}")
    print("| stage finished at (min) | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for stage in STAGES:
        cells = [f"{r[1][stage] / 60:.1f}" if stage in r[1] else "-" for r in results.values()]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(f"**{r[0] / 60:.1f}**" for r in results.values()) + " |")
    if "auto" in results and "transformers" in results:
        ratio = results["transformers"][0] / results["auto"][0]
        print(f"\ndemo wall time without vLLM / with vLLM: {ratio:.2f}x")
    for backend, (_, _, table) in results.items():
        print(f"\n## eval, backend={backend}\n{table}")
    summary = {b: {"seconds": r[0], "stage_finished_s": r[1]} for b, r in results.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
