"""The OPPU pipeline on micro bases: methods, PEFT types, retrievers, profiles, isolation, file format."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_same_module
from oppu.config import RunConfig, load_config
from oppu.data.synth import synth_world
from oppu.data.users import load_lamp_dir

FIX = Path(__file__).parent / "fixtures"


def micro(tmp_path: Path, **kw) -> RunConfig:
    base = dict(task="LaMP_2M", out=str(tmp_path / "out"), base="tiny:micro", test_users=3, seed=0,
                cache_dir=str(tmp_path / "cache"), **{"base_train.epochs": 1, "user_train.epochs": 1})
    base.update(kw)
    return load_config(None, **base)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("w2m")
    synth_world("LaMP_2M", d, seed=1, test_users=3, other_users=12, queries_per_user=2, min_history=4,
                max_history=10)
    return d


@pytest.fixture(scope="module")
def lora_run(world, tmp_path_factory):
    from oppu.pipeline import run
    tmp = tmp_path_factory.mktemp("lora")
    return run(micro(tmp, data=str(world)))


def test_run_writes_official_predictions_metrics_report_adapters(lora_run, world):
    out = lora_run.out
    golds = json.loads((world / "dev_outputs.json").read_text())
    gold_ids = {g["id"] for g in golds["golds"]}
    for m in ("non_personalized", "rag", "pag", "oppu", "oppu_rag", "oppu_pag"):
        pred = json.loads((out / "predictions" / f"{m}.json").read_text())
        assert pred["task"] == "LaMP_2M"
        assert {p["id"] for p in pred["golds"]} == gold_ids
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"non_personalized", "rag", "pag", "oppu", "oppu_rag", "oppu_pag"}
    # metrics.json is our scorer applied to the written predictions, nothing else
    from oppu.data.lamp import read_outputs
    from oppu.metrics import score
    _, g, _ = read_outputs(world / "dev_outputs.json")
    for m, vals in metrics.items():
        _, p, _ = read_outputs(out / "predictions" / f"{m}.json")
        assert score("LaMP_2M", g, p) == vals
    assert (out / "report.md").read_text().count("| oppu") == 3
    # the spread in run.json is the bootstrap over test users of exactly these predictions
    from oppu.spread import user_bootstrap
    run = json.loads((out / "run.json").read_text())
    preds = {m: read_outputs(out / "predictions" / f"{m}.json")[1] for m in metrics}
    by_user = {}
    for q in g:
        by_user.setdefault(q.rsplit("-", 1)[0], []).append(q)
    assert run["spread"] == json.loads(json.dumps(user_bootstrap("LaMP_2M", g, preds, by_user)))
    assert run["spread"]["users"] == 3 and set(run["spread"]["gap"]) == set(metrics) - {"non_personalized"}
    assert "Gap to non_personalized, 95% interval" in (out / "report.md").read_text()
    assert (out / "methods.png").stat().st_size > 1000
    users = sorted(p.name for p in (out / "adapters").iterdir())
    assert len(users) == 3
    for u in users:
        assert (out / "adapters" / u / "adapter_config.json").exists()
        assert (out / "adapters" / u / "adapter_model.safetensors").exists()


def test_second_run_reuses_cached_base_and_is_deterministic(lora_run, world, tmp_path):
    from oppu.pipeline import run
    cfg = micro(tmp_path, data=str(world), cache_dir=str(Path(lora_run.info["base"]["path"]).parent.parent))
    again = run(cfg)
    assert again.info["base"]["cached"] is True
    assert again.predictions == lora_run.predictions
    assert again.metrics == lora_run.metrics


def test_adapter_loads_with_peft_from_pretrained_and_gives_pipeline_predictions(lora_run, world):
    """The saved per-user file, loaded by plain PEFT onto the saved base, reproduces the run."""
    from peft_reference import peft_generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oppu.examples import query_prompt
    from oppu.profile import make_profile_fn
    from oppu.store.files import safe_user_dir
    from oppu.tasks import get_task

    task = get_task("LaMP_2M")
    base_dir = lora_run.info["base"]["path"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    test, _ = load_lamp_dir(world, "LaMP_2M").split_users(3)
    prof = make_profile_fn(task, "statistical")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    for u in test:
        prompts = [query_prompt(task, u, q, "rag", 2, "bm25", prof) for q in u.queries]
        texts = peft_generate(base, tok, prompts, lora_run.out / "adapters" / safe_user_dir(u.user_id),
                              task.max_new_tokens)
        for q, t in zip(u.queries, texts):
            assert task.parse(t) == lora_run.predictions["oppu_rag"][q.id]


@pytest.mark.parametrize("peft", ["prompt_tuning", "ia3"])
def test_other_peft_types_train_save_and_predict(peft, world, tmp_path):
    from peft import PeftModel

    from oppu.pipeline import run
    res = run(micro(tmp_path, data=str(world), peft=peft, methods=("non_personalized", "oppu")))
    cfgs = [json.loads(p.read_text()) for p in (res.out / "adapters").glob("*/adapter_config.json")]
    assert len(cfgs) == 3 and all(c["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "ia3": "IA3"}[peft]
                                  for c in cfgs)
    assert set(res.metrics) == {"non_personalized", "oppu"}
    # the adapter changes the model's output distribution (it is really plugged in)
    from oppu.model.base import load_base
    model, tok = load_base(res.info["base"]["path"])
    ids = tok(["description: x\ntag:"], return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
        pm = PeftModel.from_pretrained(model, str(next((res.out / "adapters").iterdir())))
        after = pm(**ids).logits
    assert not torch.allclose(before[:, -1], after[:, -1])  # prompt tuning prepends virtual tokens


@pytest.mark.parametrize("retriever", ["recency", "dense"])
def test_retrievers_in_pipeline(retriever, world, tmp_path):
    from oppu.pipeline import run
    res = run(micro(tmp_path, data=str(world), retriever=retriever, methods=("rag",)))
    assert res.info["config"]["retriever"] == retriever
    assert len(res.predictions["rag"]) == 6


def test_llm_profile_is_written_by_the_base(world, tmp_path):
    from oppu.pipeline import run
    res = run(micro(tmp_path, data=str(world), profile="llm", methods=("pag",)))
    assert res.info["profile_kind"] == "llm"
    assert len(res.predictions["pag"]) == 6


def test_statistical_profile_names_the_users_top_tag(world):
    from oppu.profile import make_profile_fn
    from oppu.tasks import get_task
    test, _ = load_lamp_dir(world, "LaMP_2M").split_users(3)
    u = test[0]
    from collections import Counter
    top = Counter(it["tag"] for it in u.history).most_common(1)[0][0]
    text = make_profile_fn(get_task("LaMP_2M"), "statistical")(u.history)
    assert text.startswith(f"most frequent tags: {top} (")


def test_no_adapter_sees_another_users_data(world, tmp_path):
    """A user's adapter is a function of that user's data alone: retraining user A with user B's
    history changed leaves A's adapter bit-identical, and A's examples use only A's items."""
    from safetensors.torch import load_file

    from oppu.config import UserTrainConfig
    from oppu.engine import peft_config, train_users
    from oppu.examples import history_examples
    from oppu.model.base import build_tiny_base, load_base
    from oppu.profile import make_profile_fn
    from oppu.tasks import get_task

    task = get_task("LaMP_2M")
    test, _ = load_lamp_dir(world, "LaMP_2M").split_users(3)
    a, b = test[0], test[1]
    d = build_tiny_base(["description: a b c tag: comedy"] * 50, tmp_path / "base", preset="micro")
    model, tok = load_base(d)
    prof = make_profile_fn(task, "statistical")
    ucfg = UserTrainConfig(epochs=1)
    pcfg = peft_config("lora", ucfg)
    exs_a = history_examples(task, a, ("plain", "rag", "pag"), 2, "bm25", prof)
    a_items = {f"item:{it['id']}" for it in a.history}
    assert {e.source for e in exs_a} <= a_items and all(e.user_id == a.user_id for e in exs_a)
    for e in exs_a:  # retrieved lines in A's prompts are A's own items
        for it in b.history:
            assert f"description: {it['description']}" not in e.prompt or it["description"] in \
                {x["description"] for x in a.history}

    def train_order(users, tag, group):
        exs = {u.user_id: history_examples(task, u, ("plain", "rag", "pag"), 2, "bm25", prof) for u in users}
        train_users(model, tok, exs, pcfg, ucfg, 0, tmp_path / tag, 256, max_users_per_batch=group)
        return load_file(tmp_path / tag / a.user_id / "adapter_model.safetensors")

    alone = train_order([a], "alone", 1)
    b.history[:] = b.history[::-1]  # another user's data changes...
    after_b = train_order([b, a], "after_b", 1)
    assert alone.keys() == after_b.keys()
    for k in alone:
        assert torch.equal(alone[k], after_b[k]), k  # ...and A's adapter does not
    # trained in the same pass as B (B's rows in the same forwards), A's module is A's up to rounding
    assert_same_module(train_order([b, a], "beside_b", 2), alone, "fp32", "A beside B")


@pytest.mark.parametrize("fixture,task,n", [("lamp_user_based/LaMP_2M", "LaMP_2M", 6),
                                              ("lamp_time_based/LaMP_3", "LaMP_3", None),
                                              ("lamp_time_based/LaMP_4", "LaMP_4", None)])
def test_official_shaped_fixtures_run_unchanged(fixture, task, n, tmp_path):
    from oppu.pipeline import run
    res = run(micro(tmp_path, task=task, data=str(FIX / fixture), test_users=2,
                    methods=("non_personalized", "rag", "oppu")))
    gold_ids = {g["id"] for g in json.loads((FIX / fixture / "dev_outputs.json").read_text())["golds"]}
    assert set(res.predictions["oppu"]) <= gold_ids and res.predictions["oppu"]
    assert res.info["test_users"] == 2


def test_bad_config_values_name_the_choices():
    with pytest.raises(ValueError, match="valid: lora, prompt_tuning, ia3"):
        RunConfig(peft="adalora")
    with pytest.raises(ValueError, match="non_personalized"):
        RunConfig(methods=("oppu", "magic"))
    with pytest.raises(ValueError, match="unknown RunConfig key"):
        load_config(None, nonsense=1)
    with pytest.raises(ValueError, match=r"must be >= 1: \{'tokens_per_forward': 0\}"):
        RunConfig(tokens_per_forward=0)
    with pytest.raises(ValueError, match="valid: batched, local, ray"):
        RunConfig(executor="inline")


def test_length_grouped_batches_cover_every_example_once_per_epoch():
    from oppu.engine.batching import batches
    lengths = [(i * 37) % 101 for i in range(203)]
    plain = batches(203, 8, 3, seed=5)
    grouped = batches(203, 8, 3, seed=5, lengths=lengths, bucket=4)
    for ep in grouped:
        assert sorted(i for b in ep for i in b) == list(range(203))
        assert all(len(b) <= 8 for b in ep)
    # grouping cuts padding: sum over batches of (max len * size) shrinks
    def padded(plan):
        return sum(max(lengths[i] for i in b) * len(b) for ep in plan for b in ep)
    assert padded(grouped) < 0.8 * padded(plain)
    assert batches(203, 8, 3, seed=5, lengths=lengths, bucket=4) == grouped  # deterministic


def _assert_same_adapters(dir_a: Path, dir_b: Path) -> None:
    from safetensors.torch import load_file
    names = sorted(d.name for d in dir_a.iterdir())
    assert names and names == sorted(d.name for d in dir_b.iterdir())
    for name in names:
        assert_same_module(load_file(dir_b / name / "adapter_model.safetensors"),
                           load_file(dir_a / name / "adapter_model.safetensors"), "fp32", name)


def test_pipeline_adapters_equal_the_peft_reference(lora_run, world, tmp_path):
    """The pipeline's per-user stage (the engine's batched trainer, 3 users per pass) == training
    each user alone the paper's way through PEFT (tests/peft_reference.py) on the same examples;
    every user reported, with its losses, equal to the reference's."""
    from peft_reference import peft_train_user
    from safetensors.torch import load_file

    from oppu.engine import peft_config
    from oppu.examples import history_examples
    from oppu.model.base import load_base
    from oppu.profile import make_profile_fn
    from oppu.store.files import safe_user_dir
    from oppu.tasks import get_task

    cfg = load_config(None, **{k: v for k, v in lora_run.info["config"].items() if k not in ("base_train", "user_train")})
    ucfg = type(cfg.user_train)(**lora_run.info["config"]["user_train"])
    task = get_task("LaMP_2M")
    model, tok = load_base(lora_run.info["base"]["path"])
    prof = make_profile_fn(task, "statistical")
    test, _ = load_lamp_dir(world, "LaMP_2M").split_users(3)
    users = lora_run.info["users"]
    assert sorted(users) == sorted(u.user_id for u in test)
    for u in test:
        name = safe_user_dir(u.user_id)
        exs = history_examples(task, u, ("plain", "rag", "pag"), cfg.k, cfg.retriever, prof, cfg.prompt_style)
        ref = peft_train_user(model, tok, exs, peft_config(cfg.peft, ucfg), ucfg, cfg.seed, u.user_id,
                              tmp_path / name, cfg.max_prompt_tokens)
        assert len(users[u.user_id]["losses"]) == ucfg.epochs
        assert users[u.user_id]["losses"] == pytest.approx(ref, abs=1e-5)
        assert_same_module(load_file(lora_run.out / "adapters" / name / "adapter_model.safetensors"),
                           load_file(tmp_path / name / "adapter_model.safetensors"), "fp32", name)


def test_local_executor_writes_the_same_adapters_as_in_process(lora_run, world, tmp_path):
    """--executor local (process pool, the same engine, a step in several forwards) == the
    in-process batched run."""

    from oppu.pipeline import run
    cache = str(Path(lora_run.info["base"]["path"]).parent.parent)
    res = run(micro(tmp_path, data=str(world), cache_dir=cache, executor="local", workers=2,
                    max_users_per_batch=2, tokens_per_forward=128,
                    methods=("oppu", "oppu_rag", "oppu_pag")))  # same variants
    _assert_same_adapters(lora_run.out / "adapters", res.out / "adapters")
