"""Turn users into (prompt, target) examples: pure, no disk, no model.

Three prompt variants serve the methods:
  plain -> non_personalized, oppu, instant     rag -> rag, oppu_rag, instant_rag
  pag -> pag, oppu_pag, instant_pag

- History examples (per-user PEFT training, and base adaptation on other users): item i becomes
  one example per variant; in the rag variant item i may only retrieve items[:i] (never itself,
  never later items). The profile text is built from the user's training history.
- Query prompts: retrieval and profile see only that query's own profile (User.visible_items),
  never the answer.

    exs = history_examples(task, user, variants=("plain", "rag"), k=2, retriever="bm25",
                           profile_fn=lambda items: task.statistical_profile(items))
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from oppu.data.users import Query, User
from oppu.retrieval import make_retriever
from oppu.tasks.base import Item, Task

VARIANTS = ("plain", "rag", "pag")
METHOD_VARIANT = {"non_personalized": "plain", "rag": "rag", "pag": "pag",
                  "oppu": "plain", "oppu_rag": "rag", "oppu_pag": "pag",
                  "instant": "plain", "instant_rag": "rag", "instant_pag": "pag"}
ProfileFn = Callable[[list[Item]], str]
PAUSE_EVERY = 64  # history items between pause() calls in history_examples


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str
    user_id: str
    variant: str
    source: str  # item id or query id the example was made from


def variants_for(methods: Iterable[str]) -> tuple[str, ...]:
    need = {METHOD_VARIANT[m] for m in methods}
    return tuple(v for v in VARIANTS if v in need)


def _retrieve(task: Task, items: Sequence[Item], retriever, query: str, k: int, limit: int | None) -> list[Item]:
    if k <= 0 or not items or (limit is not None and limit <= 0):
        return []
    idx = retriever.search(query, k, limit=limit)
    return [items[j] for j in reversed(idx)]  # most relevant last: closest to the query


def _item_example(task: Task, user: User, items: Sequence[Item], i: int, ex: tuple, variant: str, k: int,
                  retriever, profile: str | None, style: str) -> Example:
    """History item i (`ex` = task.item_to_example(items[i])) in one variant: rag retrieves only
    from items[:i]; pag carries `profile`."""
    inp, target = ex
    retrieved = _retrieve(task, items, retriever, task.query_doc(inp), k, limit=i) \
        if (variant == "rag" and retriever is not None) else []
    return Example(task.prompt(inp, retrieved, profile if variant == "pag" else None, style=style,
                               cue=task.example_cue), task.target(target), user.user_id, variant,
                   f"item:{items[i]['id']}")


def _history_retriever(task: Task, items: Sequence[Item], variants: Sequence[str], k: int, retriever: str):
    if "rag" in variants and k > 0 and len(items) > 1:
        return make_retriever(retriever).fit([task.item_doc(it) for it in items])
    return None


def history_examples(task: Task, user: User, variants: Sequence[str], k: int, retriever: str,
                     profile_fn: ProfileFn | None, style: str = "compact",
                     pause: Callable[[], object] | None = None) -> list[Example]:
    """Examples from the user's own history items (in chronological order). `pause()`, when
    given, runs every PAUSE_EVERY items (a server lets generation go first there)."""
    items = user.history
    r = _history_retriever(task, items, variants, k, retriever)
    profile = profile_fn(items) if ("pag" in variants and profile_fn) else None
    out = []
    for i, it in enumerate(items):
        if pause is not None and i and i % PAUSE_EVERY == 0:
            pause()
        ex = task.item_to_example(it)
        if ex is not None:
            out += [_item_example(task, user, items, i, ex, v, k, r, profile, style) for v in variants]
    return out


def prefetch_profiles(profile_fn: ProfileFn | None, histories: Sequence[Sequence[Item]]) -> None:
    """Let a batched profile writer (oppu.profile.LLMProfiles) write every profile needed next in
    one batched pass instead of one generate call per user or query."""
    if profile_fn is not None and hasattr(profile_fn, "prefetch"):
        profile_fn.prefetch([list(h) for h in histories])


def query_prompt(task: Task, user: User, q: Query, variant: str, k: int, retriever: str,
                 profile_fn: ProfileFn | None, style: str = "compact", _cache: dict | None = None) -> str:
    """The prompt for one query under a variant; sees only the query's own profile."""
    visible = user.visible_items(q)
    retrieved: list[Item] = []
    profile = None
    if variant == "rag" and k > 0 and visible:
        key = ("r", user.user_id, q.visible)
        r = _cache.get(key) if _cache is not None else None
        if r is None:
            r = make_retriever(retriever).fit([task.item_doc(it) for it in visible])
            if _cache is not None:
                _cache[key] = r
        retrieved = _retrieve(task, visible, r, task.query_doc(q.input), k, limit=None)
    elif variant == "pag" and profile_fn:
        key = ("p", user.user_id, q.visible)
        profile = _cache.get(key) if _cache is not None else None
        if profile is None:
            profile = profile_fn(visible)
            if _cache is not None:
                _cache[key] = profile
    return task.prompt(q.input, retrieved, profile, style=style)


def query_examples(task: Task, user: User, variants: Sequence[str], k: int, retriever: str,
                   profile_fn: ProfileFn | None, style: str = "compact") -> list[Example]:
    """Training examples from a (non-test) user's questions with golds."""
    cache: dict = {}
    return [Example(query_prompt(task, user, q, v, k, retriever, profile_fn, style, cache),
                    task.target(q.gold), user.user_id, v, f"query:{q.id}")
            for q in user.queries if q.gold is not None for v in variants]


def base_examples(task: Task, users: Sequence[User], variants: Sequence[str], k: int, retriever: str,
                  profile_fn: ProfileFn | None, seed: int, style: str = "compact",
                  progress: Callable[[int], None] | None = None, max_examples: int = 0) -> list[Example]:
    """Task-adaptation data from non-test users: each history item and question contributes one
    example in one variant drawn at random (seeded), so the shared base learns all prompt shapes
    without tripling its data. With `max_examples`, a seeded sample of that many sources is built
    (and only their profiles written), so the cost of a capped run does not grow with the data."""
    rng = random.Random(seed)
    picks: list[tuple[int, object, str]] = []      # (user index, (item index, example) or Query, variant)
    for ui, u in enumerate(users):
        parsed = [(i, task.item_to_example(it)) for i, it in enumerate(u.history)]
        picks += [(ui, (i, ex), rng.choice(variants)) for i, ex in parsed if ex is not None]
        picks += [(ui, q, rng.choice(variants)) for q in u.queries if q.gold is not None]
    if max_examples and len(picks) > max_examples:
        keep = set(random.Random(seed).sample(range(len(picks)), max_examples))
        picks = [p for j, p in enumerate(picks) if j in keep]
    prefetch_profiles(profile_fn, [users[ui].history if isinstance(src, tuple) else users[ui].visible_items(src)
                                   for ui, src, v in picks if v == "pag"])
    out, by_user = [], {}
    for ui, src, v in picks:
        by_user.setdefault(ui, []).append((src, v))
    for ui, u in enumerate(users):
        mine = by_user.get(ui, [])
        vs = {v for src, v in mine if isinstance(src, tuple)}
        r = _history_retriever(task, u.history, tuple(vs), k, retriever)
        profile = profile_fn(u.history) if ("pag" in vs and profile_fn) else None
        cache: dict = {}
        for src, v in mine:
            if isinstance(src, tuple):
                out.append(_item_example(task, u, u.history, *src, v, k, r, profile, style))
            else:
                out.append(Example(query_prompt(task, u, src, v, k, retriever, profile_fn, style, cache),
                                   task.target(src.gold), u.user_id, v, f"query:{src.id}"))
        if progress:
            progress(1)
    return out
