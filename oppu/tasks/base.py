"""The Task object: everything task-specific the pipeline needs, as pure functions of strings.

A task turns a LaMP query input plus retrieved history items and a profile into a prompt, a
history item into one training example (input, target) for that user's PEFT, items into
retrieval documents, and generated text into the value the scorer expects. Tasks never touch
disk; add your own with `register(Task(...))` (see oppu/tasks/__init__.py).

Prompt shape (compact style, the default for small bases):

    [profile: <profile text>]
    <item rendered>            # one line per retrieved history item, most relevant last
    <query content rendered>   # same shape as an item, with the answer field left open
    <cue>                      # e.g. "tag:", the model continues with " comedy<eos>"

The "full" style keeps the official LaMP instruction of the input (better for instruction-tuned
checkpoints); "compact" strips it, since it is the same for every query of a task.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

Item = dict[str, Any]
Kind = Literal["classification", "regression", "generation"]


def clip_words(text: str, n: int) -> str:
    words = str(text).split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


@dataclass(frozen=True)
class Task:
    """One LaMP-style task. All callables are pure: strings and dicts in, strings out."""
    id: str
    kind: Kind
    instruction: str                       # official input template, "{...}" fields
    item_fields: tuple[str, ...]           # fields each profile item must have
    label_field: str | None                # the item field the user's behaviour shows (tag, score, title...)
    content_field: str                     # the item field that plays the role of the query input
    cue: str                               # answer cue ending the prompt, e.g. "tag:"
    render_query: Callable[[str], str]     # query content -> prompt line (without the answer)
    render_item: Callable[[Item], str]     # history item -> prompt line (with the answer)
    item_to_example: Callable[[Item], tuple[str, str] | None]  # item -> (official-style input, target) or None
    parse: Callable[[str], str]            # generated text -> scorer-ready prediction
    statistical_profile: Callable[[list[Item]], str]
    profile_prompt: Callable[[list[Item]], str]   # prompt asking an LLM to write the user's profile
    labels: tuple[str, ...] = ()
    max_new_tokens: int = 16
    item_doc: Callable[[Item], str] = field(default=lambda it: "")  # retrieval document text
    description: str = ""
    query_text: Callable[[str], str] | None = None  # input -> retrieval query; None: content(input)
    # When item_to_example is a proxy in another format than the queries (LaMP_1: abstract -> title),
    # its examples end with this cue instead of `cue`, so the proxy never teaches the query's cue.
    example_cue: str | None = None

    def content(self, input: str) -> str:
        """The query's content with the official instruction stripped (the input itself if it
        does not follow the template, so user-made data still works)."""
        return extract_content(self.instruction, input)

    def query_doc(self, input: str) -> str:
        """Retrieval query text for a query input (the task's `query_text` when it has one)."""
        return self.query_text(input) if self.query_text else self.content(input)

    def prompt(self, input: str, retrieved: list[Item] = (), profile: str | None = None,
               style: Literal["compact", "full"] = "compact", cue: str | None = None) -> str:
        lines = []
        if profile:
            lines.append(f"profile: {profile}")
        for it in retrieved:
            lines.append(self.render_item(it))  # render_item clips the content, never the label
        if style == "full":
            lines.append(input.strip())
        else:
            lines.append(self.render_query(self.content(input)))
        return "\n".join(lines) + "\n" + (cue or self.cue)

    def target(self, output: str) -> str:
        """Text the model must produce after the cue for a gold output."""
        return " " + str(output).strip()


def extract_content(instruction: str, text: str) -> str:
    """Invert a one-placeholder-at-the-end instruction: 'Generate a headline ...: {text}' -> text.

    Templates with several fields (LaMP_1) are handled by their task module."""
    m = re.fullmatch(r"(?s)(.*)\{(\w+)\}\s*", instruction)
    if m and text.startswith(m.group(1)):
        return text[len(m.group(1)):].strip()
    return text.strip()


_REGISTRY: dict[str, Task] = {}


def register(task: Task, overwrite: bool = False) -> Task:
    """Make a task available by id to every command (`--task ID`)."""
    if task.id in _REGISTRY and not overwrite:
        raise ValueError(f"task {task.id!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[task.id] = task
    return task


def get_task(task_id: str) -> Task:
    from oppu.data.lamp import canonical_task  # alias handling: "2M" -> "LaMP_2M"
    key = task_id
    if key not in _REGISTRY:
        try:
            key = canonical_task(task_id)
        except ValueError:
            pass
    if key not in _REGISTRY:
        raise ValueError(f"unknown task {task_id!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def registered() -> list[str]:
    return sorted(_REGISTRY)
