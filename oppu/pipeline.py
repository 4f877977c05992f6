"""The OPPU pipeline end to end: data -> task-adapted base -> one PEFT per user -> six methods.

    from oppu.config import RunConfig
    from oppu.pipeline import run
    result = run(RunConfig(task="LaMP_2M", data="path/to/LaMP_2M", out="runs/2m", test_users=100))

Writes under cfg.out:
  predictions/<method>.json   official outputs shape, one entry per test question
  metrics.json                {method: {metric: value}}, by oppu.metrics.score
  run.json                    config, timings, base/adapter/profile facts, losses
  adapters/<user>/            that user's PEFT module (adapter_config.json + adapter_model.safetensors)
  instant_adapters/<user>/    that user's instant module (methods instant*), mixed from the bank (oppu.instant)
  report.md, methods.png      the table and the plot
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from oppu.config import ADAPTER_METHODS, INSTANT_METHODS, RunConfig
from oppu.data.lamp import write_json_atomic, write_outputs


@dataclass
class RunResult:
    out: Path
    metrics: dict[str, dict[str, float]]
    predictions: dict[str, dict[str, str]]
    info: dict[str, Any] = field(default_factory=dict)


def run(cfg: RunConfig, progress=None, log: Callable[[str], None] = lambda s: None) -> RunResult:
    from oppu.session import Session

    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    s = Session.open(cfg, progress, log)
    task, test = s.task, s.test
    timings: dict[str, float] = {"base_s": s.base_info.get("seconds", 0.0)}

    # One PEFT per user.
    adapter_methods = [m for m in cfg.methods if m in ADAPTER_METHODS]
    user_info: dict[str, Any] = {}
    adapters_dir = out / "adapters"
    if adapter_methods:
        t0 = time.time()
        user_info = s.train(test, adapters_dir, adapter_methods)
        timings["per_user_train_s"] = round(time.time() - t0, 1)
        log(f"adapters: trained {len(test)} {cfg.peft} modules in {timings['per_user_train_s']}s")
    seconds_per_user = {"oppu": next(iter(user_info.values()))["seconds"]} if user_info else {}

    # Instant modules: mixed from a bank trained once per base on other users (its time kept apart).
    instant_methods = [m for m in cfg.methods if m in INSTANT_METHODS]
    instant_info: dict[str, Any] = {}
    if instant_methods:
        from oppu.instant import instant_stage
        t0 = time.time()
        instant_info = instant_stage(s, test, out / "instant_adapters", instant_methods)
        timings["instant_bank_s"] = instant_info["bank"]["open_s"]
        timings["instant_s"] = round(time.time() - t0, 2)
        seconds_per_user["instant"] = instant_info["seconds_per_user"]
        log(f"instant: {len(test)} modules in {seconds_per_user['instant']}s per user (bank: "
            f"{'cached' if instant_info['bank']['cached'] else 'trained'}, {timings['instant_bank_s']}s)")

    # Inference: shared-base methods in one batch set, user-module methods in mixed-adapter batches.
    t0 = time.time()
    raw = s.generate(test, cfg.methods, adapters_dir if adapter_methods else None,
                     instant_dir=out / "instant_adapters" if instant_methods else None)
    timings["inference_s"] = round(time.time() - t0, 1)

    # Parse, write, score.
    order = [q.id for u in test for q in u.queries]
    parsed = s.parse(raw)
    preds, metrics = {}, {}
    for m in cfg.methods:
        preds[m] = {qid: parsed[m][qid] for qid in order}
        write_outputs(out / "predictions" / f"{m}.json", task.id, preds[m])
        metrics[m] = s.score(preds[m])
    write_json_atomic(out / "metrics.json", metrics)
    spread = s.spread(preds, seed=cfg.seed) if len(test) > 1 else {}
    write_json_atomic(out / "raw_outputs.json", raw)
    timings["total_s"] = round(time.time() - t_start, 1)
    info = {"config": cfg.to_dict(), "task": task.id, "data": s.data_root, "test_users": len(test),
            "questions": len(order), "other_users": len(s.others), "profile_kind": s.profile_kind,
            "base": s.base_info, "users": user_info, "timings": timings, "skipped_records": s.skipped,
            "spread": spread, "seconds_per_user": seconds_per_user, "instant": instant_info}
    write_json_atomic(out / "run.json", info)
    from oppu.report import write_report
    write_report(out, task.id, metrics, info)
    return RunResult(out, metrics, preds, info)
