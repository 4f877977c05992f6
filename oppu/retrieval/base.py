"""The Retriever protocol and the shared top-k ranking rule; the by-name factory is oppu.retrieval.

A retriever indexes one user's history documents (chronological order, oldest first) and
returns indices into that list, most relevant first:

    from oppu.retrieval import make_retriever
    r = make_retriever("bm25").fit([task.item_doc(it) for it in history])
    top = r.search(task.query_doc(query_input), k=4)            # over the whole history
    before = r.search(task.item_doc(history[i]), k=4, limit=i)  # training: only items < i

Ranking rule shared by every retriever: score descending, ties broken by the more recent item
(higher index) first, so a query that matches nothing degrades to the recency baseline instead
of an arbitrary order. Never more than k results; with `limit`, only indices < limit.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Retriever(Protocol):
    def fit(self, docs: list[str]) -> "Retriever":
        """Index `docs` (oldest first); returns self."""
        ...

    def search(self, query: str, k: int, limit: int | None = None) -> list[int]:
        """Indices into docs, most relevant first, at most k, only among docs[:limit]."""
        ...


def check_k_limit(k: int, limit: int | None) -> None:
    # Negative values would silently mean "from the end" under Python slicing; refuse them.
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit!r}")


def top_k(scores: np.ndarray, k: int, limit: int | None = None) -> list[int]:
    """Indices of the k best scores among scores[:limit]; score desc, then higher index first.

    scores: (n_docs,) float array.
    """
    check_k_limit(k, limit)
    n = len(scores) if limit is None else min(limit, len(scores))
    if n == 0 or k == 0:
        return []
    s = np.asarray(scores[:n], dtype=np.float64)
    idx = np.arange(n)
    order = np.lexsort((-idx, -s))  # last key is primary: -score, then -index
    return [int(i) for i in order[:k]]

