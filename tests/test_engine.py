"""Many users at once (oppu.multi) on a micro base: batched training == one user at a time,
mixed-adapter inference == each row alone, standard PEFT files, a base restored exactly."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_module
from oppu.adapters import attach, detach, load_user, peft_config, safe_user_dir, train_user
from oppu.config import UserTrainConfig
from oppu.engine import generate, tokenize_prompts
from oppu.examples import Example
from oppu.multi import MultiUserModel, MultiUserTrainer, StackedAdamW, generate_mixed, greedy_rows, train_users

WORDS = ("alpha beta gamma delta movie drama comedy action likes the a of film rating horror romance "
         "classic thriller quiet loud story song plot actor").split()
SIZES = {"u1": 3, "u2": 7, "u3": 12, "u/4": 5}  # different lengths; "u/4" needs a safe directory name
# lora-qv: a large lora_alpha makes some users' gradients pass norm 1 on some steps, so per-user
# clipping is exercised (the other kinds stay under it); its rank differs from lora-all's
KINDS = {"lora-all": ("lora", "all-linear", {}),
         "lora-qv": ("lora", "q_proj,v_proj", {"lora_alpha": 128, "lora_r": 4}),
         "ia3": ("ia3", "all-linear", {}), "prompt": ("prompt_tuning", "all-linear", {})}
SEED, MAX_LEN = 3, 64
CHUNK_TOKENS = 40  # a few rows per forward: several forwards per step in the "chunked" training run


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A micro base, briefly trained so that its greedy text depends on the prompt (and the adapter)."""
    from oppu.config import BaseTrainConfig
    from oppu.model.base import build_tiny_base, load_base
    from oppu.model.task_adapt import adapt_base
    rng = random.Random(0)
    corpus = [_text(rng, 4, 12) for _ in range(300)]
    d = build_tiny_base(corpus, tmp_path_factory.mktemp("base"), preset="micro")
    model, tok = load_base(d)
    exs = [Example(" ".join(c.split()[:3]) + " tag:", " ".join(c.split()[3:6]), "base", "plain", str(i))
           for i, c in enumerate(corpus)]
    model, _ = adapt_base(model, tok, exs, BaseTrainConfig(epochs=2, lr=3e-3, batch_size=16), True, 0, MAX_LEN)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def base(base_dir):
    from oppu.model.base import load_base
    return load_base(base_dir)


@pytest.fixture(scope="module")
def data():
    rng = random.Random(1)
    return {u: [Example(_text(rng, 2, 10) + " tag:", _text(rng, 1, 3), u, "plain", str(i)) for i in range(n)]
            for u, n in SIZES.items()}


def _ucfg(kind: str) -> UserTrainConfig:
    return UserTrainConfig(epochs=2, batch_size=4, lr=3e-3, target_modules=KINDS[kind][1], **KINDS[kind][2])


@pytest.fixture(scope="module", params=[(k, d) for d in ("fp64", "fp32") for k in KINDS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def trained(request, base, base_dir, data, tmp_path_factory):
    """Each kind trained three ways: user by user (train_user), batched 4 at once, batched 2 at once.

    fp64 shows the batched algorithm is the solo one (agreement ~1e-15); fp32 is what runs."""
    from peft import get_peft_model_state_dict

    from oppu.model.base import load_base
    kind, dtype = request.param
    model, tok = base if dtype == "fp32" else load_base(base_dir)
    old_default = torch.get_default_dtype()
    if dtype == "fp64":
        model.to(torch.float64)
        torch.set_default_dtype(torch.float64)  # PEFT creates its tensors in the default dtype
    try:
        ucfg = _ucfg(kind)
        pcfg = peft_config(KINDS[kind][0], ucfg)
        root = tmp_path_factory.mktemp(f"{kind}-{dtype}")
        solo = {u: train_user(model, tok, exs, pcfg, ucfg, SEED, u, root / "solo" / safe_user_dir(u), MAX_LEN)
                for u, exs in data.items()}
        multi = {g: train_users(model, tok, data, peft_config(KINDS[kind][0], ucfg), ucfg, SEED, root / f"g{g}",
                                MAX_LEN, max_users_per_batch=g)
                 for g in (4, 2)}  # a fresh config each: PEFT fills some fields in on first use
        # a step's rows in several length-sorted forwards (a 16-row step here is ~200 padded tokens)
        multi["c"] = train_users(model, tok, data, peft_config(KINDS[kind][0], ucfg), ucfg, SEED, root / "gc",
                                 MAX_LEN, max_users_per_batch=4, tokens_per_forward=CHUNK_TOKENS)
        init = {}
        for u in SIZES:
            pm = attach(model, pcfg, SEED, u)
            init[u] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
            detach(pm)
    finally:
        torch.set_default_dtype(old_default)
    return kind, dtype, root, solo, multi, init, (model, tok)


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "adapter_model.safetensors"))


def _config(d: Path) -> dict:
    cfg = json.loads((d / "adapter_config.json").read_text())
    if isinstance(cfg.get("target_modules"), list):  # PEFT writes a set; its order is arbitrary
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


def test_batched_training_equals_one_user_at_a_time(trained):
    kind, dtype, root, solo, multi, init, _ = trained
    for g in (4, 2, "c"):
        for u in SIZES:
            a, b = root / "solo" / safe_user_dir(u), root / f"g{g}" / safe_user_dir(u)
            assert _config(a) == _config(b)
            assert_same_module(_tensors(b), _tensors(a), dtype, f"{kind} {dtype} g={g} {u}")
            # the cross-entropy runs in fp32 even on an fp64 model (as in HF), hence 1e-6 there
            assert multi[g][u] == pytest.approx(solo[u], rel=1e-4 if dtype == "fp32" else 1e-6)
            assert len(multi[g][u]) == 2
    for u in SIZES:  # training moved every user's module away from its (PEFT, seeded) initialisation
        got = _tensors(root / "g4" / safe_user_dir(u))
        assert max(float((got[k] - v).abs().max()) for k, v in init[u].items()) > 1e-4


def test_group_size_does_not_change_result(trained):
    _, dtype, root, _, multi, _, _ = trained
    assert multi[2].keys() == multi[4].keys()
    for u in SIZES:
        assert multi[2][u] == pytest.approx(multi[4][u], rel=1e-4 if dtype == "fp32" else 1e-6)
        assert_same_module(_tensors(root / "g2" / safe_user_dir(u)), _tensors(root / "g4" / safe_user_dir(u)),
                            dtype, f"g2 vs g4 {u}")


def test_finished_user_stops_changing(base, data, tmp_path):
    model, tok = base
    ucfg = _ucfg("lora-qv")
    tr = MultiUserTrainer(model, tok, data, peft_config("lora", ucfg), ucfg, SEED, MAX_LEN, max_users_per_batch=4,
                          save_root=tmp_path)
    try:
        snap = None
        while tr.waiting or tr.active:
            tr.step()
            if snap is None and "u1" in tr.losses:  # u1 (3 examples) finished, the others go on
                assert tr.active
                slot = tr.mm.users["u1"].slot
                snap = ([p[slot].clone() for p in tr.opt.params], [m[slot].clone() for m in tr.opt.exp_avg],
                        [v[slot].clone() for v in tr.opt.exp_avg_sq], tr.opt.steps[slot], tr.n_steps)
                state_then = tr.mm.user_state("u1")
        assert snap is not None and tr.n_steps > snap[4]
        assert all(torch.equal(p[slot], s) for p, s in zip(tr.opt.params, snap[0]))
        assert all(torch.equal(m[slot], s) for m, s in zip(tr.opt.exp_avg, snap[1]))
        assert all(torch.equal(v[slot], s) for v, s in zip(tr.opt.exp_avg_sq, snap[2]))
        assert tr.opt.steps[slot] == snap[3] == 2  # 3 examples, batch 4, 2 epochs
        saved = _tensors(tmp_path / "u1")
        assert all(torch.equal(saved[k], v) for k, v in state_then.items())
    finally:
        tr.close()


def test_stacked_adamw_matches_torch_adamw_with_clipping():
    torch.manual_seed(0)
    shapes = [(5, 3, 4), (5, 6)]  # slot axis first; slot 0 unused
    bank = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    untouched = [p.data.clone() for p in bank]
    solo = {s: [torch.nn.Parameter(p.data[s].clone()) for p in bank] for s in (1, 2, 4)}
    opts = {s: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1) for s, ps in solo.items()}
    stacked = StackedAdamW(bank, lr=0.05, weight_decay=0.1)
    for it in range(6):
        active = [1, 2, 4] if it < 3 else [2, 4] if it < 5 else [4]
        grads = [torch.randn(s) * (10.0 if it % 2 else 0.01) for s in shapes]  # some steps clip, some do not
        for p, g in zip(bank, grads):
            p.grad = g.clone()
        stacked.step(active, max_grad_norm=1.0)
        for s in active:
            for p, g in zip(solo[s], grads):
                p.grad = g[s].clone()
            torch.nn.utils.clip_grad_norm_(solo[s], 1.0)
            opts[s].step()
    for s, ps in solo.items():
        for p, b in zip(ps, bank):
            torch.testing.assert_close(b.data[s], p.data, atol=1e-6, rtol=1e-6)
    assert stacked.steps == [0, 3, 5, 0, 6]
    assert all(torch.equal(b.data[s], o[s]) for b, o in zip(bank, untouched) for s in (0, 3))  # never active



def test_row_lora_gradients_match_autograd_through_per_row_matmuls():
    """RowLoRA's hand-written backward == autograd of the plain per-row formula, fp64, incl. a repeated slot."""
    from oppu.multi.layers import RowLoRA
    torch.manual_seed(0)
    x = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=True)
    bank_a = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    bank_b = torch.randn(4, 7, 2, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.0, 2.0, 0.75, 3.0], dtype=torch.float64)
    rows = torch.tensor([1, 3, 1, 0, 2])
    g = torch.randn(5, 3, 7, dtype=torch.float64)
    got = RowLoRA.apply(x, bank_a, bank_b, scale, rows)
    grads = torch.autograd.grad(got, (x, bank_a, bank_b), g)
    want = torch.stack([(x[n] @ bank_a[s].T @ bank_b[s].T) * scale[s] for n, s in enumerate(rows.tolist())])
    ref = torch.autograd.grad(want, (x, bank_a, bank_b), g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert grads[1][0].abs().max() == 0 < grads[1][1].abs().max()  # slot 0 (scale 0) learns nothing; slot 1 does
    assert torch.autograd.gradcheck(lambda *t: RowLoRA.apply(*t, scale, rows), (x, bank_a, bank_b))


def test_length_chunks_bound_padded_tokens_and_cover_every_row():
    from oppu.multi.train import length_chunks
    from oppu.train import Encoded
    lengths = [5, 30, 7, 6, 12, 50, 8, 5]
    rows = [Encoded(tuple(range(n)), 1) for n in lengths]
    chunks = length_chunks(rows, 24)
    assert sorted(i for c in chunks for i in c) == list(range(len(rows)))
    for c in chunks:
        longest = max(lengths[i] for i in c)
        assert len(c) == 1 or len(c) * longest <= 24, c
    assert [[lengths[i] for i in c] for c in chunks] == [[5, 5, 6], [7, 8], [12], [30], [50]]
    assert length_chunks(rows, 10 ** 6) == [sorted(range(len(rows)), key=lambda i: lengths[i])]


def _random_adapter(model, kind: str, seed: int, out: Path) -> Path:
    """A user module far from identity (so users really differ), saved by PEFT itself."""
    from peft import get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(model, peft_config(KINDS[kind][0], _ucfg(kind)))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                # IA3 scales start at 1: 0.5 noise left greedy text unchanged on one CI run
                p.add_(torch.randn_like(p) * (2.0 if kind == "ia3" else 0.5))
    pm.save_pretrained(str(out))
    detach(pm)
    return out


PROMPTS = ["alpha beta tag:", "the movie was a quiet story about film tag:", "horror tag:",
           "classic thriller with a loud song and an actor tag:", "drama comedy action tag:"]


def _solo(model, tok, user_dir: Path | None, prompt: str, n: int):
    """That user alone: (greedy text, last-position logits [V]) of the PeftModel on this one prompt.

    The text comes from `oppu.engine.generate` (KV-cached HF generate) and, as the reference, from
    a cache-free greedy loop over the PeftModel's own forward. For prompt tuning only the latter:
    with peft 0.21.2 on transformers 5.24, PEFT's cached generate re-prepends the virtual tokens at
    every decoding step (it looks for `past_key_values`, which transformers now calls `cache`), so
    its text after the first token is not what the PeftModel's forward computes.
    """
    pm = load_user(model, user_dir) if user_dir else model
    is_pt = user_dir is not None and pm.peft_config["default"].is_prompt_learning
    try:
        with torch.no_grad():
            ids = tokenize_prompts(tok, [prompt], 384)[0]
            new, first = [], None
            for _ in range(n):
                x = torch.tensor([ids + new])
                logits = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float()
                first = logits if first is None else first
                if int(logits.argmax()) == tok.eos_token_id:
                    break
                new.append(int(logits.argmax()))
        text = tok.decode(new, skip_special_tokens=True)
        if not is_pt:
            assert generate(pm, tok, [prompt], n)[0] == text
    finally:
        if user_dir:
            detach(pm)
    return text, first


def _check_rows(model, tok, adapters: dict, users: list, n_new: int = 10):
    seqs = tokenize_prompts(tok, PROMPTS, 384)
    with MultiUserModel(model) as mm:
        mm.load_users({u: d for u, d in adapters.items() if u in users})
        gen, first = greedy_rows(mm, seqs, users, n_new, tok.eos_token_id, tok.pad_token_id)
    texts = generate_mixed(model, tok, PROMPTS, users, adapters, n_new, batch_size=3)
    plain = [_solo(model, tok, None, p, n_new) for p in PROMPTS]
    for i, (p, u) in enumerate(zip(PROMPTS, users)):
        want_text, want_logits = _solo(model, tok, adapters.get(u), p, n_new)
        assert tok.decode(gen[i], skip_special_tokens=True) == want_text == texts[i], (u, p)
        torch.testing.assert_close(first[i], want_logits, atol=1e-4, rtol=0)
    # the adapters matter: user rows differ from the plain base (logits always, text somewhere)
    for i, u in enumerate(users):
        assert (u is None) == torch.allclose(first[i], plain[i][1], atol=1e-3)
    assert any(texts[i] != plain[i][0] for i, u in enumerate(users) if u is not None)


@pytest.mark.parametrize("kind", list(KINDS))
def test_mixed_batch_rows_equal_each_user_alone(base, kind, tmp_path):
    model, tok = base
    adapters = {u: _random_adapter(model, kind, i, tmp_path / f"u{i}") for i, u in enumerate(["a", "b", "c"])}
    # rows of 3 users, one row without an adapter, one user twice; prompts of different lengths
    _check_rows(model, tok, adapters, ["a", "b", None, "c", "a"])


def test_mixed_batch_of_different_peft_types(base, tmp_path):
    model, tok = base
    # LoRA users with different targets, ranks and alphas, an IA3 user, a prompt-tuning user, no user
    adapters = {k: _random_adapter(model, k, i, tmp_path / k) for i, k in enumerate(KINDS)}
    _check_rows(model, tok, adapters, ["prompt", "ia3", None, "lora-qv", "lora-all"])


def test_slots_are_freed_reused_and_grown_without_touching_other_users(base, tmp_path):
    model, tok = base
    d = {k: _random_adapter(model, k, i, tmp_path / k) for i, k in enumerate(["lora-qv", "ia3", "prompt"])}
    extra = _random_adapter(model, "lora-all", 7, tmp_path / "extra")
    seqs = tokenize_prompts(tok, PROMPTS[:4], 384)
    rows = ["lora-qv", "ia3", "prompt", None]

    def logits(mm, users=rows):
        return greedy_rows(mm, seqs, users, 1, tok.eos_token_id, tok.pad_token_id)[1]

    with MultiUserModel(model) as mm:
        mm.load_users(d)  # v_proj now holds a LoRA bank and an IA3 bank, both with a user in slot 1
        ref = logits(mm)
        mm.remove_user("lora-qv")  # frees LoRA slot 1; IA3 slot 1 must stay as it is
        assert torch.equal(logits(mm, [None, "ia3", "prompt", None])[1:], ref[1:])
        mm.load_users({"lora-qv": d["lora-qv"], "extra": extra})  # reuse slot 1, then grow the bank
        assert mm.users["lora-qv"].slot == 1 and mm.users["extra"].slot == 2
        assert torch.equal(logits(mm), ref)
        with pytest.raises(ValueError, match="already loaded"):
            mm.load_users({"ia3": d["ia3"]})


def test_saved_adapters_load_in_peft_and_round_trip(trained, tmp_path):
    kind, dtype, root, _, _, _, (model, tok) = trained
    dirs = {u: root / "g4" / safe_user_dir(u) for u in SIZES}
    with MultiUserModel(model) as mm:
        mm.load_users(dirs)
        for u, d in dirs.items():
            mm.save_user(u, tmp_path / safe_user_dir(u))
            a, b = _tensors(d), _tensors(tmp_path / safe_user_dir(u))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert _config(d) == _config(tmp_path / safe_user_dir(u))
        seqs = tokenize_prompts(tok, PROMPTS[:4], 384)
        _, first = greedy_rows(mm, seqs, list(SIZES), 1, tok.eos_token_id, tok.pad_token_id)
    for i, u in enumerate(SIZES):  # PeftModel.from_pretrained on the batched-trained files
        _, want = _solo(model, tok, dirs[u], PROMPTS[i], 1)
        torch.testing.assert_close(first[i], want, atol=1e-4, rtol=0)


def test_unwrap_restores_the_exact_base(base, tmp_path):
    model, tok = base
    ids = torch.tensor(tokenize_prompts(tok, PROMPTS[:1], 384))
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    adapters = {"a": _random_adapter(model, "lora-all", 0, tmp_path / "a"),
                "b": _random_adapter(model, "ia3", 1, tmp_path / "b")}
    with MultiUserModel(model) as mm:
        mm.load_users(adapters)
        assert any(type(m).__name__ == "MultiUserLinear" for m in model.modules())
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_errors_name_the_problem(base, tmp_path):
    model, tok = base
    from peft import LoraConfig
    with MultiUserModel(model) as mm:
        with pytest.raises(ValueError, match="use_dora"):
            mm.add_user("x", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), {})
        with pytest.raises(KeyError, match="not loaded"):
            mm.set_rows(["nobody"])
    with pytest.raises(KeyError, match="no adapter directory"):
        generate_mixed(model, tok, ["a tag:"], ["ghost"], {}, 2)
    ucfg = _ucfg("lora-qv")
    with pytest.raises(ValueError, match="no training examples"):
        train_users(model, tok, {"empty": []}, peft_config("lora", ucfg), ucfg, SEED)
