"""LaMP_2M: movie tagging. Input: a movie description; output: one of 15 tags.

History item (description, tag) -> example "description -> tag", the user's tagging habit."""
from __future__ import annotations

from oppu.tasks.base import Task, clip_words
from oppu.tasks.common import frequency_profile, parse_label

LABELS = ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
          "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
          "violence", "true story")
INSTRUCTION = ("Which tag does this movie relate to among the following tags? Just answer with the tag "
               "name without further explanation. tags: [" + ", ".join(LABELS) + "] description: {description}")


def _profile_prompt(items):
    lines = "\n".join(f"description: {clip_words(it['description'], 40)} tag: {it['tag']}" for it in items)
    return (f"{lines}\nSummarize this user's movie tagging preferences in a short paragraph: "
            "which tags they use most and for which kinds of movies.\nprofile:")


TASK = Task(
    id="LaMP_2M",
    kind="classification",
    instruction=INSTRUCTION,
    item_fields=("description", "tag"),
    label_field="tag",
    content_field="description",
    cue="tag:",
    labels=LABELS,
    max_new_tokens=8,
    render_query=lambda c: f"description: {c}",
    render_item=lambda it: f"description: {clip_words(it['description'], 40)} tag: {it['tag']}",
    item_to_example=lambda it: (INSTRUCTION.format(description=it["description"]), it["tag"]),
    item_doc=lambda it: str(it["description"]),
    parse=lambda text: parse_label(text, LABELS),
    statistical_profile=lambda items: frequency_profile(items, "tag", "tags"),
    profile_prompt=_profile_prompt,
    description="movie tagging (15 tags)",
)
