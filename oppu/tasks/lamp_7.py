"""LaMP_7: tweet paraphrasing. Input: a text to restate; output: the user's tweet (ROUGE-1/L).

History items carry only the user's tweets (text), so they are modelled as text: each item ->
example (instruction applied to the tweet, the tweet itself), which teaches the adapter the
user's wording. In prompts, history lines read "tweet: ..." and the query reads "text: ..."."""
from __future__ import annotations

import re
from collections import Counter

from oppu.tasks.base import Task, clip_words
from oppu.tasks.lamp_4 import first_line

INSTRUCTION = "Paraphrase the following tweet without any explanation before or after it: {text}"
_EMOTICON = re.compile(r"^(?:[:;=8xX][-'^]?[()\[\]DPpOo3/\\|*]+|<3+|\^_?\^)$")


def _marker(tok: str) -> str | None:
    """Hashtags, mentions, emoticons and emoji-ish tokens (non-text symbols), else None."""
    if re.match(r"^[#@]\w+", tok):
        return re.match(r"^[#@]\w+", tok).group().lower()
    if _EMOTICON.match(tok) or any(ord(ch) >= 0x2190 for ch in tok):
        return tok
    return None


def _statistical_profile(items):
    tweets = [str(it.get("text", "")).strip() for it in items if str(it.get("text", "")).strip()]
    if not tweets:
        return ""
    avg = sum(len(t.split()) for t in tweets) / len(tweets)
    parts = [f"tweets average {avg:.1f} words"]
    marks = Counter(m for t in tweets for m in map(_marker, t.split()) if m).most_common(5)
    if marks:
        parts.append("frequent markers: " + ", ".join(f"{m} ({n})" for m, n in marks))
    parts.append("e.g. " + " | ".join(f'"{clip_words(t, 20)}"' for t in tweets[-2:]))
    return "; ".join(parts)


def _example(it):
    text = str(it.get("text", "")).strip()
    return (INSTRUCTION.format(text=text), text) if text else None


def _profile_prompt(items):
    lines = "\n".join(f"tweet: {clip_words(it['text'], 40)}" for it in items)
    return (f"{lines}\nSummarize this user's tweeting style in a short paragraph: length, tone, "
            "vocabulary and use of hashtags, mentions and emoji.\nprofile:")


TASK = Task(
    id="LaMP_7",
    kind="generation",
    instruction=INSTRUCTION,
    item_fields=("text",),
    label_field="text",
    content_field="text",
    cue="tweet:",
    max_new_tokens=48,
    render_query=lambda c: f"text: {c}",
    render_item=lambda it: f"tweet: {it['text']}",
    item_to_example=_example,
    item_doc=lambda it: str(it["text"]),
    parse=first_line,
    statistical_profile=_statistical_profile,
    profile_prompt=_profile_prompt,
    description="tweet paraphrasing",
)
