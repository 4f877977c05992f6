"""What every experiment shares: where its data comes from, one base per dataset, recording each
scored cell with the predictions behind it, aggregation over seeds, results.json and report.md.

An experiment is a function `run(lab)`: it opens sessions (oppu.session) through the lab, trains
and generates, and calls `lab.record(...)` once per (condition, method, seed) with that cell's
predictions. The lab writes every cell's predictions (official outputs shape) and the golds they
were scored against, so every number in results.json can be recomputed from files on disk.

Seeds: the per-user PEFT training seed (initialisation and data order) is cfg.seed + i. The
task-adapted base is one per dataset (it is the expensive part), so methods without a user
module (non_personalized, rag, pag) give one value and carry no error bar.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from oppu.config import DEFAULT_METHODS, load_config
from oppu.data.lamp import write_json_atomic, write_outputs
from oppu.metrics import METRIC_KEYS, higher_is_better
from oppu.config import ADAPTER_METHODS
from oppu.session import Session
from oppu.tasks import get_task


@dataclass(frozen=True)
class ExpOptions:
    name: str
    task: str = "LaMP_2M"
    data: str = ""                 # a LaMP directory; "" with synth=True: the experiment's own worlds
    synth: bool = False
    out: str = "runs/experiment"
    base: str = "tiny"
    seeds: int = 3
    test_users: int = 16
    other_users: int = 160         # synthetic worlds only
    all_tasks: bool = False        # methods: the seven-task table
    base_epochs: int | None = None
    buckets: int = 3               # activity / shift (real data): quantile buckets
    levels: tuple[int, ...] = ()   # cold-start history sizes; k depths; () = the experiment's default
    keep_adapters: bool = False
    command: str = ""              # the exact command line (the CLI fills it in)
    overrides: dict[str, Any] = field(default_factory=dict)  # more RunConfig keys (dotted for nested)

    def __post_init__(self) -> None:
        if bool(self.data) == bool(self.synth):
            raise ValueError("pass exactly one of --data DIR (LaMP-format data) or --synth (the embedded worlds)")
        if self.seeds < 1 or self.test_users < 1 or self.buckets < 1:
            raise ValueError(f"seeds, test_users and buckets must be >= 1 (got {self.seeds}, {self.test_users}, "
                             f"{self.buckets})")

    def cli(self) -> str:
        if self.command:
            return self.command
        parts = ["oppu", "experiment", self.name, "--task", self.task, "--out", self.out, "--base", self.base,
                 "--seeds", str(self.seeds), "--test-users", str(self.test_users)]
        parts += ["--synth"] if self.synth else ["--data", self.data]
        if self.all_tasks:
            parts.append("--all-tasks")
        if self.base_epochs is not None:
            parts += ["--base-epochs", str(self.base_epochs)]
        if self.levels:
            parts += ["--levels", ",".join(map(str, self.levels))]
        if self.other_users != 160 and self.synth:
            parts += ["--other-users", str(self.other_users)]
        if self.buckets != 3:
            parts += ["--buckets", str(self.buckets)]
        if self.overrides.get("seed"):
            parts += ["--seed", str(self.overrides["seed"])]
        if self.overrides.get("user_train.epochs") is not None:
            parts += ["--user-epochs", str(self.overrides["user_train.epochs"])]
        if self.overrides.get("executor") not in (None, "batched"):
            parts += ["--executor", str(self.overrides["executor"])]
        if self.keep_adapters:
            parts.append("--keep-adapters")
        return shlex.join(parts)


def primary_metric(task_id: str, metrics: dict[str, float]) -> str:
    keys = METRIC_KEYS.get(task_id)
    return keys[0] if keys else next(iter(metrics))


def improvement(metric: str, value: float, reference: float) -> float:
    """Signed gain: positive means better than the reference, for any metric direction."""
    return value - reference if higher_is_better(metric) else reference - value


def clear_gain(gain: float, sd: float) -> bool:
    """A gain counts when it is positive and larger than the method's sd over seeds."""
    return gain > 0 and gain > sd


def _slug(condition: dict[str, Any]) -> str:
    s = "_".join(f"{k}-{v}" for k, v in condition.items()) or "all"
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", s)


class Lab:
    """Sessions, recording and output for one experiment run."""

    def __init__(self, opts: ExpOptions, progress=None, log: Callable[[str], None] = lambda s: None):
        self.opts, self.progress, self.log = opts, progress, log
        self.out = Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {}
        self._sessions: dict[str, Session] = {}
        self._golds_written: set[str] = set()
        self._world_users: dict[tuple[str, str], list] = {}

    @property
    def seeds(self) -> list[int]:
        base = int(self.opts.overrides.get("seed", 0))
        return [base + i for i in range(self.opts.seeds)]

    # -- data and sessions --------------------------------------------------------------------
    def config(self, task: str, data: Path):
        o = self.opts
        kw = {"task": task, "data": str(data), "out": str(self.out), "base": o.base, "test_users": o.test_users,
              "methods": DEFAULT_METHODS, "base_train.epochs": o.base_epochs, **o.overrides}
        return load_config(None, **kw)

    def data_dir(self, task: str, world: str = "default", **synth_kw: Any) -> Path:
        """The LaMP directory for `task`: --data (with --all-tasks, DIR/<task>), or a synthetic world
        written under OUT/data/<task>/<world>/ (same seed and sizes, so its other users, and thus
        its base, are shared by every world of the task)."""
        from oppu.data.synth import synth_world
        o = self.opts
        if o.data:
            root = Path(o.data)
            d = root / task if o.all_tasks else root
            if not d.is_dir():
                raise FileNotFoundError(f"LaMP directory for {task} not found: {d}" +
                                        (" (--all-tasks expects DIR/<task>/ per task)" if o.all_tasks else ""))
            return d
        d = self.out / "data" / task / world
        seed = int(o.overrides.get("seed", 0))
        synth_world(task, d, seed=seed, test_users=o.test_users, other_users=o.other_users, **synth_kw)
        return d

    def session(self, task: str, data: Path, select: str = "longest") -> Session:
        """A session on `data` (test users chosen by `select`); reuses the loaded base when only the
        test users differ (the base depends on the other users alone)."""
        cfg = self.config(task, data)
        key = f"{task}|{data}|{select}"
        if key not in self._sessions:
            s = self._sessions[key] = Session.open(cfg, self.progress, self.log, select)
            self.facts.setdefault("bases", {})[task] = {k: v for k, v in s.base_info.items() if k != "losses"}
        return self._sessions[key]

    def work_dir(self, *parts: Any) -> Path:
        d = self.out / ".work" / "_".join(str(p) for p in parts)
        shutil.rmtree(d, ignore_errors=True)
        return d

    def done_with(self, d: Path) -> None:
        if not self.opts.keep_adapters:
            shutil.rmtree(d, ignore_errors=True)

    # -- recording ------------------------------------------------------------------------------
    def record(self, s: Session, world: str, condition: dict[str, Any], method: str, seed: int | None,
               preds: dict[str, str], users: Sequence, qids: Sequence[str] | None = None) -> dict[str, Any]:
        """Score `preds` on the questions of `users` (only `qids` when given), write them and the
        golds, keep the row."""
        qids = [q.id for u in users for q in u.queries] if qids is None else list(qids)
        chosen = set(qids)
        sub = {q: preds[q] for q in qids}
        metrics = s.score(sub, users, qids)
        task = s.task.id
        gold_rel = f"golds/{task}-{world}.json"
        if gold_rel not in self._golds_written:  # every test user's golds in this world
            write_outputs(self.out / gold_rel, task, s.golds(self._world_users.get((task, world), users)))
            self._golds_written.add(gold_rel)
        name = method + ("" if seed is None else f".seed{seed}")
        pred_rel = f"predictions/{task}/{world}/{_slug(condition)}/{name}.json"
        write_outputs(self.out / pred_rel, task, sub)
        row = {"task": task, "world": world, "condition": dict(condition), "method": method, "seed": seed,
               "n_users": len({u.user_id for u in users for q in u.queries if q.id in chosen}),
               "n_questions": len(qids), "metrics": metrics,
               "predictions": pred_rel, "golds": gold_rel}
        self.rows.append(row)
        return row

    def register_world(self, task: str, world: str, users: Sequence) -> None:
        """Declare every test user of a world, so its golds file covers all of them."""
        self._world_users[(task, world)] = list(users)

    def run_methods(self, s: Session, world: str, users: Sequence, methods: Sequence[str],
                    condition: dict[str, Any], k: int | None = None,
                    train_kw: dict[str, Any] | None = None, label: str = "") -> dict[str, Any]:
        """The common cell: for each seed train the users' modules (if an adapter method is asked
        for), generate, record. Shared-base methods run once (seed None). Returns training facts."""
        plain = [m for m in methods if m not in ADAPTER_METHODS]
        adapt = [m for m in methods if m in ADAPTER_METHODS]
        if plain:
            preds = s.parse(s.generate(users, plain, None, k=k, label=f"{label} baselines".strip()))
            for m in plain:
                self.record(s, world, condition, m, None, preds[m], users)
        facts: dict[str, Any] = {}
        for seed in self.seeds if adapt else []:
            d = self.work_dir(s.task.id, world, _slug(condition), seed)
            facts[seed] = s.train(users, d, adapt, seed=seed, k=k, label=f"{label} train s{seed}".strip(),
                                  **(train_kw or {}))
            preds = s.parse(s.generate(users, adapt, d, k=k, label=f"{label} infer s{seed}".strip()))
            for m in adapt:
                self.record(s, world, condition, m, seed, preds[m], users)
            self.done_with(d)
        return facts

    def run_groups(self, s: Session, train_users: Sequence, worlds: dict[str, tuple[Session, Sequence]],
                   groups: Sequence[tuple[str, dict[str, Any], Sequence, Sequence[str] | None]],
                   methods: Sequence[str], tag: str) -> None:
        """Score several groups of questions with one set of modules per seed: `s` trains the modules
        of `train_users` once per seed; each world's (session, users) answers once per method and
        seed; each group (world, condition, users, question ids or None for all of theirs) is recorded
        on its own questions. Shared-base methods run once (seed None)."""
        plain = [m for m in methods if m not in ADAPTER_METHODS]
        adapt = [m for m in methods if m in ADAPTER_METHODS]

        def answer_and_record(ms: list[str], adapters: Path | None, seed: int | None, what: str) -> None:
            preds = {w: ws.parse(ws.generate(us, ms, adapters, label=f"{w} {what}")) for w, (ws, us) in worlds.items()}
            for world, cond, users, qids in groups:
                for m in ms:
                    self.record(worlds[world][0], world, cond, m, seed, preds[world][m], users, qids)

        if plain:
            answer_and_record(plain, None, None, "baselines")
        for seed in self.seeds if adapt else []:
            d = self.work_dir(s.task.id, tag, seed)
            s.train(train_users, d, adapt, seed=seed, label=f"train s{seed}")
            answer_and_record(adapt, d, seed, f"infer s{seed}")
            self.done_with(d)

    # -- aggregation ----------------------------------------------------------------------------
    def aggregate(self) -> list[dict[str, Any]]:
        """Mean and standard deviation over seeds per (task, world, condition, method)."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in self.rows:
            key = json.dumps([r["task"], r["world"], r["condition"], r["method"]], sort_keys=True)
            groups.setdefault(key, []).append(r)
        out = []
        for rows in groups.values():
            r0 = rows[0]
            mean = {k: statistics.fmean(r["metrics"][k] for r in rows) for k in r0["metrics"]}
            std = {k: statistics.stdev([r["metrics"][k] for r in rows]) if len(rows) > 1 else 0.0
                   for k in r0["metrics"]}
            out.append({"task": r0["task"], "world": r0["world"], "condition": r0["condition"],
                        "method": r0["method"], "n_seeds": len(rows), "n_users": r0["n_users"],
                        "n_questions": r0["n_questions"], "mean": mean, "std": std})
        return out

    def cell(self, agg: list[dict[str, Any]], method: str, **cond: Any) -> dict[str, Any] | None:
        for a in agg:
            if a["method"] == method and all(a["condition"].get(k) == v for k, v in cond.items()):
                return a
        return None

    # -- output ---------------------------------------------------------------------------------
    def finish(self, summary: dict[str, Any], findings: list[str], claims: list[tuple[str, bool | None, str]],
               tables: list[str], plots: list[Path], notes: list[str] = ()) -> dict[str, Any]:
        """Write results.json and report.md; return the results."""
        agg = self.aggregate()
        results = {"experiment": self.opts.name, "command": self.opts.cli(),
                   "task": "all" if self.opts.all_tasks else get_task(self.opts.task).id,
                   "seeds": self.seeds, "options": {k: v for k, v in self.opts.__dict__.items()},
                   "summary": summary, "findings": findings,
                   "claims": [{"claim": c, "holds": h, "evidence": e} for c, h, e in claims],
                   "aggregates": agg, "rows": self.rows, "facts": self.facts,
                   "plots": [p.name for p in plots]}
        write_json_atomic(self.out / "results.json", results)
        verdict = {True: "holds here", False: "does not hold here", None: "not testable here"}
        lines = [f"# oppu experiment: {self.opts.name}", "", "```", self.opts.cli(), "```", "", "## Findings", ""]
        lines += [f"- {f}" for f in findings]
        lines += ["", "## Against the paper", ""]
        lines += [f"- **{verdict[h]}**: {c} ({e})" for c, h, e in claims]
        for t in tables:
            lines += ["", t]
        for p in plots:
            lines += ["", f"![{p.stem}]({p.name})"]
        lines += ["", "## How to read this", "",
                  f"- Seeds {self.seeds} vary each user's PEFT training (initialisation and data order); "
                  "one task-adapted base per dataset. Methods without a user module have one value (no error bar).",
                  "- ± is the standard deviation over seeds; every number is recomputable from `predictions/` and "
                  "`golds/` with `oppu score`."]
        lines += [f"- {n}" for n in notes]
        (self.out / "report.md").write_text("\n".join(lines) + "\n")
        shutil.rmtree(self.out / ".work", ignore_errors=True) if not self.opts.keep_adapters else None
        return results


def fmt(a: dict[str, Any] | None, metric: str) -> str:
    if a is None:
        return "-"
    s = f"{a['mean'][metric]:.3f}"
    if a["n_seeds"] > 1:
        s += f" ± {a['std'][metric]:.3f}"
    return s
