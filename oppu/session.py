"""The pipeline's stages over one task's data, reusable: users -> task-adapted base -> one PEFT
per user -> predictions -> scores. `oppu.pipeline.run` is one pass through them; the experiments
(oppu/experiments/) call them many times over one base, with other users, histories or settings.
The per-user stage and generation go through one oppu.personalizer.Personalizer (and so through
oppu.engine); a process pool or Ray (--executor local|ray) runs the same engine in its workers.

    s = Session.open(cfg, log=print)                  # data + profile writer + cached base
    info = s.train(s.test, "runs/x/adapters")          # one PEFT per test user
    raw = s.generate(s.test, ["rag", "oppu_rag"], "runs/x/adapters")
    preds = s.parse(raw)
    s.score(preds["oppu_rag"])                         # {"accuracy": ..., "f1": ...}
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from oppu.config import ADAPTER_METHODS, INSTANT_METHODS, USER_MODULE_METHODS, RunConfig, UserTrainConfig
from oppu.data.lamp import TASK_IDS
from oppu.data.users import User, load_lamp_dir
from oppu.examples import METHOD_VARIANT, Example, prefetch_profiles, variants_for
from oppu.metrics import score
from oppu.personalizer import Personalizer
from oppu.progress import NoProgress
from oppu.store.files import safe_user_dir
from oppu.tasks import get_task

ExamplesFn = Callable[[User], list[Example]]


def load_users(cfg: RunConfig, log: Callable[[str], None] = lambda s: None, select: str = "longest"):
    """(LampDir, test users, other users) for cfg; synthesizes the default world when cfg.data is ""."""
    if not cfg.data:
        from oppu.data.synth import synth_world
        data = Path(cfg.out) / "data"
        synth_world(cfg.task, data, seed=cfg.seed)
        log(f"data: synthesized the embedded default world for {cfg.task} in {data}")
    else:
        data = Path(cfg.data)
    ds = load_lamp_dir(data, cfg.task, strict=cfg.strict)
    if ds.problems.messages:
        log(f"data: {len(ds.problems)} record(s) skipped (lenient); first: {ds.problems.messages[0]}")
    test, others = ds.split_users(cfg.test_users, cfg.eval_split, select=select)
    return ds, test, others


class Session:
    """One task, one task-adapted base, and the operations every run and experiment is made of."""

    def __init__(self, cfg: RunConfig, test: list[User], others: list[User], data_root: str = "",
                 skipped: int = 0, progress=None, log: Callable[[str], None] = lambda s: None):
        from oppu.profile import make_profile_fn, resolve_kind

        self.cfg, self.test, self.others, self.data_root, self.skipped = cfg, test, others, data_root, skipped
        self.progress, self.log = progress or NoProgress(), log
        self.task = get_task(cfg.task)
        self.profile_kind = resolve_kind(cfg.profile, cfg.is_tiny)
        self._writer: dict[str, Any] = {}
        needs_profile = any(METHOD_VARIANT[m] == "pag" for m in cfg.methods)
        self.profile_fn = make_profile_fn(self.task, self.profile_kind, generate=self._write_profiles) \
            if needs_profile else None
        if self.profile_kind == "llm" and needs_profile and cfg.is_tiny:
            log("profile: llm profiles on the tiny base are written by a model that cannot write; expect noise")
        self.model = self.tok = self.p = None
        self.base_info: dict[str, Any] = {}

    def _write_profiles(self, prompts: Sequence[str]) -> list[str]:
        from oppu.engine import generate

        c = self.cfg
        return generate(self._writer["model"], self._writer["tok"], prompts, 96, batch_size=c.infer_batch_size,
                        max_prompt_tokens=c.max_prompt_tokens)

    @classmethod
    def open(cls, cfg: RunConfig, progress=None, log: Callable[[str], None] = lambda s: None,
             select: str = "longest") -> "Session":
        """Load cfg's data (test users chosen by `select`), then prepare the base."""
        ds, test, others = load_users(cfg, log, select)
        if ds.task != get_task(cfg.task).id:
            raise ValueError(f"data in {ds.root} is {ds.task}, but --task {cfg.task} was asked for")
        s = cls(cfg, test, others, str(ds.root), len(ds.problems), progress, log)
        n_q = sum(len(u.queries) for u in test)
        log(f"data: {len(test)} test users ({n_q} questions), {len(others)} other users for the base")
        return s.prepare()

    def prepare(self) -> "Session":
        """Load (or build and cache) the task-adapted base. LLM profiles are written by the base
        itself (one copy in memory): before task adaptation for the other users' training prompts,
        after it for the test users."""
        from oppu.model.prepare import prepare_base

        def use_as_writer(m, t):
            self._writer["model"], self._writer["tok"] = m, t

        c = self.cfg
        self.model, self.tok, self.base_info = prepare_base(c, self.task, self.others, self.test, self.profile_fn,
                                                            self.log, self.progress, use_as_writer)
        use_as_writer(self.model, self.tok)
        self.p = Personalizer(self.model, self.tok, self.task, c.user_train, c.peft, c.seed, c.k, c.retriever,
                              c.max_prompt_tokens, c.prompt_style, c.infer_batch_size, profile_fn=self.profile_fn,
                              max_users_per_batch=c.max_users_per_batch, tokens_per_forward=c.tokens_per_forward)
        return self

    # -- one PEFT per user -------------------------------------------------------------------
    def examples(self, user: User, variants: Sequence[str], k: int | None = None) -> list[Example]:
        return self.p.examples(user, variants, k)

    def train(self, users: Sequence[User], adapters_dir: str | Path, methods: Sequence[str] | None = None, *,
              peft: str | None = None, user_train: UserTrainConfig | None = None, seed: int | None = None,
              k: int | None = None, examples_fn: ExamplesFn | None = None, label: str = "") -> dict[str, Any]:
        """Train one module per user into adapters_dir/<user>/ (the engine's batched trainer, here or
        on the configured executor); returns per-user facts (examples, history, losses, seconds per
        user of the shared wall time, dir). `examples_fn(user)` replaces the history examples."""
        c = self.cfg
        peft, ucfg = peft or c.peft, user_train or c.user_train
        seed = c.seed if seed is None else seed
        variants = variants_for([m for m in (methods or c.methods) if m in USER_MODULE_METHODS] or ["oppu"])
        exs_by_user = {}
        users_cut = [dataclasses.replace(u, history=u.history[-c.max_history_items:])  # the most recent items
                     if c.max_history_items and len(u.history) > c.max_history_items else u for u in users]
        if "pag" in variants and not examples_fn:
            prefetch_profiles(self.profile_fn, [u.history for u in users_cut])
        for u in users_cut:
            exs = examples_fn(u) if examples_fn else self.examples(u, variants, k)
            if not exs:
                raise ValueError(f"user {u.user_id!r} has no usable history item to train a PEFT on")
            exs_by_user[u.user_id] = exs
        t0 = time.perf_counter()
        if c.executor == "batched":  # progress in user-steps: one user's mini-batch each
            steps = sum(ucfg.epochs * -(-len(e) // ucfg.batch_size) for e in exs_by_user.values())
            pt = self.progress.add_task(label or f"per-user {peft} steps", total=steps)
            losses_by_user = self.p.train_to_dir(exs_by_user, adapters_dir, ucfg=ucfg, peft=peft, seed=seed,
                                                 on_step=lambda n, losses: self.progress.advance(pt, len(losses)))
        else:  # a process pool or a Ray cluster, each worker running the same engine
            pt = self.progress.add_task(label or f"per-user {peft}", total=len(users))
            from oppu.engine import n_layers_of, peft_config
            from oppu.scale import train_sharded
            losses_by_user = train_sharded(self.base_info["path"], None, exs_by_user,
                                           peft_config(peft, ucfg, n_layers_of(self.model)), ucfg,
                                           seed, adapters_dir, executor=c.executor, workers=c.workers,
                                           ray_address=c.ray_address or None, max_users_per_batch=c.max_users_per_batch,
                                           tokens_per_forward=c.tokens_per_forward, max_len=c.max_prompt_tokens,
                                           dtype=c.dtype, device=c.device)
            self.progress.advance(pt, len(users))
        per = round((time.perf_counter() - t0) / max(1, len(users)), 3)  # wall time shared by all
        return {u.user_id: {"losses": losses_by_user[u.user_id], "seconds": per, "examples": len(exs_by_user[u.user_id]),
                            "history": len(u.history), "trained_items": min(len(u.history), c.max_history_items or
                                                                            len(u.history)),
                            "dir": safe_user_dir(u.user_id)} for u in users}

    # -- inference ---------------------------------------------------------------------------
    def prompts(self, users: Sequence[User], methods: Sequence[str], k: int | None = None) -> dict[str, dict[str, str]]:
        """{method: {question id: prompt}}; a prompt depends only on the variant (rag and
        oppu_rag share it), so each variant is rendered once."""
        cache: dict = {}
        if "pag" in variants_for(methods):
            prefetch_profiles(self.profile_fn, [u.visible_items(q) for u in users for q in u.queries])
        by_variant = {v: {q.id: self.p.prompt(u, q, v, k, cache) for u in users for q in u.queries}
                      for v in variants_for(methods)}
        return {m: by_variant[METHOD_VARIANT[m]] for m in methods}

    def generate(self, users: Sequence[User], methods: Sequence[str], adapters_dir: str | Path | None = None,
                 k: int | None = None, label: str = "inference",
                 instant_dir: str | Path | None = None) -> dict[str, dict[str, str]]:
        """Raw generated text {method: {question id: text}} through the one decoder: shared-base
        methods as plain rows, user-module methods in mixed-adapter batches (each row its own user's
        module: oppu* from adapters_dir, instant* from instant_dir, or from adapters_dir when only
        instant methods are asked for), `users_per_generate` users' modules loaded at a time."""
        prompts = self.prompts(users, methods, k)
        raw: dict[str, dict[str, str]] = {m: {} for m in methods}
        it = self.progress.add_task(label, total=sum(len(u.queries) for u in users) * len(methods))
        step = lambda n: self.progress.advance(it, n)  # noqa: E731
        flat = [(m, qid, p) for m in methods if m not in USER_MODULE_METHODS for qid, p in prompts[m].items()]
        for (m, qid, _), t in zip(flat, self.p.generate([p for _, _, p in flat], progress=step)):
            raw[m][qid] = t
        trained = [m for m in methods if m in ADAPTER_METHODS]
        instant = [m for m in methods if m in INSTANT_METHODS]
        for ms, d in ((trained, adapters_dir), (instant, instant_dir if trained or instant_dir else adapters_dir)):
            if ms and d is None:
                need = "instant_dir" if ms is instant else "adapters_dir"
                raise ValueError(f"methods {ms} need the users' adapters ({need})")
            if ms:
                self._generate_modules(users, ms, prompts, Path(d), raw, step)
        return raw

    def _generate_modules(self, users: Sequence[User], methods: Sequence[str], prompts: dict, adapters_dir: Path,
                          raw: dict, step: Callable[[int], None]) -> None:
        for g0 in range(0, len(users), self.cfg.users_per_generate):
            grp = users[g0:g0 + self.cfg.users_per_generate]
            rows = [(m, u.user_id, q.id, prompts[m][q.id]) for u in grp for m in methods for q in u.queries]
            texts = self.p.generate([p for *_, p in rows], [uid for _, uid, _, _ in rows],
                                    {u.user_id: adapters_dir / safe_user_dir(u.user_id) for u in grp}, progress=step)
            for (m, _, qid, _), t in zip(rows, texts):
                raw[m][qid] = t

    def parse(self, raw: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        return {m: {qid: self.task.parse(t) for qid, t in r.items()} for m, r in raw.items()}

    # -- scoring -----------------------------------------------------------------------------
    def golds(self, users: Sequence[User] | None = None) -> dict[str, str]:
        return {q.id: q.gold for u in (self.test if users is None else users) for q in u.queries}

    def score(self, preds: dict[str, str], users: Sequence[User] | None = None,
              qids: Sequence[str] | None = None) -> dict[str, float]:
        """Score predictions on the questions of `users` (default: the test users; only `qids` of
        them when given) with the task's metrics: LaMP tasks by the official rules,
        user-registered tasks by their kind."""
        golds = self.golds(users)
        if qids is not None:
            golds = {q: golds[q] for q in qids}
        missing = [q for q in golds if q not in preds]
        if missing:
            raise KeyError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}")
        return self.scorer()(golds, {q: preds[q] for q in golds})

    def scorer(self) -> Callable[[dict[str, str], dict[str, str]], dict[str, float]]:
        """(golds, preds) -> metrics: LaMP tasks by the official rules, user-registered tasks by their kind."""
        lamp = self.task.id in TASK_IDS
        return lambda golds, preds: score(self.task.id, golds, preds, kind=None if lamp else self.task.kind,
                                          labels=None if lamp else (self.task.labels or None))

    def spread(self, preds_by_method: dict[str, dict[str, str]], seed: int = 0) -> dict:
        """A paired bootstrap over the test users of every method's score and gap (oppu.spread)."""
        from oppu.spread import user_bootstrap
        return user_bootstrap(self.task.id, self.golds(), preds_by_method,
                              {u.user_id: [q.id for q in u.queries] for u in self.test}, seed=seed,
                              scorer=self.scorer())
