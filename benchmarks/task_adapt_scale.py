"""Task adaptation at scale: what the default cap on tokens per epoch costs in time and in score.

Runs `oppu run --methods non_personalized` once per arm on the same LaMP directory, each on a
fresh cache (so the base is built, not reused), and reports per arm the task adaptation's seconds,
steps, examples and tokens per epoch, and the non_personalized score; then the paired bootstrap
over test users of each arm's gap to the first arm.

    python benchmarks/task_adapt_scale.py --data ../shared/data/commits-numpy --arms capped,uncapped
    python benchmarks/task_adapt_scale.py --data ../shared/data/commits-numpy --resample 120x120 --arms capped

Arms: `capped` (the base's defaults, or base_train.max_tokens = --capped-tokens), `uncapped`
(base_train.max_tokens: 0 and max_examples: 0).
`--resample UxI` first writes a stress world: U other users of I items each, drawn (seeded,
without replacement within a user) from the real history items of the directory's train users,
each with one question made from a further item; the test users (dev split) are kept as they are.
Real text at a size the directory does not have (a large history: many authors, many commits).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info

ARMS = {"capped": {}, "uncapped": {"base_train": {"max_tokens": 0, "max_examples": 0}}}


def resample_world(src: Path, dst: Path, n_users: int, n_items: int, seed: int) -> dict:
    """A LaMP_4-shaped stress world in dst from src's train profiles (see module docstring)."""
    qs = json.loads((src / "train_questions.json").read_text())
    pool = {it["id"]: it for q in qs for it in q["profile"] if it.get("title") and it.get("text")}
    items = sorted(pool.values(), key=lambda it: it["id"])
    if len(items) < n_items + 1:
        raise SystemExit(f"--resample needs at least {n_items + 1} distinct history items in {src}; it has {len(items)}")
    rng = random.Random(seed)
    prefix = qs[0]["input"].split(":", 1)[0] + ": " if ":" in qs[0]["input"] else ""
    questions, golds = [], []
    for u in range(n_users):
        picks = rng.sample(items, n_items + 1)
        hist = [{**it, "id": f"s{u}-{it['id']}"} for it in picks[:-1]]
        q = picks[-1]
        questions.append({"id": f"s{u}-q", "input": prefix + q["text"], "profile": hist})
        golds.append({"id": f"s{u}-q", "output": q["title"]})
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "train_questions.json").write_text(json.dumps(questions))
    (dst / "train_outputs.json").write_text(json.dumps({"task": "LaMP_4", "golds": golds}))
    for name in ("dev_questions.json", "dev_outputs.json"):
        (dst / name).write_text((src / name).read_text())
    return {"other_users": n_users, "items_per_user": n_items, "distinct_items": len(items), "seed": seed}


def run_arm(name: str, data: Path, out: Path, args) -> dict:
    """One `oppu run` of the arm on a fresh cache; its facts from run.json and metrics.json."""
    arm_out = out / name
    cfg = out / f"{name}.yaml"
    arm = ARMS[name]
    if name == "capped" and args.capped_tokens is not None:
        arm = {"base_train": {"max_tokens": args.capped_tokens}}
    cfg.write_text(json.dumps(arm))    # JSON is YAML
    cmd = [sys.executable, "-m", "oppu.cli", "run", "--task", args.task, "--data", str(data), "--base", args.base,
           "--test-users", str(args.test_users), "--methods", "non_personalized", "--out", str(arm_out),
           "--config", str(cfg)]
    env = {**os.environ, "OPPU_CACHE": str(out / f"cache-{name}")}
    wall = None
    if not (args.reuse and (arm_out / "run.json").is_file()):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = round(time.perf_counter() - t0, 1)
        if proc.returncode:
            raise SystemExit(f"arm {name}: oppu run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
        print(proc.stdout[-1500:], flush=True)
    run = json.loads((arm_out / "run.json").read_text())
    metrics = json.loads((arm_out / "metrics.json").read_text())
    base = run["base"]
    return {"base_s": base["seconds"], "wall_s": wall, "reused": wall is None, "examples": base.get("examples"),
            "examples_per_epoch": base.get("examples_per_epoch"), "tokens_per_epoch": base.get("tokens_per_epoch"),
            "steps": base.get("steps"), "epochs": run["config"]["base_train"]["epochs"],
            "final_loss": round(base["losses"][-1], 4) if base.get("losses") else None,
            "score": metrics["non_personalized"]}


def paired_gaps(task: str, data: Path, out: Path, arms: list[str]) -> dict:
    """Bootstrap over test users of each arm's non_personalized score minus the first arm's."""
    from oppu.data.lamp import read_outputs, read_questions
    from oppu.data.users import group_users
    from oppu.spread import user_bootstrap

    preds = {}
    for a in arms:
        _, p, _ = read_outputs(out / a / "predictions" / "non_personalized.json")
        preds[a] = p
    qids = set.intersection(*(set(p) for p in preds.values()))
    qs, _ = read_questions(data / "dev_questions.json", task=task)
    _, golds, _ = read_outputs(data / "dev_outputs.json")
    users = group_users(qs, golds)
    by_user = {u.user_id: [q.id for q in u.queries if q.id in qids] for u in users}
    s = user_bootstrap(task, {q: golds[q] for q in qids}, {a: {q: preds[a][q] for q in qids} for a in arms},
                       by_user, baseline=arms[0])
    return {a: s["gap"][a] for a in arms[1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="LaMP directory (train_* and dev_* files)")
    ap.add_argument("--task", default="LaMP_4")
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--arms", default="capped,uncapped", help=f"comma list of: {', '.join(ARMS)}")
    ap.add_argument("--resample", default="", help="UxI: a stress world of U users x I items (see module docstring)")
    ap.add_argument("--test-users", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="keep runs here (default: a temporary directory)")
    ap.add_argument("--capped-tokens", type=int, default=None, help="the capped arm's base_train.max_tokens "
                                                                    "(default: the base's default)")
    ap.add_argument("--reuse", action="store_true", help="read an arm's earlier run in --out instead of rerunning it")
    args = ap.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise SystemExit(f"--arms: unknown arm(s) {bad}; choose from {list(ARMS)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        data, world = Path(args.data), None
        if args.resample:
            try:
                n_users, n_items = (int(x) for x in args.resample.lower().split("x"))
            except ValueError:
                raise SystemExit(f"--resample {args.resample!r}: expected UxI, e.g. 120x120") from None
            world = resample_world(data, out / "world", n_users, n_items, args.seed)
            data = out / "world"
        res = {a: run_arm(a, data, out, args) for a in arms}
        gaps = paired_gaps(args.task, data, out, arms) if len(arms) > 1 else {}
    first = arms[0]
    line = {"benchmark": "task_adapt_scale", "data": args.data, "resample": world, "base": args.base,
            "arms": res, f"gap_vs_{first}": gaps,
            **{f"time_ratio_{a}_vs_{first}": round(res[a]["base_s"] / max(1e-9, res[first]["base_s"]), 3)
               for a in arms[1:]},
            "machine": machine_info("cpu")}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
