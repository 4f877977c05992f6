"""The base model a server runs on: a local checkpoint, an `oppu run` output, or the tiny default.

    model, tok, info = open_base("tiny:micro", "LaMP_2M", store_root)   # built once, then reused
    model, tok, info = open_base("runs/2m", "LaMP_2M", store_root)       # run.json -> base.path
    model, tok, info = open_base("/models/Llama-2-7b-hf", "LaMP_2M", store_root)

`tiny` / `tiny:<preset>` (micro, tiny, small): a from-scratch Llama with a BPE tokenizer, both
built from a small built-in synthetic world of the task and task-adapted on it for `base_epochs`
epochs, through the same code `oppu run` uses (oppu.model.prepare.prepare_base). It is cached under
`<store>/bases/`, so every restart serves the exact base the store's adapters were trained on.
It exists to try the API; its answers are only as good as a few-million-parameter model trained
for seconds on a synthetic world. Point `--base` at a real checkpoint for quality.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("oppu.server")


def open_base(spec: str, task: str, store_root: str | Path, *, seed: int = 0, base_epochs: int = 3, k: int = 2,
              max_len: int = 256, device: str = "cpu", dtype: str = "fp32") -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, info) for `--base spec`; see the module docstring."""
    from oppu.model.base import load_base, resolve_base_path

    if spec != "tiny" and not spec.startswith("tiny:"):
        path = resolve_base_path(spec)
        model, tok = load_base(path, dtype, device)
        return model, tok, {"source": spec, "path": str(path)}
    return _tiny(spec, task, Path(store_root), seed, base_epochs, k, max_len, device, dtype)


def _tiny(spec, task, store_root, seed, base_epochs, k, max_len, device, dtype):
    from oppu.config import BaseTrainConfig, RunConfig
    from oppu.data.synth import synth_world
    from oppu.data.users import load_lamp_dir
    from oppu.model.prepare import prepare_base
    from oppu.progress import NoProgress
    from oppu.tasks import get_task

    t = get_task(task)
    cfg = RunConfig(task=t.id, base=spec, methods=("non_personalized", "rag"), k=k, seed=seed, device=device,
                    dtype=dtype, max_prompt_tokens=max_len, cache_dir=str(store_root), test_users=4,
                    base_train=BaseTrainConfig(epochs=base_epochs))
    with tempfile.TemporaryDirectory(prefix="oppu-serve-world-") as d:
        synth_world(t.id, d, seed=seed, test_users=4, other_users=48)
        test, others = load_lamp_dir(d, t.id).split_users(n_test=4)
    model, tok, info = prepare_base(cfg, t, others, test, None, lambda s: log.info("%s", s), NoProgress())
    return model, tok, {**info, "source": spec}
