"""Instant adapters: a new user's PEFT module in milliseconds, without training on that user.

A bank of modules is trained once per task-adapted base on non-test users (oppu.instant.bank, the
same batched engine as OPPU); a user's module is the mixture of the bank modules of the users whose
histories are most like theirs (TF-IDF cosine, oppu.instant.represent; softmax weights over the
top k, oppu.instant.mix), written as a standard PEFT adapter. LoRA and IA3 are covered; prompt
tuning is refused. The methods `instant`, `instant_rag` and `instant_pag` serve these modules in
the prompt shapes of `oppu`, `oppu_rag` and `oppu_pag`.

    bank = open_bank(session, ["instant"])
    facts = write_instant(bank, session.test, "runs/x/instant_adapters")
    raw = session.generate(session.test, ["instant"], "runs/x/instant_adapters")
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from oppu.engine import write_adapter
from oppu.instant.bank import Bank, open_bank
from oppu.store.files import safe_user_dir

__all__ = ["Bank", "instant_stage", "open_bank", "write_instant"]


def write_instant(bank: Bank, users: Sequence, out_dir: str | Path, max_history_items: int = 0,
                  base_name: str | None = None) -> dict[str, Any]:
    """Each user's instant module into out_dir/<user>/ (PEFT files), from that user's own (most
    recent `max_history_items`, 0 = all) history items and the bank alone; per-user facts with the
    seconds it took (history vector, weights, mixing, writing) and the bank users it mixed."""
    n = max_history_items
    out = {}
    for u in users:
        t0 = time.perf_counter()
        items = u.history[-n:] if n else u.history
        w = bank.weights_for(items)
        config, state = bank.module_for(items)
        write_adapter(Path(out_dir) / safe_user_dir(u.user_id), config, state, base_name)
        out[u.user_id] = {"seconds": round(time.perf_counter() - t0, 4), "rank": getattr(config, "r", None),
                          "mixed": [[bank.ids[i], round(x, 4)] for i, x in w[:8]], "dir": safe_user_dir(u.user_id)}
    return out


def instant_stage(s, users: Sequence, out_dir: str | Path, methods: Sequence[str]) -> dict[str, Any]:
    """The pipeline's instant stage: open (or build) the bank, write every user's module; returns
    {"bank": facts, "users": per-user facts, "seconds_per_user": mean generation seconds}."""
    bank = open_bank(s, methods)
    t0 = time.perf_counter()
    facts = write_instant(bank, users, out_dir, s.cfg.max_history_items, s.model.__dict__.get("name_or_path") or None)
    per = (time.perf_counter() - t0) / max(1, len(users))
    return {"bank": {**bank.info, "mix": bank.mix, "top_k": bank.top_k, "temperature": bank.temperature},
            "users": facts, "seconds_per_user": round(per, 4)}


