"""Write a run's results page (docs/results/<preset>.md) from its store: the evaluation table, 20 example
translations per direction picked by a fixed seed, the training-signal and reward plots, the exact command,
the config fingerprints and the wall time.

    .venv/bin/python bench/results_report.py --preset yelp --storage /work/yelp-store \\
        --command "cyclej run --preset yelp" --wall-time "1 h 52 min"
    .venv/bin/python bench/results_report.py --config docs/results/shakespeare.yaml --storage /work/shk \\
        --command "cyclej run docs/results/shakespeare.yaml" --wall-time "12 min"

Reads only committed artifacts (through ArtifactStore), so it works for local and s3:// stores alike.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from cyclej.config import STAGES, load_config
from cyclej.pipeline.registry import fingerprints
from cyclej.runtime.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_PER_DIRECTION = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="the run's preset")
    which.add_argument("--config", type=Path, help="the run's config file (instead of a preset)")
    ap.add_argument("--storage", required=True)
    ap.add_argument("--command", required=True, help="the command that made the run, as a user types it")
    ap.add_argument("--wall-time", required=True, help="measured wall time of the run, with the machine kind")
    ap.add_argument("--out", default=None, help="default: docs/results/<preset>.md")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="a config override the run used (as for `cyclej run --set`), repeatable",
    )
    ap.add_argument(
        "--notes",
        type=Path,
        default=None,
        help="a markdown file (targets, diagnosis, what was tried) put after the header",
    )
    args = ap.parse_args()

    cfg = load_config(args.config, preset=args.preset, storage=args.storage, overrides=args.overrides)
    store = ArtifactStore.from_config(cfg.storage)
    fps = fingerprints(cfg)
    name = args.preset or args.config.stem
    out = Path(args.out) if args.out else ROOT / "docs" / "results" / f"{name}.md"
    assets = out.parent / f"{out.stem}-assets"  # per report: two runs of one preset keep their own plots
    assets.mkdir(parents=True, exist_ok=True)

    eval_ref = store.ref("eval", fps["eval"])
    if eval_ref is None:
        raise SystemExit(f"eval {fps['eval']} is not complete in {args.storage}: finish the run first")
    eval_dir = store.fetch(eval_ref)
    report_md = (eval_dir / "report.md").read_text(encoding="utf-8")
    examples = [
        json.loads(line) for line in (eval_dir / "examples.jsonl").read_text(encoding="utf-8").splitlines()
    ]

    plots: list[tuple[str, str]] = []
    for png in sorted(eval_dir.glob("*.png")):
        shutil.copyfile(png, assets / png.name)
        plots.append((png.stem, png.name))
    for stage in ("context", "para_train", "domain_train", "rl"):
        ref = store.ref(stage, fps[stage])
        if ref is None:
            continue
        png = store.fetch(ref) / "training_signal.png"
        if png.is_file():
            name = f"{stage}_training_signal.png"
            shutil.copyfile(png, assets / name)
            plots.append((f"{stage}: loss / reward and update size per step", name))

    rng = random.Random(args.seed)
    lines = [
        f"# `{args.preset}` preset: results" if args.preset else f"# `{args.config}`: results",
        "",
        f"- command: `{args.command}`",
        f"- wall time: {args.wall_time}",
        "- fingerprints: " + ", ".join(f"{s} `{fps[s]}`" for s in STAGES),
        "",
        *([args.notes.read_text(encoding="utf-8"), ""] if args.notes else []),
        "## Evaluation",
        "",
        report_md,
        "",
        *rl_step_breakdown(store, fps["rl"]),
        f"## {EXAMPLES_PER_DIRECTION} example translations per direction (seed {args.seed})",
        "",
    ]
    systems = list(examples[0]["systems"]) if examples else []
    with_refs = bool(examples) and "reference" in examples[0]
    for direction in ("a->b", "b->a"):
        pool = [e for e in examples if e["direction"] == direction]
        picked = sorted(rng.sample(range(len(pool)), min(EXAMPLES_PER_DIRECTION, len(pool))))
        lines += [
            f"### {direction}",
            "",
            "| source | " + ("reference | " if with_refs else "") + " | ".join(systems) + " |",
            "|---|" + "---|" * (len(systems) + with_refs),
        ]
        for i in picked:
            e = pool[i]
            cells = [_cell(e["reference"])] if with_refs else []
            cells += [_cell(e["systems"][s]["translation"]) for s in systems]
            lines.append(f"| {_cell(e['source'])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Curves", ""]
    lines += [f"![{title}]({assets.name}/{name})" for title, name in plots]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out} and {len(plots)} plots in {assets}")


def rl_step_breakdown(store: ArtifactStore, rl_fingerprint: str) -> list[str]:
    """Where an RL step's time went: the mean seconds of each phase the stage logged, and its share."""
    ref = store.ref("rl", rl_fingerprint)
    if ref is None:
        return []
    summary = json.loads((store.fetch(ref) / "metrics.json").read_text(encoding="utf-8"))
    step = summary.get("seconds_per_step")
    prefix = "seconds_per_step_"
    phases = {k.removeprefix(prefix): v for k, v in summary.items() if k.startswith(prefix)}
    phases.pop("rollout", None)  # = sample + back_translation, listed as those two
    if not step or not phases:
        return []
    rows = ["## One RL step, by phase", "", f"Mean over {summary['steps']} steps: {step:.2f} s a step.", ""]
    rows += ["| phase | seconds | share |", "|---|---|---|"]
    for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
        rows.append(f"| {name} | {seconds:.2f} | {seconds / step:.0%} |")
    rest = step - sum(phases.values())
    rows += [f"| other (logs, samples) | {rest:.2f} | {rest / step:.0%} |", ""]
    return rows


def _cell(text: str) -> str:
    return (text or "∅").replace("|", "\\|")


if __name__ == "__main__":
    main()
