"""Instant adapters in the service: a user with history but no trained version is served at once by
a module mixed from a bank (oppu.instant), published in the store as a version marked `instant`.

The bank is the one `oppu run --methods ...,instant` built and tuned for its task-adapted base
(recorded in run.json: its directory, top_k, temperature, probe items), or one built for the
`--base tiny` server from its built-in world's non-test users. A user's module depends only on that
user's own latest `probe_items` history items and the fixed bank: the bank's router (one forward of
those items through the plain serving base, oppu.instant.router) or, for banks built with
instant.select: grad, the gradient of their loss (oppu.instant.grad) ranks the bank modules, the
top_k are mixed.

    bank = ServedBank.from_run("runs/x/run.json")     # None when that run built no bank
    config, state, facts = bank.module(p, items)       # p: the service's Personalizer
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from oppu.data.users import User
from oppu.engine.kinds import kind_of
from oppu.instant.bank import read_bank
from oppu.instant.grad import GradScorer
from oppu.instant.mix import knn_weights, mix_modules, uniform_weights
from oppu.instant.router import Router, RouterScorer
from oppu.store.records import INSTANT_NOTE


SERVED_SELECTS = ("router", "grad")


@dataclass
class ServedBank:
    ids: list[str]
    modules: list[tuple]                 # (PEFT config, state) per bank user
    peft_type: str
    top_k: int = 8
    temperature: float = 0.1
    mix: str = "knn"                     # knn | uniform
    probe_items: int = 8
    info: dict = field(default_factory=dict)
    router: Router | None = None         # the bank's router; None: the gradient ranking
    _scorers: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError("an instant bank needs at least one module")
        if self.mix not in ("knn", "uniform"):
            raise ValueError(f"the service serves instant banks mixed by knn or uniform, not {self.mix!r}")

    @classmethod
    def from_dir(cls, bank_dir: str | Path, **kw) -> "ServedBank":
        """The modules of a bank directory (bank.json + one PEFT dir per bank user)."""
        root = Path(bank_dir)
        if not (root / "bank.json").is_file():
            raise FileNotFoundError(f"{root} is not an instant bank (no bank.json); build one with "
                                    "`oppu run --methods ...,instant`")
        meta, modules = read_bank(root)
        ids = meta["ids"]
        peft = kind_of(modules[0][0])
        return cls(ids, modules, peft, info={"dir": str(root), "users": len(ids), **kw.pop("info", {})}, **kw)

    @classmethod
    def from_run(cls, run_json: str | Path) -> "ServedBank | None":
        """The bank an `oppu run` output used (its tuned top_k / temperature), None when it used none."""
        p = Path(run_json)
        p = p if p.name == "run.json" else p / "run.json"
        if not p.is_file():
            return None
        run = json.loads(p.read_text())
        bank = (run.get("instant") or {}).get("bank")
        if not bank:
            return None
        icfg = (run.get("config") or {}).get("instant") or {}
        select = bank.get("select", "grad")
        if select not in SERVED_SELECTS:
            raise ValueError(f"{p}: its instant bank ranks modules by {select!r}; the service serves "
                             f"{' or '.join(SERVED_SELECTS)} (instant.select)")
        router = Router.load(Path(bank["router"]["file"]), bank["router"]) if select == "router" else None
        return cls.from_dir(bank["dir"], top_k=int(bank["top_k"]), temperature=float(bank["temperature"]),
                            mix=bank.get("mix", "knn"), probe_items=int(icfg.get("probe_items", 8)),
                            info={"run": str(p)}, router=router)

    @classmethod
    def from_bank(cls, bank, probe_items: int) -> "ServedBank":
        """A ServedBank over an oppu.instant.Bank opened in this process (the tiny server's own)."""
        if bank.select not in SERVED_SELECTS:
            raise ValueError(f"the service serves {' or '.join(SERVED_SELECTS)} (instant.select), not {bank.select!r}")
        peft = kind_of(bank.modules[0][0])
        return cls(list(bank.ids), list(bank.modules), peft, bank.top_k, bank.temperature, bank.mix, probe_items,
                   info={**bank.info, "users": len(bank.ids)}, router=bank.router)

    def describe(self) -> dict[str, Any]:
        return {"users": len(self.ids), "peft": self.peft_type, "top_k": self.top_k,
                "temperature": self.temperature, "mix": self.mix, "probe_items": self.probe_items,
                "select": "router" if self.router is not None else "grad", "dir": self.info.get("dir")}

    def weights(self, p, items: Sequence[dict]) -> list[tuple[int, float]]:
        """[(bank index, weight)] for a user with these (their own) history items, ranked through
        p's plain serving base (under p.lock: generation waits for one forward, and a backward
        without a router)."""
        if self.mix == "uniform":
            return uniform_weights(len(self.ids))
        exs = p.examples(User("probe", list(items[-self.probe_items:]), []), ["plain"])
        with p.plain_base() as model:
            sc = self._scorers.get(id(model))
            if sc is None:
                sc = self._scorers[id(model)] = (
                    RouterScorer(model, p.tok, self.router, p.max_len, p.tokens_per_forward) if self.router is not None
                    else GradScorer(model, p.tok, self.modules, p.max_len, p.tokens_per_forward))
            with sc:
                aff = sc.affinities(exs)
        return knn_weights(aff, min(self.top_k, len(self.ids)), self.temperature)

    def module(self, p, items: Sequence[dict]) -> tuple[Any, dict, dict[str, Any]]:
        """(PEFT config, state, facts) of the instant module for a user with these history items."""
        t0 = time.perf_counter()
        w = self.weights(p, items)
        config, state = mix_modules([self.modules[i] for i, _ in w], [x for _, x in w])
        facts = {"kind": INSTANT_NOTE, "mixed": [[self.ids[i], round(float(x), 4)] for i, x in w[:8]],
                 "probe_items": min(self.probe_items, len(items)), "seconds": round(time.perf_counter() - t0, 4)}
        return config, state, facts
