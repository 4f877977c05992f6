"""Per-task world generators for the synthetic LaMP data (driven by oppu/data/synth.py).

Each world holds a population prior (drawn once per seed) and knows how to draw a user's latent
trait, one example of the task for that user, and three oracle guesses used for the world's caps:

  guess_population(ex)           the best rule that sees only the input (population prior)
  guess_user(trait, ex, shifted) the generator's own rule with the user's true trait, no noise
  guess_history(history, ex)     the trait as estimated from the user's history examples

A trait has a part the history shows and a part only shifted queries use (behaviour shift),
described in each world's `shift_rule`. All randomness comes from the `random.Random` passed in.
Words come from oppu/data/synth_vocab.py.

Here: the choice worlds (LaMP_1 citations, LaMP_2M/2N labels, LaMP_3 ratings) and make_world.
The generation worlds (LaMP_4/5/7) are in oppu/data/synth_style.py; Example, World,
INSTRUCTIONS and the sampling helpers in oppu/data/synth_common.py (re-exported here).
"""
from __future__ import annotations

import random
from collections import Counter

from oppu.data import synth_vocab as V
from oppu.data.synth_common import (INSTRUCTIONS, Example, World, compose, draw, plackett_luce, round_prior,
                                    skewed_prior)
from oppu.data.synth_style import HeadlineWorld, PaperTitleWorld, TweetWorld

__all__ = ["INSTRUCTIONS", "CitationWorld", "Example", "LabelWorld", "RatingWorld", "World", "make_world"]


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
        return {"label_prior": round_prior(self.prior), "familiar_labels_per_user": self.N_FAMILIAR}


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
        return {"base_prior": round_prior(self.BASE_PRIOR), "bias_prior": round_prior(self.BIAS_PRIOR),
                "population_rule": {str(b): s for b, s in self.population_rule.items()}}


def _clip(x: int) -> int:
    return max(1, min(5, x))


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
        return {"topic_prior": round_prior(self.prior)}


def make_world(task: str, rng: random.Random) -> World:
    """The world generator of a canonical LaMP task id, its population drawn from rng."""
    if task in ("LaMP_2M", "LaMP_2N"):
        return LabelWorld(task, rng)
    worlds = {"LaMP_1": CitationWorld, "LaMP_3": RatingWorld, "LaMP_4": HeadlineWorld,
              "LaMP_5": PaperTitleWorld, "LaMP_7": TweetWorld}
    if task not in worlds:
        raise ValueError(f"no synthetic world for task {task!r}; valid: {', '.join(sorted([*worlds, 'LaMP_2M', 'LaMP_2N']))}")
    return worlds[task](rng)
