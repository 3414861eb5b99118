"""Cache-hit re-run: the whole `tiny` pipeline as a Prefect flow run, then the same config again.

The second run should find every stage `Cached` and cost a small fraction of the first (target < 10 %).
Prints both wall times (each includes Prefect's temporary-server start) and the ratio.

    .venv/bin/python bench/cache_rerun.py [--preset tiny]
"""

from __future__ import annotations

import argparse
import tempfile

from _common import timed_cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cyclej-bench-") as store:
        first, _ = timed_cli("run", "--preset", args.preset, "--storage", store)
        second, _ = timed_cli("run", "--preset", args.preset, "--storage", store)
    print(f"first run (computes every stage): {first:8.1f} s")
    print(f"second run (all Cached):          {second:8.1f} s")
    print(f"ratio second/first:               {second / first:8.3f}  (target < 0.10)")


if __name__ == "__main__":
    main()
