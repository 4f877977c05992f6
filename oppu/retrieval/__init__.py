"""Retrieval over one user's history: BM25, dense (sentence-transformers) and recency.

    from oppu.retrieval import make_retriever
    idx = make_retriever("bm25").fit(docs).search(query, k=4, limit=None)

See oppu/retrieval/base.py for the protocol and the ranking/tie-breaking rule.
"""
from oppu.retrieval.base import RETRIEVERS, Retriever, make_retriever

__all__ = ["RETRIEVERS", "Retriever", "make_retriever"]
