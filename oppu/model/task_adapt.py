"""Task adaptation of the shared base on the non-test users' data.

- A real checkpoint: LoRA (all linear layers, rank `lora_r`) trained on the examples, then
  merged into the weights (`merge_and_unload`), as the paper does. Reported as "lora-merged".
- The tiny from-scratch base: full training of every weight, the honest equivalent for a model
  that starts from random init. Reported as "full".

    model, info = adapt_base(model, tok, examples, BaseTrainConfig(), full=True, seed=0)
"""
from __future__ import annotations

from typing import Callable, Sequence

from oppu.config import BaseTrainConfig
from oppu.train import encode, train_loop


def adapt_base(model, tok, examples: Sequence, cfg: BaseTrainConfig, full: bool, seed: int, max_len: int,
               on_step: Callable[[int, float], None] | None = None):
    """Returns (adapted model, info dict with mode, losses, examples, steps)."""
    import random

    exs = list(examples)
    if cfg.max_examples and len(exs) > cfg.max_examples:
        exs = random.Random(seed).sample(exs, cfg.max_examples)
    data = encode(tok, exs, max_len)
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
        losses = train_loop(model, model.parameters(), data, cfg.epochs, cfg.lr, cfg.batch_size, seed,
                            tok.pad_token_id, warmup_ratio=cfg.warmup_ratio, on_step=on_step,
                            group_by_length=True)
        mode = "full"
    else:
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
                                              target_modules="all-linear", task_type="CAUSAL_LM"))
        losses = train_loop(pm, pm.parameters(), data, cfg.epochs, cfg.lr, cfg.batch_size, seed,
                            tok.pad_token_id, warmup_ratio=cfg.warmup_ratio, on_step=on_step,
                            group_by_length=True)
        model = pm.merge_and_unload()
        mode = "lora-merged"
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    steps = cfg.epochs * ((len(data) + cfg.batch_size - 1) // cfg.batch_size)
    return model, {"mode": mode, "losses": losses, "examples": len(data), "steps": steps}
