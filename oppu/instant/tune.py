"""Held-out loss of mixed modules, and the (top_k, temperature) it picks: the generator's one choice.

Validation users are non-test users outside the bank. Each one's last `val_items` history items are
held out: the user's vector comes from the items before them, and each candidate's mixed module is
scored by the mean target-token loss on the held-out items' examples, through the engine's rows
(one forward over all users' rows, each row with its own user's module). The candidate with the
lowest mean loss over users wins (ties: the first in grid order, i.e. fewer modules, colder).

    losses = heldout_losses(model, tok, {uid: (config, state)}, {uid: examples}, max_len=384)
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


def pick(table: Mapping[tuple[int, float], float]) -> tuple[int, float]:
    """The candidate (top_k, temperature) with the lowest loss; ties to the first in insertion order."""
    best = min(table.values())
    return next(c for c, v in table.items() if v == best)
