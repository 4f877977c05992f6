"""Golden numbers: the engine's (and the PEFT reference's) losses and greedy texts on the micro base
with LoRA in fp32, pinned as numbers, so a change that moves both arms of an equality test in
tests/test_engine*.py (e.g. in the shared encoding, data order or base fixture) shows up here.

How they were obtained: this test's own code run once (torch 2.13.0+cpu, transformers 5.24.0,
peft 0.21.2, one thread), printing `losses` rounded to 4 decimals and `texts`; both arms gave the
same. If a deliberate change moves them, rerun, check the equality tests still pass, and update.
"""
from __future__ import annotations

import random

import pytest

from engine_helpers import MAX_LEN, SEED, build_base, make_data, pcfg_of, text, ucfg_of
from oppu.engine import generate_mixed, train_users
from oppu.examples import Example
from peft_reference import peft_generate, peft_train_user

# u2: 7 examples of random words (make_data(1)); fan: 12 random prompts, always answered "drama comedy",
# so its adapter changes what the base says (the plain base answers every prompt with the end token)
GOLDEN_LOSSES = {"u2": [3.2571, 3.2429], "fan": [3.1237, 2.9839]}
GOLDEN_PROMPTS = ["alpha beta tag:", "the movie was a quiet story about film tag:",
                  "plot gamma romance thriller action thriller song actor film actor tag:"]
# first-token margins over the runner-up logit 0.20, 0.37, 0.44: not a near-tie that rounding could flip
GOLDEN_TEXTS = ["drama", "drama", ""]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from oppu.model.base import load_base
    return load_base(build_base(tmp_path_factory.mktemp("base")))


def _users() -> dict[str, list[Example]]:
    rng = random.Random(7)
    fan = [Example(text(rng, 2, 8) + " tag:", "drama comedy", "fan", "plain", str(i)) for i in range(12)]
    return {"u2": make_data(1)["u2"], "fan": fan}


def test_golden_losses_and_texts_lora_fp32(base, tmp_path):
    model, tok = base
    users, ucfg = _users(), ucfg_of("lora-all")
    losses = train_users(model, tok, users, pcfg_of("lora-all"), ucfg, SEED, tmp_path / "engine", MAX_LEN)
    assert set(losses) == set(GOLDEN_LOSSES)
    for u, want in GOLDEN_LOSSES.items():
        assert losses[u] == pytest.approx(want, abs=1e-4), (u, [round(x, 4) for x in losses[u]])
        ref = peft_train_user(model, tok, users[u], pcfg_of("lora-all"), ucfg, SEED, u, tmp_path / "peft" / u, MAX_LEN)
        assert ref == pytest.approx(want, abs=1e-4), (u, "peft reference")
    texts = generate_mixed(model, tok, GOLDEN_PROMPTS, ["fan"] * 3, {"fan": tmp_path / "engine" / "fan"}, 10)
    assert texts == GOLDEN_TEXTS
    assert peft_generate(model, tok, GOLDEN_PROMPTS, tmp_path / "peft" / "fan", 10) == GOLDEN_TEXTS
    assert generate_mixed(model, tok, GOLDEN_PROMPTS, [None] * 3, {}, 10) == ["", "", ""]  # the adapter matters
