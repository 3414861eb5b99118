"""cyclej/corpora/formats.py: the exact token layout and loss mask of every stage's example, and packing that
keeps examples apart (checked on real tiny GPT-J and Llama models: packed logits == logits alone)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, MambaConfig, MambaForCausalLM

from cyclej.corpora.formats import (
    IGNORE_INDEX,
    Example,
    PackedSequence,
    block_causal_mask,
    bucket,
    collate,
    domain_example,
    domain_examples,
    encode_text,
    encode_texts,
    pack,
    para_examples,
    rl_prompt,
    single,
    supports_packing,
)
from cyclej.models.catalog import resolve_model, tiny_tokenizer_dir

X = IGNORE_INDEX
DA, DB, EOS = 1024, 1025, 0  # the markers as added below; <|endoftext|> is id 0 in the tiny tokenizer
TEXT = "the food was cold"  # → [262, 337, 296, 579, 349]
PARA = "the meal was not warm"  # → [262, 857, 296, 358, 261, 1020]
TEXT_IDS = [262, 337, 296, 579, 349]
PARA_IDS = [262, 857, 296, 358, 261, 1020]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    tok.add_special_tokens({"additional_special_tokens": ["<|A|>", "<|B|>"]})
    assert tok.convert_tokens_to_ids(["<|A|>", "<|B|>"]) == [DA, DB]
    assert tok.eos_token_id == EOS
    return tok


# ---- layouts ------------------------------------------------------------------------------------
def test_encode_text_pins_ids(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert encode_text(tokenizer, TEXT) == TEXT_IDS
    assert encode_text(tokenizer, PARA) == PARA_IDS


def test_para_examples_both_directions_layout_and_loss_mask(tokenizer) -> None:  # type: ignore[no-untyped-def]
    forward, backward = para_examples(tokenizer, DA, DB, TEXT, PARA)
    # {DA} text {DB} → para EOS
    assert forward.input_ids == [DA, 262, 337, 296, 579, 349, DB, 262, 857, 296, 358, 261, 1020, EOS]
    assert forward.labels == [X, X, X, X, X, X, X, 262, 857, 296, 358, 261, 1020, EOS]
    # {DB} para {DA} → text EOS
    assert backward.input_ids == [DB, 262, 857, 296, 358, 261, 1020, DA, 262, 337, 296, 579, 349, EOS]
    assert backward.labels == [X, X, X, X, X, X, X, X, 262, 337, 296, 579, 349, EOS]


def test_para_examples_for_a_b_text_mirror_the_markers(tokenizer) -> None:  # type: ignore[no-untyped-def]
    forward, backward = para_examples(tokenizer, DB, DA, TEXT, PARA)
    assert forward.input_ids == [DB, *TEXT_IDS, DA, *PARA_IDS, EOS]
    assert forward.labels == [X] * 7 + [*PARA_IDS, EOS]
    assert backward.input_ids == [DA, *PARA_IDS, DB, *TEXT_IDS, EOS]
    assert backward.labels == [X] * 8 + [*TEXT_IDS, EOS]


def test_domain_example_layout(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = domain_example(tokenizer, DB, TEXT)
    assert ex.input_ids == [DB, 262, 337, 296, 579, 349, EOS]
    assert ex.labels == [X, 262, 337, 296, 579, 349, EOS]


def test_domain_examples_batch_equals_one_by_one(tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = [TEXT, PARA, "a <|B|> c", ""]
    assert domain_examples(tokenizer, DA, texts) == [domain_example(tokenizer, DA, t) for t in texts]
    assert encode_texts(tokenizer, [TEXT, PARA]) == [TEXT_IDS, PARA_IDS]
    assert encode_texts(tokenizer, []) == []


def test_rl_prompt_layout(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert rl_prompt(tokenizer, DA, TEXT, DB) == [DA, 262, 337, 296, 579, 349, DB]
    assert rl_prompt(tokenizer, DB, TEXT, DA) == [DB, *TEXT_IDS, DA]


def test_special_token_spellings_in_text_stay_plain_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = domain_example(tokenizer, DA, "a <|A|> b<|endoftext|>")
    body = ex.input_ids[1:-1]
    assert DA not in body and DB not in body and EOS not in body
    assert tokenizer.decode(body) == "a <|A|> b<|endoftext|>"


def test_example_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="labels"):
        Example([1, 2, 3], [1, 2])


# ---- packing --------------------------------------------------------------------------------------
def _ex(*ids: int, prompt: int = 1) -> Example:
    return Example(list(ids), [X] * prompt + list(ids[prompt:]))


def test_pack_layout_positions_and_truncation() -> None:
    exs = [_ex(5, 6, 7), _ex(8, 9), _ex(10, 11, 12, 13), _ex(20, 21, 22, 23, 24, 25, 26)]
    rows = pack(exs, seq_len=6)
    assert [r.lengths for r in rows] == [[3, 2], [4], [6]]
    assert rows[0].input_ids == [5, 6, 7, 8, 9]
    assert rows[0].position_ids == [0, 1, 2, 0, 1]
    assert rows[0].labels == [X, 6, 7, X, 9]
    assert rows[1].position_ids == [0, 1, 2, 3]
    # the 7-token example is cut to 6 and counted
    assert rows[2].input_ids == [20, 21, 22, 23, 24, 25]
    assert [r.truncated for r in rows] == [0, 0, 1]


def test_pack_ignores_the_first_label_of_every_example() -> None:
    # An example whose first token carries a label: in a packed row the previous example's last token
    # would learn to predict it, so pack drops that label.
    rows = pack([Example([1, 2], [1, 2]), Example([3, 4], [3, 4])], seq_len=8)
    assert rows[0].labels == [X, 2, X, 4]


def test_block_causal_mask_exact() -> None:
    row_a = PackedSequence([1, 2, 3], [X, 2, 3], [0, 1, 0], [2, 1])
    row_b = PackedSequence([4, 5], [X, 5], [0, 1], [2])
    mask = block_causal_mask([row_a, row_b], length=3)
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.float32
    allowed = (mask == 0).int()[:, 0].tolist()
    assert allowed[0] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    # row b: two tokens then one padding token that attends only to itself
    assert allowed[1] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert torch.isinf(mask[mask != 0]).all() and (mask[mask != 0] < 0).all()


def test_collate_pads_and_continues_positions() -> None:
    rows = pack([_ex(5, 6, 7), _ex(8, 9), _ex(10, 11)], seq_len=5)
    batch = collate(rows, pad_id=99)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 99, 99, 99]]
    assert batch["labels"].tolist() == [[X, 6, 7, X, 9], [X, 11, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["attention_mask"].shape == (2, 1, 5, 5)
    two_d = collate([single(_ex(1, 2, 3)), single(_ex(4, 5))], four_d_mask=False)
    assert two_d["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="2D attention mask"):
        collate(rows, four_d_mask=False)
    # auto: 4D only when a row really packs several examples
    assert collate(rows, four_d_mask=None)["attention_mask"].shape == (2, 1, 5, 5)
    auto = collate([single(_ex(1, 2, 3)), single(_ex(4, 5))], four_d_mask=None)
    assert auto["attention_mask"].tolist() == two_d["attention_mask"].tolist()


def test_bucket_groups_similar_lengths_within_budget() -> None:
    lengths = [9, 2, 5, 3, 8, 2, 4, 20]
    exs = [_ex(*range(100 + i * 30, 100 + i * 30 + n)) for i, n in enumerate(lengths)]
    batches = bucket(exs, max_tokens_per_batch=16)
    # sorted 2 2 3 4 | 5 8 | 9 | 20: rows × longest ≤ 16
    assert [[len(r) for r in b] for b in batches] == [[2, 2, 3, 4], [5, 8], [9], [20]]
    for b in batches:
        assert len(b) * max(len(r) for r in b) <= 16 or len(b) == 1
    assert sorted(r.input_ids[0] for b in batches for r in b) == sorted(e.input_ids[0] for e in exs)
    shuffled = bucket(exs, max_tokens_per_batch=16, seed=3)
    assert sorted(map(str, shuffled)) == sorted(map(str, batches))
    assert bucket(exs, 16, seq_len=6)[-1][0].truncated == 1


# ---- real models: packed == alone ---------------------------------------------------------------
def _load(name: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32)
    return model.eval()


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token loss as a causal LM computes it (shifted by one, IGNORE_INDEX skipped)."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=X, reduction="none")


@pytest.mark.parametrize("name", ["tiny-gptj", "tiny-llama"])
def test_packed_logits_equal_logits_alone(name: str) -> None:
    model = _load(name)
    generator = torch.Generator().manual_seed(0)
    lengths = [6, 11, 4, 9, 7]
    exs = []
    for n in lengths:
        ids = torch.randint(1, 1000, (n,), generator=generator).tolist()
        exs.append(Example(ids, [X] * 2 + ids[2:]))
    rows = pack(exs, seq_len=20)
    assert [r.lengths for r in rows] == [[6, 11], [4, 9, 7]]
    batch = collate(rows)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        plain = model(input_ids=batch["input_ids"]).logits  # no mask: examples see each other
        leaked = 0.0
        for r, row in enumerate(rows):
            start = 0
            for n in row.lengths:
                ids = torch.tensor([row.input_ids[start : start + n]])
                alone = model(input_ids=ids).logits[0]
                torch.testing.assert_close(packed[r, start : start + n], alone, atol=1e-5, rtol=0)
                # the loss on the packed row is exactly the sum of the examples' own losses
                labels = batch["labels"][r, start : start + n]
                torch.testing.assert_close(
                    _token_losses(packed[r, start : start + n], labels).sum(),
                    _token_losses(alone, labels).sum(),
                    atol=1e-5,
                    rtol=0,
                )
                leaked = max(leaked, float((plain[r, start : start + n] - alone).abs().max()))
                start += n
    assert leaked > 1e-3  # without the mask the check above would have failed
    assert supports_packing(model)
    # One example per row (padded), with the automatic 2D mask: each row's logits are its logits alone.
    singles = collate([single(e) for e in exs], four_d_mask=None)
    assert singles["attention_mask"].dim() == 2
    with torch.no_grad():
        out = model(**{k: v for k, v in singles.items() if k != "labels"}).logits
        for r, e in enumerate(exs):
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(out[r, : len(e)], alone, atol=1e-5, rtol=0)


def test_mamba_cannot_pack_and_gets_buckets() -> None:
    """A recurrent family ignores attention masks: supports_packing says so, and bucketed rows (one
    example each, 2D padding mask) still give every example its logits alone."""
    torch.manual_seed(0)
    model = MambaForCausalLM(
        MambaConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=2, state_size=8)
    ).eval()
    assert not supports_packing(model)
    exs = [_ex(*range(10 + 20 * i, 10 + 20 * i + n)) for i, n in enumerate([5, 3, 6, 4])]
    batches = bucket(exs, max_tokens_per_batch=12)
    assert [[len(r) for r in b] for b in batches] == [[3, 4], [5, 6]]
    with torch.no_grad():
        for b in batches:
            batch = collate(b, four_d_mask=False)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for r, row in enumerate(b):
                alone = model(input_ids=torch.tensor([row.input_ids])).logits[0]
                torch.testing.assert_close(out[r, : len(row)], alone, atol=1e-5, rtol=0)
