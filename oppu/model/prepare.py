"""The task-adapted shared base, built once and cached: the first stage of every run.

The base is adapted on the other users only (never a test user's gold); the tiny base's tokenizer
also reads the test users' items and inputs. The cache key hashes all of that content, so a cached
base is reused exactly when it would be rebuilt the same.

    model, tok, info = prepare_base(cfg, task, others, test, profile_fn, log, progress)
    info["path"]      # the cached checkpoint dir (loadable with oppu.model.base.load_base)
"""
from __future__ import annotations

import json
import shutil
import time
from typing import Any, Callable

from oppu.config import RunConfig
from oppu.data.users import User
from oppu.examples import base_examples, variants_for
from oppu.fingerprint import data_fingerprint, fingerprint


def tokenizer_corpus(task, others: list[User], test: list[User]) -> list[str]:
    """Text for the tiny tokenizer: every history item and input, other users' golds; never a
    test user's gold. (Measured: leaving the test users' items and inputs out changed the LaMP_4
    demo base's training enough to stall it at loss 1.4 instead of 0.55; see docs/results.md.)"""
    out = []
    for u in others + test:
        for it in u.items_by_id.values():
            out.append(task.render_item(it))
        for q in u.queries:
            out.append(task.render_query(task.content(q.input)))
            if u in others and q.gold is not None:
                out.append(str(q.gold))
    out.append(task.cue + " profile: most frequent average over " + " ".join(task.labels))
    return out


def _bt_key(bt) -> str:
    """The task-adaptation settings in the base's cache key; max_tokens appears only when set, so
    keys from before it existed still name the same bases."""
    text = str(bt)
    return text.replace(", max_tokens=0)", ")") if not bt.max_tokens else text


def prepare_base(cfg: RunConfig, task, others: list[User], test: list[User], profile_fn, log, progress,
                 on_model: Callable[[Any, Any], None] = lambda m, t: None):
    """Load (or build and cache) the task-adapted base. Returns (model, tok, info).

    The base is adapted on the other users only; the tiny base's tokenizer also reads the test
    users' items and inputs (never their golds). The cache key hashes all of that content, so a
    cached base is reused exactly when it would be rebuilt the same.

    `on_model(model, tok)` is called as soon as a model exists, before any example is built:
    the LLM profile writer uses it when no separate writer was loaded (the tiny base)."""
    from oppu.model.base import build_tiny_base, load_base, resolve_base_path
    from oppu.model.task_adapt import adapt_base

    variants, bt = variants_for(cfg.methods), cfg.base_train
    key = fingerprint({"task": task.id, "base": cfg.base, "seed": cfg.seed, "bt": _bt_key(bt),
                       "k": cfg.k, "retriever": cfg.retriever, "variants": variants, "style": cfg.prompt_style,
                       "profile": cfg.profile, "max_len": cfg.max_prompt_tokens,
                       "data": data_fingerprint(others),
                       "test": data_fingerprint(test, golds=False) if cfg.is_tiny else "", "v": 3,
                       # a capped run of 2+ epochs draws a fresh sample per epoch since key v3
                       **({"draw": "per-epoch"} if (bt.max_examples or bt.max_tokens) and bt.epochs > 1 else {})})
    cached = cfg.cache_root() / "bases" / f"{task.id}-{key}"
    if (cached / "oppu_base.json").exists():
        log(f"base: reusing cached task-adapted base {cached}")
        model, tok = load_base(cached, cfg.dtype, cfg.device)
        on_model(model, tok)
        return model, tok, {**json.loads((cached / "oppu_base.json").read_text()), "cached": True, "path": str(cached)}
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    if cfg.is_tiny:
        log(f"base: building tiny Llama ({cfg.tiny_preset}) + BPE tokenizer from the task corpus")
        build_tiny_base(tokenizer_corpus(task, others, test), tmp, preset=cfg.tiny_preset, seed=cfg.seed)
        model, tok = load_base(tmp, cfg.dtype, cfg.device)
    else:
        src = resolve_base_path(cfg.base, cfg.cache_root())
        model, tok = load_base(src, cfg.dtype, cfg.device)
        origin = {"checkpoint": str(src)}
        if (src / "oppu_source.json").is_file():  # a GGUF materialized by oppu.model.gguf: file + sha256
            origin.update(json.loads((src / "oppu_source.json").read_text()))
    on_model(model, tok)
    n_params = sum(p.numel() for p in model.parameters())
    exs = []
    if cfg.base_train.epochs > 0:  # no task adaptation: no examples to build (nor LLM profiles to write)
        pt = progress.add_task("base examples", total=len(others))
        exs = base_examples(task, others, variants, cfg.k, cfg.retriever, profile_fn, cfg.seed, cfg.prompt_style,
                            progress=lambda n: progress.advance(pt, n),
                            max_examples=cfg.base_train.max_examples * cfg.base_train.epochs)
    info: dict[str, Any] = {"params": n_params, "source": cfg.base,
                            "prompt_style": "chat" if getattr(tok, "oppu_chat", False) else cfg.prompt_style}
    if not cfg.is_tiny:
        info["origin"] = origin
    if cfg.base_train.epochs > 0 and exs:
        task_ids: list[int] = []
        model, ad = adapt_base(model, tok, exs, cfg.base_train, full=cfg.is_tiny, seed=cfg.seed,
                               max_len=cfg.max_prompt_tokens, on_step=lambda s, l: progress.advance(task_ids[0], 1),
                               on_plan=lambda steps: task_ids.append(progress.add_task("task adaptation", total=steps)))
        info.update(task_adaptation=ad["mode"], losses=ad["losses"],
                    **{k: ad[k] for k in ("examples", "examples_per_epoch", "tokens_per_epoch", "steps")})
        log(f"base: task adaptation ({ad['mode']}) on {ad['examples']} examples from {len(others)} users, "
            f"loss {ad['losses'][0]:.3f} -> {ad['losses'][-1]:.3f}")
    else:
        info.update(task_adaptation="none", examples=0)
    info["seconds"] = round(time.time() - t0, 1)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "oppu_base.json").write_text(json.dumps(info))
    shutil.rmtree(cached, ignore_errors=True)
    tmp.rename(cached)
    model.name_or_path = str(cached)  # adapters record where their base lives
    return model, tok, {**info, "cached": False, "path": str(cached)}
