"""Reading a domain's corpus: files or folders of .txt, .jsonl, .csv and .parquet, into lines of text.

What counts as a line:
- ``.txt`` (and any explicitly named file with another suffix, e.g. ``train.0``): one text per line;
- ``.jsonl``: one JSON object per line, its ``text_field`` is the text;
- ``.csv``: a header row, the ``text_field`` column is the text;
- ``.parquet``: the ``text_field`` column.

A folder stands for every supported file inside it (recursively, hidden files skipped), sorted by path.

Bad input is refused with a one-line `BadInput` naming the file and what to do: a missing file, an empty
file, a binary file, a jsonl line or csv/parquet table without the text field, and more than
`max_bad_utf8_fraction` of a file's lines with bytes that are not UTF-8. Fewer invalid lines than that
are decoded with U+FFFD replacement characters and counted. Cleaning (whitespace, duplicates, length)
is the `data` stage's job, not this module's; `read_lines` reads what that stage wrote (every later stage
and `cyclej eval` read their lines through it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from cyclej.config import DOMAIN_KEYS, DomainKey
from cyclej.errors import BadInput, first_line

if TYPE_CHECKING:  # read_lines only calls the store it is handed
    from cyclej.runtime.store import ArtifactRef, ArtifactStore

Split = Literal["train", "dev"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".csv", ".parquet")
# Bytes that never occur in text (NUL aside, checked on its own): C0 controls but \t \n \v \f \r, and DEL.
_CONTROL_BYTES = frozenset(set(range(0x00, 0x09)) | set(range(0x0E, 0x20)) | {0x7F})
_BINARY_SAMPLE = 64 * 1024
_BINARY_CONTROL_FRACTION = 0.10


@dataclass(frozen=True)
class FileText:
    """The texts of one corpus file, in file order (empty strings included: the data stage counts them)."""

    path: Path
    lines: list[str]
    bad_utf8_lines: int  # lines that held invalid UTF-8 and were decoded with replacement characters
    sha256: str  # of the file's bytes: the same file given for both domains is caught by content


def corpus_files(spec: str, what: str) -> list[Path]:
    """The files a corpus entry stands for: the file itself, or a folder's supported files, sorted."""
    if "://" in spec:
        raise BadInput(f"{what}: {spec}: corpora must be local files or folders; copy it to local disk first")
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        found = sorted(
            q
            for q in p.rglob("*")
            if q.is_file()
            and q.suffix.lower() in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in q.relative_to(p).parts)
        )
        if not found:
            raise BadInput(
                f"{what}: folder {p} holds no {'/'.join(SUPPORTED_SUFFIXES)} files; point at the files "
                "themselves"
            )
        return found
    raise BadInput(f"{what}: {p}: no such file or folder; check the path in the config")


def read_corpus(specs: list[str], text_field: str, max_bad_utf8_fraction: float, what: str) -> list[FileText]:
    """Every file of a corpus (a list of files or folders), read and checked. `what` names the config
    entry in messages, e.g. 'domain_a.train'."""
    out: list[FileText] = []
    for spec in specs:
        for path in corpus_files(spec, what):
            out.append(read_file(path, text_field, max_bad_utf8_fraction, what))
    return out


def read_file(path: Path, text_field: str, max_bad_utf8_fraction: float, what: str = "corpus") -> FileText:
    """One corpus file's texts. Raises BadInput naming the file when it cannot be used."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{what}: {path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    digest = hashlib.sha256(raw).hexdigest()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        lines, bad = _parquet_texts(path, text_field, what)
        _refuse_bad_utf8(path, bad, len(lines), max_bad_utf8_fraction, what)
    else:
        _refuse_binary(path, raw, what)
        physical, bad = _decode_lines(raw)
        _refuse_bad_utf8(path, bad, len(physical), max_bad_utf8_fraction, what)
        if suffix == ".jsonl":
            lines = _jsonl_texts(path, physical, text_field, what)
        elif suffix == ".csv":
            lines = _csv_texts(path, physical, text_field, what)
        else:
            lines = physical
    if not any(line.strip() for line in lines):
        raise BadInput(f"{what}: {path} is empty (no text lines); remove it from the corpus or add text")
    return FileText(path, lines, bad, digest)


# ---- checks ---------------------------------------------------------------------------------------
def _refuse_binary(path: Path, raw: bytes, what: str) -> None:
    """NUL bytes, or many control bytes near the start, mean this is not a text file (or is UTF-16)."""
    if b"\x00" in raw:
        raise BadInput(
            f"{what}: {path} is a binary file (it contains NUL bytes; UTF-16 text too): give UTF-8 text"
        )
    sample = raw[:_BINARY_SAMPLE]
    if sample:
        controls = sum(1 for b in sample if b in _CONTROL_BYTES)
        if controls / len(sample) > _BINARY_CONTROL_FRACTION:
            raise BadInput(
                f"{what}: {path} is a binary file ({controls / len(sample):.0%} control bytes): give UTF-8 "
                "text"
            )


def _refuse_bad_utf8(path: Path, bad: int, total: int, max_fraction: float, what: str) -> None:
    if total and bad / total > max_fraction:
        raise BadInput(
            f"{what}: {path}: {bad} of {total} lines ({bad / total:.1%}) are not valid UTF-8, more than "
            f"data.max_bad_utf8_fraction={max_fraction:g}; re-encode the file as UTF-8"
        )


def _decode_lines(raw: bytes) -> tuple[list[str], int]:
    """Physical lines (\\n or \\r\\n), decoded as UTF-8; invalid bytes become U+FFFD and their lines
    are counted."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    chunks = raw.split(b"\n")
    if chunks and chunks[-1] == b"":
        chunks.pop()  # the newline that ends the last line does not start another
    lines: list[str] = []
    bad = 0
    for chunk in chunks:
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(chunk.decode("utf-8", errors="replace"))
            bad += 1
    return lines, bad


# ---- formats --------------------------------------------------------------------------------------
def _jsonl_texts(path: Path, physical: list[str], field: str, what: str) -> list[str]:
    texts: list[str] = []
    for lineno, line in enumerate(physical, start=1):
        if not line.strip():
            texts.append("")
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise BadInput(
                f"{what}: {path}:{lineno}: not valid JSON ({cast(json.JSONDecodeError, exc).msg}); one "
                "object per line"
            ) from None
        if not isinstance(obj, dict) or field not in obj:
            raise BadInput(
                f"{what}: {path}:{lineno}: no '{field}' field; set the domain's text_field to the field "
                "that holds the text"
            )
        value = obj[field]
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise BadInput(f"{what}: {path}:{lineno}: field '{field}' is a {type(value).__name__}, not text")
        texts.append(value)
    return texts


def _csv_texts(path: Path, physical: list[str], field: str, what: str) -> list[str]:
    reader = csv.DictReader(io.StringIO("\n".join(physical), newline=""))
    try:
        columns = reader.fieldnames or []
        if field not in columns:
            shown = ", ".join(columns[:8]) or "none"
            raise BadInput(
                f"{what}: {path}: no '{field}' column (columns: {shown}); set the domain's text_field"
            )
        return [row.get(field) or "" for row in reader]
    except csv.Error as exc:
        raise BadInput(f"{what}: {path}:{reader.line_num}: not valid CSV ({exc})") from None


def _parquet_texts(path: Path, field: str, what: str) -> tuple[list[str], int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise BadInput(f"{what}: {path}: not a readable parquet file ({first_line(exc, 120)})") from None
    names = pf.schema_arrow.names
    if field not in names:
        shown = ", ".join(names[:8]) or "none"
        raise BadInput(f"{what}: {path}: no '{field}' column (columns: {shown}); set the domain's text_field")
    try:
        column = pf.read(columns=[field]).column(field)
    except (pa.ArrowException, OSError) as exc:
        raise BadInput(f"{what}: {path}: cannot read column '{field}' ({first_line(exc, 120)})") from None
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return [v or "" for v in column.to_pylist()], 0
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        texts, bad = [], 0
        for v in column.to_pylist():
            try:
                texts.append((v or b"").decode("utf-8"))
            except UnicodeDecodeError:
                texts.append(v.decode("utf-8", errors="replace"))
                bad += 1
        return texts, bad
    raise BadInput(f"{what}: {path}: column '{field}' holds {kind}, not text")


# ---- the data stage's output --------------------------------------------------------------------
def read_lines(store: ArtifactStore, ref: ArtifactRef, domain: DomainKey, split: Split) -> list[str]:
    """The cleaned lines of one domain's split from a committed `data` artifact."""
    if domain not in DOMAIN_KEYS or split not in ("train", "dev"):
        raise ValueError(f"domain must be 'a' or 'b' and split 'train' or 'dev', got {domain!r}, {split!r}")
    text = (store.fetch(ref) / domain / f"{split}.txt").read_text(encoding="utf-8")
    # split("\n"), not splitlines(): a line may hold characters splitlines() treats as breaks.
    return text.split("\n")[:-1] if text else []
