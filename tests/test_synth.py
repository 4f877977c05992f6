"""Synthetic LaMP worlds: official format, determinism, splits, behaviour shift and caps."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from oppu.data import synth_vocab as V
from oppu.data.lamp import ITEM_FIELDS, TASK_IDS, read_outputs, read_questions
from oppu.data.synth import synth_world
from oppu.data.synth_tasks import INSTRUCTIONS
from oppu.data.users import load_lamp_dir
from oppu.metrics import TASK_LABELS, higher_is_better

SMALL = dict(test_users=4, other_users=6, queries_per_user=3, min_history=6, max_history=14)
FILES = ("dev_questions.json", "dev_outputs.json", "train_questions.json", "train_outputs.json", "world.json")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("synth")
    return {t: (root / t, synth_world(t, root / t, seed=0, **SMALL)) for t in TASK_IDS}


@pytest.mark.parametrize("task", TASK_IDS)
def test_files_follow_the_official_format(worlds, task):
    d, card = worlds[task]
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)
    prefix = INSTRUCTIONS[task].split("{")[0]
    all_items: set[str] = set()
    for split, n_users, n_q in (("dev", 4, 3), ("train", 6, 1)):
        qs, problems = read_questions(d / f"{split}_questions.json", task=task, strict=True)
        ftask, golds, _ = read_outputs(d / f"{split}_outputs.json", strict=True)
        assert ftask == task and not problems
        assert {q.id for q in qs} == set(golds) and len(qs) == n_users * n_q
        by_user: dict[str, list] = {}
        for q in qs:
            assert q.input.startswith(prefix), q.input
            assert q.user_id is not None
            by_user.setdefault(q.user_id, []).append(q)
        assert len(by_user) == n_users and all(len(v) == n_q for v in by_user.values())
        for uq in by_user.values():
            assert all(q.profile == uq[0].profile for q in uq)      # a user's queries share the history
            profile = uq[0].profile
            dates = [it["date"] for it in profile]
            assert all(isinstance(x, int) for x in dates) and dates == sorted(set(dates))
            ids = {it["id"] for it in profile}
            assert not ids & all_items
            all_items |= ids
            for it in profile:
                assert set(it) == {"id", "date", *ITEM_FIELDS[task]}
                assert all(isinstance(it[f], str) and it[f] for f in ITEM_FIELDS[task])
                if task == "LaMP_3":
                    assert it["score"] in {"1", "2", "3", "4", "5"}
        for g in golds.values():
            if task in TASK_LABELS:
                assert g in TASK_LABELS[task]
            elif task == "LaMP_3":
                assert g in {"1", "2", "3", "4", "5"}
            else:
                assert 1 <= len(g.split()) <= 9
    assert card["task"] == task and card["generator"] == "oppu.data.synth"


@pytest.mark.parametrize("task", TASK_IDS)
def test_history_lengths_and_users_split(worlds, task):
    d, card = worlds[task]
    ds = load_lamp_dir(d, task=task)
    dev_ids = {u.user_id for u in ds.splits["dev"]}
    test, others = ds.split_users(n_test=SMALL["test_users"])
    assert {u.user_id for u in test} == dev_ids
    assert len(others) == SMALL["other_users"] and not dev_ids & {u.user_id for u in others}
    assert all(10 <= len(u.history) <= 14 for u in test)          # upper half of [6, 14]
    assert all(6 <= len(u.history) <= 14 for u in others)
    assert card["counts"]["dev_questions"] == 12 and card["counts"]["train_questions"] == 6


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for task in TASK_IDS:
        synth_world(task, tmp_path / "a", seed=3, **SMALL)
        synth_world(task, tmp_path / "b", seed=3, **SMALL)
        synth_world(task, tmp_path / "c", seed=4, **SMALL)
        for f in FILES:
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), (task, f)
        assert (tmp_path / "a" / "dev_questions.json").read_bytes() != (tmp_path / "c" / "dev_questions.json").read_bytes()


@pytest.mark.parametrize("task", ["LaMP_2M", "LaMP_5"])
def test_user_based_release_shape(tmp_path, task):
    card = synth_world(task, tmp_path, seed=1, user_based=True, shift=1.0, **SMALL)
    for split in ("dev", "train"):
        raw = json.loads((tmp_path / f"{split}_questions.json").read_text())
        assert all("user_id" not in rec for rec in raw)
    assert len(json.loads((tmp_path / "dev_questions.json").read_text())) == SMALL["test_users"]
    assert len(card["shifted_query_ids"]) == SMALL["test_users"]
    ds = load_lamp_dir(tmp_path, task=task)
    assert len(ds.splits["dev"]) == SMALL["test_users"]


@pytest.mark.parametrize("task", TASK_IDS)
@pytest.mark.parametrize("shift", [0.0, 0.34, 1.0])
def test_shifted_queries_are_marked(tmp_path, task, shift):
    card = synth_world(task, tmp_path, seed=2, shift=shift, **SMALL)
    per_user = round(shift * SMALL["queries_per_user"])
    ids = card["shifted_query_ids"]
    assert len(ids) == SMALL["test_users"] * per_user == card["counts"]["shifted_queries"]
    last = {f"u{i:04d}-q{k}" for i in range(SMALL["test_users"])
            for k in range(SMALL["queries_per_user"] - per_user, SMALL["queries_per_user"])}
    assert set(ids) == last                                       # the shift comes last in time
    assert ("caps_by_shift" in card) == (per_user > 0)


def test_label_shift_uses_candidates_the_history_never_shows(tmp_path):
    card = synth_world("LaMP_2M", tmp_path, seed=5, shift=1.0, **SMALL)
    qs, _ = read_questions(tmp_path / "dev_questions.json", task="LaMP_2M")
    kw_label = {w: lab for lab, ws in V.TAG_KEYWORDS.items() for w in ws}
    for q in qs:
        familiar = set(card["test_user_traits"][q.user_id]["familiar"])
        shown = {kw_label[w] for it in q.profile for w in it["description"].split() if w in kw_label}
        asked = {kw_label[w] for w in q.input.split("description: ")[1].split() if w in kw_label}
        assert shown <= familiar and not asked & familiar


@pytest.mark.parametrize("task", TASK_IDS)
def test_caps_with_user_beat_without_user(tmp_path, task):
    card = synth_world(task, tmp_path, seed=0, test_users=16, other_users=2)
    caps = card["caps"]
    assert set(caps) == {"without_user", "with_user", "from_history"}
    for metric, without in caps["without_user"].items():
        with_ = caps["with_user"][metric]
        assert (with_ > without) if higher_is_better(metric) else (with_ < without), (metric, caps)
    assert set(card["params"]) == {"seed", "test_users", "other_users", "queries_per_user", "min_history",
                                   "max_history", "shift", "noise", "user_based", "test_history"}
    for key in ("design", "shift_rule", "counts", "population", "note", "test_user_traits"):
        assert card[key]
    assert json.loads((tmp_path / "world.json").read_text()) == card


def test_no_train_files_without_other_users(tmp_path):
    synth_world("LaMP_3", tmp_path, seed=0, test_users=2, other_users=0, min_history=6, max_history=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev_outputs.json", "dev_questions.json", "world.json"]


@pytest.mark.parametrize("bad", [dict(shift=1.5), dict(noise=1.0), dict(test_users=0), dict(min_history=9, max_history=8),
                                 dict(queries_per_user=0)])
def test_bad_arguments_name_the_value(tmp_path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        synth_world("LaMP_4", tmp_path, **{**SMALL, **bad})


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="LaMP_9"):
        synth_world("LaMP_9", tmp_path)


@pytest.mark.parametrize("task", TASK_IDS)
def test_instructions_match_the_task_modules(task):
    name = {"LaMP_1": "lamp_1", "LaMP_2N": "lamp_2n", "LaMP_2M": "lamp_2m", "LaMP_3": "lamp_3",
            "LaMP_4": "lamp_4", "LaMP_5": "lamp_5", "LaMP_7": "lamp_7"}[task]
    try:
        mod = importlib.import_module(f"oppu.tasks.{name}")
    except ImportError:
        pytest.skip(f"oppu.tasks.{name} not importable yet")
    assert INSTRUCTIONS[task] == mod.INSTRUCTION
    if task in ("LaMP_2M", "LaMP_2N"):
        assert tuple(mod.LABELS) == TASK_LABELS[task]


def test_vocabulary_keywords_point_at_one_label():
    groups = {
        "LaMP_2M": (V.TAG_KEYWORDS, V.MOVIE_OPENERS + V.MOVIE_CONNECTORS + V.MOVIE_CLOSERS),
        "LaMP_2N": (V.CATEGORY_KEYWORDS, V.NEWS_OPENERS + V.NEWS_CONNECTORS + V.NEWS_CLOSERS + V.NEWS_TITLE_TAILS),
        "LaMP_3": ({str(k): v for k, v in V.SENTIMENT_WORDS.items()},
                   V.PRODUCTS + V.REVIEW_OPENERS + V.REVIEW_MIDDLES + V.REVIEW_CLOSERS),
        "LaMP_1": ({**V.TOPIC_WORDS, "method": V.METHOD_WORDS}, V.PAPER_OPENERS + V.PAPER_LINKS + V.PAPER_CLOSERS),
        "LaMP_4": ({"kw": V.NEWS_KEYWORDS}, V.ARTICLE_OPENERS + V.ARTICLE_LINKS + V.ARTICLE_CLOSERS),
        "LaMP_5": ({"kw": V.RESEARCH_TERMS}, V.ABSTRACT_OPENERS + V.ABSTRACT_LINKS1 + V.ABSTRACT_LINKS2 + V.ABSTRACT_CLOSERS),
        "LaMP_7": ({"kw": V.TWEET_VERBS + V.TWEET_NOUNS + V.TWEET_TIMES}, V.STATEMENT_TEMPLATES),
    }
    assert tuple(V.TAG_KEYWORDS) == TASK_LABELS["LaMP_2M"] and tuple(V.CATEGORY_KEYWORDS) == TASK_LABELS["LaMP_2N"]
    for task, (lists, filler) in groups.items():
        words = [w for ws in lists.values() for w in ws]
        assert len(words) == len(set(words)), task
        filler_words = {w for phrase in filler for w in phrase.split()}
        assert not set(words) & filler_words, (task, set(words) & filler_words)
        assert all(w.isascii() and w == w.lower() and "{" not in w for w in words)


def test_full_test_history_spreads_dev_users_and_keeps_the_train_split(tmp_path):
    up = synth_world("LaMP_2M", tmp_path / "up", seed=1, test_users=12, other_users=10, min_history=2, max_history=40)
    full = synth_world("LaMP_2M", tmp_path / "full", seed=1, test_users=12, other_users=10, min_history=2,
                       max_history=40, test_history="full")
    assert up["counts"]["dev_history"]["min"] >= 21
    assert full["counts"]["dev_history"]["min"] < 21
    # the other users (who adapt the base) are the same files byte for byte
    for f in ("train_questions.json", "train_outputs.json"):
        assert (tmp_path / "up" / f).read_bytes() == (tmp_path / "full" / f).read_bytes()
    with pytest.raises(ValueError, match="test_history='half'"):
        synth_world("LaMP_2M", tmp_path / "bad", test_history="half")
