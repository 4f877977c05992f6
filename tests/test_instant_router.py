"""The instant router (oppu.instant.router): its features are the output error times the final hidden
state of one forward, whatever the chunking; the ridge fit learns a planted ranking, picks its penalty
by cross-validation and is pinned; save/load round-trips; a scorer's affinities are a function of the
user's own examples only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import build_base, make_data
from oppu.engine import encode
from oppu.instant.router import Router, RouterScorer, fit_router, probe_features, topk_agreement

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from oppu.model.base import load_base
    return load_base(build_base(tmp_path_factory.mktemp("base")))


def _manual_features(model, tok, examples) -> np.ndarray:
    """mean_t (W_head^T (softmax - onehot)) h_t^T over target tokens, one example at a time, from the
    HF model's own outputs (hidden_states[-1] is after the final norm; logits from the model)."""
    acc, n = torch.zeros(model.config.hidden_size, model.config.hidden_size, dtype=torch.float64), 0
    for e in encode(tok, examples, 64):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([e.ids]), output_hidden_states=True)
        w = model.lm_head.weight.detach().double()
        for c in range(len(e.ids) - 1):
            if c + 1 < e.n_prompt:
                continue
            p = out.logits[0, c].double().softmax(-1)
            p[e.ids[c + 1]] -= 1.0
            acc += torch.outer(p @ w, out.hidden_states[-1][0, c].double())
            n += 1
    return (acc / n).flatten().numpy()


def test_probe_features_are_the_output_error_times_the_final_hidden_state(base):
    model, tok = base
    exs = make_data()["u2"]
    got = probe_features(model, tok, exs, 64)
    np.testing.assert_allclose(got, _manual_features(model, tok, exs), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probe_features(model, tok, exs, 64, tokens_per_forward=20), got, rtol=1e-4, atol=1e-7)
    assert got.shape == (model.config.hidden_size ** 2,) and np.abs(got).max() > 1e-3
    assert not probe_features(model, tok, [], 64).any()                 # no target token: zeros


def _planted(n: int, seed: int):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 30))
    m = rng.normal(size=(30, 12))
    return f, f @ m + 0.1 * rng.normal(size=(n, 12))


def test_fit_router_learns_a_planted_ranking_and_is_pinned(tmp_path):
    f, a = _planted(80, 0)
    router = fit_router(f[:60], a[:60], top_ks=(1, 4))
    held = np.stack([router.predict(x) for x in f[60:]])
    assert topk_agreement(held, a[60:], 4) >= 0.85                      # unseen users ranked like the truth
    mean_only = np.tile(a[:60].mean(0), (20, 1))
    assert topk_agreement(mean_only, a[60:], 4) < 0.6                    # the user signal is what it learned
    assert router.penalty == 0.003 and router.info["users"] == 60        # the least penalty on a clean linear map
    np.testing.assert_allclose(held[0, :3], [-4.242883, -7.477860, -6.477244], atol=1e-5)
    router.save(tmp_path / "r.npz")
    again = Router.load(tmp_path / "r.npz")
    assert again.penalty == router.penalty and np.array_equal(again.predict(f[61]), router.predict(f[61]))
    with pytest.raises(ValueError, match="at least 4 training users"):
        fit_router(f[:3], a[:3], top_ks=(1,))
    with pytest.raises(ValueError, match="router features have 29 dims"):
        router.predict(f[0, :29])


def test_router_scorer_is_a_function_of_the_users_own_examples(base):
    model, tok = base
    data = make_data()
    users = list(data)
    feats = np.stack([probe_features(model, tok, data[u], 64) for u in users])
    rng = np.random.default_rng(1)
    router = Router(feats.mean(0), feats.std(0) + 1e-3, rng.normal(size=(feats.shape[1], 6)), np.zeros(6), 0.1)
    with RouterScorer(model, tok, router, 64) as sc:
        first = [sc.affinities(data[u]) for u in users]
        later = [sc.affinities(data[u]) for u in reversed(users)][::-1]
        assert not sc.affinities([]).any()
    assert all(np.array_equal(x, y) for x, y in zip(first, later))
    assert not np.allclose(first[0], first[1])                          # different users, different rankings


@pytest.mark.parametrize("floor", [0.0, 1.01])
def test_a_bank_learns_its_router_once_and_refuses_one_that_disagrees_with_the_gradient(base, tmp_path, floor):
    """open_router: learned from the pool's gradient rankings and cached (a second bank reuses the file);
    with router_min_agreement above its cross-validated agreement the bank ranks by the gradient."""
    import dataclasses
    from types import SimpleNamespace

    from engine_helpers import random_adapter
    from oppu.config import RunConfig
    from oppu.data.users import User
    from oppu.engine import read_adapter
    from oppu.instant.bank import Bank, open_router

    model, tok = base
    data = make_data()
    modules = [read_adapter(random_adapter(model, "lora-qv", i, tmp_path / f"m{i}")) for i in range(3)]
    pool = [User(f"p{i}", [{"id": str(j), "text": e.prompt, "target": e.target} for j, e in enumerate(exs)], [])
            for i, exs in enumerate(list(data.values()) * 2)]
    by_text = {e.prompt: e for exs in data.values() for e in exs}
    cfg = RunConfig(instant=dataclasses.replace(RunConfig().instant, router_min_agreement=floor), max_prompt_tokens=64)
    logs: list[str] = []
    s = SimpleNamespace(cfg=cfg, model=model, tok=tok, log=logs.append)

    def fresh() -> Bank:
        return Bank(None, ["a", "b", "c"], modules, None, None, select="router",
                    probe_fn=lambda items: [by_text[it["text"]] for it in items[-4:]])
    bank = fresh()
    open_router(s, bank, tmp_path, pool)
    again = fresh()
    open_router(s, again, tmp_path, pool)
    assert sum("learning the bank's router" in m for m in logs) == 1 and len(list(tmp_path.glob("router-*.npz"))) == 1
    assert bank.info["router"]["users"] == 8 and 0 <= bank.info["router"]["agreement"] <= 1
    if floor == 0.0:
        assert bank.select == "router" and again.router is not None
        assert np.array_equal(bank.router.w, again.router.w)
    else:
        assert bank.select == again.select == "grad" and bank.router is None
        assert "router_min_agreement" in bank.info["router_rejected"]
