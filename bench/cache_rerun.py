"""Cache-hit re-run: the whole `tiny` pipeline as a Prefect flow run, then the same config again.

The second run should find every stage `Cached` and cost a small fraction of the first (target < 10 %).
Two measurements:
- flow runs in one process (Prefect's temporary server started once, before timing): the cost of the
  pipeline itself, computed vs cached;
- `cyclej run` twice from the shell: what a user waits, each including Prefect's temporary-server
  start (≈10–15 s here), which dominates when the whole pipeline computes in seconds.

    .venv/bin/python bench/cache_rerun.py [--preset tiny]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import timed_cli


def flow_runs(preset: str, store: str) -> tuple[float, float, set[str]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from cyclej.config import load_config
    from flows.pipeline_flow import cyclej_pipeline

    cfg = load_config(preset=preset, storage=store)
    with get_client(sync_client=True) as client:
        client.hello()  # start the temporary server before timing
    t0 = time.perf_counter()
    cyclej_pipeline(config=cfg)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = cyclej_pipeline(config=cfg, return_state=True)
    second = time.perf_counter() - t0
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return first, second, {r.state.name for r in runs if r.state is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cyclej-bench-") as store:
        first, second, states = flow_runs(args.preset, store)
    print(f"flow run, computing every stage:   {first:8.1f} s")
    print(f"flow run, same config again:       {second:8.1f} s   (task states: {', '.join(sorted(states))})")
    print(f"ratio second/first (flow runs):    {second / first:8.3f}  (target < 0.10)")
    with tempfile.TemporaryDirectory(prefix="cyclej-bench-") as store:
        cli_first, _ = timed_cli("run", "--preset", args.preset, "--storage", store)
        cli_second, _ = timed_cli("run", "--preset", args.preset, "--storage", store)
    print(f"`cyclej run`, first:               {cli_first:8.1f} s")
    print(f"`cyclej run`, again:               {cli_second:8.1f} s")
    print(f"ratio (CLI, incl. server starts):  {cli_second / cli_first:8.3f}")


if __name__ == "__main__":
    main()
