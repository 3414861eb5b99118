"""The `data` stage and the corpus reader: every bad input refused with the file named, every kind of
drop counted exactly, on real files and a real local artifact store."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cyclej.config import PipelineConfig
from cyclej.corpora.lines import read_corpus, read_file, read_lines
from cyclej.errors import BadInput
from cyclej.models.catalog import load_tokenizer
from cyclej.pipeline.registry import StageRun, stage_fingerprint
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactStore
from cyclej.stages.data import normalize_whitespace, run_data

MAX_TOKENS = 12
LONG = " ".join(["extraordinarily"] * 10)  # far more than MAX_TOKENS tokens


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def _config(tmp_path: Path, a_train: list[str], b_train: list[str], **over: Any) -> PipelineConfig:
    data = {
        "max_tokens": MAX_TOKENS,
        "min_lines": 8,
        "dev_fraction": 0.1,
        "dev_max_lines": 3,
        "max_bad_utf8_fraction": 0.05,
        **over.pop("data", {}),
    }
    train = {"batch_size": 4, "micro_batch_size": 2}
    cfg = {
        "storage": {"root": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "domain_a": {"name": "neg", "marker": "<|A|>", "train": a_train, **over.pop("domain_a", {})},
        "domain_b": {"name": "pos", "marker": "<|B|>", "train": b_train, **over.pop("domain_b", {})},
        "models": {"base": "tiny-gptj"},
        "data": data,
        "para_train": train,
        "domain_train": train,
        **over,
    }
    return PipelineConfig.model_validate(cfg)


def _run(cfg: PipelineConfig):  # type: ignore[no-untyped-def]
    store = ArtifactStore.from_config(cfg.storage)
    return store, run_data(StageRun.start("data", cfg, {}, store, Progress(show_bar=False)))


def _lines(prefix: str, n: int) -> list[str]:
    return [f"{prefix} line {i}" for i in range(n)]


# ---- a full run with every kind of drop -----------------------------------------------------------
def test_run_data_counts_every_drop_exactly(tmp_path: Path, project_log: list[logging.LogRecord]) -> None:
    tok = load_tokenizer("tiny-gptj")
    a_lines = _lines("bad", 20) + [
        "bad line 3",  # duplicate
        "  bad   line\t5 ",  # duplicate once whitespace is normalized
        "",  # empty
        "   \t ",  # empty after normalization
        LONG,  # too long
        "shared text one",  # in both domains
        "shared text two",  # in both domains
        "spaced    out   text",  # kept, normalized
    ]
    a_file = _write(tmp_path / "a" / "train.txt", a_lines)
    with open(a_file, "ab") as f:
        f.write(b"caf\xe9 was awful\n")  # latin-1 byte: replaced and counted (1 of 29 lines < 5 %)
    b_train = _lines("good", 15) + [
        "shared text one",
        "shared text two",
        "good " + LONG,
        LONG + " again",
        "good line 1",
    ]
    b_dev = [{"text": "good dev 0"}, {"text": "good dev 1"}, {"text": "good line 2"}, {"text": "good dev 0"}]
    _write(tmp_path / "b" / "train.txt", b_train)
    _write(tmp_path / "b" / "dev.jsonl", [json.dumps(o) for o in b_dev])
    short = [normalize_whitespace(x) for x in a_lines + b_train if LONG not in x]
    assert all(len(tok(x)["input_ids"]) <= MAX_TOKENS for x in short)

    cfg = _config(
        tmp_path,
        [str(a_file)],
        [str(tmp_path / "b" / "train.txt")],
        domain_b={"dev": [str(tmp_path / "b" / "dev.jsonl")]},
    )
    store, ref = _run(cfg)
    assert any(
        "2 lines occur in both domains" in r.getMessage() and r.levelno == logging.WARNING
        for r in project_log
    )
    assert ref.fingerprint == stage_fingerprint("data", cfg, {})
    assert store.exists("data", ref.fingerprint)
    stats = json.loads((store.fetch(ref) / "stats.json").read_text())

    # A: 29 raw lines; 20 + "spaced out text" + "café was awful" = 22 clean; 10 % → 2 to dev, 20 train
    assert stats["a"]["train"] == {
        "raw": 29,
        "bad_utf8": 1,
        "whitespace_normalized": 2,
        "empty": 2,
        "duplicates": 2,
        "in_other_domain": 2,
        "too_long": 1,
        "to_dev": 2,
        "capped": 0,
        "kept": 20,
    }
    assert stats["a"]["dev"] == {"source": "split", "raw": 2, "kept": 2}
    # B: 20 raw train lines: 15 + shared 2 + 2 long + a duplicate → 15 train; dev from its file
    assert stats["b"]["train"] == {
        "raw": 20,
        "bad_utf8": 0,
        "whitespace_normalized": 0,
        "empty": 0,
        "duplicates": 1,
        "in_other_domain": 2,
        "too_long": 2,
        "to_dev": 0,
        "capped": 0,
        "kept": 15,
    }
    assert stats["b"]["dev"] == {
        "source": "files",
        "raw": 4,
        "bad_utf8": 0,
        "whitespace_normalized": 0,
        "empty": 0,
        "duplicates": 1,
        "in_train": 1,
        "in_other_domain": 0,
        "too_long": 0,
        "capped": 0,
        "kept": 2,
    }
    assert stats["a"]["name"] == "neg" and stats["max_tokens"] == MAX_TOKENS

    a_train, a_dev = read_lines(store, ref, "a", "train"), read_lines(store, ref, "a", "dev")
    assert len(a_train) == 20 and len(a_dev) == 2
    assert set(a_train) | set(a_dev) == set(_lines("bad", 20)) | {"spaced out text", "caf\ufffd was awful"}
    assert not set(a_train) & set(a_dev)
    assert a_train == sorted(
        a_train, key=(_lines("bad", 20) + ["spaced out text", "caf\ufffd was awful"]).index
    )
    assert read_lines(store, ref, "b", "dev") == ["good dev 0", "good dev 1"]
    assert read_lines(store, ref, "b", "train") == _lines("good", 15)
    assert ref.metrics == {"a_train_lines": 20, "a_dev_lines": 2, "b_train_lines": 15, "b_dev_lines": 2}

    # Same config, another store: the same bytes (seeded split), the same fingerprint.
    cfg2 = cfg.model_copy(
        update={"storage": cfg.storage.model_copy(update={"root": str(tmp_path / "store2")})}
    )
    store2, ref2 = _run(cfg2)
    assert ref2.fingerprint == ref.fingerprint
    assert read_lines(store2, ref2, "a", "dev") == a_dev


def test_run_data_caps_train_and_given_dev(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.txt", _lines("bad", 40))
    a_dev = _write(tmp_path / "a_dev.txt", _lines("bad dev", 10))
    b = _write(tmp_path / "b.txt", _lines("good", 40))
    cfg = _config(
        tmp_path,
        [str(a)],
        [str(b)],
        data={"max_train_lines": 12, "dev_max_lines": 4},
        domain_a={"dev": [str(a_dev)]},
    )
    store, ref = _run(cfg)
    stats = json.loads((store.fetch(ref) / "stats.json").read_text())
    assert stats["a"]["train"]["capped"] == 28 and stats["a"]["train"]["kept"] == 12
    assert stats["a"]["dev"]["capped"] == 6 and stats["a"]["dev"]["kept"] == 4
    # B: 10 % of 40 → 4 held out, then 36 train lines capped to 12
    assert stats["b"]["train"]["to_dev"] == 4 and stats["b"]["train"]["capped"] == 24
    assert len(read_lines(store, ref, "b", "train")) == 12
    assert set(read_lines(store, ref, "a", "dev")) <= set(_lines("bad dev", 10))


def test_run_data_reads_folders_of_every_format(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    _write(folder / "1.txt", _lines("txt", 4))
    _write(folder / "2.jsonl", [json.dumps({"body": t, "id": i}) for i, t in enumerate(_lines("json", 4))])
    with open(folder / "3.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        w.writerows([[i, t] for i, t in enumerate(_lines("csv", 3))] + [[9, "csv with\nnewline"]])
    pq.write_table(pa.table({"body": _lines("pq", 4)}), folder / "4.parquet")
    _write(folder / ".hidden" / "x.txt", ["never read"])
    (folder / "notes.md").write_text("not a corpus file")
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    cfg = _config(
        tmp_path, [str(folder)], [str(b)], domain_a={"text_field": "body"}, domain_b={"text_field": "body"}
    )
    store, ref = _run(cfg)
    every = read_lines(store, ref, "a", "train") + read_lines(store, ref, "a", "dev")
    want = _lines("txt", 4) + _lines("json", 4) + _lines("csv", 3) + ["csv with newline"] + _lines("pq", 4)
    assert sorted(every) == sorted(want)
    stats = json.loads((store.fetch(ref) / "stats.json").read_text())
    assert [Path(p).name for p in stats["a"]["files"]["train"]] == ["1.txt", "2.jsonl", "3.csv", "4.parquet"]


def test_normalize_whitespace() -> None:
    assert normalize_whitespace(" a\tb \u00a0 c\u2028d\r\n") == "a b c d"


# ---- bad input: each refused with one line naming the file ----------------------------------------
def _refused(cfg: PipelineConfig, *names: str) -> str:
    with pytest.raises(BadInput) as info:
        _run(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    cfg = _config(tmp_path, [str(tmp_path / "nope.txt")], [str(b)])
    assert "no such file" in _refused(cfg, "nope.txt", "domain_a.train")


def test_empty_file(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.txt", ["", "   ", ""])
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    assert "is empty" in _refused(_config(tmp_path, [str(a)], [str(b)]), "a.txt")
    (tmp_path / "zero.txt").write_bytes(b"")
    assert "is empty" in _refused(
        _config(tmp_path, [str(b)], [str(tmp_path / "zero.txt")]), "zero.txt", "domain_b"
    )


def test_binary_files(tmp_path: Path) -> None:
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    nul = tmp_path / "model.bin"
    nul.write_bytes(b"text at first\n" + bytes(range(256)) * 4)
    assert "binary" in _refused(_config(tmp_path, [str(nul)], [str(b)]), "model.bin")
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("\n".join(_lines("bad", 20)), encoding="utf-16")
    assert "binary" in _refused(_config(tmp_path, [str(utf16)], [str(b)]), "utf16.txt")
    controls = tmp_path / "controls.txt"
    controls.write_bytes(b"\x01\x02\x03\x04ab\x05\x06\n" * 50)
    assert "control bytes" in _refused(_config(tmp_path, [str(controls)], [str(b)]), "controls.txt")


def test_too_many_non_utf8_lines(tmp_path: Path) -> None:
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(
        "\n".join(f"caf\xe9 number {i}" if i < 3 else f"ok {i}" for i in range(20)).encode("latin-1")
    )
    msg = _refused(
        _config(tmp_path, [str(latin)], [str(b)]), "latin1.txt", "3 of 20", "max_bad_utf8_fraction"
    )
    assert "UTF-8" in msg
    # under the limit: replaced and counted, not refused
    got = read_file(latin, "text", 0.2)
    assert got.bad_utf8_lines == 3 and got.lines[0] == "caf\ufffd number 0"


def test_jsonl_without_the_field_or_not_json(tmp_path: Path) -> None:
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    j = _write(tmp_path / "a.jsonl", [json.dumps({"text": "x"}), json.dumps({"body": "y"})])
    assert "no 'text' field" in _refused(_config(tmp_path, [str(j)], [str(b)]), "a.jsonl:2")
    j2 = _write(tmp_path / "a2.jsonl", [json.dumps({"text": "x"}), "{not json"])
    assert "not valid JSON" in _refused(_config(tmp_path, [str(j2)], [str(b)]), "a2.jsonl:2")
    j3 = _write(tmp_path / "a3.jsonl", [json.dumps({"text": 5})])
    assert "int" in _refused(_config(tmp_path, [str(j3)], [str(b)]), "a3.jsonl:1")


def test_csv_and_parquet_without_the_column(tmp_path: Path) -> None:
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    c = _write(tmp_path / "a.csv", ["id,body", "1,hello"])
    assert "no 'text' column" in _refused(_config(tmp_path, [str(c)], [str(b)]), "a.csv", "body")
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), p)
    assert "no 'text' column" in _refused(_config(tmp_path, [str(p)], [str(b)]), "a.parquet")
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    assert "parquet" in _refused(_config(tmp_path, [str(bad)], [str(b)]), "broken.parquet")


def test_folder_without_supported_files(tmp_path: Path) -> None:
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("hello")
    assert "holds no" in _refused(_config(tmp_path, [str(tmp_path / "docs")], [str(b)]), "docs")


def test_same_file_for_both_domains(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.txt", _lines("text", 20))
    copy = _write(tmp_path / "elsewhere" / "copy.txt", _lines("text", 20))
    msg = _refused(_config(tmp_path, [str(a)], [str(copy)]), "a.txt", "copy.txt", "same file")
    assert "domain_a" in msg and "domain_b" in msg


def test_identical_domains_in_different_files(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.txt", _lines("text", 20))
    b = _write(tmp_path / "b.txt", list(reversed(_lines("text", 20))) + ["text line 3"])
    assert "same lines" in _refused(_config(tmp_path, [str(a)], [str(b)]), "a.txt", "b.txt")


def test_too_few_lines_and_fewer_than_a_batch(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.txt", _lines("bad", 5) + ["bad line 1"] * 10)
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    msg = _refused(_config(tmp_path, [str(a)], [str(b)]), "a.txt", "min_lines=8", "10 duplicates")
    assert "5 clean lines" in msg
    # 9 clean lines ≥ min_lines 8, but 9 − 1 dev line = 8 train lines < a batch of 16
    a2 = _write(tmp_path / "a2.txt", _lines("bad", 9))
    big = {"batch_size": 16, "micro_batch_size": 4}
    cfg = _config(tmp_path, [str(a2)], [str(b)], para_train=big)
    assert "batch (16)" in _refused(cfg, "a2.txt", "8 train lines")


def test_dev_file_with_nothing_new(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.txt", _lines("bad", 20))
    a_dev = _write(tmp_path / "a_dev.txt", _lines("bad", 3))
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    cfg = _config(tmp_path, [str(a)], [str(b)], domain_a={"dev": [str(a_dev)]})
    assert "3 in train" in _refused(cfg, "domain_a.dev", "a_dev.txt")


def test_read_corpus_names_the_config_entry(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"^domain_b\.dev: .*gone\.txt: no such file"):
        read_corpus([str(tmp_path / "gone.txt")], "text", 0.01, "domain_b.dev")


def test_run_data_on_s3_and_read_back_from_another_machine(tmp_path: Path, s3_bucket: str) -> None:
    """The artifact lands in a real S3 endpoint (moto on loopback); a store with an empty cache reads it."""
    a = _write(tmp_path / "a.txt", _lines("bad", 20))
    b = _write(tmp_path / "b.txt", _lines("good", 20))
    cfg = _config(
        tmp_path, [str(a)], [str(b)], storage={"root": f"{s3_bucket}/runs", "cache_dir": str(tmp_path / "c1")}
    )
    store, ref = _run(cfg)
    assert ref.uri.startswith("s3://")
    other = ArtifactStore.from_config(cfg.storage.model_copy(update={"cache_dir": str(tmp_path / "c2")}))
    assert other.exists("data", ref.fingerprint)
    lines = read_lines(other, ref, "b", "train") + read_lines(other, ref, "b", "dev")
    assert sorted(lines) == sorted(_lines("good", 20))
    assert json.loads(other.read_text(ref, "stats.json"))["b"]["train"]["to_dev"] == 2
