"""Bounded load on the personal adapter service: N concurrent clients, each a different user.

Starts `oppu serve` on loopback (any free port) over a fresh store, creates and trains one user
per client (all train jobs queued at once: the server's worker trains them in batched passes of
the engine, several users per pass), then every client posts `generate` for its own user as fast
as answers come back for `--duration` seconds. Concurrent requests of different users are served
in mixed-adapter batches, so throughput grows with the batch size the batcher manages to fill.

    python benchmarks/load_server.py                                   # 32 clients x 60 s, tiny base
    python benchmarks/load_server.py --clients 8 --duration 10         # quick
    python benchmarks/load_server.py --base tiny:micro --threads 1     # smallest

The base is untrained by default (`--base-epochs 0`): speed does not depend on quality, and an
untrained model decodes the full `max_new_tokens` per answer (the slow case). Prints progress,
then ONE JSON object on the last line: latency p50/p90/p99 (ms), throughput (req/s), errors,
mean rows per batch, setup time, and machine details (the client shares the cores with the
server; loadavg shows how busy the machine was).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _common import machine_info

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("space robot love city war dream ship crime family future past king magic detective heist ghost "
         "island winter music school").split()


def items(rng: random.Random, prefix: str, n: int, labels: list[str]) -> list[dict]:
    return [{"id": f"{prefix}{i}", "description": " ".join(rng.choice(WORDS) for _ in range(8)),
             "tag": rng.choice(labels)} for i in range(n)]


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server started by start_server; kill it if it has not exited within 60 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_server(args, store: Path, admin: str) -> tuple[subprocess.Popen, str, Path]:
    port_file, log = store.parent / "port", store.parent / "server.log"
    cmd = [sys.executable, "-m", "oppu.cli_serve", "serve", "--store", str(store), "--base", args.base,
           "--base-epochs", str(args.base_epochs), "--task", args.task, "--port", "0", "--port-file", str(port_file),
           "--user-epochs", str(args.user_epochs), "--max-batch", str(args.max_batch), "--max-wait-ms",
           str(args.max_wait_ms), "--threads", str(args.threads), "--device", args.device, "--log-level", "warning",
           *getattr(args, "extra", [])]
    env = {**os.environ, "OPPU_ADMIN_TOKEN": admin, "PYTHONWARNINGS": "ignore"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    end = time.monotonic() + args.start_timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if port_file.exists():
            url = f"http://127.0.0.1:{port_file.read_text().strip()}"
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    return proc, url, log
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"server not healthy after {args.start_timeout}s:\n{log.read_text()[-3000:]}")


def setup_users(c: httpx.Client, args, labels: list[str]) -> list[tuple[str, str]]:
    rng = random.Random(0)
    users, jobs = [], []
    for i in range(args.clients):
        u = c.post("/v1/users").raise_for_status().json()
        c.post(f"/v1/users/{u['user_id']}/history",
               json={"task": args.task, "items": items(rng, f"u{i}-", args.history, labels)}).raise_for_status()
        jobs.append(c.post(f"/v1/users/{u['user_id']}/train").raise_for_status().json()["job_id"])
        users.append((u["user_id"], u["token"]))
    for j in jobs:
        while (s := c.get(f"/v1/jobs/{j}").json())["status"] not in ("done", "failed"):
            time.sleep(0.1)
        if s["status"] != "done":
            sys.exit(f"training job {j} failed: {s['error']}")
    return users


def post_items(c: httpx.Client, uid: str, task: str, n: int, labels: list[str], rng: random.Random,
               prefix: str) -> None:
    """Add n generated history items to the user, in requests of at most 1000 items."""
    for start in range(0, n, 1000):
        c.post(f"/v1/users/{uid}/history", json={"task": task, "items": items(
            rng, f"{prefix}{start}-", min(1000, n - start), labels)}).raise_for_status()


def start_training(c: httpx.Client, args, labels: list[str]) -> str | None:
    """With --train-items N: another user's N-item training job, queued just before the load."""
    if not args.train_items:
        return None
    u = c.post("/v1/users").raise_for_status().json()
    post_items(c, u["user_id"], args.task, args.train_items, labels, random.Random(1), "t")
    return c.post(f"/v1/users/{u['user_id']}/train").raise_for_status().json()["job_id"]


def batch_rows(c: httpx.Client) -> tuple[float, float]:
    text = c.get("/metrics").text
    m = re.search(r"oppu_generate_batch_rows_sum (\S+)\noppu_generate_batch_rows_count (\S+)", text)
    return float(m.group(1)), float(m.group(2))


def run_load(url: str, users: list[tuple[str, str]], task: str, duration: float) -> dict:
    lat: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(len(users) + 1)
    stop_at: list[float] = []

    def client(i: int, uid: str, token: str) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            try:
                c.post(f"/v1/users/{uid}/generate", json={"task": task, "input": "warm up"})  # load the adapter
            finally:
                start.wait()
            while time.monotonic() < stop_at[0]:
                body = {"task": task, "input": " ".join(rng.choice(WORDS) for _ in range(8))}
                t0 = time.perf_counter()
                try:
                    r = c.post(f"/v1/users/{uid}/generate", json=body)
                    key = None if r.status_code == 200 else f"http {r.status_code}"
                except httpx.HTTPError as e:
                    key = type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    if key is None:
                        lat.append(dt)
                    else:
                        errors[key] = errors.get(key, 0) + 1

    threads = [threading.Thread(target=client, args=(i, uid, tok)) for i, (uid, tok) in enumerate(users)]
    for t in threads:
        t.start()
    stop_at.append(time.monotonic() + duration + 60)  # placeholder until every client is warm
    start.wait()
    t0 = time.monotonic()
    stop_at[0] = t0 + duration
    for t in threads:
        t.join()
    return {"latencies": lat, "errors": errors, "wall_s": time.monotonic() - t0}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 2) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients, one user each")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--base", default="tiny", help="tiny | tiny:micro | tiny:small | a checkpoint dir")
    ap.add_argument("--base-epochs", type=int, default=0, help="task adaptation of a tiny base (0 = untrained)")
    ap.add_argument("--task", default="LaMP_2M")
    ap.add_argument("--history", type=int, default=8, help="history items per user")
    ap.add_argument("--user-epochs", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--train-items", type=int, default=0,
                    help="another user's training job of this many items runs during the load (0 = none)")
    args = ap.parse_args()
    from oppu.tasks import get_task

    labels = list(get_task(args.task).labels)
    admin = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="oppu-load-") as tmp:
        t0 = time.monotonic()
        proc, url, _ = start_server(args, Path(tmp) / "store", admin)
        started = time.monotonic() - t0
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=120) as c:
                t1 = time.monotonic()
                users = setup_users(c, args, labels)
                trained = time.monotonic() - t1
                print(f"server up in {started:.1f}s; {len(users)} users trained in {trained:.1f}s", flush=True)
                s0, n0 = batch_rows(c)
                job = start_training(c, args, labels)
                res = run_load(url, users, args.task, args.duration)
                s1, n1 = batch_rows(c)
                job_status = c.get(f"/v1/jobs/{job}").json()["status"] if job else None
        finally:
            stop_server(proc)
    lat = res["latencies"]
    out = {"benchmark": "load_server", "clients": args.clients, "duration_s": round(res["wall_s"], 2),
           "requests": len(lat), "errors": sum(res["errors"].values()), "error_kinds": res["errors"],
           "throughput_rps": round(len(lat) / res["wall_s"], 2),
           "latency_ms": {"p50": pct(lat, 0.5), "p90": pct(lat, 0.9), "p99": pct(lat, 0.99),
                          "max": pct(lat, 1.0), "mean": round(1000 * statistics.fmean(lat), 2) if lat else None},
           "mean_batch_rows": round((s1 - s0) / (n1 - n0), 2) if n1 > n0 else None,
           "setup": {"server_start_s": round(started, 1), "train_users_s": round(trained, 1),
                     "training_neighbour": {"items": args.train_items, "status_at_end": job_status}},
           "server": {"base": args.base, "base_epochs": args.base_epochs, "task": args.task,
                      "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "threads": args.threads},
           "machine": machine_info(args.device)}
    print(f"{out['requests']} answers, {out['errors']} errors, p50 {out['latency_ms']['p50']} ms, "
          f"p99 {out['latency_ms']['p99']} ms, {out['throughput_rps']} req/s, "
          f"{out['mean_batch_rows']} rows/batch")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
