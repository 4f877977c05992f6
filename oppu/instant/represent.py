"""A user's history as a vector: L2-normalized TF-IDF over the rendered history items (pure, numpy).

The vocabulary and IDF come from a fixed reference set (the bank users' histories), so a user's
vector is a function of that user's own history and the fixed bank only: no other user moves it.
Tokens are the retrieval tokenizer's (oppu.retrieval.bm25.tokenize: lowercase, alphanumeric runs,
English stopwords out); items are rendered with their answer field (task.render_item), which is
where a user's behaviour shows (their tags, their titles).

    hv = HistoryVectors([history_text(task, u.history) for u in bank_users])
    sims = hv.matrix(bank_texts) @ hv.vector(history_text(task, new_user.history))   # cosine [n_bank]
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from oppu.retrieval.bm25 import tokenize


def history_text(task, items: Sequence[dict]) -> str:
    """One user's history as text: each item rendered with its answer, one line each."""
    return "\n".join(task.render_item(it) for it in items)


class HistoryVectors:
    """TF-IDF (sublinear tf, smoothed idf) fitted on reference documents, one per bank user."""

    def __init__(self, docs: Sequence[str]) -> None:
        toks = [set(tokenize(d)) for d in docs]
        df = Counter(t for ts in toks for t in ts)
        self.vocab = {t: i for i, t in enumerate(sorted(df))}
        n = len(docs)
        self.idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in sorted(df)], dtype=np.float64)

    def vector(self, doc: str) -> np.ndarray:
        """[V] float64, unit length (all zeros when no token is in the vocabulary)."""
        v = np.zeros(len(self.vocab), dtype=np.float64)
        for t, c in Counter(tokenize(doc)).items():
            j = self.vocab.get(t)
            if j is not None:
                v[j] = (1.0 + math.log(c)) * self.idf[j]
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    def matrix(self, docs: Sequence[str]) -> np.ndarray:
        """[n, V]: vector(doc) for each doc."""
        return np.stack([self.vector(d) for d in docs]) if docs else np.zeros((0, len(self.vocab)))
