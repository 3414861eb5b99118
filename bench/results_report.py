"""Write a run's results page (docs/results/<preset>.md) from its store: the evaluation table, 20 example
translations per direction picked by a fixed seed, the training-signal and reward plots, the exact command,
the config fingerprints and the wall time.

    .venv/bin/python bench/results_report.py --preset yelp --storage /work/yelp-store \\
        --command "cyclej run --preset yelp" --wall-time "1 h 52 min"

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
    ap.add_argument("--preset", required=True)
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

    cfg = load_config(preset=args.preset, storage=args.storage, overrides=args.overrides)
    store = ArtifactStore.from_config(cfg.storage)
    fps = fingerprints(cfg)
    out = Path(args.out) if args.out else ROOT / "docs" / "results" / f"{args.preset}.md"
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
        f"# `{args.preset}` preset: results",
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
        f"## {EXAMPLES_PER_DIRECTION} example translations per direction (seed {args.seed})",
        "",
    ]
    systems = list(examples[0]["systems"]) if examples else []
    for direction in ("a->b", "b->a"):
        pool = [e for e in examples if e["direction"] == direction]
        picked = sorted(rng.sample(range(len(pool)), min(EXAMPLES_PER_DIRECTION, len(pool))))
        lines += [
            f"### {direction}",
            "",
            "| source | " + " | ".join(systems) + " |",
            "|---|" + "---|" * len(systems),
        ]
        for i in picked:
            e = pool[i]
            cells = [_cell(e["systems"][s]["translation"]) for s in systems]
            lines.append(f"| {_cell(e['source'])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Curves", ""]
    lines += [f"![{title}]({assets.name}/{name})" for title, name in plots]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out} and {len(plots)} plots in {assets}")


def _cell(text: str) -> str:
    return (text or "∅").replace("|", "\\|")


if __name__ == "__main__":
    main()
