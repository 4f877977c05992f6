"""The one trainer: many users' PEFT modules trained in one pass over the frozen base.

Same result as training each user alone (PEFT module, plain loop), to float tolerance: the same
seeded start (engine/format.initial_module) or a saved version to continue from, the same data
order (batching.batches with the user's seed), the same loss (mean over that user's target
tokens), the same per-user gradient clipping and the same AdamW (StackedAdamW), each user with
its own step count and learning-rate schedule.

A global step takes, for every active user, that user's next mini-batch; the rows of all of
them go through the base in length-sorted chunks of at most `tokens_per_forward` padded tokens,
and the row -> slot index makes each row use only its own user's parameters. The loss to
backprop is the sum over users of their own mean loss, so each user's gradient is its solo
gradient. Logits are computed only at target positions (the lm_head of a real base is a large
share of its FLOPs). At most `max_users_per_batch` users train together; when one finishes, it is
handed to `on_user_done` and the next waiting user takes its slot.

    trainer = Trainer(base, tok, {"u1": exs1, "u2": exs2}, pcfg, ucfg, seed=0)
    losses = trainer.run()                                   # {uid: [epoch mean losses]}
    train_users(base, tok, exs_by_user, pcfg, ucfg, 0, save_root="out/adapters")   # PEFT dirs
    Trainer(..., start={"u1": read_adapter("v1")}).run()     # continue a saved version

`train_full` trains every weight of a model (the tiny from-scratch base) with the same loss.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from oppu.config import TOKENS_PER_FORWARD
from oppu.engine.batching import Encoded, batches, collate, encode, length_chunks, n_targets
from oppu.engine.format import initial_module, user_seed, write_adapter
from oppu.engine.kinds import kind_of
from oppu.engine.model import MultiUserModel
from oppu.engine.optim import StackedAdamW, lr_at, warmup_steps
from oppu.engine.prefix import FrozenPrefix

UserDone = Callable[[str, list[float], object, dict], None]   # (uid, losses, config, state)


def decoder_and_head(base):
    """(decoder, lm_head) of a standard causal LM, so the loss needs logits at target positions only."""
    decoder, head = getattr(base, "base_model", base), base.get_output_embeddings()
    if decoder is base or head is None:
        raise ValueError(f"{type(base).__name__} has no separate decoder/lm_head; the engine needs a "
                         "standard *ForCausalLM model")
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(base.config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(base).__name__} post-processes logits ({attr}={getattr(base.config, attr)}), "
                             "which the engine's trainer does not reproduce")
    return decoder, head


def token_loss_sums(mm: MultiUserModel | None, decoder, head, rows: Sequence[Encoded],
                    row_users: Sequence[str | None], row_group: torch.Tensor, n_groups: int,
                    pad_id: int, prefix: FrozenPrefix | None = None) -> torch.Tensor:
    """Sum of the target-token losses of each group of rows [G] (differentiable), one forward over
    `rows` right-padded; row_group [N] maps row -> group (user) index. mm=None: the plain model.
    `prefix`: reuse the rows' hidden states below the lowest adapted layer (engine.prefix)."""
    b = collate(rows, pad_id)
    if mm is not None:
        inputs = mm.prepare(b["input_ids"], b["attention_mask"], row_users)
    else:
        dev = head.weight.device
        inputs = {"input_ids": b["input_ids"].to(dev), "attention_mask": b["attention_mask"].to(dev)}
    dev = inputs["attention_mask"].device
    n_prefix = inputs["attention_mask"].shape[1] - b["input_ids"].shape[1]
    if prefix is not None:
        h = prefix.forward(rows, inputs)                                # [N, T, H], top layers only
    else:
        h = decoder(**inputs, use_cache=False).last_hidden_state        # [N, P + T, H]
    lab = b["labels"].to(dev)
    r, c = (lab[:, 1:] != -100).nonzero(as_tuple=True)                  # position c predicts token c + 1
    if mm is not None:
        with mm.ctx.select(r):                                          # a wrapped lm_head sees [M] rows
            logits = head(h[r, n_prefix + c]).float()                    # [M, V]
    else:
        logits = head(h[r, n_prefix + c]).float()
    tok_loss = F.cross_entropy(logits, lab[r, c + 1], reduction="none")  # [M]
    g = row_group.to(dev)[r]
    return torch.zeros(n_groups, dtype=tok_loss.dtype, device=dev).index_add(0, g, tok_loss)


def backward_per_user_loss(mm: MultiUserModel | None, decoder, head, rows: Sequence[Encoded],
                           row_users: Sequence[str | None], row_group: Sequence[int], n_groups: int, pad_id: int,
                           tokens_per_forward: int,
                           prefix: FrozenPrefix | None = None,
                           pause: Callable[[], object] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate the sum over groups (users) of each group's mean target-token loss (as HF
    computes it for that group's rows alone), in length-sorted chunks of at most
    `tokens_per_forward` padded tokens whose gradients accumulate; returns each group's mean loss
    [G] (detached) and number of target tokens [G]. `pause()` runs between chunks (a server lets
    generation go first there); it does not change the arithmetic."""
    per_group = [0] * n_groups
    for e, gi in zip(rows, row_group):
        per_group[gi] += n_targets(e)
    counts = torch.tensor(per_group, dtype=torch.long)
    total = torch.zeros(n_groups, dtype=torch.float32)
    for ci, chunk in enumerate(length_chunks(rows, tokens_per_forward)):
        if ci and pause is not None:
            pause()
        sums = token_loss_sums(mm, decoder, head, [rows[i] for i in chunk], [row_users[i] for i in chunk],
                               torch.tensor([row_group[i] for i in chunk]), n_groups, pad_id, prefix)
        (sums / counts.to(sums.device).clamp(min=1)).sum().backward()
        total += sums.detach().cpu()
    return total / counts.clamp(min=1), counts


ENCODE_CHUNK = 256  # examples tokenized at once when a user joins (each example is tokenized alone: same ids)


@dataclass
class _Run:
    """One user's training in progress: plan [(epoch, example indices)], cursor, loss sums."""
    uid: str
    data: list[Encoded]
    plan: list[tuple[int, list[int]]]
    start: tuple | None = None                             # (config, state) to continue from
    pos: int = 0
    loss_tok: list[float] = field(default_factory=list)   # per epoch: sum of batch loss * n tokens
    n_tok: list[int] = field(default_factory=list)


class Trainer:
    """Drives batched training step by step (`step()`), or all the way (`run()`). See module docstring.

    ucfg: epochs, lr, batch_size, weight_decay, warmup_ratio, max_grad_norm (UserTrainConfig).
    start: {uid: (config, state)} continues those users from a saved module instead of a fresh one.
    order_seeds: {uid: seed} for the data order (default user_seed(seed, uid)).
    """

    def __init__(self, base, tok, examples_by_user: Mapping[str, Sequence], pcfg, ucfg, seed: int,
                 max_len: int = 384, max_users_per_batch: int = 16, on_user_done: UserDone | None = None,
                 tokens_per_forward: int = TOKENS_PER_FORWARD, start: Mapping[str, tuple] | None = None,
                 order_seeds: Mapping[str, int] | None = None, group_by_length: bool = False,
                 on_step: Callable[[int, dict[str, float]], None] | None = None, reuse_prefix: bool = True,
                 reserve: int | None = None, epoch_size: int = 0) -> None:
        if max_users_per_batch < 1 or tokens_per_forward < 1:
            raise ValueError(f"max_users_per_batch and tokens_per_forward must be >= 1, got "
                             f"{max_users_per_batch}, {tokens_per_forward}")
        self.kind = kind_of(pcfg)
        self.base, self.tok, self.pcfg, self.ucfg, self.seed = base, tok, pcfg, ucfg, seed
        self.group, self.tokens_per_forward = max_users_per_batch, tokens_per_forward
        self.on_user_done, self.on_step = on_user_done, on_step
        self.pause: Callable[[], object] | None = None  # runs between a step's chunks and between encode chunks
        start, order_seeds = start or {}, order_seeds or {}
        self.max_len, self.group_by_length, self.epoch_size = max_len, group_by_length, epoch_size
        self.waiting: deque[_Run] = deque()
        for uid, exs in examples_by_user.items():
            self.waiting.append(self._new_run(uid, exs, start.get(uid), order_seeds.get(uid)))
        self.active: dict[int, _Run] = {}     # slot -> run
        self.parked: list[str] = []           # finished users still holding a slot (freed when needed)
        self.losses: dict[str, list[float]] = {}
        self.decoder, self.head = decoder_and_head(base)
        self.mm = MultiUserModel(base)
        self.mm.reserve(self.kind, reserve or min(self.group, len(self.waiting)))
        self.opt: StackedAdamW | None = None
        self.n_steps = 0
        self.prefix_pending = reuse_prefix        # decided once the first modules are in (engine/prefix.py)
        self.prefix: FrozenPrefix | None = None

    def _new_run(self, uid: str, exs: Sequence, start: tuple | None, order_seed: int | None) -> _Run:
        if not exs:
            raise ValueError(f"user {uid!r} has no training examples")
        data = []
        for i in range(0, len(exs), ENCODE_CHUNK):  # in chunks, pausing between (a server's generation goes first)
            if i and self.pause is not None:
                self.pause()
            data += encode(self.tok, exs[i:i + ENCODE_CHUNK], self.max_len)
        seed = user_seed(self.seed, uid) if order_seed is None else order_seed
        plan = batches(len(data), self.ucfg.batch_size, self.ucfg.epochs, seed,
                       [len(e.ids) for e in data] if self.group_by_length else None, epoch_size=self.epoch_size)
        return _Run(uid, data, [(e, idx) for e, epoch in enumerate(plan) for idx in epoch], start)

    def add(self, uid: str, examples: Sequence, start: tuple | None = None, order_seed: int | None = None) -> None:
        """One more user joins this run: they get a slot (and a mini-batch in every step) as soon as
        one is free. Same result as if they had been in `examples_by_user` from the start."""
        if any(r.uid == uid for r in (*self.waiting, *self.active.values())):
            raise ValueError(f"user {uid!r} is already training in this run")
        run = self._new_run(uid, examples, start, order_seed)
        if uid in self.parked:  # done earlier in this run: its finished module makes room for the new one
            self.parked.remove(uid)
            self.mm.remove_user(uid)
        self.waiting.append(run)

    def cancel(self, uid: str) -> bool:
        """Drop a user's module (waiting, training or parked) and its data from this run; False when
        the run does not hold it. The other users go on as if it had never been there."""
        found = False
        for run in [r for r in self.waiting if r.uid == uid]:
            self.waiting.remove(run)
            found = True
        for slot in [s for s, r in self.active.items() if r.uid == uid]:
            if self.prefix is not None:
                self.prefix.forget(self.active[slot].data)
            del self.active[slot]
            found = True
        if uid in self.parked:
            self.parked.remove(uid)
        if uid in self.mm.users:
            self.mm.remove_user(uid)
            found = True
        return found

    def fresh_shapes(self) -> dict[str, tuple]:
        """{state key: shape} of a fresh module of this run (a module continued from a saved state
        may join only with the same shapes)."""
        if getattr(self, "_fresh", None) is None:
            with self.mm.detached() as base:
                self._fresh = {k: tuple(v.shape) for k, v in initial_module(base, self.pcfg, self.seed, "-")[1].items()}
        return self._fresh

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def _module(self, run: _Run) -> tuple:
        if run.start is not None:
            if kind_of(run.start[0]) != self.kind:
                raise ValueError(f"user {run.uid!r}: cannot continue a {kind_of(run.start[0])} module as {self.kind}")
            return run.start
        with self.mm.detached() as base:
            return initial_module(base, self.pcfg, self.seed, run.uid)

    def _fill(self) -> None:
        while self.waiting and len(self.active) < self.group:
            if len(self.active) + len(self.parked) >= self.group:
                self.mm.remove_user(self.parked.pop(0))
            run = self.waiting.popleft()
            slot = self.mm.add_user(run.uid, *self._module(run))
            params = self.mm.bank_params(self.kind)
            if self.opt is None:
                self.opt = StackedAdamW(params, weight_decay=self.ucfg.weight_decay)
            elif [id(p) for p in params] != [id(p) for p in self.opt.params]:
                raise RuntimeError("the parameter banks were reallocated mid-training (users with different "
                                   "target modules or sizes in one run?); train them in separate runs")
            self.opt.reset(slot)
            self.active[slot] = run
        for p in self.mm.bank_params(self.kind):
            p.requires_grad_(True)
        if self.prefix_pending:
            self.prefix_pending = False
            n_tokens = sum(len(e.ids) for r in (*self.waiting, *self.active.values()) for e in r.data)
            self.prefix = FrozenPrefix.for_trainer(self.decoder, list(self.mm.layers()), self.ucfg.epochs, n_tokens)

    def _lr(self, run: _Run) -> float:
        total = len(run.plan)
        return lr_at(run.pos, total, self.ucfg.lr, warmup_steps(total, self.ucfg.warmup_ratio))

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
                                               len(slots), self.tok.pad_token_id, self.tokens_per_forward,
                                               self.prefix, self.pause)
        self.opt.step(slots, [self._lr(self.active[s]) for s in slots], max_grad_norm=self.ucfg.max_grad_norm)
        self.opt.zero_grad()
        self.n_steps += 1
        out = {}
        for s, loss, n in zip(slots, means.tolist(), counts.tolist()):
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
        if self.on_step:
            self.on_step(self.n_steps, out)
        return out

    def _finish(self, slot: int) -> None:
        run = self.active.pop(slot)
        if self.prefix is not None:
            self.prefix.forget(run.data)
        self.losses[run.uid] = [t / max(1, n) for t, n in zip(run.loss_tok, run.n_tok)]
        self.parked.append(run.uid)
        if self.on_user_done:
            u = self.mm.users[run.uid]
            self.on_user_done(run.uid, self.losses[run.uid], u.config, self.mm.user_state(run.uid))

    def run(self) -> dict[str, list[float]]:
        try:
            while self.busy:
                self.step()
        finally:
            self.close()
        return self.losses

    def close(self) -> None:
        self.mm.unwrap()
        self.base.eval()


def train_users(base, tok, examples_by_user: Mapping[str, Sequence], pcfg, ucfg, seed: int,
                save_root: str | Path | None = None, max_len: int = 384, max_users_per_batch: int = 16,
                on_user_done: Callable[[str, list[float]], None] | None = None,
                tokens_per_forward: int = TOKENS_PER_FORWARD) -> dict[str, list[float]]:
    """Train every user's module; with save_root, write each to save_root/<safe_user_dir(uid)>/ in the
    PEFT format. Returns {uid: per-epoch mean loss}; leaves the base clean."""
    from oppu.store.files import safe_user_dir

    base_name = base.__dict__.get("name_or_path") or None

    def done(uid, losses, config, state):
        if save_root is not None:
            write_adapter(Path(save_root) / safe_user_dir(uid), config, state, base_name)
        if on_user_done:
            on_user_done(uid, losses)

    return Trainer(base, tok, examples_by_user, pcfg, ucfg, seed, max_len, max_users_per_batch, done,
                   tokens_per_forward).run()


def train_full(model, tok, examples: Sequence, cfg, seed: int, max_len: int,
               on_step: Callable[[int, float], None] | None = None,
               tokens_per_forward: int = TOKENS_PER_FORWARD, epoch_size: int = 0) -> list[float]:
    """Train every weight of `model` (AdamW, warm-up + cosine, clip 1.0, length-grouped batches) with
    the engine's target-only loss; returns the mean loss of each epoch (token-weighted). `examples`
    may come encoded already (engine.encode); `epoch_size` caps examples per epoch (batches)."""
    data = list(examples) if examples and isinstance(examples[0], Encoded) else encode(tok, examples, max_len)
    if not data:
        raise ValueError("no training examples")
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    decoder, head = decoder_and_head(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=getattr(cfg, "weight_decay", 0.0))
    plan = batches(len(data), cfg.batch_size, cfg.epochs, seed, [len(e.ids) for e in data], epoch_size=epoch_size)
    total = sum(len(e) for e in plan)
    warmup = warmup_steps(total, cfg.warmup_ratio)
    model.train()
    step, epoch_losses = 0, []
    for epoch in plan:
        tot_loss, tot_tok = 0.0, 0
        for idx in epoch:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.lr, warmup)
            rows = [data[i] for i in idx]
            mean, n = backward_per_user_loss(None, decoder, head, rows, [None] * len(rows), [0] * len(rows), 1,
                                             tok.pad_token_id, tokens_per_forward)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tot_loss += float(mean[0]) * int(n[0])
            tot_tok += int(n[0])
            step += 1
            if on_step:
                on_step(step, float(mean[0]))
        epoch_losses.append(tot_loss / max(1, tot_tok))
    for p in params:
        p.requires_grad_(False)
    model.eval()
    return epoch_losses
