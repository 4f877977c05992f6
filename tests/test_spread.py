"""The report's spread: a paired bootstrap over test users, recomputed with LaMP's metrics."""
import pytest

from oppu.spread import user_bootstrap


def _world():
    golds = {f"u{u}-q{q}": ("comedy" if (u + q) % 2 else "drama") for u in range(6) for q in range(2)}
    by_user = {f"u{u}": [f"u{u}-q0", f"u{u}-q1"] for u in range(6)}
    right = dict(golds)
    wrong = {q: ("drama" if g == "comedy" else "comedy") for q, g in golds.items()}
    half = {q: (golds[q] if q.startswith(("u0", "u1", "u2")) else wrong[q]) for q in golds}
    return golds, by_user, right, wrong, half


def test_a_method_always_right_beats_one_always_wrong_on_every_resample():
    golds, by_user, right, wrong, _ = _world()
    s = user_bootstrap("LaMP_2M", golds, {"non_personalized": wrong, "oppu": right}, by_user, n=50)
    assert s["methods"]["oppu"]["accuracy"] == {"lo": 1.0, "hi": 1.0}
    assert s["methods"]["non_personalized"]["f1"] == {"lo": 0.0, "hi": 0.0}
    g = s["gap"]["oppu"]["accuracy"]
    assert g == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "p_better": 1.0}
    assert s["users"] == 6 and s["unit"] == "test user"


def test_a_gap_carried_by_half_the_users_has_an_interval_that_spans_it():
    golds, by_user, right, wrong, half = _world()
    s = user_bootstrap("LaMP_2M", golds, {"non_personalized": wrong, "oppu": half}, by_user, n=400, seed=1)
    g = s["gap"]["oppu"]["accuracy"]
    assert 0.0 <= g["lo"] < 0.5 < g["hi"] <= 1.0
    assert g["mean"] == pytest.approx(0.5, abs=0.05)
    lo, hi = s["methods"]["oppu"]["f1"]["lo"], s["methods"]["oppu"]["f1"]["hi"]
    assert 0.0 <= lo < hi <= 1.0   # macro F1 rescored per resample


def test_generation_and_rating_metrics_and_lower_is_better():
    golds = {"a": "fix the bug", "b": "add a test"}
    s = user_bootstrap("LaMP_4", golds, {"non_personalized": {"a": "x", "b": "y"}, "oppu": golds},
                       {"u1": ["a"], "u2": ["b"]}, n=20)
    assert s["gap"]["oppu"]["rouge-1"]["p_better"] == 1.0
    r = {"a": "5", "b": "1"}
    s = user_bootstrap("LaMP_3", r, {"non_personalized": {"a": "1", "b": "5"}, "oppu": r},
                       {"u1": ["a"], "u2": ["b"]}, n=20)
    assert s["gap"]["oppu"]["MAE"]["mean"] == -4.0 and s["gap"]["oppu"]["MAE"]["p_better"] == 1.0
    assert s["methods"]["oppu"]["RMSE"] == {"lo": 0.0, "hi": 0.0}
    with pytest.raises(ValueError, match="no test user"):
        user_bootstrap("LaMP_3", r, {"oppu": r}, {"u1": []})
