"""What every synthetic LaMP world shares (oppu/data/synth_tasks.py, oppu/data/synth_style.py).

  INSTRUCTIONS     the official LaMP input templates, per task id
  Example          one generated record: a history item or a query with its gold
  World            the protocol a world generator meets (see oppu/data/synth_tasks.py)
  skewed_prior, draw, plackett_luce, vote, compose, round_prior   sampling and text helpers

All randomness comes from the `random.Random` passed in. Words come from oppu/data/synth_vocab.py.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from oppu.data import synth_vocab as V

# Official LaMP input templates, kept here (not imported from oppu.tasks) so the generator does
# not depend on the task modules; tests/test_synth.py checks the two stay equal.
INSTRUCTIONS: dict[str, str] = {
    "LaMP_1": ('For an author who has written the paper with the title "{title}", which reference is related? '
               'Just answer with [1] or [2] without explanation. [1]: "{ref1}" [2]: "{ref2}"'),
    "LaMP_2N": ("Which category does this article relate to among the following categories? Just answer with "
                "the category name without further explanation. categories: [" + ", ".join(V.CATEGORY_KEYWORDS)
                + "] article: {text}"),
    "LaMP_2M": ("Which tag does this movie relate to among the following tags? Just answer with the tag name "
                "without further explanation. tags: [" + ", ".join(V.TAG_KEYWORDS) + "] description: {description}"),
    "LaMP_3": ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
               "or 5 without further explanation. review: {text}"),
    "LaMP_4": "Generate a headline for the following article: {text}",
    "LaMP_5": "Generate a title for the following abstract of a paper: {abstract}",
    "LaMP_7": "Paraphrase the following tweet without any explanation before or after it: {text}",
}


@dataclass(frozen=True)
class Example:
    """One generated record: usable as a history item (`fields`) or as a query (`input`, `gold`)."""
    fields: dict[str, str]   # profile item fields, answer included (no id/date)
    input: str               # official query input
    gold: str
    latent: Any              # what every oracle may read: candidates, base score, keywords
    shown: Any               # the trait value that produced `gold` after noise: what this record reveals


class World(Protocol):
    task: str
    design: str
    shift_rule: str

    def user(self, rng: random.Random) -> dict[str, Any]: ...
    def example(self, trait: dict, rng: random.Random, shifted: bool, noise: float, query: bool) -> Example: ...
    def guess_population(self, ex: Example) -> str: ...
    def guess_user(self, trait: dict, ex: Example, shifted: bool) -> str: ...
    def guess_history(self, history: list[Example], ex: Example) -> str: ...
    def card(self) -> dict[str, Any]: ...


def skewed_prior(rng: random.Random, options: Sequence, power: float) -> dict:
    """Zipf-like weights 1/(rank+1)^power over the options in a seed-dependent order (sum 1)."""
    order = list(options)
    rng.shuffle(order)
    raw = [1.0 / (r + 1) ** power for r in range(len(order))]
    total = sum(raw)
    return {o: w / total for o, w in zip(order, raw)}


def draw(rng: random.Random, prior: dict, exclude: Sequence = ()) -> Any:
    opts = [o for o in prior if o not in exclude]
    return rng.choices(opts, weights=[prior[o] for o in opts])[0]


def plackett_luce(rng: random.Random, prior: dict) -> list:
    """A full preference order: repeatedly draw the next favourite, weighted by the prior."""
    left, order = dict(prior), []
    while left:
        order.append(draw(rng, left))
        del left[order[-1]]
    return order


def vote(values: Sequence, prior: dict) -> Any:
    """Most common value; ties (and the empty case) go to the higher prior weight."""
    counts = Counter(values)
    return max(prior, key=lambda o: (counts.get(o, 0), prior[o]))


def compose(rng: random.Random, opener: str, keywords: Sequence[str], links: Sequence[str], closer: str) -> str:
    """'opener kw1 link kw2 link kw3 closer': keywords in order, joined by drawn link phrases."""
    parts = [opener, keywords[0]]
    for kw in keywords[1:]:
        parts += [rng.choice(links), kw]
    parts.append(closer)
    return " ".join(p for p in parts if p)


def round_prior(prior: dict) -> dict:
    """The prior as written to world.json: string keys, weights to 4 decimals."""
    return {str(k): round(v, 4) for k, v in prior.items()}
