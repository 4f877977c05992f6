"""Style worlds for the generation tasks: LaMP_4 headlines, LaMP_5 paper titles, LaMP_7 tweets.

The output rewrites the input's salient words in the user's style, one choice per style
dimension (each drawn per user from a skewed population prior); the input gives the words, only
the history shows the style. A shifted query uses the user's second, different style. Built by
oppu.data.synth_tasks.make_world; shared pieces in oppu/data/synth_common.py.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod

from oppu.data import synth_vocab as V
from oppu.data.synth_common import INSTRUCTIONS, Example, compose, draw, round_prior, skewed_prior, vote


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
        return {"style_priors": {name: round_prior(p) for name, p in self.priors.items()}, "modal_style": self.modal}


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
