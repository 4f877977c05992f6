"""The paper's analyses as runnable experiments: `oppu experiment NAME --task T --data DIR|--synth
--out OUT`. Each writes OUT/results.json, OUT/report.md and PNG plots; see oppu/experiments/common.py.

    from oppu.experiments import ExpOptions, run_experiment
    results = run_experiment(ExpOptions("k", task="LaMP_2M", synth=True, out="runs/k"))
"""
from __future__ import annotations

from typing import Any, Callable

from oppu.experiments.common import ExpOptions, Lab

NAMES = ("methods", "peft-types", "activity", "shift", "history-format", "cold-start", "k", "instant")


def _module(name: str):
    import importlib
    mod = {"methods": "methods", "peft-types": "peft_types", "activity": "activity", "shift": "shift",
           "history-format": "history_format", "cold-start": "cold_start", "k": "k_sweep", "instant": "instant"}[name]
    return importlib.import_module(f"oppu.experiments.{mod}")


def run_experiment(opts: ExpOptions, progress=None, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    if opts.name not in NAMES:
        raise ValueError(f"unknown experiment {opts.name!r}; valid: {', '.join(NAMES)}")
    if opts.all_tasks and opts.name != "methods":
        raise ValueError(f"--all-tasks is for the methods experiment, not {opts.name!r}")
    return _module(opts.name).run(Lab(opts, progress, log))


__all__ = ["ExpOptions", "NAMES", "run_experiment"]
