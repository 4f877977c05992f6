"""Engine pieces without a model: StackedAdamW == torch AdamW per slot, RowLoRA's hand-written
backward == autograd, length_chunks, and kind_of refusing what the engine cannot run."""
from __future__ import annotations

import pytest
import torch

from oppu.engine.batching import Encoded, length_chunks
from oppu.engine.kinds import kind_of
from oppu.engine.lora import RowLoRA
from oppu.engine.optim import StackedAdamW

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_stacked_adamw_matches_torch_adamw_with_clipping():
    torch.manual_seed(0)
    shapes = [(5, 3, 4), (5, 6)]  # slot axis first; slot 0 unused
    bank = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    untouched = [p.data.clone() for p in bank]
    lrs = {1: 0.05, 2: 0.02, 4: 0.1}  # each slot its own learning rate
    solo = {s: [torch.nn.Parameter(p.data[s].clone()) for p in bank] for s in lrs}
    opts = {s: torch.optim.AdamW(ps, lr=lrs[s], weight_decay=0.1) for s, ps in solo.items()}
    stacked = StackedAdamW(bank, weight_decay=0.1)
    for it in range(6):
        active = [1, 2, 4] if it < 3 else [2, 4] if it < 5 else [4]
        grads = [torch.randn(s) * (10.0 if it % 2 else 0.01) for s in shapes]  # some steps clip, some do not
        for p, g in zip(bank, grads):
            p.grad = g.clone()
        norms = stacked.step(active, [lrs[s] for s in active], max_grad_norm=1.0)
        for s, n in zip(active, norms.tolist()):
            for p, g in zip(solo[s], grads):
                p.grad = g[s].clone()
            assert float(torch.nn.utils.clip_grad_norm_(solo[s], 1.0)) == pytest.approx(n, rel=1e-6)
            opts[s].step()
    for s, ps in solo.items():
        for p, b in zip(ps, bank):
            torch.testing.assert_close(b.data[s], p.data, atol=1e-6, rtol=1e-6)
    assert stacked.steps == [0, 3, 5, 0, 6]
    assert all(torch.equal(b.data[s], o[s]) for b, o in zip(bank, untouched) for s in (0, 3))  # never active


def test_stacked_adamw_reset_starts_a_slot_afresh():
    torch.manual_seed(1)
    bank = [torch.nn.Parameter(torch.randn(3, 4))]
    stacked = StackedAdamW(bank)
    for _ in range(3):
        bank[0].grad = torch.randn(3, 4)
        stacked.step([1, 2], [0.1, 0.1], max_grad_norm=None)
    stacked.reset(1)
    assert stacked.steps == [0, 0, 3]
    assert stacked.exp_avg[0][1].abs().max() == 0 == stacked.exp_avg_sq[0][1].abs().max()
    assert stacked.exp_avg[0][2].abs().max() > 0
    with pytest.raises(ValueError, match="no parameters"):
        StackedAdamW([])


def test_row_lora_gradients_match_autograd_through_per_row_matmuls():
    """RowLoRA's hand-written backward == autograd of the plain per-row formula, fp64, incl. a repeated slot."""
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
    lengths = [5, 30, 7, 6, 12, 50, 8, 5]
    rows = [Encoded(tuple(range(n)), 1) for n in lengths]
    chunks = length_chunks(rows, 24)
    assert sorted(i for c in chunks for i in c) == list(range(len(rows)))
    for c in chunks:
        longest = max(lengths[i] for i in c)
        assert len(c) == 1 or len(c) * longest <= 24, c
    assert [[lengths[i] for i in c] for c in chunks] == [[5, 5, 6], [7, 8], [12], [30], [50]]
    assert length_chunks(rows, 10 ** 6) == [sorted(range(len(rows)), key=lambda i: lengths[i])]


def test_kind_of_names_the_type_and_the_option_it_refuses():
    from peft import IA3Config, LoHaConfig, LoraConfig, PromptTuningConfig
    assert kind_of(LoraConfig(r=2, target_modules=["q_proj"])) == "lora"
    assert kind_of(IA3Config(target_modules=["k_proj"], feedforward_modules=[])) == "ia3"
    assert kind_of(PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")) == "prompt_tuning"
    with pytest.raises(ValueError, match="use_dora"):
        kind_of(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="lora_dropout=0.1"):
        kind_of(LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1))
    with pytest.raises(ValueError, match="modules_to_save"):
        kind_of(IA3Config(target_modules=["k_proj"], feedforward_modules=[], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="unsupported PEFT type 'LOHA'; valid: LORA, IA3, PROMPT_TUNING"):
        kind_of(LoHaConfig(r=2, target_modules=["q_proj"]))
