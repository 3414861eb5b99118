"""Template transfer (markers, delete, retrieve, template), the back-translated pairs made from it, and
para_train and the merge sweep learning from / scoring on them (tiny preset, real stages, no Prefect)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cyclej.config import load_config
from cyclej.corpora.template_transfer import TemplateTransfer, back_translated_pairs
from cyclej.errors import BadInput
from cyclej.pipeline.registry import run_all
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactStore

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

NEGATIVE = [
    "the soup was awful .",
    "the staff was rude and slow .",
    "awful service , never again .",
    "the pizza was awful and cold .",
    "rude staff at the door .",
    "the fries were awful .",
    "never again , the room was dirty .",
    "the room was dirty and awful .",
]
POSITIVE = [
    "the soup was great .",
    "the staff was friendly and fast .",
    "great service , will be back .",
    "the pizza was great and hot .",
    "friendly staff at the door .",
    "the fries were great .",
    "will be back , the room was clean .",
    "the room was clean and great .",
]


def _transfer(**kwargs: float) -> TemplateTransfer:
    return TemplateTransfer({"a": NEGATIVE, "b": POSITIVE}, **kwargs)  # type: ignore[arg-type]


def test_markers_are_the_words_one_domain_uses_and_the_other_does_not() -> None:
    t = _transfer(min_salience=3.0, max_ngram=1)
    assert ("awful",) in t.markers["a"] and ("rude",) in t.markers["a"]
    assert ("great",) in t.markers["b"] and ("friendly",) in t.markers["b"]
    for shared in ("the", "soup", "was", "."):
        assert (shared,) not in t.markers["a"] | t.markers["b"]


def test_delete_cuts_runs_of_markers_into_slots() -> None:
    t = _transfer(min_salience=3.0, max_ngram=1)
    deleted = t.delete("the soup was awful and rude .", "a")
    assert deleted.content == ["the", "soup", "was", None, "and", None, "."]
    assert deleted.slots == [["awful"], ["rude"]]
    assert deleted.content_text == "the soup was and ."


def test_transfer_swaps_markers_for_those_of_the_nearest_other_domain_line() -> None:
    t = _transfer(min_salience=3.0, max_ngram=1)
    assert t.transfer("the soup was awful .", "b") == "the soup was great ."
    assert t.transfer("the pizza was great and hot .", "a") == "the pizza was awful and hot ."
    # No marker of its own domain: nothing to swap.
    assert t.transfer("the soup was .", "b") is None


def test_back_translated_pairs_have_real_targets_and_changed_sources() -> None:
    t = _transfer(min_salience=3.0, max_ngram=1)
    pairs = back_translated_pairs(t, {"a": NEGATIVE, "b": POSITIVE}, per_domain=3, seed=7)
    assert [p.target_domain for p in pairs] == ["a", "b", "a", "b", "a", "b"]
    for p in pairs:
        assert p.target in (NEGATIVE if p.target_domain == "a" else POSITIVE)
        assert p.source != p.target
        assert p.source_domain != p.target_domain
    # The source carries the other domain's markers, not the target's.
    assert all(
        "great" in p.source.split() or "friendly" in p.source.split() or "clean" in p.source.split()
        for p in pairs
        if p.target_domain == "a"
    )
    assert pairs == back_translated_pairs(t, {"a": NEGATIVE, "b": POSITIVE}, per_domain=3, seed=7)
    assert pairs != back_translated_pairs(t, {"a": NEGATIVE, "b": POSITIVE}, per_domain=3, seed=8)


def test_paraphrase_markers_across_or_same() -> None:
    from cyclej.stages.para_train import paraphrase_markers

    assert paraphrase_markers({"a": 7, "b": 9}, "across") == {"a": (7, 9), "b": (9, 7)}
    assert paraphrase_markers({"a": 7, "b": 9}, "same") == {"a": (7, 7), "b": (9, 9)}


def test_min_salience_must_be_a_ratio_above_one() -> None:
    with pytest.raises(ValueError, match="min_salience"):
        _transfer(min_salience=1.0)


def test_para_train_learns_from_template_pairs_and_the_sweep_scores_them(tmp_path: Path) -> None:
    cfg = load_config(
        preset="tiny",
        storage=str(tmp_path / "store"),
        overrides=[
            "para_train.template_pairs.per_domain=40",
            "para_train.paraphrase_markers=same",
            "merge.sweep=[0.3,0.7]",
            "merge.sweep_examples=4",
        ],
    )
    store = ArtifactStore.from_config(cfg.storage)
    refs = run_all(cfg, store, Progress(show_bar=False), until="merge")
    para = store.fetch(refs["para_train"])
    metrics = json.loads((para / "metrics.json").read_text())
    pairs = [json.loads(x) for x in (para / "template_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 80 and {p["target_domain"] for p in pairs} == {"a", "b"}
    assert metrics["template_pairs"] + metrics["template_dev_pairs"] == 80
    assert metrics["template_dev_pairs"] > 0
    # Every template pair is one example; every paraphrase pair two.
    assert metrics["train_examples"] == 2 * metrics["train_pairs"] + metrics["template_pairs"]
    sweep = json.loads((store.fetch(refs["merge"]) / "metrics.json").read_text())["sweep_examples"]
    assert sweep["para_style"] == 8  # 4 template pairs of the dev lines per domain, not 2 copies per line


def test_template_pairs_without_markers_are_refused_with_the_field(tmp_path: Path) -> None:
    cfg = load_config(
        preset="tiny",
        storage=str(tmp_path / "store"),
        overrides=["para_train.template_pairs.min_salience=100000"],
    )
    with pytest.raises(BadInput, match=r"para_train\.template_pairs"):
        run_all(cfg, ArtifactStore.from_config(cfg.storage), Progress(show_bar=False), until="para_train")
