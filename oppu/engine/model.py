"""MultiUserModel: the shared frozen base with many users' PEFT modules loaded side by side.

Every loaded user owns one slot in the bank of its PEFT type (engine/kinds.py; each type numbers
its slots on its own, slot 0 = no adapter); a batch names one user (or None = plain base) per
row, and each row is computed with its own module only, so users of different types, ranks,
alphas, target modules or virtual-token counts can share one batch. Users are read from and
written to the standard PEFT format (engine/format.py), so `PeftModel.from_pretrained` and this
class share adapters. Banks grow as users are loaded (`reserve` sizes them up front, as training
does so its optimizer keeps the same tensors).

    with MultiUserModel(base) as mm:                      # wraps target linears; unwraps on exit
        mm.add_user("u1", *read_adapter("adapters/u1"))
        inputs = mm.prepare(input_ids, attention_mask, users=["u1", None])
        logits = base(**inputs).logits                    # row i used users[i]'s module
        state = mm.user_state("u1")                       # PEFT's keys and shapes

Shapes: input_ids/attention_mask [N, T] (left or right padded); `prepare` returns
attention_mask/position_ids [N, P + T] and input_ids [N, T] or, when a row uses prompt tuning,
inputs_embeds [N, P + T, H] (P = the longest virtual prompt among the batch's users).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from oppu.engine.kinds import BANKS, kind_of
from oppu.engine.layers import MultiUserLinear, RowContext, reinstate_linear, restore_linear, wrap_linear


@dataclass
class LoadedUser:
    kind: str
    slot: int
    config: Any                    # the user's PeftConfig
    facts: dict[str, Any]          # what the bank needs to give the state back (ranks, sides, n_virtual)


class MultiUserModel:
    """See the module docstring. Not an nn.Module: it edits `base` in place and restores it."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self.ctx = RowContext()
        self.users: dict[str, LoadedUser] = {}
        self._wrapped: dict[str, MultiUserLinear] = {}
        self._grad_flags = {n: p.requires_grad for n, p in base.named_parameters()}
        for p in base.parameters():
            p.requires_grad_(False)
        self.device = base.get_input_embeddings().weight.device
        self.banks = {name: cls(self) for name, cls in BANKS.items()}
        self._cap = {k: 1 for k in BANKS}                 # slots per bank, slot 0 = no adapter
        self._free: dict[str, list[int]] = {k: [] for k in BANKS}
        self._open = True

    # ---- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "MultiUserModel":
        return self

    def __exit__(self, *exc) -> None:
        self.unwrap()

    def unwrap(self) -> None:
        """Put the base's original modules and requires_grad flags back; this object is spent."""
        if not self._open:
            return
        for path, w in self._wrapped.items():
            restore_linear(self.base, path, w)
        for n, p in self.base.named_parameters():
            p.requires_grad_(self._grad_flags.get(n, p.requires_grad))
        self._wrapped.clear()
        self.users.clear()
        self.ctx.clear()
        self._open = False

    @contextmanager
    def detached(self) -> Iterator[nn.Module]:
        """Temporarily give the base its plain modules back (e.g. for PEFT or another MultiUserModel)."""
        for path, w in self._wrapped.items():
            restore_linear(self.base, path, w)
        try:
            yield self.base
        finally:
            for path, w in self._wrapped.items():
                reinstate_linear(self.base, path, w)

    # ---- layers and slots -------------------------------------------------------------------
    def layer(self, path: str) -> MultiUserLinear:
        """The wrapped linear at `path`, wrapping it on first use."""
        if path not in self._wrapped:
            try:
                self._wrapped[path] = wrap_linear(self.base, path, self.ctx)
            except AttributeError:
                raise ValueError(f"the adapter targets module {path!r}, which this base does not have") from None
        return self._wrapped[path]

    def layers(self) -> Mapping[str, MultiUserLinear]:
        return self._wrapped

    def capacity(self, kind: str) -> int:
        return self._cap[kind]

    def reserve(self, kind: str, n_users: int) -> None:
        """Make room for n_users more users of `kind` without growing the banks again later."""
        need = n_users - len(self._free[kind])
        if need > 0:
            self._grow(kind, self._cap[kind] + need)

    def _grow(self, kind: str, slots: int) -> None:
        old = self._cap[kind]
        self._cap[kind] = slots
        self._free[kind].extend(range(old, slots))
        self.banks[kind].grow(slots)

    def _take_slot(self, kind: str) -> int:
        if not self._free[kind]:
            self._grow(kind, max(2, 2 * self._cap[kind]))
        return self._free[kind].pop(0)

    def remove_user(self, user_id: str) -> None:
        u = self.users.pop(user_id)
        self.banks[u.kind].reset(u.slot)
        self._free[u.kind].append(u.slot)
        self._free[u.kind].sort()

    # ---- users ------------------------------------------------------------------------------
    def add_user(self, user_id: str, config, state: Mapping[str, torch.Tensor]) -> int:
        """Load one user's module (PEFT state-dict keys) into a free slot; returns the slot."""
        if user_id in self.users:
            raise ValueError(f"user {user_id!r} is already loaded")
        kind = kind_of(config)
        slot = self._take_slot(kind)
        bank = self.banks[kind]
        bank.reset(slot)
        try:
            facts = bank.put(slot, config, state)
        except Exception:
            bank.reset(slot)
            self._free[kind].insert(0, slot)
            raise
        self.users[user_id] = LoadedUser(kind, slot, copy.deepcopy(config), facts)
        return slot

    def user_state(self, user_id: str) -> dict[str, torch.Tensor]:
        """The user's tensors under PEFT's saved key names and shapes (CPU copies)."""
        u = self.users[user_id]
        return self.banks[u.kind].state(u.slot, u.facts)

    def bank_params(self, kind: str) -> list[nn.Parameter]:
        """The stacked tensors of one PEFT type, each [S, ...] with the slot axis first."""
        return self.banks[kind].params()

    # ---- batches ----------------------------------------------------------------------------
    def slots_of(self, users: Sequence[str | None], kind: str) -> torch.Tensor:
        """[N] long: each row's slot in `kind`'s bank (0 for rows of other types or without a user)."""
        unknown = [u for u in users if u is not None and u not in self.users]
        if unknown:
            raise KeyError(f"user(s) {unknown[:5]} not loaded; loaded: {sorted(self.users)[:10]}")
        s = [self.users[u].slot if u is not None and self.users[u].kind == kind else 0 for u in users]
        return torch.tensor(s, dtype=torch.long, device=self.device)

    def set_rows(self, users: Sequence[str | None]) -> dict[str, torch.Tensor]:
        """Tell every wrapped layer which slot each row uses; returns {kind: slots [N]}."""
        rows = {k: self.slots_of(users, k) for k in BANKS}
        self.ctx.rows = {k: s for k, s in rows.items() if bool(s.any())}
        return rows

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                users: Sequence[str | None]) -> dict[str, torch.Tensor]:
        """Model inputs for a fresh (no cache) forward of rows owned by `users`; sets the row context.

        Returns input_ids or inputs_embeds, attention_mask and position_ids, with P virtual
        positions prepended when a row uses prompt tuning."""
        if input_ids.shape[0] != len(users):
            raise ValueError(f"{input_ids.shape[0]} rows but {len(users)} users")
        rows = self.set_rows(users)
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids.to(self.device)}
        att = attention_mask.to(self.device).long()
        for kind, bank in self.banks.items():
            inputs, att = bank.prepare(inputs, att, rows[kind])
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        return {**inputs, "attention_mask": att, "position_ids": pos}
