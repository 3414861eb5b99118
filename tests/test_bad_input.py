"""Every bad input the CLI can meet ends the same way: exit 2, one line on stderr naming the field, file
or option, no traceback. One table, one row per case found by issue 16's drills (usage errors of typer's
vendored click included), each run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_cli import write_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "cyclej" / "samples" / "yelp"


def corpus(tmp: Path, name: str, lines: list[str]) -> str:
    path = tmp / name
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return str(path)


def broken_model(tmp: Path, config: str, weights: bytes) -> str:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    (folder / "cyclej.json").write_text('{"markers": ["<|A|>", "<|B|>"]}')
    (folder / "model.safetensors").write_bytes(weights)
    return str(folder)


# (id, a function of the test's tmp folder giving the CLI arguments, text the one line must contain)
CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("unknown-option", lambda t: ["--bogus"], "--bogus"),
    ("unknown-command", lambda t: ["frobnicate"], "frobnicate"),
    ("option-without-value", lambda t: ["run", "--storage"], "--storage"),
    ("translate-without-arguments", lambda t: ["translate"], "--model"),
    ("set-not-yaml", lambda t: ["validate", "--preset", "tiny", "--set", "rl.steps=[1,"], "--set rl.steps"),
    ("storage-unknown-scheme", lambda t: ["validate", "--preset", "tiny", "--storage", "foo://x"], "storage.root"),
    ("storage-gcs", lambda t: ["validate", "--preset", "tiny", "--storage", "gs://x"], "gs://"),
    ("unknown-model-name", lambda t: ["validate", str(write_config(t, models__base="no-such-model"))],
     "models.base"),
    ("model-config-not-json", lambda t: ["validate", str(write_config(
        t, models__base=broken_model(t, '{"model_type": "gptj",', b"")))], "config.json"),
    ("translate-config-not-json", lambda t: ["translate", "--model", broken_model(t, '{"model_type": "gptj",', b""),
                                             "--to", "b", corpus(t, "in.txt", ["the food was cold ."])], "config.json"),
    ("translate-garbage-weights", lambda t: ["translate", "--model", broken_model(
        t, '{"model_type": "gptj", "n_embd": 64, "n_layer": 1, "n_head": 4, "rotary_dim": 16, "vocab_size": 1024, '
        '"bos_token_id": 0, "eos_token_id": 0}',
        os.urandom(3000)), "--to", "b", corpus(t, "in.txt", ["the food was cold ."])], "cannot load"),
    ("validate-one-line-corpus", lambda t: ["validate", str(write_config(
        t, domain_a__train=[corpus(t, "one.txt", ["just one line ."])]))], "fewer than data.min_lines"),
    ("validate-all-duplicates", lambda t: ["validate", str(write_config(
        t, domain_a__train=[corpus(t, "dup.txt", ["the same line ."] * 500)]))], "duplicates"),
    ("validate-over-long-lines", lambda t: ["validate", str(write_config(
        t, data__max_tokens=4, domain_a__train=[corpus(t, "long.txt", [f"line {i} is much too long for four "
                                                                         "tokens of any tokenizer ." for i in range(300)])]))],
     "too long"),
]


@pytest.mark.parametrize(("args_for", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args_for: Callable[[Path], list[str]], needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "cyclej.cli", *args_for(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "CYCLEJ_FAULT": ""}, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("cyclej: error: ") and needle in lines[0], lines[0]
