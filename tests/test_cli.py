"""`cyclej validate` and friends: bad input exits 2 with one line naming the field or file, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SAMPLES = Path(__file__).resolve().parents[1] / "cyclej" / "samples" / "yelp"


def cyclej(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cyclej.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def write_config(tmp_path: Path, **changes: object) -> Path:
    cfg = {
        "storage": {"root": str(tmp_path / "store")},
        "domain_a": {"name": "neg", "marker": "<|A|>", "train": [str(SAMPLES / "train.0")]},
        "domain_b": {"name": "pos", "marker": "<|B|>", "train": [str(SAMPLES / "train.1")]},
        "models": {"base": "tiny-gptj"},
        # The card's 4096-token context rows need more held-out text than the sample's 2 % (~900 tokens a
        # domain): with them the context stage, and so `validate`, refuses the config.
        "context": {"seq_len": 256},
    }
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split("__")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def assert_bad_input(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_validate_ok(tmp_path: Path) -> None:
    proc = cyclej("validate", str(write_config(tmp_path)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok:") and "neg 3000 lines" in proc.stdout


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"para_train__lr": -1e-4}, ("para_train.lr", "greater than 0")),
        ({"rl__rollouts": 1}, ("rl.rollouts", "greater than or equal to 2")),
        ({"rl__rollout": 4}, ("rl.rollout", "unknown key")),
        ({"merge__weight": 1.5}, ("merge.weight",)),
        (
            {"domain_train__batch_size": 30, "domain_train__micro_batch_size": 4},
            ("domain_train", "not divisible"),
        ),
        ({"domain_b__marker": "<|A|>"}, ("marker",)),
    ],
)
def test_validate_bad_config(tmp_path: Path, changes: dict[str, object], needles: tuple[str, ...]) -> None:
    assert_bad_input(cyclej("validate", str(write_config(tmp_path, **changes)), cwd=tmp_path), *needles)


def test_validate_missing_corpus(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    proc = cyclej("validate", str(write_config(tmp_path, domain_a__train=[str(missing)])), cwd=tmp_path)
    assert_bad_input(proc, "domain_a.train", str(missing))


def test_validate_binary_corpus(tmp_path: Path) -> None:
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    proc = cyclej("validate", str(write_config(tmp_path, domain_b__train=[str(binary)])), cwd=tmp_path)
    assert_bad_input(proc, "domain_b.train", str(binary))


def test_validate_same_file_both_domains(tmp_path: Path) -> None:
    proc = cyclej(
        "validate", str(write_config(tmp_path, domain_b__train=[str(SAMPLES / "train.0")])), cwd=tmp_path
    )
    assert_bad_input(proc, "same file (identical content)")


def test_validate_unwritable_storage(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    proc = cyclej("validate", str(write_config(tmp_path, storage__root=str(blocker / "store"))), cwd=tmp_path)
    assert_bad_input(proc, "storage", "cannot write")


def test_bad_fault_spec_and_unknown_preset(tmp_path: Path) -> None:
    assert_bad_input(
        cyclej("validate", str(write_config(tmp_path)), cwd=tmp_path, env={"CYCLEJ_FAULT": "rl:x:boom"}),
        "CYCLEJ_FAULT",
    )
    assert_bad_input(
        cyclej("run", "--preset", "huge", cwd=tmp_path), "--preset huge", "tiny, demo, yelp, gptj"
    )


def test_status_lists_every_stage(tmp_path: Path) -> None:
    proc = cyclej("status", str(write_config(tmp_path)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    stages = [line.split()[0] for line in proc.stdout.strip().splitlines()]
    assert stages == ["data", "context", "paraphrase", "para_train", "domain_train", "merge", "rl", "eval"]
    assert all("missing" in line for line in proc.stdout.strip().splitlines())


@pytest.mark.slow  # two runs with a temporary Prefect server each (~1 min)
@pytest.mark.parametrize(
    ("fault", "signal_after"),
    [("", "Beginning flow run"), ("context:2:hang", "context: train")],
    ids=["between-stages", "stuck-stage"],
)
def test_sigterm_stops_the_run_and_its_temporary_prefect_server(
    tmp_path: Path, fault: str, signal_after: str
) -> None:
    """`kill` (or a pod being stopped) during a run: exit 143, and Prefect's temporary server, a child
    process, is stopped too rather than left running with its port; also when the running stage never
    finishes (Prefect waits for it, so the watchdog ends the process after the grace period)."""
    import contextlib
    import re
    import signal
    import time
    import urllib.error
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # force the temporary server
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["CYCLEJ_FAULT"], env["CYCLEJ_SIGTERM_GRACE"] = fault, "2"
    log = tmp_path / "stderr.log"  # a file, not a pipe: an unread pipe could fill and block the run
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cyclej.cli",
                "run",
                "--preset",
                "tiny",
                "--storage",
                str(tmp_path / "store"),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        for _ in range(1200):  # wait until the run is where the signal should reach it
            text = log.read_text()
            if signal_after in text or proc.poll() is not None:
                break
            time.sleep(0.1)
        m = re.search(r"Starting temporary server on (http://127\.0\.0\.1:\d+)", text)
        assert m is not None and signal_after in text, text[-3000:]
        time.sleep(1.0 if fault else 0.0)  # let the stage reach its hang
        server = m.group(1)
        urllib.request.urlopen(f"{server}/api/health", timeout=5)  # up while the run is
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143  # without the watchdog a stuck stage never lets it exit
        for _ in range(50):  # the server stops within the atexit hook's 5 s
            try:
                urllib.request.urlopen(f"{server}/api/health", timeout=1)
            except urllib.error.URLError as exc:  # refused: nothing listens there any more
                if not isinstance(exc, urllib.error.HTTPError):
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"the temporary Prefect server at {server} outlived the run")
    finally:  # whatever happened, leave no process of this run behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
