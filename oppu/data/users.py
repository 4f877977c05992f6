"""Group LaMP questions into users; pick test users; load a LaMP directory.

A user has a history (profile items, ordered by date when every item has one, else file order)
and queries (id, input, gold, the ids of the profile items that query may see).

- Without `user_id` each question is its own user (user id = question id).
- With `user_id` (time-based release) several questions share a user. Each query keeps its own
  profile for retrieval; the user's PEFT trains on the items *every* one of their queries may
  see (the intersection), so no query is ever answered by a model that saw items beyond its own
  profile, e.g. an earlier query's answer appearing as a later query's history item.

    from oppu.data.users import load_lamp_dir
    ds = load_lamp_dir("data/LaMP_2M", task="LaMP_2M")
    test, others = ds.split_users(n_test=100)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oppu.data.lamp import LampFormatError, Problems, Question, canonical_task, read_outputs, read_questions


@dataclass(frozen=True)
class Query:
    id: str
    input: str
    gold: str | None
    visible: tuple[str, ...]  # ids of the profile items this query may see (its own profile)


@dataclass
class User:
    user_id: str
    history: list[dict[str, Any]]           # items usable for this user's training (see module doc)
    queries: list[Query]
    items_by_id: dict[str, dict[str, Any]] = field(default_factory=dict)  # every item any query saw
    split: str = ""

    def visible_items(self, q: Query) -> list[dict[str, Any]]:
        """The query's own profile, in history order: what RAG/PAG may use for it."""
        return [self.items_by_id[i] for i in q.visible]


def _order(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chronological when every item carries a sortable date; otherwise keep file order."""
    if items and all("date" in it for it in items):
        keys = [_date_key(it["date"]) for it in items]
        if all(k is not None for k in keys) and len({type(k) for k in keys}) == 1:
            return [it for _, _, it in sorted(zip(keys, range(len(items)), items), key=lambda t: (t[0], t[1]))]
    return items


def _date_key(d: Any) -> Any:
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return float(d)
    if isinstance(d, str):
        try:
            return float(d)
        except ValueError:
            return d  # ISO-like strings sort lexically
    return None


def group_users(questions: list[Question], golds: dict[str, str] | None, split: str = "",
                source: str = "") -> list[User]:
    """Group questions into users. Golds (if given) must cover every question id."""
    if golds is not None:
        missing = [q.id for q in questions if q.id not in golds]
        if missing:
            raise LampFormatError(f"{source}: {len(missing)} question(s) have no gold, e.g. id={missing[0]!r}")
        extra = set(golds) - {q.id for q in questions}
        if extra:
            raise LampFormatError(f"{source}: {len(extra)} gold id(s) match no question, e.g. id={sorted(extra)[0]!r}")
    by_user: dict[str, list[Question]] = {}
    for q in questions:
        by_user.setdefault(q.user_id if q.user_id is not None else q.id, []).append(q)
    users = []
    for uid, qs in by_user.items():
        items: dict[str, dict[str, Any]] = {}
        for q in qs:
            for it in q.profile:
                prev = items.get(it["id"])
                if prev is not None and prev != it:
                    raise LampFormatError(f"{source}: user {uid!r}: profile item id {it['id']!r} differs "
                                          f"between questions (question {q.id!r})")
                items.setdefault(it["id"], it)
        ordered = _order(list(items.values()))
        common = set.intersection(*({it["id"] for it in q.profile} for q in qs))
        pos = {it["id"]: i for i, it in enumerate(ordered)}
        queries = [Query(q.id, q.input, golds[q.id] if golds is not None else None,
                         tuple(sorted((it["id"] for it in q.profile), key=pos.__getitem__))) for q in qs]
        users.append(User(uid, [it for it in ordered if it["id"] in common], queries,
                          {it["id"]: it for it in ordered}, split))
    return users


SELECTIONS = ("longest", "spread")


def select_test_users(users: list[User], n: int, how: str = "longest") -> tuple[list[User], list[User]]:
    """n test users and everyone else. "longest": the n longest histories (ties: user id), the
    paper's choice. "spread": n users evenly spaced over the ranking by history length, from the
    longest to the shortest, so every activity level is represented."""
    if n < 1:
        raise ValueError(f"test users must be >= 1, got {n}")
    if how not in SELECTIONS:
        raise ValueError(f"unknown test-user selection {how!r}; valid: {', '.join(SELECTIONS)}")
    ranked = sorted(users, key=lambda u: (-len(u.history), u.user_id))
    if how == "longest" or n >= len(ranked):
        test = ranked[:n]
    else:
        step = (len(ranked) - 1) / (n - 1) if n > 1 else 0.0
        test = [ranked[round(i * step)] for i in range(n)]
    chosen = {u.user_id for u in test}
    return test, [u for u in users if u.user_id not in chosen]


@dataclass
class LampDir:
    """A LaMP task directory: users per split, the task id, and skipped-record problems."""
    task: str
    root: Path
    splits: dict[str, list[User]]
    problems: Problems

    def split_users(self, n_test: int, eval_split: str = "dev", select: str = "longest") -> tuple[list[User], list[User]]:
        """Test users = n users of `eval_split` (the longest histories, or spread over history
        lengths: select_test_users); others = every other user of all splits (a test user's
        questions in other splits are excluded from base adaptation)."""
        if eval_split not in self.splits:
            raise ValueError(f"split {eval_split!r} not found in {self.root}; found: {sorted(self.splits)}")
        evalu = [u for u in self.splits[eval_split] if all(q.gold is not None for q in u.queries)]
        if not evalu:
            raise ValueError(f"split {eval_split!r} in {self.root} has no golds ({eval_split}_outputs.json)")
        test, rest = select_test_users(evalu, n_test, select)
        test_ids = {u.user_id for u in test}
        others = list(rest)
        for name, us in self.splits.items():
            if name != eval_split:
                others += [u for u in us if u.user_id not in test_ids and all(q.gold is not None for q in u.queries)]
        return test, others


def load_lamp_dir(root: str | Path, task: str | None = None, strict: bool = True) -> LampDir:
    """Read every `{split}_questions.json` (+ `{split}_outputs.json` when present) under root.

    The task comes from `task` or from the outputs files' "task" field; they must agree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LaMP data directory not found: {root}")
    qfiles = sorted(root.glob("*_questions.json"))
    if not qfiles:
        raise LampFormatError(f"{root}: no *_questions.json file (expected e.g. dev_questions.json)")
    task = canonical_task(task) if task else None
    problems, splits, golds_of = Problems(), {}, {}
    for qf in qfiles:
        split = qf.name[: -len("_questions.json")]
        of = root / f"{split}_outputs.json"
        if of.exists():
            ftask, golds, p = read_outputs(of, strict=strict)
            problems.messages += p.messages
            if ftask and task and ftask != task:
                raise LampFormatError(f"{of}: task {ftask!r} but {task!r} was asked for")
            task = task or ftask
            golds_of[split] = (golds, of)
    if task is None:
        raise LampFormatError(f"{root}: cannot tell the task (no outputs file with 'task'); pass --task")
    for qf in qfiles:
        split = qf.name[: -len("_questions.json")]
        qs, p = read_questions(qf, task=task, strict=strict)
        problems.messages += p.messages
        golds = None
        if split in golds_of:
            golds, of = golds_of[split]
            if not strict:
                keep = {q.id for q in qs}
                dropped = [k for k in golds if k not in keep]
                for k in dropped:  # golds of skipped (or absent) questions go too, and are counted
                    problems.add(f"{of}: gold id {k!r} dropped: no valid question with this id in {qf.name}")
                    del golds[k]
                lacking = [q for q in qs if q.id not in golds]
                for q in lacking:
                    problems.add(f"{qf}: question id {q.id!r} skipped: no gold in {of.name}")
                qs = [q for q in qs if q.id in golds]
        splits[split] = group_users(qs, golds, split=split, source=str(qf))
    return LampDir(task=task, root=root, splits=splits, problems=problems)
