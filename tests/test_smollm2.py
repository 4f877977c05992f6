"""A real pretrained LLM offline: SmolLM2-135M-Instruct from its PyPI wheel (`--base smollm2`).

The conversion (GGUF -> a standard HF dir) keeps the model's next-token logits; prompts go through
its chat template with the loss on the assistant turn only; a short pipeline runs end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from oppu.examples import Example


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    import os

    from oppu.model.base import load_base, resolve_base_path
    root = os.environ.get("OPPU_CACHE") or str(tmp_path_factory.mktemp("cache"))
    path = resolve_base_path("smollm2", root)
    model, tok = load_base(path)
    return path, model, tok


def test_conversion_keeps_the_gguf_models_logits(smol):
    from transformers import AutoModelForCausalLM

    from oppu.model.gguf import smollm2_file
    path, model, tok = smol
    src = json.loads((path / "oppu_source.json").read_text())
    f = smollm2_file()
    assert src["source"] == "smollm2" and src["file"] == str(f) and len(src["sha256"]) == 64
    gguf = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name)
    ids = tok(["The city council voted to add bike lanes downtown."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = gguf(ids).logits[0, -1], model(ids).logits[0, -1]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert int(got.argmax()) == int(want.argmax())


def test_chat_template_prompt_and_assistant_turn_target(smol):
    from oppu.engine.batching import collate, encode, tokenize_prompts
    _, _, tok = smol
    assert tok.oppu_chat and tok.decode([tok.oppu_end_id]) == "<|im_end|>"
    e = encode(tok, [Example("description: a film about robots\ntag:", " sci-fi", "u", "plain", "1")], 384)[0]
    text = tok.decode(e.ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\ndescription: a film about robots\ntag:" in text
    assert tok.decode(e.ids[:e.n_prompt]).endswith("<|im_start|>assistant\n")
    lab = collate([e], tok.pad_token_id)["labels"][0]
    assert tok.decode([t for t in lab.tolist() if t != -100]) == "sci-fi<|im_end|>"  # only the assistant turn
    assert tokenize_prompts(tok, ["description: a film about robots\ntag:"], 384)[0] == list(e.ids[:e.n_prompt])


def test_a_short_pipeline_on_smollm2(smol, tmp_path, monkeypatch):
    from oppu.config import load_config
    from oppu.data.synth import synth_world
    from oppu.pipeline import run

    path, _, _ = smol
    monkeypatch.setenv("OPPU_CACHE", str(path.parent.parent))  # the materialized model is reused
    synth_world("LaMP_2M", tmp_path / "w", seed=0, test_users=2, other_users=4, queries_per_user=1, min_history=3,
                max_history=4)
    cfg = load_config(None, task="LaMP_2M", data=str(tmp_path / "w"), out=str(tmp_path / "out"), base="smollm2",
                      test_users=2, methods=("non_personalized", "oppu"), max_history_items=3,
                      **{"base_train.epochs": 0, "user_train.epochs": 1})
    res = run(cfg)
    info = res.info
    assert info["base"]["prompt_style"] == "chat" and info["base"]["origin"]["source"] == "smollm2"
    assert len(info["base"]["origin"]["sha256"]) == 64
    assert all(u["trained_items"] == 3 and len(u["losses"]) == 1 for u in info["users"].values())
    questions = [q for m in res.predictions.values() for q in m]
    assert len(questions) == 2 * info["questions"] == 4
    # pinned (measured once on this machine's fp32 CPU run; moves only if the math or the prompts do)
    assert {u: v["losses"][0] for u, v in info["users"].items()} == pytest.approx(
        {"u0000": 3.4685, "u0001": 3.3027}, abs=2e-3)
    assert res.predictions["non_personalized"] == {"u0000-q0": "The movie is a long feature about anxiety",
                                                   "u0001-q0": "The story of ethics with uprising and propaganda"}
