"""Training throughput: our trainer (packed rows, loss head only on target tokens) against transformers'
`Trainer` (one example per row, padded per batch by its collator), same model, data and hyper-parameters.

Both train the same LoRA (rank 8, alpha √8, all linear projections) on the same `domain_train` examples
built from the shipped Yelp sample (short sentences: where padding wastes most), with effective batch 32
(micro-batch 8 × accumulation 4), LR 1e-4, 10 % warm-up then cosine, grad clip 1.0, AdamW (0.9, 0.95)
eps 1e-6, fp32 on CPU, for the same number of optimizer steps. Throughput = real (non-padding) tokens
trained on per second of wall-clock `train` time, in one process, one run each. Target: ratio ≥ 1.3.

    .venv/bin/python bench/train_throughput.py [--model small|tiny-llama|smollm2] [--steps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cyclej.config import TrainConfig  # noqa: E402
from cyclej.corpora.formats import Example, domain_example  # noqa: E402
from cyclej.models.loading import load_model, marker_token_ids  # noqa: E402
from cyclej.runtime.store import ArtifactStore, StageCheckpoints  # noqa: E402
from cyclej.training.trainer import train  # noqa: E402

MARKERS = ["<|A|>", "<|B|>"]


def build_small_llama(out: Path) -> Path:
    """A small random Llama (4 layers, d=256) with the shipped tiny tokenizer: more compute per token
    than the test-sized models, still minutes on a CPU."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cyclej.models.catalog import tiny_tokenizer_dir

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir()).save_pretrained(out)
    return out


def examples_from_yelp(tokenizer: Any, ids: list[int], per_domain: int) -> list[Example]:
    yelp = Path(str(resources.files("cyclej") / "samples" / "yelp"))
    out = []
    for marker, name in zip(ids, ("train.0", "train.1"), strict=True):
        lines = (yelp / name).read_text(encoding="utf-8").splitlines()[:per_domain]
        out += [domain_example(tokenizer, marker, line) for line in lines]
    return out


def run_ours(spec: str, examples: list[Example], cfg: TrainConfig) -> tuple[float, float, int, float]:
    model, tok = load_model(spec, markers=MARKERS)
    ids = marker_token_ids(tok, MARKERS)
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        result = train(
            model,
            train_examples=examples,
            tcfg=cfg,
            checkpoints=StageCheckpoints(ArtifactStore(d), "domain_train", "bench"),
            tokenizer=tok,
            marker_ids=ids,
        )
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, int(result.metrics["tokens_seen"]), float(result.metrics["final_train_loss"])


def run_hf_trainer(spec: str, examples: list[Example], cfg: TrainConfig) -> tuple[float, float, int, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok = load_model(spec, markers=MARKERS)
    assert cfg.lora is not None
    torch.manual_seed(cfg.seed)
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    seen = {"tokens": 0}

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(
            output_dir=d,
            per_device_train_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
            max_steps=cfg.max_steps,
            learning_rate=cfg.lr,
            warmup_steps=cfg.warmup_ratio,
            lr_scheduler_type="cosine",
            max_grad_norm=cfg.max_grad_norm,
            adam_beta1=cfg.betas[0],
            adam_beta2=cfg.betas[1],
            adam_epsilon=cfg.eps,
            weight_decay=cfg.weight_decay,
            seed=cfg.seed,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            logging_steps=cfg.max_steps,
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
        t0, c0 = time.perf_counter(), time.process_time()
        out = trainer.train()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, seen["tokens"], float(out.training_loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="small", help="small (a 4-layer Llama built here), tiny-llama, smollm2"
    )
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128, help="our packed row length")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternate the two runs this many times and keep each one's best rate (noisy hosts)",
    )
    ap.add_argument("--lines", type=int, default=1500, help="Yelp lines per domain")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        spec = str(build_small_llama(Path(tmp) / "small")) if args.model == "small" else args.model
        model, tok = load_model(spec, markers=MARKERS)
        examples = examples_from_yelp(tok, marker_token_ids(tok, MARKERS), args.lines)
        del model
        cfg = TrainConfig(
            batch_size=32,
            micro_batch_size=8,
            lr=1e-4,
            warmup_ratio=0.1,
            max_steps=args.steps,
            seq_len=args.seq_len,
            packing=True,
            precision="fp32",
            checkpoint_every_steps=10**6,
            checkpoint_every_minutes=10**6,
            eval_every_steps=10**6,
        )
        mean_len = sum(len(e.input_ids) for e in examples) / len(examples)
        print(
            f"model {args.model}; {len(examples)} examples, mean {mean_len:.1f} tokens; "
            f"batch 32 = 8 × 4, {args.steps} steps, torch threads {torch.get_num_threads()}"
        )

        hf_runs, ours_runs = [], []
        for _ in range(args.repeats):
            hf_runs.append(run_hf_trainer(spec, examples, cfg))
            ours_runs.append(run_ours(spec, examples, cfg))

    best = {
        name: min(runs, key=lambda r: r[0] / r[2]) for name, runs in (("hf", hf_runs), ("ours", ours_runs))
    }
    for name, label in (
        ("hf", "transformers Trainer (padding per batch)"),
        ("ours", f"cyclej trainer (packing, seq_len {args.seq_len})"),
    ):
        wall, cpu, tokens, loss = best[name]
        print(
            f"{label:42s} {tokens:7d} tokens in {wall:6.1f} s = {tokens / wall:7.0f} tokens/s "
            f"({tokens / cpu:7.0f} per CPU-second; final loss {loss:.3f})"
        )
    (hf_wall, hf_cpu, hf_tokens, _), (our_wall, our_cpu, our_tokens, _) = best["hf"], best["ours"]
    ratio = (our_tokens / our_wall) / (hf_tokens / hf_wall)
    cpu_ratio = (our_tokens / our_cpu) / (hf_tokens / hf_cpu)
    print(f"ratio cyclej / Trainer: {ratio:.2f}× wall-clock, {cpu_ratio:.2f}× CPU time  (target ≥ 1.3×)")


if __name__ == "__main__":
    main()
