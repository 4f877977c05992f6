"""`peft-types`: the user's module as LoRA, prompt tuning or IA3, on the same base and users:
trainable parameters per user, bytes on disk, training time per user, and score of `oppu`.

The paper reports OPPU works with each of the three PEFT types."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from oppu.config import PEFT_TYPES
from oppu.experiments.common import Lab, clear_gain, fmt, improvement, primary_metric
from oppu.experiments.plots import bars
from oppu.report import axis_label

METHODS = ("non_personalized", "oppu")


def adapter_size(d: Path) -> tuple[int, int]:
    """(trainable parameters, bytes on disk) of one saved user module."""
    from safetensors import safe_open

    f = d / "adapter_model.safetensors"
    with safe_open(str(f), "pt") as st:
        n = sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n, f.stat().st_size


def run(lab: Lab) -> dict:
    s = lab.session(lab.opts.task, lab.data_dir(lab.opts.task))
    task = s.task.id
    lab.register_world(task, "default", s.test)
    lab.run_methods(s, "default", s.test, ["non_personalized"], {"peft": "none"})
    sizes: dict[str, dict] = {}
    for peft in PEFT_TYPES:
        cond = {"peft": peft}
        for seed in lab.seeds:
            d = lab.work_dir(task, peft, seed)
            info = s.train(s.test, d, ["oppu"], peft=peft, seed=seed, label=f"{peft} train s{seed}")
            if peft not in sizes:
                per = [adapter_size(d / v["dir"]) for v in info.values()]
                sizes[peft] = {"params_per_user": per[0][0], "bytes_per_user": statistics.fmean(b for _, b in per),
                               "train_s_per_user": []}
            sizes[peft]["train_s_per_user"].append(statistics.fmean(v["seconds"] for v in info.values()))
            preds = s.parse(s.generate(s.test, ["oppu"], d, label=f"{peft} infer s{seed}"))
            lab.record(s, "default", cond, "oppu", seed, preds["oppu"], s.test)
            lab.done_with(d)
    agg = lab.aggregate()
    base = lab.cell(agg, "non_personalized", peft="none")
    metric = primary_metric(task, base["mean"])
    summary, table = {}, ["| PEFT | trainable params / user | bytes on disk / user | train s / user | "
                          f"oppu {metric} | vs non_personalized |", "|---|---|---|---|---|---|"]
    for peft in PEFT_TYPES:
        c = lab.cell(agg, "oppu", peft=peft)
        z = sizes[peft]
        secs = statistics.fmean(z["train_s_per_user"])
        gain = improvement(metric, c["mean"][metric], base["mean"][metric])
        summary[peft] = {"params_per_user": z["params_per_user"], "bytes_per_user": round(z["bytes_per_user"]),
                         "train_s_per_user": round(secs, 3), "score": c["mean"][metric], "std": c["std"][metric],
                         "gain": round(gain, 4)}
        table.append(f"| {peft} | {z['params_per_user']:,} | {round(z['bytes_per_user']):,} | {secs:.2f} | "
                     f"{fmt(c, metric)} | {gain:+.3f} |")
    table.append(f"| (non_personalized) | 0 | 0 | - | {fmt(base, metric)} | |")
    best = max(PEFT_TYPES, key=lambda p: summary[p]["gain"])
    findings = [f"{p}: {summary[p]['params_per_user']:,} parameters, {summary[p]['bytes_per_user']:,} bytes, "
                f"{summary[p]['train_s_per_user']:.2f} s per user; {metric} gain {summary[p]['gain']:+.3f}"
                for p in PEFT_TYPES] + [f"best type here: {best}"]
    helped = [p for p in PEFT_TYPES if clear_gain(summary[p]["gain"], summary[p]["std"])]
    claims = [("OPPU works with each PEFT type (each beats non_personalized by more than its sd over seeds)",
               len(helped) == len(PEFT_TYPES), f"clear gain for {', '.join(helped) or 'none'}; gains "
               + ", ".join(f"{p} {summary[p]['gain']:+.3f} (sd {summary[p]['std']:.3f})" for p in PEFT_TYPES))]
    series = {"oppu": ([summary[p]["score"] for p in PEFT_TYPES], [summary[p]["std"] for p in PEFT_TYPES])}
    png = bars(lab.out / "peft_types.png", list(PEFT_TYPES), series, "PEFT type",
               axis_label(metric),
               f"{task}: oppu by PEFT type, mean ± sd over seeds",
               reference={"non_personalized": base["mean"][metric]})
    lab.facts["peft_types"] = sizes
    return lab.finish(summary, findings, claims, ["\n".join(table)], [png])
