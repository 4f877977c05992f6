"""LaMP_4: news headline generation. Input: an article; output: its headline (ROUGE-1/L).

History item (text, title) -> example "article -> headline", the user's headline style.
Item lines clip the article (to 32 words) so the headline at the end survives prompt clipping.
Also holds the helpers the other generation tasks share: `first_line` and `title_profile`."""
from __future__ import annotations

import re
from collections import Counter

from oppu.tasks.base import Task, clip_words

INSTRUCTION = "Generate a headline for the following article: {text}"


def first_line(text: str) -> str:
    """Generated text -> the first non-empty line, stripped ('' when there is none)."""
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")


def _casing(title: str) -> str:
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", title)
    if not words:
        return "no letters"
    if len(words) > 1 and all(w.isupper() for w in words):
        return "upper case"
    long = [w for w in words[1:] if len(w) > 3]
    if long and sum(w[0].isupper() for w in long) / len(long) >= 0.6:
        return "title case"
    return "sentence case" if words[0][0].isupper() else "lower case"


def title_profile(titles: list[str], noun: str) -> str:
    """'headlines average 9.5 words, mostly title case; common first words: how (2/4); e.g. "A" | "B"'."""
    titles = [str(t).strip() for t in titles if str(t).strip()]
    if not titles:
        return ""
    n = len(titles)
    avg = sum(len(t.split()) for t in titles) / n
    casing = Counter(_casing(t) for t in titles).most_common(1)[0][0]
    parts = [f"{noun} average {avg:.1f} words, mostly {casing}"]
    firsts = Counter(re.sub(r"\W+$", "", t.split()[0].lower()) for t in titles).most_common(3)
    common = [f"{w} ({c}/{n})" for w, c in firsts if c > 1 and w]
    if common:
        parts.append("common first words: " + ", ".join(common))
    colons = sum(":" in t for t in titles)
    if colons:
        parts.append(f"colon in {colons}/{n}")
    parts.append("e.g. " + " | ".join(f'"{clip_words(t, 16)}"' for t in titles[-2:]))
    return "; ".join(parts)


def _example(it):
    text, title = str(it.get("text", "")).strip(), str(it.get("title", "")).strip()
    return (INSTRUCTION.format(text=text), title) if text and title else None


def _profile_prompt(items):
    lines = "\n".join(f"article: {clip_words(it['text'], 40)} headline: {it['title']}" for it in items)
    return (f"{lines}\nSummarize this user's headline writing style in a short paragraph: "
            "length, tone, wording and what they choose to emphasize.\nprofile:")


TASK = Task(
    id="LaMP_4",
    kind="generation",
    instruction=INSTRUCTION,
    item_fields=("text", "title"),
    label_field="title",
    content_field="text",
    cue="headline:",
    max_new_tokens=32,
    render_query=lambda c: f"article: {c}",
    render_item=lambda it: f"article: {clip_words(it['text'], 32)} headline: {it['title']}",
    item_to_example=_example,
    item_doc=lambda it: f"{it['text']} {it['title']}",
    parse=first_line,
    statistical_profile=lambda items: title_profile([it.get("title", "") for it in items], "headlines"),
    profile_prompt=_profile_prompt,
    description="news headline generation",
)
