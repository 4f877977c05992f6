"""Noisy neighbours on the personal adapter service: does one tenant slow down the others?

Starts `oppu serve` on loopback over a fresh store, trains a victim user, then measures the
victim's generate rate (its own `--victim-clients` threads, each in a loop) alone and beside each
noisy neighbour in turn, each arm `--duration` seconds:

    export      `--flood` threads of one user posting exports (a full scrypt each) back to back
    history     one user with `--big-history` items who adds an item and generates in a loop
    training    another user's long training job (`--train-items` items) running throughout
    delete      users created, filled and deleted in a loop while a read snapshot is held open

    python benchmarks/tenants.py                          # short: tiny:micro, 3 s per arm
    python benchmarks/tenants.py --duration 20 --big-history 30000 --train-items 1000 --base tiny

Prints progress, then ONE JSON object on the last line: per arm the victim's rate and latency,
`rate_ratio` (rate beside the neighbour / alone) and `p99_ratio`, the status codes each side got
(the neighbour's 429s, the victim's), and `ok` per arm: the victim kept at least 50% of its rate,
its p99 under 3x, and got no 429.
"""
from __future__ import annotations

import argparse
import json
import random
import secrets
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from _common import machine_info
from load_server import WORDS, items, pct, post_items, start_server, stop_server

TASK = "LaMP_2M"


def gen_body(rng: random.Random) -> dict:
    return {"task": TASK, "input": " ".join(rng.choice(WORDS) for _ in range(8))}


class Tenant:
    def __init__(self, url: str, admin: httpx.Client, labels: list[str], prefix: str, n: int, train: bool = True):
        u = admin.post("/v1/users").raise_for_status().json()
        self.uid, self.token, self.url = u["user_id"], u["token"], url
        self.c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120)
        post_items(admin, self.uid, TASK, n, labels, random.Random(prefix), prefix)
        if train:
            job = admin.post(f"/v1/users/{self.uid}/train").raise_for_status().json()["job_id"]
            wait_job(admin, job)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120)


def wait_job(admin: httpx.Client, job: str, until=("done", "failed")) -> dict:
    while (s := admin.get(f"/v1/jobs/{job}").json())["status"] not in until:
        time.sleep(0.05)
    return s


def loop(stop: threading.Event, fn, codes: Counter, lock: threading.Lock) -> None:
    while not stop.is_set():
        try:
            code = fn()
        except httpx.HTTPError as e:
            code = type(e).__name__
        with lock:
            codes[code] += 1


def measure(victim: Tenant, n_clients: int, duration: float, neighbour=None) -> dict:
    """The victim's answers while `neighbour(stop, codes, lock)` threads run (None: alone)."""
    stop, lock = threading.Event(), threading.Lock()
    lat: list[float] = []
    when: list[tuple[float, float]] = []  # (seconds into the arm at the answer, latency)
    vcodes, ncodes = Counter(), Counter()

    def victim_client(i: int) -> None:
        rng = random.Random(i)
        with victim.client() as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.post(f"/v1/users/{victim.uid}/generate", json=gen_body(rng))
                with lock:
                    vcodes[r.status_code] += 1
                    if r.status_code == 200:
                        lat.append(time.perf_counter() - t0)
                        when.append((time.monotonic() - start[0], lat[-1]))

    threads = [threading.Thread(target=victim_client, args=(i,)) for i in range(n_clients)]
    if neighbour is not None:
        threads += neighbour(stop, ncodes, lock)
    t0 = time.monotonic()
    start = [t0]
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(120)
    wall = time.monotonic() - t0
    return {"rps": round(len(lat) / wall, 2), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "victim_codes": {str(k): v for k, v in vcodes.items()}, "neighbour_codes": {str(k): v for k, v in ncodes.items()},
            "max_ms_by_second": [round(1000 * max((x for w, x in when if int(w) == i), default=0.0))
                                 for i in range(int(wall) + 1)]}


def export_flood(t: Tenant, n: int):
    def make(stop, codes, lock):
        def one():
            with t.client() as c:
                loop(stop, lambda: c.post(f"/v1/users/{t.uid}/adapter", json={"passphrase": "correct horse"}).status_code,
                     codes, lock)
        return [threading.Thread(target=one) for _ in range(n)]
    return make


def history_loop(t: Tenant):
    def make(stop, codes, lock):
        counter = iter(range(10 ** 9))

        def one():
            rng = random.Random(1)
            with t.client() as c:
                def step():
                    i = next(counter)
                    r = c.post(f"/v1/users/{t.uid}/history", json={"task": TASK, "items": [
                        {"id": f"more{i}", "description": " ".join(rng.choice(WORDS) for _ in range(8)), "tag": "comedy"}]})
                    g = c.post(f"/v1/users/{t.uid}/generate", json=gen_body(rng))
                    return f"{r.status_code}/{g.status_code}"
                loop(stop, step, codes, lock)
        return [threading.Thread(target=one)]
    return make


def delete_loop(url: str, admin_token: str, store: Path, labels: list[str]):
    def make(stop, codes, lock):
        reader = sqlite3.connect(store / "store.db", isolation_level=None, check_same_thread=False)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM history_items").fetchone()  # an old snapshot, held open

        def one():
            rng = random.Random(2)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=120) as a:
                def step():
                    u = a.post("/v1/users").json()
                    h = {"Authorization": f"Bearer {u['token']}"}
                    a.post(f"/v1/users/{u['user_id']}/history", json={"task": TASK, "items": items(rng, "d", 20, labels)})
                    r = a.delete(f"/v1/users/{u['user_id']}", headers=h)
                    return f"{r.status_code} scrubbed={r.json().get('scrubbed')}"
                loop(stop, step, codes, lock)
            reader.rollback()
            reader.close()
        return [threading.Thread(target=one)]
    return make


def arms(args, url, admin, admin_token, store, labels):
    """(name, neighbour factory, setup seconds) for each arm, the neighbours set up first."""
    out = []
    t0 = time.monotonic()
    flood = Tenant(url, admin, labels, "f", 8)
    out.append(("export", export_flood(flood, args.flood)))
    big = Tenant(url, admin, labels, "b", 8)
    # the big history goes in after its adapter is trained (a train on it would take the whole arm)
    rng = random.Random(3)
    post_items(admin, big.uid, TASK, args.big_history, labels, rng, "big")
    big.c.post(f"/v1/users/{big.uid}/generate", json=gen_body(rng))  # its history loaded once, before the arm
    out.append(("history", history_loop(big)))
    trainee = Tenant(url, admin, labels, "t", args.train_items, train=False)

    def training(stop, codes, lock):
        job = admin.post(f"/v1/users/{trainee.uid}/train").raise_for_status().json()["job_id"]
        wait_job(admin, job, until=("running", "done", "failed"))

        def watch():
            while not stop.is_set():
                with lock:
                    codes[admin.get(f"/v1/jobs/{job}").json()["status"]] += 1
                time.sleep(0.5)
        return [threading.Thread(target=watch)]
    out.append(("training", training))
    out.append(("delete", delete_loop(url, admin_token, store, labels)))
    return out, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per arm")
    ap.add_argument("--victim-clients", type=int, default=4)
    ap.add_argument("--flood", type=int, default=8, help="export flood threads")
    ap.add_argument("--big-history", type=int, default=3000, help="the history neighbour's items (issue: 30000)")
    ap.add_argument("--train-items", type=int, default=400, help="the training neighbour's items (issue: 1007)")
    ap.add_argument("--base", default="tiny:micro")
    ap.add_argument("--base-epochs", type=int, default=0)
    ap.add_argument("--user-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--arms", default="export,history,training,delete", help="which neighbours, comma-separated")
    ap.add_argument("--train-yield-ms", type=float, default=None,
                    help="the server's --train-yield-ms (0: training steps never wait for generation)")
    args = ap.parse_args()
    args.task, args.max_batch, args.max_wait_ms = TASK, 32, 10.0
    args.extra = ["--max-history-items", str(args.big_history + 10_000)]
    if args.train_yield_ms is not None:
        args.extra += ["--train-yield-ms", str(args.train_yield_ms)]
    from oppu.tasks import get_task

    labels = list(get_task(TASK).labels)
    admin_token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="oppu-tenants-") as tmp:
        store = Path(tmp) / "store"
        proc, url, _ = start_server(args, store, admin_token)
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=120) as admin:
                victim = Tenant(url, admin, labels, "v", 8)
                victim.c.post(f"/v1/users/{victim.uid}/generate", json=gen_body(random.Random(0)))  # warm
                plan, setup_s = arms(args, url, admin, admin_token, store, labels)
                alone = measure(victim, args.victim_clients, args.duration)
                print(f"alone: {alone['rps']} req/s, p99 {alone['p99_ms']} ms (neighbours set up in {setup_s:.1f}s)",
                      flush=True)
                results = {}
                for name, neighbour in [(n, f) for n, f in plan if n in args.arms.split(",")]:
                    r = measure(victim, args.victim_clients, args.duration, neighbour)
                    r["rate_ratio"] = round(r["rps"] / alone["rps"], 3) if alone["rps"] else None
                    r["p99_ratio"] = round(r["p99_ms"] / alone["p99_ms"], 3) if alone["p99_ms"] else None
                    r["ok"] = bool(r["rate_ratio"] and r["rate_ratio"] >= 0.5 and r["p99_ratio"] < 3
                                   and "429" not in r["victim_codes"])
                    results[name] = r
                    print(f"{name}: {r['rps']} req/s ({r['rate_ratio']}x), p99 {r['p99_ms']} ms ({r['p99_ratio']}x), "
                          f"neighbour {r['neighbour_codes']}", flush=True)
        finally:
            stop_server(proc)
    print(json.dumps({"benchmark": "tenants", "duration_s": args.duration, "victim_clients": args.victim_clients,
                      "alone": alone, "arms": results, "all_ok": all(r["ok"] for r in results.values()),
                      "setup": {"big_history": args.big_history, "train_items": args.train_items, "flood": args.flood,
                                "base": args.base, "threads": args.threads,
                                "train_yield_ms": args.train_yield_ms},
                      "machine": machine_info(args.device)}))


if __name__ == "__main__":
    main()
