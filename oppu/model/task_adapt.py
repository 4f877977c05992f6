"""Task adaptation of the shared base on the non-test users' data, through the engine's trainer.

- A real checkpoint: LoRA (`target_modules`, rank `lora_r`, alpha 2r) trained as one module by
  oppu.engine's Trainer (length-grouped batches, warm-up + cosine), then merged into the weights
  (engine.merge.merge_lora), as the paper does. Reported as "lora-merged".
- The tiny from-scratch base: full training of every weight (engine.train_full), the honest
  equivalent for a model that starts from random init. Reported as "full".

    model, info = adapt_base(model, tok, examples, BaseTrainConfig(), full=True, seed=0, max_len=384)
"""
from __future__ import annotations

from typing import Callable, Sequence

from oppu.config import BaseTrainConfig, UserTrainConfig

BASE_ID = "task-adaptation"  # the one "user" of the LoRA trained for the base


def adapt_base(model, tok, examples: Sequence, cfg: BaseTrainConfig, full: bool, seed: int, max_len: int,
               on_step: Callable[[int, float], None] | None = None,
               on_plan: Callable[[int], None] | None = None):
    """Returns (adapted model, info dict with mode, losses, examples, examples_per_epoch,
    tokens_per_epoch, steps). With cfg.max_examples / cfg.max_tokens, each epoch trains on the next
    that many examples of a seeded stream of shuffles of `examples` (engine.batching.batches):
    a fixed cost per epoch however large the data, and every example seen once before any
    repeats. `on_plan(steps)` is told the number of optimizer steps before the first one."""
    from oppu.engine import encode, train_full
    from oppu.engine.batching import epoch_cap

    exs = list(examples)
    data = encode(tok, exs, max_len)
    lengths = [len(e.ids) for e in data]
    per_epoch = epoch_cap(len(data), cfg.max_examples, cfg.max_tokens, lengths, cfg.batch_size)
    steps = cfg.epochs * ((per_epoch + cfg.batch_size - 1) // cfg.batch_size)
    if on_plan:
        on_plan(steps)
    if full:
        losses = train_full(model, tok, data, cfg, seed, max_len, on_step=on_step, epoch_size=per_epoch)
        mode = "full"
    else:
        losses = _lora_merged(model, tok, exs, cfg, seed, max_len, on_step, per_epoch)
        mode = "lora-merged"
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, {"mode": mode, "losses": losses, "examples": len(exs), "examples_per_epoch": per_epoch,
                   "tokens_per_epoch": round(per_epoch * sum(lengths) / max(1, len(lengths))), "steps": steps}


def _lora_merged(model, tok, exs, cfg: BaseTrainConfig, seed: int, max_len: int, on_step,
                 epoch_size: int) -> list[float]:
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
                      order_seeds={BASE_ID: seed}, group_by_length=True, epoch_size=epoch_size,
                      on_step=(lambda n, losses: on_step(n, losses[BASE_ID])) if on_step else None)
    losses = trainer.run()[BASE_ID]
    merge_lora(model, module["config"], module["state"])
    return losses
