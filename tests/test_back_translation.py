"""para_train's back-translation phase: which rewrites become pairs, and the two-phase stage on the tiny
preset (real stages, real trainer, no Prefect), interrupted in phase 2 and resumed to the same adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cyclej.config import DomainKey, load_config
from cyclej.generation.back_translation import REASONS, BackTranslation, filter_rewrites, pick_lines
from cyclej.pipeline.registry import fingerprints, run_all
from cyclej.runtime.faults import InjectedError
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactStore, checkpoint_series

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

POSITIVE_WORDS = {"great", "friendly", "clean"}


def _in_domain(texts: list[str], domain: DomainKey) -> list[float]:
    positive = [any(w in POSITIVE_WORDS for w in t.split()) for t in texts]
    return [1.0 if p == (domain == "b") else 0.0 for p in positive]


def _word_overlap(lines: list[str], outs: list[str]) -> list[float]:
    return [
        len(set(a.split()) & set(b.split())) / max(len(set(a.split())), 1)
        for a, b in zip(lines, outs, strict=True)
    ]


def test_only_flips_that_stay_on_topic_become_pairs() -> None:
    lines: dict[DomainKey, list[str]] = {
        "a": [
            "the soup was awful .",
            "the staff was rude .",
            "the room was dirty .",
            "awful pizza .",
            "rude staff at the door .",
            "cold fries .",
        ],
        "b": ["the soup was great ."],
    }
    rewrites: dict[DomainKey, list[tuple[str, bool]]] = {
        "a": [
            ("the soup was great .", False),  # kept
            ("The staff was RUDE .", False),  # a copy (case and spacing aside)
            ("", False),  # empty
            ("great great great great", True),  # ran to the limit
            ("rude staff at the door !", False),  # still negative
            ("great weather in paris today", False),  # positive but off topic
        ],
        "b": [("the soup was awful .", False)],
    }
    pairs, stats = filter_rewrites(lines, rewrites, _in_domain, _word_overlap, min_similarity=0.5)
    assert [(p.domain, p.line, p.rewrite) for p in pairs] == [
        ("a", "the soup was awful .", "the soup was great ."),
        ("b", "the soup was great .", "the soup was awful ."),
    ]
    assert stats["a->b"] == {
        "translated": 6,
        "kept": 1,
        "rejected_empty": 1,
        "rejected_runaway": 1,
        "rejected_copy": 1,
        "rejected_style": 1,
        "rejected_similarity": 1,
    }
    assert set(REASONS) == {k.removeprefix("rejected_") for k in stats["b->a"] if k.startswith("rejected_")}


def test_lines_are_a_seeded_sample_of_distinct_train_lines() -> None:
    train: dict[DomainKey, list[str]] = {"a": ["x", "y", "x", " ", "z"], "b": [f"b{i}" for i in range(50)]}
    picked = pick_lines(train, 10, seed=3)
    assert sorted(picked["a"]) == ["x", "y", "z"]
    assert len(picked["b"]) == 10 == len(set(picked["b"]))
    assert pick_lines(train, 10, seed=3) == picked != pick_lines(train, 10, seed=4)


def test_checkpoint_series_keeps_the_phases_apart() -> None:
    assert checkpoint_series("step-00000012") == "step-"
    assert checkpoint_series("bt-step-00000040") == "bt-step-"
    assert checkpoint_series("bt-pairs") == "bt-pairs"


BT = [
    "para_train.back_translation.lines_per_domain=12",
    "para_train.back_translation.steps=4",
    "para_train.back_translation.min_similarity=-1.0",
    "para_train.back_translation.max_new_tokens=12",
]
# Pairs as a model that can transfer would make them (the tiny random model's rewrites all run away).
SEEDED = [
    BackTranslation("a", "the soup was awful .", "the soup was great .", 0.9),
    BackTranslation("a", "rude staff .", "friendly staff .", 0.8),
    BackTranslation("b", "the room was clean .", "the room was dirty .", 0.9),
]


def _seed_pairs(store: ArtifactStore, fp: str) -> None:
    """Checkpoint `bt-pairs` as a first try would have left it."""
    d = store.checkpoint_workdir("para_train", fp, "bt-pairs")
    (d / "back_translation_pairs.jsonl").write_text("".join(json.dumps(p.as_json()) + "\n" for p in SEEDED))
    (d / "stats.json").write_text(json.dumps({"a->b": {"kept": 2}, "b->a": {"kept": 1}}))
    store.save_checkpoint("para_train", fp, "bt-pairs", d)


def test_back_translation_phase_rewrites_filters_and_goes_on_from_phase_one(tmp_path: Path) -> None:
    base = load_config(preset="tiny", storage=str(tmp_path / "store"))
    store = ArtifactStore.from_config(base.storage)
    run_all(base, store, Progress(show_bar=False), until="paraphrase")
    cfg = load_config(preset="tiny", storage=str(tmp_path / "store"), overrides=BT)
    # Off, the stage keeps the fingerprint it had before the option existed; on, it gets a new one.
    assert fingerprints(cfg)["para_train"] != fingerprints(base)["para_train"]
    assert fingerprints(cfg)["paraphrase"] == fingerprints(base)["paraphrase"]

    ref = run_all(cfg, store, Progress(show_bar=False), until="para_train")["para_train"]
    art = store.fetch(ref)
    metrics = json.loads((art / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["first_phase"]["steps"] == 6
    for direction in ("a->b", "b->a"):
        counts = metrics["back_translation"][direction]
        assert counts["translated"] == 12
        assert counts["kept"] + sum(counts[f"rejected_{r}"] for r in REASONS) == 12
    pairs = (art / "back_translation_pairs.jsonl").read_text().splitlines()
    assert len(pairs) == metrics["back_translation_pairs"]
    # No pair kept (the tiny random model's rewrites run away): phase 2 goes on with all of phase 1's.
    assert len(pairs) == 0 < metrics["back_translation"]["a->b"]["rejected_runaway"]
    assert metrics["train_examples"] == metrics["first_phase"]["train_examples"]
    # Phase 2 starts from phase 1's tensors: its first dev loss is phase 1's last.
    assert metrics["dev_loss_before"] == pytest.approx(metrics["first_phase"]["dev_loss_after"], rel=1e-5)
    assert len((art / "metrics_back_translation.jsonl").read_text().splitlines()) >= 4
    # The checkpoints of both phases and the pairs' are gone with the commit.
    assert store.list_checkpoints("para_train", ref.fingerprint) == []


def test_back_translation_pairs_train_and_a_retry_resumes_to_the_same_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = load_config(preset="tiny", storage=str(tmp_path / "straight"))
    run_all(plain, ArtifactStore.from_config(plain.storage), Progress(show_bar=False), until="paraphrase")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    arts = {}
    for name in ("straight", "resumed"):
        cfg = load_config(preset="tiny", storage=str(tmp_path / name), overrides=BT)
        store = ArtifactStore.from_config(cfg.storage)
        fp = fingerprints(cfg)["para_train"]
        _seed_pairs(store, fp)
        if name == "resumed":  # interrupted at phase 2's third step, then retried
            monkeypatch.setenv("CYCLEJ_FAULT", "para_train-bt:3:error")
            with pytest.raises(InjectedError):
                run_all(cfg, store, Progress(show_bar=False), until="para_train")
            names = store.list_checkpoints("para_train", fp)
            assert {"bt-pairs", "bt-step-00000002", "step-00000006"} <= set(names)
            monkeypatch.delenv("CYCLEJ_FAULT")
        ref = run_all(cfg, store, Progress(show_bar=False), until="para_train")["para_train"]
        arts[name] = store.fetch(ref)
    straight, resumed = (json.loads((arts[n] / "metrics.json").read_text()) for n in ("straight", "resumed"))
    # The seeded pairs became reverse examples: {Dother} rewrite {Dline} -> the real line.
    assert straight["back_translation_pairs"] == 3
    # ... half of phase 2's examples (reverse_share 0.5): 3 of phase 1's beside them.
    assert straight["reverse_examples"] == 3 and straight["train_examples"] == 6
    kept = [
        json.loads(x) for x in (arts["straight"] / "back_translation_pairs.jsonl").read_text().splitlines()
    ]
    assert kept == [p.as_json() for p in SEEDED]
    assert resumed["resumed_from"] == ["bt-step-00000002"]
    one, two = (load_file(str(a / "adapter" / "adapter_model.safetensors")) for a in arts.values())
    assert one.keys() == two.keys() and all(bool((one[k] == two[k]).all()) for k in one)
