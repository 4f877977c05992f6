"""How much of a table is noise: a bootstrap over test users (users, not questions, are the unit
the paper samples), of every method's score and of every method's gap to the baseline on the same
resampled users (paired), with LaMP's own metrics recomputed on each resample.

    s = user_bootstrap("LaMP_2M", golds, {"oppu": p1, "non_personalized": p0}, {"u1": ["q1", "q2"], ...})
    s["gap"]["oppu"]["accuracy"]  # {"mean": .., "lo": .., "hi": .., "p_better": ..} (95% interval)

Pure: no I/O. Mean metrics over questions (accuracy, MAE, ROUGE) are scored once per question
and averaged per resample; the others (macro F1, RMSE) are rescored on each resample.
"""
from __future__ import annotations

import random
from functools import partial
from typing import Callable, Mapping, Sequence

from oppu.metrics import higher_is_better, score

Scorer = Callable[[Mapping[str, str], Mapping[str, str]], dict[str, float]]   # (golds, preds) -> metrics

MEAN_METRICS = ("accuracy", "MAE", "rouge-1", "rouge-L")


def _per_question(scorer: Scorer, golds: Mapping[str, str], preds: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """{qid: {metric: value}} for every metric (those outside MEAN_METRICS are rescored per resample)."""
    return {q: scorer({q: golds[q]}, {q: preds[q]}) for q in preds}


def _resample_scores(scorer: Scorer, golds, preds, per_q, qids: Sequence[str]) -> dict[str, float]:
    keys = list(per_q[qids[0]])
    out = {k: sum(per_q[q][k] for q in qids) / len(qids) for k in keys if k in MEAN_METRICS}
    if any(k not in MEAN_METRICS for k in keys):
        tag = {f"{q}#{j}": q for j, q in enumerate(qids)}
        rest = scorer({t: golds[q] for t, q in tag.items()}, {t: preds[q] for t, q in tag.items()})
        out.update({k: v for k, v in rest.items() if k not in MEAN_METRICS})
    return {k: out[k] for k in keys}


def _interval(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return xs[int(0.025 * (len(xs) - 1))], xs[int(round(0.975 * (len(xs) - 1)))]


def user_bootstrap(task: str, golds: Mapping[str, str], preds_by_method: Mapping[str, Mapping[str, str]],
                   questions_by_user: Mapping[str, Sequence[str]], n: int = 400, seed: int = 0,
                   baseline: str = "non_personalized", scorer: Scorer | None = None) -> dict:
    """95% intervals of each method's metrics and (paired) of its gap to `baseline`, resampling users.
    `scorer(golds, preds)`: default LaMP's metrics of `task` (a user-registered task passes its own)."""
    scorer = scorer or partial(score, task)
    users = sorted(u for u, qs in questions_by_user.items() if qs)   # draws do not depend on dict order
    if not users:
        raise ValueError("no test user with a question to resample")
    per_q = {m: _per_question(scorer, golds, p) for m, p in preds_by_method.items()}
    rng = random.Random(seed)
    draws: dict[str, list[dict[str, float]]] = {m: [] for m in preds_by_method}
    for _ in range(n):
        qids = [q for u in (rng.choice(users) for _ in users) for q in questions_by_user[u]]
        for m, p in preds_by_method.items():
            draws[m].append(_resample_scores(scorer, golds, p, per_q[m], qids))
    out: dict = {"resamples": n, "unit": "test user", "users": len(users), "methods": {}, "gap": {}}
    for m, ds in draws.items():
        out["methods"][m] = {k: dict(zip(("lo", "hi"), _interval([d[k] for d in ds]))) for k in ds[0]}
        if baseline in draws and m != baseline:
            gap = {}
            for k in ds[0]:
                diffs = [d[k] - b[k] for d, b in zip(ds, draws[baseline])]
                lo, hi = _interval(diffs)
                better = sum((x > 0) if higher_is_better(k) else (x < 0) for x in diffs) / n
                gap[k] = {"mean": sum(diffs) / n, "lo": lo, "hi": hi, "p_better": better}
            out["gap"][m] = gap
    return out
