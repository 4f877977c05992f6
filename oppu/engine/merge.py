"""A LoRA module merged into the base's weights: W += scale * B @ A, as PEFT's merge_and_unload.

Task adaptation of a real checkpoint trains one LoRA on the other users' data through the engine's
trainer, then merges it, so the shared base stays a plain model (no adapter layers) that every
user's module is plugged into.

    merge_lora(base, config, state)        # in place; the base's linears keep their dtype
"""
from __future__ import annotations

from typing import Mapping

import torch

from oppu.engine.lora import PREFIX, lora_scale


@torch.no_grad()
def merge_lora(base, config, state: Mapping[str, torch.Tensor]) -> int:
    """Add each module's LoRA delta into its weight; returns the number of merged modules."""
    n = 0
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len(PREFIX):-len(".lora_A.weight")]
        b = state[f"{PREFIX}{path}.lora_B.weight"]
        r = a.shape[0]
        scale = lora_scale(config, r)
        w = base.get_submodule(path).weight
        w += (b.to(torch.float32) @ a.to(torch.float32) * scale).to(w.dtype).to(w.device)
        n += 1
    return n
