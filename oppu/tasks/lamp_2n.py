"""LaMP_2N: news categorization. Input: an article; output: one of 15 categories.

History item (text, title, category) -> example "article -> category", the user's category
habit. Item lines clip the article (to 36 words) so the category survives prompt clipping;
the retrieval document is title + text, as in the LaMP reference code."""
from __future__ import annotations

from oppu.tasks.base import Task, clip_words
from oppu.tasks.common import frequency_profile, parse_label

LABELS = ("travel", "education", "parents", "style & beauty", "entertainment", "food & drink",
          "science & technology", "business", "sports", "healthy living", "women", "politics",
          "crime", "culture & arts", "religion")
INSTRUCTION = ("Which category does this article relate to among the following categories? Just answer "
               "with the category name without further explanation. categories: ["
               + ", ".join(LABELS) + "] article: {text}")


def parse(text: str) -> str:
    """parse_label, then once more with 'and' read as '&' ('Food and Drink' -> 'food & drink')."""
    out = parse_label(text, LABELS)
    if out not in LABELS and " and " in out.lower():
        alt = parse_label(out.lower().replace(" and ", " & "), LABELS)
        out = alt if alt in LABELS else out
    return out


def _example(it):
    text, cat = str(it.get("text", "")).strip(), str(it.get("category", "")).strip()
    return (INSTRUCTION.format(text=text), cat) if text and cat else None


def _profile_prompt(items):
    lines = "\n".join(f"article: {clip_words(it['text'], 40)} category: {it['category']}" for it in items)
    return (f"{lines}\nSummarize this user's news writing preferences in a short paragraph: "
            "which categories they write for most and about which topics.\nprofile:")


TASK = Task(
    id="LaMP_2N",
    kind="classification",
    instruction=INSTRUCTION,
    item_fields=("text", "title", "category"),
    label_field="category",
    content_field="text",
    cue="category:",
    labels=LABELS,
    max_new_tokens=8,
    render_query=lambda c: f"article: {c}",
    render_item=lambda it: f"article: {clip_words(it['text'], 36)} category: {it['category']}",
    item_to_example=_example,
    item_doc=lambda it: f"{it['title']} {it['text']}",
    parse=parse,
    statistical_profile=lambda items: frequency_profile(items, "category", "categories"),
    profile_prompt=_profile_prompt,
    description="news categorization (15 categories)",
)
