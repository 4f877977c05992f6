"""Shared pieces of the engine tests (tests/test_engine*.py): a micro base briefly trained so its
greedy text depends on the prompt and the adapter, per-user data of different sizes, the PEFT
kinds under test, PEFT-made random adapters, and "that user alone" through PEFT."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from oppu.config import UserTrainConfig
from oppu.engine import peft_config, tokenize_prompts
from oppu.examples import Example
from peft_reference import peft_detach, peft_generate

WORDS = ("alpha beta gamma delta movie drama comedy action likes the a of film rating horror romance "
         "classic thriller quiet loud story song plot actor").split()
SIZES = {"u1": 3, "u2": 7, "u3": 12, "u/4": 5}  # different lengths; "u/4" needs a safe directory name
# lora-qv: a large lora_alpha makes some users' gradients pass norm 1 on some steps, so per-user
# clipping is exercised (the other kinds stay under it); its rank differs from lora-all's.
# lora-reg: warm-up + cosine schedule, tight clipping and weight decay (UserTrainConfig options).
KINDS = {"lora-all": ("lora", "all-linear", {}),
         "lora-qv": ("lora", "q_proj,v_proj", {"lora_alpha": 128, "lora_r": 4}),
         "ia3": ("ia3", "all-linear", {}), "prompt": ("prompt_tuning", "all-linear", {})}
TRAIN_KINDS = {**KINDS, "lora-reg": ("lora", "all-linear",
                                     {"warmup_ratio": 0.1, "max_grad_norm": 0.3, "weight_decay": 0.01})}
SEED, MAX_LEN = 3, 64
CHUNK_TOKENS = 40  # a few rows per forward: several forwards per step in the "chunked" training run
PROMPTS = ["alpha beta tag:", "the movie was a quiet story about film tag:", "horror tag:",
           "classic thriller with a loud song and an actor tag:", "drama comedy action tag:"]


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def build_base(root: Path) -> Path:
    """The micro base, full-trained 2 epochs on a tagging task, saved in root."""
    from oppu.config import BaseTrainConfig
    from oppu.model.base import build_tiny_base, load_base
    from oppu.model.task_adapt import adapt_base
    rng = random.Random(0)
    corpus = [text(rng, 4, 12) for _ in range(300)]
    d = build_tiny_base(corpus, root, preset="micro")
    model, tok = load_base(d)
    exs = [Example(" ".join(c.split()[:3]) + " tag:", " ".join(c.split()[3:6]), "base", "plain", str(i))
           for i, c in enumerate(corpus)]
    model, _ = adapt_base(model, tok, exs, BaseTrainConfig(epochs=2, lr=3e-3, batch_size=16), True, 0, MAX_LEN)
    model.save_pretrained(d)
    return d


def make_data(seed: int = 1) -> dict[str, list[Example]]:
    rng = random.Random(seed)
    return {u: [Example(text(rng, 2, 10) + " tag:", text(rng, 1, 3), u, "plain", str(i)) for i in range(n)]
            for u, n in SIZES.items()}


def ucfg_of(kind: str) -> UserTrainConfig:
    _, targets, extra = TRAIN_KINDS[kind]
    return UserTrainConfig(epochs=2, batch_size=4, lr=3e-3, target_modules=targets, **extra)


def pcfg_of(kind: str):
    """A fresh PEFT config each call: PEFT fills some fields in on first use."""
    return peft_config(TRAIN_KINDS[kind][0], ucfg_of(kind))


def tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(d) / "adapter_model.safetensors"))


def config_json(d: Path) -> dict:
    cfg = json.loads((Path(d) / "adapter_config.json").read_text())
    if isinstance(cfg.get("target_modules"), list):  # PEFT writes a set; its order is arbitrary
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


def random_adapter(model, kind: str, seed: int, out: Path) -> Path:
    """A user module far from identity (so users really differ), saved by PEFT itself."""
    from peft import get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(model, pcfg_of(kind))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                # IA3 scales start at 1: 0.5 noise left greedy text unchanged on one CI run
                p.add_(torch.randn_like(p) * (2.0 if kind == "ia3" else 0.5))
    pm.save_pretrained(str(out))
    peft_detach(pm)
    return out


def solo(model, tok, user_dir: Path | None, prompt: str, n: int) -> tuple[str, torch.Tensor]:
    """That user alone: (greedy text, last-position logits [V]) of the PeftModel on this one prompt.

    The text comes from a cache-free greedy loop over the PeftModel's own forward and, checked
    equal, from `peft_generate` (PEFT + HF generate, KV-cached except for prompt tuning, see
    tests/peft_reference.py)."""
    from peft import PeftModel
    pm = PeftModel.from_pretrained(model, str(user_dir)) if user_dir else model
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
    finally:
        if user_dir:
            peft_detach(pm)
    out = tok.decode(new, skip_special_tokens=True)
    assert peft_generate(model, tok, [prompt], user_dir, n)[0] == out, (user_dir, prompt)
    return out, first
