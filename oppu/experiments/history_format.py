"""`history-format`: the user's PEFT trained on history in another shape than the task's.

- matched: the task's own examples (content -> label), what `oppu run` trains on;
- no_label: the items with their label field removed: the module can only learn the user's
  content (language modelling on it), e.g. which movies they describe, not how they tag;
- other_format: the same items as another task: the label given, the content to write
  (label -> content), a generation task over the same history.
Queries are always asked in the task's format (`oppu` prompts). The paper reports OPPU stays
robust when the history comes in a different format."""
from __future__ import annotations

from oppu.examples import Example
from oppu.experiments.common import Lab, clear_gain, fmt, improvement, primary_metric
from oppu.experiments.plots import bars
from oppu.report import axis_label
from oppu.tasks.base import clip_words

FORMATS = ("matched", "no_label", "other_format")
CONTENT_WORDS = 48


def format_examples(task, user, fmt_name: str) -> list[Example]:
    """One user's training examples in the given history format (pure)."""
    cf, lf = task.content_field, task.label_field
    out = []
    for it in user.history:
        content = clip_words(str(it.get(cf, "")), CONTENT_WORDS).strip()
        if not content:
            continue
        src = f"item:{it['id']}"
        if fmt_name == "no_label":
            out.append(Example(f"{cf}:", " " + content, user.user_id, "plain", src))
        elif fmt_name == "other_format":
            if lf is None or it.get(lf) in (None, ""):
                continue
            out.append(Example(f"{lf}: {it[lf]}\n{cf}:", " " + content, user.user_id, "plain", src))
        else:
            raise ValueError(f"unknown history format {fmt_name!r}; valid: {', '.join(FORMATS)}")
    return out


def run(lab: Lab) -> dict:
    s = lab.session(lab.opts.task, lab.data_dir(lab.opts.task))
    task = s.task
    if task.label_field is None:
        raise ValueError(f"{task.id} has no label field, so 'no_label' and 'other_format' are the same as matched")
    lab.register_world(task.id, "default", s.test)
    lab.run_methods(s, "default", s.test, ["non_personalized"], {"format": "none"})
    counts = {}
    for f in FORMATS:
        fn = None if f == "matched" else (lambda u, f=f: format_examples(task, u, f))
        facts = lab.run_methods(s, "default", s.test, ["oppu"], {"format": f}, label=f,
                                train_kw={"examples_fn": fn} if fn else None)
        counts[f] = sum(v["examples"] for v in facts[lab.seeds[0]].values())
    agg = lab.aggregate()
    base = lab.cell(agg, "non_personalized", format="none")
    metric = primary_metric(task.id, base["mean"])
    summary = {}
    table = [f"| history format | training examples | oppu {metric} | vs non_personalized |", "|---|---|---|---|"]
    for f in FORMATS:
        c = lab.cell(agg, "oppu", format=f)
        gain = improvement(metric, c["mean"][metric], base["mean"][metric])
        summary[f] = {"score": c["mean"][metric], "std": c["std"][metric], "gain": round(gain, 4),
                      "examples": counts[f]}
        table.append(f"| {f} | {counts[f]} | {fmt(c, metric)} | {gain:+.3f} |")
    table.append(f"| (non_personalized) | 0 | {fmt(base, metric)} | |")
    findings = [f"{f}: oppu {summary[f]['score']:.3f} ({summary[f]['gain']:+.3f} over non_personalized)"
                for f in FORMATS]
    kept = {f: (summary[f]["gain"] / summary["matched"]["gain"] if summary["matched"]["gain"] > 0 else None)
            for f in FORMATS[1:]}
    findings += [f"{f} keeps {v:.0%} of the matched format's gain" for f, v in kept.items() if v is not None]
    claims = [(f"OPPU still beats non_personalized (by more than its sd over seeds) with history in the {f} format",
               clear_gain(summary[f]["gain"], summary[f]["std"]),
               f"gain {summary[f]['gain']:+.3f} (sd {summary[f]['std']:.3f}) vs {summary['matched']['gain']:+.3f} "
               "matched") for f in FORMATS[1:]]
    series = {"oppu": ([summary[f]["score"] for f in FORMATS], [summary[f]["std"] for f in FORMATS])}
    png = bars(lab.out / "history_format.png", list(FORMATS), series, "history format the PEFT was trained on",
               axis_label(metric),
               f"{task.id}: oppu by history format, mean ± sd over seeds",
               reference={"non_personalized": base["mean"][metric]})
    notes = ["no_label and other_format examples end in their own field cue, never the task's answer cue, so "
             "they cannot teach the answer format; any gain is knowledge of the user carried over."]
    return lab.finish(summary, findings, claims, ["\n".join(table)], [png], notes)
