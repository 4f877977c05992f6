"""`shift`: behaviour shift. Queries whose answer the user's history makes unlikely, RAG against
OPPU as the shift grows.

- Synthetic (--synth): worlds at shift 0, 1/3, 2/3 and 1 (the fraction of each test user's
  queries drawn from the part of their taste their history does not show). The worlds share
  their users and histories, so one base (the shift-0 world's) and one set of user modules
  serve every level.
- Real data (--data): a directory with a synthetic world.json groups its questions by
  `shifted_query_ids`; any other data is cut into `--buckets` groups by how new the query's
  words are to the user's visible history (share of the query's distinct words that appear in
  no visible history item), from least to most novel.

The paper: retrieval suffers when the history does not mirror the query, OPPU less so."""
from __future__ import annotations

import json
import re
from pathlib import Path

from oppu.experiments.common import Lab, fmt, improvement, primary_metric
from oppu.experiments.plots import lines
from oppu.fingerprint import data_fingerprint
from oppu.report import axis_label
from oppu.session import load_users

METHODS = ("non_personalized", "rag", "oppu", "oppu_rag")
SYNTH_LEVELS = (0.0, 1 / 3, 2 / 3, 1.0)
_WORD = re.compile(r"[a-z0-9]+")


def novelty(task, user, q) -> float:
    """Share of the query's distinct words found in none of its visible history items."""
    words = set(_WORD.findall(task.query_doc(q.input).lower()))
    if not words:
        return 0.0
    seen: set[str] = set()
    for it in user.visible_items(q):
        seen.update(_WORD.findall(task.item_doc(it).lower()))
    return len(words - seen) / len(words)


def _same_histories(a: list, b: list) -> bool:
    return [(u.user_id, u.history) for u in a] == [(u.user_id, u.history) for u in b]


def run(lab: Lab) -> dict:
    if lab.opts.synth:
        s0, groups, xlabel, mode = _synth_groups(lab)
    else:
        s0, groups, xlabel, mode = _data_groups(lab)
    # one set of user modules per seed (trained on the shared histories), every group scored with it
    worlds: dict[str, tuple] = {}
    for _, _, world, s, users, _ in groups:
        worlds.setdefault(world, (s, users))
    lab.run_groups(s0, s0.test, worlds, [(world, {"level": lbl}, users, qids)
                                         for lbl, _, world, _, users, qids in groups], METHODS, "shift")
    return _report(lab, s0.task.id, groups, xlabel, mode)


def _synth_groups(lab: Lab):
    """(session, groups, xlabel, mode) over the synthetic worlds, one per SYNTH_LEVELS knob; each
    group is (level label, x, world, session, users, qids). Refuses worlds whose histories differ."""
    task = lab.opts.task
    worlds = [(f"shift-{lv:.2f}", lv, lab.data_dir(task, f"shift-{lv:.2f}", shift=lv)) for lv in SYNTH_LEVELS]
    s0 = lab.session(task, worlds[0][2])
    groups = []
    for name, lv, d in worlds:
        _, test, others = load_users(lab.config(task, d))
        if not _same_histories(test, s0.test) or data_fingerprint(others) != data_fingerprint(s0.others):
            raise RuntimeError(f"world {name} does not share its users' histories with {worlds[0][0]}")
        lab.register_world(s0.task.id, name, test)
        groups.append((f"{lv:.2f}", lv, name, s0, test, None))
    xlabel = "shift knob (fraction of each user's queries outside the taste their history shows)"
    return s0, groups, xlabel, "synthetic shift knob"


def _data_groups(lab: Lab):
    """(session, groups, xlabel, mode) over one data directory: its world.json's shifted ids when
    they name test queries, else --buckets query-novelty buckets, least novel first."""
    task = lab.opts.task
    data = lab.data_dir(task)
    s0 = lab.session(task, data)
    lab.register_world(s0.task.id, "default", s0.test)
    card = Path(data) / "world.json"
    shifted = set(json.loads(card.read_text()).get("shifted_query_ids", [])) if card.exists() else set()
    qs = [(u, q) for u in s0.test for q in u.queries]
    if shifted & {q.id for _, q in qs}:
        parts = [("unshifted", [q.id for _, q in qs if q.id not in shifted]),
                 ("shifted", [q.id for _, q in qs if q.id in shifted])]
        parts = [p for p in parts if p[1]]
        xlabel, mode = "query group (world.json shifted_query_ids)", "world.json shifted_query_ids"
    else:
        ranked = sorted(qs, key=lambda uq: (novelty(s0.task, *uq), uq[1].id))
        n = min(lab.opts.buckets, len(ranked))
        parts = []
        for i in range(n):
            chunk = ranked[round(i * len(ranked) / n):round((i + 1) * len(ranked) / n)]
            lo, hi = novelty(s0.task, *chunk[0]), novelty(s0.task, *chunk[-1])
            parts.append((f"novelty {lo:.2f}-{hi:.2f}", [q.id for _, q in chunk]))
        xlabel, mode = "query novelty bucket (share of query words absent from the history)", "query novelty"
    groups = [(lbl, i, "default", s0, s0.test, ids) for i, (lbl, ids) in enumerate(parts)]
    return s0, groups, xlabel, mode


def _report(lab: Lab, tid: str, groups: list, xlabel: str, mode: str) -> dict:
    """Aggregate over seeds: the per-level table and plot, each method's drop, oppu_rag vs rag."""
    agg = lab.aggregate()
    metric = primary_metric(tid, lab.cell(agg, "non_personalized")["mean"])
    summary, series = {}, {m: ([], []) for m in METHODS}
    table = ["| level | questions | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 2) + "|"]
    for lbl, *_ in groups:
        cells = {m: lab.cell(agg, m, level=lbl) for m in METHODS}
        summary[lbl] = {"questions": cells["rag"]["n_questions"], **{m: cells[m]["mean"][metric] for m in METHODS}}
        for m in METHODS:
            series[m][0].append(cells[m]["mean"][metric])
            series[m][1].append(cells[m]["std"][metric])
        table.append(f"| {lbl} | {cells['rag']['n_questions']} | " + " | ".join(fmt(cells[m], metric) for m in METHODS)
                     + " |")
    lo, hi = groups[0][0], groups[-1][0]
    drop = {m: round(improvement(metric, summary[lo][m], summary[hi][m]), 4) for m in METHODS}  # >0: got worse
    findings = [f"grouping: {mode}; {len(groups)} levels, metric {metric}",
                *(f"{m}: {summary[lo][m]:.3f} at the lowest shift -> {summary[hi][m]:.3f} at the highest "
                  f"(loses {drop[m]:+.3f})" for m in METHODS)]
    rag_gap = {lbl: round(improvement(metric, summary[lbl]["oppu_rag"], summary[lbl]["rag"]), 4) for lbl in summary}
    findings.append("oppu_rag over rag per level: " + ", ".join(f"{k} {v:+.3f}" for k, v in rag_gap.items()))
    claims = [("retrieval loses more than OPPU as the shift grows (rag drops more than oppu and oppu_rag)",
               drop["rag"] > max(drop["oppu"], drop["oppu_rag"]),
               f"drop rag {drop['rag']:+.3f}, oppu {drop['oppu']:+.3f}, oppu_rag {drop['oppu_rag']:+.3f}"),
              ("OPPU with retrieval stays ahead of retrieval alone at every level",
               all(v > 0 for v in rag_gap.values()), f"gaps {list(rag_gap.values())}")]
    xs = [g[1] for g in groups]
    png = lines(lab.out / "shift.png", xs, series, xlabel,
                axis_label(metric), f"{tid}: behaviour shift",
                xticklabels=[g[0] for g in groups])
    notes = ["Synthetic shifted queries come from a part of the user's taste their history never shows, so "
             "no method can know their answers: both RAG and OPPU are expected to fall toward the "
             "population level there; the question is which falls less."] if lab.opts.synth else []
    return lab.finish({"mode": mode, "levels": summary, "drop": drop}, findings, claims, ["\n".join(table)], [png],
                      notes)
