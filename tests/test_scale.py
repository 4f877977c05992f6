"""oppu.scale on a micro base: the process-pool ("local") and Ray executors give the adapters the
in-process batched trainer (oppu.engine.train_users, executor "batched") gives, all in one out_dir;
shard planning is a pure table."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oppu.config import UserTrainConfig
from oppu.engine import peft_config
from oppu.examples import Example
from oppu.scale import plan_shards, train_sharded
from oppu.store.files import safe_user_dir

WORDS = "alpha beta gamma delta movie drama comedy action likes the a of film rating horror story".split()
USERS = ("u1", "u2", "u/3", "u4")  # "u/3" needs a safe directory name
SEED, MAX_LEN, GROUP = 5, 48, 2
UCFG = UserTrainConfig(epochs=2, batch_size=4, lr=3e-3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from oppu.model.base import build_tiny_base
    rng = random.Random(0)
    return build_tiny_base([_text(rng, 4, 12) for _ in range(200)], tmp_path_factory.mktemp("base"), preset="micro")


@pytest.fixture(scope="module")
def data():
    """Equal example counts: the single-process run then forms the same batches as the shards."""
    rng = random.Random(1)
    return {u: [Example(_text(rng, 2, 8) + " tag:", _text(rng, 1, 2), u, "plain", str(i)) for i in range(6)]
            for u in USERS}


@pytest.fixture(scope="module")
def reference(base_dir, data, tmp_path_factory):
    from oppu.model.base import load_base
    from oppu.engine import train_users
    model, tok = load_base(base_dir)
    out = tmp_path_factory.mktemp("single")
    losses = train_users(model, tok, data, peft_config("lora", UCFG), UCFG, SEED, save_root=out, max_len=MAX_LEN,
                         max_users_per_batch=GROUP)
    return out, losses


def _assert_same_adapters(got: Path, want: Path, got_losses, want_losses) -> None:
    assert sorted(os.listdir(got)) == sorted(safe_user_dir(u) for u in USERS)  # all in one out_dir
    for u in USERS:
        a, b = load_file(str(got / safe_user_dir(u) / "adapter_model.safetensors")), \
            load_file(str(want / safe_user_dir(u) / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]) or torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (u, k)  # bitwise here
        assert (got / safe_user_dir(u) / "adapter_config.json").exists()
        assert got_losses[u] == pytest.approx(want_losses[u], rel=1e-6)


def test_local_executor_equals_single_process(base_dir, data, reference, tmp_path):
    ref_dir, ref_losses = reference
    losses = train_sharded(base_dir, None, data, peft_config("lora", UCFG), UCFG, SEED, tmp_path / "out",
                           executor="local", workers=2, max_users_per_batch=GROUP, max_len=MAX_LEN,
                           threads_per_worker=1)
    assert list(losses) == list(USERS)
    _assert_same_adapters(tmp_path / "out", ref_dir, losses, ref_losses)


def test_ray_executor_equals_single_process(base_dir, data, reference, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'ray==2.60.0'); not installed here")
    home_token = Path.home() / ".ray" / "auth_token"
    had = home_token.exists(), Path("/tmp/ray").exists()
    ref_dir, ref_losses = reference
    losses = train_sharded(base_dir, base_dir, data, peft_config("lora", UCFG), UCFG, SEED, tmp_path / "out",
                           executor="ray", workers=2, max_users_per_batch=GROUP, max_len=MAX_LEN,
                           threads_per_worker=1)
    _assert_same_adapters(tmp_path / "out", ref_dir, losses, ref_losses)
    # a private local Ray leaves no token file in ~/.ray and no /tmp/ray session behind
    assert (home_token.exists(), Path("/tmp/ray").exists()) == had
    assert "RAY_AUTH_TOKEN" not in os.environ


@pytest.mark.parametrize("sizes,group,want", [
    ({"a": 3, "b": 5, "c": 5, "d": 1}, 2, [["b", "c"], ["a", "d"]]),  # most examples first, ties keep order
    ({"a": 2, "b": 2, "c": 2}, 2, [["a", "b"], ["c"]]),
    ({"a": 1}, 16, [["a"]]),
    ({}, 4, []),
])
def test_plan_shards(sizes, group, want):
    assert plan_shards({u: [None] * n for u, n in sizes.items()}, group) == want


def test_bad_arguments_name_the_valid_choices(base_dir, data, tmp_path):
    pcfg = peft_config("lora", UCFG)
    with pytest.raises(ValueError, match="valid here: local, ray"):
        train_sharded(base_dir, None, data, pcfg, UCFG, SEED, tmp_path, executor="dask")
    with pytest.raises(ValueError, match="'batched' trains in this process: oppu.engine.train_users"):
        train_sharded(base_dir, None, data, pcfg, UCFG, SEED, tmp_path, executor="batched")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        train_sharded(base_dir, None, data, pcfg, UCFG, SEED, tmp_path, workers=0)
    with pytest.raises(ValueError, match="no training examples"):
        train_sharded(base_dir, None, {**data, "empty": []}, pcfg, UCFG, SEED, tmp_path)
    with pytest.raises(ValueError, match="executor='ray'"):
        train_sharded(base_dir, None, data, pcfg, UCFG, SEED, tmp_path, ray_address="auto")
    with pytest.raises(ValueError, match=">= 1"):
        plan_shards({"a": [1]}, 0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        train_sharded(tmp_path, None, data, pcfg, UCFG, SEED, tmp_path)
