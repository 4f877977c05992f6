"""The OPPU pipeline end to end: data -> task-adapted base -> one PEFT per user -> six methods.

    from oppu.config import RunConfig
    from oppu.pipeline import run
    result = run(RunConfig(task="LaMP_2M", data="path/to/LaMP_2M", out="runs/2m", test_users=100))

Writes under cfg.out:
  predictions/<method>.json   official outputs shape, one entry per test question
  metrics.json                {method: {metric: value}}, by oppu.metrics.score
  run.json                    config, timings, base/adapter/profile facts, losses
  adapters/<user>/            that user's PEFT module (adapter_config.json + adapter_model.safetensors)
  report.md, methods.png      the table and the plot
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from oppu.adapters import safe_user_dir  # noqa: F401  (re-exported: adapter dir names)
from oppu.config import RunConfig
from oppu.data.lamp import write_json_atomic, write_outputs
from oppu.data.users import User
from oppu.examples import base_examples, variants_for
from oppu.fingerprint import data_fingerprint, fingerprint
from oppu.session import ADAPTER_METHODS


@dataclass
class RunResult:
    out: Path
    metrics: dict[str, dict[str, float]]
    predictions: dict[str, dict[str, str]]
    info: dict[str, Any] = field(default_factory=dict)


def _tokenizer_corpus(task, others: list[User], test: list[User]) -> list[str]:
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


def prepare_base(cfg: RunConfig, task, others: list[User], test: list[User], profile_fn, log, progress,
                 on_model: Callable[[Any, Any], None] = lambda m, t: None):
    """Load (or build and cache) the task-adapted base. Returns (model, tok, info).

    The base is adapted on the other users only; the tiny base's tokenizer also reads the test
    users' items and inputs (never their golds). The cache key hashes all of that content, so a
    cached base is reused exactly when it would be rebuilt the same.

    `on_model(model, tok)` is called as soon as a model exists, before any example is built:
    the LLM profile writer uses it when no separate writer was loaded (the tiny base)."""
    from oppu.model.base import build_tiny_base, load_base
    from oppu.model.task_adapt import adapt_base

    variants = variants_for(cfg.methods)
    key = fingerprint({"task": task.id, "base": cfg.base, "seed": cfg.seed, "bt": cfg.base_train,
                       "k": cfg.k, "retriever": cfg.retriever, "variants": variants, "style": cfg.prompt_style,
                       "profile": cfg.profile, "max_len": cfg.max_prompt_tokens,
                       "data": data_fingerprint(others),
                       "test": data_fingerprint(test, golds=False) if cfg.is_tiny else "", "v": 2})
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
        build_tiny_base(_tokenizer_corpus(task, others, test), tmp, preset=cfg.tiny_preset, seed=cfg.seed)
        model, tok = load_base(tmp, cfg.dtype, cfg.device)
    else:
        model, tok = load_base(cfg.base, cfg.dtype, cfg.device)
    on_model(model, tok)
    n_params = sum(p.numel() for p in model.parameters())
    pt = progress.add_task("base examples", total=len(others))
    exs = base_examples(task, others, variants, cfg.k, cfg.retriever, profile_fn, cfg.seed, cfg.prompt_style,
                        progress=lambda n: progress.advance(pt, n))
    info: dict[str, Any] = {"params": n_params, "source": cfg.base}
    if cfg.base_train.epochs > 0 and exs:
        n = min(len(exs), cfg.base_train.max_examples or len(exs))
        steps = cfg.base_train.epochs * ((n + cfg.base_train.batch_size - 1) // cfg.base_train.batch_size)
        bt = progress.add_task("task adaptation", total=steps)
        model, ad = adapt_base(model, tok, exs, cfg.base_train, full=cfg.is_tiny, seed=cfg.seed,
                               max_len=cfg.max_prompt_tokens, on_step=lambda s, l: progress.advance(bt, 1))
        info.update(task_adaptation=ad["mode"], losses=ad["losses"], examples=ad["examples"])
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


def run(cfg: RunConfig, progress=None, log: Callable[[str], None] = lambda s: None) -> RunResult:
    from oppu.session import Session

    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    s = Session.open(cfg, progress, log)
    task, test = s.task, s.test
    timings: dict[str, float] = {"base_s": s.base_info.get("seconds", 0.0)}

    # One PEFT per user.
    adapter_methods = [m for m in cfg.methods if m in ADAPTER_METHODS]
    user_info: dict[str, Any] = {}
    adapters_dir = out / "adapters"
    if adapter_methods:
        t0 = time.time()
        user_info = s.train(test, adapters_dir, adapter_methods)
        timings["per_user_train_s"] = round(time.time() - t0, 1)
        log(f"adapters: trained {len(test)} {cfg.peft} modules in {timings['per_user_train_s']}s")

    # Inference: shared-base methods in one batch set, adapter methods in mixed-adapter batches.
    t0 = time.time()
    raw = s.generate(test, cfg.methods, adapters_dir if adapter_methods else None)
    timings["inference_s"] = round(time.time() - t0, 1)

    # Parse, write, score.
    order = [q.id for u in test for q in u.queries]
    parsed = s.parse(raw)
    preds, metrics = {}, {}
    for m in cfg.methods:
        preds[m] = {qid: parsed[m][qid] for qid in order}
        write_outputs(out / "predictions" / f"{m}.json", task.id, preds[m])
        metrics[m] = s.score(preds[m])
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "raw_outputs.json", raw)
    timings["total_s"] = round(time.time() - t_start, 1)
    info = {"config": cfg.to_dict(), "task": task.id, "data": s.data_root, "test_users": len(test),
            "questions": len(order), "other_users": len(s.others), "profile_kind": s.profile_kind,
            "base": s.base_info, "users": user_info, "timings": timings, "skipped_records": s.skipped}
    write_json_atomic(out / "run.json", info)
    from oppu.report import write_report
    write_report(out, task.id, metrics, info)
    return RunResult(out, metrics, preds, info)
