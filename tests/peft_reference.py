"""The independent reference: the paper's way, through PEFT alone (no oppu.engine training or
decoding code). The one implementation is the benchmarks' baseline arm (benchmarks/_common.py);
this module is the tests' door to it.

One user at a time: a fresh `get_peft_model` under the user's seed (or a saved adapter continued),
a plain PyTorch loop (torch.optim.AdamW, HF's own loss over the whole vocabulary at every position,
clip per user), `save_pretrained`; generation through `PeftModel.from_pretrained` + `model.generate`.
Only the data order (`oppu.engine.batching.batches`) and the example encoding are shared with the
engine on purpose: they define which examples a step sees, not how it computes.

    losses = peft_train_user(base, tok, examples, pcfg, ucfg, seed, "u1", out_dir, max_len)
    texts = peft_generate(base, tok, prompts, user_dir, max_new_tokens=8)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import peft_attach, peft_detach, peft_greedy, peft_train_user  # noqa: E402

__all__ = ["peft_attach", "peft_detach", "peft_generate", "peft_train_user"]


@torch.no_grad()
def peft_generate(base, tok, prompts, user_dir: str | Path | None, max_new_tokens: int,
                  max_prompt_tokens: int = 384) -> list[str]:
    """Greedy text for each prompt, one at a time, with PEFT's model on user_dir (or the plain base)
    and HF generate; prompt tuning decodes without a KV cache (see peft_greedy)."""
    from peft import PeftModel

    if user_dir is None:
        return peft_greedy(base, tok, prompts, max_new_tokens, True, max_prompt_tokens)
    model = PeftModel.from_pretrained(base, str(user_dir))
    try:
        prompt = model.peft_config["default"].is_prompt_learning
        return peft_greedy(model, tok, prompts, max_new_tokens, not prompt, max_prompt_tokens)
    finally:
        peft_detach(model)
