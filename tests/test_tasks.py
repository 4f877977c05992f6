"""The seven LaMP task modules and the task registry."""
from __future__ import annotations

import pytest

from oppu.tasks import Task, base, get_task, lamp_1, lamp_2m, lamp_2n, lamp_3, lamp_4, lamp_5, lamp_7, register

TITLE, REF1, REF2 = "Graph neural networks for recommendation", "Deep learning on graphs", "Protein folding at scale"
LAMP1_INPUT = lamp_1.INSTRUCTION.format(title=TITLE, ref1=REF1, ref2=REF2)

# task id -> (query content, two history items, rendered first item, target of the first item)
CASES = {
    "LaMP_1": (None, [{"id": "1", "title": "Graph convolution for ranking", "abstract": "We rank with graphs."},
                      {"id": "2", "title": "Session-based recommendation", "abstract": "Sessions matter."}],
               "paper: Graph convolution for ranking", "Graph convolution for ranking"),
    "LaMP_2N": ("The senate passed the bill.",
                [{"id": "1", "text": "Stocks rallied today.", "title": "Rally", "category": "business"},
                 {"id": "2", "text": "The team won.", "title": "Win", "category": "sports"}],
                "article: Stocks rallied today. category: business", "business"),
    "LaMP_2M": ("A robot learns to love.",
                [{"id": "1", "description": "Aliens invade earth.", "tag": "sci-fi"},
                 {"id": "2", "description": "Two friends on a road trip.", "tag": "comedy"}],
                "description: Aliens invade earth. tag: sci-fi", "sci-fi"),
    "LaMP_3": ("Broke after a week.",
               [{"id": "1", "text": "Works great.", "score": 4.0},
                {"id": "2", "text": "Meh.", "score": "2"}],
               "review: Works great. score: 4", "4"),
    "LaMP_4": ("The city council voted to ban cars downtown on Sundays.",
               [{"id": "1", "text": "Rain flooded the streets.", "title": "Floods Hit Downtown"},
                {"id": "2", "text": "A new park opened.", "title": "Park Opens"}],
               "article: Rain flooded the streets. headline: Floods Hit Downtown", "Floods Hit Downtown"),
    "LaMP_5": ("We propose a method for sparse attention.",
               [{"id": "1", "abstract": "We study transformers.", "title": "On Transformers"},
                {"id": "2", "abstract": "We study graphs.", "title": "Graph Learning: A Survey"}],
               "abstract: We study transformers. title: On Transformers", "On Transformers"),
    "LaMP_7": ("I am really tired of rainy Mondays.",
               [{"id": "1", "text": "mondays again #ugh"}, {"id": "2", "text": "coffee first @bob :)"}],
               "tweet: mondays again #ugh", "mondays again #ugh"),
}
CUES = {"LaMP_1": "reference:", "LaMP_2N": "category:", "LaMP_2M": "tag:", "LaMP_3": "score:",
        "LaMP_4": "headline:", "LaMP_5": "title:", "LaMP_7": "tweet:"}
QUERY_LINES = {"LaMP_1": f"paper: {TITLE} [1]: {REF1} [2]: {REF2}", "LaMP_2N": "article: The senate passed the bill.",
               "LaMP_2M": "description: A robot learns to love.", "LaMP_3": "review: Broke after a week.",
               "LaMP_4": "article: The city council voted to ban cars downtown on Sundays.",
               "LaMP_5": "abstract: We propose a method for sparse attention.",
               "LaMP_7": "text: I am really tired of rainy Mondays."}


def official_input(task_id: str) -> str:
    task = get_task(task_id)
    content = CASES[task_id][0]
    return LAMP1_INPUT if content is None else task.instruction.replace("{" + task.content_field + "}", content)


@pytest.mark.parametrize("task_id", sorted(CASES))
def test_prompt_shape(task_id):
    task = get_task(task_id)
    _, items, first_line, _ = CASES[task_id]
    prompt = task.prompt(official_input(task_id), retrieved=items, profile="likes short things")
    lines = prompt.split("\n")
    assert lines[0] == "profile: likes short things"
    assert lines[1] == first_line
    assert lines[2] == task.render_item(items[1])
    assert lines[3] == QUERY_LINES[task_id]
    assert lines[-1] == CUES[task_id] == task.cue and prompt.endswith("\n" + task.cue)
    assert len(lines) == 5
    # compact style drops the official instruction; full style keeps it verbatim
    assert task.instruction.split("{")[0].strip()[:30] not in prompt
    full = task.prompt(official_input(task_id), retrieved=items, style="full")
    assert full.split("\n")[-2] == official_input(task_id).strip()


@pytest.mark.parametrize("task_id", sorted(k for k in CASES if k != "LaMP_1"))
def test_content_strips_instruction(task_id):
    task = get_task(task_id)
    assert task.content(official_input(task_id)) == CASES[task_id][0]
    assert task.content("  user made text  ") == "user made text"
    assert task.query_doc(official_input(task_id)) == CASES[task_id][0]


def test_lamp1_content_and_query():
    task = get_task("LaMP_1")
    assert task.content(LAMP1_INPUT) == LAMP1_INPUT  # three fields: the module parses it itself
    assert task.render_query(task.content(LAMP1_INPUT)) == QUERY_LINES["LaMP_1"]
    assert task.query_doc(LAMP1_INPUT) == f"{REF1} {REF2}"
    assert task.render_query("not the template") == "not the template"
    assert task.query_doc("not the template") == "not the template"


def test_lamp1_parse_input():
    assert lamp_1.parse_input(LAMP1_INPUT) == (TITLE, REF1, REF2)
    messy = ('For an author who has written the paper  with the title  "A \"quoted\" title" , which reference is '
             'related?\nJust answer with [1] or [2] without explanation.  [1]:"R one"\n[2]: "R two" \n')
    assert lamp_1.parse_input(messy) == ('A "quoted" title', "R one", "R two")
    assert lamp_1.parse_input("Which reference? [1]: a [2]: b") is None


@pytest.mark.parametrize("task_id", sorted(CASES))
def test_item_to_example_round_trips_label(task_id):
    task = get_task(task_id)
    item, target = CASES[task_id][1][0], CASES[task_id][3]
    inp, tgt = task.item_to_example(item)
    assert tgt == target
    if task_id == "LaMP_1":
        assert inp == "Write a paper title for this abstract: We rank with graphs."
    else:
        content = item[task.content_field]
        assert inp == task.instruction.replace("{" + task.content_field + "}", content)
        assert task.content(inp) == content
    if task.label_field:
        assert lamp_3.score_str(item[task.label_field]) == tgt


@pytest.mark.parametrize("task_id", ["LaMP_1", "LaMP_2N", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7"])
def test_item_to_example_empty_text_is_none(task_id):
    task = get_task(task_id)
    item = {f: "" for f in task.item_fields}
    assert task.item_to_example(item) is None


def test_lamp3_score_forms():
    for score in (4, 4.0, "4", " 4 "):
        assert lamp_3.TASK.item_to_example({"text": "ok", "score": score})[1] == "4"
        assert lamp_3.TASK.render_item({"text": "ok", "score": score}) == "review: ok score: 4"


def test_parse_classification():
    assert lamp_2m.TASK.parse("  comedy \n") == "comedy"
    assert lamp_2m.TASK.parse("Dark Comedy") == "dark comedy"
    assert lamp_2m.TASK.parse("dark comedy with a twist") == "dark comedy"
    assert lamp_2m.TASK.parse("comedy, because it is funny") == "comedy"
    assert lamp_2m.TASK.parse("horror") == "horror"  # invalid stays invalid for the scorer
    assert lamp_2n.TASK.parse(" Science & Technology.\nsome explanation") == "science & technology"
    assert lamp_2n.TASK.parse("Food and Drink") == "food & drink"
    assert lamp_2n.TASK.parse("POLITICS") == "politics"
    assert lamp_2n.TASK.parse("weather") == "weather"
    assert lamp_1.TASK.parse(" [2] \n") == "[2]"
    assert lamp_1.TASK.parse("[1] because the topic matches") == "[1]"
    assert lamp_1.TASK.parse("2") == "[2]"
    assert lamp_1.TASK.parse("neither") == "neither"


def test_parse_lamp3():
    parse = lamp_3.TASK.parse
    assert parse("  5 ") == "5"
    assert parse(" 4 stars") == "4"
    assert parse("4.0") == "4"
    assert parse("3.5") == "3.5"
    assert parse("score: 2\nbecause") == "2"
    assert parse("five") == "five"
    assert parse("  five ") == "five"


@pytest.mark.parametrize("task", [lamp_4.TASK, lamp_5.TASK, lamp_7.TASK])
def test_parse_generation(task):
    assert task.parse("  A Big Title  ") == "A Big Title"
    assert task.parse("\n\n First line \nsecond line\nthird") == "First line"
    assert task.parse("") == ""
    assert task.parse(" \n \n") == ""


def test_statistical_profiles():
    assert lamp_2n.TASK.statistical_profile(CASES["LaMP_2N"][1] + [{"category": "sports"}]) == \
        "most frequent categories: sports (2/3), business (1/3)"
    items3 = [{"score": "4"}, {"score": 4.0}, {"score": 1}, {"score": "5"}]
    assert lamp_3.TASK.statistical_profile(items3) == "average score 3.5 over 4 reviews; most frequent score 4 (2/4)"
    heads = [{"title": "How Cats Rule The World"}, {"title": "How Dogs Lost Their Crown"}, {"title": "Rain Again"}]
    assert lamp_4.TASK.statistical_profile(heads) == ('headlines average 4.0 words, mostly title case; common first '
                                                      'words: how (2/3); e.g. "How Dogs Lost Their Crown" | "Rain Again"')
    assert lamp_5.TASK.statistical_profile(CASES["LaMP_5"][1]).startswith("titles average 3.0 words, mostly title case")
    assert "colon in 1/2" in lamp_5.TASK.statistical_profile(CASES["LaMP_5"][1])
    tw = lamp_7.TASK.statistical_profile([{"text": "mondays #ugh"}, {"text": "coffee #UGH @bob :)"}])
    assert tw.startswith("tweets average 3.0 words; frequent markers: #ugh (2), @bob (1), :) (1)")
    assert tw.endswith('e.g. "mondays #ugh" | "coffee #UGH @bob :)"')
    papers = [{"title": "Learning graph networks for the web"}, {"title": "Graph learning at scale"}]
    assert lamp_1.TASK.statistical_profile(papers) == \
        "frequent title words: learning (2), graph (2), networks (1), web (1), scale (1)"
    for t in (lamp_1, lamp_2n, lamp_3, lamp_4, lamp_5, lamp_7):
        assert t.TASK.statistical_profile([]) == ""


@pytest.mark.parametrize("task_id", sorted(CASES))
def test_profile_prompt(task_id):
    task = get_task(task_id)
    items = CASES[task_id][1]
    text = task.profile_prompt(items)
    assert text.endswith("\nprofile:")
    assert "Summarize" in text
    first_field = items[0].get("title") if task_id == "LaMP_1" else items[0][task.content_field]
    assert first_field in text


def test_task_settings():
    assert lamp_2n.LABELS[0] == "travel" and lamp_2n.LABELS[-1] == "religion" and len(lamp_2n.LABELS) == 15
    assert lamp_1.TASK.labels == ("[1]", "[2]") and lamp_1.TASK.label_field is None
    assert lamp_3.TASK.kind == "regression" and lamp_3.TASK.labels == ("1", "2", "3", "4", "5")
    assert {t: get_task(t).max_new_tokens for t in CASES} == {
        "LaMP_1": 8, "LaMP_2N": 8, "LaMP_2M": 8, "LaMP_3": 4, "LaMP_4": 32, "LaMP_5": 32, "LaMP_7": 48}
    from oppu.data.lamp import ITEM_FIELDS
    assert {t: get_task(t).item_fields for t in CASES} == ITEM_FIELDS
    assert lamp_4.TASK.item_doc(CASES["LaMP_4"][1][0]) == "Rain flooded the streets. Floods Hit Downtown"
    assert lamp_1.TASK.item_doc(CASES["LaMP_1"][1][0]) == "Graph convolution for ranking We rank with graphs."


def test_long_item_keeps_label_in_prompt():
    long = {"text": " ".join(["word"] * 200), "title": "The Headline", "category": "crime"}
    assert get_task("LaMP_4").prompt("x", [long]).split("\n")[0].endswith("headline: The Headline")
    assert get_task("LaMP_2N").prompt("x", [long]).split("\n")[0].endswith("category: crime")


def test_registry_aliases():
    assert get_task("LaMP_3") is get_task("3") is get_task("lamp_3") is lamp_3.TASK
    assert get_task("2n") is lamp_2n.TASK and get_task("LaMP_7") is lamp_7.TASK
    assert base.registered() == sorted(CASES)


def test_unknown_task_lists_valid():
    with pytest.raises(ValueError) as err:
        get_task("LaMP_9")
    msg = str(err.value)
    assert "LaMP_9" in msg
    for t in CASES:
        assert t in msg


def test_register_custom_task(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    custom = Task(id="my_task", kind="generation", instruction="Summarize: {text}", item_fields=("text", "summary"),
                  label_field="summary", content_field="text", cue="summary:",
                  render_query=lambda c: f"text: {c}", render_item=lambda it: f"text: {it['text']} summary: {it['summary']}",
                  item_to_example=lambda it: (f"Summarize: {it['text']}", it["summary"]), parse=str.strip,
                  statistical_profile=lambda items: "", profile_prompt=lambda items: "profile:")
    assert register(custom) is custom
    assert get_task("my_task") is custom
    assert "my_task" in base.registered()
    assert custom.prompt("Summarize: a long story", [{"text": "t", "summary": "s"}]) == \
        "text: t summary: s\ntext: a long story\nsummary:"
    assert custom.query_doc("Summarize: a long story") == "a long story"
    with pytest.raises(ValueError, match="already registered"):
        register(custom)
    with pytest.raises(ValueError, match="already registered"):
        register(lamp_3.TASK)
    assert register(custom, overwrite=True) is custom


@pytest.mark.parametrize("text,want", [("Tag: comedy.", "comedy"), ("The tag is dark comedy", "dark comedy"),
                                       ("I think romance or action", "romance"), ("Sci-Fi", "sci-fi"),
                                       ("science fiction", "science fiction"), ("no label here", "no label here")])
def test_parse_label_takes_a_label_out_of_a_chatty_answer(text, want):
    from oppu.tasks.common import parse_label
    assert parse_label(text, ("comedy", "dark comedy", "sci-fi", "action", "romance")) == want
