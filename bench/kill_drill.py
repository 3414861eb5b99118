"""Random kill drill: for every pair (a stage that can be killed, the stage after it), N times, kill the
first stage at a random step (SIGKILL, like a lost pod), run again in a new process (the killed stage
resumes from its checkpoint, then the next stage runs in that same process), and compare both stages'
outputs with a run that never stopped. Prints how many drills ended bit-identical (target: all).

    .venv/bin/python bench/kill_drill.py [--runs 1] [--seed 0] [--threads 2] [--preset tiny]

Stages run in-process through `cyclej.stages.run_all` (what each Prefect task calls), one subprocess per
attempt; the stages before the killed one are copied from the uninterrupted run's store, as a retry would
find them cached. Outputs are compared by their content files (weights, data, generated text, tables),
not by files that hold timings or paths (metrics, manifests, model cards, plots).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages come from the checkout
    sys.path.insert(0, str(ROOT))

# Stages with a fault point (`cyclej.runtime.faults.maybe_fault`) and the stage that runs after each in
# one process.
KILL_PAIRS: tuple[tuple[str, str], ...] = (
    ("context", "paraphrase"),
    ("paraphrase", "para_train"),
    ("para_train", "domain_train"),
    ("domain_train", "merge"),
    ("rl", "eval"),
)
# Files whose bytes legitimately differ between identical runs: timings (metrics, paraphrase stats.json's
# tokens/s), absolute paths (peft's adapter_config.json), creation times (manifests), image metadata.
VOLATILE_NAMES = {
    "MANIFEST.json",
    "metrics.json",
    "metrics.jsonl",
    "stats.json",
    "README.md",
    "adapter_config.json",
    "model_card.md",
}
VOLATILE_SUFFIXES = {".png"}
WORKER_TIMEOUT_S = 900


def content_digest(artifact: Path) -> dict[str, str]:
    """sha256 of each content file of a committed artifact (checkpoints and volatile files left out)."""
    out = {}
    for f in sorted(artifact.rglob("*")):
        rel = f.relative_to(artifact)
        if (
            not f.is_file()
            or rel.parts[0] == "checkpoints"
            or f.name in VOLATILE_NAMES
            or f.suffix in VOLATILE_SUFFIXES
        ):
            continue
        out[rel.as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_stages(
    store: Path, until: str, *, preset: str = "tiny", threads: int | None = None, fault: str | None = None
) -> subprocess.CompletedProcess[str]:
    """One attempt: a fresh process runs the pipeline up to `until` on `store` (committed stages are
    reused, an interrupted one resumes). `fault` is a CYCLEJ_FAULT spec."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("CYCLEJ_FAULT", None)
    if fault:
        env["CYCLEJ_FAULT"] = fault
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", str(store), until, "--preset", preset]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)


def _worker(store: str, until: str, preset: str, threads: int | None) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from cyclej.config import load_config
    from cyclej.pipeline.registry import run_all
    from cyclej.runtime.progress import Progress
    from cyclej.runtime.store import ArtifactStore

    cfg = load_config(preset=preset, storage=store)
    run_all(cfg, ArtifactStore.from_config(cfg.storage), Progress(show_bar=False), until=until)


def committed_dir(store: Path, stage: str) -> Path:
    """The one committed artifact of `stage` in a store holding a single run."""
    found = [d for d in (store / stage).iterdir() if (d / "MANIFEST.json").is_file()]
    if len(found) != 1:
        raise RuntimeError(f"{store}/{stage}: expected one committed artifact, found {len(found)}")
    return found[0]


def fault_points(reference: Path, stage: str, preset: str = "tiny") -> list[int]:
    """The steps where `stage` can be killed: optimizer steps 1…N, or paraphrase shards 0…n-1."""
    from cyclej.config import load_config

    cfg = load_config(preset=preset, storage=str(reference))
    if stage == "paraphrase":
        shards = list((committed_dir(reference, stage) / "checkpoints").glob("shard-*"))
        return list(range(len(shards)))
    section = getattr(cfg, stage)
    steps = section.steps if stage == "rl" else section.max_steps
    return list(range(1, steps + 1))


@dataclass
class DrillResult:
    killed: str
    step: int
    following: str
    killed_rc: int
    identical: dict[str, bool]  # stage → bit-identical to the uninterrupted run
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.killed_rc == -9 and not self.error and all(self.identical.values())


def drill(
    reference: Path,
    work: Path,
    killed: str,
    step: int,
    following: str,
    *,
    preset: str = "tiny",
    threads: int | None = None,
) -> DrillResult:
    """Kill `killed` at `step`, re-run through `following`, compare both with `reference`."""
    from cyclej.config import STAGES

    t0 = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for stage in STAGES[: STAGES.index(killed)]:  # what a retry finds committed
        shutil.copytree(reference / stage, work / stage)
    dead = run_stages(work, following, preset=preset, threads=threads, fault=f"{killed}:{step}:kill")
    result = DrillResult(killed, step, following, dead.returncode, {}, 0.0)
    if dead.returncode != -9:
        result.error = f"the kill at {killed}:{step} did not end the process (exit {dead.returncode})"
    else:
        resumed = run_stages(work, following, preset=preset, threads=threads)
        if resumed.returncode != 0:
            result.error = f"the resumed run failed (exit {resumed.returncode}): {resumed.stderr[-1500:]}"
        else:
            for stage in (killed, following):
                result.identical[stage] = content_digest(committed_dir(work, stage)) == content_digest(
                    committed_dir(reference, stage)
                )
    result.seconds = time.perf_counter() - t0
    return result


def build_reference(store: Path, until: str, *, preset: str = "tiny", threads: int | None = None) -> None:
    proc = run_stages(store, until, preset=preset, threads=threads)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1, help="drills per stage pair")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument(
        "--pairs",
        default=",".join(k for k, _ in KILL_PAIRS),
        help="killed stages to drill (comma-separated), default all",
    )
    args = ap.parse_args()
    chosen = [p for p in KILL_PAIRS if p[0] in args.pairs.split(",")]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="cyclej-kill-drill-") as tmp:
        reference = Path(tmp) / "reference"
        t0 = time.perf_counter()
        build_reference(reference, chosen[-1][1], preset=args.preset, threads=args.threads)
        print(f"uninterrupted run through {chosen[-1][1]}: {time.perf_counter() - t0:.1f} s", flush=True)
        results = []
        for n in range(args.runs):
            for killed, following in chosen:
                step = rng.choice(fault_points(reference, killed, args.preset))
                r = drill(
                    reference,
                    Path(tmp) / "drill",
                    killed,
                    step,
                    following,
                    preset=args.preset,
                    threads=args.threads,
                )
                results.append(r)
                verdict = "bit-identical" if r.ok else (r.error or "DIFFERS: " + json.dumps(r.identical))
                print(
                    f"[{n + 1}/{args.runs}] kill {killed}:{step:<2d} then {following:12s} "
                    f"{r.seconds:6.1f} s  {verdict}",
                    flush=True,
                )
    ok = sum(r.ok for r in results)
    print(f"{ok}/{len(results)} kill drills ended bit-identical to the uninterrupted run")
    raise SystemExit(0 if ok == len(results) else 1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        wp = argparse.ArgumentParser()
        wp.add_argument("store")
        wp.add_argument("until")
        wp.add_argument("--preset", default="tiny")
        wp.add_argument("--threads", type=int, default=None)
        wa = wp.parse_args(sys.argv[2:])
        _worker(wa.store, wa.until, wa.preset, wa.threads)
    else:
        main()
