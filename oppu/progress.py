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
