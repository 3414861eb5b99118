"""bench/gpu_check.py --dry-run: the GPU check runs end to end on a CPU, with vLLM, Prefect and the S3/Redis
clients made unimportable, so the script a GPU machine runs cannot rot (issue 22)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Absent on a bare GPU machine (torch, transformers, peft, sentence-transformers, sacrebleu, safetensors).
ABSENT = "vllm,prefect,boto3,botocore,s3fs,redis"
SECTIONS = (
    "LoRA stages",
    "out of memory",
    "checkpoint and resume",
    "bf16 + fp32 masters",
    "RL (full weights",
    "multi-GPU (2 ranks",
)


def test_gpu_check_dry_run_passes_every_section_without_vllm_or_prefect(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CYCLEJ_CACHE": str(tmp_path / "cache")}
    env.pop("CYCLEJ_FAULT", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--dry-run",
            "--block-imports",
            ABSENT,
            "--out",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not [r for r in rows if r["verdict"] == "FAIL"]
    for section in SECTIONS:
        assert any(r["section"].startswith(section) and r["verdict"] == "ok" for r in rows), section
    checks = {r["check"]: r for r in rows}
    assert any("gradient checkpointing changes no loss" in c for c in checks)
    assert any("resumed from step 2" in r["check"] and "bit-identical" in r["measured"] for r in rows)
    skipped = [r for r in rows if r["section"] == "skipped"]
    assert [r["measured"] for r in skipped] == ["vllm is not installed", "prefect is not installed"]
    assert (tmp_path / "gpu_check.md").read_text().startswith("| section | check |")


def test_gpu_check_names_a_missing_package_and_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--block-imports", "rouge_score"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "missing packages: rouge-score" in proc.stderr
    assert "Traceback" not in proc.stderr
