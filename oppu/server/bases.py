"""The base model a server runs on: a local checkpoint, an `oppu run` output, or the tiny default.

    model, tok, info = open_base("tiny:micro", "LaMP_2M", store_root)   # built once, then reused
    model, tok, info = open_base("runs/2m", "LaMP_2M", store_root)       # run.json -> base.path
    model, tok, info = open_base("/models/Llama-2-7b-hf", "LaMP_2M", store_root)

`tiny` / `tiny:<preset>` (micro, tiny, small): a from-scratch Llama with a BPE tokenizer, both
built from a small built-in synthetic world of the task and task-adapted on it for `base_epochs`
epochs, through the same code `oppu run` uses (oppu.model.prepare.prepare_base). It is cached under
`<store>/bases/`, so every restart serves the exact base the store's adapters were trained on.
It exists to try the API; its answers are only as good as a few-million-parameter model trained
for seconds on a synthetic world. Point `--base` at a real checkpoint for quality.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from oppu.config import is_tiny_base

log = logging.getLogger("oppu.server")


INSTANT_MODES = ("auto", "on", "off")


def open_base(spec: str, task: str, store_root: str | Path, *, seed: int = 0, base_epochs: int = 3, k: int = 2,
              max_len: int = 256, device: str = "cpu", dtype: str = "fp32", instant: str = "off",
              user_train=None, peft: str = "lora", instant_bank_users: int = 16) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, info) for `--base spec`; see the module docstring. info["instant"] is the
    instant bank (oppu.instant.served.ServedBank) to serve with, or None: `instant` "auto" takes the
    one an `oppu run` output brings, "on" also builds one for the tiny base from its built-in world's
    non-test users (`instant_bank_users` of them; cached beside the base) and fails when there is none."""
    from oppu.instant.served import ServedBank
    from oppu.model.base import load_base, resolve_base_path

    if instant not in INSTANT_MODES:
        raise ValueError(f"unknown instant mode {instant!r}; valid: {', '.join(INSTANT_MODES)}")
    if is_tiny_base(spec):
        return _tiny(spec, task, Path(store_root), seed, base_epochs, k, max_len, device, dtype,
                     instant == "on", user_train, peft, instant_bank_users)
    path = resolve_base_path(spec)
    model, tok = load_base(path, dtype, device)
    bank = None if instant == "off" or (Path(spec) / "config.json").exists() else ServedBank.from_run(spec)
    if bank is None and instant == "on":
        raise ValueError(f"--instant on: --base {spec!r} brings no instant bank; run `oppu run --methods "
                         "...,instant --out DIR` on the task's data and serve with --base DIR")
    return model, tok, {"source": spec, "path": str(path), "instant": bank}


def serve_run_config(spec: str, **overrides):
    """The RunConfig whose per-base defaults a server on `--base spec` trains with: those of the base
    named by spec, or for an `oppu run` output those of the base that run named (e.g. smollm2)."""
    import json

    from oppu.config import load_config

    run_json = Path(spec) / "run.json"
    if not is_tiny_base(spec) and run_json.is_file():
        spec = str((json.loads(run_json.read_text()).get("config") or {}).get("base") or spec)
    return load_config(None, base=spec, **overrides)


def _tiny(spec, task, store_root, seed, base_epochs, k, max_len, device, dtype, instant, user_train, peft, n_bank):
    from oppu.config import BaseTrainConfig, InstantConfig, RunConfig, UserTrainConfig
    from oppu.data.synth import synth_world
    from oppu.data.users import load_lamp_dir
    from oppu.session import Session
    from oppu.tasks import get_task

    t = get_task(task)
    cfg = RunConfig(task=t.id, base=spec, methods=("non_personalized", "rag"), k=k, seed=seed, device=device,
                    dtype=dtype, max_prompt_tokens=max_len, cache_dir=str(store_root), test_users=4,
                    base_train=BaseTrainConfig(epochs=base_epochs), peft=peft,
                    user_train=user_train or UserTrainConfig(), instant=InstantConfig(bank_users=n_bank, val_users=4))
    with tempfile.TemporaryDirectory(prefix="oppu-serve-world-") as d:
        synth_world(t.id, d, seed=seed, test_users=4, other_users=48)
        test, others = load_lamp_dir(d, t.id).split_users(n_test=4)
    s = Session(cfg, test, others, log=lambda m: log.info("%s", m)).prepare()
    bank = None
    if instant:
        from oppu.instant import open_bank
        from oppu.instant.served import ServedBank
        bank = ServedBank.from_bank(open_bank(s, ["instant", "instant_rag"] if k else ["instant"]),
                                    cfg.instant.probe_items)
    return s.model, s.tok, {**s.base_info, "source": spec, "instant": bank}
