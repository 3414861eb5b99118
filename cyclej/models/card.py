"""The model card: a README.md in the final model directory (config, data, metrics, how to load it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cyclej.config import PipelineConfig

PI_KEY = "cyclej_position_interpolation"
MODEL_INFO = "cyclej.json"  # the markers and domain names, beside the weights


def write_model_card(
    model_dir: str | Path,
    cfg: PipelineConfig,
    metrics_table_md: str,
    data_stats: dict[str, Any] | None = None,
    extra_md: str = "",
) -> Path:
    """Write `<model_dir>/README.md` (and `cyclej.json`, the markers and domain names) and return its path."""
    out = Path(model_dir)
    a, b = cfg.domain_a, cfg.domain_b
    config_json = out / "config.json"
    model_config = json.loads(config_json.read_text(encoding="utf-8")) if config_json.is_file() else {}
    pi_factor = model_config.get(PI_KEY)
    model_type = model_config.get("model_type", "?")
    write_model_info(out, [a.marker, b.marker], [a.name, b.name])

    gptj_note = ""
    if model_type == "gptj" and pi_factor:
        gptj_note = (
            "\n"
            "> **GPT-J and the extended context.** This model runs with linear position interpolation "
            f"(factor {pi_factor}, recorded as `{PI_KEY}` in config.json). transformers' GPT-J has no "
            "setting for it: plain `AutoModelForCausalLM.from_pretrained` loads the weights but with the "
            "original position tables, which is fine for inputs up to the original length and wrong beyond "
            "it. `cyclej.models.loading.load_model(dir)` re-applies the interpolation; vLLM reads the "
            f"`rope_parameters` (linear, factor {pi_factor}) written beside it.\n"
        )
    text = f"""---
library_name: transformers
tags: [cyclej, text-style-transfer, cycle-consistency]
---

# {cfg.name}: CYCLE_J {a.name} ↔ {b.name}

A causal language model ({model_type}) that rewrites text from domain **{a.name}** into \
domain **{b.name}** and
back, trained by CYCLE_J: context extension, paraphrase LoRA (INTERMEDIATE-2A), domain LoRA
(INTERMEDIATE-2B), a linear merge (INTERMEDIATE-3), then RL on cycle consistency and a discriminator.

## Prompt format

Two added special tokens mark the domains: `{a.marker}` = {a.name}, `{b.marker}` = {b.name}. To rewrite a text
into the other domain, prompt `{{source marker}}{{text}}{{target marker}}` and decode greedily until EOS:

- {a.name} → {b.name}: `{a.marker}the text{b.marker}`
- {b.name} → {a.name}: `{b.marker}the text{a.marker}`

`cyclej.json` in this folder records the markers and domain names.

## Load with transformers

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", dtype=torch.bfloat16)
prompt = "{a.marker}" + "the text to rewrite" + "{b.marker}"
ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
out = model.generate(**ids, max_new_tokens=64, do_sample=False, eos_token_id=tok.eos_token_id)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

Or with CYCLE_J: `cyclej translate --model path/to/this/folder --to b input.txt` (one line out per line in),
or `cyclej.models.loading.load_model("path/to/this/folder")` in Python.
{gptj_note}
## Serve with vLLM

```python
from vllm import LLM, SamplingParams

llm = LLM(model="path/to/this/folder")
params = SamplingParams(temperature=0.0, max_tokens=64)
outputs = llm.generate(["{a.marker}the text to rewrite{b.marker}"], params)
print(outputs[0].outputs[0].text)
```

The markers are special tokens of the tokenizer in this folder, so vLLM maps them to their ids. Training
prompts carry no BOS token; if your tokenizer adds one, pass token ids instead:
`llm.generate({{"prompt_token_ids": tok(prompt, add_special_tokens=False)["input_ids"]}}, params)`.

## Evaluation

{metrics_table_md.strip()}
{extra_md}
## Data

{_data_section(cfg, data_stats or {})}

## Training configuration

```yaml
{cfg.to_yaml().rstrip()}
```
"""
    path = out / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def _data_section(cfg: PipelineConfig, stats: dict[str, Any]) -> str:
    lines = ["| domain | marker | train lines | dev lines | sources |", "|---|---|---|---|---|"]
    for key, dom in (("a", cfg.domain_a), ("b", cfg.domain_b)):
        s = stats.get(key, {})
        train = s.get("train", {}).get("kept", "?")
        dev = s.get("dev", {}).get("kept", "?")
        files = s.get("files", {}).get("train") or dom.train
        sources = ", ".join(f"`{Path(f).name}`" for f in files)
        lines.append(f"| {dom.name} | `{dom.marker}` | {train} | {dev} | {sources} |")
    return "\n".join(lines)


def write_model_info(model_dir: str | Path, markers: Sequence[str], domains: list[str]) -> None:
    """`cyclej.json` beside the weights: the marker tokens [A, B] and the domain names."""
    info = {"markers": list(markers), "domains": list(domains)}
    (Path(model_dir) / MODEL_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def read_model_info(model_dir: str | Path) -> dict[str, Any] | None:
    p = Path(model_dir) / MODEL_INFO
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))
