"""Prompt tuning in the engine: each row's own virtual tokens in front of its prompt.

    PromptBank  pt_emb [S, P_max, H] (each user's virtual tokens right-aligned), pt_len [S];
                `prepare` prepends P = the longest virtual prompt among the batch's users

A row's unused virtual positions (all P of them for a row without prompt tuning) are masked
out, and position ids count only unmasked tokens (cumsum of the mask, MultiUserModel.prepare),
so each row sees exactly what PEFT feeds that user alone on an unpadded prompt:
[virtual tokens][prompt], positions 0..P_u+T_u-1. Saved as PEFT does: {"prompt_embeddings": [P_u, H]}.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from oppu.engine.layers import adapter_dtype


class PromptBank:
    """The prompt-tuning type of a MultiUserModel (no layer is wrapped)."""

    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    unsupported = ("modules_to_save",)

    def __init__(self, mm) -> None:
        self.mm = mm
        emb = mm.base.get_input_embeddings().weight
        self.hidden = emb.shape[1]
        self.emb = nn.Parameter(torch.zeros(1, 0, self.hidden, dtype=adapter_dtype(emb), device=emb.device),
                                requires_grad=False)
        self.length = torch.zeros(1, dtype=torch.long, device=emb.device)

    @staticmethod
    def check(config) -> None:
        if getattr(config, "num_transformer_submodules", None) not in (None, 1):
            raise ValueError("PROMPT_TUNING option num_transformer_submodules="
                             f"{config.num_transformer_submodules} (encoder-decoder) is not supported")

    def _resize(self, slots: int, n_virtual: int) -> None:
        s0, n0 = self.emb.shape[:2]
        s, n = max(slots, s0), max(n_virtual, n0)
        if (s, n) == (s0, n0):
            return
        emb = torch.zeros(s, n, self.hidden, dtype=self.emb.dtype, device=self.emb.device)
        emb[:s0, n - n0:] = self.emb.data  # right-aligned: growing P pads on the left
        length = torch.zeros(s, dtype=torch.long, device=self.length.device)
        length[:s0] = self.length
        self.emb, self.length = nn.Parameter(emb, requires_grad=False), length

    def grow(self, slots: int) -> None:
        self._resize(slots, self.emb.shape[1])

    def reset(self, slot: int) -> None:
        with torch.no_grad():
            self.emb[slot].zero_()
        self.length[slot] = 0

    def params(self) -> list[nn.Parameter]:
        return [self.emb]

    def put(self, slot: int, config, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        if set(state) != {"prompt_embeddings"}:
            raise ValueError(f"prompt-tuning state has keys {sorted(state)}; expected ['prompt_embeddings']")
        e = state["prompt_embeddings"]
        if e.dim() != 2 or e.shape[1] != self.hidden:
            raise ValueError(f"prompt_embeddings of shape {tuple(e.shape)} do not fit hidden size {self.hidden}")
        self._resize(self.mm.capacity(self.name), e.shape[0])
        with torch.no_grad():
            self.emb[slot, self.emb.shape[1] - e.shape[0]:] = e.to(self.emb)
        self.length[slot] = e.shape[0]
        return {"n_virtual": e.shape[0]}

    def state(self, slot: int, facts: Mapping[str, int]) -> dict[str, torch.Tensor]:
        start = self.emb.shape[1] - facts["n_virtual"]
        return {"prompt_embeddings": self.emb[slot, start:].detach().cpu().clone()}

    def prepare(self, inputs: dict, att: torch.Tensor, slots: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Prepend the rows' virtual tokens: input_ids [N, T] -> inputs_embeds [N, P + T, H]."""
        n_virtual = int(self.length[slots].max()) if len(slots) else 0
        if not n_virtual:
            return inputs, att
        ids = inputs.pop("input_ids")
        emb = self.mm.base.get_input_embeddings()(ids)
        virt = self.emb[slots][:, self.emb.shape[1] - n_virtual:]                        # [N, P, H]
        vmask = torch.arange(n_virtual, device=att.device) >= (n_virtual - self.length[slots])[:, None]
        return ({**inputs, "inputs_embeds": torch.cat([virt.to(emb.dtype), emb], dim=1)},
                torch.cat([vmask.long(), att], dim=1))
