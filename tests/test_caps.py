"""Knobs that bound the cost of a run on a real base: LoRA on the top layers only, a cap on
task-adaptation examples, and LLM profiles written in batches."""
import pytest
import torch

from oppu.data.users import load_lamp_dir


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    from oppu.data.synth import synth_world
    d = tmp_path_factory.mktemp("w")
    synth_world("LaMP_2M", d, seed=3, test_users=3, other_users=6, min_history=6, max_history=10)
    test, others = load_lamp_dir(d, "LaMP_2M").split_users(3)
    return test, others


def test_layer_choice_names_the_last_layers_and_rejects_what_it_cannot_place():
    from oppu.engine.format import layer_choice
    assert layer_choice(0, 30, ["q_proj"]) == {}
    assert layer_choice(3, 30, ["q_proj"]) == {"layers_to_transform": [27, 28, 29]}
    assert layer_choice(40, 4, ["q_proj"]) == {"layers_to_transform": [0, 1, 2, 3]}
    with pytest.raises(ValueError, match="all-linear"):
        layer_choice(2, 30, "all-linear")
    with pytest.raises(ValueError, match="n_layers"):
        layer_choice(2, None, ["q_proj"])
    with pytest.raises(ValueError, match="-1"):
        layer_choice(-1, 30, ["q_proj"])


def test_top_layers_lora_lives_only_in_the_last_layers_and_trains(tmp_path, users):
    from oppu.config import UserTrainConfig
    from oppu.engine import n_layers_of, peft_config, train_users
    from oppu.examples import history_examples
    from oppu.model.base import build_tiny_base, load_base
    from oppu.tasks import get_task

    task = get_task("LaMP_2M")
    test, _ = users
    d = build_tiny_base(["description: a b c tag: comedy"] * 50, tmp_path / "base", preset="micro")
    model, tok = load_base(d)
    n = n_layers_of(model)
    assert n and n >= 2
    ucfg = UserTrainConfig(epochs=1, target_modules="q_proj,v_proj", top_layers=1)
    exs = {test[0].user_id: history_examples(task, test[0], ("plain",), 0, "bm25", None)}
    losses = train_users(model, tok, exs, peft_config("lora", ucfg, n), ucfg, seed=0, save_root=tmp_path / "ad")
    from safetensors.torch import load_file
    from oppu.store.files import safe_user_dir
    state = load_file(str(tmp_path / "ad" / safe_user_dir(test[0].user_id) / "adapter_model.safetensors"))
    assert state and all(f"layers.{n - 1}." in k for k in state), list(state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)   # it trained
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses[test[0].user_id])


def test_base_examples_cap_samples_sources_and_keeps_the_uncapped_draws(users):
    from oppu.examples import base_examples
    from oppu.profile import make_profile_fn
    from oppu.tasks import get_task

    task = get_task("LaMP_2M")
    _, others = users
    prof = make_profile_fn(task, "statistical")
    variants = ("plain", "rag", "pag")
    full = base_examples(task, others, variants, 2, "bm25", prof, seed=5)
    n_sources = sum(len(u.history) for u in others) + sum(1 for u in others for q in u.queries if q.gold)
    assert len(full) == n_sources and len({e.source for e in full}) == n_sources
    capped = base_examples(task, others, variants, 2, "bm25", prof, seed=5, max_examples=7)
    assert len(capped) == 7
    by_src = {(e.user_id, e.source): e for e in full}
    for e in capped:  # a capped example is exactly the uncapped run's example for that source
        assert by_src[(e.user_id, e.source)] == e
    assert base_examples(task, others, variants, 2, "bm25", prof, seed=5, max_examples=10 ** 6) == full


def test_llm_profiles_are_written_in_one_batched_call_and_memoised(users):
    from oppu.examples import prefetch_profiles
    from oppu.profile import make_profile_fn
    from oppu.tasks import get_task

    calls = []

    def gen(prompts):
        calls.append(len(prompts))
        return [f"profile {len(p)}" for p in prompts]

    test, others = users
    fn = make_profile_fn(get_task("LaMP_2M"), "llm", gen, max_items=4)
    histories = [u.history for u in test + others]
    prefetch_profiles(fn, histories + histories[:2])
    assert calls == [len(histories)]           # one batched call, duplicates written once
    texts = [fn(h) for h in histories]
    assert calls == [len(histories)]           # answered from the memo
    assert fn(histories[0][-4:]) == texts[0]   # only the last max_items items reach the prompt
    fn(histories[0][:3])
    assert calls == [len(histories), 1]


def test_capped_epochs_see_every_example_once_before_any_repeats():
    from oppu.engine.batching import batches, epoch_cap
    lengths = [10 + (i * 7) % 13 for i in range(50)]
    plan = batches(50, 4, 6, seed=2, lengths=lengths, epoch_size=20)
    seen = [sorted(i for b in ep for i in b) for ep in plan]
    assert [len(s) for s in seen] == [20] * 6
    assert len(set(seen[0] + seen[1])) == 40          # two epochs: 40 distinct examples                      # two epochs: 40 distinct examples
    stream = [i for ep in plan for b in ep for i in b]
    assert sorted(set(stream)) == list(range(50))     # every example within the 120 draws
    # uncapped (or a cap at n) is the plain per-epoch shuffle, draw for draw
    assert batches(50, 4, 3, 2, lengths) == batches(50, 4, 3, 2, lengths, epoch_size=50)
    assert batches(50, 4, 3, 2, lengths) == batches(50, 4, 3, 2, lengths,
                                                  epoch_size=epoch_cap(50, max_tokens=10 ** 6, lengths=lengths))
    # a token cap: as many examples as the tokens hold at the mean length, never under one batch
    assert epoch_cap(50, max_tokens=sum(lengths) // 2, lengths=lengths, batch_size=4) == 25
    assert epoch_cap(50, max_tokens=1, lengths=lengths, batch_size=4) == 4
    assert epoch_cap(50, max_examples=30, max_tokens=sum(lengths) // 2, lengths=lengths) == 25
    assert epoch_cap(50, max_examples=10) == 10 and epoch_cap(50) == 50


def test_task_adaptation_token_cap_bounds_steps_and_reports_the_plan(tmp_path, users):
    from oppu.config import BaseTrainConfig
    from oppu.examples import base_examples
    from oppu.model.base import build_tiny_base, load_base
    from oppu.model.task_adapt import adapt_base
    from oppu.tasks import get_task

    task = get_task("LaMP_2M")
    _, others = users
    exs = base_examples(task, others, ("plain",), 0, "bm25", None, seed=0)
    runs = {}
    for cap in (0, 600):
        d = build_tiny_base([e.prompt + " " + e.target for e in exs], tmp_path / f"b{cap}", preset="micro")
        model, tok = load_base(d)
        plans = []
        _, info = adapt_base(model, tok, exs, BaseTrainConfig(epochs=3, batch_size=4, max_tokens=cap), True, 0, 128,
                             on_plan=plans.append)
        runs[cap] = info
        assert plans == [info["steps"]]
    full, capped = runs[0], runs[600]
    assert full["examples_per_epoch"] == full["examples"] == len(exs)
    assert capped["examples"] == len(exs) and capped["examples_per_epoch"] < len(exs)
    assert capped["tokens_per_epoch"] <= 600 < full["tokens_per_epoch"]
    assert capped["steps"] == 3 * -(-capped["examples_per_epoch"] // 4) < full["steps"]
    assert all(torch.isfinite(torch.tensor(x)) for x in capped["losses"]) and len(capped["losses"]) == 3
