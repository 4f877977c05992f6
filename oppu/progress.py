"""Progress reporting: the small protocol the pipeline, experiments and server report through.

`rich.progress.Progress` satisfies it (the CLI passes one); `NoProgress` is the silent default.

    pt = progress.add_task("per-user lora", total=16); progress.advance(pt, 1)
"""
from __future__ import annotations

from typing import Any


class NoProgress:
    def add_task(self, description: str, total: float | None = None, **kw: Any) -> int:
        return 0

    def advance(self, task_id: int, advance: float = 1) -> None:
        pass


class LineProgress:
    """Progress as plain lines, for logs and pipes (no terminal): a line when a task starts, then at
    most one every `every_s` seconds or 10% of its total, and one when it completes.

        with LineProgress(print) as p: t = p.add_task("per-user lora", total=16); p.advance(t, 1)
    """

    def __init__(self, write, every_s: float = 30.0) -> None:
        self.write, self.every_s = write, every_s
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, **kw: Any) -> int:
        import time

        tid = len(self.tasks)
        self.tasks[tid] = {"d": description, "total": total, "n": 0.0, "t0": time.monotonic(), "last": time.monotonic(),
                           "shown": 0.0}
        self.write(f"{description}: started" + (f" (0/{total:g})" if total else ""))
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        import time

        t = self.tasks[task_id]
        t["n"] += advance
        now, total = time.monotonic(), t["total"]
        done = bool(total) and t["n"] >= total
        step = bool(total) and t["n"] - t["shown"] >= 0.1 * total
        if done or step or now - t["last"] >= self.every_s:
            el = now - t["t0"]
            eta = f", eta {el / t['n'] * (total - t['n']):.0f}s" if total and t["n"] and not done else ""
            self.write(f"{t['d']}: {t['n']:g}/{total:g} in {el:.0f}s{eta}" if total else f"{t['d']}: {t['n']:g}")
            t["last"], t["shown"] = now, t["n"]
