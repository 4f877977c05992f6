"""Personalizer: the one API object for history -> train -> generate -> export/delete.

The CLI's `oppu run` and `oppu experiment` (through oppu.session), the HTTP service (oppu.server)
and the Python API all use it; everything it trains or generates goes through oppu.engine.

Over data (no store), as the pipeline uses it:
    p = Personalizer(model, tok, "LaMP_2M", UserTrainConfig(), peft="lora", seed=0, k=2)
    exs = p.examples(user, ("plain", "rag"))
    losses = p.train_to_dir({"u1": exs}, "runs/x/adapters")          # PEFT dirs, batched
    texts = p.generate(prompts, users=["u1", None], adapters={"u1": "runs/x/adapters/u1"})

Over the adapter store (oppu.store), as the server uses it (methods in oppu.lifecycle):
    p = Personalizer(model, tok, "LaMP_2M", store=AdapterStore("var/oppu"))
    p.add_history(uid, "LaMP_2M", items); p.train(uid); p.update(uid, replay=0.5)
    p.answer(uid, ["query text"]).predictions; p.rollback(uid, 1)
    blob = p.export_user(uid, "passphrase"); p.import_user(blob, "passphrase", user_id="copy")
    p.delete_user(uid)

Model work is serialised by `lock` (the serving slots and, when training shares the serving base,
the trainer); with `train_model` (e.g. a copy of the base) training runs beside serving under its
own `train_lock`.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from oppu.config import PEFT_TYPES, TOKENS_PER_FORWARD, UserTrainConfig
from oppu.data.users import User
from oppu.examples import Example, history_examples, query_prompt
from oppu.lifecycle import Lifecycle
from oppu.store.files import safe_user_dir
from oppu.tasks import Task, get_task


class Personalizer(Lifecycle):
    def __init__(self, model, tok, task: str | Task, ucfg: UserTrainConfig = UserTrainConfig(), peft: str = "lora",
                 seed: int = 0, k: int = 2, retriever: str = "bm25", max_len: int = 384, style: str = "compact",
                 batch_size: int = 32, *, store=None, profile_fn=None, max_users_per_batch: int = 16,
                 tokens_per_forward: int = TOKENS_PER_FORWARD, max_loaded: int = 256, train_model=None):
        from oppu.engine import n_layers_of, peft_config

        if peft not in PEFT_TYPES:
            raise ValueError(f"unknown PEFT type {peft!r}; valid: {', '.join(PEFT_TYPES)}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.model, self.tok, self.store = model, tok, store
        self.task = get_task(task) if isinstance(task, str) else task
        self.ucfg, self.peft, self.seed, self.k = ucfg, peft, seed, k
        self.retriever, self.max_len, self.style, self.batch_size = retriever, max_len, style, batch_size
        self.profile_fn = profile_fn
        self.max_users_per_batch, self.tokens_per_forward = max_users_per_batch, tokens_per_forward
        self.pcfg = peft_config(peft, ucfg, n_layers_of(model))
        # Adapters train on the prompt shapes they will serve: plain, plus RAG when k > 0.
        self.variants = ("plain", "rag") if k > 0 else ("plain",)
        self.train_model = train_model if train_model is not None else model
        self.lock = threading.RLock()
        self.train_lock = self.lock if self.train_model is model else threading.RLock()
        self.max_loaded = max_loaded
        self._slots = None
        self._histories: dict = {}                              # user -> history.UserHistory (LRU)
        self._histories_lock = threading.Lock()
        self.max_histories = max(1024, max_loaded)                # users' histories kept for answering,
        self.max_history_items_held = 1_000_000                  # and their items in all (LRU past either)
        self._skips: dict[str, list[str]] = {}                  # user -> corrupt versions skipped when loaded
        self._corrupt: dict[str, tuple] = {}                    # user -> (active version, error): none intact
        self._to_drop: set[str] = set()                         # deleted users whose weights await the lock

    # -- examples and prompts (pure) ---------------------------------------------------------
    def examples(self, user: User, variants: Sequence[str] | None = None, k: int | None = None,
                 pause=None) -> list[Example]:
        return history_examples(self.task, user, variants or self.variants, self.k if k is None else k,
                                self.retriever, self.profile_fn, self.style, pause)

    def prompt(self, user: User, query, variant: str, k: int | None = None, cache: dict | None = None) -> str:
        return query_prompt(self.task, user, query, variant, self.k if k is None else k, self.retriever,
                            self.profile_fn, self.style, cache)

    # -- the engine --------------------------------------------------------------------------
    @property
    def slots(self):
        """The serving slots (users kept loaded over the serving base), created on first use."""
        if self._slots is None:
            from oppu.engine.serving import Slots
            self._slots = Slots(self.model, self.max_loaded)
        return self._slots

    @contextmanager
    def training_base(self) -> Iterator[Any]:
        """The model to train on, with nothing else wrapped around it for the duration."""
        with self.train_lock:
            shared = self.train_model is self.model and self._slots is not None
            with (self._slots.mm.detached() if shared else nullcontext()):
                yield self.train_model

    @contextmanager
    def plain_base(self) -> Iterator[Any]:
        """The serving base with no user adapter wrapped around it, under the serving lock
        (generation waits meanwhile): e.g. the gradient that ranks an instant module's bank."""
        with self.lock:
            with (self._slots.mm.detached() if self._slots is not None else nullcontext()):
                yield self.model

    def train_modules(self, examples_by_user: Mapping[str, Sequence[Example]],
                      on_user_done: Callable[[str, list[float], Any, dict], None], *,
                      start: Mapping[str, tuple] | None = None, order_seeds: Mapping[str, int] | None = None,
                      ucfg: UserTrainConfig | None = None, peft: str | None = None, seed: int | None = None,
                      max_len: int | None = None,
                      on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, list[float]]:
        """Train every user's module in batched passes (engine.Trainer); `on_user_done(uid, losses,
        config, state)` receives each finished module, `on_step(n, {uid: batch loss})` every global
        step. Returns {uid: per-epoch mean loss}."""
        from oppu.engine import Trainer, n_layers_of, peft_config

        ucfg = ucfg or self.ucfg
        pcfg = self.pcfg if (peft or self.peft) == self.peft and ucfg is self.ucfg else \
            peft_config(peft or self.peft, ucfg, n_layers_of(self.model))
        with self.training_base() as base:
            return Trainer(base, self.tok, examples_by_user, pcfg, ucfg, self.seed if seed is None else seed,
                           max_len or self.max_len, self.max_users_per_batch, on_user_done, self.tokens_per_forward,
                           start=start, order_seeds=order_seeds, on_step=on_step).run()

    def train_to_dir(self, examples_by_user: Mapping[str, Sequence[Example]], out_dir: str | Path,
                     on_user_done: Callable[[str], None] = lambda uid: None, **kw) -> dict[str, list[float]]:
        """train_modules, each module written to out_dir/<safe_user_dir(uid)>/ in the PEFT format."""
        from oppu.engine import write_adapter

        base_name = self.train_model.__dict__.get("name_or_path") or None

        def done(uid, losses, config, state):
            write_adapter(Path(out_dir) / safe_user_dir(uid), config, state, base_name)
            on_user_done(uid)

        return self.train_modules(examples_by_user, done, **kw)

    def generate(self, prompts: Sequence[str], users: Sequence[str | None] | None = None,
                 adapters: Mapping[str, str | Path] | None = None, max_new_tokens: int | None = None,
                 progress: Callable[[int], None] | None = None) -> list[str]:
        """Texts for prompts (plain base rows, or users[i]'s adapter from `adapters[users[i]]`), one
        mixed-adapter decode (engine.generate) in input order."""
        from oppu.engine import generate

        new = self.task.max_new_tokens if max_new_tokens is None else max_new_tokens
        named = sorted({u for u in users or () if u is not None})
        missing = [u for u in named if u not in (adapters or {})]
        if missing:
            raise KeyError(f"no adapter directory for user(s) {missing[:5]}")
        with self.lock:
            for u in named:
                self.slots.ensure(u, ("dir", str(adapters[u])), adapters[u])
            try:
                return generate(self.model, self.tok, prompts, new, users=users if named else None,
                                mm=self.slots.mm if named else None, batch_size=self.batch_size,
                                max_prompt_tokens=self.max_len, progress=progress)
            finally:
                for u in named:
                    self.slots.drop(u)

    def close(self) -> None:
        """Give the base its plain modules back."""
        with self.lock:
            if self._slots is not None:
                self._slots.close()
                self._slots = None
