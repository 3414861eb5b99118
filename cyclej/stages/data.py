"""The `data` stage: both domains' corpora, cleaned, split and counted.

For each domain, in this order:
1. read the train (and dev) files (cyclej/corpora/lines.py refuses missing, empty,
   binary and non-UTF-8 files);
2. normalize whitespace (every run of whitespace, newlines included, becomes one space; ends stripped);
3. drop empty lines, then duplicates (the first occurrence stays), then dev lines that are also train lines;
4. drop lines that occur in both domains, from both (a style transfer pair cannot be its own target);
5. drop lines longer than `data.max_tokens` tokens of the base model's tokenizer;
6. without dev files, move a seeded sample of `dev_fraction` of the lines (at most `dev_max_lines`) to dev;
7. cap train at `max_train_lines` and dev at `dev_max_lines` (seeded samples, file order kept).

Every drop is counted in `stats.json`. Refused with a one-line BadInput naming the files: the same file
(by content) in both domains, two domains with the same lines, fewer clean lines than `data.min_lines`,
fewer train lines than one training batch.

Artifact: ``a/train.txt a/dev.txt b/train.txt b/dev.txt`` (one line each, UTF-8) and ``stats.json``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from cyclej.config import DOMAIN_KEYS, DomainConfig, DomainKey, PipelineConfig
from cyclej.corpora.lines import FileText, Split, read_corpus
from cyclej.errors import BadInput
from cyclej.models.catalog import load_tokenizer
from cyclej.pipeline.registry import StageRun
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef

log = logging.getLogger("cyclej")

_TOKENIZE_BATCH = 1024


@dataclass
class _Domain:
    """One domain while it is being cleaned: its lines per split and the counts of what was dropped."""

    key: DomainKey
    cfg: DomainConfig
    train_files: list[FileText]
    dev_files: list[FileText]
    train: list[str] = field(default_factory=list)
    dev: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"domain_{self.key}"

    def files(self, split: Split = "train") -> str:
        """The files of a split, for messages (the first three, then how many more)."""
        paths = [str(f.path) for f in (self.train_files if split == "train" else self.dev_files)]
        more = f" +{len(paths) - 3} more" if len(paths) > 3 else ""
        return ", ".join(paths[:3]) + more


def normalize_whitespace(text: str) -> str:
    """Every run of whitespace (newlines and Unicode spaces included) becomes one space; ends stripped."""
    return " ".join(text.split())


def run_data(run: StageRun) -> ArtifactRef:
    cfg = run.cfg
    domains = clean_corpora(cfg, load_tokenizer(cfg.models.base), run.progress)
    out = run.workdir
    for d in domains:
        (out / d.key).mkdir(parents=True, exist_ok=True)
        for split, lines in (("train", d.train), ("dev", d.dev)):
            (out / d.key / f"{split}.txt").write_text(
                "".join(f"{line}\n" for line in lines), encoding="utf-8"
            )
    stats: dict[str, Any] = {
        "tokenizer": cfg.models.base,
        "max_tokens": cfg.data.max_tokens,
        **{d.key: {"name": d.cfg.name, **d.stats} for d in domains},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True), encoding="utf-8")
    metrics = {
        f"{d.key}_{split}_lines": len(getattr(d, split)) for d in domains for split in ("train", "dev")
    }
    return run.commit(summary=metrics)


def clean_corpora(cfg: PipelineConfig, tokenizer: Any | None, progress: Progress) -> list[_Domain]:
    """Steps 1-7 of the module docstring for both domains, with every refusal; `cyclej validate` runs
    exactly this. Without a `tokenizer` (the base model's is not on this machine) lengths are not checked.
    """
    data = cfg.data
    domains = [_read_domain(key, cfg) for key in DOMAIN_KEYS]
    _refuse_shared_files(*domains)

    for d in domains:
        d.train = _clean_split(d, "train", [line for f in d.train_files for line in f.lines])
        if d.dev_files:
            d.dev = _clean_split(d, "dev", [line for f in d.dev_files for line in f.lines])
            in_train = set(d.train)
            kept = [line for line in d.dev if line not in in_train]
            d.stats["dev"]["in_train"] = len(d.dev) - len(kept)
            d.dev = kept

    _drop_cross_domain(*domains)

    for d in domains:
        if tokenizer is None:
            continue
        d.train = _drop_too_long(d, "train", d.train, tokenizer, data.max_tokens, progress)
        if d.dev_files:
            d.dev = _drop_too_long(d, "dev", d.dev, tokenizer, data.max_tokens, progress)

    batch = max(cfg.para_train.batch_size, cfg.domain_train.batch_size)
    for d in domains:
        clean = len(d.train)
        if clean < data.min_lines:
            raise BadInput(
                f"{d.label}.train ({d.files()}): {clean} clean lines, fewer than "
                f"data.min_lines={data.min_lines} (dropped: {_drop_summary(d.stats['train'])}); "
                "add text or lower data.min_lines"
            )
        rng = random.Random(f"{data.seed}:{d.key}")
        if d.dev_files:
            if not d.dev:
                raise BadInput(
                    f"{d.label}.dev ({d.files('dev')}): no clean lines left (dropped: "
                    f"{_drop_summary(d.stats['dev'])}); give other dev text or none (a slice of train is "
                    "held out)"
                )
            d.dev, d.stats["dev"]["capped"] = _sample(d.dev, data.dev_max_lines, rng)
        else:
            n_dev = min(data.dev_max_lines, max(1, round(data.dev_fraction * clean)))
            d.dev, d.train = _split_off(d.train, n_dev, rng)
            d.stats["train"]["to_dev"] = n_dev
            d.stats["dev"] = {"source": "split", "raw": n_dev}
        if data.max_train_lines is not None:
            d.train, d.stats["train"]["capped"] = _sample(d.train, data.max_train_lines, rng)
        if len(d.train) < batch:
            raise BadInput(
                f"{d.label}.train ({d.files()}): {len(d.train)} train lines after cleaning, fewer than one "
                f"training batch ({batch}); add text or lower para_train/domain_train.batch_size"
            )
        d.stats["train"]["kept"] = len(d.train)
        d.stats["dev"]["kept"] = len(d.dev)

    return domains


# ---- steps ----------------------------------------------------------------------------------------
def _read_domain(key: DomainKey, cfg: PipelineConfig) -> _Domain:
    dcfg: DomainConfig = getattr(cfg, f"domain_{key}")
    limit = cfg.data.max_bad_utf8_fraction
    train = read_corpus(dcfg.train, dcfg.text_field, limit, f"domain_{key}.train")
    dev = read_corpus(dcfg.dev, dcfg.text_field, limit, f"domain_{key}.dev") if dcfg.dev else []
    d = _Domain(key, dcfg, train, dev)
    d.stats["files"] = {"train": [str(f.path) for f in train], "dev": [str(f.path) for f in dev]}
    d.stats["train"] = {"bad_utf8": sum(f.bad_utf8_lines for f in train), "to_dev": 0, "capped": 0}
    d.stats["dev"] = {"source": "files", "bad_utf8": sum(f.bad_utf8_lines for f in dev)} if dev else {}
    return d


def _refuse_shared_files(a: _Domain, b: _Domain) -> None:
    """The same file (by content, wherever it lives) in both domains is a configuration mistake."""
    seen = {f.sha256: f.path for f in a.train_files + a.dev_files}
    for f in b.train_files + b.dev_files:
        if f.sha256 in seen:
            raise BadInput(
                f"domain_a and domain_b: {seen[f.sha256]} and {f.path} are the same file (identical "
                "content); give each domain its own text"
            )


def _clean_split(d: _Domain, split: Split, lines: list[str]) -> list[str]:
    """Normalize whitespace, drop empty lines and duplicates; counts go to d.stats[split]."""
    stats = d.stats[split]
    stats["raw"] = len(lines)
    normalized = [normalize_whitespace(line) for line in lines]
    stats["whitespace_normalized"] = sum(
        1 for old, new in zip(lines, normalized, strict=True) if old != new and new
    )
    non_empty = [line for line in normalized if line]
    stats["empty"] = len(normalized) - len(non_empty)
    unique = list(dict.fromkeys(non_empty))
    stats["duplicates"] = len(non_empty) - len(unique)
    return unique


def _drop_cross_domain(a: _Domain, b: _Domain) -> None:
    """Lines in both domains say nothing about either: drop them from both, and warn with the count."""
    lines_a, lines_b = set(a.train) | set(a.dev), set(b.train) | set(b.dev)
    if lines_a == lines_b:
        raise BadInput(
            f"domain_a ({a.files()}) and domain_b ({b.files()}) hold the same lines; give two different "
            "domains"
        )
    shared = lines_a & lines_b
    for d in (a, b):
        for split in ("train", "dev"):
            lines = getattr(d, split)
            kept = [line for line in lines if line not in shared]
            if split == "train" or d.dev_files:
                d.stats[split]["in_other_domain"] = len(lines) - len(kept)
            setattr(d, split, kept)
    if shared:
        log.warning(
            "data: %d lines occur in both domains (%s, %s); dropped from both",
            len(shared),
            a.files(),
            b.files(),
        )


def _drop_too_long(
    d: _Domain, split: Split, lines: list[str], tokenizer: Any, max_tokens: int, progress: Progress
) -> list[str]:
    """Drop lines of more than `max_tokens` base-model tokens (special-token text counts as plain text,
    as cyclej.corpora.formats tokenizes it)."""
    kept: list[str] = []
    with progress.bar(f"{d.label}.{split}: token lengths", len(lines), unit="line") as bar:
        for start in range(0, len(lines), _TOKENIZE_BATCH):
            chunk = lines[start : start + _TOKENIZE_BATCH]
            ids = tokenizer(chunk, add_special_tokens=False, split_special_tokens=True, verbose=False)[
                "input_ids"
            ]
            kept.extend(line for line, toks in zip(chunk, ids, strict=True) if len(toks) <= max_tokens)
            bar.update(len(chunk))
    d.stats[split]["too_long"] = len(lines) - len(kept)
    return kept


def _split_off(lines: list[str], n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(held-out, rest): a seeded sample of n lines, both parts in their original order."""
    picked = set(rng.sample(range(len(lines)), n))
    return [x for i, x in enumerate(lines) if i in picked], [
        x for i, x in enumerate(lines) if i not in picked
    ]


def _sample(lines: list[str], cap: int, rng: random.Random) -> tuple[list[str], int]:
    """At most `cap` lines (a seeded sample in original order) and how many were left out."""
    if len(lines) <= cap:
        return lines, 0
    kept, _ = _split_off(lines, cap, rng)
    return kept, len(lines) - cap


def _drop_summary(stats: dict[str, Any]) -> str:
    keys = ("empty", "duplicates", "in_train", "in_other_domain", "too_long")
    return ", ".join(f"{stats[k]} {k.replace('_', ' ')}" for k in keys if stats.get(k)) or "none"
