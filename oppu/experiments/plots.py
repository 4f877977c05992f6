"""Experiment figures (matplotlib, Agg): grouped bars and lines, with error bars over seeds.

    bars(path, groups=["LaMP_2M"], series={"rag": ([0.5], [0.0])}, xlabel="task", ylabel="accuracy", title="...")
    lines(path, xs=[0, 1, 2], series={"rag": ([...], [...])}, xlabel="k", ylabel="accuracy", title="...")
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

Series = dict[str, tuple[Sequence[float], Sequence[float]]]  # name -> (means, stds)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _color(name: str, i: int) -> str:
    oppu = ["#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#8c564b"]
    other = ["#7f7f7f", "#ff7f0e", "#d62728", "#bcbd22", "#e377c2"]
    return (oppu if name.startswith("oppu") or name == "auto" else other)[i % 5]


def bars(path: Path, groups: Sequence[str], series: Series, xlabel: str, ylabel: str, title: str,
         zero_line: bool = False, reference: dict[str, float] | None = None) -> Path:
    plt = _plt()
    n = max(1, len(series))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * n * 0.45 + 2), 3.8))
    for i, (name, (means, stds)) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=name, color=_color(name, i), alpha=0.9)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20 if len(groups) > 4 else 0, ha="center")
    if zero_line:
        ax.axhline(0, color="black", lw=0.8)
    for name, v in (reference or {}).items():
        ax.axhline(v, ls="--", color="#7f7f7f", lw=1, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(3, n))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lines(path: Path, xs: Sequence[float], series: Series, xlabel: str, ylabel: str, title: str,
          xticklabels: Sequence[str] | None = None, reference: dict[str, float] | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for i, (name, (means, stds)) in enumerate(series.items()):
        ax.errorbar([x + 0.03 * (i - len(series) / 2) for x in xs], list(means), yerr=list(stds), capsize=3,
                    marker="os^Dv*"[i % 6], label=name, color=_color(name, i), alpha=0.9)
    for name, v in (reference or {}).items():
        ax.axhline(v, ls="--", color="#7f7f7f", lw=1, label=name)
    if xticklabels is not None:
        ax.set_xticks(list(xs), list(xticklabels))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
