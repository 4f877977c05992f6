"""Frozen-prefix reuse (engine/prefix.py): with modules in the top layers only, the layers below run
once per training row, and training gives the same losses and modules as without reuse."""
import pytest
import torch

from conftest import assert_same_module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from oppu.data.synth import synth_world
    from oppu.data.users import load_lamp_dir
    from oppu.examples import history_examples
    from oppu.model.base import build_tiny_base, load_base
    from oppu.tasks import get_task

    d = tmp_path_factory.mktemp("w")
    synth_world("LaMP_2M", d, seed=1, test_users=2, other_users=2, min_history=5, max_history=7)
    test, _ = load_lamp_dir(d, "LaMP_2M").split_users(2)
    task = get_task("LaMP_2M")
    corpus = [task.item_doc(it) for u in test for it in u.history] * 4
    base_dir = build_tiny_base(corpus, tmp_path_factory.mktemp("b"), preset="tiny", seed=0)
    model, tok = load_base(base_dir)
    exs = {u.user_id: history_examples(task, u, ("plain", "rag"), 1, "bm25", None) for u in test}
    return model, tok, exs


def _train(model, tok, exs, reuse: bool, kind: str = "lora"):
    from oppu.config import UserTrainConfig
    from oppu.engine import Trainer, n_layers_of, peft_config

    ucfg = UserTrainConfig(epochs=3, lr=3e-3, batch_size=4, target_modules="q_proj,v_proj", top_layers=2)
    states = {}
    t = Trainer(model, tok, exs, peft_config(kind, ucfg, n_layers_of(model)), ucfg, seed=0, max_users_per_batch=1,
                tokens_per_forward=64, reuse_prefix=reuse,
                on_user_done=lambda uid, losses, config, state: states.update({uid: state}))
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        losses = t.run()
    finally:
        hook.remove()
    return losses, states, t.prefix is not None, sum(calls)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_reuse_gives_the_same_training_and_runs_the_bottom_once_per_row(setup, kind):
    model, tok, exs = setup
    assert model.config.num_hidden_layers == 4
    plain_losses, plain_states, plain_active, plain_rows = _train(model, tok, exs, False, kind)
    losses, states, active, rows = _train(model, tok, exs, True, kind)
    assert active and not plain_active
    n_rows = sum(len(v) for v in exs.values())
    assert plain_rows == 3 * n_rows      # every epoch runs layer 0 over every row
    assert rows == n_rows                 # reuse: once per row
    for uid in exs:
        assert losses[uid] == pytest.approx(plain_losses[uid], rel=1e-5)
        assert_same_module(states[uid], plain_states[uid], "fp32", f"{kind} {uid}")
        assert all(torch.isfinite(torch.tensor(losses[uid])))


def test_no_reuse_where_it_cannot_pay_or_apply(setup):
    from oppu.engine.prefix import FrozenPrefix, lowest_adapted_layer
    model, _, _ = setup
    dec = model.model
    top = ["model.layers.3.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    every = top + ["model.layers.0.self_attn.q_proj"]
    assert lowest_adapted_layer(top) == 2 and lowest_adapted_layer(every) == 0
    assert lowest_adapted_layer(["lm_head"] + top) == 0 and lowest_adapted_layer([]) == -1
    assert FrozenPrefix.for_trainer(dec, top, epochs=2, n_tokens=100) is not None
    assert FrozenPrefix.for_trainer(dec, top, epochs=1, n_tokens=100) is None      # nothing to reuse
    assert FrozenPrefix.for_trainer(dec, every, epochs=2, n_tokens=100) is None    # no frozen layer below
    assert FrozenPrefix.for_trainer(dec, [], epochs=2, n_tokens=100) is None       # prompt tuning
    assert FrozenPrefix.for_trainer(dec, top, epochs=2, n_tokens=100, budget_bytes=1000) is None  # too big


def test_ia3_top_layers_is_a_peft_module_of_the_last_layers_only(setup):
    from peft import get_peft_model

    from oppu.config import UserTrainConfig
    from oppu.engine import peft_config
    import copy
    model, _, _ = setup
    pcfg = peft_config("ia3", UserTrainConfig(top_layers=1, target_modules="q_proj"), 4)
    pm = get_peft_model(copy.deepcopy(model), pcfg)
    names = [n for n, _ in pm.named_parameters() if "ia3_l" in n]
    assert len(names) == 3 and all(".layers.3." in n for n in names), names
    assert any("down_proj" in n for n in names)
