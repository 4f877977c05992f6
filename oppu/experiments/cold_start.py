"""`cold-start`: users with very little history (1-5 items), and where OPPU starts to pay off.

Every test user is cut to their n most recent items for n in --levels (default 1,2,3,4,5,8,16,
plus their whole history): the PEFT trains on those n items and retrieval sees only those n
(of the ones each query may see). Methods: rag (retrieval only), instant_rag (a module mixed from
the adapter bank, oppu.instant: no training on the user), oppu, oppu_rag, and `auto`: per user,
retrieval only below a first history-size threshold, the instant module from there, OPPU
(oppu_rag) from a second threshold on (a retrieval-first policy for cold-start users is what
Salemi & Zamani 2024, arXiv 2409.09510, recommend). The thresholds are cross-fitted: users are
split into two folds, the pair that scores best on one fold's users (over all levels) is applied
to the other fold's users, so no user's `auto` answer comes from thresholds chosen on that user."""
from __future__ import annotations

from oppu.data.users import Query, User
from oppu.experiments.common import Lab, fmt, improvement, primary_metric
from oppu.experiments.plots import lines
from oppu.report import axis_label

METHODS = ("non_personalized", "rag", "instant_rag", "oppu", "oppu_rag")
ARMS = ("rag", "instant_rag", "oppu_rag")   # auto's choices, in order of history size
DEFAULT_LEVELS = (1, 2, 3, 4, 5, 8, 16)
ALL = 10 ** 9  # "their whole history"


def truncate(user: User, n: int) -> User:
    """The user as if they had only their n most recent items (per query: its n most recent)."""
    return User(user.user_id, user.history[-n:],
                [Query(q.id, q.input, q.gold, q.visible[-n:]) for q in user.queries],
                user.items_by_id, user.split)


def history_levels(lab: Lab, default: tuple[int, ...], kind: str):
    """The set-up of an experiment by history size: (session, levels + ALL, {level: its name},
    {level: the test users cut to it}); the test users registered as the "default" world."""
    levels = tuple(sorted(set(lab.opts.levels or default))) + (ALL,)
    if levels[0] < 1:
        raise ValueError(f"{kind} levels must be >= 1 item, got {levels[0]}")
    s = lab.session(lab.opts.task, lab.data_dir(lab.opts.task))
    lab.register_world(s.task.id, "default", s.test)
    name = {n: ("all" if n == ALL else str(n)) for n in levels}
    return s, levels, name, {n: [truncate(u, n) for u in s.test] for n in levels}


def auto_choice(history_len: int, thresholds: tuple[float, float]) -> str:
    """The `auto` policy: retrieval only below thresholds[0], the instant module (instant_rag) from
    there, OPPU with retrieval (oppu_rag) from thresholds[1] on."""
    lo, hi = thresholds
    return "rag" if history_len < lo else "instant_rag" if history_len < hi else "oppu_rag"


def auto_predictions(users: list[User], n: int, thresholds: tuple, pick: dict) -> dict[str, str]:
    """`auto` at level n: each user's answers from the arm their (truncated) history size picks."""
    out = {}
    for u in users:
        arm = auto_choice(len(truncate(u, n).history), thresholds)
        out.update({q.id: pick[arm][n][q.id] for q in u.queries})
    return out


def fit_thresholds(s, users: list[User], levels: tuple, pick: dict, metric: str) -> tuple[int, int]:
    """The `auto` thresholds (lo <= hi) that score best on `users`, averaged over all levels.
    Candidates: every level below ALL, and ALL + 1 (never); ties go to the smallest pair."""
    cands = [n for n in levels if n != ALL] + [ALL + 1]

    def value(t):
        return sum(improvement(metric, s.score(auto_predictions(users, n, t, pick),
                                               [truncate(u, n) for u in users])[metric], 0.0)
                   for n in levels) / len(levels)
    pairs = [(lo, hi) for lo in cands for hi in cands if lo <= hi]
    return max(pairs, key=lambda t: (value(t), -t[0], -t[1]))


def crossover(summary: dict, labels: list[str], metric: str, a: str, b: str) -> str | None:
    """Smallest level (of `labels`, in level order) from which `a` is at least as good as `b` at
    every larger level."""
    good = [improvement(metric, summary[c][a], summary[c][b]) >= 0 for c in labels]
    for i in range(len(labels)):
        if all(good[i:]):
            return labels[i]
    return None


def _untrained_arms(lab: Lab, s, levels: tuple, name: dict, users_at: dict) -> dict:
    """non_personalized (once), rag and instant_rag at every level, recorded; {arm: {level: preds}}."""
    from oppu.instant import open_bank, write_instant

    bank = open_bank(s, ["instant_rag"])
    lab.facts["instant_bank"] = {**bank.info, "top_k": bank.top_k, "temperature": bank.temperature}
    # non_personalized does not read the history: one run serves every level
    base = s.parse(s.generate(s.test, ["non_personalized"], None, label="non_personalized"))["non_personalized"]
    pick: dict[str, dict] = {"non_personalized": base, "rag": {}, "instant_rag": {}}
    for n in levels:
        cond = {"items": name[n]}
        lab.record(s, "default", cond, "non_personalized", None, base, users_at[n])
        pick["rag"][n] = s.parse(s.generate(users_at[n], ["rag"], None, label=f"rag n={name[n]}"))["rag"]
        lab.record(s, "default", cond, "rag", None, pick["rag"][n], users_at[n])
        d = lab.work_dir(s.task.id, "instant", name[n])
        with bank.scorer(s.model, s.tok, s.cfg.max_prompt_tokens, s.cfg.tokens_per_forward) as sc:
            write_instant(bank, users_at[n], d, s.cfg.max_history_items, scorer=sc)
        p = s.parse(s.generate(users_at[n], ["instant_rag"], d, label=f"instant_rag n={name[n]}"))["instant_rag"]
        pick["instant_rag"][n] = p
        lab.record(s, "default", cond, "instant_rag", None, p, users_at[n])
        lab.done_with(d)
    return pick


def run(lab: Lab) -> dict:
    s, levels, name, users_at = history_levels(lab, DEFAULT_LEVELS, "cold-start")
    tid = s.task.id
    pick = _untrained_arms(lab, s, levels, name, users_at)
    folds = [[u for i, u in enumerate(s.test) if i % 2 == f] for f in (0, 1)]
    metric = primary_metric(tid, s.score(pick.pop("non_personalized")))
    thresholds: dict[int, list] = {}
    for seed in lab.seeds:
        pick["oppu_rag"] = {}
        for n in levels:
            d = lab.work_dir(tid, "cold", name[n], seed)
            s.train(users_at[n], d, ["oppu", "oppu_rag"], seed=seed, label=f"train n={name[n]} s{seed}")
            p = s.parse(s.generate(users_at[n], ["oppu", "oppu_rag"], d, label=f"infer n={name[n]} s{seed}"))
            for m in ("oppu", "oppu_rag"):
                lab.record(s, "default", {"items": name[n]}, m, seed, p[m], users_at[n])
            pick["oppu_rag"][n] = p["oppu_rag"]
            lab.done_with(d)
        # auto, cross-fitted over two folds of users: fit the thresholds on one fold, apply to the other
        chosen = [fit_thresholds(s, folds[1 - f] or folds[f], levels, pick, metric) for f in (0, 1)]
        thresholds[seed] = chosen
        for n in levels:
            auto = {}
            for f in (0, 1):
                auto.update(auto_predictions(folds[f], n, chosen[f], pick))
            lab.record(s, "default", {"items": name[n]}, "auto", seed, auto, users_at[n])
    return _report(lab, tid, levels, name, thresholds)


def _report(lab: Lab, tid: str, levels: tuple, name: dict, thresholds: dict) -> dict:
    """Aggregate over seeds: the per-level table and plot, the crossovers, `auto` against its arms."""
    agg = lab.aggregate()
    metric = primary_metric(tid, lab.cell(agg, "rag")["mean"])
    methods = METHODS + ("auto",)
    summary, series = {}, {m: ([], []) for m in methods}
    table = ["| items | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for n in levels:
        cells = {m: lab.cell(agg, m, items=name[n]) for m in methods}
        summary[name[n]] = {m: cells[m]["mean"][metric] for m in methods}
        for m in methods:
            series[m][0].append(cells[m]["mean"][metric])
            series[m][1].append(cells[m]["std"][metric])
        table.append(f"| {name[n]} | " + " | ".join(fmt(cells[m], metric) for m in methods) + " |")
    labels = [name[n] for n in levels]
    cross = {"oppu_rag vs rag": crossover(summary, labels, metric, "oppu_rag", "rag"),
             "oppu vs rag": crossover(summary, labels, metric, "oppu", "rag"),
             "oppu_rag vs instant_rag": crossover(summary, labels, metric, "oppu_rag", "instant_rag")}
    findings, claims, auto_vs = _findings(summary, levels, name, metric, cross, thresholds)
    png = lines(lab.out / "cold_start.png", list(range(len(levels))), series, "history items the user has",
                axis_label(metric), f"{tid}: cold start",
                xticklabels=labels)
    lab.facts["auto_thresholds"] = {str(k): [[_level(t, name) for t in pair] for pair in v]
                                    for k, v in thresholds.items()}
    return lab.finish({"levels": summary, "crossover": cross, "auto_vs": auto_vs}, findings, claims,
                      ["\n".join(table)], [png])


def _level(t: int, name: dict) -> str:
    return "never" if t > ALL else name.get(t, str(t))


def _findings(summary: dict, levels: tuple, name: dict, metric: str, cross: dict,
              thresholds: dict) -> tuple[list, list, dict]:
    """(findings, claims, auto_vs): where OPPU pays off, and how `auto` does against its arms."""
    labels = [name[n] for n in levels]
    cold = [name[n] for n in levels if n <= 5]
    cold_rag_wins = sum(improvement(metric, summary[c]["rag"], summary[c]["oppu_rag"]) > 0 for c in cold)
    per_seed = "; ".join(f"s{sd}: " + ", ".join("/".join(_level(t, name) for t in pair) for pair in ts)
                         for sd, ts in thresholds.items())
    findings = ["crossover (from this history size on, the first is at least as good as the second): "
                + ", ".join(f"{k}: {v if v is not None else 'never'}" for k, v in cross.items()),
                f"at 1-5 items retrieval only beats oppu_rag at {cold_rag_wins} of {len(cold)} levels",
                "auto thresholds per seed, fold 0 and fold 1 (instant_rag from / oppu_rag from; 'never' = "
                f"not used): {per_seed}"]
    auto_vs = {m: round(sum(improvement(metric, summary[c]["auto"], summary[c][m]) for c in labels)
                        / len(labels), 4) for m in ARMS}
    findings.append("auto over the levels, mean gain: " + ", ".join(f"vs {k} {v:+.3f}" for k, v in auto_vs.items()))
    claims = [("retrieval only is the better choice for cold-start users, OPPU once there is more history "
               "(Salemi & Zamani 2024)", cold_rag_wins > len(cold) / 2 and cross["oppu_rag vs rag"] not in (None, "1"),
               f"rag ahead at {cold_rag_wins}/{len(cold)} cold levels; crossover {cross['oppu_rag vs rag']}")]
    return findings, claims, auto_vs
