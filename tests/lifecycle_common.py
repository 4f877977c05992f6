"""Shared pieces of the lifecycle tests (tests/test_lifecycle*.py): a micro base, a store-backed
Personalizer over it, synthetic LaMP_2M history items, and checks that the base is left clean."""
from __future__ import annotations

import random

import pytest
import torch

from oppu.config import UserTrainConfig
from oppu.personalizer import Personalizer
from oppu.store import AdapterStore
from oppu.tasks import get_task

TASK = get_task("LaMP_2M")
WORDS = "space robot love city war dream ship crime family future past king magic detective".split()
PASS = "correct horse battery staple"
UCFG = UserTrainConfig(epochs=2, batch_size=4, lr=5e-3)
SEED, MAX_LEN = 0, 128


def make_items(prefix: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{prefix}{i}", "description": " ".join(rng.choice(WORDS) for _ in range(8)),
             "tag": rng.choice(TASK.labels[:4])} for i in range(n)]


def query(desc: str) -> str:
    return TASK.instruction.format(description=desc)


QUERIES = [query("space robot war ship"), query("love family dream"), query("crime detective city king")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from oppu.model.base import build_tiny_base, load_base

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only contend
    d = tmp_path_factory.mktemp("base")
    corpus = [TASK.render_item(it) for it in make_items("c", 60, 0)] + [" ".join(TASK.labels)]
    build_tiny_base(corpus, d / "base", preset="micro")
    model, tok = load_base(d / "base")
    yield model, tok
    torch.set_num_threads(threads)


@pytest.fixture
def p(base, tmp_path):
    model, tok = base
    store = AdapterStore(tmp_path / "store")
    p = Personalizer(model, tok, "LaMP_2M", UCFG, peft="lora", seed=SEED, k=2, max_len=MAX_LEN, store=store)
    yield p
    p.close()  # the serving slots give the base its plain modules back
    store.close()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_clean(p: Personalizer, snap) -> None:
    """The base's own weights are unchanged and no PEFT layer is left in it. The serving slots keep
    their wrappers between answers, so the base is looked at with them taken out."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with p.lock, p.slots.mm.detached() as model:
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")
        sd = model.state_dict()
        assert sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in sd)


def weights(p: Personalizer, uid: str, version: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(p.store.read_version_files(uid, version)["adapter_model.safetensors"])


def trained_user(p: Personalizer, uid: str | None = None, n_old: int = 8, n_new: int = 4, seed: int = 1) -> str:
    uid = p.store.create_user(uid) if uid else p.store.new_user()
    p.add_history(uid, "LaMP_2M", make_items("o", n_old, seed))
    p.train(uid)
    p.add_history(uid, "LaMP_2M", make_items("n", n_new, seed + 1))
    p.update(uid, replay=0.5)
    return uid


def peft_answers(p: Personalizer, uid: str, version: int, inputs, k: int | None = None) -> list[str]:
    """The reference: the version's files through PEFT's own model and HF generate, one prompt at a time,
    on the same prompts the Personalizer builds."""
    from peft_reference import peft_generate

    prompts = [p.user_prompt(uid, x, k) for x in inputs]
    d = p.store.verify(uid, version)
    with p.lock, p.slots.mm.detached() as model:
        return peft_generate(model, p.tok, prompts, d, TASK.max_new_tokens, max_prompt_tokens=MAX_LEN)
