"""The engine's optimizer and learning-rate schedule, per user slot.

    opt = StackedAdamW(mm.bank_params("lora"), weight_decay=0.01)
    opt.step(slots=[1, 2], lrs=[1e-4, 1e-4], max_grad_norm=0.3)   # only these slots move
    lr = lr_at(step, total, 1e-4, warmup=3)                       # linear warm-up, cosine to 10%

Shapes: for each bank tensor [S, ...] (slot axis first) StackedAdamW holds exp_avg and exp_avg_sq
of the same shape and a step count per slot.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of lr; constant lr when warmup is 0."""
    if warmup <= 0:
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def warmup_steps(total: int, ratio: float) -> int:
    return max(1, int(total * ratio)) if ratio > 0 else 0


class StackedAdamW:
    """torch.optim.AdamW (decoupled weight decay, no amsgrad) on stacked tensors [S, ...].

    `step(slots, lrs)` clips each listed slot's gradient to its own norm `max_grad_norm` (as
    torch.nn.utils.clip_grad_norm_ does for one user's parameters) and updates only those slots,
    each with its own learning rate; every other slot's parameters, moments and step count stay
    exactly as they are.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("no parameters to optimise")
        self.betas, self.eps, self.wd = betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = [0] * self.params[0].shape[0]

    def reset(self, slot: int) -> None:
        for m, v in zip(self.exp_avg, self.exp_avg_sq):
            m[slot].zero_()
            v[slot].zero_()
        self.steps[slot] = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, slots: Sequence[int], lrs: Sequence[float], max_grad_norm: float | None = 1.0) -> torch.Tensor:
        """Clip and update `slots` with learning rates `lrs`; returns their gradient norms before clipping [A]."""
        dev = self.params[0].device
        idx = torch.tensor(list(slots), dtype=torch.long, device=dev)
        grads = [p.grad.index_select(0, idx) if p.grad is not None else
                 torch.zeros((len(slots),) + p.shape[1:], dtype=p.dtype, device=dev) for p in self.params]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # [A]
        coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) if max_grad_norm else torch.ones_like(norms)
        for s in slots:
            self.steps[s] += 1
        b1, b2 = self.betas
        t = torch.tensor([self.steps[s] for s in slots], dtype=torch.float64)
        lr = torch.tensor(list(lrs), dtype=torch.float64)
        step_size = (lr / (1 - b1 ** t)).to(device=dev)
        bc2_sqrt = (1 - b2 ** t).sqrt().to(device=dev)
        decay = (1 - lr * self.wd).to(device=dev)
        for p, g, m_all, v_all in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            shape = (len(slots),) + (1,) * (p.dim() - 1)
            g = g * coef.to(g.dtype).view(shape)
            w, m, v = p.data.index_select(0, idx), m_all.index_select(0, idx), v_all.index_select(0, idx)
            if self.wd:
                w.mul_(decay.to(w.dtype).view(shape))
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt.to(v.dtype).view(shape)).add_(self.eps)
            w.add_(m * (-step_size.to(w.dtype).view(shape)) / denom)
            p.data.index_copy_(0, idx, w)
            m_all.index_copy_(0, idx, m)
            v_all.index_copy_(0, idx, v)
        return norms
