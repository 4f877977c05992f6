"""BM25 retrieval over one user's history, via the `bm25s` library.

    r = BM25Retriever().fit(["the cat sat", "stock markets fell", ""])
    r.search("markets", k=2)            # -> [1, 2]
    r.search("markets", k=2, limit=1)   # -> [0]   (only docs[:1])

Tokenization is ours (lowercase, split on non-alphanumerics, bm25s's short English stopword
list; no stemmer) so queries and documents are tokenized identically and nothing is
downloaded. Every document is scored and indices >= limit are masked, which keeps one index
per user valid for all training prefixes. Documents with no matching term score 0 and are
still returned after the matches, most recent first (see oppu/retrieval/base.py).

`IncrementalBM25` scores exactly as bm25s' "lucene" method (to float rounding) over a history
that grows: `add(doc)` indexes one more document in time proportional to its tokens, nothing is
rebuilt, and a query touches only the postings of its own terms. The server keeps one per user.
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from oppu.retrieval.base import check_k_limit, top_k

# rouge_score imports absl, which configures root logging; bm25s then logs every index build.
logging.getLogger("bm25s").setLevel(logging.WARNING)

_TOKEN = re.compile(r"[^\W_]+")  # runs of letters/digits, any script


def tokenize(text: str, stopwords: frozenset[str] = frozenset(STOPWORDS_EN)) -> list[str]:
    return [t for t in _TOKEN.findall(str(text).lower()) if t not in stopwords]


class BM25Retriever:
    def __init__(self, k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                 stopwords: bool = True):
        self.k1, self.b, self.method = k1, b, method
        self.stopwords = frozenset(STOPWORDS_EN) if stopwords else frozenset()
        self._index: bm25s.BM25 | None = None
        self._n = 0

    def fit(self, docs: list[str]) -> "BM25Retriever":
        corpus = [tokenize(d, self.stopwords) for d in docs]
        self._n = len(corpus)
        self._index = None
        # bm25s cannot index a corpus without a single token; all scores are then 0.
        if any(corpus):
            self._index = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
            self._index.index(corpus, show_progress=False)
        return self

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query`: (n_docs,) float32."""
        if self._index is None:
            return np.zeros(self._n, dtype=np.float32)
        ids = self._index.get_tokens_ids(tokenize(query, self.stopwords))
        if not ids:
            return np.zeros(self._n, dtype=np.float32)
        return np.asarray(self._index.get_scores_from_ids(ids))

    def search(self, query: str, k: int, limit: int | None = None) -> list[int]:
        check_k_limit(k, limit)
        if self._n == 0 or k == 0 or limit == 0:
            return []
        return top_k(self.scores(query), k, limit)


class IncrementalBM25:
    """BM25Retriever's scores over a growing document list; `add` instead of a refit."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, stopwords: bool = True):
        self.k1, self.b = k1, b
        self.stopwords = frozenset(STOPWORDS_EN) if stopwords else frozenset()
        self.fit([])

    def fit(self, docs: list[str]) -> "IncrementalBM25":
        self._postings: dict[str, dict[int, int]] = {}
        self._len = np.zeros(16, dtype=np.float64)
        self._n, self._total = 0, 0
        for d in docs:
            self.add(d)
        return self

    def add(self, doc: str) -> int:
        """Index one more document (the newest); returns its index."""
        toks = tokenize(doc, self.stopwords)
        if self._n == len(self._len):
            self._len = np.concatenate([self._len, np.zeros(len(self._len), dtype=np.float64)])
        i = self._n
        self._len[i] = len(toks)
        self._n, self._total = i + 1, self._total + len(toks)
        for t, tf in Counter(toks).items():
            self._postings.setdefault(t, {})[i] = tf
        return i

    def __len__(self) -> int:
        return self._n

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query`: (n_docs,) float32, as BM25Retriever.scores."""
        out = np.zeros(self._n, dtype=np.float32)
        if self._total == 0:
            return out
        avg = self._total / self._n
        for t in tokenize(query, self.stopwords):
            post = self._postings.get(t)
            if not post:
                continue
            idf = math.log(1 + (self._n - len(post) + 0.5) / (len(post) + 0.5))
            ids = np.fromiter(post.keys(), dtype=np.int64, count=len(post))
            tf = np.fromiter(post.values(), dtype=np.float64, count=len(post))
            norm = self.k1 * ((1 - self.b) + self.b * self._len[ids] / avg)
            out[ids] += (idf * tf / (norm + tf)).astype(np.float32)
        return out

    def search(self, query: str, k: int, limit: int | None = None) -> list[int]:
        check_k_limit(k, limit)
        if self._n == 0 or k == 0 or limit == 0:
            return []
        return top_k(self.scores(query), k, limit)
