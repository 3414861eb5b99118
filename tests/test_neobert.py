"""The `gptj` preset's discriminator, chandar-lab/NeoBERT, loads without its hub code (cyclej.models.neobert).

The hub folder is rebuilt here at a tiny size, as the hub ships it: config.json with the hub's keys (and its
`auto_map` to `model.py`), a `model.py` that imports xformers at module level (the hub's file does, outside
any try block, so transformers' `check_imports` refuses it where xformers is missing), `model.safetensors`
with the hub's tensor names (the MLM checkpoint: `model.*` + `decoder.*`, random values written directly,
not through cyclej's classes) and a BERT WordPiece tokenizer (MiniLM's: the same bert-base-uncased vocabulary
NeoBERT uses). `reference_hidden` restates the hub's forward (its model.py + rotary.py) functionally from the
file's tensors, so cyclej's modules are checked against the hub's arithmetic, not against themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cyclej.errors import BadInput
from cyclej.models.catalog import resolve_model
from cyclej.reinforcement.discriminator import Discriminator

# The hub's config.json keys (revision 5424c8e) at a tiny size. intermediate_size 40 -> an FFN width of
# int(2 * 40 / 3) = 26, rounded up to a multiple of 8 = 32, as the hub's EncoderBlock computes it.
TINY_HUB_CONFIG = {
    "architectures": ["NeoBERTLMHead"],
    "auto_map": {
        "AutoConfig": "model.NeoBERTConfig",
        "AutoModel": "model.NeoBERT",
        "AutoModelForMaskedLM": "model.NeoBERTLMHead",
        "AutoModelForSequenceClassification": "model.NeoBERTForSequenceClassification",
    },
    "classifier_init_range": 0.02,
    "decoder_init_range": 0.02,
    "dim_head": 8,
    "embedding_init_range": 0.02,
    "hidden_size": 32,
    "intermediate_size": 40,
    "kwargs": {
        "classifier_init_range": 0.02,
        "pretrained_model_name_or_path": "google-bert/bert-base-uncased",
        "trust_remote_code": True,
    },
    "max_length": 64,
    "model_type": "neobert",
    "norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "pretrained_model_name_or_path": "google-bert/bert-base-uncased",
    "torch_dtype": "float32",
    "transformers_version": "4.48.2",
    "trust_remote_code": True,
    "vocab_size": 30522,
}
FFN = 32
HEAD_KEYS = {"dense.weight", "dense.bias", "classifier.weight", "classifier.bias"}
# What the hub's model.py starts with that matters here: the unguarded xformers import.
HUB_MODEL_PY = "import torch\nfrom torch import nn\n\nfrom xformers.ops import SwiGLU\n"

REAL_A = ["the food was cold and bland", "terrible service , never again", "rude staff and a long wait"]
REAL_B = ["the food was warm and tasty", "wonderful service , will return", "friendly staff and no wait"]


def hub_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the hub checkpoint's names and shapes (NeoBERTLMHead: 4 + 6 per layer)."""
    g = torch.Generator().manual_seed(seed)
    h, v = cfg["hidden_size"], cfg["vocab_size"]

    def lin(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) / inp**0.5

    def norm() -> torch.Tensor:  # not all ones, so a norm in the wrong place shows
        return 1.0 + 0.2 * torch.randn(h, generator=g)

    sd = {
        "model.encoder.weight": torch.randn(v, h, generator=g),
        "model.layer_norm.weight": norm(),
        "decoder.weight": lin(v, h),
        "decoder.bias": 0.1 * torch.randn(v, generator=g),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.transformer_encoder.{i}."
        sd |= {
            p + "qkv.weight": lin(3 * h, h),
            p + "wo.weight": lin(h, h),
            p + "ffn.w12.weight": lin(2 * FFN, h),
            p + "ffn.w3.weight": lin(h, FFN),
            p + "attention_norm.weight": norm(),
            p + "ffn_norm.weight": norm(),
        }
    return sd


def write_tokenizer(out: Path) -> None:
    """MiniLM's WordPiece files, declared as the hub's tokenizer declares itself (BertTokenizer, no token
    types)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(resolve_model("minilm")).save_pretrained(out)
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc |= {"tokenizer_class": "BertTokenizer", "model_input_names": ["input_ids", "attention_mask"]}
    tc_path.write_text(json.dumps(tc))


@pytest.fixture
def hub_neobert(tmp_path: Path) -> Path:
    out = tmp_path / "NeoBERT"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(TINY_HUB_CONFIG, indent=2))
    (out / "model.py").write_text(HUB_MODEL_PY)
    save_file(hub_state_dict(TINY_HUB_CONFIG), out / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(out)
    return out


def reference_hidden(
    sd: dict[str, torch.Tensor], cfg: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The hub's NeoBERT forward, restated from its model.py/rotary.py: RoPE as complex multiplication of
    consecutive pairs by polar(1, t / 10000^(2i/d)); qkv viewed per head [B, L, H, 3d] then chunked; SDPA
    under the [B, H, L, L] boolean key mask; xformers' SwiGLU with the packed w12 unbound into w1 (first
    half) and w2: w3(silu(w1 x) * w2 x); pre-RMSNorm, a final RMSNorm."""
    heads, hidden, eps = cfg["num_attention_heads"], cfg["hidden_size"], cfg["norm_eps"]
    d = hidden // heads
    b, n = input_ids.shape
    freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    angles = torch.outer(torch.arange(n), freqs).float()
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]  # [1, L, 1, d/2]

    def rope(x: torch.Tensor) -> torch.Tensor:
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis).flatten(3).type_as(x)

    mask = attention_mask.unsqueeze(1).unsqueeze(1).repeat(1, heads, n, 1).bool()
    x = F.embedding(input_ids, sd["model.encoder.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.transformer_encoder.{i}."
        h = F.rms_norm(x, (hidden,), sd[p + "attention_norm.weight"], eps)
        q, k, v = F.linear(h, sd[p + "qkv.weight"]).view(b, n, heads, 3 * d).chunk(3, dim=-1)
        q, k = rope(q), rope(k)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        x = x + F.linear(a.transpose(1, 2).reshape(b, n, hidden), sd[p + "wo.weight"])
        h = F.rms_norm(x, (hidden,), sd[p + "ffn_norm.weight"], eps)
        w12 = sd[p + "ffn.w12.weight"]
        w1, w2 = w12.view(2, w12.shape[0] // 2, w12.shape[1]).unbind(0)
        x = x + F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w2), sd[p + "ffn.w3.weight"])
    return F.rms_norm(x, (hidden,), sd["model.layer_norm.weight"], eps)


def reference_logits(hidden: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hub's classification head in eval mode: classifier(tanh(dense(x[:, 0])))."""
    pooled = torch.tanh(F.linear(hidden[:, 0], head["dense.weight"], head["dense.bias"]))
    return F.linear(pooled, head["classifier.weight"], head["classifier.bias"])


def test_the_hub_neobert_loads_without_its_remote_code_and_every_weight_lands(hub_neobert: Path) -> None:
    """trust_remote_code stays as the gptj preset has it (True): the hub's model.py (xformers) is never
    run."""
    disc = Discriminator(str(hub_neobert), REAL_A, REAL_B, trust_remote_code=True)
    from cyclej.models.neobert import NeoBERTForSequenceClassification

    assert isinstance(disc.model, NeoBERTForSequenceClassification)
    # Strict: every checkpoint tensor of the encoder lands under its own name, only the fresh head is missing,
    # and the MLM decoder (the checkpoint's own head) is all that is left over.
    _, info = NeoBERTForSequenceClassification.from_pretrained(
        hub_neobert, num_labels=3, output_loading_info=True
    )
    assert set(info["missing_keys"]) == HEAD_KEYS
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    file = load_file(hub_neobert / "model.safetensors")
    state = disc.model.state_dict()
    assert set(state) == {k for k in file if not k.startswith("decoder.")} | HEAD_KEYS
    for name, tensor in file.items():
        if not name.startswith("decoder."):
            assert torch.equal(state[name], tensor), name
    assert disc.model.config.num_labels == 3


def test_the_neobert_forward_is_the_hubs(hub_neobert: Path) -> None:
    disc = Discriminator(str(hub_neobert), REAL_A, REAL_B)
    texts = ["short", *REAL_A, "a much longer line of text so that the batch really has padding in it"]
    enc = disc.tokenizer(texts, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # padded rows are part of the check
    hidden = reference_hidden(
        load_file(hub_neobert / "model.safetensors"), TINY_HUB_CONFIG, enc["input_ids"], enc["attention_mask"]
    )
    with torch.no_grad():
        ours = disc.model.model(enc["input_ids"], enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, hidden, atol=1e-5, rtol=1e-5)  # every position, padding included
    head = {k: v for k, v in disc.model.state_dict().items() if k in HEAD_KEYS}
    got = disc.probabilities(texts)
    torch.testing.assert_close(got, reference_logits(hidden, head).softmax(-1), atol=1e-6, rtol=1e-6)
    # Padding changes nothing for the real tokens: each line alone scores as it does in the batch.
    alone = torch.cat([disc.probabilities([t]) for t in texts])
    torch.testing.assert_close(alone, got, atol=1e-5, rtol=1e-5)


def test_the_neobert_discriminator_trains_saves_and_reloads(hub_neobert: Path, tmp_path: Path) -> None:
    disc = Discriminator(str(hub_neobert), REAL_A, REAL_B, lr=3e-3, batch_size=6, seed=0)
    before = {k: v.clone() for k, v in disc.model.state_dict().items()}

    def real_loss() -> float:
        probs = disc.probabilities(REAL_A + REAL_B)
        truth = torch.tensor([0] * len(REAL_A) + [1] * len(REAL_B))
        return float(F.nll_loss(probs.log(), truth))

    loss0 = real_loss()
    disc.warm_up(15)
    disc.update(["generated text one", "generated text two"])
    assert real_loss() < loss0 - 0.1
    after = disc.model.state_dict()
    for name in (
        "model.encoder.weight",
        "model.transformer_encoder.0.qkv.weight",
        "model.transformer_encoder.1.ffn.w12.weight",
        "model.layer_norm.weight",
        "classifier.weight",
    ):
        assert not torch.equal(after[name], before[name]), f"{name} did not move"

    out = disc.save_pretrained(tmp_path / "trained")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "neobert"
    assert saved["architectures"] == ["NeoBERTForSequenceClassification"]
    assert "auto_map" not in saved and "trust_remote_code" not in saved  # no pointer to a missing model.py
    again = Discriminator(str(out), REAL_A, REAL_B, trust_remote_code=True)
    reloaded = again.model.state_dict()
    assert set(reloaded) == set(after)
    for name, tensor in after.items():
        assert torch.equal(reloaded[name], tensor), name
    torch.testing.assert_close(again.probabilities(REAL_A), disc.probabilities(REAL_A), atol=0, rtol=0)


def remote_code_folder(tmp_path: Path) -> Path:
    """A remote-code encoder whose modeling file imports a package this machine does not have."""
    out = tmp_path / "needs-a-package"
    out.mkdir()
    (out / "config.json").write_text(
        json.dumps(
            {
                "model_type": "cyclej-remote-test",
                "architectures": ["RemoteModel"],
                "auto_map": {
                    "AutoConfig": "modeling.RemoteConfig",
                    "AutoModelForSequenceClassification": "modeling.RemoteModel",
                },
            }
        )
    )
    (out / "modeling.py").write_text("import cyclej_no_such_package\n")
    write_tokenizer(out)
    return out


def test_a_remote_code_encoder_that_cannot_import_is_one_bad_input_line(tmp_path: Path) -> None:
    folder = remote_code_folder(tmp_path)
    with pytest.raises(BadInput) as err:
        Discriminator(str(folder), REAL_A, REAL_B, trust_remote_code=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"models.discriminator {folder}:")
    assert "cyclej_no_such_package" in msg


def test_the_rl_stage_refuses_a_bad_discriminator_before_it_loads_the_policy(tmp_path: Path) -> None:
    """The merge artifact here holds no loadable policy: a stage that loads the policy first fails on that
    (after minutes, for GPT-J-6B); one that loads the discriminator first names models.discriminator."""
    from cyclej.config import load_config
    from cyclej.pipeline.registry import StageRun, run_stage
    from cyclej.runtime.progress import Progress
    from cyclej.runtime.store import ArtifactStore
    from cyclej.stages.rl import run_rl

    cfg = load_config(preset="tiny", storage=str(tmp_path / "store"))
    cfg.models.discriminator = str(remote_code_folder(tmp_path))
    store = ArtifactStore.from_config(cfg.storage)
    data = run_stage("data", cfg, {}, store, Progress(show_bar=False))
    work = store.workdir("merge", "nopolicy00000001")
    (work / "model").mkdir(parents=True)
    (work / "model" / "config.json").write_text("{}")
    (work / "metrics.json").write_text("{}")
    merge = store.commit("merge", "nopolicy00000001", work)
    with pytest.raises(BadInput, match=r"^models\.discriminator "):
        run_rl(StageRun.start("rl", cfg, {"merge": merge, "data": data}, store, Progress(show_bar=False)))
