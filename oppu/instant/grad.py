"""Gradient affinity: which bank modules point where the user's own items want the base to move.

For a user's probe examples (their latest items, plain prompt), one forward and backward through the
plain base gives G_l = dL/dW_l for every layer the bank adapts. A bank module k changes those
weights by D_k (LoRA: scale * B_k @ A_k; IA3: the weights rescaled by l_k - 1), and to first order
lowers the user's loss by -<G, D_k>. The affinity is that inner product as a cosine:

    affinity_k = -<G, D_k> / (|G| |D_k|)        one backward per user, whatever the bank size

LoRA's <G_l, s B A> = s * sum((B^T G_l) * A) and |s B A|^2 = s^2 * sum((B^T B) * (A A^T)) never
form a full delta. IA3 works in the scaling vectors' space: the gradient of the loss in l at l = 1
is (G * W) summed over the other side, dotted with l_k - 1.

    with GradScorer(model, tok, bank_modules, max_len=384) as g:
        aff = g.affinities(probe_examples)          # [n_bank]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from oppu.engine import encode
from oppu.engine.batching import length_chunks, n_targets
from oppu.engine.lora import PREFIX, lora_scale
from oppu.engine.train import decoder_and_head, token_loss_sums


class GradScorer:
    """Bank modules stacked per layer; cosines of their weight changes with a user's -dL/dW."""

    def __init__(self, model, tok, modules: Sequence[tuple], max_len: int, tokens_per_forward: int = 1024) -> None:
        self.model, self.tok, self.max_len, self.tokens_per_forward = model, tok, max_len, tokens_per_forward
        keys = sorted(modules[0][1])
        self.lora = all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        if not self.lora and not all(k.endswith(".ia3_l") for k in keys):
            raise ValueError(f"gradient affinity covers LoRA and IA3 banks; got keys like {keys[:2]}")
        self.paths = sorted({k[len(PREFIX):].rsplit(".", 2 if self.lora else 1)[0] for k in keys})
        self.stacks, self.norm2 = self._stack(modules)
        self._flags: dict | None = None

    def _stack(self, modules) -> tuple[dict, torch.Tensor]:
        stacks, norm2 = {}, torch.zeros(len(modules), dtype=torch.float64)
        for p in self.paths:
            if self.lora:
                a = torch.stack([s[f"{PREFIX}{p}.lora_A.weight"].double() *
                                 lora_scale(c, s[f"{PREFIX}{p}.lora_A.weight"].shape[0])
                                 for c, s in modules])                                   # [K, r, in], scaled
                b = torch.stack([s[f"{PREFIX}{p}.lora_B.weight"].double() for _, s in modules])  # [K, out, r]
                norm2 += ((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum((1, 2))
                k, r = a.shape[:2]  # <G, s B A> per module as one matmul: (B^T stacked [K r, out]) @ G
                stacks[p] = (a.float().reshape(k * r, -1).contiguous(),
                             b.transpose(1, 2).float().reshape(k * r, -1).contiguous(), k)
            else:
                v = torch.stack([s[f"{PREFIX}{p}.ia3_l"].double() - 1.0 for _, s in modules])  # [K, out, 1] | [K, 1, in]
                norm2 += (v ** 2).sum((1, 2))
                stacks[p] = (v,)
        return stacks, norm2

    def __enter__(self) -> "GradScorer":
        self._flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weights = {p: self.model.get_submodule(p).weight for p in self.paths}
        self.decoder, self.head = decoder_and_head(self.model)
        return self

    def __exit__(self, *exc) -> None:
        for n, p in self.model.named_parameters():
            p.grad = None
            p.requires_grad_(self._flags.get(n, p.requires_grad))

    def affinities(self, examples: Sequence) -> np.ndarray:
        """[n_bank] cosine of each module's weight change with -dL/dW of `examples` (zeros if none)."""
        enc = encode(self.tok, examples, self.max_len)
        n = sum(n_targets(e) for e in enc)
        if not n:
            return np.zeros(len(self.norm2))
        for w in self.weights.values():
            w.requires_grad_(True)
        try:
            with torch.enable_grad():
                for chunk in length_chunks(enc, self.tokens_per_forward):
                    rows = [enc[i] for i in chunk]
                    sums = token_loss_sums(None, self.decoder, self.head, rows, [None] * len(rows),
                                           torch.zeros(len(rows), dtype=torch.long), 1, self.tok.pad_token_id)
                    (sums.sum() / n).backward()
            dot, g2 = torch.zeros(len(self.norm2), dtype=torch.float64), 0.0
            for p, w in self.weights.items():
                g = w.grad.float()                                                 # [out, in]
                if self.lora:
                    a, bt, k = self.stacks[p]                                      # [K r, in], [K r, out]
                    dot += ((bt @ g) * a).view(k, -1).sum(1).double()
                    g2 += float((g.double() ** 2).sum())
                else:
                    (v,) = self.stacks[p]
                    gl = (g.double() * w.detach().double()).sum(1 if v.shape[2] == 1 else 0, keepdim=True)  # dL/dl at l = 1
                    dot += (v * gl).sum((1, 2))
                    g2 += float((gl ** 2).sum())
        finally:
            for w in self.weights.values():
                w.grad = None
                w.requires_grad_(False)
        return (-dot / (g2 ** 0.5 * self.norm2.sqrt()).clamp(min=1e-30)).numpy()
