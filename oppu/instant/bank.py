"""The adapter bank: one module per bank user, trained once per task-adapted base and cached.

Bank and validation users are drawn (seeded) from the non-test users with at least
`val_items + 1` history items: the first `bank_users` form the bank, the next `val_users` pick
(top_k, temperature) by held-out loss (oppu.instant.tune). Bank modules are trained by the same
batched engine as OPPU (Session.train), on the prompt variants the instant methods serve.

Cached under the base's own cache dir, `<base>/instant/bank-<key>/` (bank.json + one PEFT dir per
bank user); the key hashes the base, the bank users' ids and content, the PEFT type and training
settings, the prompt settings and the seed, so a cached bank is reused exactly when a rebuild
would train the same modules. The tuned choice is cached beside it under its own key.

    bank = open_bank(session, ["instant", "instant_rag"])      # trains or loads, then tunes
    with bank.scorer(session.model, session.tok, max_len=384) as sc:
        config, state = bank.module_for(user.history, sc)      # that user's instant module
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from oppu.data.users import User
from oppu.engine import read_adapter
from oppu.examples import variants_for
from oppu.fingerprint import data_fingerprint, fingerprint
from oppu.instant.grad import GradScorer
from oppu.instant.mix import LoraStack, check_mixable, knn_weights, mix_modules, uniform_weights
from oppu.instant.represent import HistoryVectors, history_text
from oppu.instant.router import PENALTIES, Router, RouterScorer, fit_router, probe_features
from oppu.instant.tune import LossScorer, heldout_losses, pick
from oppu.progress import NoProgress
from oppu.store.files import safe_user_dir


MIN_ROUTER_USERS = 8                     # fewer: the gradient ranking itself, said in the log and run.json
SMALL_BASE = 20_000_000                  # parameters: under it, instant modules are written on one torch thread


def instant_threads(model, setting: int) -> int | None:
    """Torch threads for writing instant modules: `setting` when > 0; 0 = one for a base under
    SMALL_BASE parameters (a user's work is a chain of small ops, where a second thread's hand-offs
    cost more than it brings: 17-20 ms per user on one thread against 41-48 ms on two, tiny base,
    LaMP_2M), None = leave torch's setting (larger bases, where the matmuls dominate)."""
    if setting > 0:
        return setting
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_BASE else None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclasses.dataclass
class Bank:
    task: Any
    ids: list[str]
    modules: list[tuple]                 # (PEFT config, state) per bank user, in ids order
    vectors: HistoryVectors
    matrix: Any                          # [n_bank, V] the bank users' history vectors
    mix: str = "knn"
    top_k: int = 8
    temperature: float = 0.1
    select: str = "tfidf"                # affinity: "router" | "grad" | "loss" (need a scorer and probe_fn) | "tfidf"
    candidates: int = 16
    probe_fn: Any = None                 # items -> the probe examples scored under candidate modules
    info: dict = dataclasses.field(default_factory=dict)
    router: Router | None = None         # select="router": learned by open_bank
    threads: int | None = None           # torch threads while writing modules (instant_threads; None: unchanged)
    _stack: Any = dataclasses.field(default=None, repr=False)

    def scorer(self, model, tok, max_len: int, tokens_per_forward: int = 1024):
        """The context select="router" (RouterScorer), "grad" (GradScorer) or "loss" (LossScorer: every
        bank module held in the base) scores users in; a no-op for "tfidf"."""
        if self.select == "router":
            if self.router is None:
                raise ValueError("select='router' needs the bank's router (open_bank learns it)")
            return RouterScorer(model, tok, self.router, max_len, tokens_per_forward)
        cls = {"grad": GradScorer, "loss": LossScorer}.get(self.select)
        return cls(model, tok, self.modules, max_len, tokens_per_forward) if cls else contextlib.nullcontext()

    def affinities(self, items: Sequence[dict], scorer=None) -> np.ndarray:
        """[n_bank] how well each bank module suits a user with these (their own) history items:
        select="grad", the cosine of the module's weight change with the user's probe items' descent
        direction (oppu.instant.grad); "router", that cosine as predicted from one forward's features
        (oppu.instant.router); "tfidf", the TF-IDF cosine of the histories; "loss", minus the
        mean loss of the probe items under each of the `candidates` most similar histories' modules
        (-inf elsewhere)."""
        if self.select != "tfidf" and (scorer is None or self.probe_fn is None):
            raise ValueError(f"select={self.select!r} needs an open bank.scorer(...) and probe_fn")
        if self.select in ("grad", "router"):
            return scorer.affinities(self.probe_fn(items))
        sims = self.matrix @ self.vectors.vector(history_text(self.task, items))
        if self.select == "tfidf":
            return sims
        cands = knn_weights(sims, min(self.candidates, len(self.ids)), 1.0)
        aff = np.full(len(self.ids), -np.inf)
        idx = [i for i, _ in cands]
        aff[idx] = [-x for x in scorer.losses(self.probe_fn(items), idx)]
        return aff

    def weights_from(self, aff: np.ndarray, top_k: int | None = None,
                     temperature: float | None = None) -> list[tuple[int, float]]:
        if self.mix == "uniform":
            return uniform_weights(len(self.ids))
        return knn_weights(aff, min(top_k or self.top_k, len(self.ids)), temperature or self.temperature)

    def weights_for(self, items: Sequence[dict], scorer=None, **kw) -> list[tuple[int, float]]:
        """[(bank index, weight)] for a user with these history items (their own items only)."""
        if self.mix == "uniform":
            return uniform_weights(len(self.ids))
        return self.weights_from(self.affinities(items, scorer), **kw)

    def mixed(self, w: Sequence[tuple[int, float]]) -> tuple:
        """The mixture (oppu.instant.mix) of bank modules [(index, weight)]: LoRA through the bank's
        stacked layers (built once), equal to mix_modules on the same modules."""
        if self._stack is None:
            self._stack = LoraStack(self.modules) if check_mixable(self.modules) == "LORA" else False
        if self._stack:
            return self._stack.mix([i for i, _ in w], [x for _, x in w])
        return mix_modules([self.modules[i] for i, _ in w], [x for _, x in w])

    def module_for(self, items: Sequence[dict], scorer=None, **kw) -> tuple:
        return self.mixed(self.weights_for(items, scorer, **kw))


def read_bank(root: Path) -> tuple[dict, list[tuple]]:
    """(bank.json, [(PEFT config, state) per bank user in its ids order]) of a bank directory."""
    meta = json.loads((root / "bank.json").read_text())
    return meta, [read_adapter(root / safe_user_dir(u)) for u in meta["ids"]]


def split_users(others: Sequence, icfg, seed: int) -> tuple[list, list]:
    """(bank users, validation users): a seeded draw from the non-test users with enough history."""
    pool = sorted((u for u in others if len(u.history) > icfg.val_items), key=lambda u: u.user_id)
    random.Random(seed).shuffle(pool)
    if not pool:
        raise ValueError(f"no non-test user has more than {icfg.val_items} history items to build an adapter bank")
    return pool[:icfg.bank_users], pool[icfg.bank_users:icfg.bank_users + icfg.val_users]


def _cut(s, users: Sequence) -> list:
    n = s.cfg.max_history_items
    return [dataclasses.replace(u, history=u.history[-n:]) if n and len(u.history) > n else u for u in users]


def open_bank(s, methods: Sequence[str]) -> Bank:
    """The bank for session `s` (trained and cached on first use), tuned on its validation users."""
    c, t0 = s.cfg, time.perf_counter()
    bank_users, val_users = split_users(s.others, c.instant, c.seed)
    variants = variants_for(methods)
    key = fingerprint({"base": Path(s.base_info["path"]).name, "ids": [u.user_id for u in bank_users],
                       "data": data_fingerprint(bank_users), "peft": c.peft, "ut": c.user_train, "seed": c.seed,
                       "variants": variants, "k": c.k, "retriever": c.retriever, "style": c.prompt_style,
                       "profile": s.profile_kind, "max_len": c.max_prompt_tokens, "cut": c.max_history_items, "v": 1})
    root = Path(s.base_info["path"]) / "instant" / f"bank-{key}"
    if not (root / "bank.json").exists():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        s.log(f"instant: training the adapter bank ({len(bank_users)} non-test users, {c.peft})")
        t1 = time.perf_counter()
        facts = s.train(bank_users, tmp, list(methods), label="instant bank")
        meta = {"ids": [u.user_id for u in bank_users], "train_s": round(time.perf_counter() - t1, 2),
                "losses": {u: f["losses"] for u, f in facts.items()}}
        (tmp / "bank.json").write_text(json.dumps(meta))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        cached = False
    else:
        s.log(f"instant: reusing the cached adapter bank {root}")
        cached = True
    meta, modules = read_bank(root)
    texts = [history_text(s.task, u.history) for u in _cut(s, bank_users)]
    hv = HistoryVectors(texts)
    ic = c.instant
    bank = Bank(s.task, meta["ids"], modules, hv, hv.matrix(texts), ic.mix, select=ic.select, candidates=ic.candidates,
                probe_fn=lambda items: s.p.examples(User("probe", list(items[-ic.probe_items:]), []), ["plain"]),
                info={"dir": str(root), "cached": cached, "users": len(meta["ids"]), "train_s": meta["train_s"],
                      "val_users": len(val_users)}, threads=instant_threads(s.model, ic.threads))
    if ic.select == "router" and ic.mix == "knn":
        val_ids = {u.user_id for u in val_users}
        pool = [u for u in s.others if u.user_id not in val_ids and u.history]
        if len(pool) >= MIN_ROUTER_USERS:
            open_router(s, bank, root, pool)
        else:
            _no_router(s, bank, f"only {len(pool)} non-test users outside validation to learn it from "
                                f"(< {MIN_ROUTER_USERS})")
    if c.instant.mix == "knn":
        tune(s, bank, root, val_users, variants)
    bank.info["open_s"] = round(time.perf_counter() - t0, 2)
    return bank


def tune(s, bank: Bank, root: Path, val_users: Sequence, variants: Sequence[str]) -> None:
    """Set bank.top_k / bank.temperature to the grid point with the lowest held-out loss (cached)."""
    icfg = s.cfg.instant
    grid = [(k, t) for k in icfg.top_k for t in icfg.temperature]
    if not val_users:
        bank.top_k, bank.temperature = grid[0]
        bank.info["choice"] = {"top_k": bank.top_k, "temperature": bank.temperature,
                               "by": "first candidate (no validation users)"}
        return
    key = fingerprint({"val": data_fingerprint(val_users), "grid": grid, "n": icfg.val_items, "variants": variants,
                       "select": icfg.select, "candidates": icfg.candidates, "probe": icfg.probe_items})
    path = root / f"tune-{key}.json"
    if not path.exists():
        t0 = time.perf_counter()
        seen, held = {}, {}
        for u in _cut(s, val_users):
            keep = {f"item:{it['id']}" for it in u.history[-icfg.val_items:]}
            seen[u.user_id] = u.history[:-icfg.val_items]
            held[u.user_id] = [e for e in s.examples(u, variants) if e.source in keep]
        with bank.scorer(s.model, s.tok, s.cfg.max_prompt_tokens, s.cfg.tokens_per_forward) as sc:
            aff = {uid: bank.affinities(items, sc) for uid, items in seen.items()}
        table = {}
        for k, t in grid:
            mods = {uid: bank.mixed(bank.weights_from(aff[uid], k, t)) for uid in seen}
            losses = heldout_losses(s.model, s.tok, mods, held, s.cfg.max_prompt_tokens, s.cfg.tokens_per_forward)
            table[(k, t)] = sum(losses.values()) / len(losses)
        k, t = pick(table)
        path.write_text(json.dumps({"top_k": k, "temperature": t, "seconds": round(time.perf_counter() - t0, 2),
                                    "table": [[k_, t_, round(v, 5)] for (k_, t_), v in table.items()]}))
    choice = json.loads(path.read_text())
    bank.top_k, bank.temperature = choice["top_k"], choice["temperature"]
    bank.info["choice"] = {**choice, "by": f"held-out loss on {len(val_users)} validation users"}


def open_router(s, bank: Bank, root: Path, pool: Sequence) -> None:
    """Set bank.router: learned (oppu.instant.router) on up to `router_users` of `pool` (non-test users
    outside the validation users; a seeded draw), from their gradient affinities under this bank;
    cached beside the bank under a key of those users' data and the settings."""
    ic, c = s.cfg.instant, s.cfg
    users = sorted(_cut(s, pool), key=lambda u: u.user_id)
    random.Random(c.seed).shuffle(users)
    users = users[:ic.router_users]
    key = fingerprint({"data": data_fingerprint(users), "probe": ic.probe_items, "max_len": c.max_prompt_tokens,
                       "penalties": PENALTIES, "top_k": ic.top_k, "v": 2})
    path = root / f"router-{key}.npz"
    if not path.exists():
        t0 = time.perf_counter()
        s.log(f"instant: learning the bank's router from {len(users)} non-test users' gradient rankings")
        probes = [bank.probe_fn(u.history) for u in users]
        progress = getattr(s, "progress", None) or NoProgress()
        pt = progress.add_task("instant router (users' rankings, then features)", total=2 * len(users))
        aff, feats = [], []
        with GradScorer(s.model, s.tok, bank.modules, c.max_prompt_tokens, c.tokens_per_forward) as g:
            for p in probes:
                aff.append(g.affinities(p))
                progress.advance(pt, 1)
        for p in probes:
            feats.append(probe_features(s.model, s.tok, p, c.max_prompt_tokens, c.tokens_per_forward))
            progress.advance(pt, 1)
        aff, feats = np.stack(aff), np.stack(feats)
        router = fit_router(feats, aff, ic.top_k)
        path.with_suffix(".json").write_text(json.dumps({**router.info, "penalty": router.penalty,
                                                         "seconds": round(time.perf_counter() - t0, 2)}))
        router.save(path.with_name(path.name + ".tmp.npz"))
        path.with_name(path.name + ".tmp.npz").rename(path)             # the npz last: it marks the cache done
    bank.router = Router.load(path, {**json.loads(path.with_suffix(".json").read_text()), "file": str(path)})
    bank.info["router"] = bank.router.info
    agree = bank.router.info["agreement"]
    if agree < ic.router_min_agreement:
        _no_router(s, bank, f"its rankings agree with the gradient's on held-out users at {agree:.2f} "
                            f"(< instant.router_min_agreement {ic.router_min_agreement})")


def _no_router(s, bank: Bank, why: str) -> None:
    """Rank by the gradient itself (select="grad"): said in the log and in run.json's instant.bank."""
    bank.select, bank.router = "grad", None
    bank.info["router_rejected"] = why
    s.log(f"instant: no router ({why}); ranking bank modules by the gradient (instant.select: grad)")
