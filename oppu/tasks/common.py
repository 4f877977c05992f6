"""Pieces shared by the task modules: label parsing and label-frequency profiles."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any


def parse_label(text: str, labels: tuple[str, ...]) -> str:
    """Map generated text to a label: exact match first, then case-insensitive match of the
    first line, then the label that starts the text (longest first, so 'dark comedy' beats
    'comedy'), then, for a chatty answer ('Tag: comedy.', 'The category is sports'), the label
    that occurs first in the first line as whole words (longest wins a tie). Unmatched text is
    returned stripped, so the exact scorer counts it invalid."""
    s = str(text).strip()
    if s in labels:
        return s
    first = s.splitlines()[0].strip() if s else ""
    first = re.sub(r"^[\"'\[\(]+|[\"'\]\).,;:!]+$", "", first).strip()
    low = {lab.lower(): lab for lab in labels}
    if first.lower() in low:
        return low[first.lower()]
    for lab in sorted(labels, key=len, reverse=True):
        if first.lower().startswith(lab.lower()):
            return lab
    hits = []
    for lab in labels:
        m = re.search(r"(?<![\w-])" + re.escape(lab.lower()) + r"(?![\w-])", first.lower())
        if m:
            hits.append((m.start(), -len(lab), lab))
    return min(hits)[2] if hits else first


def frequency_profile(items: list[dict[str, Any]], field: str, noun: str, top: int = 3) -> str:
    """'most frequent tags: comedy (5/9), action (3/9)' from the items' label field."""
    vals = [str(it[field]).strip() for it in items if str(it.get(field, "")).strip()]
    if not vals:
        return ""
    c = Counter(vals).most_common(top)
    return f"most frequent {noun}: " + ", ".join(f"{v} ({n}/{len(vals)})" for v, n in c)
