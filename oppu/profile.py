"""User profiles for PAG: a statistical summary, or a profile written by the LLM.

- "statistical": the task's own summary of the history (most frequent tags, average rating,
  typical headline pattern...). Works on any base, including a tiny one that cannot write.
- "llm": the paper's profile: the base model writes a summary from the task's profile prompt
  over the user's most recent items. Needs a base that can follow instructions.
- "auto": statistical for the tiny base, llm for a real checkpoint. The run report says which ran.

    fn = make_profile_fn(task, "statistical")
    text = fn(user.history)
"""
from __future__ import annotations

from typing import Callable, Sequence

from oppu.tasks.base import Item, Task

GenerateFn = Callable[[list[str]], list[str]]  # prompts -> texts (batched)


def resolve_kind(kind: str, is_tiny: bool) -> str:
    if kind == "auto":
        return "statistical" if is_tiny else "llm"
    if kind not in ("statistical", "llm"):
        raise ValueError(f"unknown profile kind {kind!r}; valid: auto, statistical, llm")
    return kind


def statistical_profile(task: Task, items: Sequence[Item]) -> str:
    return task.statistical_profile(list(items))


def llm_profiles(task: Task, histories: Sequence[Sequence[Item]], generate: GenerateFn,
                 max_items: int = 20, max_words: int = 80) -> list[str]:
    """Write one profile per history with the LLM (batched); most recent `max_items` items."""
    prompts = [task.profile_prompt(list(h)[-max_items:]) for h in histories]
    texts = generate(prompts)
    return [" ".join(t.strip().split()[:max_words]) for t in texts]


class LLMProfiles:
    """items -> the profile the LLM writes for them, memoised by the items' ids. `prefetch(histories)`
    writes every missing one in one batched generate call (the pipeline calls it before building
    examples or prompts, so a run with many users or queries pays a few batched passes, not one
    generate per profile)."""

    def __init__(self, task: Task, generate: GenerateFn, max_items: int = 20) -> None:
        self.task, self.generate, self.max_items = task, generate, max_items
        self.memo: dict[tuple[str, ...], str] = {}

    def _key(self, items: Sequence[Item]) -> tuple[str, ...]:
        return tuple(str(it["id"]) for it in list(items)[-self.max_items:])  # only these reach the prompt

    def prefetch(self, histories: Sequence[Sequence[Item]]) -> None:
        todo: dict[tuple[str, ...], Sequence[Item]] = {}
        for h in histories:
            key = self._key(h)
            if key not in self.memo and key not in todo:
                todo[key] = h
        if todo:
            texts = llm_profiles(self.task, list(todo.values()), self.generate, self.max_items)
            self.memo.update(zip(todo, texts))

    def __call__(self, items: list[Item]) -> str:
        self.prefetch([items])
        return self.memo[self._key(items)]


def make_profile_fn(task: Task, kind: str, generate: GenerateFn | None = None,
                    max_items: int = 20) -> Callable[[list[Item]], str]:
    """A function items -> profile text; LLM profiles are memoised and written in batches (LLMProfiles)."""
    if kind == "statistical":
        return lambda items: statistical_profile(task, items)
    if kind == "llm":
        if generate is None:
            raise ValueError("an LLM profile needs a generate function (the loaded base)")
        return LLMProfiles(task, generate, max_items)
    raise ValueError(f"unknown profile kind {kind!r}; valid: statistical, llm")
