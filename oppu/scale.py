"""Train many users' PEFT modules across processes (or a Ray cluster): executors over oppu.engine.

Users are cut into batches of at most `max_users_per_batch` (most examples first, so a batch holds
users of similar length who finish together); each batch is one task. A task loads the base from
`base_dir` with `oppu.model.base.load_base` (once per worker process, then reused), runs
`oppu.engine.train_users` on its users and writes their adapters to out_dir/<safe_user_dir(uid)>/,
so every adapter ends in one directory whichever worker trained it. Tasks go to:

  executor="local"  a process pool (spawn context) of `workers` processes on this machine;
  executor="ray"    Ray remote tasks, at most `workers` in flight. ray_address=None starts a private
                    local Ray (its files under a fresh temp dir, no dashboard, num_cpus=workers,
                    token auth with a random token passed by environment, so nothing is written to
                    ~/.ray or /tmp/ray) and stops it afterwards; an address ("auto", "ray://host:10001")
                    joins that cluster, whose nodes must have oppu installed and see base_dir/out_dir.

Results: each user's module equals single-process `train_users` on the same users to float
tolerance (batched training is per-user exact, see oppu.engine.train); when the single-process
run forms the same batches (e.g. users with equal example counts, in order), bit for bit.

    from oppu.scale import train_sharded
    losses = train_sharded("cache/base", None, {"u1": exs1, "u2": exs2}, peft_config("lora", ucfg), ucfg,
                           seed=0, out_dir="runs/x/adapters", executor="local", workers=2)

Ray is an optional extra (pip install "ray==2.60.0"); examples must be picklable (oppu.examples.Example
is a frozen dataclass).
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from oppu.config import EXECUTORS, TOKENS_PER_FORWARD

POOLS = tuple(e for e in EXECUTORS if e != "batched")  # the executors that leave this process
_BASES: dict[tuple, tuple[Any, Any]] = {}  # per worker process: (base_dir, tok_dir, dtype, device) -> (model, tok)


@dataclass(frozen=True)
class ShardJob:
    """One task: a batch of users to train together in one worker (picklable)."""
    base_dir: str
    tok_dir: str | None
    examples: dict[str, list]
    pcfg: Any
    ucfg: Any
    seed: int
    out_dir: str
    max_users_per_batch: int
    max_len: int
    dtype: str
    device: str
    threads: int
    tokens_per_forward: int = TOKENS_PER_FORWARD


def plan_shards(users_examples: Mapping[str, Sequence], max_users_per_batch: int) -> list[list[str]]:
    """User ids, most examples first (ties: given order), cut into batches of max_users_per_batch."""
    if max_users_per_batch < 1:
        raise ValueError(f"max_users_per_batch must be >= 1, got {max_users_per_batch}")
    order = sorted(users_examples, key=lambda u: -len(users_examples[u]))  # sorted() is stable
    return [order[i:i + max_users_per_batch] for i in range(0, len(order), max_users_per_batch)]


def load_worker_base(base_dir: str, tok_dir: str | None, dtype: str, device: str):
    """(model, tok) for this process, loaded once through oppu.model.base (the one loader): the
    model from base_dir, the tokenizer from tok_dir (default base_dir)."""
    key = (base_dir, tok_dir, dtype, device)
    if key not in _BASES:
        from oppu.model.base import load_base, load_tokenizer

        model, tok = load_base(base_dir, dtype, device)
        if tok_dir is not None and Path(tok_dir).resolve() != Path(base_dir).resolve():
            tok = load_tokenizer(tok_dir)
        _BASES[key] = (model, tok)
    return _BASES[key]


def train_shard(job: ShardJob) -> dict[str, list[float]]:
    """Run in a worker: train one batch of users, save their adapters; {uid: per-epoch losses}."""
    import torch

    from oppu.engine import train_users

    if job.threads > 0:
        torch.set_num_threads(job.threads)
    model, tok = load_worker_base(job.base_dir, job.tok_dir, job.dtype, job.device)
    return train_users(model, tok, job.examples, job.pcfg, job.ucfg, job.seed, save_root=job.out_dir,
                       max_len=job.max_len, max_users_per_batch=job.max_users_per_batch,
                       tokens_per_forward=job.tokens_per_forward)


def train_sharded(base_dir: str | Path, tok_dir: str | Path | None, users_examples: Mapping[str, Sequence], pcfg,
                  ucfg, seed: int, out_dir: str | Path, executor: str = "local", workers: int = 2,
                  ray_address: str | None = None, max_users_per_batch: int = 16, max_len: int = 384,
                  threads_per_worker: int | None = None, dtype: str = "fp32",
                  device: str = "cpu", tokens_per_forward: int = TOKENS_PER_FORWARD) -> dict[str, list[float]]:
    """Train every user's module in `workers` parallel workers; adapters land in out_dir/<safe_user_dir>/.

    Returns {uid: per-epoch mean loss}. threads_per_worker: torch threads in each worker (default:
    the CPU count split evenly among the workers, at least 1)."""
    if executor not in POOLS:
        raise ValueError(f"unknown executor {executor!r}; valid here: {', '.join(POOLS)} ('batched' trains in this "
                         "process: oppu.engine.train_users)")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if ray_address is not None and executor != "ray":
        raise ValueError(f"ray_address={ray_address!r} given but executor={executor!r}; use executor='ray'")
    if not (Path(base_dir) / "config.json").exists():
        raise FileNotFoundError(f"{base_dir} is not a Hugging Face model directory (no config.json)")
    empty = [u for u, exs in users_examples.items() if not exs]
    if empty:
        raise ValueError(f"user(s) {empty[:5]} have no training examples")
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [ShardJob(str(Path(base_dir).resolve()), str(Path(tok_dir).resolve()) if tok_dir else None,
                     {u: list(users_examples[u]) for u in shard}, pcfg, ucfg, seed, str(out),
                     max_users_per_batch, max_len, dtype, device, threads, tokens_per_forward)
            for shard in plan_shards(users_examples, max_users_per_batch)]
    if not jobs:
        return {}
    run = _run_local if executor == "local" else _run_ray
    results = run(jobs, workers, ray_address)
    return {u: results[u] for u in users_examples}


def _run_local(jobs: list[ShardJob], workers: int, ray_address: None) -> dict[str, list[float]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    results: dict[str, list[float]] = {}
    # spawn: a forked child would inherit torch's thread pools and any locks held at fork time
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        for res in pool.map(train_shard, jobs):
            results.update(res)
    return results


@contextmanager
def _private_ray_auth() -> Iterator[None]:
    """Token auth for a private local Ray without a token file: Ray 2.60 turns token auth on for a new
    local cluster and, unless a token is set, writes one to ~/.ray/auth_token. A random token in
    RAY_AUTH_TOKEN (inherited by Ray's processes) avoids the file; an explicit RAY_AUTH_MODE or token
    the caller set is respected as is."""
    mine = {}
    if not any(v in os.environ for v in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        mine = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    os.environ.update(mine)
    try:
        if mine:
            _reload_ray_auth()
        yield
    finally:
        for k in mine:
            os.environ.pop(k, None)
        if mine:
            _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Make this process's Ray re-read RAY_AUTH_* (it caches the config and the token), config first,
    as ray._private.authentication_test_utils.reset_auth_token_state does."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _run_ray(jobs: list[ShardJob], workers: int, ray_address: str | None) -> dict[str, list[float]]:
    try:
        import ray
    except ImportError as e:
        raise ImportError("executor='ray' needs Ray: pip install 'ray==2.60.0' (the version oppu is tested "
                          "with)") from e

    if ray.is_initialized():  # the caller's Ray session: use it, leave it running
        return _ray_tasks(ray, jobs, workers)
    if ray_address is not None:
        ray.init(address=ray_address, log_to_driver=False)
        try:
            return _ray_tasks(ray, jobs, workers)
        finally:
            ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="oppu-ray-")  # short: Ray's unix sockets live under it
    try:
        with _private_ray_auth():
            ray.init(address="local", num_cpus=workers, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
                     configure_logging=False)
            try:
                return _ray_tasks(ray, jobs, workers)
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ray_tasks(ray, jobs: list[ShardJob], workers: int) -> dict[str, list[float]]:
    # a CUDA shard asks Ray for a GPU of its own (Ray sets CUDA_VISIBLE_DEVICES), else every task used GPU 0
    gpus = 1 if jobs and str(jobs[0].device).startswith("cuda") else 0
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(train_shard)
    queue, pending, results = list(jobs), [], {}
    while queue or pending:
        while queue and len(pending) < workers:
            pending.append(remote.remote(queue.pop(0)))
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            results.update(ray.get(ref))
    return results
