"""LaMP_3: product rating. Input: a review; output: its score "1".."5" (MAE/RMSE).

History item (text, score) -> example "review -> score", the user's rating habit. Scores may be
strings or numbers in real files; they are rendered as "4" (from 4, 4.0 or "4")."""
from __future__ import annotations

import re
from collections import Counter

from oppu.tasks.base import Task, clip_words

LABELS = ("1", "2", "3", "4", "5")
INSTRUCTION = ("What is the score of the following review on a scale of 1 to 5? just answer with "
               "1, 2, 3, 4, or 5 without further explanation. review: {text}")


def score_str(value) -> str:
    """4, 4.0, "4", " 4 " -> "4"; 3.5 -> "3.5"; non-numbers are returned stripped."""
    s = str(value).strip()
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f.is_integer() else str(f)


def parse(text: str) -> str:
    """The first number in the text (" 4 stars" -> "4"); the stripped text when there is none,
    so the scorer treats it as unparseable."""
    m = re.search(r"[-+]?\d+(?:\.\d+)?", str(text))
    return score_str(m.group()) if m else str(text).strip()


def _statistical_profile(items):
    vals = []
    for it in items:
        try:
            vals.append(float(str(it.get("score", "")).strip()))
        except ValueError:
            pass
    if not vals:
        return ""
    top, n = Counter(score_str(v) for v in vals).most_common(1)[0]
    return (f"average score {sum(vals) / len(vals):.1f} over {len(vals)} reviews; "
            f"most frequent score {top} ({n}/{len(vals)})")


def _example(it):
    text, score = str(it.get("text", "")).strip(), score_str(it.get("score", ""))
    return (INSTRUCTION.format(text=text), score) if text and score else None


def _profile_prompt(items):
    lines = "\n".join(f"review: {clip_words(it['text'], 40)} score: {score_str(it['score'])}" for it in items)
    return (f"{lines}\nSummarize this user's rating habits in a short paragraph: how generous or strict "
            "their scores are and what they praise or criticize.\nprofile:")


TASK = Task(
    id="LaMP_3",
    kind="regression",
    instruction=INSTRUCTION,
    item_fields=("text", "score"),
    label_field="score",
    content_field="text",
    cue="score:",
    labels=LABELS,
    max_new_tokens=4,
    render_query=lambda c: f"review: {c}",
    render_item=lambda it: f"review: {clip_words(it['text'], 40)} score: {score_str(it['score'])}",
    item_to_example=_example,
    item_doc=lambda it: str(it["text"]),
    parse=parse,
    statistical_profile=_statistical_profile,
    profile_prompt=_profile_prompt,
    description="product rating (1-5)",
)
