"""The `paraphrase` stage: prompts per chat template, cleaning, every filter, the rejection limit,
shards and resume after a kill (transformers backend, tiny random model, greedy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cyclej.config import PipelineConfig, load_config
from cyclej.errors import StageFailed
from cyclej.generation.paraphraser import (
    PromptBuilder,
    RejectionStats,
    build_messages,
    check_rejection_rate,
    clean_output,
    is_commentary,
    is_copy,
    is_refusal,
    is_runaway,
    judge_candidates,
    load_embedder,
    supports_system_role,
)
from cyclej.pipeline.registry import StageRun, run_stage, stage_fingerprint
from cyclej.runtime.progress import Progress
from cyclej.runtime.store import ArtifactRef, ArtifactStore
from cyclej.stages.paraphrase import plan_shards, run_paraphrase, run_paraphrase_shard
from tests.helpers.tiny_models import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

YELP = Path(__file__).resolve().parents[1] / "cyclej" / "samples" / "yelp"
REPO = Path(__file__).resolve().parents[1]

# Modelled on the real templates: Mistral-7B-Instruct-v0.1 (user/assistant only, raises on a system
# turn) and Qwen2.5-Instruct (ChatML; a system turn, with a default one when none is given).
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# A template that silently drops system turns: rendering succeeds, but there is no system role.
DROPS_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'USER: ' + message['content'] + '\\n' }}{% endif %}{% endfor %}ASSISTANT:"
)


@pytest.fixture
def tokenizer():  # type: ignore[no-untyped-def]
    from cyclej.models.catalog import tiny_tokenizer_dir

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())


# ---- prompts ----------------------------------------------------------------------------------------


def test_mistral_style_template_gets_no_system_message(tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer.chat_template = MISTRAL_V01_TEMPLATE
    assert not supports_system_role(tokenizer)
    builder = PromptBuilder(tokenizer, "Paraphrase this.", "You rewrite text faithfully.")
    prompt = builder.text("the food was cold")
    assert prompt == "<|endoftext|>[INST] Paraphrase this.\n\nText: the food was cold [/INST]"
    assert "You rewrite text faithfully." not in prompt
    # The template's BOS is the one BOS: encoding must not add another.
    ids = builder.ids("the food was cold")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_qwen_style_template_gets_the_system_prompt(tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer.chat_template = QWEN25_TEMPLATE
    assert supports_system_role(tokenizer)
    prompt = PromptBuilder(tokenizer, "Paraphrase this.", "You rewrite text faithfully.").text("great tacos")
    assert prompt == (
        "<|im_start|>system\nYou rewrite text faithfully.<|im_end|>\n"
        "<|im_start|>user\nParaphrase this.\n\nText: great tacos<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "You are Qwen" not in prompt


def test_system_role_detection_sees_a_silently_dropped_system_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer.chat_template = DROPS_SYSTEM_TEMPLATE
    assert not supports_system_role(tokenizer)
    assert build_messages("x", "Do it.", "sys", system_role=False) == [
        {"role": "user", "content": "Do it.\n\nText: x"}
    ]


def test_no_chat_template_gets_a_plain_prompt(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert not tokenizer.chat_template
    builder = PromptBuilder(tokenizer, "Paraphrase this.", "ignored")
    assert builder.text("slow service") == "Paraphrase this.\n\nText: slow service\nParaphrase:"
    assert tokenizer.decode(builder.ids("slow service")).endswith("Paraphrase:")


# ---- cleaning and filters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ('Here is a paraphrase:\n\n"The soup was cold."\n\nI hope this helps!', "The soup was cold."),
        ("Sure! Here's the paraphrased version of the text: The soup was cold.", "The soup was cold."),
        ("Paraphrase: “The soup was cold.”", "The soup was cold."),
        ("**Paraphrased text:** The soup\nwas cold.\n\nNote: I kept the tone.", "The soup was cold."),
        ("  'The soup was cold.'  ", "The soup was cold."),
        ("Rewritten version: The soup was cold.", "The soup was cold."),
        ("The soup was cold: nobody cared.", "The soup was cold: nobody cared."),
        ('The original text is: "The soup was cold."', "The soup was cold."),
        ("The paraphrased sentence reads: The soup was cold.", "The soup was cold."),
        ("Here is a paraphrase:", ""),
        ("I'll rephrase it to: The soup was cold.", "The soup was cold."),
        ("i 'll rephrase it to : the soup was cold .", "the soup was cold ."),
        ("Let me reword that: The soup was cold.", "The soup was cold."),
        ("I would say the soup was cold: nobody cared.", "I would say the soup was cold: nobody cared."),
        ("The text could be rephrased to: The soup was cold!", "The soup was cold!"),
        ("The original text does not convey it. The revised text would be: Cold soup.", "Cold soup."),
        ('"The soup was cold." This rephrasing keeps the tone.', "The soup was cold."),
        ("'It's cold,' she said of the soup.", "'It's cold,' she said of the soup."),
        ("Text: The soup was cold.", "The soup was cold."),
    ],
)
def test_clean_output(raw: str, clean: str) -> None:
    assert clean_output(raw) == clean


def _cfg(**paraphrase: object) -> PipelineConfig:
    cfg = load_config(preset="tiny")
    return cfg.model_copy(update={"paraphrase": cfg.paraphrase.model_copy(update=paraphrase)})


SOURCE = "The waiter ignored us for twenty minutes and the pasta arrived cold."


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        ("", "empty"),
        ('Here is a paraphrase:\n\n""', "empty"),
        ("  ...  ", "empty"),
        ("I'm sorry, but I cannot help with rewriting this review.", "refusal"),
        ("As an AI language model, I don't have opinions about restaurants.", "refusal"),
        ("I cannot paraphrase this text.", "refusal"),
        ("This sentence uses a more formal tone to describe the slow service.", "commentary"),
        ("In this context, the waiter ignoring us means the service was poor.", "commentary"),
        ("For twenty minutes no server came; this paraphrase keeps the cold pasta.", "commentary"),
        ("Note: the original text complains about a slow waiter and cold pasta.", "commentary"),
        ("'Twenty minutes' is a colloquial expression often used to describe a long wait.", "commentary"),
        (SOURCE, "copy"),
        ("the waiter ignored us for twenty minutes, and the pasta arrived COLD!", "copy"),
        ("The waiter ignored us for twenty minutes and the pasta arrived cold .", "copy"),
        ("Cold pasta.", "runaway"),
        ("We waited twenty minutes for a waiter who ignored us. " * 5, "runaway"),
        ("For twenty minutes no server came to our table, and when the pasta came it was cold.", None),
    ],
)
def test_every_rejection_reason(candidate: str, reason: str | None) -> None:
    cfg = _cfg(min_length_ratio=0.5, max_length_ratio=2.0, max_copy_bleu=0.6)
    judged = judge_candidates([SOURCE], [[candidate]], cfg.paraphrase)[0]
    if reason is None:
        assert judged.paraphrase == clean_output(candidate) and judged.reasons == []
        assert 0 <= judged.scores["self_bleu"] < 0.6 and 0.5 <= judged.scores["length_ratio"] <= 2
    else:
        assert judged.paraphrase is None and judged.reasons == [reason]


def test_filters_are_plain_functions() -> None:
    assert is_copy("Great food!", "great food", max_copy_bleu=0.99)  # normalized equality
    assert not is_copy("Great food!", "Lovely dishes.", max_copy_bleu=0.99)
    # A review that apologizes itself is no refusal when the paraphrase keeps the apology.
    assert not is_refusal("I'm sorry to say the food was bad.", "I'm sorry, but the meal was poor.")
    assert is_refusal("The food was bad.", "I'm sorry, but I can't do that.")
    # Commentary only when the source does not match the pattern itself.
    assert is_commentary("The food was bad.", "The sentence expresses disappointment with the food.")
    assert not is_commentary("They rewrite the menu daily.", "The menu gets rewritten every day.")
    assert not is_commentary("The food was bad.", "The meal was poor.")
    assert is_runaway("abcd", "a", 0.3, 3.0) and is_runaway("abcd", "a" * 13, 0.3, 3.0)
    assert not is_runaway("abcd", "abcdef", 0.3, 3.0)


def test_drift_uses_the_embedder_threshold() -> None:
    embed = load_embedder("tiny-bert")  # a plain HF encoder wrapped with mean pooling
    candidates = ["The pasta came cold after a long wait.", "Stock prices fell sharply on Monday morning."]
    vecs = embed([SOURCE, *candidates])
    assert abs(float((vecs[0] * vecs[0]).sum()) - 1.0) < 1e-4  # unit-norm
    sims = [float((vecs[0] * v).sum()) for v in vecs[1:]]
    assert sims[0] != sims[1]
    threshold = sum(sims) / 2  # between the two: exactly the less similar one drifts
    cfg = _cfg(min_similarity=threshold, max_length_ratio=5.0)
    judged = [judge_candidates([SOURCE], [[c]], cfg.paraphrase, embed)[0] for c in candidates]
    lower = min(range(2), key=lambda i: sims[i])
    assert judged[lower].reasons == ["drift"] and judged[lower].paraphrase is None
    assert judged[1 - lower].reasons == [] and judged[1 - lower].scores["similarity"] >= threshold
    # Of two survivors the more similar one is kept.
    both = judge_candidates(
        [SOURCE], [candidates], _cfg(min_similarity=-1.0, max_length_ratio=5.0).paraphrase, embed
    )[0]
    assert both.paraphrase == candidates[1 - lower]


def test_without_embedder_the_least_copied_candidate_is_kept() -> None:
    cands = [
        "The waiter ignored us for twenty minutes and then the pasta arrived cold.",
        "Nobody served us for twenty minutes, and our pasta was cold when it came.",
        "I'm sorry, I cannot do that.",
    ]
    judged = judge_candidates([SOURCE], [cands], _cfg(max_copy_bleu=0.95).paraphrase)[0]
    assert judged.paraphrase == cands[1]
    assert judged.reasons == ["refusal"]


def test_high_rejection_rate_fails_with_rate_and_top_reasons() -> None:
    cfg = _cfg(max_length_ratio=3.0)
    sources = [SOURCE] * 4
    outputs = [
        [SOURCE],
        [SOURCE.upper()],
        ["I'm sorry, I can't."],
        ["Nobody served us for ages; the pasta was cold."],
    ]
    stats = RejectionStats()
    stats.add(judge_candidates(sources, outputs, cfg.paraphrase), 1)
    assert stats.rejection_rate == 0.75
    check_rejection_rate(stats, 0.8)  # under the limit: no error
    with pytest.raises(StageFailed) as err:
        check_rejection_rate(stats, 0.5)
    assert "rejection rate 0.75 > 0.50 (top reasons: copy 2, refusal 1)" in str(err.value)
    assert err.value.stage == "paraphrase"


# ---- the stage: shards, resume, statistics ----------------------------------------------------------


@pytest.fixture(scope="module")
def paraphraser_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose greedy output depends on its prompt (so resumed output can differ)."""
    from cyclej.models.catalog import tiny_tokenizer_dir

    out = tmp_path_factory.mktemp("paraphraser")
    tiny_llama(seed=0).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir()).save_pretrained(out)
    return out


def _data_artifact(store: ArtifactStore, per_domain: int = 4) -> ArtifactRef:
    """A committed `data` artifact holding the first Yelp lines of each domain."""
    work = store.workdir("data", "testdata00000000")
    for domain, src in (("a", "train.0"), ("b", "train.1")):
        lines = (YELP / src).read_text(encoding="utf-8").splitlines()[:per_domain]
        (work / domain).mkdir(exist_ok=True)
        (work / domain / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (work / domain / "dev.txt").write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    (work / "stats.json").write_text("{}", encoding="utf-8")
    return store.commit("data", "testdata00000000", work)


def _stage_cfg(root: Path, paraphraser: Path, *extra: str) -> PipelineConfig:
    return load_config(
        preset="tiny",
        storage=str(root),
        overrides=[
            f"models.paraphraser={paraphraser}",
            "paraphrase.max_texts_per_domain=4",
            "paraphrase.shard_size=2",
            "paraphrase.max_new_tokens=6",
            "paraphrase.batch_size=4",
            "paraphrase.temperature=0.0",  # greedy: a resumed run must equal an uninterrupted one
            *extra,
        ],
    )


def _run(cfg: PipelineConfig, store: ArtifactStore, data: ArtifactRef) -> ArtifactRef:
    return run_stage("paraphrase", cfg, {"data": data}, store, Progress(show_bar=False))


def test_kill_at_shard_then_resume_generates_only_missing_shards(
    tmp_path: Path, paraphraser_dir: Path
) -> None:
    # Reference: one uninterrupted run in its own store.
    ref_cfg = _stage_cfg(tmp_path / "ref", paraphraser_dir)
    ref_store = ArtifactStore(ref_cfg.storage.root)
    ref_data = _data_artifact(ref_store)
    ref = _run(ref_cfg, ref_store, ref_data)
    ref_dir = ref_store.fetch(ref)
    assert ref_store.list_checkpoints("paraphrase", ref.fingerprint) == [f"shard-{i:05d}" for i in range(4)]
    for i in range(4):
        shard = ref_store.load_checkpoint("paraphrase", ref.fingerprint, f"shard-{i:05d}")
        records = [json.loads(x) for x in (shard / "shard.jsonl").read_text().splitlines()]
        assert len(records) == 2 and {r["domain"] for r in records} == {"a" if i < 2 else "b"}

    # The same stage in a child process, killed (SIGKILL, no clean-up) when it reaches shard 1.
    cfg = _stage_cfg(tmp_path / "run", paraphraser_dir)
    store = ArtifactStore(cfg.storage.root)
    data = _data_artifact(store)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "data.json").write_text(data.to_json())
    script = (
        "import sys\n"
        "from cyclej.config import PipelineConfig\n"
        "from cyclej.runtime.progress import Progress\n"
        "from cyclej.pipeline.registry import run_stage\n"
        "from cyclej.runtime.store import ArtifactRef, ArtifactStore\n"
        "cfg = PipelineConfig.model_validate_json(open(sys.argv[1]).read())\n"
        "data = ArtifactRef.from_json(open(sys.argv[2]).read())\n"
        "run_stage('paraphrase', cfg, {'data': data}, ArtifactStore(cfg.storage.root), "
        "Progress(show_bar=False))\n"
    )
    env = {**os.environ, "CYCLEJ_FAULT": "paraphrase:1:kill", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "cfg.json"), str(tmp_path / "data.json")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    fp = stage_fingerprint("paraphrase", cfg, {"data": data.fingerprint})
    assert fp == ref.fingerprint  # the storage root is not part of the fingerprint
    assert store.list_checkpoints("paraphrase", fp) == ["shard-00000"]
    assert not store.exists("paraphrase", fp)
    shard0_manifest = Path(store.root) / "paraphrase" / fp / "checkpoints" / "shard-00000" / "MANIFEST.json"
    shard0_before = shard0_manifest.read_bytes()

    # Re-run the stage in this process: only shards 1-3 are generated; the result equals the
    # uninterrupted run. (The stage function itself: run_stage would first wait out the dead
    # process's lease, which is the store's business and tested there.)
    out = run_paraphrase(StageRun.start("paraphrase", cfg, {"data": data}, store, Progress(show_bar=False)))
    stats = json.loads((store.fetch(out) / "stats.json").read_text())
    assert stats["shards_generated"] == [1, 2, 3] and stats["shards_reused"] == [0]
    assert shard0_manifest.read_bytes() == shard0_before
    assert (store.fetch(out) / "pairs.jsonl").read_bytes() == (ref_dir / "pairs.jsonl").read_bytes()
    assert out.metrics["shards_generated"] == 3

    # And once committed, a third run is a cache hit that generates nothing.
    assert _run(cfg, store, data) == out


def test_artifact_holds_pairs_stats_and_samples(tmp_path: Path, paraphraser_dir: Path) -> None:
    cfg = _stage_cfg(tmp_path, paraphraser_dir, "paraphrase.n_candidates=2", "paraphrase.temperature=0.9")
    store = ArtifactStore(cfg.storage.root)
    data = _data_artifact(store)
    assert plan_shards(cfg, {"data": data}, store) == 4
    out = _run(cfg, store, data)
    d = store.fetch(out)
    pairs = [json.loads(x) for x in (d / "pairs.jsonl").read_text().splitlines()]
    stats = json.loads((d / "stats.json").read_text())
    samples = json.loads((d / "samples.json").read_text())
    assert pairs and all(set(p) == {"domain", "text", "paraphrase", "scores"} for p in pairs)
    assert all(p["paraphrase"] and "\n" not in p["paraphrase"] for p in pairs)
    assert stats["texts"] == 8 and stats["candidates"] == 16
    assert stats["kept"] == len(pairs) == stats["pairs"] == sum(stats["pairs_per_domain"].values())
    assert stats["kept"] + stats["rejected"] == 8
    assert set(stats["rejection_reasons"]) == {"empty", "refusal", "commentary", "copy", "runaway", "drift"}
    assert stats["generated_tokens"] > 0 and stats["tokens_per_second"] > 0
    assert samples == [p for p in pairs if p in samples] and 0 < len(samples) <= 20
    assert out.metrics["pairs"] == len(pairs)


def test_stage_fails_on_too_many_rejections_and_commits_nothing(
    tmp_path: Path, paraphraser_dir: Path
) -> None:
    # No 6-token output can be 50x its source: every text is rejected as runaway.
    cfg = _stage_cfg(
        tmp_path,
        paraphraser_dir,
        "paraphrase.min_length_ratio=50",
        "paraphrase.max_length_ratio=60",
        "paraphrase.max_rejection_rate=0.5",
    )
    store = ArtifactStore(cfg.storage.root)
    data = _data_artifact(store)
    with pytest.raises(StageFailed, match=r"rejection rate 1\.00 > 0\.50 \(top reasons: runaway 8\)"):
        _run(cfg, store, data)
    fp = stage_fingerprint("paraphrase", cfg, {"data": data.fingerprint})
    assert not store.exists("paraphrase", fp)
    assert len(store.list_checkpoints("paraphrase", fp)) == 4  # the generations are kept


def test_shard_task_with_embedder_and_oom_adaptation(
    tmp_path: Path, paraphraser_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One mapped shard task: drift scores from the tiny encoder, and an injected OOM halves the batch."""
    monkeypatch.setenv("CYCLEJ_FAULT", "paraphrase:2:oom")
    cfg = _stage_cfg(
        tmp_path, paraphraser_dir, "paraphrase.use_embedder=true", "paraphrase.min_similarity=-1"
    )
    store = ArtifactStore(cfg.storage.root)
    data = _data_artifact(store)
    inputs = {"data": data}
    run_paraphrase_shard(cfg, inputs, store, 2, Progress(show_bar=False))
    fp = stage_fingerprint("paraphrase", cfg, {"data": data.fingerprint})
    assert store.list_checkpoints("paraphrase", fp) == ["shard-00002"]
    shard = store.load_checkpoint("paraphrase", fp, "shard-00002")
    shard_stats = json.loads((shard / "stats.json").read_text())
    assert shard_stats["oom_retries"] == 1 and shard_stats["batch_size"] == 2
    records = [json.loads(x) for x in (shard / "shard.jsonl").read_text().splitlines()]
    kept = [r for r in records if r["paraphrase"] is not None]
    assert kept and all(-1.0 <= r["scores"]["similarity"] <= 1.0 for r in kept)
    # Running the task again is a no-op (a retried mapped task must not redo a saved shard).
    before = (shard / "MANIFEST.json").read_bytes()
    run_paraphrase_shard(cfg, inputs, store, 2, Progress(show_bar=False))
    assert (shard / "MANIFEST.json").read_bytes() == before


def test_tiny_preset_paraphrases_within_its_rejection_limit(tmp_path: Path) -> None:
    """The shipped tiny preset as it is (tiny-llama paraphraser) after the real data stage."""
    cfg = load_config(preset="tiny", storage=str(tmp_path))
    store = ArtifactStore(cfg.storage.root)
    data = run_stage("data", cfg, {}, store, Progress(show_bar=False))
    out = _run(cfg, store, data)
    stats = json.loads((store.fetch(out) / "stats.json").read_text())
    assert stats["texts"] == 64 and stats["shards"] == 4
    assert stats["pairs"] > 0 and stats["rejection_rate"] <= cfg.paraphrase.max_rejection_rate
    assert stats["pairs_per_domain"]["a"] > 0 and stats["pairs_per_domain"]["b"] > 0


@pytest.mark.slow
def test_smollm2_paraphrases_16_yelp_lines(tmp_path: Path) -> None:
    cfg = load_config(
        preset="demo",
        storage=str(tmp_path),
        overrides=[
            "paraphrase.max_texts_per_domain=8",
            "paraphrase.shard_size=8",
            "paraphrase.max_new_tokens=40",
        ],
    )
    store = ArtifactStore(cfg.storage.root)
    data = _data_artifact(store, per_domain=8)
    out = _run(cfg, store, data)
    d = store.fetch(out)
    stats = json.loads((d / "stats.json").read_text())
    pairs = [json.loads(x) for x in (d / "pairs.jsonl").read_text().splitlines()]
    print(
        "\nSmolLM2 on 16 Yelp lines:",
        json.dumps(
            {
                k: stats[k]
                for k in (
                    "texts",
                    "kept",
                    "rejected",
                    "rejection_rate",
                    "rejection_reasons",
                    "tokens_per_second",
                )
            }
        ),
    )
    for p in pairs[:6]:
        print(f"  [{p['domain']}] {p['text']!r}\n      -> {p['paraphrase']!r}  {p['scores']}")
    assert stats["texts"] == 16 and stats["kept"] + stats["rejected"] == 16
    assert sum(stats["rejection_reasons"].values()) == stats["rejected"]  # one candidate per text
    # The demo samples one candidate per text at temperature 0.7: it kept 62 of 128 in the demo run
    # (48 %) and 7 of these 16 once; fewer than 6 would mean the paraphraser or the filters broke.
    assert stats["kept"] >= 6, stats
    assert all(p["scores"]["similarity"] >= cfg.paraphrase.min_similarity for p in pairs)


def test_a_shard_another_run_is_generating_is_waited_for_not_generated_again(
    tmp_path: Path, paraphraser_dir: Path
) -> None:
    """Two runs of one config at once: the shard leased by the other (live) run is left to it; this run
    waits, then finds the other's checkpoint and keeps it as it is."""
    import threading
    import time

    from cyclej.runtime.store import _local_host

    cfg = _stage_cfg(tmp_path, paraphraser_dir)
    store = ArtifactStore(cfg.storage.root)
    data = _data_artifact(store)
    fp = stage_fingerprint("paraphrase", cfg, {"data": data.fingerprint})
    lease = f"paraphrase/{fp}/checkpoints/shard-00001.LEASE.json"
    # The other run: a live process of this host that is not this one (this process's own leftover leases
    # are taken over at once), here our parent.
    store.put_json(lease, {"owner": f"{_local_host()}:{os.getppid()}:other-run", "expires": time.time() + 60})
    worker = threading.Thread(
        target=run_paraphrase_shard, args=(cfg, {"data": data}, store, 1, Progress(show_bar=False))
    )
    worker.start()
    time.sleep(1.5)
    assert worker.is_alive() and store.list_checkpoints("paraphrase", fp) == []  # waiting, not generating
    theirs = store.checkpoint_workdir("paraphrase", fp, "shard-00001")
    (theirs / "shard.jsonl").write_text('{"from": "the other run"}\n', encoding="utf-8")
    store.save_checkpoint("paraphrase", fp, "shard-00001", theirs)
    store.remove(lease)
    worker.join(timeout=60)
    assert not worker.is_alive()
    kept = store.load_checkpoint("paraphrase", fp, "shard-00001")
    assert (kept / "shard.jsonl").read_text(encoding="utf-8") == '{"from": "the other run"}\n'


@pytest.mark.parametrize(
    ("source", "paraphrase", "expected"),
    [
        (
            "i should n't have to ask where my order is .",
            "I shouldn't have to ask where my order is.",
            "i should n't have to ask where my order is .",
        ),
        (
            "service at this place is terrible .",
            "The service here is terrible, honestly!",
            "the service here is terrible , honestly !",
        ),
        ("The Service Was Great.", "The staff's service was great.", "The staff's service was great."),
        ("we 'll be back , it 's great", "We'll return; it's great", "we 'll return ; it 's great"),
    ],
)
def test_paraphrase_takes_the_source_surface_form(source: str, paraphrase: str, expected: str) -> None:
    from cyclej.generation.paraphraser import match_surface

    assert match_surface(source, paraphrase) == expected
