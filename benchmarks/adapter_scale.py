"""Adapter loading with many users in the store: does a cold load grow with the number of users?

Fills an oppu.store.AdapterStore with fresh per-user modules (each its own PEFT files, published
through `put_version`: hashed, fsynced, recorded in the store's SQLite db), up to each size of
--users in turn, and at each size times the serving path for --sample users drawn at random:

  cold_load_ms   the server's first request for a user: `store.resolve_active` (db lookup, every
                 file re-hashed against its recorded sha256) + `Slots.ensure` through an empty
                 AdapterCache (read the safetensors, plug the user into a MultiUserModel slot).
                 "Cold" for oppu: the OS page cache may hold the files (just written; dropping it
                 would disturb other work on the machine)
  cache_hit_ms   the same user again after its slot was evicted: resolve_active + ensure with the
                 file bytes in the AdapterCache
  bytes_per_user adapter_model.safetensors per user, fp32 and bf16, for LoRA, IA3 and prompt tuning
                 with the base's default user_train (a checkpoint: LoRA r=8 on q,v; the tiny base:
                 every linear layer), oppu.engine.cache.save_adapter_bf16 for bf16

p50 and p99 over the sample; `p99_ratio_vs_smallest` is each size's cold p99 over the smallest
size's (flat: near 1). Last stdout line: one JSON object.

    python benchmarks/adapter_scale.py --base tiny --users 100,1000,10000
    python benchmarks/adapter_scale.py --base smollm2 --users 100,1000
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, load_bench_base, machine_info, percentile, resolve, set_threads


def stats(xs: list[float]) -> dict:
    return {"p50_ms": round(1000 * percentile(xs, 50), 3), "p99_ms": round(1000 * percentile(xs, 99), 3)}


def module_bytes(model, ucfg, seed: int, tmp: Path) -> tuple[dict, Path]:
    """Bytes per user of each PEFT type (fresh modules on this base); the LoRA dir to publish."""
    from oppu.engine import initial_module, peft_config, write_adapter
    from oppu.engine.cache import save_adapter_bf16

    out, dirs = {}, {}
    for kind in ("lora", "ia3", "prompt_tuning"):
        d = write_adapter(tmp / "kinds" / kind, *initial_module(model, peft_config(kind, ucfg), seed, "bytes"))
        bf = save_adapter_bf16(d, tmp / "kinds" / f"{kind}-bf16")
        dirs[kind] = d
        out[kind] = {"fp32_bytes": (d / "adapter_model.safetensors").stat().st_size,
                     "bf16_bytes": (bf / "adapter_model.safetensors").stat().st_size}
    return out, dirs["lora"]


def fill(store, src: Path, task: str, have: int, want: int) -> float:
    """Publish users have..want-1 (a copy of src each); returns seconds per user."""
    t0 = time.perf_counter()
    for i in range(have, want):
        uid = f"u{i:06d}"
        store.create_user(uid, task)
        store.put_version(uid, lambda d: [shutil.copy2(f, d / f.name) for f in src.iterdir()],
                          task=task, peft_type="LORA")
    return (time.perf_counter() - t0) / max(1, want - have)


def time_loads(store, model, sample: list[str], cache_mb: float) -> tuple[list[float], list[float]]:
    """Cold and cache-hit seconds per sampled user, through the path the server takes."""
    from oppu.engine.cache import AdapterCache
    from oppu.engine.serving import Slots

    slots = Slots(model, max_loaded=1, cache=AdapterCache(int(cache_mb * (1 << 20))))
    try:
        def load(uid: str) -> float:
            t0 = time.perf_counter()
            served = store.resolve_active(uid)
            slots.ensure(uid, (served.version.version,), served.path)
            return time.perf_counter() - t0

        load(sample[-1])  # first-call allocations
        cold = [load(u) for u in sample]   # max_loaded 1: each evicts the previous user
        hit = [load(u) for u in sample]    # evicted from the slots, bytes in the cache
        return cold, hit
    finally:
        slots.close()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="tiny", help="tiny | tiny:<preset> | smollm2 | a .gguf | a local HF dir")
    ap.add_argument("--users", default="100,1000", help="store sizes, comma-separated, increasing")
    ap.add_argument("--sample", type=int, default=100, help="users timed at each size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.users.split(",")]
    if sizes != sorted(sizes) or sizes[0] < 1:
        ap.error(f"--users must be increasing positive sizes, got {args.users!r}")

    from oppu.config import load_config
    from oppu.store import AdapterStore

    set_threads(args.threads)
    device = resolve(args.device)
    rng = random.Random(args.seed)
    ucfg = load_config(None, base=args.base).user_train  # the base's defaults (a checkpoint: LoRA r=8 on q,v)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model, _ = load_bench_base(args.base, tmp / "base", ["description: a film tag: comedy"] * 40, device,
                                   args.seed)
        sizes_by_kind, lora_dir = module_bytes(model, ucfg, args.seed, tmp)
        store = AdapterStore(tmp / "store")
        rows, have = [], 0
        for n in sizes:
            per_user_s = fill(store, lora_dir, "LaMP_2M", have, n)
            have = n
            sample = rng.sample([f"u{i:06d}" for i in range(n)], min(args.sample, n))
            cold, hit = time_loads(store, model, sample, cache_mb=max(64.0, 2 * len(sample) * sizes_by_kind[
                "lora"]["fp32_bytes"] / (1 << 20)))
            rows.append({"users": n, "publish_ms_per_user": round(1000 * per_user_s, 2),
                         "cold_load_ms": stats(cold), "cache_hit_ms": stats(hit)})
            print(f"{n} users: cold p50 {rows[-1]['cold_load_ms']['p50_ms']} ms, p99 "
                  f"{rows[-1]['cold_load_ms']['p99_ms']} ms", file=sys.stderr)
        store.close()
    first = rows[0]["cold_load_ms"]["p99_ms"]
    for r in rows:
        r["p99_ratio_vs_smallest"] = round(r["cold_load_ms"]["p99_ms"] / first, 3)
    result = {"benchmark": "adapter_scale", "base": args.base, "sample": args.sample, "bytes_per_user": sizes_by_kind,
              "by_store_size": rows, "machine": machine_info(device)}
    emit(result)
    return result


if __name__ == "__main__":
    main()
