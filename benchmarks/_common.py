"""Shared pieces of the benchmark scripts: machine details, peak matmul FLOP/s, a synthetic world,
and the PEFT baseline arm (the paper's way through PEFT alone, no engine training or decoding code).

Every benchmark prints human-readable lines first and ONE JSON object on its last stdout line
(what tests/test_benchmarks_smoke.py and docs/benchmarks.md read). Scripts import this file as
`_common` (run them as `python benchmarks/<name>.py`, which puts benchmarks/ on sys.path).

    from _common import machine_info, peak_matmul_flops, world_users, tiny_base
    users, task = world_users(tmp, n_users=64, min_history=36, max_history=44)
    model, tok = tiny_base(tmp / "base", corpus_of(users, task), preset="tiny")

The PEFT baseline (mirrors tests/peft_reference.py, which benchmarks do not import): one user at a
time, a fresh `get_peft_model` under the user's seed, a plain PyTorch loop (`peft_train_user`) or
`transformers.Trainer` (`peft_trainer_user`), PEFT's `save_pretrained`; generation through
`PeftModel` + HF `generate` (`peft_greedy`). Only the data order (oppu.engine.batching.batches) and
the example encoding are shared with the engine: they decide which examples a step sees, not how
it computes.
"""
from __future__ import annotations

import copy
import json
import math
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


def data_users(data_dir: str | Path, task_id: str, n_users: int, min_history: int, max_history: int):
    """(users, Task) from a LaMP directory: the first `n_users` (by user id) of its dev split with at
    least `min_history` history items, each cut to the `max_history` most recent (real text, e.g.
    ../shared/data/commits-numpy with --task LaMP_4)."""
    import dataclasses

    from oppu.data.users import load_lamp_dir
    from oppu.tasks import get_task

    ds = load_lamp_dir(Path(data_dir), task_id)
    pool = sorted((u for u in ds.splits["dev"] if len(u.history) >= min_history), key=lambda u: u.user_id)
    if len(pool) < n_users:
        raise SystemExit(f"{data_dir}: only {len(pool)} dev users have >= {min_history} history items; "
                         f"asked for {n_users}")
    return [dataclasses.replace(u, history=u.history[-max_history:]) for u in pool[:n_users]], get_task(task_id)


def plain_examples(task, users, style: str = "compact") -> dict[str, list]:
    """{user id: the user's history as plain-prompt training examples} (no retrieval, no profile)."""
    from oppu.examples import history_examples

    return {u.user_id: history_examples(task, u, ("plain",), 0, "bm25", None, style) for u in users}


def load_bench_base(base: str, out_dir: Path, corpus: list[str], device: str, seed: int = 0):
    """(model, tok) of --base: a tiny preset ("tiny", "tiny:micro") built fresh from `corpus`, or a
    checkpoint ("smollm2", a .gguf file, a local HF dir) loaded like `oppu run --base` does."""
    from oppu.config import RunConfig
    from oppu.model.base import load_base, resolve_base_path

    cfg = RunConfig(base=base)
    if cfg.is_tiny:
        return tiny_base(out_dir, corpus, cfg.tiny_preset, device, seed)
    path = resolve_base_path(base, cfg.cache_root())
    model, tok = load_base(path, device=device)
    model.name_or_path = str(path)
    return model, tok


def query_prompts(task, users, style: str = "compact") -> dict[str, str]:
    """{user id: the plain prompt of the user's first query}."""
    from oppu.examples import query_prompt

    return {u.user_id: query_prompt(task, u, u.queries[0], "plain", 0, "bm25", None, style) for u in users}


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


# -- the PEFT baseline arm ---------------------------------------------------------------------------
def peft_attach(base, pcfg, seed: int, user_id: str):
    """A fresh PeftModel for one user, initialised under the user's seed (as the engine's start state)."""
    from peft import get_peft_model

    from oppu.engine import user_seed

    torch.manual_seed(user_seed(seed, user_id))
    return get_peft_model(base, copy.deepcopy(pcfg))


def peft_detach(pm):
    """The plain base back out of a PeftModel (PEFT's layers removed)."""
    base = pm.get_base_model() if pm.peft_config[pm.active_adapter].is_prompt_learning else pm.unload()
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()
    return base


def peft_lr(step: int, total: int, lr: float, ratio: float) -> float:
    """Linear warm-up over int(total * ratio) steps, then cosine to 10% of lr; constant when ratio is 0."""
    warmup = max(1, int(total * ratio)) if ratio > 0 else 0
    if not warmup:
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _device_of(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def peft_resume(base, pcfg, seed: int, user_id: str, start_dir: Path):
    """A trainable PeftModel continuing the adapter saved in start_dir. PEFT 0.21 refuses
    is_trainable for prompt learning, so there: a fresh module with the saved tensors put in by
    PEFT's own set_peft_model_state_dict."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    start_dir = Path(start_dir)
    if json.loads((start_dir / "adapter_config.json").read_text())["peft_type"] != "PROMPT_TUNING":
        return PeftModel.from_pretrained(base, str(start_dir), is_trainable=True)
    pm = peft_attach(base, pcfg, seed, user_id)
    set_peft_model_state_dict(pm, load_file(str(start_dir / "adapter_model.safetensors")))
    return pm


def peft_train_user(base, tok, examples, pcfg, ucfg, seed: int, user_id: str, save_dir: Path | None,
                    max_len: int, start_dir: Path | None = None, order_seed: int | None = None) -> list[float]:
    """One user the plain way: torch.optim.AdamW, HF's own loss, per-user clipping; returns the
    per-epoch token-weighted mean losses; with save_dir, PEFT's save_pretrained there. start_dir
    continues a saved adapter; order_seed replaces the data order's user seed."""
    from oppu.engine import user_seed
    from oppu.engine.batching import batches, collate, encode

    pm = peft_attach(base, pcfg, seed, user_id) if start_dir is None else peft_resume(base, pcfg, seed, user_id,
                                                                                     start_dir)
    try:
        dev = _device_of(pm)
        data = encode(tok, examples, max_len)
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=ucfg.lr, weight_decay=ucfg.weight_decay)
        plan = batches(len(data), ucfg.batch_size, ucfg.epochs,
                       user_seed(seed, user_id) if order_seed is None else order_seed)
        total = sum(len(e) for e in plan)
        pm.train()
        step, out = 0, []
        for epoch in plan:
            tot, ntok = 0.0, 0
            for idx in epoch:
                b = {k: v.to(dev) for k, v in collate([data[i] for i in idx], tok.pad_token_id).items()}
                for g in opt.param_groups:
                    g["lr"] = peft_lr(step, total, ucfg.lr, ucfg.warmup_ratio)
                loss = pm(**b).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, ucfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                n = int((b["labels"][:, 1:] != -100).sum())
                tot += loss.item() * n
                ntok += n
                step += 1
            out.append(tot / max(1, ntok))
        pm.eval()
        if save_dir is not None:
            pm.save_pretrained(str(save_dir))
    finally:
        peft_detach(pm)
    return out


def peft_trainer_user(base, tok, examples, pcfg, ucfg, seed: int, user_id: str, save_dir: Path | None,
                      max_len: int, device: str, scratch: Path) -> list[float]:
    """The same user through `transformers.Trainer` (the paper's code path): the same seeded start,
    data order (a sampler replaying oppu.engine.batching.batches), AdamW, clipping and loss. Trainer's
    schedule here is constant lr, so this matches peft_train_user only for ucfg.warmup_ratio == 0."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from oppu.engine import user_seed
    from oppu.engine.batching import batches, collate, encode

    if ucfg.warmup_ratio:
        raise ValueError("the transformers.Trainer baseline runs a constant lr; use warmup_ratio=0")

    class PlanSampler(torch.utils.data.Sampler):
        """Yields the batches' order of the epoch Trainer sets (the engine's order)."""

        def __init__(self, plan):
            self.perms = [[i for b in epoch for i in b] for epoch in plan]
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            return iter(self.perms[self.epoch % len(self.perms)])

        def __len__(self):
            return len(self.perms[0])

    class RecordingTrainer(Trainer):
        """transformers.Trainer that also records the token-weighted loss of each epoch."""

        def __init__(self, *a, plan, **kw):
            super().__init__(*a, **kw)
            self.sampler = PlanSampler(plan)
            self.sums: dict[int, list[float]] = {}

        def _get_train_sampler(self, train_dataset=None):
            return self.sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            n = int((inputs["labels"][:, 1:] != -100).sum())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            s = self.sums.setdefault(self.sampler.epoch, [0.0, 0])
            s[0] += float((loss[0] if return_outputs else loss).detach()) * n
            s[1] += n
            return loss

    pm = peft_attach(base, pcfg, seed, user_id)
    try:
        data = encode(tok, examples, max_len)
        args = TrainingArguments(
            output_dir=str(scratch), num_train_epochs=ucfg.epochs, per_device_train_batch_size=ucfg.batch_size,
            learning_rate=ucfg.lr, weight_decay=ucfg.weight_decay, optim="adamw_torch",
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=ucfg.max_grad_norm, eval_strategy="no",
            save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
            use_cpu=not device.startswith("cuda"), dataloader_num_workers=0,
            dataloader_pin_memory=False, remove_unused_columns=False, seed=seed)
        tr = RecordingTrainer(model=pm, args=args, train_dataset=data,
                              data_collator=lambda b: collate(b, tok.pad_token_id),
                              plan=batches(len(data), ucfg.batch_size, ucfg.epochs, user_seed(seed, user_id)))
        tr.remove_callback(PrinterCallback)  # its end-of-training dict would clutter stdout
        tr.train()
        if save_dir is not None:
            pm.save_pretrained(str(save_dir))
        return [s / max(1, n) for _, (s, n) in sorted(tr.sums.items())]
    finally:
        peft_detach(pm)
        base.eval()


@torch.no_grad()
def peft_greedy(model, tok, prompts: Sequence[str], max_new_tokens: int, use_cache: bool = True,
                max_prompt_tokens: int = 384) -> list[str]:
    """Greedy text for each prompt, one at a time, with HF `generate` on `model` (a PeftModel with its
    adapter set, or a plain base). PEFT 0.21 + transformers 5 re-prepend prompt tuning's virtual
    tokens at every cached step, so prompt tuning needs use_cache=False."""
    from oppu.engine import tokenize_prompts

    model.eval()
    dev = _device_of(model)
    out = []
    for seq in tokenize_prompts(tok, prompts, max_prompt_tokens):
        ids = torch.tensor([seq], device=dev)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, num_beams=1, use_cache=use_cache)
        toks = gen[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in toks:
            toks = toks[:toks.index(tok.eos_token_id)]
        out.append(tok.decode(toks, skip_special_tokens=True))
    return out

