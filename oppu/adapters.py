"""One PEFT per user: build the PEFT config, train one user's module, save/load it.

Each user's module is trained on that user's examples alone, from an initialisation seeded by
(seed, user id), so the result does not depend on which users were trained before. It is saved
in the standard PEFT format (adapter_config.json + adapter_model.safetensors), loadable with
`PeftModel.from_pretrained(base, user_dir)`.

    pcfg = peft_config("lora", UserTrainConfig())
    losses = train_user(base, tok, examples, pcfg, ucfg, seed=0, user_id="u1", save_dir="out/adapters/u1")
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

import torch

from oppu.config import PEFT_TYPES, UserTrainConfig
from oppu.train import encode, train_loop


def safe_user_dir(user_id: str) -> str:
    """A directory name that cannot escape its parent; a hash suffix keeps it unique."""
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:64].lstrip(".")
    if s != user_id or not s:
        s = f"{s or 'user'}-{hashlib.sha256(user_id.encode()).hexdigest()[:8]}"
    return s


def peft_config(kind: str, ucfg: UserTrainConfig):
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    targets = ucfg.target_modules if ucfg.target_modules == "all-linear" else \
        [m.strip() for m in ucfg.target_modules.split(",") if m.strip()]
    if kind == "lora":
        return LoraConfig(r=ucfg.lora_r, lora_alpha=ucfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                          task_type="CAUSAL_LM")
    if kind == "ia3":
        # IA3 scales keys, values and the MLP's down-projection input (the paper's and PEFT's default).
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         task_type="CAUSAL_LM")
    if kind == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=ucfg.num_virtual_tokens, task_type="CAUSAL_LM")
    raise ValueError(f"unknown PEFT type {kind!r}; valid: {', '.join(PEFT_TYPES)}")


def user_seed(seed: int, user_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{user_id}".encode()).digest()[:4], "little")


def attach(base, pcfg, seed: int, user_id: str):
    """Wrap the base with a fresh module for this user (seeded init)."""
    from peft import get_peft_model

    torch.manual_seed(user_seed(seed, user_id))
    return get_peft_model(base, pcfg)


def detach(pm):
    """Remove the user's module and return the clean base (the same module objects)."""
    prompt = pm.peft_config["default"].is_prompt_learning
    base = pm.get_base_model() if prompt else pm.unload()
    if hasattr(base, "disable_input_require_grads"):  # PEFT leaves an embedding hook behind
        base.disable_input_require_grads()
    return base


def train_user(base, tok, examples: Sequence, pcfg, ucfg: UserTrainConfig, seed: int, user_id: str,
               save_dir: str | Path | None, max_len: int) -> list[float]:
    """Train one user's module on their examples; save it to save_dir; leave the base clean."""
    pm = attach(base, pcfg, seed, user_id)
    try:
        data = encode(tok, examples, max_len)
        losses = train_loop(pm, pm.parameters(), data, ucfg.epochs, ucfg.lr, ucfg.batch_size,
                            user_seed(seed, user_id), tok.pad_token_id, weight_decay=ucfg.weight_decay)
        if save_dir is not None:
            pm.save_pretrained(str(save_dir))
    finally:
        detach(pm)
    return losses


def load_user(base, user_dir: str | Path):
    """The base with this user's module plugged in (PeftModel), ready for generation."""
    from peft import PeftModel

    user_dir = Path(user_dir)
    if not (user_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"no adapter at {user_dir} (adapter_config.json missing)")
    pm = PeftModel.from_pretrained(base, str(user_dir), is_trainable=False)
    pm.eval()
    return pm

