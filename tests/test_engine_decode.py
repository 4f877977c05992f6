"""The engine's decoding and model surgery on a micro base: a mixed batch (generate_mixed,
generate(users=, mm=), greedy_rows) equals each user alone through PEFT (peft_generate and the
PeftModel's forward), slots are freed and reused without touching other users, unwrap restores the
exact base, merge_lora == PEFT's merge_and_unload, and errors name the problem."""
from __future__ import annotations

import copy

import pytest
import torch

from engine_helpers import KINDS, MAX_LEN, PROMPTS, SEED, build_base, pcfg_of, random_adapter, solo, ucfg_of
from oppu.engine import generate, generate_mixed, greedy_rows, read_adapter, tokenize_prompts, train_users
from oppu.engine.decode import stop_ids
from oppu.engine.merge import merge_lora
from oppu.engine.model import MultiUserModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from oppu.model.base import load_base
    return load_base(build_base(tmp_path_factory.mktemp("base")))


def _check_rows(model, tok, adapters: dict, users: list, n_new: int = 10):
    seqs = tokenize_prompts(tok, PROMPTS, 384)
    with MultiUserModel(model) as mm:
        for u in dict.fromkeys(u for u in users if u is not None):
            mm.add_user(u, *read_adapter(adapters[u]))
        gen, first = greedy_rows(model, seqs, users, n_new, stop_ids(tok), tok.pad_token_id, mm)
        in_mm = generate(model, tok, PROMPTS, n_new, users=users, mm=mm, batch_size=2)
    texts = generate_mixed(model, tok, PROMPTS, users, adapters, n_new, batch_size=3)
    plain = [solo(model, tok, None, p, n_new) for p in PROMPTS]
    for i, (p, u) in enumerate(zip(PROMPTS, users)):
        want_text, want_logits = solo(model, tok, adapters.get(u), p, n_new)
        assert tok.decode(gen[i], skip_special_tokens=True) == want_text == texts[i] == in_mm[i], (u, p)
        torch.testing.assert_close(first[i], want_logits, atol=1e-4, rtol=0)
    # the adapters matter: user rows differ from the plain base (logits always, text somewhere)
    for i, u in enumerate(users):
        assert (u is None) == torch.allclose(first[i], plain[i][1], atol=1e-3)
    assert any(texts[i] != plain[i][0] for i, u in enumerate(users) if u is not None)


@pytest.mark.parametrize("kind", list(KINDS))
def test_mixed_batch_rows_equal_each_user_alone(base, kind, tmp_path):
    model, tok = base
    adapters = {u: random_adapter(model, kind, i, tmp_path / f"u{i}") for i, u in enumerate(["a", "b", "c"])}
    # rows of 3 users, one row without an adapter, one user twice; prompts of different lengths
    _check_rows(model, tok, adapters, ["a", "b", None, "c", "a"])


def test_mixed_batch_of_different_peft_types(base, tmp_path):
    model, tok = base
    # LoRA users with different targets, ranks and alphas, an IA3 user, a prompt-tuning user, no user
    adapters = {k: random_adapter(model, k, i, tmp_path / k) for i, k in enumerate(KINDS)}
    _check_rows(model, tok, adapters, ["prompt", "ia3", None, "lora-qv", "lora-all"])


def test_rows_that_stop_leave_the_batch_and_the_others_decode_on_unchanged(base, tmp_path):
    """Finished rows are dropped from the decode batch (and its KV cache and row context): with stop
    tokens that end rows at different steps, every row is its unstopped text cut at its first stop."""
    model, tok = base
    adapters = {k: random_adapter(model, k, i, tmp_path / k) for i, k in enumerate(KINDS)}
    users = ["prompt", "ia3", None, "lora-qv", "lora-all"]
    seqs = tokenize_prompts(tok, PROMPTS, 384)
    with MultiUserModel(model) as mm:
        for u in dict.fromkeys(u for u in users if u is not None):
            mm.add_user(u, *read_adapter(adapters[u]))
        free, _ = greedy_rows(model, seqs, users, 12, set(), tok.pad_token_id, mm)
        stop = {free[0][2], free[3][5]}       # row 0 stops by step 2, row 3 by step 5, the rest whenever
        cut, _ = greedy_rows(model, seqs, users, 12, stop, tok.pad_token_id, mm)
        assert mm.ctx.rows == {}                                          # the row context is left clean
        again = generate(model, tok, PROMPTS, 12, users=users, mm=mm)
    want = [next((row[:i] for i, t in enumerate(row) if t in stop), row) for row in free]
    assert cut == want
    assert min(map(len, cut)) <= 2 and max(map(len, cut)) == 12     # rows left early while others went on
    assert again == generate_mixed(model, tok, PROMPTS, users, adapters, 12)


def test_an_error_in_the_prefill_leaves_the_row_context_clean(base, tmp_path):
    model, tok = base
    with MultiUserModel(model) as mm:
        mm.add_user("u", *read_adapter(random_adapter(model, "lora-qv", 0, tmp_path / "u")))
        with pytest.raises(IndexError):           # a token id past the vocabulary fails in the embedding
            greedy_rows(model, [[1, model.config.vocab_size + 3]], ["u"], 2, set(), tok.pad_token_id, mm)
        assert mm.ctx.rows == {}
        ok, _ = greedy_rows(model, [[1, 5]], ["u"], 2, set(), tok.pad_token_id, mm)   # and the next call runs
    assert len(ok[0]) == 2


def test_slots_are_freed_reused_and_grown_without_touching_other_users(base, tmp_path):
    model, tok = base
    d = {k: random_adapter(model, k, i, tmp_path / k) for i, k in enumerate(["lora-qv", "ia3", "prompt"])}
    extra = random_adapter(model, "lora-all", 7, tmp_path / "extra")
    seqs = tokenize_prompts(tok, PROMPTS[:4], 384)
    rows = ["lora-qv", "ia3", "prompt", None]

    def logits(mm, users=rows):
        return greedy_rows(model, seqs, users, 1, stop_ids(tok), tok.pad_token_id, mm)[1]

    with MultiUserModel(model) as mm:
        for u, p in d.items():  # v_proj now holds a LoRA bank and an IA3 bank, both with a user in slot 1
            mm.add_user(u, *read_adapter(p))
        ref = logits(mm)
        mm.remove_user("lora-qv")  # frees LoRA slot 1; IA3 slot 1 must stay as it is
        assert torch.equal(logits(mm, [None, "ia3", "prompt", None])[1:], ref[1:])
        assert mm.add_user("lora-qv", *read_adapter(d["lora-qv"])) == 1   # reuse slot 1,
        assert mm.add_user("extra", *read_adapter(extra)) == 2            # then grow the bank
        assert mm.users["lora-qv"].slot == 1 and mm.users["extra"].slot == 2
        assert torch.equal(logits(mm), ref)
        with pytest.raises(ValueError, match="already loaded"):
            mm.add_user("ia3", *read_adapter(d["ia3"]))


def test_unwrap_restores_the_exact_base(base, tmp_path):
    model, tok = base
    ids = torch.tensor(tokenize_prompts(tok, PROMPTS[:1], 384))
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    adapters = {"a": random_adapter(model, "lora-all", 0, tmp_path / "a"),
                "b": random_adapter(model, "ia3", 1, tmp_path / "b")}
    with MultiUserModel(model) as mm:
        for u, p in adapters.items():
            mm.add_user(u, *read_adapter(p))
        assert any(type(m).__name__ == "MultiUserLinear" for m in model.modules())
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("kind,rslora", [("lora-all", False), ("lora-qv", False), ("lora-qv", True)])
def test_merge_lora_equals_peft_merge_and_unload(base, kind, rslora, tmp_path):
    import json

    from peft import PeftModel
    model, _ = base
    d = random_adapter(model, kind, 5, tmp_path / "a")
    if rslora:  # scale alpha / sqrt(r) instead of alpha / r
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    want = PeftModel.from_pretrained(copy.deepcopy(model), str(d)).merge_and_unload().state_dict()
    mine = copy.deepcopy(model)
    config, state = read_adapter(d)
    assert merge_lora(mine, config, state) == len(state) // 2
    got = mine.state_dict()
    assert got.keys() == want.keys()
    changed = 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
        changed += not torch.equal(got[k], model.state_dict()[k])
    assert changed == len(state) // 2  # every target weight moved, nothing else


def test_errors_name_the_problem(base, tmp_path):
    model, tok = base
    from peft import LoraConfig
    with MultiUserModel(model) as mm:
        with pytest.raises(ValueError, match="use_dora"):
            mm.add_user("x", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), {})
        with pytest.raises(ValueError, match="lora_dropout"):
            mm.add_user("x", LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1), {})
        with pytest.raises(KeyError, match="not loaded"):
            mm.set_rows(["nobody"])
        assert "x" not in mm.users
    with pytest.raises(KeyError, match="no adapter directory"):
        generate_mixed(model, tok, ["a tag:"], ["ghost"], {}, 2)
    with pytest.raises(ValueError, match="no MultiUserModel"):
        greedy_rows(model, [[1, 5]], ["u"], 2, stop_ids(tok), tok.pad_token_id)
    with pytest.raises(FileNotFoundError, match="adapter_config.json missing"):
        read_adapter(tmp_path / "nothing")
    ucfg = ucfg_of("lora-qv")
    with pytest.raises(ValueError, match="no training examples"):
        train_users(model, tok, {"empty": []}, pcfg_of("lora-qv"), ucfg, SEED)
    ia3 = random_adapter(model, "ia3", 0, tmp_path / "ia3")
    from oppu.engine import Trainer
    from oppu.examples import Example
    tr = Trainer(model, tok, {"u": [Example("a tag:", "b", "u", "plain", "0")]}, pcfg_of("lora-qv"), ucfg, SEED,
                 MAX_LEN, start={"u": read_adapter(ia3)})
    with pytest.raises(ValueError, match="cannot continue a ia3 module as lora"):
        tr.run()
    assert not any(type(m).__name__ == "MultiUserLinear" for m in model.modules())  # run() closed it


def test_users_join_and_leave_a_running_trainer(base):
    """Trainer.add lets a user join between steps (one done earlier in the run too), cancel drops
    one; a one-example user finishes beside a long one, the others go on, the base comes back clean."""
    from oppu.engine import Trainer
    from oppu.examples import Example

    model, _ = base
    tok = base[1]
    done: list[str] = []

    def exs(u: str, n: int) -> list:
        return [Example(f"item {u} {i} tag:", "b", u, "plain", str(i)) for i in range(n)]

    tr = Trainer(model, tok, {}, pcfg_of("lora-qv"), ucfg_of("lora-qv"), SEED, MAX_LEN, max_users_per_batch=4,
                 on_user_done=lambda uid, losses, cfg, state: done.append(uid), reserve=4)
    try:
        tr.add("long", exs("long", 40))
        tr.add("gone", exs("gone", 40))
        tr.step()
        tr.add("short", exs("short", 1))
        while "short" not in done:
            tr.step()
        assert "long" not in done  # the short one finished first, beside the long one
        assert tr.cancel("gone") and not tr.cancel("nobody") and "gone" not in tr.mm.users
        with pytest.raises(ValueError, match="already training"):
            tr.add("long", exs("long", 1))
        tr.add("short", exs("short", 2))  # done earlier in this run: it may train again
        while tr.busy:
            tr.step()
        assert done.count("short") == 2 and "long" in done and "gone" not in done
    finally:
        tr.close()
    assert not any(type(m).__name__ == "MultiUserLinear" for m in model.modules())
