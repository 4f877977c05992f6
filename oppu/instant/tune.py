"""Losses through the engine's rows: a user's own items under each candidate bank module (how the
bank modules are ranked for that user), and held-out loss of mixed modules, with the
(top_k, temperature) it picks.

LossScorer loads every bank module into the base once (one slot each) and scores a user's probe
examples under many candidates in one forward: rows = candidates x examples, each row through its
own candidate's module, one mean target-token loss per candidate (the engine's training loss).

Validation users are non-test users outside the bank. Each one's last `val_items` history items are
held out: the user's vector comes from the items before them, and each candidate's mixed module is
scored by the mean target-token loss on the held-out items' examples, through the engine's rows
(one forward over all users' rows, each row with its own user's module). The candidate with the
lowest mean loss over users wins (ties: the first in grid order, i.e. fewer modules, colder).

    losses = heldout_losses(model, tok, {uid: (config, state)}, {uid: examples}, max_len=384)
    with LossScorer(model, tok, bank_modules, max_len=384) as sc:
        sc.losses(examples, [0, 5, 7])          # [3] mean loss of each candidate on these examples
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from oppu.engine import MultiUserModel, encode
from oppu.engine.batching import length_chunks, n_targets
from oppu.engine.train import decoder_and_head, token_loss_sums


@torch.no_grad()
def heldout_losses(model, tok, modules: Mapping[str, tuple], examples: Mapping[str, Sequence],
                   max_len: int, tokens_per_forward: int = 1024) -> dict[str, float]:
    """{uid: mean target-token loss of examples[uid] under modules[uid]} (the engine's loss)."""
    uids = sorted(examples)
    decoder, head = decoder_and_head(model)
    rows, row_users, row_group = [], [], []
    for g, uid in enumerate(uids):
        enc = encode(tok, examples[uid], max_len)
        rows += enc
        row_users += [uid] * len(enc)
        row_group += [g] * len(enc)
    sums = torch.zeros(len(uids), dtype=torch.float64)
    counts = torch.zeros(len(uids), dtype=torch.float64)
    for r, g in zip(rows, row_group):
        counts[g] += n_targets(r)
    with MultiUserModel(model) as mm:
        for uid in uids:
            mm.add_user(uid, *modules[uid])
        for chunk in length_chunks(rows, tokens_per_forward):
            sums += token_loss_sums(mm, decoder, head, [rows[i] for i in chunk], [row_users[i] for i in chunk],
                                    torch.tensor([row_group[i] for i in chunk]), len(uids),
                                    tok.pad_token_id).double().cpu()
    return {uid: float(sums[g] / counts[g].clamp(min=1)) for g, uid in enumerate(uids)}


class LossScorer:
    """Bank modules held in the base (slot per module) for ranking them on users' own examples.
    The base is wrapped while the scorer is open: nothing else may wrap it meanwhile."""

    def __init__(self, model, tok, modules: Sequence[tuple], max_len: int, tokens_per_forward: int = 1024) -> None:
        self.model, self.tok, self.modules = model, tok, modules
        self.max_len, self.tokens_per_forward = max_len, tokens_per_forward
        self.mm: MultiUserModel | None = None

    def __enter__(self) -> "LossScorer":
        self.mm = MultiUserModel(self.model)
        try:
            self.mm.reserve(next(iter(self._kinds())), len(self.modules))
            for i, m in enumerate(self.modules):
                self.mm.add_user(f"bank{i}", *m)
        except BaseException:
            self.mm.unwrap()
            raise
        self.decoder, self.head = decoder_and_head(self.model)
        return self

    def _kinds(self):
        from oppu.engine import kind_of
        return {kind_of(c) for c, _ in self.modules}

    def __exit__(self, *exc) -> None:
        self.mm.unwrap()
        self.mm = None

    @torch.no_grad()
    def losses(self, examples: Sequence, candidates: Sequence[int]) -> list[float]:
        """[len(candidates)] mean target-token loss of `examples` under each candidate bank module."""
        enc = encode(self.tok, examples, self.max_len)
        if not enc or not candidates:
            return [0.0] * len(candidates)
        rows = enc * len(candidates)
        users = [f"bank{c}" for c in candidates for _ in enc]
        group = [g for g in range(len(candidates)) for _ in enc]
        sums = torch.zeros(len(candidates), dtype=torch.float64)
        for chunk in length_chunks(rows, self.tokens_per_forward):
            sums += token_loss_sums(self.mm, self.decoder, self.head, [rows[i] for i in chunk],
                                    [users[i] for i in chunk], torch.tensor([group[i] for i in chunk]),
                                    len(candidates), self.tok.pad_token_id).double().cpu()
        n = sum(n_targets(e) for e in enc)
        return (sums / max(1, n)).tolist()


def pick(table: Mapping[tuple[int, float], float]) -> tuple[int, float]:
    """The candidate (top_k, temperature) with the lowest loss; ties to the first in insertion order."""
    best = min(table.values())
    return next(c for c, v in table.items() if v == best)
