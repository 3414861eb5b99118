"""Every bad input the CLI can meet ends the same way: exit 2, one line on stderr naming the field, file
or option, no traceback. One table, one row per case found by issue 16's drills (usage errors of typer's
vendored click included), each run as a user would run it."""

from __future__ import annotations

import os
import re
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
    (
        "product-without-discriminator",
        lambda t: [
            "validate",
            "--preset",
            "tiny",
            "--set",
            "rl.reward_combination=product",
            "--set",
            "rl.rewards.discriminator=0",
        ],
        "rl.rewards.discriminator",
    ),
    (
        "storage-unknown-scheme",
        lambda t: ["validate", "--preset", "tiny", "--storage", "foo://x"],
        "storage.root",
    ),
    ("storage-gcs", lambda t: ["validate", "--preset", "tiny", "--storage", "gs://x"], "gs://"),
    (
        "unknown-model-name",
        lambda t: ["validate", str(write_config(t, models__base="no-such-model"))],
        "models.base",
    ),
    (
        "model-config-not-json",
        lambda t: [
            "validate",
            str(write_config(t, models__base=broken_model(t, '{"model_type": "gptj",', b""))),
        ],
        "config.json",
    ),
    (
        "translate-config-not-json",
        lambda t: [
            "translate",
            "--model",
            broken_model(t, '{"model_type": "gptj",', b""),
            "--to",
            "b",
            corpus(t, "in.txt", ["the food was cold ."]),
        ],
        "config.json",
    ),
    (
        "translate-garbage-weights",
        lambda t: [
            "translate",
            "--model",
            broken_model(
                t,
                '{"model_type": "gptj", "n_embd": 64, "n_layer": 1, "n_head": 4, "rotary_dim": 16, '
                '"vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 0}',
                os.urandom(3000),
            ),
            "--to",
            "b",
            corpus(t, "in.txt", ["the food was cold ."]),
        ],
        "cannot load",
    ),
    (
        "validate-one-line-corpus",
        lambda t: [
            "validate",
            str(write_config(t, domain_a__train=[corpus(t, "one.txt", ["just one line ."])])),
        ],
        "fewer than data.min_lines",
    ),
    (
        "validate-all-duplicates",
        lambda t: [
            "validate",
            str(write_config(t, domain_a__train=[corpus(t, "dup.txt", ["the same line ."] * 500)])),
        ],
        "duplicates",
    ),
    (
        "validate-over-long-lines",
        lambda t: [
            "validate",
            str(
                write_config(
                    t,
                    data__max_tokens=4,
                    domain_a__train=[
                        corpus(
                            t,
                            "long.txt",
                            [
                                f"line {i} is much too long for four tokens of any tokenizer ."
                                for i in range(300)
                            ],
                        )
                    ],
                )
            ),
        ],
        "too long",
    ),
]


@pytest.mark.parametrize(("args_for", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, args_for: Callable[[Path], list[str]], needle: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cyclej.cli", *args_for(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "CYCLEJ_FAULT": ""},
        timeout=180,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("cyclej: error: ") and needle in lines[0], lines[0]


# ---- refusals at run time: inside a flow run, where Prefect logs the exception with its traceback ----
PREFECT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| INFO +\| ")  # Prefect's console format, INFO only
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar (the stages' and transformers' own)
LAUNCHER_LINE = re.compile(r"^cyclej: (tiny: .* writable|flow run '[^']+' \([0-9a-f-]{36}\))$")


def stderr_fragments(stderr: str) -> list[str]:
    """Lines of stderr, split at carriage returns too (a progress bar redraws with \\r and Prefect's next
    line may follow on the same physical line)."""
    return [f.strip() for f in re.split(r"[\r\n]", stderr) if f.strip()]


@pytest.fixture(scope="module")
def runtime_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the module, so `data` is computed once."""
    return tmp_path_factory.mktemp("runtime-refusals") / "store"


@pytest.fixture
def runtime_env(runtime_store: Path, model_cache: Path) -> dict[str, str]:
    """The shared real Prefect server (checked per test: a server that stopped answering is replaced)."""
    from tests.helpers.local_prefect_server import shared_prefect_server

    return {
        **shared_prefect_server(),
        "CYCLEJ_CACHE": str(model_cache),
        "OMP_NUM_THREADS": "1",
        "CYCLEJ_TEST_STORE": str(runtime_store),
    }


def _run_process_only(env: dict[str, str], tmp: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """The run process alone, for refusals the launcher's own checks stop first (the data stage's): the
    flow run is created as the launcher creates it, then `cyclej run` executes it with CYCLEJ_FLOW_RUN_ID,
    as the launcher starts it (a corpus edited after the launcher's check reaches the data stage so)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cyclej.config import load_config
    from flows.launch import FLOW_RUN_ENV, create_flow_run

    cfg = load_config(Path(args[1]), None, [], None)
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        flow_run = create_flow_run(cfg, "data")
    return subprocess.run(
        [sys.executable, "-m", "cyclej.cli", *args, "--until", "data"],
        cwd=tmp,
        capture_output=True,
        text=True,
        env={**env, FLOW_RUN_ENV: str(flow_run.id)},
        timeout=300,
    )


def _cli_run(
    env: dict[str, str], tmp: Path, args: list[str], fault: str = ""
) -> subprocess.CompletedProcess[str]:
    full = [
        "run",
        "--preset",
        "tiny",
        "--storage",
        env["CYCLEJ_TEST_STORE"],
        "--until",
        "context",
        "--set",
        "context.max_steps=2",
        *args,
    ]
    return subprocess.run(
        [sys.executable, "-m", "cyclej.cli", *full],
        cwd=tmp,
        capture_output=True,
        text=True,
        env={**env, "CYCLEJ_FAULT": fault},
        timeout=300,
    )


def _data_config(tmp: Path, lines: list[str], **changes: object) -> list[str]:
    return ["run", str(write_config(tmp, domain_a__train=[corpus(tmp, "a.txt", lines)], **changes))]


# (id, how it is run, exit code, text of the last line, whether Prefect's traceback may be on stderr)
RUNTIME_CASES: list[
    tuple[str, Callable[[dict[str, str], Path], subprocess.CompletedProcess[str]], int, str, bool]
] = [
    (
        "one-clean-line",
        lambda e, t: _run_process_only(e, t, _data_config(t, ["just one line ."])),
        2,
        "fewer than data.min_lines",
        False,
    ),
    (
        "all-duplicates",
        lambda e, t: _run_process_only(e, t, _data_config(t, ["the same line ."] * 500)),
        2,
        "duplicates",
        False,
    ),
    (
        "over-long-lines",
        lambda e, t: _run_process_only(
            e,
            t,
            _data_config(
                t,
                [f"line {i} is much too long for four tokens of any tokenizer ." for i in range(300)],
                data__max_tokens=4,
            ),
        ),
        2,
        "too long",
        False,
    ),
    # only the model knows its context length: refused inside `context`, past every launcher check
    (
        "context-longer-than-the-model",
        lambda e, t: _cli_run(e, t, ["--set", "context.seq_len=100000"]),
        2,
        "context.seq_len",
        False,
    ),
    (
        "verbose-shows-the-traceback",
        lambda e, t: _run_process_only(e, t, [*_data_config(t, ["just one line ."]), "--verbose"]),
        2,
        "fewer than data.min_lines",
        True,
    ),
    # a bug (the `error` fault stands for one) keeps its traceback: that is what a developer needs
    (
        "a-bug-keeps-its-traceback",
        lambda e, t: _cli_run(e, t, ["--set", "orchestration.retries=0"], fault="context:1:error"),
        1,
        "stage 'context' failed: InjectedError",
        True,
    ),
]


# The default suite keeps three rows (~50 s on 2 loaded cores); the rest run with -m slow (make test / CI).
SLOW_RUNTIME_CASES = {"all-duplicates", "context-longer-than-the-model", "verbose-shows-the-traceback"}


@pytest.mark.parametrize(
    ("run", "code", "needle", "traceback"),
    [
        pytest.param(*c[1:], id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW_RUNTIME_CASES else [])
        for c in RUNTIME_CASES
    ],
)
def test_run_time_refusal_is_one_line_without_prefect_tracebacks(
    runtime_env: dict[str, str],
    tmp_path: Path,
    run: Callable[[dict[str, str], Path], subprocess.CompletedProcess[str]],
    code: int,
    needle: str,
    traceback: bool,
) -> None:
    """Issue 16: a refusal inside the flow run printed Prefect's two tracebacks (~109 lines) before the
    one-line error. Now stderr is the error line (last), Prefect's INFO lines, the launcher's two status
    lines and progress bars: no traceback, no ERROR line. A bug, and --verbose, still show the traceback."""
    proc = run(runtime_env, tmp_path)
    fragments = stderr_fragments(proc.stderr)
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [f for f in fragments if f.startswith("cyclej: error: ")]
    assert len(errors) == 1 and errors[0] == fragments[-1] and needle in errors[0], proc.stderr[-3000:]
    if traceback:
        assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
        return
    others = [
        f
        for f in fragments[:-1]
        if not (PREFECT_LINE.match(f) or PROGRESS.search(f) or LAUNCHER_LINE.match(f))
    ]
    assert not others, others  # no traceback line, no ERROR/WARNING line, nothing else
    assert proc.stderr.count("stage context: start") <= 1  # bad input is not retried (it would fail again)
