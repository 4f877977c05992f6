"""oppu.plan's formulas against the real things: parameter counts of SmolLM2 (its config, built on the
meta device) and the tiny base, adapter tensors of real PEFT modules, bytes of real saved adapter
files, the FLOPs benchmarks/train_users.py counts for `mfu`; docs/scaling.md carries the tables
`python -m oppu.plan_tables` prints. Seconds: nothing is trained, the big models hold no memory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from oppu.config import UserTrainConfig
from oppu.plan import (LLAMA2_7B, LLAMA2_7B_PARAMS, PREFIX_BUDGET_BYTES, Adapter, Arch, Workload, adapter_file_bytes,
                       adapter_params, adapter_tensors, arch_of, linear_params, safetensors_bytes, total_params,
                       train_flops)
from oppu.plan_tables import SMOLLM2

ROOT = Path(__file__).resolve().parents[1]
KINDS = {  # plan Adapter -> (oppu kind, UserTrainConfig fields) as oppu.engine.format.peft_config builds it
    "lora-qv": (Adapter("lora"), "lora", {"target_modules": "q_proj,v_proj"}),
    "lora-all": (Adapter("lora", r=4, targets=("all-linear",)), "lora", {"lora_r": 4}),
    "lora-top": (Adapter("lora", top_layers=1), "lora", {"target_modules": "q_proj,v_proj", "top_layers": 1}),
    "ia3": (Adapter("ia3"), "ia3", {}),
    "ia3-top": (Adapter("ia3", top_layers=1), "ia3", {"top_layers": 1}),
    "prompt": (Adapter("prompt_tuning", virtual_tokens=5), "prompt_tuning", {"num_virtual_tokens": 5}),
}


def linear_weights(model) -> int:  # benchmarks/_common.py matmul_params
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.fixture(scope="module")
def smol_config():
    from transformers import AutoConfig

    from oppu.model.base import resolve_base_path
    return AutoConfig.from_pretrained(resolve_base_path("smollm2", os.environ.get("OPPU_CACHE") or None))


@pytest.fixture
def smol_meta(smol_config):
    """SmolLM2 on the meta device: real module shapes, no memory (fresh per test: PEFT edits it in place)."""
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(smol_config)


def tiny_model(vocab=300, layers=2, kv_heads=2, tied=True, device=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        return LlamaForCausalLM(cfg)


def peft_state(model, name):
    from peft import get_peft_model, get_peft_model_state_dict

    from oppu.engine.format import peft_config
    ad, kind, fields = KINDS[name]
    pm = get_peft_model(model, peft_config(kind, UserTrainConfig(**fields), model.config.num_hidden_layers))
    if kind == "prompt_tuning" and model.device.type == "meta":  # PEFT copies its prompt to the CPU here
        return ad, pm, {"prompt_embeddings": pm.prompt_encoder["default"].embedding.weight}
    return ad, pm, get_peft_model_state_dict(pm)


def test_parameter_counts_of_smollm2_the_tiny_base_and_llama2_7b(smol_meta):
    from transformers import LlamaConfig, LlamaForCausalLM

    from oppu.model.base import PRESETS
    arch = arch_of(smol_meta.config)
    assert arch == SMOLLM2  # the tables' constant is the real config
    assert total_params(arch) == sum(p.numel() for p in smol_meta.parameters()) == 134_515_008
    assert linear_params(arch) == linear_weights(smol_meta) == 134_479_872
    p = PRESETS["tiny"]
    for vocab, tied in ((982, True), (2048, False)):  # 982: the tokenizer of docs/benchmarks.md's tiny base
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                          num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
                          num_key_value_heads=p.num_attention_heads, tie_word_embeddings=tied,
                          attention_bias=not tied, mlp_bias=not tied)
        with torch.device("meta"):
            m = LlamaForCausalLM(cfg)
        assert total_params(arch_of(cfg)) == sum(p.numel() for p in m.parameters())
        assert linear_params(arch_of(cfg)) == linear_weights(m) == {982: 977_664, 2048: 1_114_112}[vocab]
    assert total_params(LLAMA2_7B) == LLAMA2_7B_PARAMS
    assert adapter_params(LLAMA2_7B, Adapter("lora")) == 4_194_304
    assert adapter_params(LLAMA2_7B, Adapter("ia3")) == 614_400


@pytest.mark.parametrize("name", list(KINDS))
def test_adapter_tensors_are_peft_modules(name, smol_meta):
    ad, pm, state = peft_state(smol_meta, name)
    want = {k: tuple(v.shape) for k, v in state.items()}
    assert adapter_tensors(SMOLLM2, ad) == want
    if ad.kind != "prompt_tuning":
        assert adapter_params(SMOLLM2, ad) == pm.get_nb_trainable_parameters()[0]


def test_pinned_smollm2_adapter_sizes():
    assert adapter_params(SMOLLM2, Adapter("lora")) == 460_800
    assert adapter_params(SMOLLM2, Adapter("ia3")) == 57_600
    assert adapter_params(SMOLLM2, Adapter("prompt_tuning")) == 4_608
    assert adapter_file_bytes(SMOLLM2, Adapter("lora"), 2) == 937_176


def test_the_tiny_bases_measured_adapter_bytes():
    """docs/benchmarks.md's adapter_io table (files the engine wrote for the tiny base), to the byte."""
    from oppu.model.base import PRESETS
    p = PRESETS["tiny"]
    tiny = Arch(hidden=p.hidden_size, intermediate=p.intermediate_size, layers=p.num_hidden_layers,
                heads=p.num_attention_heads, kv_heads=p.num_attention_heads, vocab=982, tied=True)
    measured = {Adapter("lora", targets=("all-linear",)): (334_768, 170_944), Adapter("ia3"): (11_664, 6_552),
                Adapter("prompt_tuning"): (4_216, 2_168)}
    for ad, (fp32, bf16) in measured.items():
        assert (adapter_file_bytes(tiny, ad, 4), adapter_file_bytes(tiny, ad, 2)) == (fp32, bf16), ad


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_of_saved_adapter_files(name, dtype, tmp_path):
    model = tiny_model(vocab=300, layers=3, kv_heads=2)
    ad, pm, _ = peft_state(model, name)
    pm.to(dtype).save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    raw = f.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    data, whole = safetensors_bytes(adapter_tensors(arch_of(model.config), ad), 2 if dtype == torch.bfloat16 else 4)
    assert len(raw) - 8 - header == data  # the tensors' bytes, exactly
    assert abs(whole - len(raw)) <= 16, (whole, len(raw))  # the header estimated (exact today)


@pytest.mark.parametrize("top", [0, 2])
def test_training_flops_match_the_benchmarks_mfu_count(top, monkeypatch, smol_meta):
    """train_flops(...)["benchmark"] is benchmarks/train_users.py's needed_flops on the real model."""
    import oppu.engine
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train_users import needed_flops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    items, n, targets = 7, 50, 3
    rows = [SimpleNamespace(ids=list(range(n)), n_prompt=n - targets) for _ in range(items)]
    monkeypatch.setattr(oppu.engine, "encode", lambda tok, exs, max_len: rows)
    for epochs in (1, 2):
        args = SimpleNamespace(top_layers=top, max_len=384, epochs=epochs)
        need, counts = needed_flops(smol_meta, None, {"u": rows}, args, 30)
        f = train_flops(SMOLLM2, Workload(items, n, targets, epochs), top_layers=top, reused=counts["prefix_reused"])
        assert f["benchmark"] == need
        assert counts["prefix_reused"] == bool(top and epochs > 1)
        assert f["attention"] > 0 and f["total"] == need + f["attention"]


def test_plan_constants_agree_with_the_engine():
    from oppu.engine.prefix import PREFIX_BUDGET_BYTES as ENGINE_BUDGET
    assert PREFIX_BUDGET_BYTES == ENGINE_BUDGET


def test_docs_scaling_carries_the_printed_tables():
    out = subprocess.run([sys.executable, "-m", "oppu.plan_tables"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    doc = (ROOT / "docs" / "scaling.md").read_text()
    missing = [line for line in out.splitlines() if line and line not in doc]
    assert not missing, missing
    assert "907" in out and "6,738,415,616" in out  # the headline: users/h per H200, 7B parameters
