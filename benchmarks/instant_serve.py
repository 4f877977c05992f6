"""A new user of the service: time to the first personalized answer, instant adapter vs training.

Runs the service in-process (oppu.server.Service, the object under `oppu serve`) twice on the same
base, for the same --users new users, one after another as they would arrive. Each user adds their
--items most recent history items, then asks one question (their first query):

  instant   a server with an instant bank (`oppu serve --instant`): the history request mixes and
            publishes the user's instant version; the first generate is answered by it
  trained   a server without one: the history request, a training job (POST /train) waited for,
            then the first generate, answered by the trained version

Per arm: history_ms (the add-history call; for `instant` this includes mixing the module),
train_ms (trained only), first_generate_ms, and first_answer_ms = their sum; p50 / p99 over users.
`ratio_first_answer` = trained p50 / instant p50. Each answer's adapter version is checked to be the
user's instant (resp. trained) version. Last stdout line: one JSON object.

    python benchmarks/instant_serve.py --base tiny --users 8                  # bank built on the tiny world
    python benchmarks/instant_serve.py --base runs/np-smol --users 4          # an `oppu run` output with instant
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from _common import emit, machine_info, percentile, set_threads


def stats(xs: list[float]) -> dict:
    return {"p50_ms": round(1000 * percentile(xs, 50), 1), "p99_ms": round(1000 * percentile(xs, 99), 1)}


def users_and_base(args, tmp: Path):
    """(task id, users with history, (model, tok, info)) for --base."""
    from oppu.data.synth import synth_world
    from oppu.data.users import load_lamp_dir
    from oppu.server import open_base
    from oppu.config import is_tiny_base
    from oppu.server.bases import serve_run_config

    if is_tiny_base(args.base):
        task = args.task
        data = tmp / "world"
        synth_world(task, data, seed=args.seed + 1, test_users=args.users, other_users=8)
        ucfg = serve_run_config(args.base).user_train
        base = open_base(args.base, task, tmp, seed=args.seed, base_epochs=args.base_epochs, instant="on",
                         user_train=ucfg, instant_bank_users=args.bank_users)
    else:
        run = json.loads((Path(args.base) / "run.json").read_text())
        task, data = run["task"], run["data"]
        base = open_base(args.base, task, tmp, instant="on")
    test, _ = load_lamp_dir(data, task).split_users(n_test=args.users)
    return task, test, base


def arm(base, task: str, users, args, root: Path, instant: bool) -> dict:
    """One server over a copy of the base; every user: history, (train), first generate."""
    from oppu.server import ServeConfig, Service
    from oppu.server.bases import serve_run_config
    from oppu.store import AdapterStore

    model, tok, info = base
    info = dict(info)
    bank = info.pop("instant")
    rc = serve_run_config(args.base)  # as `oppu serve --base` trains
    cfg = ServeConfig(task=task, user_train=rc.user_train, style=rc.prompt_style, k=args.k, max_len=args.max_len)
    svc = Service(AdapterStore(root), copy.deepcopy(model), tok, cfg, "bench-admin-token-0123456789", info,
                  instant=bank if instant else None)
    svc.start()
    out = {"history_s": [], "train_s": [], "generate_s": [], "first_answer_s": []}
    try:
        for u in users:
            uid, _ = svc.create_user()
            items = u.history[-args.items:]
            t0 = time.perf_counter()
            svc.add_history(uid, task, items)
            t1 = time.perf_counter()
            if not instant:
                job = svc.start_training(uid)
                while svc.job(job.job_id)["status"] not in ("done", "failed"):
                    time.sleep(0.01)
                assert svc.job(job.job_id)["status"] == "done", svc.job(job.job_id)
            t2 = time.perf_counter()
            text, version = svc.submit_generate(uid, task, u.queries[0].input, None).result()
            t3 = time.perf_counter()
            v = svc.store.version(uid, version)
            assert (v.note == "instant") == instant, (uid, v.note)
            out["history_s"].append(t1 - t0)
            out["train_s"].append(t2 - t1)
            out["generate_s"].append(t3 - t2)
            out["first_answer_s"].append(t3 - t0)
    finally:
        svc.close()
        svc.store.close()
    res = {"history": stats(out["history_s"]), "first_generate": stats(out["generate_s"]),
           "first_answer": stats(out["first_answer_s"])}
    if not instant:
        res["train"] = stats(out["train_s"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny", help="tiny | tiny:<preset> | an `oppu run` output that built an "
                                                   "instant bank (methods instant*)")
    ap.add_argument("--task", default="LaMP_2M", help="tiny bases: the task")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--items", type=int, default=16, help="history items each new user adds")
    ap.add_argument("--bank-users", type=int, default=16, help="tiny: bank modules")
    ap.add_argument("--base-epochs", type=int, default=3, help="tiny: task-adaptation epochs")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="oppu-instant-serve-") as d:
        tmp = Path(d)
        task, users, base = users_and_base(args, tmp)
        bank = base[2]["instant"]
        print(f"base {args.base}: bank of {len(bank.ids)} modules, top_k {bank.top_k}, {len(users)} users")
        inst = arm(base, task, users, args, tmp / "store-instant", instant=True)
        print("instant", inst)
        trained = arm(base, task, users, args, tmp / "store-trained", instant=False)
        print("trained", trained)
    emit({"benchmark": "instant_serve", "base": args.base, "task": task, "users": len(users), "items": args.items,
          "bank": bank.describe(), "instant": inst, "trained": trained,
          "ratio_first_answer": round(trained["first_answer"]["p50_ms"] / inst["first_answer"]["p50_ms"], 2),
          "machine": machine_info("cpu")})


if __name__ == "__main__":
    main()
