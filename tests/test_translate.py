"""cyclej.generation.translate: one output line per input line, greedy and deterministic, models found
by URI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cyclej.config import StorageConfig
from cyclej.errors import BadInput
from cyclej.generation.translate import (
    ModelTranslator,
    local_model_dir,
    model_markers,
    read_model_info,
    translate_lines,
    write_model_info,
)
from cyclej.models.loading import load_model, save_model
from cyclej.runtime.store import ArtifactStore

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

MARKERS = ("<|A|>", "<|B|>")
LINES = [
    "the food was cold and the waiter was rude .",
    "great place , friendly staff !",
    "",
    "line with\ttabs   and  spaces",
    "i would never come back here .",
]


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny GPT-J with the two markers added, saved as a plain HF directory (as every stage does)."""
    model, tok = load_model("tiny-gptj", markers=list(MARKERS))
    return save_model(model, tok, tmp_path / "model")


def test_one_line_per_input_and_deterministic(tiny_model_dir: Path) -> None:
    first = translate_lines(str(tiny_model_dir), LINES, to="b", max_new_tokens=12, batch_size=2)
    again = translate_lines(str(tiny_model_dir), LINES, to="b", max_new_tokens=12, batch_size=4)
    assert len(first) == len(LINES)
    assert first == again  # greedy: batch size and order do not change the result
    assert all("\n" not in out and "\r" not in out for out in first)
    # The random tiny model writes something for a real sentence (it is not silently returning nothing).
    assert any(out for out in first)
    other = translate_lines(str(tiny_model_dir), LINES, to="a", max_new_tokens=12)
    assert len(other) == len(LINES)


def test_direction_sets_the_markers(tiny_model_dir: Path) -> None:
    """to=b prompts {A}{line}{B}: the same as calling the model on those ids ourselves."""

    model, tok = load_model(str(tiny_model_dir), markers=list(MARKERS))
    a_id, b_id = tok.convert_tokens_to_ids(list(MARKERS))
    line = LINES[0]
    ids = torch.tensor(
        [[a_id, *tok(line, add_special_tokens=False, split_special_tokens=True).input_ids, b_id]]
    )
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    new = gen[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    expected = " ".join(tok.decode(new, skip_special_tokens=True).split())
    translator = ModelTranslator(model, tok, MARKERS, max_new_tokens=8)
    assert translator([line], "b") == [expected]


def test_markers_from_tokenizer_and_from_cyclej_json(tiny_model_dir: Path) -> None:
    assert read_model_info(tiny_model_dir) is None
    assert model_markers(tiny_model_dir) == MARKERS  # the last two added special tokens
    write_model_info(tiny_model_dir, ["<|B|>", "<|A|>"], ["pos", "neg"])
    assert model_markers(tiny_model_dir) == ("<|B|>", "<|A|>")
    assert read_model_info(tiny_model_dir) == {"markers": ["<|B|>", "<|A|>"], "domains": ["pos", "neg"]}


def test_model_without_markers_is_refused(tmp_path: Path) -> None:
    from cyclej.models.catalog import resolve_model

    with pytest.raises(BadInput, match="marker"):
        model_markers(resolve_model("tiny-gptj"))


def test_local_model_dir_finds_model_subfolder_and_fetches_from_s3(
    tiny_model_dir: Path, tmp_path: Path, s3_bucket: str
) -> None:
    artifact = tiny_model_dir.parent
    assert local_model_dir(str(artifact)) == tiny_model_dir
    assert local_model_dir(str(tiny_model_dir)) == tiny_model_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput, match="config.json"):
        local_model_dir(str(empty))

    # An artifact on a real S3 endpoint (moto), found through the AWS_* variables like the pipeline's store.
    store = ArtifactStore.from_config(
        StorageConfig(root=f"{s3_bucket}/runs", cache_dir=str(tmp_path / "cache"))
    )
    ref = store.commit("rl", "f00d", artifact)
    fetched = local_model_dir(ref.uri, cache_dir=tmp_path / "cache2")
    assert fetched.name == "model" and (fetched / "config.json").is_file()
    assert translate_lines(ref.uri + "/model", LINES[:2], to="a", max_new_tokens=6) == translate_lines(
        str(tiny_model_dir), LINES[:2], to="a", max_new_tokens=6
    )
    with pytest.raises(BadInput, match="no committed artifact"):
        local_model_dir(f"{s3_bucket}/runs/rl/beef", cache_dir=tmp_path / "cache3")


def test_adapter_artifacts_translate_through_their_base(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `domain_train` artifact (adapter + marker rows) names its `context` base in base.json; translating
    with it, by folder or by S3 URI, equals the base with the adapter applied, merged once into the cache."""
    import json
    import shutil
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from cyclej.generation.translate import ModelTranslator, load_adapter_model
    from cyclej.models.catalog import cache_root
    from cyclej.pipeline.registry import StageRun
    from cyclej.runtime.progress import Progress
    from cyclej.stages.domain_train import run_domain_train
    from tests.test_trainer import build_inputs, pipeline_config

    cfg = pipeline_config(
        tmp_path,
        domain_train={
            "batch_size": 8,
            "micro_batch_size": 8,
            "max_steps": 2,
            "seq_len": 64,
            "precision": "fp32",
            "checkpoint_every_steps": 2,
            "eval_every_steps": 2,
            "eval_batches": 1,
            "lr": 1e-2,
        },
    )
    store = ArtifactStore(cfg.storage.root)
    inputs = build_inputs(store, n_lines=8)
    ref = run_domain_train(
        StageRun.start(
            "domain_train",
            cfg,
            {"context": inputs["context"], "data": inputs["data"]},
            store,
            Progress(show_bar=False),
        )
    )
    artifact = store.fetch(ref)
    assert json.loads((artifact / "base.json").read_text()) == {
        "stage": "context",
        "fingerprint": inputs["context"].fingerprint,
    }

    model, tok, markers = load_adapter_model(store.fetch(inputs["context"]) / "model", artifact, MARKERS)
    expected = ModelTranslator(model, tok, markers, max_new_tokens=8)(LINES, "b")
    assert translate_lines(str(artifact), LINES, to="b", max_new_tokens=8) == expected
    merged = local_model_dir(str(artifact))
    assert merged.parent == cache_root() / "merged-adapters" and read_model_info(merged)["markers"] == list(
        MARKERS
    )
    built = (merged / "model.safetensors").stat().st_mtime_ns
    assert local_model_dir(str(artifact)) == merged  # built once, then reused
    assert (merged / "model.safetensors").stat().st_mtime_ns == built
    assert [p.name for p in merged.parent.iterdir()] == [merged.name]  # no temporary folder left

    # The same two artifacts on S3, with an empty model cache: the base is fetched from the same store by
    # its fingerprint and merged again. Two builders at once: one publishes, both get the same folder.
    monkeypatch.setenv("CYCLEJ_CACHE", str(tmp_path / "fresh-cache"))
    s3 = ArtifactStore.from_config(StorageConfig(root=f"{s3_bucket}/runs", cache_dir=str(tmp_path / "cache")))
    s3.commit("context", inputs["context"].fingerprint, store.fetch(inputs["context"]))
    s3_ref = s3.commit("domain_train", ref.fingerprint, artifact)
    with ThreadPoolExecutor(2) as pool:
        dirs = list(pool.map(lambda _: local_model_dir(s3_ref.uri, cache_dir=tmp_path / "cache"), range(2)))
    assert dirs[0] == dirs[1] and dirs[0].parent == tmp_path / "fresh-cache" / "merged-adapters"
    assert [p.name for p in dirs[0].parent.iterdir()] == [dirs[0].name]
    assert translate_lines(s3_ref.uri, LINES, to="b", max_new_tokens=8) == expected

    # The CLI takes it too; an adapter whose base is not in its store is refused by name.
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(LINES) + "\n")
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "cyclej.cli",
            "translate",
            "--model",
            str(artifact),
            "--to",
            "b",
            "--max-new-tokens",
            "8",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines() == expected
    moved = shutil.copytree(artifact, tmp_path / "moved", ignore=shutil.ignore_patterns("MANIFEST.json"))
    (moved / "base.json").write_text(json.dumps({"stage": "context", "fingerprint": "0123456789abcdef"}))
    orphan_ref = ArtifactStore(str(tmp_path / "other-store")).commit("domain_train", ref.fingerprint, moved)
    with pytest.raises(BadInput, match="base artifact context/0123456789abcdef is not in"):
        local_model_dir(orphan_ref.uri)
    (moved / "base.json").write_text("{}")
    with pytest.raises(BadInput, match="base.json: not a JSON object with stage and fingerprint"):
        local_model_dir(str(moved))


# ---- translations end where a line ends ----------------------------------------------------------------
def test_newline_tokens_are_found_in_the_vocabulary() -> None:
    from transformers import AutoTokenizer

    from cyclej.generation.backends import newline_token_ids
    from cyclej.models.catalog import tiny_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    ids = newline_token_ids(tok)
    assert ids and all("\n" in tok.decode([i]) or "\r" in tok.decode([i]) for i in ids)
    assert set(tok("a\nb", add_special_tokens=False)["input_ids"]) & ids
    assert not set(tok("no line break here", add_special_tokens=False)["input_ids"]) & ids


def test_generation_stops_at_an_extra_stop_token_and_says_so(tiny_model_dir: Path) -> None:
    from cyclej.generation.backends import SamplingSettings, TransformersBackend

    model, tok = load_model(str(tiny_model_dir), markers=list(MARKERS))
    backend = TransformersBackend(model, tok)
    prompt = [[5, 6, 7, 8]]
    free = backend.generate(prompt, SamplingSettings(max_new_tokens=6))[0][0]
    assert len(free) == 6 and backend.last_stopped == [[False]]  # ran to its limit
    stop_at = free[2]  # the third greedy token, made a stop token
    cut = backend.generate(prompt, SamplingSettings(max_new_tokens=6, stop_ids=frozenset({stop_at})))[0][0]
    assert cut == free[: free.index(stop_at)] and backend.last_stopped == [[True]]


def test_translations_are_capped_by_source_length_and_runaways_are_flagged(tiny_model_dir: Path) -> None:
    from cyclej.generation.backends import SamplingSettings, TransformersBackend
    from cyclej.generation.translate import output_token_limit, rl_prompt, translate_detailed

    model, tok = load_model(str(tiny_model_dir), markers=list(MARKERS))
    backend = TransformersBackend(model, tok)
    lines = ["ok .", "the food was cold and the waiter was rude and the soup was bland ."]
    out = translate_detailed(backend, tok, lines, "b", MARKERS, max_new_tokens=64)
    a_id, b_id = (tok.convert_tokens_to_ids(m) for m in MARKERS)
    # A random tiny model never ends a line: each output stops at its own limit and is flagged a runaway.
    for line, t in zip(lines, out, strict=True):
        prompt = rl_prompt(tok, a_id, line, b_id)
        limit = output_token_limit(len(prompt) - 2, 64)
        free = backend.generate([prompt], SamplingSettings(max_new_tokens=64))[0][0]
        assert t.runaway and "\n" not in t.text
        assert t.text == " ".join(tok.decode(free[:limit], skip_special_tokens=True).split())
    assert output_token_limit(3, 64) == 14 and output_token_limit(100, 64) == 64
