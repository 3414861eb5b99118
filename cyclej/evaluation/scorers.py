"""The evaluation's scorers, one sentence pair or one corpus at a time: sentence-embedding similarity
(cyclej.models.embedder, loaded as the paraphrase filter and the RL reward load it), corpus BLEU, the length
ratio and J. Style (cyclej.evaluation.judge) and fluency (cyclej.evaluation.fluency) have their own modules.
"""

from __future__ import annotations

import numpy as np
import sacrebleu
import torch


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """Sentence embeddings: a sentence-transformers folder as is, any other encoder with mean pooling."""

    def __init__(self, spec: str) -> None:
        from cyclej.models.embedder import load_embedder

        self.spec = spec
        # Loaded as the paraphrase filter and the RL reward load it (plain encoders get mean pooling).
        self.model = load_embedder(spec, _device())

    def similarity(self, xs: list[str], ys: list[str], batch_size: int = 64) -> list[float]:
        """Cosine similarity of each pair (xs[i], ys[i]); 0.0 where either side is empty."""
        if not xs:
            return []
        ex = self.model.encode(xs, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
        ey = self.model.encode(ys, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
        sims = (ex * ey).sum(-1).clamp(-1.0, 1.0).tolist()
        return [s if x.strip() and y.strip() else 0.0 for s, x, y in zip(sims, xs, ys, strict=True)]


def bleu(hyps: list[str], refs: list[str]) -> float:
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score) if hyps else 0.0


def length_ratio(outputs: list[str], sources: list[str]) -> float:
    """Mean over sentences of output words / source words (sources without words skipped)."""
    ratios = [len(o.split()) / len(s.split()) for o, s in zip(outputs, sources, strict=True) if s.split()]
    return float(np.mean(ratios)) if ratios else 0.0


def j_score(acc: list[float], sim: list[float], fluent: list[float]) -> float:
    """J = mean_i acc_i × max(0, sim_i) × fluent_i."""
    if not acc:
        return 0.0
    return float(np.mean([a * max(0.0, s) * f for a, s, f in zip(acc, sim, fluent, strict=True)]))
