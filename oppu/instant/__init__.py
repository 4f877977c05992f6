"""Instant adapters: a new user's PEFT module in milliseconds, without training on that user.

A bank of modules is trained once per task-adapted base on non-test users (oppu.instant.bank, the
same batched engine as OPPU); a user's module is the mixture of the bank modules that best explain
the user's own latest items. By default (instant.select = "router") a ridge regression learned once
per bank (oppu.instant.router) predicts, from one forward of the user's probe items, the ranking
"grad" computes exactly: the cosine of each bank module's weight change with the descent direction of
those items (one forward and backward, oppu.instant.grad); "loss" scores the `candidates` most similar
histories' modules by the probe items' loss under them (oppu.instant.tune.LossScorer) and "tfidf" by
history similarity alone (oppu.instant.represent). The top k are mixed with softmax(affinity /
temperature) weights (oppu.instant.mix), written as a standard PEFT adapter. LoRA and IA3 are covered; prompt tuning
is refused. The methods `instant`, `instant_rag` and `instant_pag` serve these modules in
the prompt shapes of `oppu`, `oppu_rag` and `oppu_pag`.

    bank = open_bank(session, ["instant"])
    with bank.scorer(session.model, session.tok, max_len=384) as sc:   # the bank's modules held in the base
        facts = write_instant(bank, session.test, "runs/x/instant_adapters", scorer=sc)
    raw = session.generate(session.test, ["instant"], "runs/x/instant_adapters")
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from oppu.engine import write_adapter
from oppu.instant.bank import Bank, open_bank, torch_threads
from oppu.store.files import safe_user_dir

__all__ = ["Bank", "instant_stage", "open_bank", "write_instant"]


def write_instant(bank: Bank, users: Sequence, out_dir: str | Path, max_history_items: int = 0,
                  base_name: str | None = None, scorer=None) -> dict[str, Any]:
    """Each user's instant module into out_dir/<user>/ (PEFT files), from that user's own (most
    recent `max_history_items`, 0 = all) history items and the bank alone; per-user facts with the
    seconds it took (history vector, weights, mixing, writing) and the bank users it mixed, on
    bank.threads torch threads (None: unchanged)."""
    with torch_threads(bank.threads):
        return _write_all(bank, users, out_dir, max_history_items, base_name, scorer)


def _write_all(bank: Bank, users: Sequence, out_dir: str | Path, n: int, base_name: str | None, scorer) -> dict:
    out = {}
    for u in users:
        t0 = time.perf_counter()
        items = u.history[-n:] if n else u.history
        w = bank.weights_for(items, scorer)
        config, state = bank.mixed(w)
        write_adapter(Path(out_dir) / safe_user_dir(u.user_id), config, state, base_name)
        out[u.user_id] = {"seconds": round(time.perf_counter() - t0, 4), "rank": getattr(config, "r", None),
                          "mixed": [[bank.ids[i], round(x, 4)] for i, x in w[:8]], "dir": safe_user_dir(u.user_id)}
    return out


def instant_stage(s, users: Sequence, out_dir: str | Path, methods: Sequence[str]) -> dict[str, Any]:
    """The pipeline's instant stage: open (or build) the bank, write every user's module; returns
    {"bank": facts, "users": per-user facts, "seconds_per_user": mean generation seconds}."""
    bank = open_bank(s, methods)
    c = s.cfg
    t0 = time.perf_counter()
    with bank.scorer(s.model, s.tok, c.max_prompt_tokens, c.tokens_per_forward) as sc:
        t1 = time.perf_counter()  # the bank's modules loaded into the base once: set-up, like opening the bank
        facts = write_instant(bank, users, out_dir, c.max_history_items, s.model.__dict__.get("name_or_path") or None,
                              sc)
    per = sum(f["seconds"] for f in facts.values()) / max(1, len(users))
    return {"bank": {**bank.info, "mix": bank.mix, "select": bank.select, "top_k": bank.top_k,
                     "temperature": bank.temperature, "load_s": round(t1 - t0, 3)},
            "users": facts, "seconds_per_user": round(per, 4)}


