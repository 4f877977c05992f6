"""The engine's batched trainer (oppu.engine.train_users / Trainer) on a micro base equals the PEFT
reference (tests/peft_reference.py: one user at a time, PEFT alone), fresh and resumed from a saved
version, for LoRA, IA3 and prompt tuning, in fp64 (the same algorithm) and fp32 (what runs); its
files are standard PEFT files. Decoding: tests/test_engine_decode.py; units: test_engine_units.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_same_module
from engine_helpers import (CHUNK_TOKENS, MAX_LEN, PROMPTS, SEED, SIZES, TRAIN_KINDS, build_base, config_json,
                            make_data, pcfg_of, solo, tensors, ucfg_of)
from oppu.engine import Trainer, greedy_rows, initial_module, read_adapter, tokenize_prompts, train_users, write_adapter
from oppu.engine.decode import stop_ids
from oppu.engine.model import MultiUserModel
from oppu.store.files import safe_user_dir
from peft_reference import peft_train_user

ORDER = {u: 100 + i for i, u in enumerate(SIZES)}  # data-order seeds of the resumed run
FRESH_IN_RESUME = "u3"                               # trains fresh beside the resumed users

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def base(base_dir):
    from oppu.model.base import load_base
    return load_base(base_dir)


@pytest.fixture(scope="module")
def data():
    return make_data(1)


def _peft_resume(model, tok, kind: str, exs, ucfg, u: str, start: Path | None, out: Path) -> list[float]:
    """peft_train_user(start_dir=start, order_seed=ORDER[u]) (prompt tuning: PEFT's fresh module with
    the saved tensors put in by PEFT's set_peft_model_state_dict; see peft_reference)."""
    return peft_train_user(model, tok, exs, pcfg_of(kind), ucfg, SEED, u, out, MAX_LEN, start_dir=start,
                           order_seed=ORDER[u])


def _resume(model, tok, kind: str, root: Path, data2) -> dict[str, list[float]]:
    """Every user but FRESH_IN_RESUME continued from its PEFT-trained version on new data, in one
    Trainer run with FRESH_IN_RESUME trained fresh beside them; files written to root/resume."""
    start = {u: read_adapter(root / "solo" / safe_user_dir(u)) for u in SIZES if u != FRESH_IN_RESUME}

    def done(uid, losses, config, state):
        write_adapter(root / "resume" / safe_user_dir(uid), config, state, model.__dict__.get("name_or_path"))

    return Trainer(model, tok, data2, pcfg_of(kind), ucfg_of(kind), SEED, MAX_LEN, max_users_per_batch=4,
                   on_user_done=done, start=start, order_seeds=ORDER).run()


@pytest.fixture(scope="module", params=[(k, d) for d in ("fp64", "fp32") for k in TRAIN_KINDS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def trained(request, base, base_dir, data, tmp_path_factory):
    """Each kind trained by the PEFT reference user by user and by the engine 4 at once, 2 at once,
    4 at once in small forwards; then continued (Trainer(start=...)) both ways on new data.

    fp64 shows the batched algorithm is the solo one (agreement ~1e-15); fp32 is what runs."""
    from oppu.model.base import load_base
    kind, dtype = request.param
    model, tok = base if dtype == "fp32" else load_base(base_dir)
    old_default = torch.get_default_dtype()
    if dtype == "fp64":
        model.to(torch.float64)
        torch.set_default_dtype(torch.float64)  # PEFT creates its tensors in the default dtype
    try:
        ucfg, pcfg = ucfg_of(kind), pcfg_of(kind)
        root = tmp_path_factory.mktemp(f"{kind}-{dtype}")
        ref = {u: peft_train_user(model, tok, exs, pcfg, ucfg, SEED, u, root / "solo" / safe_user_dir(u), MAX_LEN)
               for u, exs in data.items()}
        multi = {g: train_users(model, tok, data, pcfg_of(kind), ucfg, SEED, root / f"g{g}", MAX_LEN,
                                max_users_per_batch=g)
                 for g in (4, 2)}
        # a step's rows in several length-sorted forwards (a 16-row step here is ~200 padded tokens)
        multi["c"] = train_users(model, tok, data, pcfg_of(kind), ucfg, SEED, root / "gc", MAX_LEN,
                                 max_users_per_batch=4, tokens_per_forward=CHUNK_TOKENS)
        init = {u: initial_module(model, pcfg_of(kind), SEED, u)[1] for u in SIZES}
        data2 = make_data(2)
        ref_resume = {u: _peft_resume(model, tok, kind, data2[u], ucfg, u,
                                      None if u == FRESH_IN_RESUME else root / "solo" / safe_user_dir(u),
                                      root / "resume-solo" / safe_user_dir(u))
                      for u in SIZES}
        resume = _resume(model, tok, kind, root, data2)
    finally:
        torch.set_default_dtype(old_default)
    return dict(kind=kind, dtype=dtype, root=root, ref=ref, multi=multi, init=init, ref_resume=ref_resume,
                resume=resume, model=(model, tok))


def _rel(dtype: str) -> float:
    # the cross-entropy runs in fp32 even on an fp64 model (as in HF), hence 1e-6 there
    return 1e-4 if dtype == "fp32" else 1e-6


def test_batched_training_equals_the_peft_reference(trained):
    t = trained
    root = t["root"]
    for g in (4, 2, "c"):
        for u in SIZES:
            a, b = root / "solo" / safe_user_dir(u), root / f"g{g}" / safe_user_dir(u)
            assert config_json(a) == config_json(b)
            assert_same_module(tensors(b), tensors(a), t["dtype"], f"{t['kind']} {t['dtype']} g={g} {u}")
            assert t["multi"][g][u] == pytest.approx(t["ref"][u], rel=_rel(t["dtype"]))
            assert len(t["multi"][g][u]) == 2
    for u in SIZES:  # training moved every user's module away from its (PEFT, seeded) initialisation
        got = tensors(root / "g4" / safe_user_dir(u))
        assert got.keys() == t["init"][u].keys()
        assert max(float((got[k] - v).abs().max()) for k, v in t["init"][u].items()) > 1e-4


def test_group_size_does_not_change_result(trained):
    t = trained
    assert t["multi"][2].keys() == t["multi"][4].keys()
    for u in SIZES:
        assert t["multi"][2][u] == pytest.approx(t["multi"][4][u], rel=_rel(t["dtype"]))
        assert_same_module(tensors(t["root"] / "g2" / safe_user_dir(u)), tensors(t["root"] / "g4" / safe_user_dir(u)),
                           t["dtype"], f"g2 vs g4 {u}")


def test_resumed_training_equals_the_peft_reference(trained):
    """Trainer(start={uid: read_adapter(dir)}, order_seeds=...) == peft_train_user(start_dir=dir, order_seed=...),
    with a fresh user in the same run."""
    t = trained
    root = t["root"]
    assert set(t["resume"]) == set(SIZES)
    for u in SIZES:
        a, b = root / "resume-solo" / safe_user_dir(u), root / "resume" / safe_user_dir(u)
        assert config_json(a) == config_json(b)
        assert_same_module(tensors(b), tensors(a), t["dtype"], f"resume {t['kind']} {t['dtype']} {u}")
        assert t["resume"][u] == pytest.approx(t["ref_resume"][u], rel=_rel(t["dtype"]))
        if u != FRESH_IN_RESUME:  # training moved it on from the saved version it started from
            was = tensors(root / "solo" / safe_user_dir(u))
            assert max(float((tensors(b)[k] - v).abs().max()) for k, v in was.items()) > 1e-5


def test_schedule_clipping_and_weight_decay_are_live(base, tmp_path):
    """lora-reg (warmup_ratio=0.1, max_grad_norm=0.3, weight_decay=0.01) equals the reference in the tests
    above; here: each of those options changes the reference's module, so that equality covers all three."""
    from dataclasses import replace
    model, tok = base
    ucfg, u = ucfg_of("lora-reg"), "u3"
    exs = make_data(1)[u]
    peft_train_user(model, tok, exs, pcfg_of("lora-reg"), ucfg, SEED, u, tmp_path / "reg", MAX_LEN)
    want = tensors(tmp_path / "reg")
    for i, off in enumerate(({"warmup_ratio": 0.0}, {"max_grad_norm": 1e9}, {"weight_decay": 0.0})):
        peft_train_user(model, tok, exs, pcfg_of("lora-reg"), replace(ucfg, **off), SEED, u, tmp_path / str(i), MAX_LEN)
        got = tensors(tmp_path / str(i))
        # measured: warm-up off moves it by 5e-3, clipping off by 3e-5, decay off by 1e-4 (far above the
        # fp64 tolerance of the equality tests, 1e-10)
        assert max(float((got[k] - v).abs().max()) for k, v in want.items()) > 1e-5, off


def test_finished_user_stops_changing(base, data, tmp_path):
    model, tok = base
    ucfg = ucfg_of("lora-qv")
    saved = {}

    def done(uid, losses, config, state):
        saved[uid] = state
        write_adapter(tmp_path / safe_user_dir(uid), config, state)

    tr = Trainer(model, tok, data, pcfg_of("lora-qv"), ucfg, SEED, MAX_LEN, max_users_per_batch=4, on_user_done=done)
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
        file = tensors(tmp_path / "u1")
        assert state_then.keys() == saved["u1"].keys() == file.keys()
        assert all(torch.equal(file[k], v) and torch.equal(saved["u1"][k], v) for k, v in state_then.items())
    finally:
        tr.close()


def test_saved_adapters_load_in_peft_and_round_trip(trained, tmp_path):
    t = trained
    model, tok = t["model"]
    dirs = {u: t["root"] / "g4" / safe_user_dir(u) for u in SIZES}
    seqs = tokenize_prompts(tok, PROMPTS[:4], 384)
    with MultiUserModel(model) as mm:
        for u, d in dirs.items():
            mm.add_user(u, *read_adapter(d))
        for u, d in dirs.items():
            out = write_adapter(tmp_path / safe_user_dir(u), mm.users[u].config, mm.user_state(u))
            a, b = tensors(d), tensors(out)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert config_json(d) == config_json(out)
        _, first = greedy_rows(model, seqs, list(SIZES), 1, stop_ids(tok), tok.pad_token_id, mm)
    for i, u in enumerate(SIZES):  # PeftModel.from_pretrained on the batched-trained files
        _, want = solo(model, tok, dirs[u], PROMPTS[i], 1)
        torch.testing.assert_close(first[i], want, atol=1e-4, rtol=0)


def test_pause_runs_between_chunks_and_changes_nothing(base, data):
    """A server's pause() (generation first) runs between a step's forward chunks and between
    encode chunks of a joining user; the losses are the same as without it, bit for bit."""
    import oppu.engine.train as train_mod

    model, tok = base
    ucfg = ucfg_of("lora-qv")
    calls = []

    def run(pause) -> dict:
        tr = Trainer(model, tok, {}, pcfg_of("lora-qv"), ucfg, SEED, MAX_LEN, max_users_per_batch=4,
                     tokens_per_forward=64, reserve=4)
        tr.pause = pause
        try:
            for u, exs in data.items():
                tr.add(u, exs)
            return tr.run()
        finally:
            tr.close()

    chunk = train_mod.ENCODE_CHUNK
    train_mod.ENCODE_CHUNK = 2
    try:
        plain, paused = run(None), run(lambda: calls.append(1))
    finally:
        train_mod.ENCODE_CHUNK = chunk
    assert paused == plain and len(calls) > len(data)
