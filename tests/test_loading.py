"""cyclej.models.loading on tiny random GPT-J and Llama models: markers, position interpolation, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cyclej.errors import BadInput
from cyclej.models.loading import (
    GPTJ_TABLE_HOLDERS,
    PI_KEY,
    extend_context,
    interpolated_sinusoidal_positions,
    load_model,
    marker_token_ids,
    position_interpolation_factor,
    save_model,
)

MARKERS = ["<|A|>", "<|B|>"]
OLD_LEN = 128  # n_positions / max_position_embeddings of the tiny models in cyclej.models.catalog


def _gptj_tables(model: torch.nn.Module) -> list[torch.Tensor]:
    # Per attention layer up to transformers 5.23, one shared GPTJRotaryEmbedding from 5.24.
    tables = [m.embed_positions.clone() for m in model.modules() if type(m).__name__ in GPTJ_TABLE_HOLDERS]
    assert tables, "no GPT-J position table found"
    return tables


def _llama_cos_sin(model: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, dtype=torch.float32)
    return model.model.rotary_emb(x, positions[None, :])


# ---- markers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["tiny-gptj", "tiny-llama"])
def test_markers_added_once_and_keep_ids_after_save(spec: str, tmp_path: Path) -> None:
    base_tok = AutoTokenizer.from_pretrained(_resolve(spec))
    model, tok = load_model(spec, markers=MARKERS)
    ids = marker_token_ids(tok, MARKERS)
    assert ids == [len(base_tok), len(base_tok) + 1]
    assert len(tok) == len(base_tok) + 2
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # A marker is one token, never split into characters, even glued to text.
    assert tok("x<|A|>y").input_ids.count(ids[0]) == 1
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id

    # New rows start at the mean of the real vocabulary's rows (input, and output when untied).
    emb = model.get_input_embeddings().weight.detach()
    mean = emb[: len(base_tok)].mean(dim=0)
    assert torch.allclose(emb[ids[0]], mean, atol=1e-6) and torch.allclose(emb[ids[1]], mean, atol=1e-6)
    out = model.get_output_embeddings()
    if not model.config.tie_word_embeddings:
        assert torch.allclose(out.weight[ids[0]], out.weight[: len(base_tok)].mean(dim=0), atol=1e-6)

    save_model(model, tok, tmp_path / "m")
    model2, tok2 = load_model(str(tmp_path / "m"), markers=MARKERS)
    assert marker_token_ids(tok2, MARKERS) == ids
    assert len(tok2) == len(tok)  # nothing added the second time
    assert torch.equal(model2.get_input_embeddings().weight, model.get_input_embeddings().weight)
    # Plain transformers sees the same marker ids (they live in the saved tokenizer).
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert plain_tok.convert_tokens_to_ids(MARKERS) == ids


def test_marker_already_in_the_vocabulary_keeps_its_id_and_row() -> None:
    base, base_tok = load_model("tiny-gptj")
    existing = base_tok.convert_ids_to_tokens(500)
    model, tok = load_model("tiny-gptj", markers=[existing, "<|B|>"])
    assert marker_token_ids(tok, [existing, "<|B|>"]) == [500, len(base_tok)]
    assert len(tok) == len(base_tok) + 1
    assert existing in tok.get_added_vocab()  # now special: never split or merged
    assert torch.equal(model.get_input_embeddings().weight[500], base.get_input_embeddings().weight[500])


def test_marker_ids_without_markers_is_a_clear_error() -> None:
    _, tok = load_model("tiny-gptj")
    with pytest.raises(BadInput, match="markers"):
        marker_token_ids(tok, MARKERS)


def test_save_model_writes_safetensors_shards_that_plain_transformers_loads(tmp_path: Path) -> None:
    model, tok = load_model("tiny-llama", markers=MARKERS)
    save_model(model, tok, tmp_path / "m", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    assert not list((tmp_path / "m").glob("*.bin"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for (name, p1), (_, p2) in zip(model.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), name


# ---- GPT-J position interpolation --------------------------------------------------------------------
def test_gptj_table_at_2p_equals_old_table_at_p() -> None:
    model, _ = load_model("tiny-gptj", markers=MARKERS)
    old_tables = _gptj_tables(model)
    assert old_tables and all(t.shape[0] == OLD_LEN for t in old_tables)
    extend_context(model, 2.0)
    assert model.config.n_positions == 2 * OLD_LEN and model.config.max_position_embeddings == 2 * OLD_LEN
    assert position_interpolation_factor(model) == 2.0
    p = torch.arange(OLD_LEN)
    for old, new in zip(old_tables, _gptj_tables(model), strict=True):
        assert new.shape == (2 * OLD_LEN, old.shape[1])
        torch.testing.assert_close(new[2 * p], old[p], rtol=0, atol=1e-6)
        # Odd positions fall half-way between trained ones, not onto them.
        assert not torch.allclose(new[1], old[1])


def test_interpolated_table_without_scaling_is_transformers_table() -> None:
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    torch.testing.assert_close(
        interpolated_sinusoidal_positions(64, 16, 1.0), create_sinusoidal_positions(64, 16)
    )


def test_gptj_forward_past_the_old_limit() -> None:
    model, _ = load_model("tiny-gptj", markers=MARKERS)
    long_ids = torch.randint(0, 1000, (2, OLD_LEN + 72))
    with pytest.raises((RuntimeError, IndexError)):  # the un-extended table has only OLD_LEN rows
        model(long_ids)
    extend_context(model, 2.0)
    logits = model(long_ids).logits
    assert logits.shape == (2, OLD_LEN + 72, len(model.get_input_embeddings().weight))
    assert torch.isfinite(logits).all()


def test_gptj_reload_reapplies_interpolation(tmp_path: Path) -> None:
    model, tok = load_model("tiny-gptj", markers=MARKERS)
    extend_context(model, 2.0)
    save_model(model, tok, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg[PI_KEY] == 2.0 and cfg["n_positions"] == 2 * OLD_LEN
    # For vLLM, whose GPT-J reads rope_parameters (transformers' GPT-J ignores it).
    assert cfg["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}

    reloaded, _ = load_model(str(tmp_path / "m"), markers=MARKERS)
    for a, b in zip(_gptj_tables(model), _gptj_tables(reloaded), strict=True):
        assert torch.equal(a, b)
    ids = torch.randint(0, 1000, (1, OLD_LEN + 40))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)

    # Plain transformers loads the same weights but rebuilds un-interpolated tables: our loader is
    # required for GPT-J (documented in cyclej.models.loading).
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    plain_table = _gptj_tables(plain)[0]
    assert plain_table.shape[0] == 2 * OLD_LEN
    assert not torch.allclose(plain_table, _gptj_tables(model)[0])
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)


def test_extending_twice_multiplies_factors(tmp_path: Path) -> None:
    model, tok = load_model("tiny-gptj")
    extend_context(model, 2.0)
    save_model(model, tok, tmp_path / "m")
    again, _ = load_model(str(tmp_path / "m"))
    extend_context(again, 1.5)
    assert position_interpolation_factor(again) == 3.0 and again.config.n_positions == 3 * OLD_LEN
    old = interpolated_sinusoidal_positions(OLD_LEN, 16, 1.0)
    torch.testing.assert_close(_gptj_tables(again)[0][3 * torch.arange(OLD_LEN)], old, rtol=0, atol=1e-6)


# ---- Llama: native linear rope scaling ---------------------------------------------------------------
def test_llama_linear_rope_scaling_and_reload(tmp_path: Path) -> None:
    model, tok = load_model("tiny-llama", markers=MARKERS)
    p = torch.arange(OLD_LEN)
    cos_old, sin_old = _llama_cos_sin(model, p)
    extend_context(model, 2.0)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 2.0
    assert model.config.max_position_embeddings == 2 * OLD_LEN
    cos_new, sin_new = _llama_cos_sin(model, 2 * p)
    torch.testing.assert_close(cos_new, cos_old, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin_new, sin_old, rtol=0, atol=1e-5)

    ids = torch.randint(0, 1000, (1, OLD_LEN + 40))
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    save_model(model, tok, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "linear" and PI_KEY not in cfg
    # transformers applies Llama's native scaling on its own: plain loading gives the same logits.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(plain(ids).logits, logits)
    ours, _ = load_model(str(tmp_path / "m"), markers=MARKERS)
    torch.testing.assert_close(ours(ids).logits, logits)
    assert position_interpolation_factor(ours) == 2.0


def test_extend_context_refuses_factor_below_one() -> None:
    model, _ = load_model("tiny-llama")
    with pytest.raises(BadInput, match="context.factor"):
        extend_context(model, 0.5)


def test_load_model_missing_directory_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such directory"):
        load_model(str(tmp_path / "nope") + "/")


@pytest.mark.slow
def test_smollm2_gguf_loads_with_markers_and_extends(tmp_path: Path) -> None:
    from cyclej.models.catalog import SMOLLM2_GGUF, smollm2_gguf_dir

    model, tok = load_model(str(smollm2_gguf_dir() / SMOLLM2_GGUF), markers=MARKERS)
    ids = marker_token_ids(tok, MARKERS)
    assert model.get_input_embeddings().weight.shape[0] >= max(ids) + 1
    extend_context(model, 2.0)
    assert model.config.rope_parameters["rope_type"] == "linear"
    save_model(model, tok, tmp_path / "m")
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert plain_tok.convert_tokens_to_ids(MARKERS) == ids


def _resolve(spec: str) -> str:
    from cyclej.models.catalog import resolve_model

    return resolve_model(spec)
