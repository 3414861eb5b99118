"""Generation backends: left padding, EOS handling, determinism, sampling, and the vLLM backend where it
imports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cyclej.generation.backends import (
    SamplingSettings,
    TransformersBackend,
    generate_text,
    make_backend,
    strip_completion,
    vllm_dtype_name,
    vllm_engine_args,
)
from cyclej.models.catalog import tiny_tokenizer_dir
from tests.helpers.tiny_models import tiny_gptj, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

YELP = Path(__file__).resolve().parents[1] / "cyclej" / "samples" / "yelp" / "train.0"


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    lines = YELP.read_text(encoding="utf-8").splitlines()[:10]
    ids = [tokenizer(line)["input_ids"] for line in lines]
    assert len({len(p) for p in ids}) > 3, "the test needs prompts of different lengths"
    return ids


def _unbatched(model, tokenizer, prompts: list[list[int]], max_new: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Reference: plain greedy decoding of each prompt alone, no padding, no generate()."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            new: list[int] = []
            for _ in range(max_new):
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            outs.append(new)
    return outs


@pytest.mark.parametrize("build", [tiny_llama, tiny_gptj], ids=["llama", "gptj"])
def test_left_padded_batches_match_unpadded_greedy(build, tokenizer, prompts) -> None:  # type: ignore[no-untyped-def]
    model = build()
    backend = TransformersBackend(model, tokenizer, batch_size=4)
    out = backend.generate(prompts, SamplingSettings(max_new_tokens=8))
    assert [o[0] for o in out] == _unbatched(model, tokenizer, prompts, 8)
    # The outputs really depend on the prompt (otherwise the comparison proves little).
    assert len({tuple(o[0]) for o in out}) > 3


def test_greedy_is_identical_across_runs_and_batchings(tokenizer, prompts) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    settings = SamplingSettings(max_new_tokens=6)
    sorted_out = TransformersBackend(model, tokenizer, batch_size=3).generate(prompts, settings)
    again = TransformersBackend(model, tokenizer, batch_size=3).generate(prompts, settings)
    unsorted = TransformersBackend(model, tokenizer, batch_size=3, sort_by_length=False).generate(
        prompts, settings
    )
    assert sorted_out == again == unsorted
    assert all(len(o) == 1 for o in sorted_out)


def test_sampling_is_reproducible_with_a_seed(tokenizer, prompts) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    backend = TransformersBackend(model, tokenizer, batch_size=8)
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, top_p=0.95, n=3, seed=7)
    first = backend.generate(prompts[:4], settings)
    assert first == backend.generate(prompts[:4], settings)
    assert [len(o) for o in first] == [3, 3, 3, 3]
    # n samples of one prompt differ from each other, and another seed gives other samples.
    assert len({tuple(c) for c in first[0]}) > 1
    other = backend.generate(prompts[:4], SamplingSettings(max_new_tokens=6, temperature=1.0, n=3, seed=8))
    assert other != first


def test_stops_at_eos_and_strips_it(tokenizer, prompts) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    full = TransformersBackend(model, tokenizer).generate(prompts[:1], SamplingSettings(max_new_tokens=8))[0][
        0
    ]
    # Make the model's own 4th greedy token its end-of-turn token (as a chat model's <|im_end|>).
    stop = full[3]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    cut = TransformersBackend(model, tokenizer).generate(prompts[:1], SamplingSettings(max_new_tokens=8))[0][
        0
    ]
    assert cut == full[: full.index(stop)]
    assert stop not in cut
    assert strip_completion([5, 1, 1, 0, 9], {0}, pad_id=1) == [5]


def test_rows_that_finish_early_carry_no_padding(tokenizer, prompts) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    full = TransformersBackend(model, tokenizer).generate(prompts[:4], SamplingSettings(max_new_tokens=8))
    stop = full[0][0][1]  # the first prompt ends after one token; the others run on in the same batch
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    out = TransformersBackend(model, tokenizer, batch_size=4).generate(
        prompts[:4], SamplingSettings(max_new_tokens=8)
    )
    assert out[0][0] == full[0][0][:1]
    for o, f in zip(out, full, strict=True):
        ref = f[0][: f[0].index(stop)] if stop in f[0] else f[0]
        assert o[0] == ref


def test_live_model_state_and_rng_are_left_alone(tokenizer, prompts) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    TransformersBackend(model, tokenizer).generate(
        prompts[:2], SamplingSettings(max_new_tokens=4, temperature=1.0, seed=1)
    )
    assert model.training
    assert torch.equal(torch.rand(3), expected_next)


def test_generate_text_decodes_n_completions(tokenizer) -> None:  # type: ignore[no-untyped-def]
    backend = make_backend("transformers", tiny_llama(), tokenizer, batch_size=2)
    texts = generate_text(
        backend,
        tokenizer,
        ["the food was", "great service"],
        SamplingSettings(max_new_tokens=5, temperature=0.8, n=2),
    )
    assert len(texts) == 2 and all(len(t) == 2 and all(isinstance(s, str) for s in t) for t in texts)
    assert any(s for t in texts for s in t)


def test_make_backend_loads_a_model_spec() -> None:
    backend = make_backend("transformers", "tiny-llama", batch_size=2)
    assert isinstance(backend, TransformersBackend)
    out = backend.generate([[1, 2, 3]], SamplingSettings(max_new_tokens=3))
    assert len(out) == 1 and len(out[0]) == 1 and len(out[0][0]) <= 3


def test_bad_backend_requests_are_refused(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_backend("onnx", tiny_llama(), tokenizer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        TransformersBackend(tiny_llama(), tokenizer).generate([[]], SamplingSettings(max_new_tokens=2))


# vLLM: tests/test_backends_vllm.py (a vLLM-servable tiny model, one engine per module).


def test_vllm_engine_args_carry_max_model_len_and_dtype(tmp_path: Path) -> None:
    """What VllmBackend hands vllm.LLM (no engine started): max_model_len and a torch dtype as vLLM's name."""
    tiny_llama().save_pretrained(tmp_path / "m")  # max_position_embeddings 256
    args = vllm_engine_args(str(tmp_path / "m"), max_model_len=200, dtype=vllm_dtype_name(torch.bfloat16))
    assert args["max_model_len"] == 200 and args["dtype"] == "bfloat16"
    assert vllm_dtype_name(None) is None and vllm_dtype_name("float16") == "float16"
    if not torch.cuda.is_available():  # unchunked prefill: one step's budget holds the longest sequence
        assert args["max_num_batched_tokens"] >= 200
        assert vllm_engine_args(str(tmp_path / "m"))["max_model_len"] == 256  # None: the model's own


@pytest.mark.parametrize("build", [tiny_llama, tiny_gptj], ids=["llama", "gptj"])
def test_greedy_decoding_loop_matches_transformers_generate(build, tokenizer, prompts) -> None:  # type: ignore[no-untyped-def]
    """The backend's own loop (prefill once per distinct prompt, stopped rows leave the batch) gives what
    `model.generate` gives, with n copies per prompt and a stop token that ends some rows early."""
    from transformers import GenerationConfig

    model = build()
    first = TransformersBackend(model, tokenizer).generate(prompts[:6], SamplingSettings(max_new_tokens=10))
    stop = first[0][0][2]  # ends row 0 early; other rows run on, or stop elsewhere
    settings = SamplingSettings(max_new_tokens=10, n=2, stop_ids=frozenset({stop}))
    ours = TransformersBackend(model, tokenizer, batch_size=12).generate(prompts[:6], settings)

    stops = sorted({tokenizer.eos_token_id, stop})
    gen = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=stops, pad_token_id=0)
    for p, completions in zip(prompts[:6], ours, strict=True):
        with torch.no_grad():
            ref = model.generate(input_ids=torch.tensor([p]), generation_config=gen)[0, len(p) :].tolist()
        assert completions == [strip_completion(ref, set(stops), None)] * 2
    assert ours[0][0] == first[0][0][: first[0][0].index(stop)] and len(ours[0][0]) < 10
    assert len({tuple(c[0]) for c in ours}) > 3


def test_top_p_and_temperature_are_transformers_warpers(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from cyclej.generation.backends import sample_next_tokens

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p in ((0.7, 0.9), (1.3, 0.5), (1.0, 0.05)):
        settings = SamplingSettings(max_new_tokens=1, temperature=temperature, top_p=top_p)
        ref = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        allowed = ref > float("-inf")
        for seed in range(20):
            torch.manual_seed(seed)
            picked = sample_next_tokens(logits, settings)
            assert bool(allowed.gather(1, picked.unsqueeze(1)).all()), (temperature, top_p, seed)
        # The draw itself: the same seed, the same probabilities, the same tokens as HF's multinomial.
        torch.manual_seed(1)
        want = torch.multinomial(ref.softmax(dim=-1), num_samples=1).squeeze(1)
        torch.manual_seed(1)
        assert torch.equal(sample_next_tokens(logits, settings), want)
    # top_p so small that only the most likely token is left: sampling is argmax.
    tiny_p = SamplingSettings(max_new_tokens=1, temperature=1.0, top_p=1e-6)
    assert torch.equal(sample_next_tokens(logits, tiny_p), logits.argmax(dim=-1))


def test_each_distinct_prompt_is_prefilled_once_and_stopped_rows_leave_the_batch(tokenizer, prompts) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    first = TransformersBackend(model, tokenizer).generate(prompts[:2], SamplingSettings(max_new_tokens=8))
    stop = first[0][0][1]  # prompt 0's rows stop after one token
    batch_rows: list[int] = []
    hook = model.register_forward_hook(
        lambda _m, _a, kw, _o: batch_rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        TransformersBackend(model, tokenizer, batch_size=8).generate(
            prompts[:2], SamplingSettings(max_new_tokens=8, n=4, stop_ids=frozenset({stop}))
        )
    finally:
        hook.remove()
    assert batch_rows[0] == 2  # the prefill: two distinct prompts, not 8 rows
    assert batch_rows[1] == 8 and batch_rows[2] < 8  # prompt 0's four rows stopped after their first token
