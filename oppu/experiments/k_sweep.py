"""`k`: retrieval depth. rag and oppu_rag with k = 0, 1, 2, 4, 8 retrieved history items (--levels
to change), the user's module trained with the same k as its queries. The base stays the one
task-adapted at the configured k (2 by default), like a deployed base would.

The paper's combination claim, tested at every depth: OPPU with retrieval beats retrieval alone."""
from __future__ import annotations

from oppu.experiments.common import Lab, fmt, improvement, primary_metric
from oppu.experiments.plots import lines
from oppu.report import axis_label

DEFAULT_KS = (0, 1, 2, 4, 8)


def run(lab: Lab) -> dict:
    ks = tuple(sorted(set(lab.opts.levels or DEFAULT_KS)))
    if ks[0] < 0:
        raise ValueError(f"k must be >= 0, got {ks[0]}")
    s = lab.session(lab.opts.task, lab.data_dir(lab.opts.task))
    tid = s.task.id
    lab.register_world(tid, "default", s.test)
    lab.run_methods(s, "default", s.test, ["non_personalized"], {"k": "none"})
    for k in ks:
        lab.run_methods(s, "default", s.test, ["rag", "oppu_rag"], {"k": k}, k=k, label=f"k={k}")
    agg = lab.aggregate()
    ref = lab.cell(agg, "non_personalized", k="none")
    metric = primary_metric(tid, ref["mean"])
    series = {m: ([], []) for m in ("rag", "oppu_rag")}
    summary = {}
    table = [f"| k | rag {metric} | oppu_rag {metric} | oppu_rag - rag |", "|---|---|---|---|"]
    for k in ks:
        c = {m: lab.cell(agg, m, k=k) for m in ("rag", "oppu_rag")}
        gap = improvement(metric, c["oppu_rag"]["mean"][metric], c["rag"]["mean"][metric])
        summary[str(k)] = {"rag": c["rag"]["mean"][metric], "oppu_rag": c["oppu_rag"]["mean"][metric],
                           "gap": round(gap, 4)}
        for m in series:
            series[m][0].append(c[m]["mean"][metric])
            series[m][1].append(c[m]["std"][metric])
        table.append(f"| {k} | {fmt(c['rag'], metric)} | {fmt(c['oppu_rag'], metric)} | {gap:+.3f} |")
    table.append(f"| (non_personalized) | {fmt(ref, metric)} | | |")
    best = {m: max(ks, key=lambda k: improvement(metric, summary[str(k)][m], 0.0)) for m in series}
    findings = [f"best k: rag {best['rag']}, oppu_rag {best['oppu_rag']}",
                "oppu_rag - rag per k: " + ", ".join(f"k={k} {summary[str(k)]['gap']:+.3f}" for k in ks),
                f"rag from k={ks[0]} to k={ks[-1]}: {summary[str(ks[0])]['rag']:.3f} -> "
                f"{summary[str(ks[-1])]['rag']:.3f}"]
    claims = [("OPPU with retrieval beats retrieval alone at every depth k",
               all(v["gap"] > 0 for v in summary.values()),
               f"positive at {sum(v['gap'] > 0 for v in summary.values())} of {len(ks)} depths")]
    png = lines(lab.out / "k.png", list(ks), series, "retrieved history items k",
                axis_label(metric), f"{tid}: retrieval depth",
                reference={"non_personalized": ref["mean"][metric]})
    notes = ["k=0 means no retrieved item: rag is then the non-personalized prompt, and oppu_rag is oppu "
             "(trained on its plain-prompt examples)."]
    return lab.finish(summary, findings, claims, ["\n".join(table)], [png], notes)
