"""`instant`: instant adapters vs OPPU vs retrieval by history size, score and seconds per user.

Every test user is cut to their n most recent items for n in --levels (default 1,2,4,8,16, plus
their whole history; cold_start.truncate). At each level: `rag` (retrieval only), `instant` (a
module mixed from the adapter bank, oppu.instant: generated in milliseconds, no training on the
user) and `oppu` (one PEFT trained per user per seed), and `non_personalized` once. The bank is
trained once per base on non-test users, its cost reported apart. Seconds per user: oppu = its
training wall time shared over the users, instant = history vector + mixing + writing the files.
The crossover is the smallest history size from which training (oppu) is at least as good as
the instant module at every larger size: below it, training does not pay off here."""
from __future__ import annotations

from oppu.experiments.cold_start import crossover, history_levels
from oppu.experiments.common import Lab, fmt, improvement, primary_metric
from oppu.experiments.plots import lines
from oppu.report import axis_label

METHODS = ("non_personalized", "rag", "instant", "oppu")
DEFAULT_LEVELS = (1, 2, 4, 8, 16)


def run(lab: Lab) -> dict:
    from oppu.instant import open_bank, write_instant

    s, levels, name, users_at = history_levels(lab, DEFAULT_LEVELS, "instant")
    tid = s.task.id
    bank = open_bank(s, ["instant"])
    lab.facts["instant_bank"] = {**bank.info, "select": bank.select, "top_k": bank.top_k,
                                 "temperature": bank.temperature}
    seconds: dict[str, dict[str, list[float]]] = {name[n]: {"instant": [], "oppu": []} for n in levels}
    base = s.parse(s.generate(s.test, ["non_personalized"], None, label="non_personalized"))
    for n in levels:
        cond = {"items": name[n]}
        lab.record(s, "default", cond, "non_personalized", None, base["non_personalized"], users_at[n])
        rag = s.parse(s.generate(users_at[n], ["rag"], None, label=f"rag n={name[n]}"))["rag"]
        lab.record(s, "default", cond, "rag", None, rag, users_at[n])
        d = lab.work_dir(tid, "instant", name[n])
        with bank.scorer(s.model, s.tok, s.cfg.max_prompt_tokens, s.cfg.tokens_per_forward) as sc:
            facts = write_instant(bank, users_at[n], d, s.cfg.max_history_items, scorer=sc)
        seconds[name[n]]["instant"].append(sum(f["seconds"] for f in facts.values()) / len(facts))
        p = s.parse(s.generate(users_at[n], ["instant"], d, label=f"instant n={name[n]}"))
        lab.record(s, "default", cond, "instant", None, p["instant"], users_at[n])
        lab.done_with(d)
        for seed in lab.seeds:
            d = lab.work_dir(tid, "oppu", name[n], seed)
            facts = s.train(users_at[n], d, ["oppu"], seed=seed, label=f"train n={name[n]} s{seed}")
            seconds[name[n]]["oppu"].append(next(iter(facts.values()))["seconds"])
            p = s.parse(s.generate(users_at[n], ["oppu"], d, label=f"infer n={name[n]} s{seed}"))
            lab.record(s, "default", cond, "oppu", seed, p["oppu"], users_at[n])
            lab.done_with(d)
    lab.facts["seconds_per_user"] = {lv: {m: round(sum(v) / len(v), 4) for m, v in per.items()}
                                     for lv, per in seconds.items()}
    return _report(lab, tid, levels, name)


def _report(lab: Lab, tid: str, levels: tuple, name: dict) -> dict:
    """Per-level table (score and seconds per user), plot, crossovers and the instant share of oppu's gain."""
    agg = lab.aggregate()
    metric = primary_metric(tid, lab.cell(agg, "rag")["mean"])
    spu = lab.facts["seconds_per_user"]
    summary, series = {}, {m: ([], []) for m in METHODS}
    table = ["| items | " + " | ".join(METHODS) + " | s/user instant | s/user oppu |", "|---" * (len(METHODS) + 3) + "|"]
    for n in levels:
        cells = {m: lab.cell(agg, m, items=name[n]) for m in METHODS}
        summary[name[n]] = {**{m: cells[m]["mean"][metric] for m in METHODS},
                            "seconds_per_user": spu[name[n]]}
        for m in METHODS:
            series[m][0].append(cells[m]["mean"][metric])
            series[m][1].append(cells[m]["std"][metric])
        table.append(f"| {name[n]} | " + " | ".join(fmt(cells[m], metric) for m in METHODS) +
                     f" | {spu[name[n]]['instant']:.4f} | {spu[name[n]]['oppu']:.3f} |")
    labels = [name[n] for n in levels]
    cross = {"oppu vs instant": crossover(summary, labels, metric, "oppu", "instant"),
             "instant vs rag": crossover(summary, labels, metric, "instant", "rag")}
    findings, claims = _findings(summary, labels, metric, cross)
    png = lines(lab.out / "instant.png", list(range(len(levels))), series, "history items the user has",
                axis_label(metric), f"{tid}: instant adapters vs OPPU", xticklabels=labels)
    return lab.finish({"levels": summary, "crossover": cross}, findings, claims, ["\n".join(table)], [png],
                      notes=["instant has no error bar: its bank is trained once per base (seed of the run), "
                             "and mixing is deterministic."])


def share_of_gain(metric: str, row: dict) -> float | None:
    """instant's gain over non_personalized as a share of oppu's (None when oppu gains nothing)."""
    g_oppu = improvement(metric, row["oppu"], row["non_personalized"])
    if g_oppu <= 0:
        return None
    return improvement(metric, row["instant"], row["non_personalized"]) / g_oppu


def _findings(summary: dict, labels: list[str], metric: str, cross: dict) -> tuple[list, list]:
    shares = {lv: share_of_gain(metric, summary[lv]) for lv in labels}
    ratios = {lv: summary[lv]["seconds_per_user"]["oppu"] / max(summary[lv]["seconds_per_user"]["instant"], 1e-9)
              for lv in labels}
    findings = ["crossover (from this history size on, training is at least as good as the other arm): "
                + ", ".join(f"{k}: {v if v is not None else 'never'}" for k, v in cross.items()),
                "instant's share of oppu's gain over non_personalized: " + ", ".join(
                    f"{lv}: {'-' if v is None else f'{v:.0%}'}" for lv, v in shares.items()),
                "seconds per user, oppu / instant: " + ", ".join(f"{lv}: {r:.0f}x" for lv, r in ratios.items())]
    full = shares[labels[-1]]
    claims = [("an instant module keeps most of OPPU's gain at a small fraction of its cost per user "
               "(Profile-to-PEFT, PER-PCS)", None if full is None else (full >= 0.6 and ratios[labels[-1]] >= 50),
               f"whole history: share {'-' if full is None else f'{full:.0%}'}, {ratios[labels[-1]]:.0f}x faster")]
    return findings, claims
