"""Resume overhead: a `tiny` pipeline killed half-way through a training stage and resumed, against one
that never stopped. Prints both totals and the ratio (the cost of dying is the process restart, the
Prefect start and the work since the last checkpoint, not a start from scratch).

    .venv/bin/python bench/resume_overhead.py [--preset tiny] [--fault domain_train:3:kill]
    .venv/bin/python bench/resume_overhead.py --preset demo --fault rl:4:kill    # ~12 min, SmolLM2
"""

from __future__ import annotations

import argparse
import tempfile

from _common import cli_env, timed_cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--fault", default="domain_train:3:kill", help="where the first attempt dies")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cyclej-bench-") as clean_store:
        clean, _ = timed_cli("run", "--preset", args.preset, "--storage", clean_store)
    with tempfile.TemporaryDirectory(prefix="cyclej-bench-") as store:
        died, code = timed_cli(
            "run",
            "--preset",
            args.preset,
            "--storage",
            store,
            env=cli_env(CYCLEJ_FAULT=args.fault),
            check=False,
        )
        if code == 0:
            raise SystemExit(f"the fault {args.fault} did not stop the run")
        resumed, _ = timed_cli("run", "--preset", args.preset, "--storage", store)
    total = died + resumed
    print(f"uninterrupted run:                  {clean:8.1f} s")
    print(f"killed at {args.fault:24s} {died:8.1f} s (exit {code})")
    print(f"resumed run:                        {resumed:8.1f} s")
    print(
        f"ratio (killed + resumed)/clean:     {total / clean:8.3f}  (+{total - clean:.1f} s: restart, Prefect"
        " start, model loads, steps since the last checkpoint)"
    )
    print(f"without resume, (killed + clean)/clean: {(died + clean) / clean:6.3f}  (starting over)")


if __name__ == "__main__":
    main()
