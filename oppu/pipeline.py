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

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from oppu.adapters import safe_user_dir  # noqa: F401  (re-exported: adapter dir names)
from oppu.config import RunConfig
from oppu.data.lamp import TASK_IDS, write_json_atomic, write_outputs
from oppu.data.users import User, load_lamp_dir
from oppu.examples import METHOD_VARIANT, base_examples, history_examples, query_prompt, variants_for
from oppu.metrics import score
from oppu.tasks import get_task

ADAPTER_METHODS = ("oppu", "oppu_rag", "oppu_pag")


class _NoProgress:
    def add_task(self, description: str, total: float | None = None, **kw: Any) -> int:
        return 0

    def advance(self, task_id: int, advance: float = 1) -> None:
        pass


@dataclass
class RunResult:
    out: Path
    metrics: dict[str, dict[str, float]]
    predictions: dict[str, dict[str, str]]
    info: dict[str, Any] = field(default_factory=dict)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tokenizer_corpus(task, others: list[User], test: list[User]) -> list[str]:
    """Text for the tiny tokenizer: every history item and input, other users' golds; never a
    test user's gold."""
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

    `on_model(model, tok)` is called as soon as a model exists, before any example is built:
    the LLM profile writer uses it when no separate writer was loaded (the tiny base)."""
    from oppu.model.base import build_tiny_base, load_base
    from oppu.model.task_adapt import adapt_base

    variants = variants_for(cfg.methods)
    key = _fingerprint({"task": task.id, "base": cfg.base, "seed": cfg.seed, "bt": cfg.base_train,
                        "k": cfg.k, "retriever": cfg.retriever, "variants": variants, "style": cfg.prompt_style,
                        "profile": cfg.profile, "max_len": cfg.max_prompt_tokens,
                        "data": sorted((u.user_id, len(u.history), len(u.queries)) for u in others),
                        "test": sorted(u.user_id for u in test), "v": 1})
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


def _load_users(cfg: RunConfig, log):
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
    test, others = ds.split_users(cfg.test_users, cfg.eval_split)
    return ds, test, others


def run(cfg: RunConfig, progress=None, log: Callable[[str], None] = lambda s: None) -> RunResult:
    from oppu.adapters import peft_config, train_user
    from oppu.engine import generate
    from oppu.multi import generate_mixed
    from oppu.profile import make_profile_fn, resolve_kind

    progress = progress or _NoProgress()
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task)
    ds, test, others = _load_users(cfg, log)
    if ds.task != task.id:
        raise ValueError(f"data in {ds.root} is {ds.task}, but --task {cfg.task} was asked for")
    n_queries = sum(len(u.queries) for u in test)
    log(f"data: {len(test)} test users ({n_queries} questions), {len(others)} other users for the base")

    profile_kind = resolve_kind(cfg.profile, cfg.is_tiny)
    needs_profile = any(METHOD_VARIANT[m] == "pag" for m in cfg.methods)
    gen_holder: dict[str, Any] = {}
    profile_fn = make_profile_fn(task, profile_kind, generate=lambda ps: generate(
        gen_holder["model"], gen_holder["tok"], ps, 96, cfg.infer_batch_size, cfg.max_prompt_tokens)) \
        if needs_profile else None
    if profile_kind == "llm" and needs_profile and cfg.is_tiny:
        log("profile: llm profiles on the tiny base are written by a model that cannot write; expect noise")
    # LLM profiles are written by the base itself (one copy in memory): before task adaptation for the
    # other users' training prompts, after it for the test users. Memoised per history.

    def use_as_writer(m, t):
        gen_holder["model"], gen_holder["tok"] = m, t

    model, tok, base_info = prepare_base(cfg, task, others, test, profile_fn, log, progress, use_as_writer)
    use_as_writer(model, tok)  # the task-adapted base writes the test users' profiles
    timings: dict[str, float] = {"base_s": base_info.get("seconds", 0.0)}

    # One PEFT per user.
    adapter_methods = [m for m in cfg.methods if m in ADAPTER_METHODS]
    user_info: dict[str, Any] = {}
    adapters_dir = out / "adapters"
    if adapter_methods:
        pcfg = peft_config(cfg.peft, cfg.user_train)
        variants = variants_for(adapter_methods)
        ut = progress.add_task(f"per-user {cfg.peft}", total=len(test))
        t0 = time.time()
        exs_by_user = {}
        for u in test:
            exs = history_examples(task, u, variants, cfg.k, cfg.retriever, profile_fn, cfg.prompt_style)
            if not exs:
                raise ValueError(f"user {u.user_id!r} has no usable history item to train a PEFT on")
            exs_by_user[u.user_id] = exs
        if cfg.executor == "inline":
            losses_by_user = {}
            for u in test:
                losses_by_user[u.user_id] = train_user(model, tok, exs_by_user[u.user_id], pcfg, cfg.user_train,
                                                       cfg.seed, u.user_id, adapters_dir / safe_user_dir(u.user_id),
                                                       cfg.max_prompt_tokens)
                progress.advance(ut, 1)
        else:  # processes on this machine, or a Ray cluster: users sharded, same adapter directory
            from oppu.scale import train_sharded
            losses_by_user = train_sharded(base_info["path"], None, exs_by_user, pcfg, cfg.user_train, cfg.seed,
                                           adapters_dir, executor=cfg.executor, workers=cfg.workers,
                                           ray_address=cfg.ray_address or None,
                                           max_users_per_batch=cfg.max_users_per_batch,
                                           max_len=cfg.max_prompt_tokens, dtype=cfg.dtype, device=cfg.device)
            progress.advance(ut, len(test))
        for u in test:
            user_info[u.user_id] = {"examples": len(exs_by_user[u.user_id]), "history": len(u.history),
                                    "losses": losses_by_user[u.user_id], "dir": safe_user_dir(u.user_id)}
        timings["per_user_train_s"] = round(time.time() - t0, 1)
        log(f"adapters: trained {len(test)} {cfg.peft} modules in {timings['per_user_train_s']}s")

    # Inference: shared-base methods in one batch set, adapter methods in mixed-adapter batches.
    # A prompt depends only on the variant (rag and oppu_rag share it), so render each variant once.
    t0 = time.time()
    cache: dict = {}
    by_variant = {v: {q.id: query_prompt(task, u, q, v, cfg.k, cfg.retriever, profile_fn, cfg.prompt_style, cache)
                      for u in test for q in u.queries} for v in variants_for(cfg.methods)}
    prompts = {m: by_variant[METHOD_VARIANT[m]] for m in cfg.methods}
    raw: dict[str, dict[str, str]] = {m: {} for m in cfg.methods}
    it = progress.add_task("inference", total=n_queries * len(cfg.methods))
    plain = [m for m in cfg.methods if m not in ADAPTER_METHODS]
    flat = [(m, qid, p) for m in plain for qid, p in prompts[m].items()]
    texts = generate(model, tok, [p for _, _, p in flat], task.max_new_tokens, cfg.infer_batch_size,
                     cfg.max_prompt_tokens, progress=lambda n: progress.advance(it, n))
    for (m, qid, _), t in zip(flat, texts):
        raw[m][qid] = t
    # Adapter methods: mixed batches, every row with its own user's module (oppu.multi), users in
    # groups so memory stays bounded however many test users there are.
    group = 32
    for g0 in range(0, len(test) if adapter_methods else 0, group):
        users = test[g0:g0 + group]
        flat = [(m, u.user_id, q.id, prompts[m][q.id]) for u in users for m in adapter_methods for q in u.queries]
        texts = generate_mixed(model, tok, [p for *_, p in flat], [uid for _, uid, _, _ in flat],
                               {u.user_id: adapters_dir / safe_user_dir(u.user_id) for u in users},
                               task.max_new_tokens, cfg.infer_batch_size, cfg.max_prompt_tokens)
        for (m, _, qid, _), t in zip(flat, texts):
            raw[m][qid] = t
        progress.advance(it, len(flat))
    timings["inference_s"] = round(time.time() - t0, 1)

    # Parse, write, score.
    golds = {q.id: q.gold for u in test for q in u.queries}
    order = [q.id for u in test for q in u.queries]
    preds, metrics = {}, {}
    for m in cfg.methods:
        preds[m] = {qid: task.parse(raw[m][qid]) for qid in order}
        write_outputs(out / "predictions" / f"{m}.json", task.id, preds[m])
        lamp = task.id in TASK_IDS  # LaMP tasks score by the official rules; user tasks by their kind
        metrics[m] = score(task.id, golds, preds[m], kind=None if lamp else task.kind,
                           labels=None if lamp else (task.labels or None))
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "raw_outputs.json", raw)
    timings["total_s"] = round(time.time() - t_start, 1)
    info = {"config": cfg.to_dict(), "task": task.id, "data": str(ds.root), "test_users": len(test),
            "questions": n_queries, "other_users": len(others), "profile_kind": profile_kind,
            "base": base_info, "users": user_info, "timings": timings,
            "skipped_records": len(ds.problems)}
    write_json_atomic(out / "run.json", info)
    from oppu.report import write_report
    write_report(out, task.id, metrics, info)
    return RunResult(out, metrics, preds, info)

