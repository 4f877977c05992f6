"""Per-task world generators for the synthetic LaMP data (driven by oppu/data/synth.py).

Each world holds a population prior (drawn once per seed) and knows how to draw a user's latent
trait, one example of the task for that user, and three oracle guesses used for the world's caps:

  guess_population(ex)           the best rule that sees only the input (population prior)
  guess_user(trait, ex, shifted) the generator's own rule with the user's true trait, no noise
  guess_history(history, ex)     the trait as estimated from the user's history examples

A trait has a part the history shows and a part only shifted queries use (behaviour shift),
described in each world's `shift_rule`. All randomness comes from the `random.Random` passed in.
Words come from oppu/data/synth_vocab.py.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
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


# ---------------------------------------------------------------- shared helpers
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


def _round(prior: dict) -> dict:
    return {str(k): round(v, 4) for k, v in prior.items()}


# ---------------------------------------------------------------- LaMP_2M / LaMP_2N
class LabelWorld:
    """Tags (2M) or categories (2N): the input names 2-3 candidate labels by their keywords; the user
    picks their most preferred candidate."""
    N_FAMILIAR = 7

    def __init__(self, task: str, rng: random.Random):
        self.task = task
        self.keywords = V.TAG_KEYWORDS if task == "LaMP_2M" else V.CATEGORY_KEYWORDS
        self.labels = tuple(self.keywords)
        self.prior = skewed_prior(rng, self.labels, power=1.0)
        what = "movie description" if task == "LaMP_2M" else "article"
        self.design = (f"Each {what} mentions keywords (1-2 each) of 2 or 3 candidate labels among filler words, so the "
                       "input alone narrows the answer to those candidates but cannot choose among them. Each user "
                       "has a latent preference order over the 15 labels (a Plackett-Luce draw from a skewed "
                       "population prior, so a population-favourite exists) and a familiar set of "
                       f"{self.N_FAMILIAR} labels their history's candidates come from. Gold = the user's most "
                       "preferred candidate (a random candidate with probability noise). History items are drawn "
                       "the same way, so they show which label the user picks among which candidates.")
        self.shift_rule = ("A shifted query's candidates all come from labels outside the user's familiar set, which "
                           "never appear as candidates in that user's history; the user's true order still decides.")

    def user(self, rng):
        familiar = plackett_luce(rng, self.prior)[: self.N_FAMILIAR]
        return {"ranking": plackett_luce(rng, self.prior),
                "familiar": sorted(familiar, key=self.labels.index)}

    def example(self, trait, rng, shifted, noise, query):
        pool = [lab for lab in self.labels if (lab in trait["familiar"]) != shifted]
        cands = rng.sample(pool, rng.choice((2, 3)))
        gold = self._pick(trait, cands)
        if rng.random() < noise:
            gold = rng.choice(cands)
        kws = [w for c in cands for w in rng.sample(self.keywords[c], rng.choice((1, 2)))]
        rng.shuffle(kws)
        if self.task == "LaMP_2M":
            text = compose(rng, rng.choice(V.MOVIE_OPENERS), kws, V.MOVIE_CONNECTORS, rng.choice(V.MOVIE_CLOSERS))
            fields = {"description": text, "tag": gold}
            inp = INSTRUCTIONS[self.task].format(description=text)
        else:
            text = compose(rng, rng.choice(V.NEWS_OPENERS), kws, V.NEWS_CONNECTORS, rng.choice(V.NEWS_CLOSERS))
            title = " and ".join(kws[:2]) + ": " + rng.choice(V.NEWS_TITLE_TAILS)
            fields = {"text": text, "title": title, "category": gold}
            inp = INSTRUCTIONS[self.task].format(text=text)
        return Example(fields, inp, gold, tuple(cands), gold)

    def _pick(self, trait, cands):
        return min(cands, key=trait["ranking"].index)

    def guess_population(self, ex):
        return max(ex.latent, key=self.prior.__getitem__)

    def guess_user(self, trait, ex, shifted):
        return self._pick(trait, ex.latent)

    def guess_history(self, history, ex):
        counts = Counter(h.shown for h in history)
        return max(ex.latent, key=lambda c: (counts.get(c, 0), self.prior[c]))

    def card(self):
        return {"label_prior": _round(self.prior), "familiar_labels_per_user": self.N_FAMILIAR}


# ---------------------------------------------------------------- LaMP_3
class RatingWorld:
    """Reviews whose sentiment words fix a base score; each user adds a personal bias."""
    task = "LaMP_3"
    BASE_PRIOR = {1: 0.08, 2: 0.24, 3: 0.36, 4: 0.24, 5: 0.08}
    BIAS_PRIOR = {-2: 0.08, -1: 0.20, 0: 0.26, 1: 0.34, 2: 0.12}
    design = ("Each review holds 2-3 sentiment words of one level b in 1..5 (mostly 2..4) about a product, among "
              "filler. Each user has a latent bias in {-2,-1,0,+1,+2} drawn from a skewed population prior "
              "(mode +1); gold = clip(b + bias, 1, 5), moved by +-1 (then clipped) with probability noise. The "
              "input alone gives b; the history's (text, score) pairs show the bias.")
    shift_rule = ("A shifted query uses the user's second bias, drawn from the population prior excluding the bias "
                  "their history shows (a change of mood the history cannot reveal).")

    def __init__(self, rng: random.Random):
        # The MAE-best score without the user: the prior median of clip(b + bias) for each base b.
        self.population_rule = {b: self._median(b) for b in self.BASE_PRIOR}

    def _median(self, b):
        acc = 0.0
        for bias, w in sorted(self.BIAS_PRIOR.items(), key=lambda t: _clip(b + t[0])):
            acc += w
            if acc >= 0.5:
                return _clip(b + bias)
        raise AssertionError("prior does not sum to 1")

    def user(self, rng):
        bias = draw(rng, self.BIAS_PRIOR)
        return {"bias": bias, "shift_bias": draw(rng, self.BIAS_PRIOR, exclude=(bias,))}

    def example(self, trait, rng, shifted, noise, query):
        base = draw(rng, self.BASE_PRIOR)
        words = rng.sample(V.SENTIMENT_WORDS[base], rng.choice((2, 3)))
        text = " ".join(p for p in (rng.choice(V.REVIEW_OPENERS), rng.choice(V.PRODUCTS), rng.choice(V.REVIEW_MIDDLES),
                                    " and ".join(words), rng.choice(V.REVIEW_CLOSERS)) if p)
        score = _clip(base + trait["shift_bias" if shifted else "bias"])
        if rng.random() < noise:
            score = _clip(score + rng.choice((-1, 1)))
        return Example({"text": text, "score": str(score)}, INSTRUCTIONS["LaMP_3"].format(text=text), str(score),
                       base, score - base)

    def guess_population(self, ex):
        return str(self.population_rule[ex.latent])

    def guess_user(self, trait, ex, shifted):
        return str(_clip(ex.latent + trait["shift_bias" if shifted else "bias"]))

    def guess_history(self, history, ex):
        # The bias that reproduces the most history scores (handles clipping at 1 and 5).
        fits = {b: sum(_clip(h.latent + b) == int(h.gold) for h in history) for b in self.BIAS_PRIOR}
        best = max(self.BIAS_PRIOR, key=lambda b: (fits[b], self.BIAS_PRIOR[b]))
        return str(_clip(ex.latent + best))

    def card(self):
        return {"base_prior": _round(self.BASE_PRIOR), "bias_prior": _round(self.BIAS_PRIOR),
                "population_rule": {str(b): s for b, s in self.population_rule.items()}}


def _clip(x: int) -> int:
    return max(1, min(5, x))


# ---------------------------------------------------------------- LaMP_4 / LaMP_5 / LaMP_7
class StyleWorld(ABC):
    """Outputs rewrite the input's salient words in the user's style (a choice per style dimension)."""
    task = ""
    dims: tuple[tuple[str, tuple[str, ...]], ...] = ()
    power = 1.2                # population skew of every style dimension
    design = shift_rule = ""

    def __init__(self, rng: random.Random):
        self.priors = {name: skewed_prior(rng, opts, power=self.power) for name, opts in self.dims}
        self.modal = {name: max(p, key=p.__getitem__) for name, p in self.priors.items()}

    @abstractmethod
    def content(self, rng: random.Random) -> tuple[str, tuple[str, ...]]:
        """The input text and its salient words, in order of appearance."""

    @abstractmethod
    def render(self, style: dict[str, str], kws: tuple[str, ...]) -> str:
        """The output these salient words get in this style."""

    @abstractmethod
    def item(self, text: str, gold: str) -> dict[str, str]:
        """The profile item fields of one (input text, output) pair."""

    def _style(self, rng):
        return {name: draw(rng, p) for name, p in self.priors.items()}

    def user(self, rng):
        style = self._style(rng)
        other = self._style(rng)
        while other == style:
            other = self._style(rng)
        return {"style": style, "shift_style": other}

    def example(self, trait, rng, shifted, noise, query):
        text, kws = self.content(rng)
        used = trait["shift_style" if shifted else "style"]
        if rng.random() < noise:
            used = self._style(rng)
        gold = self.render(used, kws)
        key = "abstract" if self.task == "LaMP_5" else "text"
        return Example(self.item(text, gold), INSTRUCTIONS[self.task].format(**{key: text}), gold, kws, used)

    def guess_population(self, ex):
        return self.render(self.modal, ex.latent)

    def guess_user(self, trait, ex, shifted):
        return self.render(trait["shift_style" if shifted else "style"], ex.latent)

    def guess_history(self, history, ex):
        style = {name: vote([h.shown[name] for h in history], p) for name, p in self.priors.items()}
        return self.render(style, ex.latent)

    def card(self):
        return {"style_priors": {name: _round(p) for name, p in self.priors.items()}, "modal_style": self.modal}


class HeadlineWorld(StyleWorld):
    task = "LaMP_4"
    dims = (("prefix", V.HEADLINE_PREFIXES), ("pick", V.HEADLINE_PICKS), ("joiner", V.HEADLINE_JOINERS),
            ("suffix", V.HEADLINE_SUFFIXES))
    design = ("Each article holds 3 salient news keywords, in order, among filler phrases. A headline = the user's "
              "style applied to them: prefix (e.g. 'BREAKING:'), which keywords (first two / all three / last two), "
              "the word joining them, and a suffix (e.g. '- report'); each user's style is drawn per dimension "
              "from a skewed population prior. With probability noise an item uses a fresh population style. "
              "The input gives the keywords; only the history shows the style.")
    shift_rule = "A shifted query is written in the user's second style, which differs from the one their history shows."

    def content(self, rng):
        kws = tuple(rng.sample(V.NEWS_KEYWORDS, 3))
        return compose(rng, rng.choice(V.ARTICLE_OPENERS), kws, V.ARTICLE_LINKS, rng.choice(V.ARTICLE_CLOSERS)), kws

    def render(self, style, kws):
        picked = {"first two": kws[:2], "all three": kws, "last two": kws[1:]}[style["pick"]]
        return " ".join(p for p in (style["prefix"], style["joiner"].join(picked), style["suffix"]) if p)

    def item(self, text, gold):
        return {"text": text, "title": gold}


class PaperTitleWorld(StyleWorld):
    task = "LaMP_5"
    dims = (("template", V.TITLE_TEMPLATES), ("tail", V.TITLE_TAILS))
    design = ("Each abstract holds 3 research terms a, b, c, in order, among filler phrases. A title = the user's "
              "template (e.g. 'Towards {a} {b}', '{a} {b}: a {c} approach', 'On {a} for {b}') plus an optional "
              "tail (e.g. 'at scale'), drawn per user from a skewed population prior; with probability noise an "
              "item uses a fresh population style. The input gives the terms; only the history shows the style.")
    shift_rule = "A shifted query is written in the user's second style, which differs from the one their history shows."

    def content(self, rng):
        a, b, c = rng.sample(V.RESEARCH_TERMS, 3)
        text = " ".join((rng.choice(V.ABSTRACT_OPENERS), a, rng.choice(V.ABSTRACT_LINKS1), b,
                         rng.choice(V.ABSTRACT_LINKS2), c, rng.choice(V.ABSTRACT_CLOSERS)))
        return text, (a, b, c)

    def render(self, style, kws):
        a, b, c = kws
        title = style["template"].format(a=a, b=b, c=c) + (" " + style["tail"] if style["tail"] else "")
        return title[0].upper() + title[1:]

    def item(self, text, gold):
        return {"abstract": text, "title": gold}


class TweetWorld(StyleWorld):
    task = "LaMP_7"
    dims = (("opener", V.TWEET_OPENERS), ("form", V.TWEET_FORMS), ("ender", V.TWEET_ENDERS))
    power = 0.8                # content words dominate ROUGE here; a flatter prior keeps the style gap visible
    design = ("The input is a neutral statement with 3-5 content words (times, verbs, nouns) among function words. "
              "The user's tweet keeps the content words (all, the first three or the last three) between the user's opener "
              "(e.g. 'ugh') and ender (e.g. 'lol', '#blessed'), each drawn per user from a skewed population prior; "
              "with probability noise a tweet uses a fresh population style. Profile items are the user's earlier "
              "tweets only, so the history shows the style but never the statements.")
    shift_rule = "A shifted query is written in the user's second style, which differs from the one their history shows."

    def content(self, rng):
        pools = {"{t}": list(V.TWEET_TIMES), "{v}": list(V.TWEET_VERBS), "{n}": list(V.TWEET_NOUNS)}
        words, kws = [], []
        for tok in rng.choice(V.STATEMENT_TEMPLATES).split():
            if tok in pools:
                tok = pools[tok].pop(rng.randrange(len(pools[tok])))
                kws.append(tok)
            words.append(tok)
        return " ".join(words), tuple(kws)

    def render(self, style, kws):
        body = {"all words": kws, "first three": kws[:3], "last three": kws[-3:]}[style["form"]]
        return " ".join(p for p in (style["opener"], *body, style["ender"]) if p)

    def item(self, text, gold):
        return {"text": gold}


# ---------------------------------------------------------------- LaMP_1
class CitationWorld:
    """Each user writes about one research topic; the related reference is the on-topic candidate."""
    task = "LaMP_1"
    design = ("Each user has a latent research topic (one of 8, drawn from a skewed population prior, each with 10 "
              "topic words). History items are the user's papers: title and abstract built from topic words of "
              "their topic (another topic with probability noise). A query's paper title is made only of "
              "topic-neutral method words; its two candidate references are short titles, one on the user's "
              "topic and one on another topic, in random order; gold '[1]' or '[2]' (random with probability "
              "noise). The input alone cannot tell which topic is the user's; the history can.")
    shift_rule = ("A shifted query's related reference is on the user's second topic, which their history never "
                  "shows; the other candidate is on a third topic (never the history's topic either).")

    def __init__(self, rng: random.Random):
        self.topics = tuple(V.TOPIC_WORDS)
        self.prior = skewed_prior(rng, self.topics, power=1.0)

    def user(self, rng):
        topic = draw(rng, self.prior)
        return {"topic": topic, "shift_topic": draw(rng, self.prior, exclude=(topic,))}

    def _ref(self, rng, topic):
        t1, t2 = rng.sample(V.TOPIC_WORDS[topic], 2)
        return f"{rng.choice(V.METHOD_WORDS)} {t1} {t2}"

    def example(self, trait, rng, shifted, noise, query):
        topic = trait["shift_topic" if shifted else "topic"]
        if not query:
            if rng.random() < noise:
                topic = rng.choice(self.topics)
            t = rng.sample(V.TOPIC_WORDS[topic], 3)
            abstract = compose(rng, rng.choice(V.PAPER_OPENERS), [*t, rng.choice(V.METHOD_WORDS)], V.PAPER_LINKS,
                               rng.choice(V.PAPER_CLOSERS))
            title = f"{rng.choice(V.METHOD_WORDS)} {t[0]} {t[1]}"
            return Example({"title": title, "abstract": abstract}, "", "", None, topic)
        other = draw(rng, self.prior, exclude=(topic, trait["topic"]))
        cands = [topic, other]
        rng.shuffle(cands)
        gold = f"[{cands.index(topic) + 1}]"
        if rng.random() < noise:
            gold = rng.choice(("[1]", "[2]"))
        title = " ".join(rng.sample(V.METHOD_WORDS, rng.choice((3, 4))))
        inp = INSTRUCTIONS["LaMP_1"].format(title=title, ref1=self._ref(rng, cands[0]), ref2=self._ref(rng, cands[1]))
        return Example({}, inp, gold, tuple(cands), topic)

    def _answer(self, cands, topic_rank):
        return f"[{1 + max(range(2), key=lambda i: topic_rank(cands[i]))}]"

    def guess_population(self, ex):
        return self._answer(ex.latent, self.prior.__getitem__)

    def guess_user(self, trait, ex, shifted):
        topic = trait["shift_topic" if shifted else "topic"]
        return self._answer(ex.latent, lambda t: t == topic)

    def guess_history(self, history, ex):
        counts = Counter(h.shown for h in history)
        return self._answer(ex.latent, lambda t: (counts.get(t, 0), self.prior[t]))

    def card(self):
        return {"topic_prior": _round(self.prior)}


def make_world(task: str, rng: random.Random) -> World:
    """The world generator of a canonical LaMP task id, its population drawn from rng."""
    if task in ("LaMP_2M", "LaMP_2N"):
        return LabelWorld(task, rng)
    worlds = {"LaMP_1": CitationWorld, "LaMP_3": RatingWorld, "LaMP_4": HeadlineWorld,
              "LaMP_5": PaperTitleWorld, "LaMP_7": TweetWorld}
    if task not in worlds:
        raise ValueError(f"no synthetic world for task {task!r}; valid: {', '.join(sorted([*worlds, 'LaMP_2M', 'LaMP_2N']))}")
    return worlds[task](rng)
