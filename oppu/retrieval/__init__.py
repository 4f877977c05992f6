"""Retrieval over one user's history: BM25, dense (sentence-transformers) and recency.

    from oppu.retrieval import make_retriever
    idx = make_retriever("bm25").fit(docs).search(query, k=4, limit=None)

This package holds the by-name factory; oppu/retrieval/base.py holds the protocol and the
ranking/tie-breaking rule every retriever shares, and the retrievers import only from there.
Each retriever module is imported on first use, so `import oppu.retrieval` loads neither
bm25s nor sentence-transformers.
"""
from __future__ import annotations

from typing import Any

from oppu.config import RETRIEVERS  # the choice list lives once, in config
from oppu.retrieval.base import Retriever

__all__ = ["RETRIEVERS", "Retriever", "make_retriever"]


def make_retriever(name: str, **kw: Any) -> Retriever:
    """Build a retriever by name: "bm25", "dense" or "recency"; `kw` go to its constructor."""
    if name == "bm25":
        from oppu.retrieval.bm25 import BM25Retriever
        return BM25Retriever(**kw)
    if name == "dense":
        from oppu.retrieval.dense import DenseRetriever
        return DenseRetriever(**kw)
    if name == "recency":
        from oppu.retrieval.recency import RecencyRetriever
        return RecencyRetriever(**kw)
    raise ValueError(f"unknown retriever {name!r}; valid choices: {', '.join(RETRIEVERS)}")
