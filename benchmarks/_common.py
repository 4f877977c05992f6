"""Shared pieces of the benchmark scripts: machine details, peak matmul FLOP/s, a synthetic world.

Every benchmark prints human-readable lines first and ONE JSON object on its last stdout line
(what tests/test_benchmarks_smoke.py and docs/benchmarks.md read). Scripts import this file as
`_common` (run them as `python benchmarks/<name>.py`, which puts benchmarks/ on sys.path).

    from _common import machine_info, peak_matmul_flops, world_users, tiny_base
    users, task = world_users(tmp, n_users=64, min_history=36, max_history=44)
    model, tok = tiny_base(tmp / "base", corpus_of(users, task), preset="tiny")
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """What the figures were measured on; loadavg shows how shared the cores were."""
    import peft
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    info = {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "device": device,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_matmul_flops(device: str, n: int = 2048, reps: int = 5, dtype=torch.float32) -> float:
    """Best observed FLOP/s of an [n, n] @ [n, n] matmul (2 n^3 FLOPs) with the current threads.

    The best of `reps` runs, after a warm-up, so a busy moment on shared cores lowers it less."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: every nn.Linear, lm_head included (a tied
    head counts once, as the head; the input embedding is a lookup, no FLOPs)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) without numpy."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def world_users(tmp: Path, n_users: int, min_history: int, max_history: int, seed: int = 0,
                task_id: str = "LaMP_2M", other_users: int = 0, queries_per_user: int = 1):
    """(test users, Task) of a fresh synthetic world; with other_users > 0, (test, others, Task)."""
    from oppu.data.synth import synth_world
    from oppu.data.users import load_lamp_dir
    from oppu.tasks import get_task

    d = tmp / "world"
    synth_world(task_id, d, seed=seed, test_users=n_users, other_users=other_users,
                queries_per_user=queries_per_user, min_history=min_history, max_history=max_history)
    ds = load_lamp_dir(d, task_id)
    if other_users:
        return ds.splits["dev"], ds.splits["train"], get_task(task_id)
    return ds.splits["dev"], get_task(task_id)


def plain_examples(task, users) -> dict[str, list]:
    """{user id: the user's history as plain-prompt training examples} (no retrieval, no profile)."""
    from oppu.examples import history_examples

    return {u.user_id: history_examples(task, u, ("plain",), 0, "bm25", None) for u in users}


def query_prompts(task, users) -> dict[str, str]:
    """{user id: the plain prompt of the user's first query}."""
    from oppu.examples import query_prompt

    return {u.user_id: query_prompt(task, u, u.queries[0], "plain", 0, "bm25", None) for u in users}


def corpus_of(examples: dict[str, list], prompts: dict[str, str] | None = None) -> list[str]:
    out = [f"{e.prompt} {e.target}" for exs in examples.values() for e in exs]
    return out + list((prompts or {}).values())


def tiny_base(out_dir: Path, corpus: list[str], preset: str, device: str, seed: int = 0):
    """A freshly initialised tiny Llama + local BPE tokenizer, saved and loaded back by load_base."""
    from oppu.model.base import build_tiny_base, load_base

    build_tiny_base(corpus, out_dir, preset=preset, seed=seed)
    model, tok = load_base(out_dir, device=device)
    model.name_or_path = str(out_dir)
    return model, tok


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def timed_cpu(fn: Callable[[], Any], device: str) -> tuple[Any, float, float]:
    """(result, wall seconds, this process's CPU seconds). With one torch thread on shared cores the
    CPU time is the steadier measure of the work: it does not grow when other jobs take the core."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0, time.process_time() - c0


def resolve(device: str) -> str:
    from oppu.model.base import resolve_device
    return resolve_device(device)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def emit(result: dict[str, Any]) -> None:
    """The one JSON object, on the last stdout line."""
    print(json.dumps(result, sort_keys=False), flush=True)
