"""oppu.metrics against hand-worked LaMP-exact values (the arithmetic sits next to each number)."""
from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest

from oppu.metrics import (KIND_METRIC_KEYS, LAMP_1_LABELS, LAMP_2M_LABELS, LAMP_2N_LABELS, METRIC_KEYS,
                          MetricsError, classification_metrics, generation_metrics, higher_is_better,
                          rating_metrics, score)


def ids(values):
    return {str(i): v for i, v in enumerate(values)}


# ---------------------------------------------------------------- classification

def test_label_lists_are_the_official_ones():
    assert LAMP_1_LABELS == ("[1]", "[2]")
    assert len(LAMP_2N_LABELS) == 15 and LAMP_2N_LABELS[0] == "travel" and LAMP_2N_LABELS[-1] == "religion"
    assert LAMP_2N_LABELS[3] == "style & beauty" and LAMP_2N_LABELS[6] == "science & technology"
    assert len(LAMP_2M_LABELS) == 15 and LAMP_2M_LABELS[0] == "sci-fi" and LAMP_2M_LABELS[-1] == "true story"
    assert len(set(LAMP_2N_LABELS)) == 15 and len(set(LAMP_2M_LABELS)) == 15


def test_lamp_2m_task_module_emits_the_scorers_labels():
    from oppu.tasks.lamp_2m import LABELS
    assert tuple(LABELS) == LAMP_2M_LABELS


def test_lamp_2m_wrong_case_spaces_empty_and_absent_labels():
    golds = ["comedy", "comedy", "action", "comedy", "action"]
    preds = ["comedy", "Comedy", "action", " comedy ", ""]
    # mapped: golds [2, 2, 3, 2, 3]; preds [2, -1, 3, 2, -1] ("Comedy" wrong case and "" are -1,
    # " comedy " strips to a valid label)
    r = score("LaMP_2M", ids(golds), ids(preds))
    assert r["accuracy"] == pytest.approx(3 / 5)   # ids 0, 2, 3 match
    # comedy: TP=2, gold count 3, pred count 2 -> F1 = 2*2/(3+2) = 4/5
    # action: TP=1, gold count 2, pred count 1 -> F1 = 2*1/(2+1) = 2/3
    # the other 13 tags never occur: F1 = 0 each, still in the mean -> (4/5 + 2/3) / 15 = 22/225
    assert r["f1"] == pytest.approx(22 / 225)
    assert set(r) == {"accuracy", "f1"}
    assert all(type(v) is float for v in r.values())


def test_lamp_2n_multiword_labels_case_sensitive():
    golds = ["food & drink", "food & drink", "crime"]
    preds = ["food & drink", "Food & Drink", "crime\n"]
    # mapped: golds [5, 5, 12]; preds [5, -1, 12] -> accuracy 2/3
    # food & drink: TP=1, gold 2, pred 1 -> 2/3; crime: TP=1, gold 1, pred 1 -> 1; 13 others 0
    # f1 = (2/3 + 1) / 15 = 5/45 = 1/9
    r = score("LaMP_2N", ids(golds), ids(preds))
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(1 / 9)


def test_lamp_1_invalid_gold_and_invalid_pred():
    golds = ["[1]", "[2]", "[3]", "[3]", "[1]"]
    preds = ["[1]", "[1]", "[3]", "[2]", "1"]
    # mapped: golds [0, 1, -1, -1, 0]; preds [0, 0, -1, 1, -1]
    # accuracy: id 0 (0==0) and id 2 (-1 == -1, counted as sklearn's accuracy_score does) -> 2/5
    # [1]: TP=1 (id 0), gold count 2 (ids 0, 4), pred count 2 (ids 0, 1) -> 2*1/(2+2) = 1/2
    # [2]: TP=0, gold count 1 (id 1), pred count 1 (id 3, whose gold is invalid) -> 0
    # f1 = (1/2 + 0) / 2 = 1/4
    r = score("LaMP_1", ids(golds), ids(preds))
    assert r["accuracy"] == pytest.approx(2 / 5)
    assert r["f1"] == pytest.approx(1 / 4)


def test_all_invalid_counts_as_accurate_but_f1_zero():
    # golds and preds both -1: accuracy 1/1 = 1 (-1 == -1); no label occurs -> every F1 0 -> 0
    assert classification_metrics(["x"], ["y"], LAMP_1_LABELS) == {"accuracy": 1.0, "f1": 0.0}


def test_perfect_on_two_of_fifteen_labels():
    golds = preds = ["sci-fi", "true story"]
    # two labels with F1 = 1, thirteen absent with F1 = 0 -> 2/15; accuracy 2/2 = 1
    r = score("LaMP_2M", ids(golds), ids(preds))
    assert r == {"accuracy": 1.0, "f1": pytest.approx(2 / 15)}


def test_classification_custom_labels_validation():
    with pytest.raises(MetricsError, match="duplicate"):
        classification_metrics(["a"], ["a"], ["a", "a"])
    with pytest.raises(MetricsError, match="non-empty label list"):
        classification_metrics(["a"], ["a"], [])
    with pytest.raises(MetricsError, match="whitespace"):
        classification_metrics(["a"], ["a"], [" a"])
    with pytest.raises(MetricsError, match="2 golds but 1 preds"):
        classification_metrics(["a", "b"], ["a"], ["a", "b"])


def test_classification_cross_check_with_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    pool = list(LAMP_2M_LABELS[:10]) + ["Comedy", "", "none", " action "]   # 5 tags never drawn
    golds = [rng.choice(pool) for _ in range(200)]
    preds = [rng.choice(pool) for _ in range(200)]
    index = {lab: i for i, lab in enumerate(LAMP_2M_LABELS)}
    g = [index.get(x.strip(), -1) for x in golds]
    p = [index.get(x.strip(), -1) for x in preds]
    want_f1 = metrics.f1_score(g, p, labels=list(range(15)), average="macro", zero_division=0)
    want_acc = metrics.accuracy_score(g, p)
    r = classification_metrics(golds, preds, LAMP_2M_LABELS)
    assert r["f1"] == pytest.approx(want_f1, rel=1e-12, abs=1e-15)
    assert r["accuracy"] == pytest.approx(want_acc, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- rating (LaMP_3)

def test_rating_unparseable_falls_to_the_farther_end():
    golds = ["1", "2", "3", "4", "5"]
    preds = ["five", "", "five", "", "five"]
    # y=1: |1-1|=0 > |5-1|=4? no -> 5.0, error 4
    # y=2: 1 > 3? no -> 5.0, error 3
    # y=3: 2 > 2? no (tie) -> 5.0, error 2
    # y=4: 3 > 1? yes -> 1.0, error 3
    # y=5: 4 > 0? yes -> 1.0, error 4
    r = score("LaMP_3", ids(golds), ids(preds))
    assert r["MAE"] == pytest.approx((4 + 3 + 2 + 3 + 4) / 5)              # 16/5 = 3.2
    assert r["RMSE"] == pytest.approx(math.sqrt((16 + 9 + 4 + 9 + 16) / 5))  # sqrt(54/5)
    assert set(r) == {"MAE", "RMSE"} and all(type(v) is float for v in r.values())


def test_rating_out_of_range_not_clipped_and_decimals_accepted():
    golds = ["5", "1", " 3 "]
    preds = ["7", "-1", "4.5"]
    # errors: |7-5|=2, |-1-1|=2, |4.5-3|=1.5 -> MAE 5.5/3; RMSE sqrt((4+4+2.25)/3)
    r = rating_metrics(golds, preds)
    assert r["MAE"] == pytest.approx(5.5 / 3)
    assert r["RMSE"] == pytest.approx(math.sqrt(10.25 / 3))


def test_rating_exact_and_python_float_semantics():
    assert rating_metrics(["4"], [" 4\n"]) == {"MAE": 0.0, "RMSE": 0.0}
    assert rating_metrics(["2"], ["1e0"]) == {"MAE": 1.0, "RMSE": 1.0}   # float("1e0") = 1.0
    r = rating_metrics(["2"], ["nan"])                                   # float("nan") parses
    assert math.isnan(r["MAE"]) and math.isnan(r["RMSE"])
    assert rating_metrics(["2"], ["inf"])["MAE"] == math.inf


def test_rating_unparseable_gold_is_an_error_naming_the_id():
    with pytest.raises(MetricsError, match="'q7'"):
        score("LaMP_3", {"q7": "five"}, {"q7": "5"})


# ---------------------------------------------------------------- generation (LaMP_4/5/7)

def test_generation_identical_and_empty():
    assert generation_metrics(["Hello World"], ["Hello World"]) == {"rouge-1": 1.0, "rouge-L": 1.0}
    # tokenizer lowercases and drops punctuation: same tokens [hello, world]
    assert generation_metrics(["Hello, World!"], ["hello world"]) == {"rouge-1": 1.0, "rouge-L": 1.0}
    assert generation_metrics(["a headline"], [""]) == {"rouge-1": 0.0, "rouge-L": 0.0}
    assert generation_metrics([""], [""]) == {"rouge-1": 0.0, "rouge-L": 0.0}
    assert generation_metrics(["a headline"], ["!!!"]) == {"rouge-1": 0.0, "rouge-L": 0.0}


def test_generation_partial_overlap_by_hand():
    # gold tokens [a, quick, brown, fox] (4), pred [fox, brown, quick] (3)
    # ROUGE-1: overlap 3 -> P=3/3, R=3/4 -> F = 2*1*(3/4)/(1+3/4) = 6/7
    # ROUGE-L: LCS of (a quick brown fox, fox brown quick) = 1 -> P=1/3, R=1/4 -> F = 2/7
    r = generation_metrics(["A quick brown fox!"], ["fox brown quick"])
    assert r["rouge-1"] == pytest.approx(6 / 7)
    assert r["rouge-L"] == pytest.approx(2 / 7)


def test_generation_repeated_tokens_and_lcs():
    # gold [the, cat, sat, on, the, mat] (6), pred [the, the, the, mat] (4)
    # ROUGE-1: clipped overlap the: min(2, 3) = 2, mat: 1 -> 3; P=3/4, R=3/6 -> F = 2*(3/4)(1/2)/(5/4) = 3/5
    # ROUGE-L: LCS = "the the mat" = 3 -> same P, R -> 3/5
    r = generation_metrics(["The cat sat on the mat."], ["the the the mat"])
    assert r["rouge-1"] == pytest.approx(3 / 5)
    assert r["rouge-L"] == pytest.approx(3 / 5)


def test_generation_non_ascii_letters_are_dropped():
    # "café" tokenizes to "caf" (é is not in [a-z0-9]): gold [caf, au, lait], pred [cafe, au, lait]
    # overlap 2 -> P = R = 2/3 -> F = 2/3 (LCS "au lait" = 2 too)
    r = generation_metrics(["café au lait"], ["cafe au lait"])
    assert r == {"rouge-1": pytest.approx(2 / 3), "rouge-L": pytest.approx(2 / 3)}


@pytest.mark.parametrize("task", ["LaMP_4", "LaMP_5", "LaMP_7"])
def test_generation_mean_over_ids(task):
    golds = {"b": "A quick brown fox!", "a": "Hello World", "c": "a headline"}
    preds = {"c": "", "a": "hello world", "b": "fox brown quick"}
    # per id rouge-1: a 1, b 6/7, c 0 -> (1 + 6/7 + 0)/3 = 13/21
    # per id rouge-L: a 1, b 2/7, c 0 -> (1 + 2/7 + 0)/3 = 3/7
    r = score(task, golds, preds)
    assert r["rouge-1"] == pytest.approx(13 / 21)
    assert r["rouge-L"] == pytest.approx(3 / 7)
    assert set(r) == set(METRIC_KEYS[task])


# ---------------------------------------------------------------- score()

def test_score_mismatched_ids_raise_naming_them():
    with pytest.raises(MetricsError, match=r"1 gold id\(s\) missing.*'q2'.*1 pred id\(s\) not in golds.*'q9'"):
        score("LaMP_2M", {"q1": "comedy", "q2": "action"}, {"q1": "comedy", "q9": "action"})
    with pytest.raises(MetricsError, match="'q2'"):
        score("LaMP_4", {"q1": "x", "q2": "y"}, {"q1": "x"})


def test_score_empty_and_non_string():
    with pytest.raises(MetricsError, match="0 gold ids"):
        score("LaMP_1", {}, {})
    with pytest.raises(MetricsError, match="id='q1'"):
        score("LaMP_3", {"q1": "3"}, {"q1": None})


def test_score_id_order_irrelevant():
    golds = {"q3": "comedy", "q1": "action", "q2": "sci-fi"}
    preds_a = {"q1": "action", "q2": "comedy", "q3": "comedy"}
    preds_b = {"q3": "comedy", "q2": "comedy", "q1": "action"}
    assert score("LaMP_2M", golds, preds_a) == score("LaMP_2M", dict(reversed(golds.items())), preds_b)


def test_score_task_aliases_and_dispatch():
    assert score("lamp_2m", {"1": "comedy"}, {"1": "comedy"}) == {"accuracy": 1.0, "f1": pytest.approx(1 / 15)}
    assert score("3", {"1": "4"}, {"1": "2"}) == {"MAE": 2.0, "RMSE": 2.0}
    # LaMP tasks keep their official kind and labels
    assert score("LaMP_1", {"1": "[1]"}, {"1": "[1]"}, kind="classification", labels=["[1]", "[2]"])["f1"] == 0.5
    with pytest.raises(MetricsError, match="classification, not generation"):
        score("LaMP_1", {"1": "[1]"}, {"1": "[1]"}, kind="generation")
    with pytest.raises(MetricsError, match="official labels"):
        score("LaMP_1", {"1": "[1]"}, {"1": "[1]"}, labels=["[1]"])


def test_score_user_task_with_kind():
    with pytest.raises(MetricsError, match="unknown task 'my_task'.*LaMP_2M.*classification"):
        score("my_task", {"1": "x"}, {"1": "x"})
    with pytest.raises(MetricsError, match="unknown metric kind 'bogus'"):
        score("my_task", {"1": "x"}, {"1": "x"}, kind="bogus")
    with pytest.raises(MetricsError, match="needs labels"):
        score("my_task", {"1": "x"}, {"1": "x"}, kind="classification")
    # labels (yes, no): golds [0, 1], preds [0, 0] -> acc 1/2; yes: 2*1/(1+2) = 2/3, no: 0 -> 1/3
    r = score("my_task", {"1": "yes", "2": "no"}, {"1": "yes", "2": "yes"}, kind="classification",
              labels=("yes", "no"))
    assert r == {"accuracy": 0.5, "f1": pytest.approx(1 / 3)}
    assert score("stars", {"1": "4"}, {"1": "x"}, kind="rating") == {"MAE": 3.0, "RMSE": 3.0}  # 4 -> 1.0
    assert score("stars", {"1": "4"}, {"1": "x"}, kind="regression") == {"MAE": 3.0, "RMSE": 3.0}
    assert score("gen", {"1": "a b"}, {"1": "a b"}, kind="generation") == {"rouge-1": 1.0, "rouge-L": 1.0}


def test_metric_keys_and_direction():
    assert METRIC_KEYS == {"LaMP_1": ("accuracy", "f1"), "LaMP_2N": ("accuracy", "f1"),
                           "LaMP_2M": ("accuracy", "f1"), "LaMP_3": ("MAE", "RMSE"),
                           "LaMP_4": ("rouge-1", "rouge-L"), "LaMP_5": ("rouge-1", "rouge-L"),
                           "LaMP_7": ("rouge-1", "rouge-L")}
    assert set(KIND_METRIC_KEYS) == {"classification", "regression", "generation"}
    assert [higher_is_better(m) for m in ("accuracy", "f1", "rouge-1", "rouge-L", "MAE", "RMSE")] == \
        [True, True, True, True, False, False]
    with pytest.raises(MetricsError, match="unknown metric 'mae'"):
        higher_is_better("mae")


def test_scorer_imports_neither_sklearn_nor_task_modules():
    code = ("import sys, oppu.metrics; bad = [m for m in sys.modules "
            "if m.startswith(('sklearn', 'oppu.tasks', 'evaluate'))]; print(bad); assert not bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
