#!/usr/bin/env bash
# Wheels of the project's pure-Python dependencies that bench/gpu_check.py needs and a bare GPU machine
# (torch, transformers, peft, sentence-transformers, sacrebleu, safetensors; no registry) lacks, at the
# versions of requirements/cpu.lock, for CPython 3.12 on x86_64 Linux. Run it where pip reaches a registry:
#
#   bench/gpu_check_wheels.sh .whl                 # then carry .whl to the GPU machine and there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site python3 bench/gpu_check.py --out gpu-check
set -euo pipefail
dest=${1:-.whl}
root="$(cd "$(dirname "$0")/.." && pwd)"
pip=${PIP:-"$root/.venv/bin/pip"}
pin() { grep -E "^$1==" "$root/requirements/cpu.lock" | cut -d' ' -f1; }
mkdir -p "$dest"
"$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
    "$(pin pydantic)" "$(pin pydantic-core)" "$(pin annotated-types)" "$(pin typing-inspection)" "$(pin nltk)"
# rouge-score is published as a source distribution only: build its (pure-Python) wheel here.
"$pip" wheel -q --no-deps -w "$dest" "$(pin rouge-score)"
ls "$dest"
