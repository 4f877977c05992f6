"""oppu.engine.cache: a byte-bounded LRU of adapter tensors that never serves a file changed on disk,
and bf16 storage that PEFT and MultiUserModel read back; oppu.engine.serving.Slots: users kept
loaded (LRU past max_loaded, reloaded when their key changes). Adapters are written by hand in the
PEFT file format (no model needed) except where a micro base is used (made by oppu.engine)."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oppu.engine.cache import AdapterCache, fingerprint, save_adapter_as, save_adapter_bf16, tensor_bytes

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_lora(d: Path, rank: int, fill: float = 1.0, hidden: int = 16) -> Path:
    """A LoRA adapter in the PEFT format: rank * hidden * 2 fp32 tensors = 128 * rank bytes at hidden 16."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": ["q_proj"], "base_model_name_or_path": None}))
    save_file({f"{PREFIX}.lora_A.weight": torch.full((rank, hidden), fill),
               f"{PREFIX}.lora_B.weight": torch.full((hidden, rank), fill)},
              str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


def nbytes(rank: int, hidden: int = 16) -> int:
    return 2 * rank * hidden * 4


def test_hit_miss_counters_and_tensors(tmp_path):
    d = write_lora(tmp_path / "u1", 4, fill=0.5)
    cache = AdapterCache(max_bytes=10_000)
    cfg, t = cache.get(d)
    assert cfg.r == 4 and str(getattr(cfg.peft_type, "value", cfg.peft_type)) == "LORA"
    assert torch.equal(t[f"{PREFIX}.lora_A.weight"], torch.full((4, 16), 0.5))
    cfg2, t2 = cache.get(str(d))            # same dir given as str: the same entry
    assert t2 is t and cfg2 is cfg
    assert cache.stats() == {"hits": 1, "misses": 1, "evictions": 0, "reloads": 0, "rejected": 0, "entries": 1,
                             "bytes": nbytes(4), "max_bytes": 10_000}
    assert d in cache and len(cache) == 1 and cache.nbytes == tensor_bytes(t) == nbytes(4)


def test_byte_bound_and_lru_order(tmp_path):
    dirs = {i: write_lora(tmp_path / f"u{i}", 4) for i in range(4)}  # 512 bytes each
    cache = AdapterCache(max_bytes=3 * nbytes(4))                   # room for three
    for i in (0, 1, 2):
        cache.get(dirs[i])
    cache.get(dirs[0])                                              # 0 is now the most recent
    assert cache.keys() == [AdapterCache.key(dirs[i]) for i in (1, 2, 0)]
    cache.get(dirs[3])                                              # evicts 1, the least recently used
    assert dirs[1] not in cache and all(dirs[i] in cache for i in (0, 2, 3))
    assert cache.nbytes <= cache.max_bytes and cache.stats()["evictions"] == 1
    big = write_lora(tmp_path / "big", 8)                            # 1024 bytes: forces two evictions
    cache.get(big)
    assert cache.keys() == [AdapterCache.key(d) for d in (dirs[3], big)]
    assert cache.nbytes == nbytes(4) + nbytes(8) <= cache.max_bytes
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 5, 3)


def test_entry_larger_than_the_bound_is_served_not_cached(tmp_path):
    d = write_lora(tmp_path / "huge", 16)
    cache = AdapterCache(max_bytes=nbytes(16) - 1)
    _, t = cache.get(d)
    assert t and len(cache) == 0 and cache.nbytes == 0 and cache.stats()["rejected"] == 1


def test_changed_file_is_reloaded(tmp_path):
    d = write_lora(tmp_path / "u", 4, fill=1.0)
    cache = AdapterCache(max_bytes=10_000)
    cache.get(d)
    before = (d / "adapter_model.safetensors").stat().st_mtime_ns
    write_lora(d, 4, fill=2.0)                                      # retrained: same size, new content
    os.utime(d / "adapter_model.safetensors", ns=(before + 10**9, before + 10**9))  # a later write, 1 s on
    _, t = cache.get(d)
    assert torch.equal(t[f"{PREFIX}.lora_A.weight"], torch.full((4, 16), 2.0))
    s = cache.stats()
    assert (s["hits"], s["misses"], s["reloads"], s["entries"], s["bytes"]) == (0, 2, 1, 1, nbytes(4))
    write_lora(d, 8)                                                # a size change is seen whatever the mtime
    assert cache.get(d)[0].r == 8 and cache.stats()["reloads"] == 2


def test_sha256_mode_sees_a_change_with_an_unchanged_stat(tmp_path):
    d = write_lora(tmp_path / "u", 4, fill=1.0)
    st = (d / "adapter_model.safetensors").stat()
    cache = AdapterCache(max_bytes=10_000, verify="sha256")
    cache.get(d)
    write_lora(d, 4, fill=3.0)
    os.utime(d / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, same size
    assert torch.equal(cache.get(d)[1][f"{PREFIX}.lora_B.weight"], torch.full((16, 4), 3.0))
    assert cache.stats()["reloads"] == 1
    assert cache.get(d) and cache.stats()["hits"] == 1
    with pytest.raises(ValueError, match="valid: stat, sha256"):
        fingerprint(d, "md5")


def test_invalidate_clear_and_bf16_in_memory(tmp_path):
    d = write_lora(tmp_path / "u", 4, fill=1.0 / 3)
    cache = AdapterCache(max_bytes=10_000, dtype=torch.bfloat16)
    _, t = cache.get(d)
    assert all(v.dtype == torch.bfloat16 for v in t.values()) and cache.nbytes == nbytes(4) // 2
    assert cache.invalidate(d) and not cache.invalidate(d) and len(cache) == 0
    cache.get(d)
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_concurrent_gets_keep_the_books_straight(tmp_path):
    dirs = [write_lora(tmp_path / f"u{i}", 4) for i in range(6)]
    cache = AdapterCache(max_bytes=4 * nbytes(4))

    def worker(k):
        for j in range(30):
            cache.get(dirs[(j * (k + 1)) % len(dirs)])
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = cache.stats()
    assert s["hits"] + s["misses"] == 120 and s["bytes"] == s["entries"] * nbytes(4) <= s["max_bytes"]


def test_bf16_storage_halves_the_file_and_loads_back(tmp_path):
    src = write_lora(tmp_path / "u", 4, fill=1.0 / 3)
    dst = save_adapter_bf16(src, tmp_path / "u-bf16")
    a, b = load_file(str(src / "adapter_model.safetensors")), load_file(str(dst / "adapter_model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in b.values())
    assert all(torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a)
    assert (dst / "adapter_config.json").read_text() == (src / "adapter_config.json").read_text()
    assert tensor_bytes(b) * 2 == tensor_bytes(a)
    save_adapter_as(src, torch.bfloat16)                            # in place, atomically
    assert load_file(str(src / "adapter_model.safetensors"))[f"{PREFIX}.lora_A.weight"].dtype == torch.bfloat16
    assert not [p for p in src.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """(model, tok) of an untrained micro base (hidden size 64)."""
    import random

    from oppu.model.base import build_tiny_base, load_base
    rng = random.Random(0)
    words = "alpha beta gamma delta movie drama tag".split()
    d = build_tiny_base([" ".join(rng.choices(words, k=8)) for _ in range(50)], tmp_path_factory.mktemp("base"),
                        preset="micro")
    return load_base(d)


def engine_lora(model, out: Path, seed: int, shift: float, rank: int = 4) -> Path:
    """A LoRA made by oppu.engine (PEFT's seeded start, moved by `shift`), written in the PEFT format."""
    from oppu.config import UserTrainConfig
    from oppu.engine import initial_module, peft_config, write_adapter
    config, state = initial_module(model, peft_config("lora", UserTrainConfig(lora_r=rank)), seed, "u")
    return write_adapter(out, config, {k: v + shift for k, v in state.items()})


def test_bf16_adapter_plugs_into_peft_and_multi_user_model(micro, tmp_path):
    """A bf16-stored adapter is read by PeftModel.from_pretrained and MultiUserModel into fp32 tensors."""
    from peft import PeftModel, get_peft_model_state_dict

    from oppu.engine import MultiUserModel
    from peft_reference import peft_detach

    model, _ = micro
    engine_lora(model, tmp_path / "u", 0, 0.1)
    want = load_file(str(tmp_path / "u" / "adapter_model.safetensors"))
    pm = PeftModel.from_pretrained(model, str(tmp_path / "u"))   # the fp32 file, as PEFT reads it
    assert all(torch.equal(v, want[k]) for k, v in get_peft_model_state_dict(pm).items())
    peft_detach(pm)
    save_adapter_bf16(tmp_path / "u", tmp_path / "u16")
    pm = PeftModel.from_pretrained(model, str(tmp_path / "u16"))
    got = get_peft_model_state_dict(pm)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k].to(torch.bfloat16).float()) for k in want)
    peft_detach(pm)
    cache = AdapterCache(max_bytes=1 << 20)
    with MultiUserModel(model) as mm:
        mm.add_user("u", *cache.get(tmp_path / "u16"))
        state = mm.user_state("u")
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], got[k]) for k in want)


def test_serving_slots_reload_evict_drop_and_check(micro, tmp_path):
    from oppu.engine import read_adapter
    from oppu.engine.serving import CHECK_USER, Slots

    model, _ = micro
    a1, a2, b, c = (engine_lora(model, tmp_path / n, i, 0.1 * (i + 1)) for i, n in enumerate(["a1", "a2", "b", "c"]))
    on_disk = {d: read_adapter(d)[1] for d in (a1, a2, b, c)}
    cache = AdapterCache(max_bytes=1 << 20)
    slots = Slots(model, max_loaded=2, cache=cache)
    try:
        def holds(uid, d):
            state = slots.mm.user_state(uid)
            return state.keys() == on_disk[d].keys() and all(torch.equal(state[k], on_disk[d][k]) for k in state)

        slots.ensure("a", key=1, path=a1)
        assert holds("a", a1) and slots.key("a") == 1 and len(slots) == 1
        misses, slot = cache.stats()["misses"], slots.mm.users["a"].slot
        slots.ensure("a", key=1, path=a2)                  # same key: kept as loaded, no read at all
        assert holds("a", a1) and cache.stats()["misses"] == misses and cache.stats()["hits"] == 0
        slots.ensure("a", key=2, path=a2)                  # new key (a new version): reloaded
        assert holds("a", a2) and slots.key("a") == 2 and slots.mm.users["a"].slot == slot
        slots.ensure("b", key=1, path=b)
        slots.ensure("a", key=2, path=a2)                  # touch a: b is now the least recently used
        slots.ensure("c", key=1, path=c)                   # past max_loaded: b evicted
        assert set(slots.mm.users) == {"a", "c"} and slots.key("b") is None and len(slots) == 2
        assert holds("a", a2) and holds("c", c)
        hits = cache.stats()["hits"]
        slots.ensure("b", key=1, path=b)                   # back from the cache, no disk read; a evicted
        assert cache.stats()["hits"] == hits + 1 and set(slots.mm.users) == {"b", "c"} and holds("b", b)
        slots.drop("c")
        slots.drop("nobody")                               # dropping an unknown user is a no-op
        assert set(slots.mm.users) == {"b"} and slots.key("c") is None

        slots.check(a1)                                    # fits: loads and unloads, leaves no user behind
        bad = write_lora(tmp_path / "bad", 4, hidden=16)   # q_proj of a hidden-16 model; this base has 64
        with pytest.raises((RuntimeError, ValueError)):
            slots.check(bad)
        assert CHECK_USER not in slots.mm.users and set(slots.mm.users) == {"b"} and holds("b", b)
        slots.ensure("a", key=3, path=a1)                  # the slot the failed check took is usable again
        assert holds("a", a1) and holds("b", b)
        with pytest.raises(ValueError, match=">= 1"):
            Slots(model, max_loaded=0)
    finally:
        slots.close()
    assert not any(type(m).__name__ == "MultiUserLinear" for m in model.modules())
