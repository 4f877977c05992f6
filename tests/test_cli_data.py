"""`oppu score` and `oppu data inspect` through the Typer app, on the LaMP-shaped fixtures.

Errors go to stderr through a rich Console that wraps at the terminal width (80 columns under
CliRunner), so error text is compared with all whitespace removed."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oppu.cli import app

FIX = Path(__file__).parent / "fixtures"
L2M = FIX / "lamp_user_based" / "LaMP_2M"
L3 = FIX / "lamp_time_based" / "LaMP_3"
L4 = FIX / "lamp_time_based" / "LaMP_4"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(s: str) -> str:
    return "".join(s.split())


def assert_fails_with(result, *parts: str):
    assert result.exit_code != 0, result.output
    assert result.stdout == ""                         # nothing that could be mistaken for a score
    err = flat(result.stderr)
    assert "error:" in err
    for p in parts:
        assert flat(p) in err, f"{p!r} not in {result.stderr!r}"


def outputs(path: Path, task: str, pairs) -> Path:
    path.write_text(json.dumps({"task": task, "golds": [{"id": k, "output": v} for k, v in pairs]}))
    return path


def score_json(result) -> dict:
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1                             # exactly one JSON object on stdout
    return json.loads(lines[0])


# ------------------------------------------------------------------ oppu score

def test_score_lamp_2m_by_hand(tmp_path):
    g = outputs(tmp_path / "golds.json", "LaMP_2M", [("1", "comedy"), ("2", "action"), ("3", "sci-fi"),
                                                    ("4", "comedy")])
    p = outputs(tmp_path / "preds.json", "LaMP_2M", [("4", "Comedy"), ("3", "sci-fi"), ("2", " comedy "),
                                                    ("1", "comedy")])
    res = score_json(invoke("score", "--task", "LaMP_2M", "--golds", g, "--preds", p))
    # id 1 comedy/comedy ok; 2 action/comedy (stripped) wrong; 3 sci-fi ok; 4 comedy/"Comedy" -> invalid (-1) wrong
    # accuracy = 2/4. F1 per label: comedy TP=1, golds 2, preds 2 -> 2*1/(2+2) = 0.5; sci-fi 2*1/(1+1) = 1;
    # action TP=0 -> 0; the other 12 labels never occur -> 0. Macro over 15 labels: 1.5/15 = 0.1
    assert set(res) == {"accuracy", "f1"}
    assert res["accuracy"] == pytest.approx(0.5, abs=1e-12)
    assert res["f1"] == pytest.approx(0.1, abs=1e-12)


def test_score_fixture_golds_against_themselves_and_alias(tmp_path):
    res = score_json(invoke("score", "--task", "2m", "--golds", L2M / "dev_outputs.json",
                            "--preds", L2M / "dev_outputs.json"))
    # golds: fantasy x2, true story, comedy, sci-fi, classic -> 5 distinct labels, each F1 = 1; 5/15
    assert res == {"accuracy": 1.0, "f1": pytest.approx(5 / 15, abs=1e-12)}


def test_score_mismatched_ids(tmp_path):
    g = outputs(tmp_path / "golds.json", "LaMP_2M", [("1", "comedy"), ("2", "action"), ("q-missing", "sci-fi")])
    p = outputs(tmp_path / "preds.json", "LaMP_2M", [("1", "comedy"), ("2", "action"), ("q-extra", "sci-fi")])
    r = invoke("score", "--task", "LaMP_2M", "--golds", g, "--preds", p)
    assert_fails_with(r, "same ids", "missing from preds", "'q-missing'", "'q-extra'")


@pytest.mark.parametrize("content, parts", [
    ('{"task": "LaMP_2M", "golds": [{"id": "1", "output": "comedy"},]}', ["invalid JSON", "line 1 column"]),
    ("", ["file is empty"]),
    ('{"task": "LaMP_2M", "preds": []}', ["missing field 'golds'"]),
    ('{"task": "LaMP_2M", "golds": [{"id": "1"}]}', ["golds #0", "missing field 'output'"]),
])
def test_score_malformed_preds_names_the_file(tmp_path, content, parts):
    g = outputs(tmp_path / "golds.json", "LaMP_2M", [("1", "comedy")])
    p = tmp_path / "my_bad_preds.json"
    p.write_text(content)
    r = invoke("score", "--task", "LaMP_2M", "--golds", g, "--preds", p)
    assert_fails_with(r, "my_bad_preds.json", *parts)


def test_score_missing_preds_file(tmp_path):
    r = invoke("score", "--task", "LaMP_2M", "--golds", L2M / "dev_outputs.json", "--preds", tmp_path / "nope.json")
    assert_fails_with(r, "nope.json", "file not found")


def test_score_unknown_task():
    r = invoke("score", "--task", "LaMP_9", "--golds", L2M / "dev_outputs.json", "--preds", L2M / "dev_outputs.json")
    assert_fails_with(r, "unknown LaMP task 'LaMP_9'", "LaMP_1", "LaMP_7")


def test_score_lamp_3_by_hand(tmp_path):
    # fixture golds: 30011:4 30021:2 30012:5 30041:4 30031:5 30013:3 30022:1 30042:4
    p = outputs(tmp_path / "preds.json", "LaMP_3", [
        ("30011", "4"),       # |4-4| = 0
        ("30021", "five"),    # unparseable, gold 2: 5 is farther than 1 -> 5, error 3
        ("30012", "4"),       # 1
        ("30041", "4"),       # 0
        ("30031", " 5 "),     # 0 (stripped)
        ("30013", "3.5"),     # 0.5
        ("30022", "1"),       # 0
        ("30042", "2"),       # 2
    ])
    res = score_json(invoke("score", "--task", "LaMP_3", "--golds", L3 / "dev_outputs.json", "--preds", p))
    assert set(res) == {"MAE", "RMSE"}
    assert res["MAE"] == pytest.approx((3 + 1 + 0.5 + 2) / 8, abs=1e-12)                      # 0.8125
    assert res["RMSE"] == pytest.approx(math.sqrt((9 + 1 + 0.25 + 4) / 8), abs=1e-12)        # 1.3346...


def test_score_lamp_3_perfect():
    res = score_json(invoke("score", "--task", "3", "--golds", L3 / "train_outputs.json",
                            "--preds", L3 / "train_outputs.json"))
    assert res == {"MAE": 0.0, "RMSE": 0.0}


def test_score_lamp_4_identical_preds_give_rouge_one(tmp_path):
    task = json.loads((L4 / "dev_outputs.json").read_text())
    p = outputs(tmp_path / "preds.json", "LaMP_4", [(g["id"], g["output"]) for g in reversed(task["golds"])])
    res = score_json(invoke("score", "--task", "LaMP_4", "--golds", L4 / "dev_outputs.json", "--preds", p))
    assert res == {"rouge-1": pytest.approx(1.0), "rouge-L": pytest.approx(1.0)}


def test_score_lamp_4_by_hand(tmp_path):
    # gold "Overnight Rain Floods Main Square" (5 tokens) vs pred "rain floods square" (3 tokens, all in
    # the gold and in order): P = 3/3, R = 3/5, F = 2PR/(P+R) = 0.75 for both ROUGE-1 and ROUGE-L.
    # The other two ids are exact (1.0). Mean = (0.75 + 1 + 1) / 3.
    p = outputs(tmp_path / "preds.json", "LaMP_4", [("40011", "rain floods square"),
                                                   ("40012", "Mayor Unveils East Side Park"),
                                                   ("40021", "New Frog Species Found in Valley")])
    res = score_json(invoke("score", "--task", "LaMP_4", "--golds", L4 / "dev_outputs.json", "--preds", p))
    assert res["rouge-1"] == pytest.approx(2.75 / 3, abs=1e-12)
    assert res["rouge-L"] == pytest.approx(2.75 / 3, abs=1e-12)


# ------------------------------------------------------------------ oppu data inspect

def inspect_json(*args) -> dict:
    r = invoke("data", "inspect", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_inspect_lamp_3_fixture():
    rep = inspect_json(L3)
    assert rep == {
        "task": "LaMP_3",
        "skipped_records": 0,
        "splits": {
            # dev users 3001 (3 questions, history = intersection of 3 items), 3002 (2 q, 4 items),
            # 3004 (2 q, 6 items), 3003 (1 q, 2 items)
            "dev": {"users": 4, "questions": 8,
                    "history": {"min": 2, "median": 3.5, "max": 6, "total_items": 15},
                    "golds": 8, "label_distribution": {"4": 3, "5": 2, "3": 1, "2": 1, "1": 1}},
            # train users 3002 (1 q, 2 items), 3005 (2 q, intersection 3 items), 3006 (1 q, 5 items)
            "train": {"users": 3, "questions": 4,
                      "history": {"min": 2, "median": 3, "max": 5, "total_items": 10},
                      "golds": 4, "label_distribution": {"5": 2, "3": 1, "4": 1}},
        },
    }


def test_inspect_lamp_2m_and_lamp_4():
    rep = inspect_json(L2M)
    dev = rep["splits"]["dev"]
    assert rep["task"] == "LaMP_2M" and dev["users"] == dev["questions"] == dev["golds"] == 6
    assert dev["history"] == {"min": 2, "median": 5, "max": 9, "total_items": 31}
    assert dev["label_distribution"] == {"fantasy": 2, "true story": 1, "comedy": 1, "sci-fi": 1, "classic": 1}
    rep4 = inspect_json(L4, "--task", "lamp_4")
    assert rep4["task"] == "LaMP_4"
    assert rep4["splits"]["dev"]["users"] == 2 and rep4["splits"]["dev"]["questions"] == 3
    # "Overnight Rain Floods Main Square" 5, "Mayor Unveils East Side Park" 5, "New Frog Species Found in Valley" 6
    assert rep4["splits"]["dev"]["gold_words_mean"] == pytest.approx(round(16 / 3, 2))
    assert "label_distribution" not in rep4["splits"]["dev"]


def dir_with_bad_test_split(tmp_path: Path) -> Path:
    """The LaMP_3 fixture plus test_questions.json (no outputs, as in the real release) with ONE bad record."""
    root = tmp_path / "LaMP_3"
    shutil.copytree(L3, root)
    recs = json.loads((L3 / "dev_questions.json").read_text())[:3]
    for r in recs:
        r["id"] = "t" + r["id"]
    del recs[1]["profile"][2]["score"]
    (root / "test_questions.json").write_text(json.dumps(recs))
    return root


def test_inspect_lenient_counts_the_one_bad_record(tmp_path):
    root = dir_with_bad_test_split(tmp_path)
    rep = inspect_json(root, "--lenient")
    assert rep["skipped_records"] == 1
    assert rep["splits"]["test"]["questions"] == 2 and rep["splits"]["test"]["golds"] == 0
    assert rep["splits"]["dev"] == inspect_json(L3)["splits"]["dev"]


def test_inspect_strict_on_the_same_dir_fails_naming_the_file(tmp_path):
    root = dir_with_bad_test_split(tmp_path)
    r = invoke("data", "inspect", root)
    assert_fails_with(r, "test_questions.json", "question #1", "(id='t30021')", "missing field 'score'")
    r = invoke("data", "inspect", root, "--strict")
    assert r.exit_code != 0


def test_inspect_lenient_bad_question_with_a_gold_counts_question_and_gold(tmp_path):
    root = tmp_path / "LaMP_3"
    shutil.copytree(L3, root)
    recs = json.loads((root / "dev_questions.json").read_text())
    recs[0]["profile"] = "not a list"
    (root / "dev_questions.json").write_text(json.dumps(recs))
    rep = inspect_json(root, "--lenient")
    # the bad question record and its gold record (which then matches no question) are both skipped
    assert rep["skipped_records"] == 2
    assert rep["splits"]["dev"]["questions"] == rep["splits"]["dev"]["golds"] == 7
    assert rep["splits"]["dev"]["label_distribution"]["4"] == 2
    assert_fails_with(invoke("data", "inspect", root), "dev_questions.json", "question #0", "'profile'")


def test_inspect_errors(tmp_path):
    assert_fails_with(invoke("data", "inspect", tmp_path / "missing"), "not found")
    assert_fails_with(invoke("data", "inspect", L3, "--task", "LaMP_4"), "dev_outputs.json", "'LaMP_4'")
    assert_fails_with(invoke("data", "inspect", L3, "--task", "LaMP_6"), "unknown LaMP task", "LaMP_2M")


def test_score_rejects_golds_of_another_task(tmp_path):
    from typer.testing import CliRunner
    from oppu.cli import app
    from oppu.data.lamp import write_outputs
    g, p = tmp_path / "g.json", tmp_path / "p.json"
    write_outputs(g, "LaMP_3", {"a": "4"})
    write_outputs(p, "LaMP_3", {"a": "4"})
    r = CliRunner().invoke(app, ["score", "--task", "LaMP_2M", "--golds", str(g), "--preds", str(p)])
    assert r.exit_code != 0
    assert "LaMP_3" in r.stderr and "LaMP_2M" in r.stderr


def test_outputs_files_are_world_readable(tmp_path):
    import os
    import stat
    from oppu.data.lamp import write_outputs
    old = os.umask(0o022)
    try:
        write_outputs(tmp_path / "o.json", "LaMP_4", {"a": "x"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o.json").stat().st_mode) == 0o644


def test_error_text_with_brackets_is_printed_verbatim(tmp_path):
    from typer.testing import CliRunner
    from oppu.cli import app
    bad = tmp_path / "[bold]x.json"
    bad.write_text("{")
    r = CliRunner().invoke(app, ["score", "--task", "LaMP_4", "--golds", str(bad), "--preds", str(bad)])
    assert r.exit_code != 0
    assert "[bold]x.json" in "".join(r.stderr.split())


def test_demo_runs_end_to_end_at_micro_size(tmp_path, monkeypatch):
    """`oppu demo` itself (README's first command) at a micro size: world, base, six methods."""
    import json
    from typer.testing import CliRunner
    from oppu.cli import app
    monkeypatch.setenv("OPPU_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--tasks", "LaMP_3,LaMP_7",
                                 "--base", "tiny:micro", "--test-users", "2", "--other-users", "6",
                                 "--base-epochs", "1"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary) == {"LaMP_3", "LaMP_7"}
    assert set(summary["LaMP_3"]["metrics"]) == {"non_personalized", "rag", "pag", "oppu", "oppu_rag", "oppu_pag"}
    assert set(summary["LaMP_3"]["metrics"]["oppu"]) == {"MAE", "RMSE"}
    assert (tmp_path / "demo" / "LaMP_7" / "report.md").exists()
