"""Time and peak RSS of the streaming merge vs the naive two-model merge and mergekit's linear merge.

    .venv/bin/python bench/merge_memory.py [--hidden 512 --layers 8 --vocab 8192 --shard 40MB --workdir DIR]

Builds a random Llama base (sharded safetensors) and two random LoRA adapters (r=8, all-linear,
trained-looking marker rows), then runs each merge in its own subprocess and reads its peak RSS (VmHWM)
beside the RSS right after its imports (the interpreter's baseline):

- cyclej: `cyclej.merging.linear.merge_lora_adapters`, shard by shard;
- naive: PEFT merge_and_unload of each adapter into its own copy of the base (two full models), weighted
  average, save_pretrained;
- mergekit (if installed): the two full models must first exist on disk (materialized with merge_and_unload,
  not timed), then mergekit's `linear` method merges them (`mergekit.merge.run_merge`, CPU, lazy loading).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKERS = ["<|A|>", "<|B|>"]

_HEADER = """
import json, sys, time
import psutil, torch, transformers, peft, safetensors  # the baseline includes the imports every merge needs
from transformers import AutoModelForCausalLM
import transformers.models.llama.modeling_llama
from cyclej.merging.linear import peak_rss_bytes
"""
_FOOTER = """
print(json.dumps({"baseline": baseline, "peak": peak_rss_bytes(),
                  "seconds": time.monotonic() - t0, "cpu_seconds": time.process_time() - c0}))
"""

CYCLEJ = """
from cyclej.merging.linear import load_adapter, merge_lora_adapters
baseline = psutil.Process().memory_info().rss
t0, c0 = time.monotonic(), time.process_time()
base, sa, sb, out = sys.argv[1:5]
merge_lora_adapters(base, out, [(load_adapter(sa), 0.5), (load_adapter(sb), 0.5)])
"""

NAIVE = """
from peft import PeftModel
from safetensors.torch import load_file
baseline = psutil.Process().memory_info().rss
t0, c0 = time.monotonic(), time.process_time()
base, sa, sb, out = sys.argv[1:5]

def full(stage):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, f"{stage}/adapter").merge_and_unload()
    rows = load_file(f"{stage}/marker_rows.safetensors")
    with torch.no_grad():
        model.get_input_embeddings().weight[rows["token_ids"]] = rows["input_embeddings"]
        if "output_embeddings" in rows:
            model.get_output_embeddings().weight[rows["token_ids"]] = rows["output_embeddings"]
    return model

model_a, model_b = full(sa), full(sb)
with torch.no_grad():
    params_b = dict(model_b.named_parameters())
    for name, p in model_a.named_parameters():
        p.mul_(0.5).add_(params_b[name], alpha=0.5)
model_a.save_pretrained(out, max_shard_size="40MB")
"""

MERGEKIT = """
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
baseline = psutil.Process().memory_info().rss
t0, c0 = time.monotonic(), time.process_time()
full_a, full_b, out = sys.argv[1:4]
config = MergeConfiguration.model_validate({
    "merge_method": "linear",
    "models": [
        {"model": full_a, "parameters": {"weight": 0.5}},
        {"model": full_b, "parameters": {"weight": 0.5}},
    ],
    "dtype": "float32",
})
run_merge(config, out, options=MergeOptions(lazy_unpickle=True, copy_tokenizer=True))
"""


def build(workdir: Path, hidden: int, layers: int, vocab: int, shard: str) -> tuple[Path, Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cyclej.models.catalog import tiny_tokenizer_dir

    base = workdir / "base"
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(base, max_shard_size=shard)
    tok.save_pretrained(base)
    ids = torch.tensor(tok.convert_tokens_to_ids(MARKERS))
    stages = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        peft_model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=math.sqrt(8), target_modules="all-linear", init_lora_weights=False),
        )
        stage = workdir / f"stage{seed}"
        peft_model.save_pretrained(stage / "adapter")
        model = peft_model.unload()
        save_file(
            {
                "token_ids": ids,
                "input_embeddings": torch.randn(len(ids), hidden),
                "output_embeddings": torch.randn(len(ids), hidden),
            },
            stage / "marker_rows.safetensors",
        )
        stages.append(stage)
    return base, stages[0], stages[1]


def materialize(base: Path, stage: Path, out: Path) -> None:
    """A full fine-tuned model on disk (what mergekit needs as input)."""
    script = NAIVE.split("model_a, model_b")[0] + f"full({str(stage)!r}).save_pretrained({str(out)!r})\n"
    code = _HEADER + script.replace("base, sa, sb, out = sys.argv[1:5]", f"base = {str(base)!r}")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    shutil.copy(base / "tokenizer.json", out / "tokenizer.json")
    shutil.copy(base / "tokenizer_config.json", out / "tokenizer_config.json")


def measure(name: str, body: str, args: list[str]) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", _HEADER + body + _FOOTER, *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_outputs(workdir: Path, others: list[str]) -> dict[str, float]:
    """Largest per-tensor relative difference between our merged model and each other method's."""
    from safetensors.torch import load_file

    def read(d: Path) -> dict:
        out: dict = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    ours = read(workdir / "out_cyclej")
    result = {}
    for name in others:
        theirs = read(workdir / f"out_{name}")
        missing = set(ours) - set(theirs)
        if missing:
            raise RuntimeError(f"{name}: tensors missing from its output: {sorted(missing)[:5]}")
        result[name] = max(
            float((ours[k].double() - theirs[k].double()).abs().max() / ours[k].double().abs().max())
            for k in ours
        )
    return result


def mergekit_available() -> bool:
    try:
        import mergekit  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--shard", default="40MB")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="merge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    base, sa, sb = build(workdir, args.hidden, args.layers, args.vocab, args.shard)
    shards = sorted(base.glob("*.safetensors"))
    model_mb = sum(p.stat().st_size for p in shards) / 2**20
    largest_mb = max(p.stat().st_size for p in shards) / 2**20
    adapters_mb = sum((s / "adapter" / "adapter_model.safetensors").stat().st_size for s in (sa, sb)) / 2**20
    print(
        f"base: {model_mb:.0f} MiB in {len(shards)} shards (largest {largest_mb:.0f} MiB), "
        f"adapters {adapters_mb:.1f} MiB"
    )

    results: dict[str, dict[str, float]] = {}
    results["cyclej streaming"] = measure(
        "cyclej", CYCLEJ, [str(base), str(sa), str(sb), str(workdir / "out_cyclej")]
    )
    results["naive two-model"] = measure(
        "naive", NAIVE, [str(base), str(sa), str(sb), str(workdir / "out_naive")]
    )
    if mergekit_available():
        t0 = time.monotonic()
        materialize(base, sa, workdir / "full_a")
        materialize(base, sb, workdir / "full_b")
        print(f"(mergekit input: two full models materialized in {time.monotonic() - t0:.1f} s, not counted)")
        results["mergekit linear"] = measure(
            "mergekit",
            MERGEKIT,
            [str(workdir / "full_a"), str(workdir / "full_b"), str(workdir / "out_mergekit")],
        )
    else:
        print("mergekit: not installed (pip install mergekit==0.1.5); skipped")

    agreement = compare_outputs(
        workdir, [n for n in ("naive", "mergekit") if (workdir / f"out_{n}").is_dir()]
    )

    ours = results["cyclej streaming"]
    ours_extra = ours["peak"] - ours["baseline"]
    print(
        f"\n{'method':<18} {'wall s':>7} {'cpu s':>7} {'peak RSS MiB':>13} {'above baseline MiB':>19} "
        f"{'wall ratio':>11} {'cpu ratio':>10} {'extra-RSS ratio':>16}"
    )
    for name, r in results.items():
        extra = r["peak"] - r["baseline"]
        print(
            f"{name:<18} {r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} {r['peak'] / 2**20:>13.0f} "
            f"{extra / 2**20:>19.0f} {r['seconds'] / ours['seconds']:>11.2f} "
            f"{r['cpu_seconds'] / ours['cpu_seconds']:>10.2f} {extra / max(ours_extra, 1):>16.2f}"
        )
    print("\nratios are relative to the cyclej streaming merge (peak RSS: above the post-import baseline)")
    for name, rel in agreement.items():
        print(f"largest relative difference, cyclej vs {name}: {rel:.2e}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
