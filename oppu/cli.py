"""`oppu` command line: a thin Typer layer over the Python API.

    oppu demo                                   # synthetic worlds + SmolLM2, six methods, tables
    oppu run --task LaMP_2M --data DIR --out OUT [--base tiny|PATH] [--methods ...] [--peft lora]
    oppu experiment k --task LaMP_2M --synth --out OUT   # one of the paper's analyses
    oppu data synth --task LaMP_4 --out DIR     # write a synthetic LaMP world
    oppu data inspect DIR                       # users, history lengths, labels
    oppu score --task LaMP_3 --golds G.json --preds P.json
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="One PEFT Per User: personalize a shared LLM with one small PEFT module per user, "
                       "evaluated on LaMP.")
data_app = typer.Typer(no_args_is_help=True, help="Synthesize and inspect LaMP-format data.")
app.add_typer(data_app, name="data")
from oppu.cli_serve import serve, user_app  # noqa: E402  (cheap: imports typer only)

app.command()(serve)
app.add_typer(user_app, name="user")
console = Console(stderr=True)
DEMO_TASKS = ("LaMP_2M", "LaMP_4")


def _fail(msg: str, code: int = 2) -> None:
    console.print("[bold red]error:[/] ", end="")
    console.print(msg, markup=False, highlight=False)
    raise typer.Exit(code)


def _progress():
    """rich bars on a terminal (or with OPPU_PROGRESS=1); plain progress lines in a pipe or a log."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from oppu.progress import LineProgress
    if not console.is_terminal and not _force_progress():
        return LineProgress(lambda s: console.print(f"[dim]{s}[/]"))
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


def _force_progress() -> bool:
    import os
    return os.environ.get("OPPU_PROGRESS", "") == "1"


def _print_metrics(task: str, metrics: dict[str, dict[str, float]]) -> None:
    keys = list(next(iter(metrics.values())))
    t = Table(title=f"{task}")
    t.add_column("method")
    for k in keys:
        t.add_column(k, justify="right")
    for m, vals in metrics.items():
        t.add_row(m, *(f"{vals[k]:.4f}" for k in keys))
    Console().print(t)


@app.command()
def score(task: str = typer.Option(..., help="LaMP task id, e.g. LaMP_2M (or 2M)"),
          golds: Path = typer.Option(..., help="official outputs file with the golds"),
          preds: Path = typer.Option(..., help="predictions in the same outputs shape")):
    """Score predictions with LaMP's exact metrics; prints one JSON object."""
    from oppu.data.lamp import LampFormatError, canonical_task, read_outputs
    from oppu.metrics import MetricsError
    from oppu.metrics import score as score_fn
    try:
        gtask, g, _ = read_outputs(golds)
        ptask, p, _ = read_outputs(preds)
        want = canonical_task(task)
        for name, t in ((golds, gtask), (preds, ptask)):
            if t is not None and t != want:
                raise ValueError(f"{name} holds task {t!r}, but --task {want} was asked for")
        result = score_fn(want, g, p)
    except (LampFormatError, MetricsError, ValueError) as e:
        _fail(str(e))
    print(json.dumps(result))


@data_app.command("synth")
def data_synth(task: str = typer.Option(..., help="LaMP task id"),
               out: Path = typer.Option(..., help="directory to write the world into"),
               seed: int = typer.Option(0), test_users: int = typer.Option(16), other_users: int = typer.Option(160),
               queries_per_user: int = typer.Option(3), min_history: int = typer.Option(6),
               max_history: int = typer.Option(48),
               shift: float = typer.Option(0.0, help="fraction of test queries drawn from a part of the "
                                                     "user's taste their history does not show"),
               noise: float = typer.Option(0.05, help="probability a gold ignores the user's trait"),
               user_based: bool = typer.Option(False, help="LaMP user-based shape: no user_id, one question per user")):
    """Write a synthetic LaMP world (official file format) whose answers depend on a per-user trait."""
    from oppu.data.lamp import canonical_task
    from oppu.data.synth import synth_world
    try:
        card = synth_world(canonical_task(task), out, seed=seed, test_users=test_users, other_users=other_users,
                           queries_per_user=queries_per_user, min_history=min_history, max_history=max_history,
                           shift=shift, noise=noise, user_based=user_based)
    except ValueError as e:
        _fail(str(e))
    console.print(f"wrote {card['task']} world to {out}: caps {json.dumps(card['caps'])}")


def inspect_dir(root: Path, task: Optional[str], strict: bool) -> dict:
    from oppu.data.users import load_lamp_dir
    ds = load_lamp_dir(root, task, strict=strict)
    report = {"task": ds.task, "skipped_records": len(ds.problems), "splits": {}}
    for name, users in ds.splits.items():
        hist = sorted(len(u.history) for u in users)
        golds = [q.gold for u in users for q in u.queries if q.gold is not None]
        s = {"users": len(users), "questions": sum(len(u.queries) for u in users),
             "history": {"min": hist[0], "median": statistics.median(hist), "max": hist[-1],
                         "total_items": sum(hist)} if hist else {},
             "golds": len(golds)}
        if ds.task in ("LaMP_1", "LaMP_2N", "LaMP_2M", "LaMP_3"):
            s["label_distribution"] = dict(Counter(golds).most_common())
        elif golds:
            s["gold_words_mean"] = round(statistics.mean(len(g.split()) for g in golds), 2)
        report["splits"][name] = s
    return report


@data_app.command("inspect")
def data_inspect(root: Path = typer.Argument(..., help="LaMP directory with {split}_questions.json"),
                 task: Optional[str] = typer.Option(None, help="task id (else read from the outputs files)"),
                 strict: bool = typer.Option(True, "--strict/--lenient",
                                             help="lenient: skip bad records, count and report them")):
    """Counts of users, history lengths, questions and label distribution for a LaMP directory."""
    from oppu.data.lamp import LampFormatError
    try:
        report = inspect_dir(root, task, strict)
    except (LampFormatError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    print(json.dumps(report, indent=1))


def _run_one(**kw):
    """One pipeline run with progress and the metrics table; its metrics (or, with _keep_info, the RunResult)."""
    from oppu.config import load_config
    from oppu.pipeline import run as run_pipeline
    config = kw.pop("config", None)
    keep = kw.pop("_keep_info", False)
    try:
        cfg = load_config(config, **kw)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    with _progress() as prog:
        try:
            res = run_pipeline(cfg, progress=prog, log=lambda s: console.print(f"[dim]{s}[/]"))
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
    _print_metrics(cfg.task, res.metrics)
    console.print(f"wrote {res.out}/metrics.json, report.md, predictions/, adapters/")
    return res if keep else res.metrics


@app.command()
def run(task: str = typer.Option(..., help="LaMP task id (or a registered task)"),
        data: Optional[str] = typer.Option(None, help="LaMP directory; omit to synthesize the default world"),
        out: str = typer.Option("runs/oppu", help="output directory"),
        base: Optional[str] = typer.Option(None, help="'tiny' (default; 'tiny:small' etc.), 'smollm2' (SmolLM2-135M-"
                                                      "Instruct from its PyPI wheel), a .gguf file or a local HF model dir"),
        methods: Optional[str] = typer.Option(None, help="comma list of: non_personalized,rag,pag,oppu,oppu_rag,oppu_pag "
                                                         "(the default), instant,instant_rag,instant_pag (a module mixed "
                                                         "from a bank of other users' modules, no per-user training)"),
        peft: Optional[str] = typer.Option(None, help="lora | prompt_tuning | ia3"),
        retriever: Optional[str] = typer.Option(None, help="bm25 | dense | recency"),
        k: Optional[int] = typer.Option(None, help="retrieved history items per prompt"),
        profile: Optional[str] = typer.Option(None, help="auto | statistical | llm"),
        test_users: Optional[int] = typer.Option(None, help="test users: the N longest histories (paper: 100)"),
        seed: Optional[int] = typer.Option(None),
        device: Optional[str] = typer.Option(None, help="cpu | cuda | auto"),
        dtype: Optional[str] = typer.Option(None, help="fp32 | bf16 | fp16"),
        base_epochs: Optional[int] = typer.Option(None, help="task-adaptation epochs (0 = none)"),
        user_epochs: Optional[int] = typer.Option(None, help="per-user PEFT epochs"),
        user_lr: Optional[float] = typer.Option(None, help="per-user PEFT learning rate"),
        executor: Optional[str] = typer.Option(None, help="per-user training through the engine: batched "
                                                          "(this process, default) | local (processes) | ray"),
        workers: Optional[int] = typer.Option(None, help="training workers for --executor local|ray"),
        ray_address: Optional[str] = typer.Option(None, help="Ray address (--executor ray); omit for a private local Ray"),
        max_users_per_batch: Optional[int] = typer.Option(None, help="users trained together (batched|local|ray)"),
        tokens_per_forward: Optional[int] = typer.Option(None, help="batched training: padded tokens per forward "
                                                                    "chunk, bounds memory (batched|local|ray; default 1024)"),
        max_history_items: Optional[int] = typer.Option(None, help="per-user training on the N most recent history "
                                                                   "items (0 = all; recorded in run.json)"),
        top_layers: Optional[int] = typer.Option(None, help="per-user LoRA/IA3 on the last N decoder layers only "
                                                            "(0 = all; needs explicit target modules)"),
        config: Optional[Path] = typer.Option(None, help="YAML config; flags override it"),
        strict: bool = typer.Option(True, "--strict/--lenient", help="lenient: skip bad records, counted")):
    """Run OPPU and its baselines on one task; writes predictions, metrics, report and adapters."""
    _run_one(task=task, data=data, out=out, base=base, methods=methods, peft=peft, retriever=retriever, k=k,
             profile=profile, test_users=test_users, seed=seed, device=device, dtype=dtype, config=config,
             strict=strict, executor=executor, workers=workers, ray_address=ray_address,
             max_users_per_batch=max_users_per_batch, tokens_per_forward=tokens_per_forward,
             max_history_items=max_history_items, **{"base_train.epochs": base_epochs, "user_train.epochs": user_epochs,
                               "user_train.lr": user_lr, "user_train.top_layers": top_layers})


@app.command()
def experiment(name: str = typer.Argument(..., help="methods | peft-types | activity | shift | history-format | "
                                                    "cold-start | k | instant"),
               task: str = typer.Option("LaMP_2M", help="LaMP task id"),
               data: Optional[str] = typer.Option(None, help="LaMP directory (with --all-tasks: DIR/<task>/ each)"),
               synth: bool = typer.Option(False, "--synth", help="use the embedded synthetic worlds instead of --data"),
               out: Optional[str] = typer.Option(None, help="output directory (default runs/experiment-NAME)"),
               base: str = typer.Option("tiny", help="tiny preset ('tiny', 'tiny:micro') or a local HF dir"),
               seeds: int = typer.Option(3, help="per-user training seeds (error bars)"),
               test_users: int = typer.Option(16, help="test users"),
               other_users: int = typer.Option(160, help="users that adapt the base (synthetic worlds)"),
               all_tasks: bool = typer.Option(False, "--all-tasks", help="methods: the seven-task table"),
               base_epochs: Optional[int] = typer.Option(None, help="task-adaptation epochs (default: the base's)"),
               user_epochs: Optional[int] = typer.Option(None, help="per-user PEFT epochs"),
               buckets: int = typer.Option(3, help="activity / shift on real data: number of buckets"),
               levels: Optional[str] = typer.Option(None, help="cold-start, instant: history sizes; k: depths (comma list)"),
               seed: int = typer.Option(0, help="base seed; per-user seeds are seed, seed+1, ..."),
               executor: Optional[str] = typer.Option(None, help="per-user training: batched (default) | local | "
                                                                 "ray"),
               keep_adapters: bool = typer.Option(False, help="keep every trained adapter under OUT/.work")):
    """Rerun one of the paper's analyses; writes OUT/results.json, OUT/report.md and PNG plots."""
    from oppu.experiments import ExpOptions, run_experiment
    try:
        lv = tuple(int(x) for x in levels.split(",") if x.strip()) if levels else ()
    except ValueError:
        _fail(f"--levels {levels!r}: expected a comma list of integers, e.g. 1,2,4")
    overrides = {"seed": seed, "user_train.epochs": user_epochs, "executor": executor}
    try:
        opts = ExpOptions(name=name, task=task, data=data or "", synth=synth, out=out or f"runs/experiment-{name}",
                          base=base, seeds=seeds, test_users=test_users, other_users=other_users,
                          all_tasks=all_tasks, base_epochs=base_epochs, buckets=buckets, levels=lv,
                          keep_adapters=keep_adapters, overrides={k: v for k, v in overrides.items() if v is not None})
    except ValueError as e:
        _fail(str(e))
    with _progress() as prog:
        try:
            res = run_experiment(opts, progress=prog, log=lambda s: console.print(f"[dim]{s}[/]"))
        except (ValueError, FileNotFoundError, KeyError) as e:
            _fail(str(e))
    for f in res["findings"]:
        console.print(f"- {f}", markup=False, highlight=False)
    for c in res["claims"]:
        verdict = {True: "holds", False: "does not hold", None: "not testable"}[c["holds"]]
        console.print(f"- paper: {c['claim']}: {verdict} ({c['evidence']})", markup=False, highlight=False)
    console.print(f"wrote {opts.out}/results.json, report.md, {', '.join(res['plots'])}")


@app.command()
def demo(out: str = typer.Option("runs/demo", help="output directory"),
         tasks: str = typer.Option(",".join(DEMO_TASKS), help="comma list of tasks to run"),
         seed: int = typer.Option(0),
         base: str = typer.Option("smollm2", help="'smollm2' (SmolLM2-135M-Instruct, the default), a tiny preset "
                                                 "('tiny', 'tiny:micro', 'tiny:small'), a .gguf file or a local HF dir"),
         test_users: Optional[int] = typer.Option(None, help="test users per synthetic world (default: the base's "
                                                             "demo preset, config.DEMO_PRESETS)"),
         other_users: Optional[int] = typer.Option(None, help="users that adapt the base"),
         base_epochs: Optional[int] = typer.Option(None, help="task-adaptation epochs (default: the base's)")):
    """The whole pipeline on synthetic worlds: six methods, tables, the spread over test users.

    About 5 minutes on 2 CPU cores with SmolLM2 (its small demo world); --base tiny runs a larger
    world on the from-scratch tiny base (about 8 minutes)."""
    from oppu.config import demo_preset
    from oppu.data.synth import synth_world
    preset = demo_preset(base)
    world = {**preset["world"], **{k: v for k, v in (("test_users", test_users), ("other_users", other_users))
                                   if v is not None}}
    summary = {}
    for t in [x.strip() for x in tasks.split(",") if x.strip()]:
        d = Path(out) / t
        try:
            card = synth_world(t, d / "data", seed=seed, **world)
        except ValueError as e:
            _fail(str(e))
        console.print(f"[bold]{card['task']}[/]: synthetic world, {world['test_users']} test users; best reachable "
                      f"without / with the user: {card['caps']['without_user']} / {card['caps']['with_user']}")
        res = _run_one(task=card["task"], data=str(d / "data"), out=str(d), seed=seed, base=base,
                       test_users=world["test_users"], **{**preset["run"], **({"base_train.epochs": base_epochs} if base_epochs is not None else {})},
                       _keep_info=True)
        summary[card["task"]] = {"metrics": res.metrics, "caps": card["caps"], "spread": res.info.get("spread", {}),
                                 "timings": res.info["timings"]}
        _print_spread(res.info.get("spread", {}))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"wrote {out}/summary.json and a report.md per task")


def _print_spread(spread: dict) -> None:
    from oppu.report import spread_lines
    text = spread_lines(spread).strip()
    if text:
        console.print(text, markup=False, highlight=False)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
