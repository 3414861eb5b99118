"""The README is what a newcomer reads: at most 8,000 characters, every relative link (README and docs/)
resolves to a file in the repository, and its "Your own corpora" commands run as written."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_CHARS = 8000
OWN_CORPORA = "## Your own corpora"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_at_most_8000_characters() -> None:
    size = len(README.read_text(encoding="utf-8"))  # characters, as `wc -m`; bytes below
    assert size <= MAX_README_CHARS, size
    assert README.stat().st_size <= MAX_README_CHARS, README.stat().st_size  # `wc -c`


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:2] for line in block[:2]] == [["make", "demo"], ["make", "test"]]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page: Path) -> None:
    links = LINK.findall(page.read_text(encoding="utf-8"))
    assert page != README or len(links) >= 5  # the README links its docs pages (a broken regex finds none)
    for target in links:
        if re.match(r"^[a-z]+://|^mailto:|^#", target):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert path.exists(), f"{page.name}: {target} does not exist"


def own_corpora_commands(readme: str) -> list[str]:
    """The shell lines of the README's "Your own corpora" section (its first bash block)."""
    section = readme.split(OWN_CORPORA, 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _corpus_folder(folder: Path, source: Path, start: int) -> None:
    """Three .txt files of 300 lines each, cut from the shipped sample: about the least a first run takes
    (the 2 % the data stage holds out must fill one row of the `context` stage's held-out perplexity)."""
    folder.mkdir(parents=True)
    lines = source.read_text(encoding="utf-8").splitlines()
    for i in range(3):
        chunk = lines[start + 300 * i : start + 300 * (i + 1)]
        (folder / f"part{i}.txt").write_text("\n".join(chunk) + "\n", encoding="utf-8")


@pytest.mark.slow  # the whole pipeline on tiny models through Prefect: ~3 min on 2 loaded cores
def test_readme_own_corpora_commands_run_as_written(tmp_path: Path) -> None:
    """Each command of the section, verbatim, in bash, in a folder holding the corpora it names. One change,
    asserted: `--from demo` becomes `--from tiny` (the same pipeline on tiny random models, so it takes
    minutes, not the demo's 10-30). `.venv/bin/cyclej` is this checkout's CLI."""
    commands = own_corpora_commands(README.read_text(encoding="utf-8"))
    verbs = [re.search(r"\.venv/bin/cyclej (\w+)", c).group(1) for c in commands]  # type: ignore[union-attr]
    assert verbs == ["init", "validate", "run", "translate"]
    assert commands[0].count("--from demo") == 1
    commands[0] = commands[0].replace("--from demo", "--from tiny")

    samples = ROOT / "cyclej" / "samples" / "yelp"
    folders = re.findall(r"--[ab] (\S+)", commands[0])
    assert len(folders) == 2
    for folder, source in zip(folders, ("train.0", "train.1"), strict=True):
        _corpus_folder(tmp_path / folder, samples / source, start=0)
    shim = tmp_path / ".venv" / "bin" / "cyclej"
    shim.parent.mkdir(parents=True)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cyclej.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    outputs = []
    for command in commands:
        proc = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        outputs.append(proc)
    config = (tmp_path / "my.yaml").read_text(encoding="utf-8")
    assert "base: tiny" in config and "# " in config  # commented, inherits the preset
    assert outputs[1].stdout.startswith("ok: my: ")
    translated = outputs[3].stdout.splitlines()
    assert len(translated) == 1  # one output line per input line
    assert (tmp_path / "cyclej-store" / "rl").is_dir()  # the store sits beside my.yaml, as it says
