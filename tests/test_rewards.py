"""Rewards on known pairs: identical text scores ~1 on the cycle terms, unrelated text scores low; the
discriminator reward is p(real target-domain text) and learns real vs generated."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch

from cyclej.models.embedder import load_embedder
from cyclej.reinforcement import rewards
from cyclej.reinforcement.discriminator import Discriminator

SOURCES = [
    "The food was cold and the waiter ignored us for an hour.",
    "I loved the pasta. The staff were friendly and quick!",
    "Parking is a nightmare on weekends.",
]
UNRELATED = [
    "Quarterly revenue grew by four percent in the northern region.",
    "Photosynthesis converts light energy into chemical energy.",
    "The violin concerto premiered in Vienna in 1806.",
]


@pytest.fixture(scope="module")
def minilm() -> rewards.SentenceTransformer:
    return load_embedder("minilm")


def test_identical_text_scores_one_on_every_cycle_term(minilm: rewards.SentenceTransformer) -> None:
    got = rewards.cycle_rewards(minilm, SOURCES, SOURCES)
    assert set(got) == {"embedding", "rouge", "bleu"}
    for name, values in got.items():
        assert len(values) == len(SOURCES)
        assert all(v == pytest.approx(1.0, abs=1e-4) for v in values), (name, values)


def test_unrelated_text_scores_low(minilm: rewards.SentenceTransformer) -> None:
    got = rewards.cycle_rewards(minilm, SOURCES, UNRELATED)
    assert max(got["embedding"]) < 0.3, got["embedding"]
    assert max(got["rouge"]) < 0.2, got["rouge"]
    assert max(got["bleu"]) < 0.1, got["bleu"]


def test_partial_overlap_scores_between(minilm: rewards.SentenceTransformer) -> None:
    src = ["The food was cold and the waiter ignored us for an hour."]
    near = ["The food was cold and the waiter ignored us."]
    got = rewards.cycle_rewards(minilm, src, near)
    for name in ("embedding", "rouge", "bleu"):
        assert 0.3 < got[name][0] < 0.999, (name, got[name])
    # Word overlap ranks a near copy above unrelated text on every term.
    far = rewards.cycle_rewards(minilm, src, UNRELATED[:1])
    assert all(got[k][0] > far[k][0] for k in got)


def test_rouge_uses_sentences_and_empty_output_scores_zero() -> None:
    two = ["It was great. We will come back!"]
    assert rewards.rouge_l(two, two) == [pytest.approx(1.0)]
    assert rewards.rouge_l(two, [""]) == [0.0]
    assert rewards.bleu(two, [""]) == [0.0]
    # Sentence order matters little to summary-level ROUGE-L, a lot to BLEU.
    swapped = ["We will come back! It was great."]
    assert rewards.rouge_l(two, swapped)[0] > 0.9
    assert rewards.bleu(two, swapped)[0] < rewards.rouge_l(two, swapped)[0]


def test_tiny_bert_embedder_gets_mean_pooling() -> None:
    tiny = load_embedder("tiny-bert")
    assert tiny.get_embedding_dimension() == 32
    sims = rewards.embedding_similarity(tiny, ["a cat", "a dog"], ["a cat", "stock prices fell sharply"])
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] < 0.999


def test_combine_and_summarize() -> None:
    parts = {"rouge": [1.0, 0.0], "bleu": [0.5, 0.5]}
    total = rewards.combine(parts, {"rouge": 2.0, "bleu": 1.0, "unused": 3.0})
    assert total == [2.5, 0.5]
    stats = rewards.summarize(parts, total)
    assert stats["reward/rouge/mean"] == 0.5 and stats["reward/rouge/std"] == 0.5
    assert stats["reward/total/mean"] == 1.5 and stats["reward/total/std"] == 1.0
    with pytest.raises(ValueError, match="no weight"):
        rewards.combine({"typo": [1.0]}, {"rouge": 1.0})
    with pytest.raises(ValueError, match="back-translations"):
        rewards.bleu(["a"], [])


def test_product_makes_a_copy_worth_nothing_where_the_sum_prefers_it() -> None:
    """rl.reward_combination product: style x content. Rollout 0 copies its source (perfect cycle, judged as
    the source domain), rollout 1 transfers (judged the target domain, a looser cycle)."""
    parts = {"embedding": [1.0, 0.6], "rouge": [1.0, 0.3], "bleu": [1.0, 0.1], "discriminator": [0.05, 0.5]}
    weights = {"embedding": 1.0, "rouge": 0.5, "bleu": 0.5, "discriminator": 1.5}
    copy_sum, transfer_sum = rewards.combine(parts, weights)
    assert copy_sum > transfer_sum  # the sum: the copy wins, as it did in both yelp runs
    copy_product, transfer_product = rewards.combine_product(parts, weights)
    assert copy_product == pytest.approx(0.05) and transfer_product == pytest.approx(0.5 * 0.8 / 2)
    assert rewards.combine_product({"embedding": [-0.5], "discriminator": [1.0]}, weights) == [0.0]  # clipped
    with pytest.raises(ValueError, match="discriminator"):
        rewards.combine_product({"rouge": [1.0]}, weights)
    with pytest.raises(ValueError, match="cycle reward"):
        rewards.combine_product({"discriminator": [1.0]}, weights)


# ---- the discriminator reward ---------------------------------------------------------------------------
REAL_A = [
    "the food was cold and bland",
    "terrible service and rude staff",
    "we waited an hour, never again",
    "the soup was salty and the bread stale",
]
REAL_B = [
    "lovely staff and great coffee",
    "the best pasta in town",
    "friendly service, we will be back",
    "amazing desserts and a cozy room",
]
GENERATED = ["zq xv kkp", "## ## ## ##", "lll mmm nnn", "qq qq qq"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine: no thread contention
    yield
    torch.set_num_threads(before)


def discriminator(seed: int = 0) -> Discriminator:
    return Discriminator("tiny-bert", REAL_A, REAL_B, lr=5e-3, batch_size=12, buffer_size=8, seed=seed)


def test_discriminator_reward_is_the_probability_of_real_target_text(one_thread: None) -> None:
    disc = discriminator()
    untrained = disc.reward(REAL_B[:2], ["b", "b"])
    assert all(abs(p - 1 / 3) < 0.1 for p in untrained)  # a fresh 3-class head is near uniform
    for _ in range(30):
        stats = disc.update(GENERATED)
    assert stats["disc/accuracy"] > 0.9 and len(disc.replay) == 8  # the buffer keeps the newest 8
    real_b, fake_b = disc.reward(REAL_B, ["b"] * 4), disc.reward(GENERATED, ["b"] * 4)
    assert min(real_b) > max(fake_b)
    # A copy of the source (real A text) is not a good translation into B: it scores as real A.
    a_as_b, a_as_a = disc.reward(REAL_A, ["b"] * 4), disc.reward(REAL_A, ["a"] * 4)
    assert all(x < y for x, y in zip(a_as_b, a_as_a, strict=True))
    probs = disc.probabilities(REAL_A + GENERATED)
    assert torch.allclose(probs.sum(-1), torch.ones(8), atol=1e-5)


def test_discriminator_state_round_trips_exactly(one_thread: None) -> None:
    first = discriminator()
    for _ in range(3):
        first.update(GENERATED[:2])
    second = discriminator(seed=1)  # a different head and sampling stream, replaced by the loaded state
    saved = io.BytesIO()  # through bytes, as a checkpoint goes (an in-memory copy would share tensors)
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    second.load_state_dict(torch.load(saved, weights_only=True))
    first.update(GENERATED[2:])
    second.update(GENERATED[2:])
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(first.replay) == list(second.replay)


def test_discriminator_warm_up_tells_the_real_domains_apart_before_rl(one_thread: None) -> None:
    """rl.discriminator_warmup_steps: real A vs real B only, so a copy of an A source already scores low as a
    translation into B at RL's first step (a fresh head gives every text ~1/3)."""
    disc = discriminator()
    assert disc.domain_accuracy(REAL_A, REAL_B) <= 0.75  # near chance, fresh
    stats = disc.warm_up(20)
    assert stats["disc/accuracy"] == 1.0 and not disc.replay  # nothing generated was seen
    assert disc.domain_accuracy(REAL_A, REAL_B) == 1.0
    copy_as_b, real_as_b = disc.reward(REAL_A, ["b"] * 4), disc.reward(REAL_B, ["b"] * 4)
    assert max(copy_as_b) < 0.25 < 0.5 < min(real_as_b)


def test_content_floor_pays_styled_babble_nothing_and_rescales_what_carries_content() -> None:
    """rl.content_floor: babble whose back-translation is a generic line keeps ~0.1-0.3 of the cycle reward;
    above the floor it earns 0 however styled, and a transfer that comes back keeps a rescaled share."""
    parts = {"embedding": [0.25, 0.8], "rouge": [0.05, 0.6], "bleu": [0.0, 0.4], "discriminator": [0.9, 0.6]}
    weights = {"embedding": 1.0, "rouge": 0.5, "bleu": 0.5, "discriminator": 1.5}
    babble, transfer = rewards.combine_product(parts, weights)
    assert babble > 0.3 * transfer  # without a floor styled babble earns a third of a real transfer
    babble, transfer = rewards.combine_product(parts, weights, content_floor=0.4)
    assert babble == 0.0 and transfer == pytest.approx(0.6 * (0.65 - 0.4) / 0.6)
    with pytest.raises(ValueError, match="content_floor"):
        rewards.combine_product(parts, weights, content_floor=1.0)


def test_content_floor_without_the_product_is_refused() -> None:
    from cyclej.config import RLConfig

    with pytest.raises(ValueError, match="content_floor applies to reward_combination product"):
        RLConfig(content_floor=0.4)
    assert RLConfig(content_floor=0.4, reward_combination="product").content_floor == 0.4


def test_rl_options_that_are_off_keep_the_rl_fingerprint() -> None:
    """The option came after runs existed: off (0) it is not in the fingerprint, on it is."""
    from cyclej.config import load_config
    from cyclej.pipeline.registry import SPECS, fingerprints

    cfg = load_config(preset="tiny")
    on = cfg.model_copy(
        update={
            "rl": cfg.rl.model_copy(
                update={
                    "discriminator_warmup_steps": 5,
                    "reward_combination": "product",
                    "discriminator_reward": "style",
                    "content_floor": 0.4,
                    "prompt_mix": "adaptive",
                    "rewards": cfg.rl.rewards.model_copy(update={"self_bleu": 1.0}),
                }
            )
        }
    )
    off_keys = {
        "discriminator_warmup_steps",
        "reward_combination",
        "discriminator_reward",
        "content_floor",
        "prompt_mix",
    }
    assert not off_keys & set(SPECS["rl"].config_slice(cfg)["rl"])
    assert "self_bleu" not in SPECS["rl"].config_slice(cfg)["rl"]["rewards"]
    assert SPECS["rl"].config_slice(on)["rl"]["rewards"]["self_bleu"] == 1.0
    assert SPECS["rl"].config_slice(on)["rl"]["prompt_mix"] == "adaptive"
    assert SPECS["rl"].config_slice(on)["rl"]["discriminator_reward"] == "style"
    assert SPECS["rl"].config_slice(on)["rl"]["discriminator_warmup_steps"] == 5
    assert SPECS["rl"].config_slice(on)["rl"]["reward_combination"] == "product"
    assert SPECS["rl"].config_slice(on)["rl"]["content_floor"] == 0.4
    assert fingerprints(cfg)["rl"] != fingerprints(on)["rl"]
    assert fingerprints(cfg)["merge"] == fingerprints(on)["merge"]


def test_style_reward_ignores_the_generated_class(one_thread: None) -> None:
    """rl.discriminator_reward style: p(target | real). Once the head has learned generated text (as it soon
    does online) it takes probability from real text too, and p(real target) sinks for everything; the style
    reward keeps the real classes' verdict, and a copy of an A source is still judged A."""
    disc = discriminator()
    disc.warm_up(20)
    for _ in range(30):
        disc.update(GENERATED)
    worded = [g for g in GENERATED if any(ch.isalnum() for ch in g)]  # "## ## ## ##" scores 0 either way
    as_b, as_a = disc.reward(worded, ["b"] * 3, "style"), disc.reward(worded, ["a"] * 3, "style")
    assert all(abs(b + a - 1.0) < 1e-5 for a, b in zip(as_a, as_b, strict=True))  # the real classes only
    real_b_target, real_b_style = disc.reward(REAL_B, ["b"] * 4), disc.reward(REAL_B, ["b"] * 4, "style")
    assert min(real_b_style) > 0.9 and all(
        s > t + 0.1 for s, t in zip(real_b_style, real_b_target, strict=True)
    )
    assert max(disc.reward(REAL_A, ["b"] * 4, "style")) < 0.1  # a copy of A as a translation into B


def test_style_gain_pays_a_copy_nothing_and_a_transfer_its_change(one_thread: None) -> None:
    """rl.discriminator_reward style_gain: style(y) − style(source). A copy gains exactly 0 however the head
    judges the source (the yelp `style` run drifted to copies of sources the head misjudged); a translation
    into real target-style text gains what the head's verdict moved."""
    disc = discriminator()
    disc.warm_up(20)
    copies = disc.reward(REAL_A, ["b"] * 4, "style_gain", sources=REAL_A)
    assert copies == [0.0] * 4
    transfers = disc.reward(REAL_B, ["b"] * 4, "style_gain", sources=REAL_A)
    style_b, style_a_as_b = disc.reward(REAL_B, ["b"] * 4, "style"), disc.reward(REAL_A, ["b"] * 4, "style")
    assert min(transfers) > 0.5
    assert transfers == pytest.approx([y - x for y, x in zip(style_b, style_a_as_b, strict=True)], abs=1e-6)
    backwards = disc.reward(REAL_A, ["a"] * 4, "style_gain", sources=REAL_B)  # B sources into A
    assert min(backwards) > 0.5
    with pytest.raises(ValueError, match="one source per text"):
        disc.reward(REAL_B, ["b"] * 4, "style_gain")


def test_the_rl_reward_gives_the_discriminator_each_rollouts_source(one_thread: None) -> None:
    """CycleDiscriminatorReward passes the rollouts' sources through, so style_gain sees copy vs transfer."""
    from cyclej.reinforcement.policy_gradient import CycleDiscriminatorReward, Rollouts

    disc = discriminator()
    disc.warm_up(20)
    reward_fn = CycleDiscriminatorReward({"discriminator": 1.0}, None, disc, "style_gain")
    rollouts = Rollouts(
        group_size=2,
        sources=[REAL_A[0]] * 2,
        source_domains=["a"] * 2,
        target_domains=["b"] * 2,
        translations=[REAL_A[0], REAL_B[0]],
    )
    copy, transfer = reward_fn(rollouts)["discriminator"]
    assert copy == 0.0 and transfer > 0.5


def test_self_bleu_reward_scores_the_translation_against_its_source_not_the_cycle() -> None:
    """rl.rewards.self_bleu: BLEU of y vs x (a minimal edit keeps most of it), whatever x̂ is."""
    from cyclej.reinforcement.policy_gradient import CycleDiscriminatorReward, Rollouts

    src = "the food was cold and the service was slow ."
    rollouts = Rollouts(
        group_size=2,
        sources=[src] * 2,
        source_domains=["a"] * 2,
        target_domains=["b"] * 2,
        translations=["the food was hot and the service was fast .", "i love this place so much !"],
        back_translations=[src] * 2,
    )
    out = CycleDiscriminatorReward({"rouge": 1.0, "self_bleu": 1.0}, None, None)(rollouts)
    assert out["rouge"] == [1.0, 1.0]  # both cycles came back
    minimal, rewrite = out["self_bleu"]
    assert minimal > 0.2 and rewrite < 0.05


def test_style_rewards_pay_an_empty_or_punctuation_output_nothing(one_thread: None) -> None:
    """The renormalized head cannot see the 'generated' verdict; the yelp style_gain run learned to answer
    with an immediate EOS because the head judged the empty string target-style. No words, no style."""
    disc = discriminator()
    disc.warm_up(20)
    outputs = ["", "  ", " . !", REAL_B[0]]
    assert disc.reward(outputs, ["b"] * 4, "style")[:3] == [0.0] * 3
    gains = disc.reward(outputs, ["b"] * 4, "style_gain", sources=[REAL_A[0]] * 4)
    assert gains[:3] == [0.0] * 3 and gains[3] > 0.5
    assert disc.reward([""], ["b"], "real_target")[0] > 0.0  # the 3-class reward keeps its own verdict
