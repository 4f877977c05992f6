"""Adapter storage and loading: bytes per user (fp32 vs bf16), cold load vs cache hit, bf16's score cost.

On a synthetic LaMP_2M world: a fresh tiny base, task-adapted for --base-epochs on the other users
(so its outputs depend on the prompt), then one --peft module per test user trained with
oppu.engine.train_users. Reports, on the last stdout line as one JSON object:

  bytes_per_user     adapter_model.safetensors size per user, fp32 vs bf16 (oppu.engine.cache.
                     save_adapter_bf16), for LoRA (the trained ones), IA3 and prompt tuning (fresh,
                     oppu.engine.initial_module + write_adapter)
  cold_load_ms       read the safetensors + config (oppu.engine.read_adapter) and plug the user into a
                     MultiUserModel slot (add_user); median and p90 over users. "Cold" for oppu: the OS
                     page cache is warm (dropping it would disturb other work on the machine)
  cache_hit_ms       the same through a warm oppu.engine.cache.AdapterCache (two stats + add_user)
  slots_ensure_ms    the serving path: oppu.engine.serving.Slots.ensure of a user not loaded (LRU with
                     room for half the users, so each load also evicts), files through that warm cache
  bf16_score         every test user's queries generated with the fp32 and the bf16-stored module:
                     fraction of identical outputs, max |logit difference| of the first generated
                     token, and the task metric of both (and of the base without adapters)

    python benchmarks/adapter_io.py                          # 16 users
    python benchmarks/adapter_io.py --users 4 --preset micro --epochs 1 --base-epochs 0
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, machine_info, percentile, resolve, set_threads, tiny_base, world_users


def file_bytes(d: Path) -> int:
    return (d / "adapter_model.safetensors").stat().st_size


def ms_stats(xs: list[float]) -> dict:
    return {"median_ms": round(1000 * percentile(xs, 50), 3), "p90_ms": round(1000 * percentile(xs, 90), 3)}


def load_times(mm, dirs: dict[str, Path], fetch) -> list[float]:
    """Per user: seconds to fetch (config, tensors) and plug them into a slot; the slot is freed again."""
    out = []
    for uid, d in dirs.items():
        t0 = time.perf_counter()
        mm.add_user(uid, *fetch(d))
        out.append(time.perf_counter() - t0)
        mm.remove_user(uid)
    return out


def sizes_by_kind(model, ucfg, seed: int, trained: dict[str, Path], tmp: Path) -> dict:
    from oppu.engine import initial_module, peft_config, write_adapter
    from oppu.engine.cache import save_adapter_bf16

    out = {}
    for kind in ("lora", "ia3", "prompt_tuning"):
        src = next(iter(trained.values())) if kind == trained["__kind__"] else None
        if src is None:
            src = write_adapter(tmp / "sizes" / kind, *initial_module(model, peft_config(kind, ucfg), seed, "size"))
        bf = save_adapter_bf16(src, tmp / "sizes" / f"{kind}-bf16")
        out[kind] = {"fp32_bytes": file_bytes(src), "bf16_bytes": file_bytes(bf),
                     "config_bytes": (src / "adapter_config.json").stat().st_size}
    return out


def slots_times(model, dirs: dict[str, Path], cache) -> dict:
    """The serving path (oppu.engine.serving.Slots, as the Personalizer serves): ensure() of a user not
    loaded, its files through the warm cache, with half the users' room so every round evicts."""
    from oppu.engine.serving import Slots

    slots = Slots(model, max_loaded=max(1, len(dirs) // 2), cache=cache)
    try:
        times = []
        for _ in range(2):
            for uid, d in dirs.items():
                t0 = time.perf_counter()
                slots.ensure(uid, key=1, path=d)
                times.append(time.perf_counter() - t0)
    finally:
        slots.close()
    return ms_stats(times)


def bf16_score(mm, tok, task, users, max_new_tokens: int) -> dict:
    """Greedy outputs and first-token logits of every query with the fp32 vs the bf16-stored module."""
    from oppu.engine import greedy_rows, tokenize_prompts
    from oppu.engine.decode import stop_ids
    from oppu.examples import query_prompt
    from oppu.metrics import score

    rows = [(u.user_id, q) for u in users for q in u.queries]
    prompts = [query_prompt(task, u, q, "plain", 0, "bm25", None) for u in users for q in u.queries]
    seqs = tokenize_prompts(tok, prompts, 384)
    run = {}
    for name, suffix in (("fp32", ""), ("bf16", "@bf16"), ("no_adapter", None)):
        owners = [None if suffix is None else uid + suffix for uid, _ in rows]
        gen, first = greedy_rows(mm.base, seqs, owners, max_new_tokens, stop_ids(tok), tok.pad_token_id, mm=mm)
        run[name] = ([tok.decode(g, skip_special_tokens=True) for g in gen], first)
    golds = {q.id: q.gold for _, q in rows}
    metric = {name: score(task.id, golds, {q.id: task.parse(t) for (_, q), t in zip(rows, texts)})
              for name, (texts, _) in run.items()}
    (t32, l32), (t16, l16) = run["fp32"], run["bf16"]
    diff = (l32 - l16).abs()
    return {"queries": len(rows), "outputs_identical": round(sum(a == b for a, b in zip(t32, t16)) / len(rows), 4),
            "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "logit_scale": float(l32.abs().max()),
            "argmax_identical": round(float((l32.argmax(-1) == l16.argmax(-1)).float().mean()), 4),
            "metric": {k: {m: round(v, 4) for m, v in d.items()} for k, d in metric.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--other-users", type=int, default=48, help="users the base is task-adapted on")
    ap.add_argument("--peft", default="lora", choices=("lora", "ia3", "prompt_tuning"))
    ap.add_argument("--epochs", type=int, default=4, help="per-user epochs")
    ap.add_argument("--base-epochs", type=int, default=3, help="task adaptation of the fresh base (0 = none)")
    ap.add_argument("--preset", default="tiny", help="tiny-base preset: micro | tiny | small")
    ap.add_argument("--cache-mb", type=float, default=64.0, help="AdapterCache bound in MiB")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default); 1: on shared cores more threads thrash")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from oppu.config import BaseTrainConfig, UserTrainConfig
    from oppu.engine import MultiUserModel, peft_config, read_adapter, train_users
    from oppu.engine.cache import AdapterCache, save_adapter_bf16
    from oppu.examples import base_examples, history_examples
    from oppu.model.task_adapt import adapt_base
    from oppu.store.files import safe_user_dir

    set_threads(args.threads)
    device = resolve(args.device)
    ucfg = UserTrainConfig(epochs=args.epochs)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        test, others, task = world_users(tmp, args.users, 24, 40, args.seed, other_users=max(1, args.other_users),
                                         queries_per_user=3)
        examples = {u.user_id: history_examples(task, u, ("plain",), 0, "bm25", None) for u in test}
        base_exs = base_examples(task, others, ("plain",), 0, "bm25", None, args.seed)
        corpus = [f"{e.prompt} {e.target}" for exs in [*examples.values(), base_exs] for e in exs]
        model, tok = tiny_base(tmp / "base", corpus, args.preset, device, args.seed)
        if args.base_epochs:
            model, info = adapt_base(model, tok, base_exs, BaseTrainConfig(epochs=args.base_epochs), True, args.seed,
                                     384)
            print(f"base: task adaptation loss {info['losses'][0]:.3f} -> {info['losses'][-1]:.3f}", file=sys.stderr)
        train_users(model, tok, examples, peft_config(args.peft, ucfg), ucfg, args.seed, save_root=tmp / "fp32")
        fp32 = {u: tmp / "fp32" / safe_user_dir(u) for u in examples}
        bf16 = {u: save_adapter_bf16(d, tmp / "bf16" / d.name) for u, d in fp32.items()}
        sizes = sizes_by_kind(model, ucfg, args.seed, {**fp32, "__kind__": args.peft}, tmp)

        cache = AdapterCache(int(args.cache_mb * (1 << 20)))
        with MultiUserModel(model) as mm:
            mm.reserve(args.peft, 2 * len(fp32))
            load_times(mm, fp32, read_adapter)  # warm-up: first-call allocations, page cache
            cold32 = load_times(mm, fp32, read_adapter)
            cold16 = load_times(mm, bf16, read_adapter)
            load_times(mm, fp32, cache.get)  # fills the cache (misses)
            hit = load_times(mm, fp32, cache.get)
            t_get = []
            for d in fp32.values():
                t0 = time.perf_counter()
                cache.get(d)
                t_get.append(time.perf_counter() - t0)
            for u in fp32:
                mm.add_user(u, *read_adapter(fp32[u]))
                mm.add_user(u + "@bf16", *read_adapter(bf16[u]))
            score = bf16_score(mm, tok, task, test, args.max_new_tokens)
        slots = slots_times(model, fp32, cache)

    result = {"benchmark": "adapter_io", "users": len(fp32), "peft": args.peft, "preset": args.preset,
              "bytes_per_user": sizes,
              "cold_load_ms": {"fp32": ms_stats(cold32), "bf16": ms_stats(cold16)},
              "cache_hit_ms": {**ms_stats(hit), "get_only": ms_stats(t_get)},
              "slots_ensure_ms": slots, "cache": cache.stats(), "bf16_score": score, "machine": machine_info(device)}
    emit(result)
    return result


if __name__ == "__main__":
    main()
