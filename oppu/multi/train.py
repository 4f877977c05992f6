"""Batched multi-user training: many users' PEFT modules trained in one pass over the frozen base.

Same result as `oppu.adapters.train_user` for every user, to float tolerance: the same seeded
initialisation (PEFT builds each user's module under `user_seed(seed, uid)` and we copy its
tensors), the same data order (`oppu.train.batches` with the user's seed), the same loss (mean
over that user's target tokens), the same per-user gradient clipping to norm 1.0 and the same
AdamW (torch defaults, decoupled weight decay, constant lr), each user with its own step count.

A global step takes, for every active user, that user's next mini-batch; the rows of all of
them are concatenated into one forward ([sum of the users' batch rows, T], right-padded) and the
row -> slot index makes each row use only its own user's parameters. The loss to backprop is the
sum over users of their own mean loss, so each user's gradient is its solo gradient. At most
`max_users_per_batch` users train together; when one finishes (users have different numbers of
examples), it is saved and the next waiting user takes its slot, so its parameters and optimizer
state stop changing the moment it finishes.

    losses = train_users(base, tok, {"u1": exs1, "u2": exs2}, peft_config("lora", ucfg), ucfg, seed=0,
                         save_root=Path("out/adapters"), max_len=384, max_users_per_batch=16)
    # -> {"u1": [epoch losses], ...}; out/adapters/<safe_user_dir(uid)>/ in the standard PEFT format

Shapes: StackedAdamW holds, for each bank tensor [S, ...] (slot axis first), exp_avg and
exp_avg_sq of the same shape and a step count per slot.
"""
from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from oppu.adapters import attach, detach, safe_user_dir, user_seed
from oppu.config import TOKENS_PER_FORWARD, UserTrainConfig
from oppu.multi.model import MultiUserModel, peft_kind
from oppu.train import Encoded, batches, collate, encode, n_targets


class StackedAdamW:
    """torch.optim.AdamW (decoupled weight decay, no amsgrad) on stacked tensors [S, ...].

    `step(slots)` clips each listed slot's gradient to its own norm `max_grad_norm` (as
    torch.nn.utils.clip_grad_norm_ does for one user's parameters) and updates only those slots;
    every other slot's parameters, moments and step count stay exactly as they are.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("no parameters to optimise")
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
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
    def step(self, slots: Sequence[int], max_grad_norm: float | None = 1.0) -> torch.Tensor:
        """Clip and update `slots`; returns their gradient norms before clipping [A]."""
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
        step_size = (self.lr / (1 - b1 ** t)).to(device=dev)
        bc2_sqrt = (1 - b2 ** t).sqrt().to(device=dev)
        for p, g, m_all, v_all in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            shape = (len(slots),) + (1,) * (p.dim() - 1)
            g = g * coef.to(g.dtype).view(shape)
            w, m, v = p.data.index_select(0, idx), m_all.index_select(0, idx), v_all.index_select(0, idx)
            if self.wd:
                w.mul_(1 - self.lr * self.wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt.to(v.dtype).view(shape)).add_(self.eps)
            w.add_(m * (-step_size.to(w.dtype).view(shape)) / denom)
            p.data.index_copy_(0, idx, w)
            m_all.index_copy_(0, idx, m)
            v_all.index_copy_(0, idx, v)
        return norms


def decoder_and_head(base):
    """(decoder, lm_head) of a standard causal LM, so the loss needs logits at target positions only."""
    decoder, head = getattr(base, "base_model", base), base.get_output_embeddings()
    if decoder is base or head is None:
        raise ValueError(f"{type(base).__name__} has no separate decoder/lm_head; batched training needs a "
                         "standard *ForCausalLM model")
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(base.config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(base).__name__} post-processes logits ({attr}={getattr(base.config, attr)}), "
                             "which batched training does not reproduce")
    return decoder, head


def length_chunks(rows: Sequence[Encoded], tokens_per_forward: int) -> list[list[int]]:
    """Row indices sorted by length, cut greedily so each chunk's padded size (rows x its longest
    row) stays within `tokens_per_forward` (a row longer than that goes alone). Fewer pad tokens
    than one forward over every row padded to the longest, and bounded activation memory."""
    chunks: list[list[int]] = []
    for i in sorted(range(len(rows)), key=lambda i: len(rows[i].ids)):
        if chunks and (len(chunks[-1]) + 1) * len(rows[i].ids) <= tokens_per_forward:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def token_loss_sums(mm: MultiUserModel, decoder, head, rows: Sequence[Encoded], row_users: Sequence[str],
                    row_group: torch.Tensor, n_groups: int, pad_id: int) -> torch.Tensor:
    """Sum of the target-token losses of each group of rows [G] (differentiable), one forward over
    `rows` right-padded; row_group [N] maps row -> group (user) index."""
    b = collate(rows, pad_id)
    inputs = mm.prepare(b["input_ids"], b["attention_mask"], row_users)
    dev = inputs["attention_mask"].device
    n_prefix = inputs["attention_mask"].shape[1] - b["input_ids"].shape[1]
    h = decoder(**inputs, use_cache=False).last_hidden_state            # [N, P + T, H]
    lab = b["labels"].to(dev)
    r, c = (lab[:, 1:] != -100).nonzero(as_tuple=True)                  # position c predicts token c + 1
    saved = (mm.ctx.lora, mm.ctx.ia3)
    mm.ctx.lora, mm.ctx.ia3 = (None if s is None else s[r] for s in saved)  # a wrapped lm_head sees [M] rows
    try:
        logits = head(h[r, n_prefix + c]).float()                        # [M, V]
    finally:
        mm.ctx.lora, mm.ctx.ia3 = saved
    tok_loss = F.cross_entropy(logits, lab[r, c + 1], reduction="none")  # [M]
    g = row_group.to(dev)[r]
    return torch.zeros(n_groups, dtype=tok_loss.dtype, device=dev).index_add(0, g, tok_loss)


def backward_per_user_loss(mm: MultiUserModel, decoder, head, rows: Sequence[Encoded], row_users: Sequence[str],
                           row_group: Sequence[int], n_groups: int, pad_id: int,
                           tokens_per_forward: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate the sum over groups (users) of each group's mean target-token loss (as HF
    computes it for that group's rows alone), in length-sorted chunks of at most
    `tokens_per_forward` padded tokens whose gradients accumulate; returns each group's mean loss
    [G] (detached) and number of target tokens [G]."""
    per_group = [0] * n_groups
    for e, gi in zip(rows, row_group):
        per_group[gi] += n_targets(e)
    counts = torch.tensor(per_group, dtype=torch.long)
    total = torch.zeros(n_groups, dtype=torch.float32)
    for chunk in length_chunks(rows, tokens_per_forward):
        sums = token_loss_sums(mm, decoder, head, [rows[i] for i in chunk], [row_users[i] for i in chunk],
                               torch.tensor([row_group[i] for i in chunk]), n_groups, pad_id)
        (sums / counts.to(sums.device).clamp(min=1)).sum().backward()
        total += sums.detach().cpu()
    return total / counts.clamp(min=1), counts


@dataclass
class _Run:
    """One user's training in progress: plan [(epoch, example indices)], cursor, loss sums."""
    uid: str
    data: list[Encoded]
    plan: list[tuple[int, list[int]]]
    pos: int = 0
    loss_tok: list[float] = field(default_factory=list)   # per epoch: sum of batch loss * n tokens
    n_tok: list[int] = field(default_factory=list)


class MultiUserTrainer:
    """Drives batched training step by step (`step()`), or all the way (`run()`). See module docstring."""

    def __init__(self, base, tok, examples_by_user: Mapping[str, Sequence], pcfg, ucfg: UserTrainConfig,
                 seed: int, max_len: int = 384, max_users_per_batch: int = 16,
                 save_root: str | Path | None = None,
                 on_user_done: Callable[[str, list[float]], None] | None = None,
                 tokens_per_forward: int = TOKENS_PER_FORWARD) -> None:
        if max_users_per_batch < 1:
            raise ValueError(f"max_users_per_batch must be >= 1, got {max_users_per_batch}")
        if tokens_per_forward < 1:
            raise ValueError(f"tokens_per_forward must be >= 1, got {tokens_per_forward}")
        self.tokens_per_forward = tokens_per_forward
        self.kind = peft_kind(pcfg)
        self.base, self.tok, self.pcfg, self.ucfg, self.seed = base, tok, pcfg, ucfg, seed
        self.group = max_users_per_batch
        self.save_root = Path(save_root) if save_root is not None else None
        self.on_user_done = on_user_done
        self.waiting: deque[_Run] = deque()
        for uid, exs in examples_by_user.items():
            if not exs:
                raise ValueError(f"user {uid!r} has no training examples")
            plan = batches(len(exs), ucfg.batch_size, ucfg.epochs, user_seed(seed, uid))
            self.waiting.append(_Run(uid, encode(tok, exs, max_len),
                                     [(e, idx) for e, epoch in enumerate(plan) for idx in epoch]))
        self.active: dict[int, _Run] = {}     # slot -> run
        self.parked: list[str] = []           # finished users still holding a slot (freed when needed)
        self.losses: dict[str, list[float]] = {}
        self.decoder, self.head = decoder_and_head(base)
        self.mm = MultiUserModel(base)
        self.mm.reserve(self.kind, min(self.group, len(self.waiting)))
        self.opt: StackedAdamW | None = None
        self.n_steps = 0

    def initial_module(self, uid: str):
        """(config, state) of the module `oppu.adapters.attach` would create for this user."""
        from peft import get_peft_model_state_dict

        with self.mm.detached() as base:
            pm = attach(base, copy.deepcopy(self.pcfg), self.seed, uid)
            try:
                state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
                cfg = copy.deepcopy(pm.peft_config["default"])
            finally:
                detach(pm)
        return cfg, state

    def _fill(self) -> None:
        while self.waiting and len(self.active) < self.group:
            if len(self.active) + len(self.parked) >= self.group:
                self.mm.remove_user(self.parked.pop(0))
            run = self.waiting.popleft()
            slot = self.mm.add_user(run.uid, *self.initial_module(run.uid))
            params = self.mm.bank_params(self.kind)
            if self.opt is None:
                self.opt = StackedAdamW(params, self.ucfg.lr, weight_decay=self.ucfg.weight_decay)
            elif [id(p) for p in params] != [id(p) for p in self.opt.params]:
                raise RuntimeError("the parameter banks were reallocated mid-training (users with different "
                                   "target modules or sizes in one run?); train them in separate runs")
            self.opt.reset(slot)
            self.active[slot] = run
        for p in self.mm.bank_params(self.kind):
            p.requires_grad_(True)

    def step(self) -> dict[str, float]:
        """One global step over every active user's next mini-batch; {uid: that batch's loss}."""
        self._fill()
        if not self.active:
            return {}
        self.base.train()
        slots = sorted(self.active)
        rows, row_users, row_group = [], [], []
        for gi, s in enumerate(slots):
            run = self.active[s]
            idx = run.plan[run.pos][1]
            rows += [run.data[i] for i in idx]
            row_users += [run.uid] * len(idx)
            row_group += [gi] * len(idx)
        means, counts = backward_per_user_loss(self.mm, self.decoder, self.head, rows, row_users, row_group,
                                               len(slots), self.tok.pad_token_id, self.tokens_per_forward)
        self.opt.step(slots, max_grad_norm=1.0)
        self.opt.zero_grad()
        self.n_steps += 1
        out = {}
        for s, loss, n in zip(slots, means.detach().tolist(), counts.tolist()):
            run = self.active[s]
            epoch = run.plan[run.pos][0]
            if epoch == len(run.loss_tok):
                run.loss_tok.append(0.0)
                run.n_tok.append(0)
            run.loss_tok[epoch] += loss * n
            run.n_tok[epoch] += n
            run.pos += 1
            out[run.uid] = loss
            if run.pos == len(run.plan):
                self._finish(s)
        return out

    def _finish(self, slot: int) -> None:
        run = self.active.pop(slot)
        self.losses[run.uid] = [t / max(1, n) for t, n in zip(run.loss_tok, run.n_tok)]
        if self.save_root is not None:
            self.mm.save_user(run.uid, self.save_root / safe_user_dir(run.uid))
        self.parked.append(run.uid)
        if self.on_user_done:
            self.on_user_done(run.uid, self.losses[run.uid])

    def run(self) -> dict[str, list[float]]:
        try:
            while self.waiting or self.active:
                self.step()
        finally:
            self.close()
        return self.losses

    def close(self) -> None:
        self.mm.unwrap()
        self.base.eval()


def train_users(base, tok, examples_by_user: Mapping[str, Sequence], pcfg, ucfg: UserTrainConfig, seed: int,
                save_root: str | Path | None = None, max_len: int = 384, max_users_per_batch: int = 16,
                on_user_done: Callable[[str, list[float]], None] | None = None,
                tokens_per_forward: int = TOKENS_PER_FORWARD) -> dict[str, list[float]]:
    """Train every user's module (batched); returns {uid: per-epoch mean loss}; leaves the base clean."""
    return MultiUserTrainer(base, tok, examples_by_user, pcfg, ucfg, seed, max_len, max_users_per_batch,
                            save_root, on_user_done, tokens_per_forward).run()
