"""Run reports: a markdown table of methods x metrics, a bar plot (PNG), the facts of the run.

    write_report(out_dir, "LaMP_2M", {"rag": {"accuracy": 0.5, "f1": 0.4}, ...}, info)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from oppu.metrics import higher_is_better


def metrics_table(metrics: dict[str, dict[str, float]], baseline: str = "non_personalized") -> str:
    """Markdown table; best value per metric in bold; delta vs baseline in parentheses."""
    methods = list(metrics)
    keys = list(next(iter(metrics.values())).keys()) if metrics else []
    best = {k: (max if higher_is_better(k) else min)(metrics[m][k] for m in methods) for k in keys}
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m in methods:
        cells = []
        for k in keys:
            v = metrics[m][k]
            s = f"{v:.4f}"
            if baseline in metrics and m != baseline:
                s += f" ({v - metrics[baseline][k]:+.4f})"
            cells.append(f"**{s}**" if v == best[k] else s)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread_lines(spread: dict) -> str:
    """The bootstrap over test users (oppu.spread) as text: each method's gap to non_personalized
    with its 95% interval, and how often it was ahead over the resamples."""
    if not spread.get("gap"):
        return ""
    lines = [f"\nGap to non_personalized, 95% interval from {spread['resamples']} resamples of the "
             f"{spread['users']} test users (a gap whose interval spans 0 is within noise):\n"]
    for m, gaps in spread["gap"].items():
        cells = [f"{k} {g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}], ahead in {g['p_better']:.0%}"
                 for k, g in gaps.items()]
        lines.append(f"- {m}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def axis_label(metric: str) -> str:
    """A metric's axis label, saying when lower is better."""
    return metric + ("" if higher_is_better(metric) else " (lower is better)")


def plot_methods(metrics: dict[str, dict[str, float]], task: str, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(metrics)
    keys = list(next(iter(metrics.values())).keys())
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    colors = ["#1f77b4" if m.startswith("oppu") else "#2ca02c" if m.startswith("instant") else "#9e9e9e"
              for m in methods]
    for ax, k in zip(axes[0], keys):
        vals = [metrics[m][k] for m in methods]
        bars = ax.bar(range(len(methods)), vals, color=colors)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(axis_label(k))
        ax.set_title(f"{task}: {k}")
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, task: str, metrics: dict[str, dict[str, float]], info: dict[str, Any]) -> Path:
    out = Path(out)
    png = plot_methods(metrics, task, out / "methods.png")
    cfg, base, t = info.get("config", {}), info.get("base", {}), info.get("timings", {})
    users = info.get("users", {})
    losses = [v["losses"] for v in users.values() if v.get("losses")]
    loss_line = ""
    if losses:
        first = sum(x[0] for x in losses) / len(losses)
        last = sum(x[-1] for x in losses) / len(losses)
        loss_line = f"- per-user training loss (mean over users): {first:.3f} -> {last:.3f}\n"
    spu = info.get("seconds_per_user") or {}
    if spu:
        bank = (info.get("instant") or {}).get("bank") or {}
        loss_line += "- seconds per user: " + ", ".join(f"{m} {v}" for m, v in spu.items()) + (
            f" (instant: bank of {bank.get('users')} users, {'cached' if bank.get('cached') else 'trained'}, "
            f"{bank.get('mix')} top_k={bank.get('top_k')} temperature={bank.get('temperature')})\n" if bank else "\n")
    text = f"""# oppu run: {task}

{metrics_table(metrics)}
{spread_lines(info.get("spread") or {})}

![methods]({png.name})

- data: `{info.get('data')}`; {info.get('test_users')} test users, {info.get('questions')} questions; \
{info.get('other_users')} other users adapted the base; {info.get('skipped_records', 0)} records skipped
- base: `{base.get('source')}` ({base.get('params', 0):,} parameters), task adaptation: \
{base.get('task_adaptation')} on {base.get('examples')} examples{' (cached)' if base.get('cached') else ''}
- per-user PEFT: {cfg.get('peft')}; retriever: {cfg.get('retriever')}, k={cfg.get('k')}; \
profile: {info.get('profile_kind')}; prompt style: {cfg.get('prompt_style')}; seed {cfg.get('seed')}
{loss_line}- time: base {t.get('base_s', 0)}s, per-user training {t.get('per_user_train_s', 0)}s, \
inference {t.get('inference_s', 0)}s, total {t.get('total_s', 0)}s
- deltas in parentheses are against non_personalized; best per metric in bold
"""
    (out / "report.md").write_text(text)
    return out / "report.md"
