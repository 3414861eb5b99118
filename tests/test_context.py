"""The `context` stage: long rows from both corpora, perplexity, and a whole run on the tiny preset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cyclej.config import PipelineConfig, load_config
from cyclej.errors import BadInput
from cyclej.models.loading import PI_KEY, load_model, marker_token_ids, position_interpolation_factor
from cyclej.pipeline.registry import run_all, run_stage
from cyclej.runtime.faults import InjectedError
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore
from cyclej.stages.context import long_rows, perplexity, token_stream

QUIET = Progress(show_bar=False)


_DATA: dict[str, ArtifactRef] = {}


@pytest.fixture
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for this file whose `data` artifact (the tiny preset's) is built once."""
    if "root" not in _DATA:
        root = str(tmp_path_factory.mktemp("context-store"))
        cfg = load_config(preset="tiny", storage=root)
        _DATA["data"] = run_all(cfg, ArtifactStore.from_config(cfg.storage), QUIET, until="data")["data"]
        _DATA["root"] = root  # type: ignore[assignment]
    return str(_DATA["root"])


def _tiny(root: str, *overrides: str) -> tuple[PipelineConfig, ArtifactStore]:
    cfg = load_config(preset="tiny", storage=root, overrides=list(overrides))
    return cfg, ArtifactStore.from_config(cfg.storage)


def test_token_stream_puts_eos_after_every_line_in_a_seeded_order() -> None:
    _, tok = load_model("tiny-gptj")
    lines = [f"line number {i}" for i in range(20)]
    stream = token_stream(tok, lines, seed=3)
    assert stream.count(tok.eos_token_id) == len(lines)
    assert stream == token_stream(tok, lines, seed=3)
    assert stream != token_stream(tok, lines, seed=4)
    # Every line is there, whole, once.
    decoded = tok.decode(stream).split(tok.eos_token)
    assert sorted(d for d in decoded if d) == sorted(lines)


def test_long_rows_are_full_rows_cut_from_the_stream() -> None:
    _, tok = load_model("tiny-gptj")
    lines = [f"some text {i}" for i in range(50)]
    rows = long_rows(tok, lines, seq_len=64, seed=0)
    stream = token_stream(tok, lines, seed=0)
    assert len(rows) == len(stream) // 64 and all(len(r) == 64 for r in rows)
    assert [t for r in rows for t in r] == stream[: 64 * len(rows)]


@pytest.mark.parametrize("spec", ["tiny-gptj", "tiny-llama"])
def test_perplexity_is_exp_of_the_models_own_loss(spec: str) -> None:
    model, _ = load_model(spec)
    torch.manual_seed(0)
    rows = torch.randint(0, 1000, (3, 40)).tolist()
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(rows), labels=torch.tensor(rows)).loss
    assert perplexity(model, rows, batch_size=2) == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_perplexity_out_of_memory_halves_the_batch_and_gives_the_same_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CUDA OOM (here the CUBLAS one, a plain RuntimeError) in the perplexity pass halved nothing before
    and failed the stage after its training; now the chunk is redone at half the batch (issue 22,
    point 10)."""
    from cyclej.runtime import faults

    model, _ = load_model("tiny-gptj")
    torch.manual_seed(0)
    rows = torch.randint(0, 1000, (4, 40)).tolist()
    clean = perplexity(model, rows, batch_size=4)
    monkeypatch.setenv("CYCLEJ_FAULT", "perplexity:1:cublas")
    faults._fired.clear()
    assert perplexity(model, rows, batch_size=4) == pytest.approx(clean, rel=1e-5)
    assert ("perplexity", 1, "cublas") in faults._fired


def test_context_refuses_rows_longer_than_the_extended_context(tiny_store: str) -> None:
    # tiny-gptj has 128 positions: factor 2 gives 256, so 512-token rows cannot fit.
    cfg, store = _tiny(tiny_store, "context.seq_len=512")
    with pytest.raises(BadInput, match="context.seq_len"):
        run_stage("context", cfg, {"data": _DATA["data"]}, store, QUIET)


# A larger LR than the recipe's so that 4 steps on a random model visibly lower the perplexity; half the
# preset's batch and evaluation rows to keep this file quick on 2 shared cores.
STAGE_OVERRIDES = ("context.lr=3e-3", "context.batch_size=4", "context.eval_sequences=2")


@pytest.fixture
def context_ref(tiny_store: str) -> ArtifactRef:
    """The tiny preset's context stage, run once for this file without interruption."""
    if "context" not in _DATA:
        cfg, store = _tiny(tiny_store, *STAGE_OVERRIDES)
        _DATA["context"] = run_stage("context", cfg, {"data": _DATA["data"]}, store, QUIET)
    return _DATA["context"]


def test_context_stage_on_the_tiny_preset(tiny_store: str, context_ref: ArtifactRef) -> None:
    cfg, store = _tiny(tiny_store, *STAGE_OVERRIDES)
    ref = context_ref
    out = store.fetch(ref)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ppl_base_old_len", "ppl_before", "ppl_after", "ppl_after_old_len"):
        assert math.isfinite(metrics[key]) and metrics[key] > 1, key
    assert metrics["new_context"] == 256 and metrics["old_context"] == 128 and metrics["seq_len"] == 256
    assert metrics["eval_rows"] == cfg.context.eval_sequences
    assert metrics["eval_tokens"] == metrics["eval_rows"] * 256
    assert metrics["train"]["steps"] == cfg.context.max_steps
    assert (out / "metrics.jsonl").is_file()
    assert metrics["ppl_after"] < metrics["ppl_before"]
    assert ref.metrics["ppl_after"] == metrics["ppl_after"]

    # INTERMEDIATE-1: plain HF directory, markers as special tokens, the PI factor in config.json.
    config = json.loads((out / "model" / "config.json").read_text())
    info = json.loads((out / "model" / "cyclej.json").read_text())
    assert info == {"markers": ["<|A|>", "<|B|>"], "domains": ["negative", "positive"]}
    assert config[PI_KEY] == 2.0 and config["n_positions"] == 256
    model, tok = load_model(str(out / "model"), markers=[cfg.domain_a.marker, cfg.domain_b.marker])
    base_model, base_tok = load_model("tiny-gptj", markers=[cfg.domain_a.marker, cfg.domain_b.marker])
    assert marker_token_ids(tok, ["<|A|>", "<|B|>"]) == marker_token_ids(base_tok, ["<|A|>", "<|B|>"])
    assert len(tok) == len(base_tok)
    assert position_interpolation_factor(model) == 2.0
    # The adapter was merged: the attention weights moved, and no LoRA module is left.
    assert not any("lora" in name for name, _ in model.named_parameters())
    q_new = model.transformer.h[0].attn.q_proj.weight
    q_old = base_model.transformer.h[0].attn.q_proj.weight
    assert not torch.equal(q_new, q_old)
    plain = AutoModelForCausalLM.from_pretrained(out / "model")
    assert torch.equal(plain.transformer.h[0].attn.q_proj.weight, q_new)

    # A second run of the same config comes back from the store without training.
    again = run_stage("context", cfg, {"data": _DATA["data"]}, store, QUIET)
    assert again.fingerprint == ref.fingerprint and again.manifest_sha256 == ref.manifest_sha256


def test_context_stage_resumes_after_a_failure_to_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_store: str, context_ref: ArtifactRef
) -> None:
    """An error at optimizer step 3 (after the step-2 checkpoint), then a re-run: the trainer resumes
    from step 2 and INTERMEDIATE-1 is bit-identical to the uninterrupted run's."""
    cfg, store = _tiny(str(tmp_path / "store"), *STAGE_OVERRIDES)
    data_ref = run_all(cfg, store, QUIET, until="data")["data"]
    assert data_ref.fingerprint == _DATA["data"].fingerprint
    monkeypatch.setenv("CYCLEJ_FAULT", "context:3:error")
    with pytest.raises(InjectedError):
        run_stage("context", cfg, {"data": data_ref}, store, QUIET)
    assert store.ref("context", context_ref.fingerprint) is None
    assert store.list_checkpoints("context", context_ref.fingerprint) == ["step-00000002"]

    ref = run_stage("context", cfg, {"data": data_ref}, store, QUIET)
    assert ref.fingerprint == context_ref.fingerprint
    resumed = json.loads((store.fetch(ref) / "metrics.json").read_text())
    assert resumed["train"]["resumed_from"] == ["step-00000002"]
    straight = json.loads((store_of(tiny_store).fetch(context_ref) / "metrics.json").read_text())
    assert resumed["ppl_after"] == straight["ppl_after"]
    a = load_file(str(store.fetch(ref) / "model" / "model.safetensors"))
    b = load_file(str(store_of(tiny_store).fetch(context_ref) / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def store_of(root: str) -> ArtifactStore:
    return _tiny(root)[1]
