"""Generation engines are released deterministically: a stage never starts while another stage's engine
(the paraphrase stage's cached vLLM engine, kept between shards) still holds the device."""

from __future__ import annotations

import gc
import importlib.util
import inspect
import weakref
from pathlib import Path

import pytest
import torch

from cyclej.config import load_config
from cyclej.generation import engines
from cyclej.pipeline.registry import run_stage
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactStore
from cyclej.stages import paraphrase as para_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


class FakeEngine:
    """Stands in for a backend only where what is checked is who calls close() and when."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.fixture(autouse=True)
def nothing_held() -> None:
    engines.release_all()
    yield
    engines.release_all()


def cache_paraphraser(backend: object) -> None:
    """What `_paraphraser` does for a new engine: shut the old one down, cache the new one for the next
    shard and register the hold."""
    para_stage.release_paraphrasers()
    para_stage._PARAPHRASERS[("test",)] = para_stage._Paraphraser(backend, None, None)  # type: ignore[arg-type]
    engines.hold("paraphrase", para_stage.release_paraphrasers, reusable=True)


def test_the_next_stage_shuts_the_paraphrase_engine_down_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cyclej.stages import data as data_stage

    cfg = load_config(preset="tiny", storage=str(tmp_path / "store"))
    store = ArtifactStore.from_config(cfg.storage)
    engine = FakeEngine()
    cache_paraphraser(engine)
    started = []
    run_data = data_stage.run_data

    def seen_by_stage(*args: object) -> object:
        started.append((engine.closed, dict(para_stage._PARAPHRASERS)))
        return run_data(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(data_stage, "run_data", seen_by_stage)
    run_stage("data", cfg, {}, store, Progress(show_bar=False))
    assert started == [(1, {})]  # closed and dropped before the stage's own code ran
    assert engines.held() == []


def test_the_paraphrase_stage_keeps_its_own_engine_and_a_new_config_replaces_it() -> None:
    first, second = FakeEngine(), FakeEngine()
    cache_paraphraser(first)
    assert engines.release_all(starting="paraphrase") == []  # its shards share the engine
    assert first.closed == 0
    cache_paraphraser(second)  # the paraphraser of another config: the old engine goes first
    assert first.closed == 1 and second.closed == 0
    assert engines.release_all(starting="rl") == ["paraphrase"] and second.closed == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed here")
def test_a_real_vllm_engine_is_gone_and_its_memory_back_before_the_next_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cyclej.generation.backends import SamplingSettings, VllmBackend
    from cyclej.models.catalog import tiny_tokenizer_dir

    # vLLM's CPU attention needs head_dim 64: hidden 128 over 2 heads.
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir()).save_pretrained(tmp_path / "m")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
    eager = {"enforce_eager": True} if "enforce_eager" in inspect.signature(VllmBackend).parameters else {}
    backend = VllmBackend(str(tmp_path / "m"), max_model_len=128, gpu_memory_utilization=0.5, **eager)
    # No dtype given: the project's rule, float32 on a CPU (vLLM's own "auto" chose bf16 for this fp32
    # folder, and on an Intel Xeon with AMX its worker died at the first generate).
    assert backend.llm.llm_engine.model_config.dtype == torch.float32
    assert backend.generate([[5, 6, 7]], SamplingSettings(max_new_tokens=4))[0][0]
    engine_ref = weakref.ref(backend.llm)
    cache_paraphraser(backend)
    del backend
    gc.collect()
    assert engine_ref() is not None  # the module-level cache keeps the engine alive between shards …

    assert engines.release_all(starting="para_train") == ["paraphrase"]
    # … and before the next stage it is shut down and gone (weights and KV cache with it), not left to
    # whenever the garbage collector reaches its reference cycles.
    assert engine_ref() is None
    assert para_stage._PARAPHRASERS == {}
