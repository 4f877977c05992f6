"""LaMP_1: citation identification. Input: a paper title and two candidate references
`[1]: "..." [2]: "..."`; output: "[1]" or "[2]", the one the author cites.

Profile items are the author's own papers (title, abstract) and carry no choice, so per-user
training uses a proxy: item -> ('Write a paper title for this abstract: {abstract}', title),
which teaches the adapter the author's topic vocabulary (None when either text is empty).
The template has three fields, so `Task.content()` returns the whole input; `render_query`
parses it itself (see `parse_input`) into 'paper: T [1]: R1 [2]: R2'. The retrieval query
(`query_text`) is the two references, as in the LaMP reference code; documents are title + abstract."""
from __future__ import annotations

import re
from collections import Counter

from oppu.tasks.base import Task, clip_words, extract_content
from oppu.tasks.common import parse_label

LABELS = ("[1]", "[2]")
INSTRUCTION = ('For an author who has written the paper with the title "{title}", which reference is '
               'related? Just answer with [1] or [2] without explanation. [1]: "{ref1}" [2]: "{ref2}"')
PROXY = "Write a paper title for this abstract: {abstract}"
_INPUT_RE = re.compile(r"(?is)\s*" + r"(.*?)".join(  # the template's literal text, any whitespace between chars
    r"\s*".join(map(re.escape, "".join(p.split()))) for p in re.split(r"\{\w+\}", INSTRUCTION)) + r"\s*")
_STOP = frozenset("""a an the of for and or in on to with by from at as is are be via using based
toward towards its their into over under through about between we our this that these those it
not do does how what when why new can using within without vs versus""".split())


def parse_input(input: str) -> tuple[str, str, str] | None:
    """Official LaMP_1 input -> (title, ref1, ref2), whitespace-tolerant; None if it does not match."""
    m = _INPUT_RE.fullmatch(str(input))
    return tuple(g.strip() for g in m.groups()) if m else None


def render_query(content: str) -> str:
    p = parse_input(content)
    return f"paper: {p[0]} [1]: {p[1]} [2]: {p[2]}" if p else content


def query_text(input: str) -> str:
    p = parse_input(input)
    return f"{p[1]} {p[2]}" if p else extract_content(INSTRUCTION, input)


def parse(text: str) -> str:
    """parse_label, then a bracketed or bare 1/2 at the start ('[2] because' or '2' -> '[2]')."""
    out = parse_label(text, LABELS)
    if out in LABELS:
        return out
    m = re.match(r"\W*(?:reference\s*)?\[?\s*([12])(?!\d)", str(text).strip(), re.I)
    return f"[{m.group(1)}]" if m else out


def _statistical_profile(items):
    words = Counter(w for it in items for w in re.findall(r"[a-z][a-z0-9-]+", str(it.get("title", "")).lower())
                    if w not in _STOP and len(w) > 2)
    if not words:
        return ""
    return "frequent title words: " + ", ".join(f"{w} ({n})" for w, n in words.most_common(8))


def _example(it):
    title, abstract = str(it.get("title", "")).strip(), str(it.get("abstract", "")).strip()
    return (PROXY.format(abstract=abstract), title) if title and abstract else None


def _profile_prompt(items):
    lines = "\n".join(f"paper: {it['title']} abstract: {clip_words(it['abstract'], 30)}" for it in items)
    return (f"{lines}\nSummarize this author's research interests in a short paragraph: the topics, "
            "methods and fields their papers cover.\nprofile:")


TASK = Task(
    id="LaMP_1",
    kind="classification",
    instruction=INSTRUCTION,
    item_fields=("title", "abstract"),
    label_field=None,
    content_field="title",
    cue="reference:",
    example_cue="title:",
    labels=LABELS,
    max_new_tokens=8,
    render_query=render_query,
    render_item=lambda it: f"paper: {it['title']}",
    item_to_example=_example,
    item_doc=lambda it: f"{it['title']} {it['abstract']}",
    parse=parse,
    statistical_profile=_statistical_profile,
    profile_prompt=_profile_prompt,
    description="citation identification ([1] or [2])",
    query_text=query_text,
)
