"""Synthetic LaMP worlds in the exact official file format: the project's embedded default data.

In every world the answer depends on a per-user latent trait that the query input alone does not
reveal but the user's history does (per-task designs: oppu/data/synth_tasks.py and
oppu/data/synth_style.py; words: oppu/data/synth_vocab.py). Texts are short and the vocabulary
is small and closed, so a tiny from-scratch model can learn a world on CPU in minutes.

    from oppu.data.synth import synth_world
    card = synth_world("LaMP_2M", "data/synth/LaMP_2M", seed=0)
    # oppu data synth --task LaMP_2M --out data/synth/LaMP_2M   (the CLI wraps this)

Writes DIR/{dev,train}_{questions,outputs}.json and DIR/world.json:
- dev = the test users (the longer histories, upper half of [min_history, max_history]; with
  test_history="full" the whole range, for activity-level analyses),
  `queries_per_user` time-based queries each, all after the history and sharing it as profile;
- train = the other users, one query each, histories over the whole range (no train files when
  other_users == 0);
- user_based=True: no "user_id" anywhere and one query per test user (LaMP's user-based shape).
The last round(shift * queries) queries of each test user are "shifted": drawn from the part of
the user's trait their history does not show; world.json lists them under shifted_query_ids.

world.json caps are oracle scores on the dev queries (oppu.metrics.score): without_user (the
population-best rule from the input alone), with_user (the generator's rule with the user's true
trait, no noise) and from_history (the trait as estimated from the user's own history). Same
seed -> byte-identical files; all randomness comes from string-seeded `random.Random` instances.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oppu.data.lamp import Question, canonical_task, write_json_atomic, write_outputs, write_questions
from oppu.data.synth_tasks import Example, World, make_world

START_TIME = 1_262_304_000       # 2010-01-01 UTC; users start within the next five years
ORACLES = ("without_user", "with_user", "from_history")


@dataclass
class SynthUser:
    user_id: str
    trait: dict[str, Any]
    history: list[Example]
    items: list[dict[str, Any]]                  # the profile as written (id, fields, date)
    queries: list[tuple[str, Example, bool]]     # (question id, example, shifted)


def synth_world(task: str, out_dir: str | Path, seed: int = 0, test_users: int = 16, other_users: int = 160,
                queries_per_user: int = 3, min_history: int = 6, max_history: int = 48, shift: float = 0.0,
                noise: float = 0.05, user_based: bool = False, test_history: str = "upper") -> dict[str, Any]:
    """Write one synthetic world for `task` into out_dir and return its world card (world.json)."""
    task = canonical_task(task)
    params = {"seed": seed, "test_users": test_users, "other_users": other_users,
              "queries_per_user": queries_per_user, "min_history": min_history, "max_history": max_history,
              "shift": shift, "noise": noise, "user_based": user_based, "test_history": test_history}
    _validate(params)
    world = make_world(task, random.Random(f"oppu.synth:{task}:{seed}:population"))
    n_q = 1 if user_based else queries_per_user
    n_shift = round(shift * n_q)
    top_lo = min_history + (max_history - min_history) // 2 if test_history == "upper" else min_history
    dev = [_user(world, task, seed, f"u{i:04d}", (top_lo, max_history), n_q, n_shift, noise)
           for i in range(test_users)]
    train = [_user(world, task, seed, f"u{i:04d}", (min_history, max_history), 1, 0, noise)
             for i in range(test_users, test_users + other_users)]

    out = Path(out_dir)
    files = {"dev": dev, "train": train} if train else {"dev": dev}
    for split, users in files.items():
        write_questions(out / f"{split}_questions.json", _questions(users, user_based))
        write_outputs(out / f"{split}_outputs.json", task, {qid: ex.gold for u in users for qid, ex, _ in u.queries})

    card = {"task": task, "seed": seed, "generator": "oppu.data.synth", "design": world.design,
            "shift_rule": world.shift_rule, "params": params, "counts": _counts(dev, train),
            "caps": _caps(world, task, dev, lambda shifted: True), "population": world.card(),
            "shifted_query_ids": [qid for u in dev for qid, _, s in u.queries if s],
            "test_user_traits": {u.user_id: u.trait for u in dev},
            "note": "Synthetic: tests the machinery, not real-world quality."}
    if 0 < n_shift:
        card["caps_by_shift"] = {name: _caps(world, task, dev, keep)
                                 for name, keep in (("unshifted", lambda s: not s), ("shifted", lambda s: s))
                                 if any(keep(s) for u in dev for _, _, s in u.queries)}
    write_json_atomic(out / "world.json", card)
    return card


def _validate(p: dict[str, Any]) -> None:
    checks = [("test_users", p["test_users"] >= 1, ">= 1"), ("other_users", p["other_users"] >= 0, ">= 0"),
              ("queries_per_user", p["queries_per_user"] >= 1, ">= 1"), ("min_history", p["min_history"] >= 1, ">= 1"),
              ("max_history", p["max_history"] >= p["min_history"], f">= min_history ({p['min_history']})"),
              ("shift", 0.0 <= p["shift"] <= 1.0, "in [0, 1]"), ("noise", 0.0 <= p["noise"] < 1.0, "in [0, 1)")]
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"synth_world: {name}={p[name]!r} must be {rule}")
    if p["test_history"] not in ("upper", "full"):
        raise ValueError(f"synth_world: test_history={p['test_history']!r} must be 'upper' or 'full'")
    if not isinstance(p["seed"], int) or isinstance(p["seed"], bool):
        raise ValueError(f"synth_world: seed={p['seed']!r} must be an int")


def _user(world: World, task: str, seed: int, uid: str, hist_range: tuple[int, int], n_q: int, n_shift: int,
          noise: float) -> SynthUser:
    """One user: trait, a dated history, then n_q queries (the last n_shift shifted)."""
    rng = random.Random(f"oppu.synth:{task}:{seed}:user:{uid}")
    trait = world.user(rng)
    history = [world.example(trait, rng, False, noise, query=False) for _ in range(rng.randint(*hist_range))]
    date, items = START_TIME + rng.randrange(5 * 365 * 86400), []
    for n, ex in enumerate(history):
        date += rng.randrange(3600, 20 * 86400)
        items.append({"id": f"{uid}-{n}", **ex.fields, "date": date})
    queries = []
    for k in range(n_q):
        shifted = k >= n_q - n_shift
        queries.append((f"{uid}-q{k}", world.example(trait, rng, shifted, noise, query=True), shifted))
    return SynthUser(uid, trait, history, items, queries)


def _questions(users: list[SynthUser], user_based: bool) -> list[Question]:
    return [Question(id=qid, input=ex.input, profile=tuple(u.items), user_id=None if user_based else u.user_id)
            for u in users for qid, ex, _ in u.queries]


def _caps(world: World, task: str, dev: list[SynthUser], keep) -> dict[str, dict[str, float]]:
    """Score the three oracles on the dev queries whose shifted flag passes `keep`."""
    from oppu.metrics import score

    golds: dict[str, str] = {}
    preds: dict[str, dict[str, str]] = {name: {} for name in ORACLES}
    for u in dev:
        for qid, ex, shifted in u.queries:
            if not keep(shifted):
                continue
            golds[qid] = ex.gold
            preds["without_user"][qid] = world.guess_population(ex)
            preds["with_user"][qid] = world.guess_user(u.trait, ex, shifted)
            preds["from_history"][qid] = world.guess_history(u.history, ex)
    return {name: {k: round(v, 4) for k, v in score(task, golds, p).items()} for name, p in preds.items()}


def _counts(dev: list[SynthUser], train: list[SynthUser]) -> dict[str, Any]:
    def hist(users):
        lens = [len(u.items) for u in users]
        return {"min": min(lens), "max": max(lens), "mean": round(statistics.fmean(lens), 2)} if lens else {}

    words: set[str] = set()
    for u in dev + train:
        for it in u.items:
            for k, v in it.items():
                if k not in ("id", "date"):
                    words.update(str(v).split())
        for _, ex, _ in u.queries:
            words.update(ex.input.split())
            words.update(ex.gold.split())
    return {"dev_users": len(dev), "dev_questions": sum(len(u.queries) for u in dev),
            "train_users": len(train), "train_questions": sum(len(u.queries) for u in train),
            "dev_history": hist(dev), "train_history": hist(train),
            "shifted_queries": sum(s for u in dev for _, _, s in u.queries), "vocabulary": len(words)}
