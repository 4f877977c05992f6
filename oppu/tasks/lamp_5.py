"""LaMP_5: scholarly title generation. Input: a paper abstract; output: its title (ROUGE-1/L).

History item (abstract, title) -> example "abstract -> title", the author's titling style.
Item lines clip the abstract (to 32 words) so the title at the end survives prompt clipping."""
from __future__ import annotations

from oppu.tasks.base import Task, clip_words
from oppu.tasks.lamp_4 import first_line, title_profile

INSTRUCTION = "Generate a title for the following abstract of a paper: {abstract}"


def _example(it):
    abstract, title = str(it.get("abstract", "")).strip(), str(it.get("title", "")).strip()
    return (INSTRUCTION.format(abstract=abstract), title) if abstract and title else None


def _profile_prompt(items):
    lines = "\n".join(f"abstract: {clip_words(it['abstract'], 40)} title: {it['title']}" for it in items)
    return (f"{lines}\nSummarize this author's paper titling style in a short paragraph: "
            "length, structure, wording and research topics.\nprofile:")


TASK = Task(
    id="LaMP_5",
    kind="generation",
    instruction=INSTRUCTION,
    item_fields=("abstract", "title"),
    label_field="title",
    content_field="abstract",
    cue="title:",
    max_new_tokens=32,
    render_query=lambda c: f"abstract: {c}",
    render_item=lambda it: f"abstract: {clip_words(it['abstract'], 32)} title: {it['title']}",
    item_to_example=_example,
    item_doc=lambda it: f"{it['title']} {it['abstract']}",
    parse=first_line,
    statistical_profile=lambda items: title_profile([it.get("title", "") for it in items], "titles"),
    profile_prompt=_profile_prompt,
    description="scholarly title generation",
)
