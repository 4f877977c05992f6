"""Mixing bank modules into one user's module: the weights, and the exact PEFT module they define.

    w = knn_weights(sims, top_k=8, temperature=0.1)        # [(bank index, weight)], weights sum to 1
    config, state = mix_modules([bank[i] for i, _ in w], [x for _, x in w])

LoRA (exact): each bank module k adds delta_k = scale_k * B_k @ A_k to a layer; the mixture
sum_k w_k * delta_k is itself a LoRA of rank sum_k r_k:

    A = concat_k(w_k * scale_k * A_k)   [sum r_k, in]      B = concat_k(B_k)   [out, sum r_k]

written with lora_alpha = r (scale 1), so PEFT and the engine apply exactly that sum. When the
summed rank passes a layer's min(in, out), the delta is refactored by SVD to rank min(in, out),
still exact (to float rounding); every layer must then end at one rank (a single `r` in the file).
IA3: the weighted average of the scaling vectors (the same parameter-space mixture). Prompt
tuning is refused: a mixture of soft prompts has no exact single-module form here.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np
import torch

from oppu.engine.lora import lora_scale

Module = tuple[object, Mapping[str, torch.Tensor]]   # (PEFT config, PEFT state dict)
MIXABLE = ("LORA", "IA3")


def knn_weights(sims: np.ndarray, top_k: int, temperature: float) -> list[tuple[int, float]]:
    """The top_k bank entries of highest affinity (ties: lower index first) with softmax(affinity /
    temperature) weights; sims [n_bank] affinities (cosine similarity, or minus a loss), -inf for
    entries that were not candidates."""
    if temperature <= 0 or top_k < 1:
        raise ValueError(f"top_k must be >= 1 and temperature > 0, got {top_k}, {temperature}")
    finite = [i for i in range(len(sims)) if np.isfinite(sims[i])]
    order = sorted(finite, key=lambda i: (-float(sims[i]), i))[:top_k]
    z = np.array([float(sims[i]) for i in order]) / temperature
    e = np.exp(z - z.max())
    return [(i, float(x)) for i, x in zip(order, e / e.sum())]


def uniform_weights(n: int) -> list[tuple[int, float]]:
    """Every bank entry at 1/n: the ablation with no user signal at all."""
    return [(i, 1.0 / n) for i in range(n)]


def _peft_type(config) -> str:
    t = getattr(config, "peft_type", None)
    return getattr(t, "value", t)


def check_mixable(modules: Sequence[Module]) -> str:
    """The PEFT type ("LORA" | "IA3") shared by these modules, which must target the same layers."""
    types = {_peft_type(c) for c, _ in modules}
    if len(types) != 1 or not types <= set(MIXABLE):
        raise ValueError(f"instant adapters mix {' or '.join(MIXABLE)} modules of one type; got "
                         f"{sorted(map(str, types))} (prompt tuning is not covered)")
    keys = set(modules[0][1])
    if any(set(s) != keys for _, s in modules):
        raise ValueError("bank modules target different layers; they must share one PEFT config")
    return types.pop()


def mix_modules(modules: Sequence[Module], weights: Sequence[float]) -> Module:
    """The mixture of same-shaped bank modules under `weights` (summing to 1), as a PEFT module."""
    if not modules or len(modules) != len(weights):
        raise ValueError(f"need one weight per module, got {len(modules)} modules and {len(weights)} weights")
    return mix_lora(modules, weights) if check_mixable(modules) == "LORA" else mix_ia3(modules, weights)


def mix_ia3(modules: Sequence[Module], weights: Sequence[float]) -> Module:
    state = {k: sum(float(w) * s[k].double() for (_, s), w in zip(modules, weights)).to(v.dtype)
             for k, v in modules[0][1].items()}
    return copy.deepcopy(modules[0][0]), state


def mix_lora(modules: Sequence[Module], weights: Sequence[float]) -> Module:
    return LoraStack(modules).mix(range(len(modules)), weights)


class LoraStack:
    """Same-shaped LoRA modules stacked per layer ([K, r, in] A in at least float32, B as stored), so a
    mixture of any of them is a few tensor ops per layer (a bank keeps one for all its users). A's rows
    are scaled in that dtype (w_k * scale_k rounded to it once), B is copied: ~2 ms for 16 of 64
    rank-8 modules of the tiny base, against ~5 ms when every layer went through float64."""

    def __init__(self, modules: Sequence[Module]) -> None:
        first = modules[0][1]
        self.config = modules[0][0]
        self.dtype = next(iter(first.values())).dtype
        self.paths = sorted(k[:-len(".lora_A.weight")] for k in first if k.endswith(".lora_A.weight"))
        work = torch.promote_types(self.dtype, torch.float32)
        self.a = {p: torch.stack([s[f"{p}.lora_A.weight"] for _, s in modules]).to(work) for p in self.paths}
        self.b = {p: [s[f"{p}.lora_B.weight"] for _, s in modules] for p in self.paths}
        self.scale = {p: torch.tensor([lora_scale(c, s[f"{p}.lora_A.weight"].shape[0]) for c, s in modules],
                                      dtype=torch.float64) for p in self.paths}

    def mix(self, idx: Sequence[int], weights: Sequence[float]) -> Module:
        """The exact LoRA of sum_k w_k * scale_k * B_k @ A_k over modules idx (see module docstring)."""
        pos = torch.tensor(list(idx), dtype=torch.long)
        w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        state, ranks = {}, set()
        for p in self.paths:
            ak = self.a[p].index_select(0, pos)                                               # [n, r, in]
            c = (w * self.scale[p].index_select(0, pos)).to(ak.dtype)                          # w_k * scale_k
            a = (ak * c[:, None, None]).reshape(-1, ak.shape[2])                              # [sum r, in]
            b = torch.cat([self.b[p][i] for i in pos.tolist()], 1)                            # [out, sum r]
            cap = min(a.shape[1], b.shape[0])
            if a.shape[0] > cap:  # refactor the summed delta B @ A exactly at the layer's full rank
                u, sv, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
                root = sv[:cap].sqrt()
                a, b = root[:, None] * vh[:cap], u[:, :cap] * root[None, :]
            state[f"{p}.lora_A.weight"], state[f"{p}.lora_B.weight"] = a.to(self.dtype), b.to(self.dtype)
            ranks.add(a.shape[0])
        if len(ranks) != 1:
            raise ValueError(f"the mixture's layers end at different ranks {sorted(ranks)} (some layers are narrower "
                             "than the summed rank); mix fewer modules (instant.top_k)")
        r = ranks.pop()
        config = copy.deepcopy(self.config)
        config.r, config.lora_alpha, config.use_rslora = r, r, False
        return config, state
