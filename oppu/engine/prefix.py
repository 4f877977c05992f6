"""Frozen-prefix reuse in training: when every user module lives in the top decoder layers (LoRA or
IA3 with `top_layers`), the layers below the lowest adapted one compute the same hidden states in
every epoch. `FrozenPrefix` keeps each training row's hidden state at the input of that layer the
first time the row is seen (computed without autograd) and runs only the top layers afterwards.

Same numbers as the plain forward to float tolerance (tests/test_engine_prefix.py): a row's
hidden states at its real positions do not depend on the right padding it was batched with.

Needs a Llama-style decoder (`embed_tokens`, `layers`, `rotary_emb`, `norm`); `for_trainer`
answers None (no reuse, the plain forward) for anything else, and for prompt tuning, whose
virtual tokens enter below every layer.

    fp = FrozenPrefix.for_trainer(decoder, list(mm.layers()), epochs=2, n_tokens=40_000)
    h = fp.forward(rows, inputs)          # last hidden state [N, T, H], as decoder(**inputs)
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

PREFIX_BUDGET_BYTES = 2 << 30   # at most this much cached hidden state per Trainer (else no reuse)


def lowest_adapted_layer(paths: Sequence[str]) -> int:
    """The lowest decoder layer among the adapted module paths ("model.layers.27.self_attn.q_proj");
    0 when a path is outside the numbered layers, -1 when there is none (prompt tuning)."""
    if not paths:
        return -1
    found = [re.search(r"(?:^|\.)layers\.(\d+)\.", p) for p in paths]
    return 0 if any(m is None for m in found) else min(int(m.group(1)) for m in found)


class FrozenPrefix:
    """Hidden states after decoder.layers[:lo], cached per training row (keyed by the row object)."""

    def __init__(self, decoder, lo: int) -> None:
        self.decoder, self.lo = decoder, lo
        self.cache: dict[int, torch.Tensor] = {}

    @classmethod
    def for_trainer(cls, decoder, adapted_paths: Sequence[str], epochs: int, n_tokens: int,
                    budget_bytes: int = PREFIX_BUDGET_BYTES) -> "FrozenPrefix | None":
        """A FrozenPrefix when reuse pays (2+ epochs, adapted layers above the first) and fits the budget;
        `adapted_paths`: the module paths the users' modules wrap (MultiUserModel.layers())."""
        lo = lowest_adapted_layer(adapted_paths)
        llama_like = all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "rotary_emb", "norm"))
        hidden = getattr(getattr(decoder, "config", None), "hidden_size", 0)
        if epochs < 2 or lo <= 0 or not llama_like or n_tokens * hidden * 4 > budget_bytes:
            return None
        return cls(decoder, lo)

    def forget(self, rows: Sequence) -> None:
        for r in rows:
            self.cache.pop(id(r), None)

    def _run_layers(self, h: torch.Tensor, layers, att: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask
        d = self.decoder
        mask = create_causal_mask(config=d.config, inputs_embeds=h, attention_mask=att, cache=None,
                                  position_ids=pos)
        pe = d.rotary_emb(h, position_ids=pos)
        for layer in layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos, use_cache=False)
        return h

    def _bottom(self, rows: Sequence, ids: torch.Tensor, att: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, T, H] at the input of layer lo; rows seen before come from the cache."""
        if any(id(r) not in self.cache for r in rows):  # the whole chunk: the row context stays the batch's
            with torch.no_grad():
                h = self._run_layers(self.decoder.embed_tokens(ids), self.decoder.layers[:self.lo], att, pos)
            for i, r in enumerate(rows):
                self.cache.setdefault(id(r), h[i, :int(att[i].sum())].clone())
        out = torch.zeros(ids.shape[0], ids.shape[1], self.decoder.config.hidden_size,
                          dtype=self.decoder.embed_tokens.weight.dtype, device=ids.device)
        for i, r in enumerate(rows):
            c = self.cache[id(r)]
            out[i, :c.shape[0]] = c
        return out

    def forward(self, rows: Sequence, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's last hidden state [N, T, H] for right-padded `inputs` (input_ids,
        attention_mask, position_ids from MultiUserModel.prepare), running only the top layers
        for rows whose bottom state is cached."""
        ids, att = inputs["input_ids"], inputs["attention_mask"]
        pos = inputs.get("position_ids")
        if pos is None:
            pos = (att.cumsum(-1) - 1).clamp(min=0)
        h = self._bottom(rows, ids, att, pos)
        h = self._run_layers(h, self.decoder.layers[self.lo:], att, pos)
        return self.decoder.norm(h)
