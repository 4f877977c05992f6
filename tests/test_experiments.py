"""`oppu experiment`: every experiment in a micro configuration, checked for structure and for
its numbers against the run's own prediction files."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oppu.cli import app
from oppu.data.lamp import read_outputs
from oppu.data.users import User, Query
from oppu.experiments import NAMES, ExpOptions, run_experiment
from oppu.metrics import score

pytestmark = pytest.mark.usefixtures("one_thread")
MICRO = dict(task="LaMP_2M", synth=True, base="tiny:micro", seeds=2, test_users=6, other_users=12, base_epochs=1,
             overrides={"user_train.epochs": 1})
LEVELS = {"cold-start": (1, 3), "k": (0, 1, 3)}
LABELS: list[tuple[str, str, str]] = []  # (file, xlabel, ylabel) of every saved figure


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import matplotlib.figure
    root = tmp_path_factory.mktemp("exp")
    save = matplotlib.figure.Figure.savefig

    def spy(fig, path, *a, **kw):
        for ax in fig.axes:
            LABELS.append((Path(path).name, ax.get_xlabel(), ax.get_ylabel()))
        return save(fig, path, *a, **kw)

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPPU_CACHE", str(root / "cache"))
        mp.setattr(matplotlib.figure.Figure, "savefig", spy)
        for name in NAMES:
            opts = ExpOptions(name, out=str(root / name), levels=LEVELS.get(name, ()), **MICRO)
            out[name] = (run_experiment(opts), root / name)
    return out


def test_every_experiment_writes_results_report_and_labelled_plots(results):
    for name, (res, out) in results.items():
        assert res["experiment"] == name
        saved = json.loads((out / "results.json").read_text())
        assert saved["command"] == res["command"] and saved["command"].startswith(f"oppu experiment {name} ")
        report = (out / "report.md").read_text()
        assert res["command"] in report and "## Findings" in report and "## Against the paper" in report
        assert res["findings"] and res["claims"]
        for c in res["claims"]:  # the report states each claim with the verdict results.json records
            verdict = {True: "holds here", False: "does not hold here", None: "not testable here"}[c["holds"]]
            assert f"- **{verdict}**: {c['claim']} ({c['evidence']})" in report
        for p in res["plots"]:
            assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({p})" in report
        assert res["seeds"] == [0, 1]
        assert not (out / ".work").exists()  # trained adapters are removed unless --keep-adapters
    assert LABELS and all(x and y for _, x, y in LABELS), LABELS


def test_every_number_is_recomputed_from_the_prediction_files(results):
    for name, (res, out) in results.items():
        assert res["rows"], name
        for r in res["rows"]:
            task, preds, _ = read_outputs(out / r["predictions"])
            gtask, golds, _ = read_outputs(out / r["golds"])
            assert task == gtask == r["task"]
            assert len(preds) == r["n_questions"] and set(preds) <= set(golds)
            again = score(task, {q: golds[q] for q in preds}, preds)
            assert again == pytest.approx(r["metrics"], abs=1e-12), (name, r)


def test_golds_are_the_datasets_own(results):
    for name, (res, out) in results.items():
        for g in {r["golds"] for r in res["rows"]}:
            _, golds, _ = read_outputs(out / g)
            world = Path(g).stem.split("-", 1)[1]
            _, data, _ = read_outputs(out / "data" / "LaMP_2M" / world / "dev_outputs.json")
            assert golds == {q: data[q] for q in golds}, (name, g)


def test_aggregates_are_mean_and_sd_of_the_rows(results):
    for name, (res, _) in results.items():
        for a in res["aggregates"]:
            rows = [r for r in res["rows"] if (r["task"], r["world"], r["condition"], r["method"]) ==
                    (a["task"], a["world"], a["condition"], a["method"])]
            assert len(rows) == a["n_seeds"] == (2 if a["method"].startswith("oppu") or a["method"] == "auto" else 1)
            for k, v in a["mean"].items():
                vals = [r["metrics"][k] for r in rows]
                assert v == pytest.approx(statistics.fmean(vals))
                assert a["std"][k] == pytest.approx(statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _mean(res, method, **cond):
    (a,) = [a for a in res["aggregates"] if a["method"] == method
            and all(a["condition"].get(k) == v for k, v in cond.items())]
    return a["mean"]["accuracy"]


def test_summaries_match_the_aggregates(results):
    res = results["methods"][0]
    s = res["summary"]["LaMP_2M"]
    for m, v in s["mean"].items():
        assert v == _mean(res, m, task="LaMP_2M")
    assert s["gains"]["oppu vs non_personalized"] == round(s["mean"]["oppu"] - s["mean"]["non_personalized"], 4)

    res = results["activity"][0]
    users = 0
    for lbl, v in res["summary"].items():
        users += v["users"]
        for m, g in v["gain"].items():
            assert g == round(_mean(res, m, bucket=lbl) - _mean(res, "non_personalized", bucket=lbl), 4)
    assert users == MICRO["test_users"]

    res = results["k"][0]
    for k in LEVELS["k"]:
        v = res["summary"][str(k)]
        assert v["gap"] == round(_mean(res, "oppu_rag", k=k) - _mean(res, "rag", k=k), 4)

    res = results["peft-types"][0]
    assert set(res["summary"]) == {"lora", "prompt_tuning", "ia3"}
    sz = {p: v["params_per_user"] for p, v in res["summary"].items()}
    assert sz["prompt_tuning"] == 8 * 64          # 8 virtual tokens x hidden 64 (micro)
    assert sz["lora"] > sz["ia3"] > 0
    assert all(v["bytes_per_user"] > v["params_per_user"] * 4 for v in res["summary"].values())  # fp32 + header


def test_shift_levels_follow_the_synthetic_knob(results):
    res, out = results["shift"]
    assert list(res["summary"]["levels"]) == ["0.00", "0.33", "0.67", "1.00"]
    for lvl, frac in (("0.00", 0.0), ("1.00", 1.0)):
        card = json.loads((out / "data" / "LaMP_2M" / f"shift-{lvl}" / "world.json").read_text())
        assert card["params"]["shift"] == frac
        assert len(card["shifted_query_ids"]) == round(frac * 3) * MICRO["test_users"]


def test_auto_answers_each_user_from_one_arm(results):
    """Every auto prediction is that user's rag, instant_rag or oppu_rag prediction at the same level
    (and seed), the arm their history size and their fold's thresholds pick."""
    res, out = results["cold-start"]
    rows = {(r["method"], r["condition"]["items"], r["seed"]): r for r in res["rows"]}
    for (m, items, seed), r in rows.items():
        if m != "auto":
            continue
        _, auto, _ = read_outputs(out / r["predictions"])
        arms = {a: read_outputs(out / rows[(a, items, seed if a == "oppu_rag" else None)]["predictions"])[1]
                for a in ("rag", "instant_rag", "oppu_rag")}
        by_user: dict[str, set] = {}
        for q, p in auto.items():
            ok = {a for a, src in arms.items() if src[q] == p}
            user = q.rsplit("-q", 1)[0]
            by_user[user] = by_user.get(user, ok) & ok
        assert all(by_user.values()), by_user  # one arm explains all of a user's answers
    th = res["facts"]["auto_thresholds"]
    assert set(th) == {"0", "1"} and all(len(pair) == 2 for folds in th.values() for pair in folds)
    assert set(res["summary"]["auto_vs"]) == {"rag", "instant_rag", "oppu_rag"}
    assert res["facts"]["instant_bank"]["users"] > 0


def test_history_formats_build_label_free_and_inverted_examples():
    from oppu.experiments.history_format import format_examples
    from oppu.tasks import get_task
    task = get_task("LaMP_2M")
    u = User("u1", [{"id": "a", "description": "a quiet film about space", "tag": "sci-fi"},
                    {"id": "b", "description": "", "tag": "comedy"}], [])
    (nl,) = format_examples(task, u, "no_label")
    assert (nl.prompt, nl.target) == ("description:", " a quiet film about space")
    assert "sci-fi" not in nl.prompt + nl.target
    (of,) = format_examples(task, u, "other_format")
    assert (of.prompt, of.target) == ("tag: sci-fi\ndescription:", " a quiet film about space")
    assert not of.prompt.endswith(task.cue)
    with pytest.raises(ValueError, match="'nope'"):
        format_examples(task, u, "nope")


def test_cold_start_truncation_and_policy():
    from oppu.experiments.cold_start import auto_choice, truncate
    items = {f"i{n}": {"id": f"i{n}"} for n in range(5)}
    u = User("u", [items[f"i{n}"] for n in range(4)], [Query("q", "x", "y", tuple(f"i{n}" for n in range(5)))],
             items)
    t = truncate(u, 2)
    assert [it["id"] for it in t.history] == ["i2", "i3"] and t.queries[0].visible == ("i3", "i4")
    assert truncate(u, 10).history == u.history
    assert [auto_choice(n, (2, 4)) for n in (1, 2, 3, 4, 9)] == ["rag", "instant_rag", "instant_rag", "oppu_rag",
                                                                  "oppu_rag"]
    assert auto_choice(3, (3, 3)) == "oppu_rag" and auto_choice(50, (math.inf, math.inf)) == "rag"
    assert auto_choice(50, (1, math.inf)) == "instant_rag"


def test_activity_buckets_keep_equal_lengths_together():
    from oppu.experiments.activity import buckets
    users = [User(f"u{i}", [{}] * n, []) for i, n in enumerate([1, 2, 2, 2, 5, 9])]
    got = [[len(u.history) for u in b] for b in buckets(users, 3)]
    assert got == [[1, 2, 2, 2], [5, 9]]
    assert sum(map(len, buckets(users, 1))) == 6


def test_shift_novelty_is_the_share_of_unseen_query_words():
    from oppu.experiments.shift import novelty
    from oppu.tasks import get_task
    task = get_task("LaMP_2M")
    items = {"a": {"id": "a", "description": "space film", "tag": "sci-fi"}}
    q = task.instruction.format(description="space war drama")  # the official input shape
    u = User("u", list(items.values()), [Query("q", q, "sci-fi", ("a",))], items)
    assert novelty(task, u, u.queries[0]) == pytest.approx(2 / 3)


def test_bad_options_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="exactly one of --data DIR"):
        ExpOptions("k")
    with pytest.raises(ValueError, match="exactly one of --data DIR"):
        ExpOptions("k", data="x", synth=True)
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        run_experiment(ExpOptions("nope", synth=True, out=str(tmp_path)))
    with pytest.raises(ValueError, match="--all-tasks is for the methods experiment"):
        run_experiment(ExpOptions("k", synth=True, all_tasks=True, out=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="LaMP_1"):
        run_experiment(ExpOptions("methods", data=str(tmp_path), all_tasks=True, out=str(tmp_path / "o")))
    r = CliRunner().invoke(app, ["experiment", "k", "--synth", "--levels", "1,x", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--levels '1,x'" in r.output
    r = CliRunner().invoke(app, ["experiment", "k", "--synth", "--executor", "fast", "--base", "tiny:micro",
                                 "--out", str(tmp_path / "e")])
    assert r.exit_code != 0 and "unknown executor 'fast'" in r.output and "batched" in r.output


def test_the_recorded_command_reproduces_the_numbers(tmp_path, monkeypatch):
    """Run through the CLI, then run the command written in results.json: same numbers."""
    monkeypatch.setenv("OPPU_CACHE", str(tmp_path / "cache"))
    args = ["experiment", "k", "--synth", "--out", str(tmp_path / "a"), "--base", "tiny:micro", "--seeds", "1",
            "--test-users", "3", "--other-users", "8", "--base-epochs", "1", "--user-epochs", "1", "--levels", "0,2",
            "--executor", "batched"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    cmd = first["command"].split()
    assert cmd[:2] == ["oppu", "experiment"] and "--executor" not in cmd  # batched is the default: not repeated
    cmd[cmd.index("--out") + 1] = str(tmp_path / "b")
    r = CliRunner().invoke(app, cmd[1:])
    assert r.exit_code == 0, r.output
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [x["metrics"] for x in second["rows"]] == [x["metrics"] for x in first["rows"]]
    assert "paper:" in r.output and "results.json" in r.output


def test_data_dir_paths_world_groups_and_novelty(tmp_path, monkeypatch):
    """--data: shift groups by world.json's shifted ids when present, by query novelty otherwise;
    activity spreads test users over history lengths."""
    from oppu.data.synth import synth_world
    monkeypatch.setenv("OPPU_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "w"
    synth_world("LaMP_2M", d, seed=3, test_users=6, other_users=10, shift=2 / 3)
    kw = dict(MICRO, synth=False, data=str(d), seeds=1)
    res = run_experiment(ExpOptions("shift", out=str(tmp_path / "s1"), **kw))
    assert res["summary"]["mode"] == "world.json shifted_query_ids"
    assert [res["summary"]["levels"][k]["questions"] for k in ("unshifted", "shifted")] == [6, 12]
    (d / "world.json").unlink()
    res = run_experiment(ExpOptions("shift", out=str(tmp_path / "s2"), buckets=2, **kw))
    assert res["summary"]["mode"] == "query novelty"
    assert sum(v["questions"] for v in res["summary"]["levels"].values()) == 18
    res = run_experiment(ExpOptions("activity", out=str(tmp_path / "a"), buckets=2, **{**kw, "test_users": 4}))
    assert sum(v["users"] for v in res["summary"].values()) == 4


def test_all_tasks_gives_the_seven_task_table(tmp_path, monkeypatch):
    monkeypatch.setenv("OPPU_CACHE", str(tmp_path / "cache"))
    opts = ExpOptions("methods", synth=True, all_tasks=True, out=str(tmp_path / "all"), base="tiny:micro", seeds=1,
                      test_users=2, other_users=3, base_epochs=0, overrides={"user_train.epochs": 1})
    res = run_experiment(opts)
    from oppu.data.lamp import TASK_IDS
    assert list(res["summary"]) == list(TASK_IDS)
    assert {r["task"] for r in res["rows"]} == set(TASK_IDS) and len(res["rows"]) == 7 * 6
    table = (tmp_path / "all" / "report.md").read_text()
    assert all(f"| {t} |" in table for t in TASK_IDS)
    assert res["summary"]["LaMP_3"]["metric"] == "MAE"
