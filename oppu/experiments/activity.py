"""`activity`: each method's gain over non_personalized per bucket of history length (the paper's
user activity levels), with the number of users per bucket.

Test users are spread over history lengths (data.users.select_test_users "spread"; synthetic:
a world whose test users span the whole history range), then cut into `--buckets` groups of
near-equal size by history length. The paper reports OPPU helps users at every activity level."""
from __future__ import annotations

from oppu.config import DEFAULT_METHODS as METHODS
from oppu.experiments.common import Lab, improvement, primary_metric
from oppu.experiments.plots import bars
from oppu.config import ADAPTER_METHODS


def buckets(users: list, n: int) -> list[list]:
    """Users sorted by history length, cut into n near-equal groups; users of equal length never
    straddle two buckets (so a bucket is a clean range of lengths)."""
    ranked = sorted(users, key=lambda u: (len(u.history), u.user_id))
    out: list[list] = []
    for i in range(n):
        lo, hi = round(i * len(ranked) / n), round((i + 1) * len(ranked) / n)
        chunk = ranked[lo:hi]
        if out and chunk and out[-1] and len(out[-1][-1].history) == len(chunk[0].history):
            while chunk and len(chunk[0].history) == len(out[-1][-1].history):
                out[-1].append(chunk.pop(0))
        if chunk:
            out.append(chunk)
    return out


def run(lab: Lab) -> dict:
    task = lab.opts.task
    data = lab.data_dir(task, "activity", test_history="full") if lab.opts.synth else lab.data_dir(task)
    s = lab.session(task, data, select="spread")
    tid = s.task.id
    lab.register_world(tid, "activity", s.test)
    groups = buckets(s.test, lab.opts.buckets)
    labels = [f"{len(g[0].history)}-{len(g[-1].history)} items" for g in groups]
    # train once per seed on every test user, then score each bucket's questions
    lab.run_groups(s, s.test, {"activity": (s, s.test)},
                   [("activity", {"bucket": lbl}, g, None) for g, lbl in zip(groups, labels)], METHODS, "activity")

    agg = lab.aggregate()
    metric = primary_metric(tid, lab.cell(agg, "non_personalized")["mean"])
    others = [m for m in METHODS if m != "non_personalized"]
    summary, series = {}, {m: ([], []) for m in others}
    table = [f"| bucket | users | questions | non_personalized {metric} | " + " | ".join(f"{m} gain" for m in others)
             + " |", "|---" * (len(others) + 4) + "|"]
    for g, lbl in zip(groups, labels):
        ref = lab.cell(agg, "non_personalized", bucket=lbl)
        gains = {}
        for m in others:
            c = lab.cell(agg, m, bucket=lbl)
            gains[m] = round(improvement(metric, c["mean"][metric], ref["mean"][metric]), 4)
            series[m][0].append(gains[m])
            series[m][1].append(c["std"][metric])
        summary[lbl] = {"users": len(g), "questions": ref["n_questions"],
                        "history": [len(g[0].history), len(g[-1].history)],
                        "non_personalized": ref["mean"][metric], "gain": gains}
        table.append(f"| {lbl} | {len(g)} | {ref['n_questions']} | {ref['mean'][metric]:.3f} | "
                     + " | ".join(f"{gains[m]:+.3f}" for m in others) + " |")
    findings = []
    for lbl, v in summary.items():
        best = max(others, key=lambda m: v["gain"][m])
        findings.append(f"{lbl} ({v['users']} users): best gain {best} {v['gain'][best]:+.3f}; "
                        f"oppu {v['gain']['oppu']:+.3f}, rag {v['gain']['rag']:+.3f}")
    first, last = summary[labels[0]], summary[labels[-1]]
    findings.append(f"oppu's gain goes from {first['gain']['oppu']:+.3f} (shortest histories) to "
                    f"{last['gain']['oppu']:+.3f} (longest)")
    ok = [lbl for lbl, v in summary.items()
          if max(v["gain"][m] for m in ADAPTER_METHODS) > max(0.0, *(v["gain"][m] for m in ("rag", "pag")))]
    claims = [("a method with the user's PEFT beats non_personalized, rag and pag at every activity level",
               len(ok) == len(summary), f"true in {len(ok)} of {len(summary)} bucket(s)")]
    png = bars(lab.out / "activity.png", labels, series, "history length bucket (users per bucket in the table)",
               f"gain over non_personalized ({metric}; positive = better)",
               f"{tid}: gain by user activity level", zero_line=True)
    notes = ["Error bars are the sd over seeds of the method's score in that bucket; "
             "buckets are small, so differences of a few questions move the gains."]
    return lab.finish(summary, findings, claims, ["\n".join(table)], [png], notes)
