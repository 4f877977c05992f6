"""Recency baseline: the k most recent history items, ignoring the query.

History documents are in chronological order (oldest first), so this returns the highest
indices first, within `limit`:

    RecencyRetriever().fit(["a", "b", "c", "d"]).search("anything", k=2)           # -> [3, 2]
    RecencyRetriever().fit(["a", "b", "c", "d"]).search("anything", k=2, limit=2)  # -> [1, 0]
"""
from __future__ import annotations

from oppu.retrieval.base import check_k_limit


class RecencyRetriever:
    def __init__(self) -> None:
        self._n = 0

    def fit(self, docs: list[str]) -> "RecencyRetriever":
        self._n = len(docs)
        return self

    def search(self, query: str, k: int, limit: int | None = None) -> list[int]:
        check_k_limit(k, limit)
        n = self._n if limit is None else min(limit, self._n)
        return list(range(n - 1, max(n - k, 0) - 1, -1))
