"""oppu.data.lamp and oppu.data.users against small fixtures in the exact published LaMP shape.

Fixtures (tests/fixtures/):
  lamp_user_based/LaMP_2M   no user_id: each question is its own user; some items lack "date"
  lamp_time_based/LaMP_3    user_id, several questions per user; user 3001's later questions see
                            extra items (an earlier question + its gold), i.e. the intersection rule
  lamp_time_based/LaMP_4    user_id; user 4001 also appears in train
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from oppu.data.lamp import (ITEM_FIELDS, TASK_IDS, LampFormatError, Question, canonical_task, read_outputs,
                            read_questions, write_outputs, write_questions)
from oppu.data.users import User, group_users, load_lamp_dir, select_test_users
from oppu.tasks import lamp_2m, lamp_3, lamp_4

FIX = Path(__file__).parent / "fixtures"
L2M = FIX / "lamp_user_based" / "LaMP_2M"
L3 = FIX / "lamp_time_based" / "LaMP_3"
L4 = FIX / "lamp_time_based" / "LaMP_4"
DIRS = {"LaMP_2M": L2M, "LaMP_3": L3, "LaMP_4": L4}


def ids(xs):
    return [x["id"] if isinstance(x, dict) else x.id for x in xs]


def users_by_id(users: list[User]) -> dict[str, User]:
    return {u.user_id: u for u in users}


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ fixtures are in the official shape

@pytest.mark.parametrize("task", sorted(DIRS))
def test_fixture_files_are_small_and_in_the_official_shape(task):
    root = DIRS[task]
    for split in ("train", "dev"):
        qf, of = root / f"{split}_questions.json", root / f"{split}_outputs.json"
        assert qf.stat().st_size < 8192 and of.stat().st_size < 8192
        raw_q, raw_o = json.loads(qf.read_text()), json.loads(of.read_text())
        assert isinstance(raw_q, list) and raw_q
        for rec in raw_q:
            assert set(rec) == ({"id", "input", "profile"} | ({"user_id"} if task != "LaMP_2M" else set()))
            assert all(isinstance(rec[k], str) for k in rec if k != "profile")
            for it in rec["profile"]:
                assert set(ITEM_FIELDS[task]) | {"id"} <= set(it) <= set(ITEM_FIELDS[task]) | {"id", "date"}
                assert all(isinstance(v, str) for v in it.values())     # LaMP_3 scores are strings: "4"
        assert set(raw_o) == {"task", "golds"} and raw_o["task"] == task
        assert all(set(g) == {"id", "output"} for g in raw_o["golds"])
        assert [g["id"] for g in raw_o["golds"]] == [q["id"] for q in raw_q]


def test_fixture_inputs_use_the_official_templates():
    for q in read_questions(L2M / "dev_questions.json", task="LaMP_2M")[0]:
        prefix = lamp_2m.INSTRUCTION.split("{description}")[0]
        assert q.input.startswith(prefix) and len(q.input) > len(prefix)
    for q in read_questions(L3 / "dev_questions.json", task="LaMP_3")[0]:
        assert q.input.startswith(lamp_3.INSTRUCTION.split("{text}")[0])
    for q in read_questions(L4 / "dev_questions.json", task="LaMP_4")[0]:
        assert q.input.startswith(lamp_4.INSTRUCTION.split("{text}")[0])
    items = [it for q in read_questions(L2M / "dev_questions.json", task="LaMP_2M")[0] for it in q.profile]
    assert any("date" in it for it in items) and any("date" not in it for it in items)   # like real LaMP_2M
    assert {it["tag"] for it in items} <= set(lamp_2m.LABELS)


# ------------------------------------------------------------------ readers

def test_read_questions_user_based_2m():
    qs, problems = read_questions(L2M / "dev_questions.json", task="LaMP_2M", strict=True)
    assert len(problems) == 0
    assert ids(qs) == ["20005", "20004", "20001", "20006", "20003", "20002"]
    assert all(isinstance(q, Question) and q.user_id is None for q in qs)
    assert [len(q.profile) for q in qs] == [3, 5, 9, 2, 5, 7]
    q = qs[0]
    assert q.profile[0] == {"id": "200051", "description": "Two rival chefs swap lives for a week.", "tag": "comedy"}
    assert q.input.endswith("description: A clerk finds a portal to a world of talking cats.")
    train, _ = read_questions(L2M / "train_questions.json", task="LaMP_2M")
    assert len(train) == 6


def test_read_questions_time_based_3_and_4():
    qs, problems = read_questions(L3 / "dev_questions.json", task="LaMP_3", strict=True)
    assert len(problems) == 0 and len(qs) == 8
    assert [q.user_id for q in qs] == ["3001", "3002", "3001", "3004", "3003", "3001", "3002", "3004"]
    assert qs[0].profile[0] == {"id": "3001b", "text": "Fine for the price.", "score": "3", "date": "2013-07-19"}
    qs4, _ = read_questions(L4 / "dev_questions.json", task="4", strict=True)
    assert [q.user_id for q in qs4] == ["4001", "4001", "4002"]
    assert set(qs4[0].profile[0]) == {"id", "text", "title", "date"}


def test_read_outputs_fixtures():
    task, golds, problems = read_outputs(L2M / "dev_outputs.json")
    assert task == "LaMP_2M" and len(problems) == 0
    assert golds == {"20005": "fantasy", "20004": "true story", "20001": "fantasy", "20006": "comedy",
                     "20003": "sci-fi", "20002": "classic"}
    task, golds, _ = read_outputs(L3 / "dev_outputs.json")
    assert task == "LaMP_3" and golds["30013"] == "3" and len(golds) == 8
    task, golds, _ = read_outputs(L4 / "train_outputs.json")
    assert task == "LaMP_4" and golds == {"40031": "Stocks Rise for Fifth Day", "40013": "Library Extends Weekend Hours"}


def test_numeric_ids_and_outputs_become_strings(tmp_path):
    qf = write(tmp_path / "dev_questions.json",
               [{"id": 7, "input": "x", "user_id": 3, "profile": [{"id": 1, "text": "t", "score": 4}]}])
    qs, _ = read_questions(qf, task="LaMP_3")
    assert qs[0].id == "7" and qs[0].user_id == "3" and qs[0].profile[0]["id"] == "1"
    assert qs[0].profile[0]["score"] == 4            # values other than ids are kept as published
    of = write(tmp_path / "dev_outputs.json", {"task": "LaMP_3", "golds": [{"id": 7, "output": 4}]})
    assert read_outputs(of)[1] == {"7": "4"}


def test_read_outputs_without_task_field(tmp_path):
    of = write(tmp_path / "p.json", {"golds": [{"id": "1", "output": "comedy"}]})
    assert read_outputs(of)[:2] == (None, {"1": "comedy"})


# ------------------------------------------------------------------ users

def test_user_based_each_question_is_its_own_user():
    ds = load_lamp_dir(L2M)
    assert ds.task == "LaMP_2M" and len(ds.problems) == 0 and sorted(ds.splits) == ["dev", "train"]
    dev = ds.splits["dev"]
    qs, _ = read_questions(L2M / "dev_questions.json", task="LaMP_2M")
    assert [u.user_id for u in dev] == [q.id for q in qs]
    for u, q in zip(dev, qs):
        assert u.split == "dev" and len(u.queries) == 1
        (query,) = u.queries
        assert query.id == q.id and query.input == q.input
        assert sorted(ids(u.history)) == sorted(ids(q.profile))     # user-based: history == profile
        assert u.visible_items(query) == u.history
    golds = {u.user_id: u.queries[0].gold for u in dev}
    assert golds == read_outputs(L2M / "dev_outputs.json")[1]
    assert len(ds.splits["train"]) == 6


def test_history_chronological_when_every_item_has_a_date():
    dev = users_by_id(load_lamp_dir(L2M).splits["dev"])
    # unix-time strings sort numerically: "999993600" (2001) comes first, not last as it would lexically
    assert ids(dev["20001"].history) == ["200012", "200013", "200018", "200019", "200015", "200016",
                                         "200011", "200017", "200014"]
    # ISO dates sort as dates
    assert ids(dev["20004"].history) == ["200044", "200042", "200041", "200043", "200045"]
    # one item without a date -> file order is kept
    assert ids(dev["20003"].history) == ["200031", "200032", "200033", "200034", "200035"]
    assert ids(dev["20002"].history) == ["200021", "200022", "200023", "200024", "200025", "200026", "200027"]
    # no dates at all -> file order
    assert ids(dev["20005"].history) == ["200051", "200052", "200053"]
    l3 = users_by_id(load_lamp_dir(L3).splits["dev"])
    assert ids(l3["3002"].history) == ["3002b", "3002c", "3002d", "3002a"]          # unix strings
    assert ids(l3["3004"].history) == ["3004d", "3004b", "3004f", "3004c", "3004a", "3004e"]  # ISO


def test_mixed_date_kinds_keep_file_order():
    items = [{"id": "a", "text": "x", "score": "1", "date": "2014-01-01"},
             {"id": "b", "text": "x", "score": "1", "date": "999993600"}]
    (u,) = group_users([Question("q", "in", tuple(items))], None)
    assert ids(u.history) == ["a", "b"] and u.queries[0].gold is None


def test_time_based_users_grouped_by_user_id():
    ds = load_lamp_dir(L3, task="LaMP_3")
    assert ds.task == "LaMP_3"
    dev = users_by_id(ds.splits["dev"])
    assert [u.user_id for u in ds.splits["dev"]] == ["3001", "3002", "3004", "3003"]   # first appearance
    assert {uid: len(u.queries) for uid, u in dev.items()} == {"3001": 3, "3002": 2, "3004": 2, "3003": 1}
    assert [q.id for q in dev["3001"].queries] == ["30011", "30012", "30013"]
    assert [q.gold for q in dev["3001"].queries] == ["4", "5", "3"]
    train = users_by_id(ds.splits["train"])
    assert {uid: len(u.queries) for uid, u in train.items()} == {"3002": 1, "3005": 2, "3006": 1}
    assert all(u.split == "train" for u in train.values())
    l4 = load_lamp_dir(L4)
    assert {u.user_id: len(u.queries) for u in l4.splits["dev"]} == {"4001": 2, "4002": 1}
    assert {u.user_id: len(u.queries) for u in l4.splits["train"]} == {"4003": 1, "4001": 1}


def test_intersection_rule_history_and_visible_items():
    u = users_by_id(load_lamp_dir(L3).splits["dev"])["3001"]
    q1, q2, q3 = u.queries
    # 30012 sees 3001d (= question 30011 with its gold "4"); 30013 also sees 3001e (= 30012 + gold "5").
    # The user's PEFT trains only on what every query sees, so it never learns a query's own answer.
    assert ids(u.history) == ["3001a", "3001b", "3001c"]
    assert sorted(u.items_by_id) == ["3001a", "3001b", "3001c", "3001d", "3001e"]
    d = u.items_by_id["3001d"]
    assert d["text"] in q1.input and d["score"] == q1.gold
    assert ids(u.visible_items(q1)) == ["3001a", "3001b", "3001c"]
    assert ids(u.visible_items(q2)) == ["3001a", "3001b", "3001c", "3001d"]
    assert ids(u.visible_items(q3)) == ["3001a", "3001b", "3001c", "3001d", "3001e"]
    assert u.visible_items(q3)[-1] == {"id": "3001e", "text": "Perfect fit, great buckle.", "score": "5",
                                       "date": "2014-01-03"}
    # the same rule for LaMP_4: 4001's second question sees the first one's headline
    u4 = users_by_id(load_lamp_dir(L4).splits["dev"])["4001"]
    assert ids(u4.history) == ["4001b", "4001c", "4001a"]
    assert ids(u4.visible_items(u4.queries[1]))[-1] == "4001d"
    assert u4.items_by_id["4001d"]["title"] == u4.queries[0].gold


def test_same_item_id_with_different_content_in_one_user_is_an_error():
    a = {"id": "i1", "text": "x", "score": "1"}
    b = {"id": "i1", "text": "changed", "score": "1"}
    with pytest.raises(LampFormatError, match=r"src\.json: user 'u'.*'i1' differs.*'q2'"):
        group_users([Question("q1", "in", (a,), "u"), Question("q2", "in", (b,), "u")], None, source="src.json")


def test_select_test_users_longest_histories_ties_by_user_id():
    dev = load_lamp_dir(L2M).splits["dev"]   # history lengths: 20005:3 20004:5 20001:9 20006:2 20003:5 20002:7
    test, rest = select_test_users(dev, 3)
    # 20004 and 20003 tie at 5; 20003 wins on user id although 20004 comes first in the file
    assert [u.user_id for u in test] == ["20001", "20002", "20003"]
    assert [u.user_id for u in rest] == ["20005", "20004", "20006"]          # file order kept
    test, rest = select_test_users(dev, 100)
    assert len(test) == 6 and rest == []
    with pytest.raises(ValueError, match="test users must be >= 1"):
        select_test_users(dev, 0)


def test_split_users_user_based():
    ds = load_lamp_dir(L2M)
    test, others = ds.split_users(n_test=2)
    assert [u.user_id for u in test] == ["20001", "20002"]
    assert sorted(u.user_id for u in others) == ["10001", "10002", "10003", "10004", "10005", "10006",
                                                 "20003", "20004", "20005", "20006"]
    test, others = ds.split_users(n_test=1, eval_split="train")
    assert [u.user_id for u in test] == ["10004"] and len(others) == 11


def test_split_users_time_based_excludes_test_users_other_split_questions():
    ds = load_lamp_dir(L3)
    # dev history lengths: 3001:3 (intersection) 3002:4 3004:6 3003:2
    test, others = ds.split_users(n_test=2, eval_split="dev")
    assert [u.user_id for u in test] == ["3004", "3002"]
    assert [(u.split, u.user_id) for u in others] == [("dev", "3001"), ("dev", "3003"),
                                                      ("train", "3005"), ("train", "3006")]
    other_qids = {q.id for u in others for q in u.queries}
    assert "30023" not in other_qids            # 3002's train question is held out with its user
    assert other_qids == {"30011", "30012", "30013", "30031", "30051", "30052", "30061"}
    # 3001 is not a test user: its train question stays available
    test4, others4 = load_lamp_dir(L4).split_users(n_test=1)
    assert [u.user_id for u in test4] == ["4001"]
    assert [(u.split, u.user_id) for u in others4] == [("dev", "4002"), ("train", "4003")]


def test_split_users_errors(tmp_path):
    ds = load_lamp_dir(L3)
    with pytest.raises(ValueError, match=r"split 'test' not found.*\['dev', 'train'\]"):
        ds.split_users(2, eval_split="test")
    root = tmp_path / "LaMP_3"
    root.mkdir()
    shutil.copy(L3 / "dev_questions.json", root / "dev_questions.json")       # no golds for dev
    shutil.copy(L3 / "train_questions.json", root / "train_questions.json")
    shutil.copy(L3 / "train_outputs.json", root / "train_outputs.json")
    ds = load_lamp_dir(root)
    assert ds.task == "LaMP_3" and all(q.gold is None for u in ds.splits["dev"] for q in u.queries)
    with pytest.raises(ValueError, match="no golds"):
        ds.split_users(2)


def test_load_lamp_dir_task_handling(tmp_path):
    assert load_lamp_dir(L3, task="lamp_3").task == "LaMP_3"
    with pytest.raises(LampFormatError, match=r"dev_outputs\.json: task 'LaMP_3' but 'LaMP_4' was asked for"):
        load_lamp_dir(L3, task="LaMP_4")
    root = tmp_path / "x"
    root.mkdir()
    shutil.copy(L3 / "dev_questions.json", root / "dev_questions.json")
    with pytest.raises(LampFormatError, match="cannot tell the task"):
        load_lamp_dir(root)
    assert load_lamp_dir(root, task="LaMP_3").splits["dev"][0].queries[0].gold is None
    with pytest.raises(FileNotFoundError, match="not found"):
        load_lamp_dir(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LampFormatError, match=r"no \*_questions\.json"):
        load_lamp_dir(empty)


# ------------------------------------------------------------------ malformed files: strict errors

def good_2m_question(qid="q1"):
    return {"id": qid, "input": lamp_2m.INSTRUCTION.format(description="A film."),
            "profile": [{"id": f"{qid}-a", "description": "d1", "tag": "comedy"},
                        {"id": f"{qid}-b", "description": "d2", "tag": "action", "date": "2010-01-01"}]}


def assert_error(exc: pytest.ExceptionInfo, *parts: str):
    msg = str(exc.value)
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"


@pytest.mark.parametrize("mutate, parts", [
    (lambda q: q.pop("input"), ["question #1", "(id='q2')", "missing field 'input'"]),
    (lambda q: q.pop("id"), ["question #1", "missing field 'id'"]),
    (lambda q: q.update(profile={"id": "x"}), ["question #1", "(id='q2')", "'profile'", "dict"]),
    (lambda q: q.update(input=["text"]), ["question #1", "(id='q2')", "'input'", "list"]),
    (lambda q: q.update(user_id=["u"]), ["question #1", "(id='q2')", "'user_id'", "list"]),
    (lambda q: q["profile"][1].pop("tag"), ["question #1", "(id='q2')", "profile item #1", "(item id='q2-b')",
                                            "missing field 'tag'"]),
    (lambda q: q["profile"][0].update(description=5), ["question #1", "profile item #0", "'description'",
                                                       "must be a string", "int"]),
    (lambda q: q["profile"][0].pop("id"), ["question #1", "profile item #0", "missing field 'id'"]),
    (lambda q: q["profile"].append("just text"), ["question #1", "profile item #2", "expected an object", "str"]),
    (lambda q: q["profile"][1].update(id="q2-a"), ["question #1", "(id='q2')", "profile item #1",
                                                   "duplicate item id 'q2-a'"]),
])
def test_bad_question_records_name_file_record_and_field(tmp_path, mutate, parts):
    bad = good_2m_question("q2")
    mutate(bad)
    qf = write(tmp_path / "dev_questions.json", [good_2m_question("q1"), bad])
    with pytest.raises(LampFormatError) as e:
        read_questions(qf, task="LaMP_2M", strict=True)
    assert_error(e, "dev_questions.json", *parts)


def test_question_not_an_object(tmp_path):
    qf = write(tmp_path / "dev_questions.json", [good_2m_question("q1"), ["q2"]])
    with pytest.raises(LampFormatError) as e:
        read_questions(qf, task="LaMP_2M")
    assert_error(e, "dev_questions.json", "question #1", "expected an object, got list")


def test_lamp3_score_type(tmp_path):
    q = {"id": "1", "input": "i", "user_id": "u",
         "profile": [{"id": "a", "text": "t", "score": ["4"]}, {"id": "b", "text": "t", "score": True}]}
    qf = write(tmp_path / "train_questions.json", [q])
    with pytest.raises(LampFormatError) as e:
        read_questions(qf, task="LaMP_3")
    assert_error(e, "train_questions.json", "question #0", "(item id='a')", "'score'", "list")
    q["profile"].pop(0)
    write(qf, [q])
    with pytest.raises(LampFormatError) as e:
        read_questions(qf, task="LaMP_3")
    assert_error(e, "question #0", "(item id='b')", "'score'", "bool")


def test_task_fields_are_only_checked_when_the_task_is_known(tmp_path):
    q = good_2m_question()
    q["profile"][0].pop("tag")
    qf = write(tmp_path / "dev_questions.json", [q])
    assert len(read_questions(qf)[0]) == 1                      # no task: only id/input/profile checked
    with pytest.raises(LampFormatError, match="missing field 'tag'"):
        read_questions(qf, task="LaMP_2M")
    with pytest.raises(LampFormatError, match="missing field 'text'"):
        read_questions(qf, task="LaMP_4")                         # wrong task: its fields are missing


def test_duplicate_question_ids(tmp_path):
    qf = write(tmp_path / "dev_questions.json", [good_2m_question("q1"), good_2m_question("q2"),
                                                 good_2m_question("q1")])
    with pytest.raises(LampFormatError) as e:
        read_questions(qf, task="LaMP_2M")
    assert_error(e, "dev_questions.json", "question #2", "duplicate question id 'q1'")


@pytest.mark.parametrize("name", ["dev_questions.json", "dev_outputs.json"])
@pytest.mark.parametrize("text", ["", "  \n\t\n"])
def test_empty_file(tmp_path, name, text):
    f = write(tmp_path / name, text)
    with pytest.raises(LampFormatError) as e:
        read_questions(f) if "questions" in name else read_outputs(f)
    assert_error(e, name, "file is empty")


@pytest.mark.parametrize("name", ["dev_questions.json", "dev_outputs.json"])
def test_invalid_json_reports_line_and_column(tmp_path, name):
    f = write(tmp_path / name, '[\n  {"id": "1",\n   "input": "x" "profile": []}\n]\n')
    with pytest.raises(LampFormatError) as e:
        read_questions(f) if "questions" in name else read_outputs(f)
    assert_error(e, name, "invalid JSON", "line 3 column 17")


def test_missing_file_and_wrong_top_level_shapes(tmp_path):
    with pytest.raises(LampFormatError) as e:
        read_questions(tmp_path / "nope_questions.json")
    assert_error(e, "nope_questions.json", "file not found")
    qf = write(tmp_path / "dev_questions.json", {"id": "1"})
    with pytest.raises(LampFormatError) as e:
        read_questions(qf)
    assert_error(e, "dev_questions.json", "expected a JSON list of questions, got dict")
    write(qf, [])
    with pytest.raises(LampFormatError) as e:
        read_questions(qf)
    assert_error(e, "dev_questions.json", "contains no questions")
    of = write(tmp_path / "dev_outputs.json", [{"id": "1", "output": "x"}])
    with pytest.raises(LampFormatError) as e:
        read_outputs(of)
    assert_error(e, "dev_outputs.json", "expected an object with 'task' and 'golds', got list")


@pytest.mark.parametrize("obj, parts", [
    ({"task": "LaMP_2M"}, ["missing field 'golds'"]),
    ({"task": "LaMP_2M", "gold": []}, ["missing field 'golds'"]),
    ({"task": "LaMP_2M", "golds": {"1": "comedy"}}, ["field 'golds' must be a list, got dict"]),
    ({"task": "LaMP_9", "golds": []}, ["field 'task'", "unknown LaMP task 'LaMP_9'", "valid: LaMP_1, LaMP_2N"]),
    ({"task": 2, "golds": []}, ["field 'task' must be a string, got int"]),
    ({"task": "LaMP_2M", "golds": [{"id": "1", "output": "a"}, ["2", "b"]]}, ["golds #1", "expected an object"]),
    ({"task": "LaMP_2M", "golds": [{"output": "a"}]}, ["golds #0", "missing field 'id'"]),
    ({"task": "LaMP_2M", "golds": [{"id": "1"}]}, ["golds #0 (id='1')", "missing field 'output'"]),
    ({"task": "LaMP_2M", "golds": [{"id": "1", "output": None}]}, ["golds #0 (id='1')", "'output'", "NoneType"]),
    ({"task": "LaMP_2M", "golds": [{"id": "1", "output": "a"}, {"id": "1", "output": "b"}]},
     ["golds #1", "duplicate id '1'"]),
])
def test_bad_outputs_files(tmp_path, obj, parts):
    of = write(tmp_path / "dev_outputs.json", obj)
    with pytest.raises(LampFormatError) as e:
        read_outputs(of, strict=True)
    assert_error(e, "dev_outputs.json", *parts)


def make_dir(tmp_path: Path, questions, golds, task="LaMP_2M", name="LaMP_2M") -> Path:
    root = tmp_path / name
    root.mkdir()
    write(root / "dev_questions.json", questions)
    write(root / "dev_outputs.json", {"task": task, "golds": [{"id": k, "output": v} for k, v in golds]})
    return root


def test_question_without_gold(tmp_path):
    root = make_dir(tmp_path, [good_2m_question("q1"), good_2m_question("q2")], [("q1", "comedy")])
    with pytest.raises(LampFormatError) as e:
        load_lamp_dir(root)
    assert_error(e, "dev_questions.json", "1 question(s) have no gold", "id='q2'")


def test_gold_without_question(tmp_path):
    root = make_dir(tmp_path, [good_2m_question("q1")], [("q1", "comedy"), ("q9", "action")])
    with pytest.raises(LampFormatError) as e:
        load_lamp_dir(root)
    assert_error(e, "dev_questions.json", "1 gold id(s) match no question", "id='q9'")


def test_strict_load_lamp_dir_reports_the_first_bad_record(tmp_path):
    root = copy_dir(L3, tmp_path / "LaMP_3")
    raw = json.loads((root / "train_questions.json").read_text())
    raw[2]["profile"][1]["score"] = {"v": 4}
    write(root / "train_questions.json", raw)
    with pytest.raises(LampFormatError) as e:
        load_lamp_dir(root)
    assert_error(e, "train_questions.json", "question #2", "(id='30052')", "profile item #1", "'score'")


# ------------------------------------------------------------------ lenient mode

def test_lenient_read_questions_skips_and_counts_every_bad_record(tmp_path):
    recs = [good_2m_question(f"q{i}") for i in range(6)]
    recs[1].pop("input")                                   # bad 1
    recs[3]["profile"][0].pop("tag")                       # bad 2
    recs[4]["profile"][1]["id"] = "q4-a"                   # bad 3: duplicate item id
    recs.append(good_2m_question("q0"))                    # bad 4: duplicate question id
    recs.append("not a question")                          # bad 5
    qf = write(tmp_path / "dev_questions.json", recs)
    with pytest.raises(LampFormatError, match="question #1"):
        read_questions(qf, task="LaMP_2M", strict=True)
    qs, problems = read_questions(qf, task="LaMP_2M", strict=False)
    assert ids(qs) == ["q0", "q2", "q5"]
    assert len(problems) == 5 == len(recs) - len(qs)      # nothing dropped silently
    for msg, (n, part) in zip(problems.messages, [(1, "'input'"), (3, "'tag'"), (4, "duplicate item id"),
                                                  (6, "duplicate question id 'q0'"), (7, "expected an object")]):
        assert "dev_questions.json" in msg and f"question #{n}" in msg and part in msg


def test_lenient_with_nothing_left_is_still_an_error(tmp_path):
    bad = good_2m_question("q1")
    bad.pop("profile")
    qf = write(tmp_path / "dev_questions.json", [bad])
    with pytest.raises(LampFormatError) as e:
        read_questions(qf, task="LaMP_2M", strict=False)
    assert_error(e, "dev_questions.json", "no valid question left", "1 skipped", "missing field 'profile'")


def test_lenient_read_outputs_skips_and_counts(tmp_path):
    of = write(tmp_path / "dev_outputs.json", {"task": "LaMP_2M", "golds": [
        {"id": "1", "output": "comedy"}, {"id": "2"}, {"id": "3", "output": "action"}, {"id": "1", "output": "x"}]})
    task, golds, problems = read_outputs(of, strict=False)
    assert task == "LaMP_2M" and golds == {"1": "comedy", "3": "action"}
    assert len(problems) == 2
    assert "golds #1 (id='2')" in problems.messages[0] and "'output'" in problems.messages[0]
    assert "golds #3" in problems.messages[1] and "duplicate id '1'" in problems.messages[1]
    assert all("dev_outputs.json" in m for m in problems.messages)


def test_lenient_load_lamp_dir_bad_question_and_its_gold_are_both_reported(tmp_path):
    root = copy_dir(L3, tmp_path / "LaMP_3")
    raw = json.loads((root / "dev_questions.json").read_text())
    del raw[2]["input"]                                    # 30012, user 3001's second question
    write(root / "dev_questions.json", raw)
    with pytest.raises(LampFormatError, match="question #2"):
        load_lamp_dir(root)
    ds = load_lamp_dir(root, strict=False)
    # one bad question record -> it is skipped, and so is its (now orphan) gold record: two messages
    assert len(ds.problems) == 2
    q_msg, g_msg = ds.problems.messages
    assert "dev_questions.json" in q_msg and "question #2" in q_msg and "'30012'" in q_msg and "'input'" in q_msg
    assert "dev_outputs.json" in g_msg and "gold id '30012' dropped" in g_msg
    assert "no valid question with this id in dev_questions.json" in g_msg
    u = users_by_id(ds.splits["dev"])["3001"]
    assert [q.id for q in u.queries] == ["30011", "30013"]
    assert ids(u.history) == ["3001a", "3001b", "3001c"]
    assert sum(len(u.queries) for u in ds.splits["dev"]) == 7
    assert sum(len(u.queries) for u in ds.splits["train"]) == 4


def test_lenient_load_lamp_dir_bad_gold_skips_its_question(tmp_path):
    root = copy_dir(L2M, tmp_path / "LaMP_2M")
    raw = json.loads((root / "dev_outputs.json").read_text())
    raw["golds"][1]["output"] = ["true story"]            # 20004
    write(root / "dev_outputs.json", raw)
    ds = load_lamp_dir(root, strict=False)
    assert len(ds.problems) == 2
    g_msg, q_msg = ds.problems.messages
    assert "dev_outputs.json" in g_msg and "golds #1 (id='20004')" in g_msg and "'output'" in g_msg
    assert "dev_questions.json" in q_msg and "'20004'" in q_msg and "no gold" in q_msg
    assert [u.user_id for u in ds.splits["dev"]] == ["20005", "20001", "20006", "20003", "20002"]


def test_lenient_orphan_gold_is_reported(tmp_path):
    root = make_dir(tmp_path, [good_2m_question("q1")], [("q1", "comedy"), ("q9", "action")])
    ds = load_lamp_dir(root, strict=False)
    assert len(ds.problems) == 1
    msg = ds.problems.messages[0]
    assert "dev_outputs.json" in msg and "gold id 'q9' dropped: no valid question" in msg
    assert [u.user_id for u in ds.splits["dev"]] == ["q1"]


def test_lenient_split_without_outputs_counts_one_per_bad_record(tmp_path):
    root = copy_dir(L4, tmp_path / "LaMP_4")
    recs = json.loads((root / "dev_questions.json").read_text())
    for r in recs:
        r["id"] = "t" + r["id"]
    recs[1]["profile"][0]["title"] = 7
    write(root / "test_questions.json", recs)          # like the real release: test golds are hidden
    ds = load_lamp_dir(root, strict=False)
    assert len(ds.problems) == 1 and "test_questions.json" in ds.problems.messages[0]
    assert [q.id for u in ds.splits["test"] for q in u.queries] == ["t40011", "t40021"]
    assert all(q.gold is None for u in ds.splits["test"] for q in u.queries)


# ------------------------------------------------------------------ writers round-trip

@pytest.mark.parametrize("path", sorted(str(p.relative_to(FIX)) for p in FIX.rglob("*_questions.json")))
def test_write_questions_round_trip(tmp_path, path):
    src = FIX / path
    task = src.parent.name
    qs, _ = read_questions(src, task=task)
    write_questions(tmp_path / "a.json", qs)
    qs2, _ = read_questions(tmp_path / "a.json", task=task)
    assert qs2 == qs
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads(src.read_text())   # nothing lost
    write_questions(tmp_path / "b.json", qs2)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("path", sorted(str(p.relative_to(FIX)) for p in FIX.rglob("*_outputs.json")))
def test_write_outputs_round_trip(tmp_path, path):
    src = FIX / path
    task, golds, _ = read_outputs(src)
    write_outputs(tmp_path / "a.json", task, golds)
    task2, golds2, _ = read_outputs(tmp_path / "a.json")
    assert (task2, golds2) == (task, golds)
    assert list(golds2) == list(golds)                     # id order kept
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads(src.read_text())
    write_outputs(tmp_path / "b.json", task2, golds2)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_write_outputs_canonicalizes_task_and_keeps_unicode(tmp_path):
    write_outputs(tmp_path / "sub" / "p.json", "2m", {"b": "comédie", "a": "sci-fi"})
    raw = json.loads((tmp_path / "sub" / "p.json").read_text(encoding="utf-8"))
    assert raw == {"task": "LaMP_2M", "golds": [{"id": "b", "output": "comédie"}, {"id": "a", "output": "sci-fi"}]}
    assert "comédie" in (tmp_path / "sub" / "p.json").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="unknown LaMP task"):
        write_outputs(tmp_path / "q.json", "LaMP_6", {"a": "b"})
    assert not (tmp_path / "q.json").exists()


def test_write_questions_without_user_id_omits_the_key(tmp_path):
    write_questions(tmp_path / "q.json", [Question("1", "in", ({"id": "a", "text": "t"},))])
    assert json.loads((tmp_path / "q.json").read_text()) == [{"id": "1", "input": "in",
                                                             "profile": [{"id": "a", "text": "t"}]}]


# ------------------------------------------------------------------ task ids

@pytest.mark.parametrize("alias, tid", [
    ("LaMP_2M", "LaMP_2M"), ("lamp_2m", "LaMP_2M"), ("2M", "LaMP_2M"), ("2m", "LaMP_2M"), ("LAMP-2M", "LaMP_2M"),
    (" LaMP_3 ", "LaMP_3"), ("3", "LaMP_3"), ("lamp-4", "LaMP_4"), ("1", "LaMP_1"), ("2N", "LaMP_2N"),
    ("LaMP_5", "LaMP_5"), ("7", "LaMP_7"),
])
def test_canonical_task_aliases(alias, tid):
    assert canonical_task(alias) == tid


@pytest.mark.parametrize("bad", ["LaMP_6", "LaMP_2", "2", "", "lamp", "LaMP_2MM"])
def test_canonical_task_unknown_lists_valid_ids(bad):
    with pytest.raises(ValueError) as e:
        canonical_task(bad)
    msg = str(e.value)
    assert repr(bad) in msg and all(t in msg for t in TASK_IDS)


def test_every_task_id_is_canonical_and_has_item_fields():
    assert TASK_IDS == ("LaMP_1", "LaMP_2N", "LaMP_2M", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7")
    assert all(canonical_task(t) == t for t in TASK_IDS) and set(ITEM_FIELDS) == set(TASK_IDS)
    with pytest.raises(ValueError, match="valid: LaMP_1"):
        read_questions(L3 / "dev_questions.json", task="LaMP_8")


def test_spread_selection_covers_every_history_length():
    users = [User(f"u{n:02d}", [{}] * n, []) for n in range(1, 21)]
    test, rest = select_test_users(users, 4, "spread")
    assert [len(u.history) for u in test] == [20, 14, 7, 1]
    assert len(rest) == 16 and not {u.user_id for u in test} & {u.user_id for u in rest}
    assert [len(u.history) for u in select_test_users(users, 3)[0]] == [20, 19, 18]  # "longest", the default
    with pytest.raises(ValueError, match="'random'"):
        select_test_users(users, 2, "random")


def test_base_cache_key_sees_content_not_just_shapes(tmp_path):
    """Two worlds with the same users and history lengths but other text must not share a base."""
    from oppu.data.synth import synth_world
    from oppu.fingerprint import data_fingerprint
    a = synth_world("LaMP_2M", tmp_path / "a", seed=2, test_users=2, other_users=6, noise=0.05)
    b = synth_world("LaMP_2M", tmp_path / "b", seed=2, test_users=2, other_users=6, noise=0.5)
    assert a["counts"]["train_history"] == b["counts"]["train_history"]
    oa = load_lamp_dir(tmp_path / "a", "LaMP_2M").split_users(2)[1]
    ob = load_lamp_dir(tmp_path / "b", "LaMP_2M").split_users(2)[1]
    assert [(u.user_id, len(u.history)) for u in oa] == [(u.user_id, len(u.history)) for u in ob]
    assert data_fingerprint(oa) != data_fingerprint(ob)
    assert data_fingerprint(oa) == data_fingerprint(load_lamp_dir(tmp_path / "a", "LaMP_2M").split_users(2)[1])
