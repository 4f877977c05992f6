"""`methods`: the six methods on one task, or the seven-task table (--all-tasks).

The paper's main result: OPPU, alone and with retrieval (RAG) or a profile (PAG), beats the
non-personalized base and the prompt-only baselines on LaMP's seven tasks."""
from __future__ import annotations

from oppu.config import DEFAULT_METHODS as METHODS
from oppu.data.lamp import TASK_IDS
from oppu.experiments.common import Lab, clear_gain, fmt, improvement, primary_metric
from oppu.experiments.plots import bars

PAIRS = (("oppu", "non_personalized"), ("oppu_rag", "rag"), ("oppu_pag", "pag"))


def run(lab: Lab) -> dict:
    tasks = list(TASK_IDS) if lab.opts.all_tasks else [lab.opts.task]
    for task in tasks:
        s = lab.session(task, lab.data_dir(task))
        lab.register_world(s.task.id, "default", s.test)
        lab.run_methods(s, "default", s.test, METHODS, {"task": s.task.id}, label=s.task.id)
    agg = lab.aggregate()
    findings, claims, table = [], [], ["| task | metric | " + " | ".join(METHODS) + " |",
                                       "|---" * (len(METHODS) + 2) + "|"]
    series = {m: ([], []) for m in METHODS}
    summary = {}
    wins = 0
    for task in [a["task"] for a in agg if a["method"] == METHODS[0]]:
        cells = {m: lab.cell(agg, m, task=task) for m in METHODS}
        metric = primary_metric(task, cells[METHODS[0]]["mean"])
        table.append(f"| {task} | {metric} | " + " | ".join(fmt(cells[m], metric) for m in METHODS) + " |")
        for m in METHODS:
            series[m][0].append(cells[m]["mean"][metric])
            series[m][1].append(cells[m]["std"][metric])
        gains = {f"{a} vs {b}": round(improvement(metric, cells[a]["mean"][metric], cells[b]["mean"][metric]), 4)
                 for a, b in PAIRS}
        best = max(METHODS, key=lambda m: improvement(metric, cells[m]["mean"][metric], 0.0))
        summary[task] = {"metric": metric, "best": best, "gains": gains,
                         "mean": {m: cells[m]["mean"][metric] for m in METHODS}}
        findings.append(f"{task} ({metric}): best {best} ({cells[best]['mean'][metric]:.3f}); "
                        + ", ".join(f"{k} {v:+.3f}" for k, v in gains.items()))
        wins += all(clear_gain(gains[f"{a} vs {b}"], cells[a]["std"][metric]) for a, b in PAIRS)
    claims.append(("OPPU improves on the method it extends: oppu > non_personalized, oppu_rag > rag, "
                   "oppu_pag > pag on every task run, each by more than its sd over seeds",
                   wins == len(summary), f"all three gains clear on {wins} of {len(summary)} task(s)"))
    best_oppu = sum(1 for v in summary.values() if v["best"].startswith("oppu"))
    claims.append(("a method with the user's PEFT is the best of the six",
                   best_oppu == len(summary), f"on {best_oppu} of {len(summary)} task(s)"))
    png = bars(lab.out / "methods.png", list(summary), series, "task",
               "score (primary metric; MAE: lower is better)", "Six methods, mean ± sd over seeds")
    return lab.finish(summary, findings, claims, ["\n".join(table)], [png])
