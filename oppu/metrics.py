"""LaMP-exact metrics: accuracy, macro-F1, MAE, RMSE, ROUGE-1/L. Pure functions, no disk I/O.

Reproduces the official LaMP scorer (LaMP/metrics/*.py, which calls `evaluate`, i.e. sklearn
and rouge_score) without `evaluate`, which cannot load its metrics offline.

    from oppu.metrics import score
    score("LaMP_2M", golds={"1": "comedy"}, preds={"1": " comedy "})
    # {'accuracy': 1.0, 'f1': 0.0666...}   (1 of 15 labels has F1 = 1; the other 14 score 0)

The rules, as the project's LaMP brief states them (docs/lamp.md: these, with the file formats):

  "Classification (LaMP_1, LaMP_2N, LaMP_2M): strip whitespace; exact, case-sensitive match
   against the label list; anything else maps to the invalid class -1. Accuracy over all ids;
   F1 is macro over the label list only (labels 0..n-1), so invalid outputs only ever count
   as errors, and a label absent from both golds and preds scores 0 and still counts in the mean."
  "LaMP_3: `float(pred)` after strip; if that fails, the prediction becomes 1 or 5, whichever
   is FARTHER from the gold. Values outside 1..5 are not clipped. Keys `MAE`, `RMSE`."
  "Generation (LaMP_4, LaMP_5, LaMP_7): ROUGE-1 and ROUGE-L F-measure from `rouge_score`
   with `use_stemmer=False`, one reference per prediction, averaged over ids."
  "Golds and predictions must have the same id set, else it is an error, not a score."

What each metric does, precisely:

- `classification_metrics`: both sides are `str.strip()`-ed and mapped to their index in the
  label list (case-sensitive), anything else to -1; this applies to golds too. `accuracy` is
  sklearn's `accuracy_score` on those ints, so an invalid pred against an invalid gold
  (-1 == -1) counts as CORRECT, as in the official code. `f1` is sklearn's
  `f1_score(golds, preds, labels=range(n), average="macro")` with zero_division -> 0: per label
  F1 = 2*TP / (2*TP + FP + FN) (= 2PR/(P+R)), 0 when the label never occurs on either side,
  and the mean divides by n. -1 is never a label: a -1 pred is a false negative for its gold's
  label, a -1 gold makes the pred a false positive for the predicted label.
- `rating_metrics`: gold = float(gold.strip()); pred = float(pred.strip()), and when that raises
  ValueError the official fallback `1.0 if abs(1 - y) > abs(5 - y) else 5.0` (y = the gold), so a
  gold of 3 (a tie) gets 5.0. MAE = mean |pred - gold|, RMSE = sqrt(mean (pred - gold)^2). No
  clipping. Python float semantics throughout: "nan", "inf", "1e3", "1_0" and " 4.5 " parse,
  and a nan/inf pred makes the result nan/inf (the official sklearn call would raise on them).
  An unparseable gold is an error (the official code raises too).
- `generation_metrics`: `rouge_score.rouge_scorer.RougeScorer(["rouge1", "rougeL"],
  use_stemmer=False)` with its default tokenizer (lowercase, every run of characters outside
  [a-z0-9] is a separator, so punctuation and non-ASCII letters are dropped), `score(target=gold,
  prediction=pred)`, the F-measure of each pair, averaged over ids. An empty pred (or one with no
  [a-z0-9] token) scores 0. The official code aggregates with `evaluate`'s BootstrapAggregator
  and reports the bootstrap median of the mean (random, ~= the mean); we report the exact mean.

`score(task, golds, preds)` checks the id sets, pairs golds and preds in sorted id order, and
dispatches on the task. Errors are `MetricsError` (a ValueError) naming the bad value.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from oppu.data.lamp import TASK_IDS, canonical_task

# The scorer's own label lists (in the official order; the index is the class id). Kept here,
# not imported from oppu.tasks, so that what a task module emits is checked against the benchmark.
LAMP_1_LABELS: tuple[str, ...] = ("[1]", "[2]")
LAMP_2N_LABELS: tuple[str, ...] = (
    "travel", "education", "parents", "style & beauty", "entertainment", "food & drink",
    "science & technology", "business", "sports", "healthy living", "women", "politics", "crime",
    "culture & arts", "religion")
LAMP_2M_LABELS: tuple[str, ...] = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story")

# Metric kinds; the names match oppu.tasks.base.Kind. "rating" is accepted as an alias of "regression".
KINDS: tuple[str, ...] = ("classification", "regression", "generation")
_KIND_ALIASES = {"rating": "regression"}
KIND_METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1"),
    "regression": ("MAE", "RMSE"),
    "generation": ("rouge-1", "rouge-L"),
}
TASK_KINDS: dict[str, str] = {
    "LaMP_1": "classification", "LaMP_2N": "classification", "LaMP_2M": "classification",
    "LaMP_3": "regression", "LaMP_4": "generation", "LaMP_5": "generation", "LaMP_7": "generation",
}
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "LaMP_1": LAMP_1_LABELS, "LaMP_2N": LAMP_2N_LABELS, "LaMP_2M": LAMP_2M_LABELS,
}
METRIC_KEYS: dict[str, tuple[str, ...]] = {t: KIND_METRIC_KEYS[k] for t, k in TASK_KINDS.items()}
_LOWER_IS_BETTER = frozenset({"MAE", "RMSE"})
_HIGHER_IS_BETTER = frozenset({"accuracy", "f1", "rouge-1", "rouge-L"})


class MetricsError(ValueError):
    """Golds/preds that cannot be scored: id sets differ, empty, non-string values, bad labels."""


def higher_is_better(metric: str) -> bool:
    """True for accuracy, f1, rouge-1, rouge-L; False for MAE and RMSE."""
    if metric in _LOWER_IS_BETTER:
        return False
    if metric in _HIGHER_IS_BETTER:
        return True
    raise MetricsError(f"unknown metric {metric!r}; valid: "
                       f"{', '.join(sorted(_HIGHER_IS_BETTER | _LOWER_IS_BETTER))}")


def _check_pairs(golds: Sequence[str], preds: Sequence[str]) -> None:
    if len(golds) != len(preds):
        raise MetricsError(f"{len(golds)} golds but {len(preds)} preds; they must pair one to one")
    if len(golds) == 0:
        raise MetricsError("nothing to score: 0 golds")
    for side, values in (("gold", golds), ("pred", preds)):
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise MetricsError(f"{side} #{i} is {type(v).__name__} {v!r}, expected a string")


def _check_labels(labels: Sequence[str]) -> list[str]:
    labels = list(labels)
    if not labels:
        raise MetricsError("classification needs a non-empty label list")
    for lab in labels:
        if not isinstance(lab, str) or lab != lab.strip() or not lab:
            raise MetricsError(f"label {lab!r} must be a non-empty string without surrounding "
                               "whitespace (outputs are stripped before matching)")
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise MetricsError(f"duplicate labels {dup}: each label must name one class")
    return labels


def classification_metrics(golds: Sequence[str], preds: Sequence[str],
                           labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over `labels`, LaMP/sklearn-exact (see the module docstring)."""
    _check_pairs(golds, preds)
    labels = _check_labels(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    g = np.array([index.get(x.strip(), -1) for x in golds], dtype=np.int64)
    p = np.array([index.get(x.strip(), -1) for x in preds], dtype=np.int64)
    n = len(labels)
    accuracy = float(np.mean(g == p))      # -1 == -1 counts, as sklearn's accuracy_score does
    tp = np.bincount(g[(g == p) & (g >= 0)], minlength=n)
    true_sum = np.bincount(g[g >= 0], minlength=n)     # TP + FN per label
    pred_sum = np.bincount(p[p >= 0], minlength=n)     # TP + FP per label
    denom = true_sum + pred_sum
    f1 = np.zeros(n, dtype=np.float64)
    np.divide(2.0 * tp, denom, out=f1, where=denom > 0)  # zero_division -> 0
    return {"accuracy": accuracy, "f1": float(np.mean(f1))}


def _parse_rating_gold(gold: str, where: str) -> float:
    try:
        return float(gold.strip())
    except ValueError:
        raise MetricsError(f"gold {where} is {gold!r}, not a number; LaMP_3 golds are '1'..'5'") from None


def _parse_rating_pred(pred: str, y: float) -> float:
    try:
        return float(pred.strip())
    except ValueError:
        # The official fallback, verbatim: the end of the scale farther from the gold (5.0 on a tie).
        return 1.0 if abs(1 - y) > abs(5 - y) else 5.0


def _rating(golds: Sequence[str], preds: Sequence[str], ids: Sequence[str] | None) -> dict[str, float]:
    _check_pairs(golds, preds)
    ys = [_parse_rating_gold(gd, f"id={ids[i]!r}" if ids else f"#{i}") for i, gd in enumerate(golds)]
    xs = [_parse_rating_pred(pr, y) for pr, y in zip(preds, ys)]
    err = np.array(xs, dtype=np.float64) - np.array(ys, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):   # nan/inf preds keep float semantics
        mae = float(np.mean(np.abs(err)))
        rmse = float(math.sqrt(np.mean(err * err)))
    return {"MAE": mae, "RMSE": rmse}


def rating_metrics(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """MAE and RMSE with the official fallback for unparseable preds (see the module docstring)."""
    return _rating(golds, preds, None)


def generation_metrics(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure (rouge_score, no stemmer, default tokenizer)."""
    _check_pairs(golds, preds)
    from rouge_score import rouge_scorer   # imported here: classification/rating need no nltk

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    r1, rl = [], []
    for gold, pred in zip(golds, preds):
        s = scorer.score(target=gold, prediction=pred)
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    return {"rouge-1": float(np.mean(r1)), "rouge-L": float(np.mean(rl))}


def _resolve(task: str, kind: str | None, labels: Sequence[str] | None) -> tuple[str, tuple[str, ...] | None]:
    """(kind, labels) for a LaMP task id/alias, or for a user task given `kind` (and `labels`)."""
    if kind is not None:
        if not isinstance(kind, str) or _KIND_ALIASES.get(kind, kind) not in KINDS:
            raise MetricsError(f"unknown metric kind {kind!r}; valid: {', '.join(KINDS)} "
                               f"(or {', '.join(_KIND_ALIASES)})")
        kind = _KIND_ALIASES.get(kind, kind)
    try:
        tid = canonical_task(task)
    except ValueError:
        tid = None
    if tid is not None:
        official_kind, official_labels = TASK_KINDS[tid], TASK_LABELS.get(tid)
        if kind is not None and kind != official_kind:
            raise MetricsError(f"{tid} is scored as {official_kind}, not {kind}")
        if labels is not None and tuple(labels) != official_labels:
            raise MetricsError(f"{tid} is scored against its official labels {official_labels}, "
                               f"got {tuple(labels)}")
        return official_kind, official_labels
    if kind is None:
        raise MetricsError(f"unknown task {task!r}: valid LaMP tasks are {', '.join(TASK_IDS)}; "
                           f"for another task pass kind= one of {', '.join(KINDS)}")
    if kind == "classification":
        if labels is None:
            raise MetricsError(f"task {task!r}: kind='classification' needs labels=[...]")
        return kind, tuple(_check_labels(labels))
    if labels is not None:
        raise MetricsError(f"task {task!r}: labels only apply to kind='classification', not {kind!r}")
    return kind, None


def _paired(golds: Mapping[str, str], preds: Mapping[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(ids, golds, preds) in sorted id order; the id sets must be equal and non-empty."""
    if not golds:
        raise MetricsError("nothing to score: 0 gold ids")
    gids, pids = set(golds), set(preds)
    if gids != pids:
        missing, extra = sorted(gids - pids, key=str), sorted(pids - gids, key=str)
        parts = []
        if missing:
            parts.append(f"{len(missing)} gold id(s) missing from preds, e.g. {missing[:5]}")
        if extra:
            parts.append(f"{len(extra)} pred id(s) not in golds, e.g. {extra[:5]}")
        raise MetricsError("golds and preds must have the same ids: " + "; ".join(parts))
    ids = sorted(gids, key=str)
    for name, d in (("gold", golds), ("pred", preds)):
        for i in ids:
            if not isinstance(d[i], str):
                raise MetricsError(f"{name} for id={i!r} is {type(d[i]).__name__} {d[i]!r}, expected a string")
    return ids, [golds[i] for i in ids], [preds[i] for i in ids]


def score(task: str, golds: Mapping[str, str], preds: Mapping[str, str], *,
          kind: str | None = None, labels: Sequence[str] | None = None) -> dict[str, float]:
    """Score preds against golds (both {id: output}) with the official metrics of `task`.

    `task`: a LaMP id or alias ("LaMP_2M", "2m", ...), or any name together with `kind`
    ("classification" + `labels`, "regression"/"rating", "generation") for a user-made task.
    Returns METRIC_KEYS[task] (or KIND_METRIC_KEYS[kind]) -> plain float."""
    kind, labs = _resolve(task, kind, labels)
    ids, g, p = _paired(golds, preds)
    if kind == "classification":
        return classification_metrics(g, p, labs)
    if kind == "regression":
        return _rating(g, p, ids)
    return generation_metrics(g, p)
