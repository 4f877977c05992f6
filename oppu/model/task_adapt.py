"""Task adaptation of the shared base on the non-test users' data, through the engine's trainer.

- A real checkpoint: LoRA (`target_modules`, rank `lora_r`, alpha 2r) trained as one module by
  oppu.engine's Trainer (length-grouped batches, warm-up + cosine), then merged into the weights
  (engine.merge.merge_lora), as the paper does. Reported as "lora-merged".
- The tiny from-scratch base: full training of every weight (engine.train_full), the honest
  equivalent for a model that starts from random init. Reported as "full".

    model, info = adapt_base(model, tok, examples, BaseTrainConfig(), full=True, seed=0, max_len=384)
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

from oppu.config import BaseTrainConfig, UserTrainConfig

BASE_ID = "task-adaptation"  # the one "user" of the LoRA trained for the base


def adapt_base(model, tok, examples: Sequence, cfg: BaseTrainConfig, full: bool, seed: int, max_len: int,
               on_step: Callable[[int, float], None] | None = None):
    """Returns (adapted model, info dict with mode, losses, examples, steps)."""
    from oppu.engine import train_full

    exs = list(examples)
    if cfg.max_examples and len(exs) > cfg.max_examples:
        exs = random.Random(seed).sample(exs, cfg.max_examples)
    if full:
        losses = train_full(model, tok, exs, cfg, seed, max_len, on_step=on_step)
        mode = "full"
    else:
        losses = _lora_merged(model, tok, exs, cfg, seed, max_len, on_step)
        mode = "lora-merged"
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    steps = cfg.epochs * ((len(exs) + cfg.batch_size - 1) // cfg.batch_size)
    return model, {"mode": mode, "losses": losses, "examples": len(exs), "steps": steps}


def _lora_merged(model, tok, exs, cfg: BaseTrainConfig, seed: int, max_len: int, on_step) -> list[float]:
    from peft import LoraConfig

    from oppu.engine import Trainer
    from oppu.engine.merge import merge_lora

    from oppu.engine.format import layer_choice, n_layers_of, split_targets

    targets = split_targets(cfg.target_modules)
    pcfg = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM", **layer_choice(cfg.top_layers, n_layers_of(model), targets))
    ucfg = UserTrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, warmup_ratio=cfg.warmup_ratio)
    module = {}
    trainer = Trainer(model, tok, {BASE_ID: exs}, pcfg, ucfg, seed, max_len, 1,
                      on_user_done=lambda uid, losses, config, state: module.update(config=config, state=state),
                      order_seeds={BASE_ID: seed}, group_by_length=True,
                      on_step=(lambda n, losses: on_step(n, losses[BASE_ID])) if on_step else None)
    losses = trainer.run()[BASE_ID]
    merge_lora(model, module["config"], module["state"])
    return losses
