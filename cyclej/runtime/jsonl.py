"""JSON Lines files the stages write and read back: metrics logs, RL samples, paraphrase shards.

One record a line. `read_jsonl` is forgiving in the two ways a log of a killed run needs: a missing file
is no records, and a line that does not parse (the torn last line of a process killed mid-write) is
skipped. Files a user gives (corpora, paraphrase pairs) are parsed where their errors can name the
line and what to do (cyclej.corpora.lines, cyclej.stages.para_train.read_pairs), not here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of `path`, in order; [] when it does not exist; empty and torn lines skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a killed run
    return out


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """All of `rows` to `path` at once: written beside it and renamed, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
