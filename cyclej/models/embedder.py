"""The sentence embedder: one loader for the paraphrase filter (cyclej.generation.paraphraser), the RL reward
(cyclej.reinforcement.rewards) and the evaluation's similarity (cyclej.evaluation.scorers),
so all three embed a text alike.

A folder saved by sentence-transformers (it has modules.json, like the shipped MiniLM) loads as it is; a
plain Hugging Face encoder (the tiny random BERT of the tests, a BERT folder) gets a Transformer + mean
pooling pipeline, which is what sentence-transformers would build for it anyway, built here so that it
is the same on every sentence-transformers version.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cyclej.errors import BadInput, first_line
from cyclej.models.catalog import resolve_model

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def load_embedder(spec: str, device: str | torch.device | None = None) -> SentenceTransformer:
    """A SentenceTransformer for a model spec (built-in name, local directory or hub id), on `device`
    (default: the GPU when there is one)."""
    # `models` is a deprecated alias that sentence-transformers installs at import time; no stub knows it.
    from sentence_transformers import SentenceTransformer, models  # type: ignore[attr-defined]

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_model(spec)
    local = Path(path)
    if local.is_dir() and not (local / "modules.json").is_file():
        word = models.Transformer(path)
        # renamed in sentence-transformers 6 (get_word_embedding_dimension before)
        dim_of = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
        pooling = models.Pooling(dim_of(), pooling_mode="mean")
        return SentenceTransformer(modules=[word, pooling], device=str(device))
    try:
        return SentenceTransformer(path, device=str(device))
    except OSError as exc:
        raise BadInput(f"models.embedder {spec}: cannot load ({first_line(exc, 160)})") from None
