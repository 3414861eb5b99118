"""cyclej.runtime.jsonl: the logs and shards the stages write and read back."""

from __future__ import annotations

from pathlib import Path

from cyclej.runtime.jsonl import read_jsonl, write_jsonl


def test_write_then_read_round_trips_in_order(tmp_path: Path) -> None:
    rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(5)]
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    assert not list(tmp_path.glob("*.tmp"))  # written beside it, then renamed


def test_a_missing_file_is_no_records_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "absent.jsonl") == []
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")  # killed mid-write
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
