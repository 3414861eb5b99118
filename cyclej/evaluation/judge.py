"""The style judge of the evaluation: which domain does a sentence belong to?

Deliberately independent of the RL discriminator (a neural encoder trained on the policy's own outputs):
a logistic regression on TF-IDF word (1–2-gram) and character (2–5-gram) features, fitted once on the
train corpora of both domains. Its accuracy on the dev sets is reported next to every style score, so a
reader can tell how far to trust them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_union

from cyclej.config import DomainKey
from cyclej.errors import BadInput


@dataclass
class StyleJudge:
    pipeline: Pipeline
    dev_accuracy: float  # on the dev sets of both domains, each sentence counted once
    dev_accuracy_a: float
    dev_accuracy_b: float

    def prob_b(self, texts: list[str]) -> np.ndarray:
        """P(domain b | text) for each text."""
        if not texts:
            return np.zeros(0)
        return self.pipeline.predict_proba(texts)[:, 1]

    def predict(self, texts: list[str]) -> list[DomainKey]:
        return ["b" if p >= 0.5 else "a" for p in self.prob_b(texts)]

    def accuracy(self, texts: list[str], domain: DomainKey) -> list[float]:
        """1.0 where the judge assigns the text to `domain`, else 0.0."""
        return [1.0 if d == domain else 0.0 for d in self.predict(texts)]


def train_judge(
    train_a: list[str], train_b: list[str], dev_a: list[str], dev_b: list[str], seed: int = 0
) -> StyleJudge:
    """Fit on the train corpora of both domains; measure accuracy on their dev sets."""
    for name, lines in (("train a", train_a), ("train b", train_b), ("dev a", dev_a), ("dev b", dev_b)):
        if not lines:
            raise BadInput(f"style judge: the {name} set is empty")
    features = make_union(
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=1, sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True),
    )
    # Balanced classes: an unbalanced corpus pair must not make "always the bigger domain" look accurate.
    classifier = LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced", random_state=seed)
    pipeline = Pipeline([("features", features), ("classifier", classifier)])
    pipeline.fit(list(train_a) + list(train_b), [0] * len(train_a) + [1] * len(train_b))
    judge = StyleJudge(pipeline, 0.0, 0.0, 0.0)
    acc_a = float(np.mean(judge.accuracy(dev_a, "a")))
    acc_b = float(np.mean(judge.accuracy(dev_b, "b")))
    judge.dev_accuracy = (acc_a * len(dev_a) + acc_b * len(dev_b)) / (len(dev_a) + len(dev_b))
    judge.dev_accuracy_a, judge.dev_accuracy_b = acc_a, acc_b
    return judge
